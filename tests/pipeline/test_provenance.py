"""Provenance: config_hash covers the resolved model revision and the output-code version, and
model_id carries the revision (real checkpoint-like directories on disk, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import config as config_mod, provenance
from pipeline.plan import model_id
from pipeline.run import compose


def _checkpoint(root: Path, weights: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_vl_v2"}))
    (root / "model-00001.safetensors").write_bytes(weights)
    return root


def test_local_revision_changes_config_hash_and_model_id(tmp_path: Path) -> None:
    a = compose([f"model.source={_checkpoint(tmp_path / 'a', b'x' * 10)}"])
    b = compose([f"model.source={_checkpoint(tmp_path / 'b', b'x' * 11)}"])  # same config, other weights
    unresolved = a.config_hash()
    provenance.resolve(a)
    provenance.resolve(b)
    assert a.model.revision.startswith("local-") and a.model.revision != b.model.revision
    assert a.config_hash() != unresolved
    b.model.source = a.model.source
    assert a.config_hash() != b.config_hash()  # same path, other revision: other rows
    assert model_id(a) == f"{a.model.source}@{a.model.revision}"


def test_hub_snapshot_revision_is_the_commit_sha(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the huggingface_hub cache layout, as snapshot_download returns it (a local dir stands in for the hub)
    snap = _checkpoint(tmp_path / "models--x--y" / "snapshots" / "0123abcd" / "", b"w")
    cfg = compose([f"model.source={snap}"])
    assert provenance.resolve(cfg).model.revision == "0123abcd"
    assert model_id(cfg).endswith("@0123abcd")


def test_code_version_is_in_config_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose(["model=tiny_random"])
    before = cfg.config_hash()
    assert provenance.resolve(cfg).config_hash() == before  # random weights: composed == resolved
    before = cfg.config_hash()
    monkeypatch.setattr(config_mod, "OUTPUT_CODE_VERSION", config_mod.OUTPUT_CODE_VERSION + 1)
    assert cfg.config_hash() != before
