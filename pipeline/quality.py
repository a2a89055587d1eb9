"""Per-page quality signals, computed by the writer after post-processing (no Ray, no model weights).

- `repetition_score`: `model.sampling.repetition_score` (1 - distinct/total token 10-grams) of the
  raw output re-encoded with the model's tokenizer; ~0 for normal text, -> 1 for loops.
- `num_text_tokens` and `compression_ratio`: the optical compression of the page as the DeepSeek-OCR
  paper measures it, text tokens / vision tokens. Text tokens are the tokens of the clean markdown
  (grounding tags, boxes and figure references removed), not every generated token.
- `text_layer_agreement`: for pages whose PDF has a text layer, 1 - normalised Levenshtein distance
  (rapidfuzz) between the OCR text and the text layer, both reduced to plain words first (markdown,
  HTML and LaTeX markup dropped, Unicode NFKC, case folded, whitespace collapsed). 1.0 = identical;
  reading-order differences (columns, tables) lower it, so it ranks pages rather than grading them.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from rapidfuzz.distance import Levenshtein

from pipeline.schema import OUTPUT_STATUSES as OCR_STATUSES  # rows that carry model output

EOS = "<｜end▁of▁sentence｜>"

_FIGURE_REF = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]{0,200}>")
_LATEX_CMD = re.compile(r"\\[A-Za-z]+|\\[()\[\]{}]")
_MARKUP = re.compile(r"[#*_`|>{}^$~\\]+")
_SPACE = re.compile(r"\s+")


def plain_text(text: str | None) -> str:
    """Words only: what OCR text and a PDF text layer can be compared on."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKC", text)
    t = _FIGURE_REF.sub(" ", t)
    t = _HTML_TAG.sub(" ", t)
    t = _LATEX_CMD.sub(" ", t)
    t = _MARKUP.sub(" ", t)
    return _SPACE.sub(" ", t).strip().casefold()


def agreement(ocr_text: str | None, text_layer: str | None) -> float | None:
    """1 - normalised Levenshtein distance of the plain texts; None without a text layer."""
    ref = plain_text(text_layer)
    if not ref:
        return None
    return float(Levenshtein.normalized_similarity(plain_text(ocr_text), ref))


class PageQuality:
    """Holds the tokenizer (loaded once per writer actor) and fills a row's quality columns."""

    def __init__(self, tokenizer: Any = None) -> None:
        if tokenizer is None:
            from model.tokenizer import OcrTokenizer

            tokenizer = OcrTokenizer.default()
        self.tok = tokenizer

    def text_tokens(self, markdown: str | None) -> int:
        return len(self.tok.encode(_FIGURE_REF.sub("", markdown or "").strip()))

    def repetition(self, raw_output: str | None) -> float:
        from model.sampling import repetition_score

        raw = (raw_output or "").split(EOS, 1)[0]
        return float(repetition_score(self.tok.encode(raw)))

    def fill(self, row: dict[str, Any], text_layer: str | None = None) -> dict[str, Any]:
        """Set repetition_score, num_text_tokens, compression_ratio, text_layer_agreement (null on
        rows without model output; agreement also null without a text layer)."""
        if row.get("status") not in OCR_STATUSES:
            return row
        n_text = self.text_tokens(row.get("markdown"))
        n_vision = row.get("num_vision_tokens") or 0
        row["num_text_tokens"] = n_text
        row["compression_ratio"] = n_text / n_vision if n_vision > 0 else None
        row["repetition_score"] = self.repetition(row.get("raw_output"))
        has_layer = (row.get("text_layer_chars") or 0) > 0
        row["text_layer_agreement"] = agreement(row.get("markdown"), text_layer) if has_layer else None
        return row
