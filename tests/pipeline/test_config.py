"""Config schema (pipeline.config) and Hydra composition of conf/ (pipeline.run.compose), plus the CLI's
refusal of a bad value before any work starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import (
    ConfigValueError,
    GenerationConfig,
    ModeConfig,
    PipelineConfig,
    RenderConfig,
)
from pipeline.run import compose

REPO = Path(__file__).resolve().parents[2]


def test_defaults_match_schema() -> None:
    cfg = compose([])
    assert isinstance(cfg, PipelineConfig)
    assert (cfg.mode.name, cfg.mode.max_crops) == ("gundam", 6)
    assert cfg.model.name == "deepseek_ocr" and cfg.model.dtype == "bfloat16"
    assert cfg.render.dpi == 144 and cfg.input.uri == "tests/data" and cfg.output.uri == "out/run"
    # conf/ restates some defaults; they must agree with the dataclasses (one source of truth)
    assert cfg.render == RenderConfig() and cfg.generation == GenerationConfig() and cfg.mode == ModeConfig()
    assert cfg.config_hash() == PipelineConfig().config_hash()


def test_overrides_take_effect() -> None:
    cfg = compose(["mode=base", "render.dpi=200", "output.uri=/tmp/x/out", "model=tiny_random"])
    assert cfg.mode.name == "base"
    assert cfg.render.dpi == 200 and isinstance(cfg.render.dpi, int)
    assert cfg.output.uri == "/tmp/x/out"
    assert (cfg.model.name, cfg.model.source, cfg.model.dtype) == ("tiny_random", "", "float32")
    smoke = compose(["+experiment=cpu_smoke"])
    assert smoke.model.name == "tiny_random" and smoke.generation.max_new_tokens == 32
    for mode in ("tiny", "small", "base", "large", "gundam", "gundam_m"):  # every mode file composes
        assert compose([f"mode={mode}"]).mode.name == mode


def test_config_hash_tracks_output_affecting_settings_only() -> None:
    base = compose(["model=tiny_random"]).config_hash()
    assert len(base) == 16 and int(base, 16) >= 0
    assert compose(["model=tiny_random"]).config_hash() == base  # deterministic
    changed = {
        "mode": compose(["model=tiny_random", "mode=base"]).config_hash(),
        "dpi": compose(["model=tiny_random", "render.dpi=200"]).config_hash(),
        "model": compose([]).config_hash(),
        "max_new_tokens": compose(["model=tiny_random", "generation.max_new_tokens=100"]).config_hash(),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed)
    same = [
        compose(["model=tiny_random", "output.uri=/somewhere/else"]),
        compose(["model=tiny_random", "input.uri=/other/input"]),
        compose(["model=tiny_random", "render.timeout_s=5", "ray.ocr_actors=3", "progress=false"]),
    ]
    assert all(c.config_hash() == base for c in same)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("mode=huge", ["mode", "huge"]),  # no such group option: Hydra lists the available ones
        ("model=nope", ["model", "nope"]),
        ("render.dpi=5", ["render.dpi", "36..600"]),
        ("render.dpi=abc", ["render.dpi"]),  # not an int at all
        ("generation.max_new_tokens=0", ["generation.max_new_tokens", ">= 1"]),
        ("mode.name=huge", ["mode", "huge", "gundam"]),
        ("mode.max_crops=1", ["mode.max_crops"]),
        ("model.dtype=int8", ["model.dtype", "bfloat16"]),
        ("generation.ngram_window=5", ["generation.ngram_window"]),
        ("render.timeout_s=0", ["render.timeout_s"]),
        ("output.uri=", ["output.uri"]),
        ("render.dpyi=300", ["render.dpyi"]),  # typo'd key
        ("generation.max_batch=0", ["generation.max_batch", ">= 1"]),
    ],
)
def test_bad_values_name_the_key(override: str, names: list[str]) -> None:
    with pytest.raises(Exception) as ei:
        compose([override])
    e = ei.value
    mod = type(e).__module__
    assert isinstance(e, ConfigValueError) or mod.startswith(("hydra", "omegaconf")), repr(e)
    msg = str(e)
    for name in names:
        assert name in msg, f"{override}: {name!r} not in {msg!r}"
    if override in ("mode=huge", "model=nope"):
        assert "Could not find" in msg and ("gundam" in msg or "tiny_random" in msg)


def test_schema_validation_without_hydra() -> None:
    with pytest.raises(ConfigValueError, match=r"render\.dpi=601"):
        RenderConfig(dpi=601)
    with pytest.raises(ConfigValueError, match=r"generation\.max_model_len"):
        GenerationConfig(max_model_len=100)
    assert RenderConfig(dpi=36).dpi == 36 and RenderConfig(dpi=600).dpi == 600


def test_cli_rejects_bad_value_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "render.dpi=5",
            f"output.uri={out}",
            f"input.uri={REPO / 'tests' / 'data'}",
            "model=tiny_random",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "render.dpi" in proc.stderr and "36..600" in proc.stderr, proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s: the bad value should stop the job before Ray starts"
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert list(work.iterdir()) == []  # no hydra outputs, logs or partial pages in the cwd either


def test_ocr_rows_default_fits_the_gpu_and_one_batch_on_cpu() -> None:
    """max_batch=None (default): the GPU actor runs the paged engine with PAGED_AUTO_ROWS row
    slots (its block pool fitted to free memory); on CPU the engine holds one Ray batch. The actor
    takes enough concurrent Ray calls to fill its rows plus twice the engine's look-ahead (GPU),
    or 2x its rows (CPU)."""
    from model.engine import PAGED_AUTO_ROWS, EngineConfig
    from pipeline.preflight import ocr_calls_per_actor, ocr_rows

    cfg = compose(["model=tiny_random"])
    assert cfg.generation.max_batch is None
    bs = cfg.ray.ocr_batch_size
    assert ocr_rows(cfg, on_gpu=False) == bs and ocr_rows(cfg, on_gpu=True) is None
    ahead = EngineConfig.vision_ahead
    assert ocr_calls_per_actor(cfg, True) == -(-(PAGED_AUTO_ROWS + 2 * max(ahead, bs)) // bs)
    fixed = compose(["model=tiny_random", "generation.max_batch=40", "ray.ocr_batch_size=16"])
    assert ocr_rows(fixed, True) == 40 and ocr_rows(fixed, False) == 16
    assert ocr_calls_per_actor(fixed, True) == -(-(40 + 2 * max(ahead, 16)) // 16)
    assert ocr_calls_per_actor(fixed, False) == 2


def test_fit_max_batch_needs_cuda() -> None:
    from model.config import OcrConfig
    from model.engine import fit_max_batch, kv_bytes_per_token
    from model.ocr import OcrModel

    model = OcrModel(OcrConfig.tiny())
    c = model.decoder.config
    assert (
        kv_bytes_per_token(model) == c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    )  # fp32
    with pytest.raises(ValueError, match="CUDA"):
        fit_max_batch(model, 2048)


def test_generation_defaults_are_the_engine_defaults() -> None:
    """EngineConfig owns the engine's knobs: every GenerationConfig field that shares a name with
    an EngineConfig field has the engine's default (max_batch: None = fit the GPU, by design)."""
    from dataclasses import fields

    from model.engine import EngineConfig
    from pipeline.config import GenerationConfig

    engine = {f.name: f.default for f in fields(EngineConfig)}
    shared = [f for f in fields(GenerationConfig) if f.name in engine and f.name != "max_batch"]
    assert {f.name for f in shared} >= {
        "max_new_tokens",
        "max_model_len",
        "ngram_size",
        "ngram_window",
        "loop_min_span",
    }
    for f in shared:
        assert f.default == engine[f.name], f.name
    assert GenerationConfig().max_batch is None
