"""`python -m model` (model/__main__.py): its choices and defaults are the model side's own (name
enums, mode table, hub id, EngineConfig), and one page runs end to end with the tiny model."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from PIL import Image

from model.__main__ import build_parser, main
from model.config import DType, ModelName
from model.engine_config import EngineConfig
from model.hub import OFFICIAL_HUB_ID
from model.modes import DEFAULT_MODE, MODES, ModeName
from model.preprocess import num_image_tokens
from model.tokenizer import PromptName


def _actions(ap: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in ap._actions}


def test_choices_and_defaults_come_from_the_model_side() -> None:
    acts = _actions(build_parser())
    assert list(acts["model"].choices or ()) == list(ModelName.values())
    assert list(acts["mode"].choices or ()) == list(ModeName.values()) == list(MODES)
    assert list(acts["dtype"].choices or ()) == list(DType.values())
    assert list(acts["prompt"].choices or ()) == list(PromptName.values())
    defaults = {k: a.default for k, a in acts.items()}
    assert defaults["model"] == ModelName.deepseek_ocr and defaults["source"] == OFFICIAL_HUB_ID
    assert defaults["mode"] == DEFAULT_MODE and defaults["prompt"] == PromptName.document
    assert defaults["max_new_tokens"] == EngineConfig.max_new_tokens
    assert defaults["dtype"] is None and defaults["max_crops"] is None  # per model / per mode
    assert ModelName.tiny_random.default_dtype == DType.float32
    assert {m.default_dtype for m in ModelName if m != ModelName.tiny_random} == {DType.bfloat16}


@pytest.mark.parametrize(("flag", "value"), [("--mode", "huge"), ("--model", "nope"), ("--dtype", "int8")])
def test_bad_choice_exits_2_naming_the_choices(
    capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["page.png", flag, value])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert value in err and flag in err, err
    allowed = {"--mode": ModeName, "--model": ModelName, "--dtype": DType}[flag]
    assert all(v in err for v in allowed.values()), err


def test_one_page_with_the_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "page.png"
    Image.new("RGB", (300, 200), "white").save(png)
    rc = main([str(png), "--model", "tiny_random", "--mode", "tiny", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    n = num_image_tokens(300, 200, ModeName.tiny)
    assert out.startswith(f"# {png}: 300x200 px, mode tiny, grid (1, 1), {n} image tokens, 3 output tokens")
    assert "## markdown" in out and "## blocks" in out
