"""Tokenizer tests: special-token ids, official prompts, prompt assembly vs the golden input_ids,
and that grounding / table special tokens decode as themselves."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from model.tokenizer import (
    BOS_ID,
    DEFAULT_PROMPT,
    EOS_ID,
    IMAGE_TOKEN_ID,
    PROMPTS,
    TD_END_ID,
    TD_START_ID,
    OcrTokenizer,
)

SPECIALS = {
    0: "<｜begin▁of▁sentence｜>",
    1: "<｜end▁of▁sentence｜>",
    2: "<｜▁pad▁｜>",
    128815: "<image>",
    128816: "<|ref|>",
    128817: "<|/ref|>",
    128818: "<|det|>",
    128819: "<|/det|>",
    128820: "<|grounding|>",
    128821: "<td>",
    128822: "</td>",
    128823: "<tr>",
    128824: "</tr>",
    128825: "<|User|>",
    128826: "<|Assistant|>",
}


@pytest.fixture(scope="module")
def tok() -> OcrTokenizer:
    return OcrTokenizer.default()


def test_constants(tok: OcrTokenizer) -> None:
    ids = (BOS_ID, EOS_ID, IMAGE_TOKEN_ID, TD_START_ID, TD_END_ID)
    assert ids == (0, 1, 128815, 128821, 128822)
    for tid, text in SPECIALS.items():
        assert tok.id_to_token(tid) == text
        assert tok.token_to_id(text) == tid
    assert len(tok) == 128827


def test_prompts() -> None:
    assert DEFAULT_PROMPT == PROMPTS["document"]
    assert PROMPTS == {
        "document": "<image>\n<|grounding|>Convert the document to markdown.",
        "ocr_image": "<image>\n<|grounding|>OCR this image.",
        "free_ocr": "<image>\nFree OCR.",
        "figure": "<image>\nParse the figure.",
        "describe": "<image>\nDescribe this image in detail.",
    }


def test_build_prompt_ids_layout(tok: OcrTokenizer) -> None:
    ids = tok.build_prompt_ids(DEFAULT_PROMPT, 5)
    assert ids == [0] + [128815] * 5 + [201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16]
    for prompt in PROMPTS.values():
        ids = tok.build_prompt_ids(prompt, 3)
        assert ids[:4] == [BOS_ID] + [IMAGE_TOKEN_ID] * 3
        assert ids.count(IMAGE_TOKEN_ID) == 3 and EOS_ID not in ids
        assert tok.decode(ids[4:]) == prompt[len("<image>") :]
    text = "Look: <image> and tell."
    ids = tok.build_prompt_ids(text, 2)
    assert ids == [0, *tok.encode("Look: "), 128815, 128815, *tok.encode(" and tell.")]
    # strip=True mimics the HF conversation template
    assert tok.build_prompt_ids(DEFAULT_PROMPT + " ", 4, strip=True) == tok.build_prompt_ids(
        DEFAULT_PROMPT, 4
    )
    assert tok.build_prompt_ids(DEFAULT_PROMPT + " ", 4) != tok.build_prompt_ids(DEFAULT_PROMPT, 4)


@pytest.mark.parametrize(
    ("prompt", "n"),
    [
        ("no image here", 3),
        ("<image><image>\nFree OCR.", 3),
        (DEFAULT_PROMPT, 0),
        (DEFAULT_PROMPT, -1),
    ],
)
def test_build_prompt_ids_rejects(tok: OcrTokenizer, prompt: str, n: int) -> None:
    with pytest.raises(ValueError):
        tok.build_prompt_ids(prompt, n)


@pytest.mark.parity
def test_golden_input_ids(tok: OcrTokenizer, parity_dir: Path) -> None:
    cases = json.loads((parity_dir / "cases.json").read_text())["cases"]
    assert len(cases) == 20
    for case in cases:
        ids = tok.build_prompt_ids(DEFAULT_PROMPT, case["n_image_positions"])
        assert ids == case["input_ids"], case["id"]
        assert tok.encode("\n<|grounding|>Convert the document to markdown.") == case["text_ids_after_image"]
        assert case["text_ids_before_image"] == []


@pytest.mark.parity
def test_bundled_equals_parity_tokenizer(tok: OcrTokenizer, parity_dir: Path) -> None:
    other = OcrTokenizer.from_dir(parity_dir / "tokenizer")
    text = "# Title\n\n<td>1.5</td> 先天下之忧而忧 <|ref|>x<|/ref|><|det|>[[1, 2]]<|/det|>"
    assert other.encode(text) == tok.encode(text)
    assert len(other) == len(tok)
    by_file = OcrTokenizer.from_dir(parity_dir / "tokenizer" / "tokenizer.json")
    assert by_file.encode(text) == tok.encode(text)


def test_decode_special_tokens_verbatim(tok: OcrTokenizer) -> None:
    for tid, text in SPECIALS.items():
        assert tok.decode([tid]) == text
    grounded = "<|ref|>title<|/ref|><|det|>[[12, 34, 560, 78]]<|/det|>\n# Hello 世界\n<tr><td>a</td></tr>"
    ids = tok.encode(grounded)
    for tid in (128816, 128817, 128818, 128819, 128821, 128822, 128823, 128824):
        assert tid in ids
    assert tok.decode(ids) == grounded
    assert tok.decode(ids + [EOS_ID]) == grounded + SPECIALS[1]
    stripped = tok.decode(ids + [EOS_ID], skip_special_tokens=True)
    assert "<|ref|>" not in stripped and "<td>" not in stripped and "title" in stripped


def test_from_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        OcrTokenizer.from_dir(tmp_path)


def test_pickle_roundtrip(tok: OcrTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.build_prompt_ids(DEFAULT_PROMPT, 7) == tok.build_prompt_ids(DEFAULT_PROMPT, 7)
