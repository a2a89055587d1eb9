"""Per-page quality signals (pipeline.quality) and how post-processing fills them."""

from __future__ import annotations

import pytest
from rapidfuzz.distance import Levenshtein

from model.sampling import repetition_score
from model.tokenizer import OcrTokenizer
from pipeline.quality import PageQuality, agreement, plain_text
from pipeline.stages import postprocess_row
from tests.pipeline.pages_fixture import EOS, GROUNDING, ocr_row, render_paper


@pytest.fixture(scope="module")
def quality() -> PageQuality:
    return PageQuality()


@pytest.fixture(scope="module")
def page():
    return render_paper()


def test_plain_text_drops_markup_not_words() -> None:
    md = "# Title\n\n**Bold** and *it* <table><tr><td>cell</td></tr></table> \\(x^2\\) ![](figures/a.png)"
    assert plain_text(md) == "title bold and it cell x 2"
    assert plain_text("Ｆｕｌｌ　width\n\n  text") == "full width text"  # NFKC, whitespace collapsed
    assert plain_text(None) == ""


def test_agreement_is_one_minus_normalised_edit_distance() -> None:
    assert agreement("# Hello world", "Hello\nworld") == 1.0
    assert agreement("", "some text") == 0.0
    assert agreement("anything", "") is None and agreement("anything", None) is None
    a, b = "the quick brown fox", "the quikc brown fax"
    assert agreement(a, b) == pytest.approx(1 - Levenshtein.distance(a, b) / max(len(a), len(b)))
    ab = agreement(a, b)
    assert ab is not None and 0 < ab < 1


def test_repetition_score_on_reencoded_output(quality: PageQuality) -> None:
    tok = OcrTokenizer.default()
    loop = "<td>1</td><td>2</td> the same line again\n" * 40
    prose = (
        "Optical compression maps a page of text onto a few hundred vision tokens; the decoder then "
        "reconstructs the text. This paragraph is ordinary prose without any repeated passage at all."
    )
    assert quality.repetition(loop + EOS) == pytest.approx(repetition_score(tok.encode(loop)))
    assert quality.repetition(loop) > 0.9
    assert quality.repetition(prose) == 0.0
    assert quality.repetition(None) == 0.0


def test_postprocess_fills_signals(quality: PageQuality, page) -> None:
    row = postprocess_row(ocr_row(GROUNDING, page=page, num_vision_tokens=273), quality)
    assert row["status"] == "ok" and row["finish_reason"] == "stop"
    tok = OcrTokenizer.default()
    # text tokens: the clean markdown without the figure reference (tags and boxes are not text)
    text = row["markdown"].replace(f"![]({row['_figures'][0][2]})", "").strip()
    assert row["num_text_tokens"] == len(tok.encode(text)) > 0
    assert row["compression_ratio"] == pytest.approx(row["num_text_tokens"] / 273)
    assert row["repetition_score"] == 0.0
    # the page has a text layer (2085 chars); the OCR text is unrelated: low but defined agreement
    assert row["text_layer_chars"] > 0 and 0.0 <= row["text_layer_agreement"] < 0.2
    same = postprocess_row(
        ocr_row("<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\n" + page.text + EOS, page=page),
        quality,
    )
    assert same["text_layer_agreement"] == 1.0


def test_signals_null_where_they_do_not_apply(quality: PageQuality, page) -> None:
    no_layer = postprocess_row(
        ocr_row("Plain text." + EOS, page=page, text_layer_chars=0, _text_layer=""), quality
    )
    assert no_layer["text_layer_agreement"] is None and no_layer["compression_ratio"] is not None
    truncated = postprocess_row(ocr_row("Plain text", page=page, finish_reason="length"), quality)
    assert truncated["status"] == "truncated" and truncated["repetition_score"] is not None
    error = postprocess_row(ocr_row(page=page, status="ocr_error", error="boom"), quality)
    assert error["status"] == "ocr_error"
    assert all(
        error.get(k) is None for k in ("repetition_score", "compression_ratio", "text_layer_agreement")
    )
