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


# ---------------------------------------------------------------- transformers is the loader


def _raw(path: Path):
    """The tokenizer as pagemill loaded it before transformers did: the `tokenizers` file itself."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


def _texts(parity_dir: Path) -> list[str]:
    """Real text to tokenise: the prompts, the reference's decoded outputs, every page of the
    bundled test PDFs (Latin, maths, a Japanese vertical page, a form), grounding markup and this
    repository's README (markdown tables, code, arrows and dashes)."""
    import pymupdf

    data = Path(__file__).resolve().parents[1] / "data"
    texts_md = (data.parents[1] / "README.md").read_text().split("\n## ")
    texts = [*PROMPTS.values(), "\n<|grounding|>Convert the document to markdown.", " lead", "a\n\n b\t"]
    lm = json.loads((parity_dir / "cases.json").read_text())["lm"]
    texts += [v["greedy_text"] for v in lm.values() if "greedy_text" in v]
    for pdf in sorted(data.glob("*.pdf")):
        try:
            with pymupdf.open(pdf) as doc:
                if doc.needs_pass:
                    continue
                texts += [str(page.get_text()) for page in doc]
        except pymupdf.FileDataError:  # the not-a-PDF fixture
            continue
    texts += texts_md
    texts.append("<|ref|>table<|/ref|><|det|>[[1, 2, 998, 999]]<|/det|>\n<table><tr><td>1</td></tr></table>")
    return [t for t in texts if t]


@pytest.mark.parity
def test_transformers_loader_equals_the_tokenizers_file(tok: OcrTokenizer, parity_dir: Path) -> None:
    """OcrTokenizer (transformers' PreTrainedTokenizerFast over the tokenizer files) gives exactly
    the ids, tokens and text of the raw `tokenizers` file the project used before, for the bundled
    copy and the parity fixture's tokenizer."""
    import random

    from model.tokenizer import DEFAULT_TOKENIZER_DIR

    texts = _texts(parity_dir)
    assert sum(len(t) for t in texts) > 20_000 and any("\u3000" <= c <= "\u9fff" for t in texts for c in t)
    rng = random.Random(0)
    for path in (DEFAULT_TOKENIZER_DIR, parity_dir / "tokenizer"):
        ours, raw = OcrTokenizer.from_dir(path), _raw(path)
        assert type(ours.hf).__module__.startswith("transformers")
        n = raw.get_vocab_size(with_added_tokens=True)
        assert len(ours) == n == 128827
        assert ours.hf.convert_ids_to_tokens(list(range(n))) == [raw.id_to_token(i) for i in range(n)]
        for t in texts:
            assert ours.encode(t) == raw.encode(t, add_special_tokens=False).ids, t[:80]
        for _ in range(200):  # any ids, special tokens included, both decode modes
            ids = [rng.randrange(n) for _ in range(rng.randrange(1, 40))]
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == raw.decode(ids, skip_special_tokens=skip)
    lm = json.loads((parity_dir / "cases.json").read_text())["lm"]
    for v in lm.values():  # the reference implementation's own decode of its greedy ids
        if "greedy_new_ids" in v:
            assert tok.decode(v["greedy_new_ids"]) == v["greedy_text"]


@pytest.mark.parity
def test_autotokenizer_as_the_model_authors_load_it(tok: OcrTokenizer, parity_dir: Path) -> None:
    """The authors' `AutoTokenizer.from_pretrained` on the fixture's tokenizer files builds the
    golden input_ids the same way (BOS + text ids, no special tokens added) as OcrTokenizer."""
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(parity_dir / "tokenizer"))
    cases = json.loads((parity_dir / "cases.json").read_text())["cases"]
    before, after = DEFAULT_PROMPT.split("<image>")
    for case in cases:
        n = case["n_image_positions"]
        ids = [BOS_ID, *auto.encode(before, add_special_tokens=False), *[IMAGE_TOKEN_ID] * n]
        ids += auto.encode(after, add_special_tokens=False)
        assert ids == case["input_ids"] == tok.build_prompt_ids(DEFAULT_PROMPT, n), case["id"]
    for t in _texts(parity_dir):
        assert auto.encode(t, add_special_tokens=False) == tok.encode(t), t[:80]
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (BOS_ID, EOS_ID, 2)


def _readme_config(parity_dir: Path) -> dict[str, object]:
    """The exact configuration dict the goldens were made with (parity README, its only JSON block)."""
    text = (parity_dir / "README.md").read_text()
    block = text.split("```json", 1)[1].split("```", 1)[0]
    return json.loads(block)


@pytest.mark.parity
def test_config_json_through_pretrained_config(parity_dir: Path, tmp_path: Path) -> None:
    """config.json is read by transformers' PretrainedConfig; the parity goldens' configuration
    (2-layer LM, official otherwise) reads as the official config with 2 layers, from a dict, a
    file or its directory."""
    from model.config import ConfigError, DecoderConfig, OcrConfig, read_hf_config

    cfg = _readme_config(parity_dir)
    want = OcrConfig.official().with_layers(2)
    assert OcrConfig.from_hf_config(cfg) == want
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_vl_v2"}))
    assert OcrConfig.from_hf_config(tmp_path) == OcrConfig.from_hf_config(tmp_path / "config.json") == want
    read = read_hf_config(tmp_path)
    assert "transformers_version" in read  # PretrainedConfig.to_dict() wrote it: transformers read the file
    # every key the model reads comes through unchanged (transformers 5 drops a few generic ones
    # nothing here reads, such as use_cache and a null rope_scaling)
    decoder_keys = set(DecoderConfig.__dataclass_fields__) & set(cfg)
    assert len(decoder_keys) >= 15 and all(read[k] == cfg[k] for k in decoder_keys)
    with pytest.raises(ConfigError, match="no config.json"):
        read_hf_config(tmp_path / "nowhere")
