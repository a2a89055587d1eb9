"""Tokenizer wrapper and prompt assembly for DeepSeek-OCR (spec §1.6, §3.6, §4).

What: ``OcrTokenizer`` wraps the fast byte-level BPE tokenizer stored in a model directory's
``tokenizer.json`` (loaded with the ``tokenizers`` library, the same data the official
``LlamaTokenizerFast`` uses) and builds the exact prompt id sequence of the official scripts:

    [BOS=0] + tok(text before "<image>") + [128815] * N + tok(text after "<image>")

tokenised with ``add_special_tokens=False`` — no role tags, no EOS, no assistant prefix.
Why not ``transformers.AutoTokenizer``: the ``tokenizers`` object is small, picklable, fast,
and does not re-interpret the file (transformers versions differ in how they rebuild Llama
tokenizers); BOS is added here explicitly, as the reference does.

``OcrTokenizer.default()`` loads the copy bundled in ``model/assets/tokenizer`` (the DeepSeek-V3
BPE with the official DeepSeek-OCR added-token table; provenance in ``shared/parity/README.md``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

BOS_ID = 0
EOS_ID = 1
PAD_ID = 2
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 128815
REF_START_ID, REF_END_ID = 128816, 128817  # <|ref|> <|/ref|>
DET_START_ID, DET_END_ID = 128818, 128819  # <|det|> <|/det|>
GROUNDING_ID = 128820  # <|grounding|>
TD_START_ID, TD_END_ID = 128821, 128822  # <td> </td> (whitelisted from the n-gram ban)
TR_START_ID, TR_END_ID = 128823, 128824  # <tr> </tr>

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

# Official prompt strings (spec §4), verbatim: "\n" is a real newline, no trailing space.
PROMPTS: dict[str, str] = {
    "document": "<image>\n<|grounding|>Convert the document to markdown.",  # default, grounded
    "ocr_image": "<image>\n<|grounding|>OCR this image.",
    "free_ocr": "<image>\nFree OCR.",
    "figure": "<image>\nParse the figure.",
    "describe": "<image>\nDescribe this image in detail.",
}
DEFAULT_PROMPT = PROMPTS["document"]

# Token ids that must map to these exact strings in any tokenizer we accept.
_EXPECTED_SPECIALS = {
    BOS_ID: "<｜begin▁of▁sentence｜>",
    EOS_ID: "<｜end▁of▁sentence｜>",
    IMAGE_TOKEN_ID: IMAGE_TOKEN,
    GROUNDING_ID: "<|grounding|>",
    TD_START_ID: "<td>",
    TD_END_ID: "</td>",
}


class OcrTokenizer:
    """Encode/decode text and assemble prompt ids for one image."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        for tid, text in _EXPECTED_SPECIALS.items():
            if tokenizer.id_to_token(tid) != text:
                raise ValueError(
                    f"tokenizer id {tid} is {tokenizer.id_to_token(tid)!r}, expected {text!r}: "
                    "not a DeepSeek-OCR tokenizer"
                )
        self._tok = tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> OcrTokenizer:
        """Load ``<path>/tokenizer.json`` (a model directory or a path to the file itself)."""
        p = Path(path)
        file = p if p.is_file() else p / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        return cls(Tokenizer.from_file(str(file)))

    @classmethod
    def default(cls) -> OcrTokenizer:
        """The tokenizer bundled with pagemill (``model/assets/tokenizer``)."""
        return cls.from_dir(DEFAULT_TOKENIZER_DIR)

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def image_token_id(self) -> int:
        return IMAGE_TOKEN_ID

    def __len__(self) -> int:
        """Number of defined ids (base vocabulary + added tokens); the embedding has more rows."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with ``add_special_tokens=False`` (special-token strings still map)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids) if text else []

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def build_prompt_ids(self, prompt: str, num_image_tokens: int, strip: bool = False) -> list[int]:
        """Prompt ids exactly as spec §3.6; ``prompt`` must contain ``<image>`` exactly once.

        ``strip=True`` mimics the HF ``infer`` path (conversation template strips the prompt);
        the vLLM scripts pass it raw, which is the default here.
        """
        if strip:
            prompt = prompt.strip()
        n = prompt.count(IMAGE_TOKEN)
        if n != 1:
            raise ValueError(f"prompt must contain {IMAGE_TOKEN!r} exactly once, found {n}: {prompt!r}")
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int):
            raise ValueError(f"num_image_tokens must be an int, got {num_image_tokens!r}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        before, after = prompt.split(IMAGE_TOKEN)
        image = [IMAGE_TOKEN_ID] * num_image_tokens
        return [BOS_ID, *self.encode(before), *image, *self.encode(after)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``; by default special tokens (``<|ref|>``, ``<td>``, EOS) are kept."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
