"""Commits on object stores: each part is one PUT under its final key (no temporary, no rename,
which on S3 is a copy plus a delete); POSIX keeps temp-and-rename. Listings are never stale.
Real S3: moto server mode (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.ledger import Ledger, commit_entry
from pipeline.outputs import OutputStore


def _table(doc: str) -> pa.Table:
    return pa.table(
        {"doc_id": [doc], "page_index": pa.array([0], pa.int32()), "config_hash": ["h"], "status": ["ok"]}
    )


def test_s3_part_is_put_under_its_final_key(
    s3_bucket: tuple[str, Any, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, fs, so = s3_bucket
    store = OutputStore(f"s3://{bucket}/out", so)
    assert not store.posix

    def no_rename(*a: Any, **k: Any) -> None:
        raise AssertionError("rename on an object store")

    monkeypatch.setattr(store.fs, "mv", no_rename)
    rel = store.write_parquet("pages", _table("a"))
    commit_entry(store, _table("a"), rel)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/out/pages")] == [rel.rsplit("/", 1)[-1]]

    # a second process's view (another store instance) sees new parts at once: no stale listing
    other = OutputStore(f"s3://{bucket}/out", so)
    assert Ledger.load(other, "h").status == {("a", 0): "ok"}
    rel_b = store.write_parquet("pages", _table("b"))
    commit_entry(store, _table("b"), rel_b)
    assert Ledger.load(other, "h").status == {("a", 0): "ok", ("b", 0): "ok"}


def test_posix_keeps_temp_and_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = OutputStore(str(tmp_path))
    assert store.posix
    moves: list[tuple[str, str]] = []
    real_mv = store.fs.mv
    monkeypatch.setattr(store.fs, "mv", lambda a, b, **k: (moves.append((a, b)), real_mv(a, b, **k)))
    rel = store.write_parquet("pages", _table("a"))
    assert len(moves) == 1 and "/.tmp-" in moves[0][0] and moves[0][1].endswith(rel)
