"""Dated snapshots (pipeline/dated.py) on local disk and a real S3 server (moto): exactly the night's
rows, whole parts linked (POSIX) or server-side copied (S3), mixed parts rewritten, parts of an
earlier snapshot of the same day that are no longer wanted removed, and the snapshot untouched by
a later compaction of the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds
import pytest

from pipeline.compact import compact
from pipeline.dated import write_snapshot
from pipeline.ledger import commit_entry
from pipeline.outputs import OutputStore


@pytest.fixture(params=["file", "s3"])
def roots(request, tmp_path: Path) -> tuple[str, str, dict[str, Any]]:
    if request.param == "file":
        return str(tmp_path / "n" / "_store"), str(tmp_path / "n" / "2026-01-01"), {}
    bucket, _, so = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/n/_store", f"s3://{bucket}/n/2026-01-01", so


def _part(store: OutputStore, docs: list[str], config: str = "h") -> str:
    t = pa.table(
        {
            "doc_id": [d for d in docs for _ in range(2)],
            "page_index": pa.array([i for _ in docs for i in range(2)], pa.int32()),
            "config_hash": [config] * (2 * len(docs)),
            "status": ["ok"] * (2 * len(docs)),
        }
    )
    file = store.write_parquet("pages", t, name=f"part-{'-'.join(docs)}-{config}.parquet")
    commit_entry(store, t, file)
    return file


def _rows(store: OutputStore) -> list[tuple[str, int]]:
    t = pds.dataset(store.join("pages"), filesystem=store.fs, format="parquet").to_table()
    return sorted(zip(t.column("doc_id").to_pylist(), t.column("page_index").to_pylist()))


def test_snapshot_holds_exactly_the_nights_rows(roots: tuple[str, str, dict[str, Any]]) -> None:
    uri, day, so = roots
    store = OutputStore(uri, so)
    files = {_part(store, ["a"]), _part(store, ["b", "gone"]), _part(store, ["c"])}
    _part(store, ["a"], config="other")  # another configuration: never in this snapshot
    rec = write_snapshot(store, day, so, "h", {"a", "b", "c"}, files, {"run_id": "r1"})
    assert rec["placed"] == {("linked" if store.posix else "copied"): 2, "filtered": 1}
    dest = OutputStore(day, so)
    assert _rows(dest) == [(d, i) for d in ("a", "b", "c") for i in range(2)]
    if store.posix:  # a hard link: the same file, no bytes copied
        assert Path(dest.join("pages", "part-a-h.parquet")).stat().st_ino == (
            Path(store.join("pages", "part-a-h.parquet")).stat().st_ino
        )
    # the same night again after the input lost "c": its part leaves the snapshot
    again = write_snapshot(store, day, so, "h", {"a", "b"}, files, {"run_id": "r2"})
    assert again["removed"] == 1 and _rows(dest) == [(d, i) for d in ("a", "b") for i in range(2)]
    assert again["placed"].get("kept") == 1  # the unchanged whole part is not linked/copied again
    # compaction of the store does not touch the snapshot
    assert compact(store, target_mb=64)["swaps"] == 1
    assert _rows(dest) == [(d, i) for d in ("a", "b") for i in range(2)]
    assert dest.fs.exists(dest.join("_summary.json"))
