"""Compaction (pipeline/compact.py) on local disk and a real S3 server (moto): small parts of one
configuration are merged, never across configurations; readers see every row exactly once before,
during (a process killed at each step of a swap) and after; the next start (Ledger.load under the
lease) rolls the swap back or forward and finds exactly the keys it found before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds
import pytest

from pipeline import compact as compact_mod
from pipeline.compact import COMPACT_DIR, FAULT_ENV, compact, hidden_parts, live_dataset
from pipeline.documents import pages_dataset
from pipeline.lease import Lease, LeaseHeld
from pipeline.ledger import LEDGER_DIR, Ledger, commit_entry
from pipeline.outputs import OutputStore
from pipeline.schema import FIGURE_SCHEMA

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["file", "s3"])
def backend(request, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    if request.param == "file":
        return str(tmp_path / "out"), {}
    bucket, _, so = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", so


def _part(store: OutputStore, doc: str, pages: int, config: str, figures: bool = False) -> str:
    """One committed part as the writer commits it: figures, pages, then its ledger entry."""
    t = pa.table(
        {
            "doc_id": [doc] * pages,
            "page_index": pa.array(range(pages), pa.int32()),
            "config_hash": [config] * pages,
            "status": ["ok"] * pages,
            "markdown": [f"{doc} page {i}" for i in range(pages)],
        }
    )
    name = f"part-{doc}-{config}.parquet"
    if figures:
        fig = pa.Table.from_pylist(
            [{"doc_id": doc, "page_index": 0, "block_index": 0, "name": f"{doc}.png", "config_hash": config}],
            schema=FIGURE_SCHEMA,
        )
        store.write_parquet("figures", fig, name=name)
    file = store.write_parquet("pages", t, name=name)
    commit_entry(store, t, file)
    return file


def _build(uri: str, so: dict[str, Any]) -> OutputStore:
    store = OutputStore(uri, so)
    for i in range(6):
        _part(store, f"a{i}", 2 + i % 3, "cfgA", figures=i % 2 == 0)
    for i in range(3):
        _part(store, f"b{i}", 3, "cfgB")
    return store


def _live_rows(store: OutputStore) -> list[tuple[str, int, str, str]]:
    data = pages_dataset(store)
    assert data is not None
    t = data.to_table(columns=["doc_id", "page_index", "config_hash", "markdown"])
    return sorted(zip(*(t.column(n).to_pylist() for n in t.column_names)))


def _raw_rows(store: OutputStore) -> list[tuple[str, int]]:
    t = pds.dataset(store.join("pages"), filesystem=store.fs, format="parquet").to_table(
        columns=["doc_id", "page_index"]
    )
    return sorted(zip(t.column("doc_id").to_pylist(), t.column("page_index").to_pylist()))


def _names(store: OutputStore, sub: str) -> set[str]:
    store.fs.invalidate_cache(store.join(sub))
    if not store.fs.exists(store.join(sub)):
        return set()
    return {str(p).rsplit("/", 1)[-1] for p in store.fs.ls(store.join(sub), detail=False)}


def _keys(store: OutputStore, config: str, read_only: bool = False) -> dict[tuple[str, int], str]:
    return Ledger.load(store, config, read_only=read_only).status


def test_merges_small_parts_per_configuration(backend: tuple[str, dict[str, Any]]) -> None:
    store = _build(*backend)
    before = _live_rows(store)
    keys = {c: _keys(store, c) for c in ("cfgA", "cfgB")}
    s = compact(store, target_mb=64)
    assert s["parts_before"] == 9 and s["groups"] == 2 and s["parts_merged"] == 9 and s["swaps"] == 1
    pages = _names(store, "pages")
    assert len(pages) == 2 and _names(store, LEDGER_DIR) == pages
    for name in pages:  # one configuration per merged part
        t = pds.dataset(store.join("pages", name), filesystem=store.fs, format="parquet").to_table()
        assert len(set(t.column("config_hash").to_pylist())) == 1
    assert _names(store, "figures") <= pages and len(_names(store, "figures")) == 1
    figs = live_dataset(store, "figures")
    assert figs is not None and sorted(figs.to_table().column("doc_id").to_pylist()) == ["a0", "a2", "a4"]
    assert _live_rows(store) == before and _raw_rows(store) == sorted((d, p) for d, p, _, _ in before)
    assert not _names(store, COMPACT_DIR)
    for c in ("cfgA", "cfgB"):  # the same keys, now all in the merged parts (read from the snapshot)
        led = Ledger.load(store, c)
        assert (
            led.status == keys[c]
            and led.from_snapshot == 2
            and set(led.files.values()) < {f"pages/{n}" for n in pages}
        )
    again = compact(store, target_mb=64)  # nothing small left to pair: no write
    assert again["groups"] == 0 and again["swaps"] == 0 and _names(store, "pages") == pages


def test_groups_respect_target_size_and_config_filter(tmp_path: Path) -> None:
    store = _build(str(tmp_path / "out"), {})
    size = max(store.fs.size(p) for p in store.fs.ls(store.join("pages")))
    s = compact(store, target_mb=2.5 * size / (1 << 20), small_mb=64, config_hash="cfgA")
    assert s["groups"] == 3 and s["parts_merged"] == 6  # 6 cfgA parts, two per group; cfgB untouched
    assert {n for n in _names(store, "pages") if n.startswith("part-b")} == {
        f"part-b{i}-cfgB.parquet" for i in range(3)
    }


def _compact_proc(uri: str, so: dict[str, Any], fault: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline.compact", uri, "--storage-options", json.dumps(so), *extra]
    env = {"PYTHONPATH": str(REPO), FAULT_ENV: fault, "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fault", ["merged", "committed", "deleted"])
def test_process_killed_at_each_step_loses_nothing(backend: tuple[str, dict[str, Any]], fault: str) -> None:
    uri, so = backend
    store = _build(uri, so)
    before = _live_rows(store)
    keys = {c: _keys(store, c) for c in ("cfgA", "cfgB")}
    proc = _compact_proc(uri, so, fault, "--target-mb", "64")
    assert proc.returncode == 9, proc.stderr[-2000:]  # died at the fault
    assert _names(store, COMPACT_DIR) and hidden_parts(store)  # the swap record is left behind
    # readers during the interrupted swap: each row exactly once (dry runs: read-only ledger view)
    assert _live_rows(store) == before
    assert {c: _keys(store, c, read_only=True) for c in keys} == keys
    # the next start (a nightly, under the lease) rolls back (pending) or forward (committed)
    assert {c: _keys(store, c) for c in keys} == keys
    assert not _names(store, COMPACT_DIR) and not hidden_parts(store)
    assert _raw_rows(store) == sorted((d, p) for d, p, _, _ in before)  # even a bare directory read
    n = len(_names(store, "pages"))
    assert n == (9 if fault == "merged" else 2)
    done = _compact_proc(uri, so, "", "--target-mb", "64")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["swaps"] == (1 if fault == "merged" else 0)
    assert len(_names(store, "pages")) == 2 and _live_rows(store) == before
    assert {c: _keys(store, c) for c in keys} == keys


def test_crash_in_the_middle_of_the_merged_writes_rolls_back(
    backend: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception after the first merged part (not a process death): the record stays pending,
    the next start removes what was written."""
    store = _build(*backend)
    before = _live_rows(store)
    real = compact_mod.merge_group
    calls = {"n": 0}

    def flaky(*a: Any, **k: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("network gone")
        return real(*a, **k)

    monkeypatch.setattr(compact_mod, "merge_group", flaky)
    with pytest.raises(OSError):
        compact(store, target_mb=64)
    assert len(_names(store, "pages")) == 10 and _live_rows(store) == before  # 9 old + 1 merged, hidden
    Ledger.load(store, "cfgA")
    assert len(_names(store, "pages")) == 9 and _raw_rows(store) == sorted((d, p) for d, p, _, _ in before)


def test_grace_keeps_old_parts_hidden_until_the_next_start(tmp_path: Path) -> None:
    store = _build(str(tmp_path / "out"), {})
    before = _live_rows(store)
    s = compact(store, target_mb=64, grace_s=3600)
    assert s["swaps"] == 1 and len(_names(store, "pages")) == 11  # old parts kept for readers
    assert _live_rows(store) == before and len(hidden_parts(store)) == 9
    assert compact(store, target_mb=64)["records_recovered"] == 0  # grace not over: still kept
    led = Ledger.load(store, "cfgA")  # a nightly start removes them
    assert len(_names(store, "pages")) == 2 and not hidden_parts(store) and len(led.status) == 18


def test_refuses_while_a_run_holds_the_lease(tmp_path: Path) -> None:
    uri = str(tmp_path / "out")
    store = _build(uri, {})
    lease = Lease(store, "nightly-run", 600).acquire()
    try:
        with pytest.raises(LeaseHeld, match="nightly-run"):
            compact(store, target_mb=64)
        proc = _compact_proc(uri, {}, "")
        assert proc.returncode == 6 and "nightly-run" in proc.stderr
    finally:
        lease.release()
    assert len(_names(store, "pages")) == 9  # nothing touched


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    proc = _compact_proc(str(tmp_path / "out"), {}, "", "--target-mb", "0")
    assert proc.returncode == 2
