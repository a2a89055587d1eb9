"""config_hash from field metadata: every setting has a decision, hashed settings change the hash,
excluded ones do not, the hash version is part of it, and rows under an older hash stay where they
are while a run works under the new one (no Ray, no model)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

import pipeline.config as config_mod
from pipeline.config import NO_HASH, PipelineConfig, RenderConfig, hash_decisions
from pipeline.ledger import Ledger
from pipeline.outputs import OutputStore
from pipeline.plan import plan_pages
from pipeline.run import compose
from pipeline.stages import WriteStage, to_batch
from tests.pipeline.pages_fixture import ocr_row

# What `compose(["model=tiny_random"]).config_hash()` was before CONFIG_HASH_VERSION 2 (main at
# 93a6c5d: a hand-written dict that dropped max_batch, and force_length when "none").
V1_TINY_HASH = "7cc2f9608e8b8d87"


def _leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and k in _NESTED else {f"{prefix}{k}"}
    return out


_NESTED = {f for f, v in vars(PipelineConfig()).items() if is_dataclass(v)}


def _other(value: Any) -> Any:
    """A different value of the same kind (validation is bypassed: only the hash is looked at)."""
    if isinstance(value, Enum):
        return next(m for m in type(value) if m != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return [*value, 1]
    if isinstance(value, dict):
        return {**value, "changed": "1"}
    if value is None:
        return 1
    raise TypeError(f"no other value for {value!r}")


def _changed(cfg: PipelineConfig, key: str) -> PipelineConfig:
    new = copy.deepcopy(cfg)
    *path, name = key.split(".")
    obj: Any = new
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, name, _other(getattr(obj, name)))
    return new


def test_every_field_has_a_hash_decision() -> None:
    decisions = hash_decisions()
    # every leaf setting of the schema is decided, none is missing or invented
    assert set(decisions) == _leaves(asdict(PipelineConfig()))
    hashed = {k for k, v in decisions.items() if v}
    assert {"model.name", "model.revision", "mode.name", "render.dpi", "generation.force_length"} <= hashed
    assert "generation.max_batch" not in hashed and not any(k.startswith(("ray.", "input.")) for k in hashed)

    @dataclass
    class RenderWithNewKnob(RenderConfig):
        new_knob: int = 1  # no decision

    @dataclass
    class RenderWithExcludedKnob(RenderConfig):
        new_knob: int = field(default=1, metadata=NO_HASH)

    undecided = PipelineConfig(render=RenderWithNewKnob())
    with pytest.raises(TypeError, match=r"render\.new_knob has no config_hash decision"):
        undecided.config_hash()
    excluded = PipelineConfig(render=RenderWithExcludedKnob())
    assert excluded.config_hash() == PipelineConfig().config_hash()


@pytest.mark.parametrize("key", sorted(hash_decisions()))
def test_hashed_fields_change_the_hash_excluded_ones_do_not(key: str) -> None:
    cfg = PipelineConfig()
    changed = _changed(cfg, key)
    if hash_decisions()[key]:
        assert changed.config_hash() != cfg.config_hash(), key
    else:
        assert changed.config_hash() == cfg.config_hash(), key


def test_hash_version_and_code_version_are_in_the_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose(["model=tiny_random"])
    before = cfg.config_hash()
    assert before != V1_TINY_HASH  # version 2 hashes differently from the hand-written dict
    monkeypatch.setattr(config_mod, "CONFIG_HASH_VERSION", config_mod.CONFIG_HASH_VERSION + 1)
    assert cfg.config_hash() != before
    monkeypatch.undo()
    monkeypatch.setattr(config_mod, "OUTPUT_CODE_VERSION", config_mod.OUTPUT_CODE_VERSION + 1)
    assert cfg.config_hash() != before
    # enum settings hash by value, as the plain strings they were: composing from YAML or building
    # the dataclass directly gives the same hash
    assert PipelineConfig().config_hash() == compose([]).config_hash()


def test_rows_under_an_old_hash_stay_and_a_run_works_under_the_new_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = compose(["model=tiny_random", f"output.uri={out}"])
    new_hash = cfg.config_hash()
    store = OutputStore(str(out))
    # an output root written before the hash changed: two pages committed under the v1 hash
    old_rows = [ocr_row(doc_id=f"{i:064x}", config_hash=V1_TINY_HASH) for i in range(2)]
    WriteStage(cfg, str(out))(to_batch(old_rows))
    old_files = {p: p.read_bytes() for p in (out / "pages").glob("*.parquet")}
    assert old_files

    # the new configuration's ledger has none of them: the run redoes those pages under new_hash
    led = Ledger.load(store, new_hash)
    assert led.done == set() and led.reconciled == led.dropped == 0
    docs = [
        {
            "doc_id": r["doc_id"],
            "source_uri": r["source_uri"],
            "page_count": 1,
            "error_code": None,
            "error": None,
        }
        for r in old_rows
    ]
    plan = plan_pages(cfg, docs, led.done)
    assert plan.done_keys == set() and {t["config_hash"] for t in plan.tasks} == {new_hash}
    assert all(t["status"] is None for t in plan.tasks)  # in flight, not a status

    # the old partition is untouched and still complete under its own hash
    assert {p: p.read_bytes() for p in (out / "pages").glob("*.parquet")} == old_files
    assert Ledger.load(store, V1_TINY_HASH).done == {(r["doc_id"], 0) for r in old_rows}

    # after the run's rows are written both configurations are there, each with its own rows
    WriteStage(cfg, str(out))(to_batch([{**r, "config_hash": new_hash} for r in old_rows]))
    rows = ds.dataset(out / "pages", format="parquet").to_table(columns=["doc_id", "config_hash"]).to_pylist()
    assert sorted(r["config_hash"] for r in rows) == sorted([V1_TINY_HASH] * 2 + [new_hash] * 2)
    assert Ledger.load(store, new_hash).done == Ledger.load(store, V1_TINY_HASH).done
