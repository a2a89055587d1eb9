"""Ledger snapshots on local disk and a real S3 server (moto): after a snapshot, `Ledger.load`
reads that one file plus only the parts written or rewritten since (footer and table reads
counted), and gives exactly what a load without any snapshot gives: new parts, parts rewritten by
`forget`, deleted parts, orphans of a crash, and a corrupt snapshot are all handled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import pipeline.ledger as ledger_mod
from pipeline.ledger import SNAPSHOT_DIR, Ledger, commit_entry
from pipeline.outputs import OutputStore


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path: Path) -> OutputStore:
    if request.param == "file":
        return OutputStore(str(tmp_path / "out"))
    bucket, _, so = request.getfixturevalue("s3_bucket")
    return OutputStore(f"s3://{bucket}/out", so)


def _part(store: OutputStore, doc: str, pages: int, commit: bool = True) -> str:
    t = pa.table(
        {
            "doc_id": [doc] * pages,
            "page_index": pa.array(range(pages), pa.int32()),
            "config_hash": ["h"] * pages,
            "status": ["ok"] * pages,
        }
    )
    file = store.write_parquet("pages", t)
    if commit:
        commit_entry(store, t, file)
    return file


class Reads:
    """Counts the Parquet footers and tables `pipeline.ledger` reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.footers = self.tables = 0
        real_meta, real_table = ledger_mod.pq.read_metadata, ledger_mod.pq.read_table

        def meta(*a: Any, **k: Any) -> Any:
            self.footers += 1
            return real_meta(*a, **k)

        def table(*a: Any, **k: Any) -> Any:
            self.tables += 1
            return real_table(*a, **k)

        monkeypatch.setattr(ledger_mod.pq, "read_metadata", meta)
        monkeypatch.setattr(ledger_mod.pq, "read_table", table)

    def reset(self) -> None:
        self.footers = self.tables = 0


def _without_snapshot(store: OutputStore) -> dict[tuple[str, int], str]:
    """What a load gives with no snapshot at all (the reference)."""
    fs, path = store.fs, store.join(SNAPSHOT_DIR)
    fs.invalidate_cache()
    keep = {p: fs.cat_file(p) for p in fs.ls(path, detail=False)} if fs.exists(path) else {}
    for p in keep:
        fs.rm(p)
    try:
        return Ledger.load(store, "h").status
    finally:
        for p, data in keep.items():
            fs.pipe_file(p, data)


def test_load_reads_snapshot_plus_newer_parts(store: OutputStore, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(6):
        _part(store, f"d{i}", 2)
    assert Ledger.write_snapshot(store) is not None
    assert Ledger.write_snapshot(store) is None  # nothing changed: no new file
    reads = Reads(monkeypatch)

    led = Ledger.load(store, "h")
    assert led.from_snapshot == 6 and len(led.status) == 12
    # the snapshot alone: its versions, then (compared) its runs; two column reads of one file
    assert reads.footers == 0 and reads.tables == 2

    # parts since the snapshot: a new one, an orphan of a crash (pages part, no ledger part),
    # a part rewritten by force (forget), a pages part deleted
    _part(store, "new", 3)
    orphan = _part(store, "orphan", 1, commit=False)
    led.forget(store, {("d1", 0)})
    store.fs.rm(store.join("pages", led.files[("d2", 0)].rsplit("/", 1)[-1]))
    reads.reset()
    led = Ledger.load(store, "h")
    footers = reads.footers
    assert led.status == _without_snapshot(store)
    assert ("new", 2) in led.status and ("orphan", 0) in led.status and led.files[("orphan", 0)] == orphan
    assert ("d1", 0) not in led.status and ("d1", 1) in led.status
    assert ("d2", 0) not in led.status and led.dropped == 1 and led.reconciled == 1
    assert led.from_snapshot == 4  # d0, d3, d4, d5 untouched
    # footers of the 3 changed parts only (new, orphan, rewritten d1), not of the 4 unchanged
    assert footers <= 6, footers

    # the next snapshot covers everything again
    assert Ledger.write_snapshot(store) is not None
    reads.reset()
    again = Ledger.load(store, "h")
    assert again.status == led.status and again.from_snapshot == 7 and reads.footers == 0


def test_corrupt_snapshot_falls_back(store: OutputStore) -> None:
    for i in range(3):
        _part(store, f"d{i}", 1)
    Ledger.write_snapshot(store)
    _part(store, "later", 1)
    newest = Ledger.write_snapshot(store)
    assert newest is not None
    store.fs.pipe_file(store.join(newest), b"not parquet")
    led = Ledger.load(store, "h")  # the previous snapshot plus the part after it
    assert len(led.status) == 4 and led.from_snapshot == 3
    assert led.status == _without_snapshot(store)
