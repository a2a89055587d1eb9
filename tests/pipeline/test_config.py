"""Config schema (pipeline.config) and Hydra composition of conf/ (pipeline.run.compose), plus the CLI's
refusal of a bad value before any work starts; the str-valued enums of the named choices."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from model.config import DType, ModelName, StrEnum
from model.engine_config import FinishReason, KvLayout
from model.modes import ModeName
from model.tokenizer import PROMPTS, PromptName
from pipeline.config import (
    ConfigValueError,
    Device,
    Fallback,
    ForceLength,
    GenerationConfig,
    ModeConfig,
    PipelineConfig,
    RenderConfig,
)
from pipeline.run import compose
from pipeline.schema import Status

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
        ("model.dtype=int8", ["model.dtype", "[bfloat16, float16, float32]"]),
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


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("render.dpi=5", ["render.dpi", "36..600"]),  # a range check (__post_init__)
        ("model.dtype=bogus", ["model.dtype", "[bfloat16, float16, float32]"]),  # OmegaConf: not a member
        ("mode.name=huge", ["mode.name", "[tiny, small, base, large, gundam, gundam_m]"]),
    ],
)
def test_cli_rejects_bad_value_before_any_work(tmp_path: Path, override: str, names: list[str]) -> None:
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
            override,
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
    assert proc.returncode == 2, proc.stdout + proc.stderr  # EXIT_CONFIG, either way the value is refused
    assert "configuration error" in proc.stderr and all(n in proc.stderr for n in names), proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s: the bad value should stop the job before Ray starts"
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert list(work.iterdir()) == []  # no hydra outputs, logs or partial pages in the cwd either


def test_ocr_rows_default_fits_the_gpu_and_one_batch_on_cpu() -> None:
    """max_batch=None (default): the GPU actor runs the paged engine with PAGED_AUTO_ROWS row
    slots (its block pool fitted to free memory); on CPU the engine holds one Ray batch. The actor
    takes enough concurrent Ray calls to fill its rows plus twice the engine's look-ahead (GPU),
    or 2x its rows (CPU)."""
    from model.engine_config import PAGED_AUTO_ROWS, EngineConfig
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

    from model.engine_config import EngineConfig
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


def _parser_of(main: Any, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser a `main(argv)` builds (caught at parse time; nothing else runs)."""
    got: list[argparse.ArgumentParser] = []

    class Built(Exception):
        pass

    def catch(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        got.append(self)
        raise Built

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Built):
        main([])
    return got[0]


def test_command_line_engine_defaults_are_the_engine_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command lines that expose engine knobs (`python -m model`, `jobs.benchmark`) take each
    default from EngineConfig: an option named like an EngineConfig field defaults to the field's
    default, or to None / 0 where it means "the engine's" / "fit to the GPU" (max_batch)."""
    from dataclasses import fields

    import jobs.benchmark
    import model.__main__
    from model.engine_config import EngineConfig

    engine = {f.name: f.default for f in fields(EngineConfig)}
    seen: set[str] = set()
    for main in (model.__main__.main, jobs.benchmark.main):
        for action in _parser_of(main, monkeypatch)._actions:
            if action.dest not in engine:
                continue
            seen.add(action.dest)
            if action.default is None or (action.dest == "max_batch" and action.default == 0):
                continue  # "the engine's default" / "as many rows as fit"
            assert action.default == engine[action.dest], (main.__module__, action.dest)
            if action.dest == "engine":
                assert list(action.choices or ()) == list(KvLayout.values())
    assert seen >= {"max_new_tokens", "sync_every", "admit_min", "vision_ahead", "engine", "kv_headroom_gib"}


ENUMS = (
    ModelName,
    DType,
    PromptName,
    ModeName,
    KvLayout,
    FinishReason,
    Status,
    Fallback,
    ForceLength,
    Device,
)


def test_every_str_enum_is_its_value() -> None:
    """Members are plain strings wherever data goes (json, Arrow, f-strings, dict keys), and names
    equal values: OmegaConf looks a member up by name, so the YAML / command-line spelling is the value."""
    assert set(ENUMS) <= set(_subclasses(StrEnum))
    for enum in _subclasses(StrEnum):
        for m in enum:
            assert m.name == m.value, m
            assert m == m.value and str(m) == f"{m}" == m.value and hash(m) == hash(m.value)
            assert json.dumps(m) == json.dumps(m.value)
            assert pa.array([m]).to_pylist() == [m.value] and type(pa.array([m]).to_pylist()[0]) is str
    assert set(PROMPTS) == set(PromptName)  # a text for every prompt name
    assert ModelName.values() == ("deepseek_ocr", "tiny_random", "full_random")


def _subclasses(cls: type) -> list[type[Enum]]:
    out: list[type[Enum]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


@pytest.mark.parametrize(
    ("key", "enum"),
    [
        ("model.name", ModelName),
        ("model.dtype", DType),
        ("model.device", Device),
        ("generation.prompt", PromptName),
        ("generation.fallback", Fallback),
        ("generation.force_length", ForceLength),
        ("mode.name", ModeName),
    ],
)
def test_enum_settings_are_validated_by_omegaconf(key: str, enum: type[StrEnum]) -> None:
    """A value that is not a member is refused while composing, with the key and every allowed
    value in the message; each member composes and arrives as the enum member."""
    with pytest.raises(ConfigValueError) as ei:
        compose(["model=tiny_random", f"{key}=bogus"])
    msg = str(ei.value)
    assert f"{key}='bogus'" in msg and f"[{', '.join(enum.values())}]" in msg, msg
    group, name = key.split(".")
    for m in enum:
        extra = ["model.source=x"] if key == "model.name" else []  # deepseek_ocr needs a source
        got = getattr(getattr(compose(["model=tiny_random", f"{key}={m.value}", *extra]), group), name)
        assert got is m


def test_on_disk_statuses_are_the_status_enum(tmp_path: Path) -> None:
    """The writer turns in-flight rows (status None) into final ones: what lands in pages/ is exactly
    the Status enum over rows of every kind, and a row without a final status is refused."""
    import pyarrow.dataset as ds

    from pipeline.schema import DOCUMENT_SCHEMA, STATUSES, rows_to_table
    from pipeline.stages import WriteStage, to_batch
    from tests.pipeline.pages_fixture import ocr_row

    cfg = compose(["model=tiny_random", f"output.uri={tmp_path}", "output.write_figures=false"])
    rows = [
        ocr_row(doc_id=f"{i:064x}", finish_reason=f, config_hash=cfg.config_hash())
        for i, f in enumerate(("stop", "length", "repetition", "error"))
    ]
    error = {"raw_output": None, "finish_reason": None, "num_output_tokens": None}
    rows.append(
        {**ocr_row(doc_id=f"{5:064x}"), **error, "status": Status.render_error, "error_code": "bad_image"}
    )
    rows.append({**ocr_row(doc_id=f"{6:064x}"), **error, "page_index": -1, "status": Status.doc_error})
    assert {r["status"] for r in rows[:4]} == {None}  # in flight until the writer
    WriteStage(cfg, str(tmp_path))(to_batch(rows))
    got = ds.dataset(tmp_path / "pages", format="parquet").to_table(columns=["doc_id", "status"]).to_pylist()
    by_doc = {r["doc_id"]: r["status"] for r in got}
    assert [by_doc[f"{i:064x}"] for i in range(4)] == ["ok", "truncated", "repetition", "ocr_error"]
    assert {r["status"] for r in got} == set(Status) == set(STATUSES)
    counts = {f.name for f in DOCUMENT_SCHEMA if f.name.startswith("pages_") and f.name != "pages_included"}
    assert counts == {f"pages_{s}" for s in Status}
    for bad in (None, "pending"):  # in flight, or the old in-flight marker: never written
        for row in (rows[0], rows[4]):
            page_row = {k: v for k, v in row.items() if not k.startswith("_")}
            with pytest.raises(ValueError, match="without a final status"):
                rows_to_table([{**page_row, "status": bad}])
    # the README's output contract names exactly these values
    readme = (REPO / "README.md").read_text()
    for column, enum in (("status", Status), ("finish_reason", FinishReason)):
        (line,) = [x for x in readme.splitlines() if x.startswith(f"| `{column}` |")]
        cell = line.split("|")[3]
        named = {w for w in cell.split("`")[1::2]}
        assert named == set(enum.values()), (column, named)
