"""The ledger without Ray: `Ledger.load` reconciling what a crash can leave on disk, and `forget`.

Real Parquet on local disk, written the way the writer commits a batch (`OutputStore.write_parquet`
of a pages part in the page schema, then `commit_entry`), then damaged the way a crash would
damage it. Each test reads the files back with pyarrow: the ledger must describe exactly the
committed rows, so nothing is redone twice and nothing is lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ledger import LEDGER_DIR, PAGES_DIR, SOURCES_DIR, Ledger, commit_entry
from pipeline.outputs import OutputStore
from pipeline.schema import PAGE_SCHEMA, rows_to_table

H = "cafe0123cafe0123"  # a config_hash


def _pages(*docs: tuple[str, list[int]], h: str = H, status: str = "ok") -> pa.Table:
    """A pages part in the real page schema holding `docs` = (doc_id, [page_index, ...])."""
    return rows_to_table(
        [
            {
                "doc_id": d,
                "source_uri": f"/in/{d}.pdf",
                "page_index": i,
                "status": status,
                "config_hash": h,
                "markdown": f"{d} page {i}",
            }
            for d, pages in docs
            for i in pages
        ]
    )


def _commit(store: OutputStore, table: pa.Table, *, ledger: bool = True, figures: bool = False) -> str:
    """One writer batch: its figures (optional), its pages part, then (unless the crash came first)
    its ledger part. Returns the pages part's path relative to the root."""
    rel = store.write_parquet(PAGES_DIR, table)
    name = rel.rsplit("/", 1)[-1]
    if figures:
        keys = table.select(["doc_id", "page_index"])
        store.write_parquet("figures", keys, name=name)
    if ledger:
        commit_entry(store, table, rel)
    return rel


def _files(root: Path, sub: str) -> list[str]:
    return sorted(p.name for p in (root / sub).iterdir()) if (root / sub).exists() else []


def _keys(path: Path) -> set[tuple[str, int]]:
    t = pq.read_table(path, columns=["doc_id", "page_index"])
    return set(zip(t.column("doc_id").to_pylist(), t.column("page_index").to_pylist()))


def test_committed_parts_are_read_back_per_configuration(tmp_path: Path) -> None:
    """Two batches of one configuration and one of another: each configuration sees only its rows,
    with the status and the file that holds each; nothing is rewritten by a clean load."""
    store = OutputStore(str(tmp_path))
    a = _commit(store, _pages(("a", [0, 1])))
    b = _commit(store, _pages(("b", [0]), status="truncated"))
    _commit(store, _pages(("a", [0, 1]), h="other"))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")}
    led = Ledger.load(store, H)
    assert led.status == {("a", 0): "ok", ("a", 1): "ok", ("b", 0): "truncated"}
    assert led.files == {("a", 0): a, ("a", 1): a, ("b", 0): b}
    assert (led.reconciled, led.dropped) == (0, 0)
    assert led.counts({("a", 0), ("b", 0), ("zz", 0)}) == {"ok": 1, "truncated": 1}
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")} == before
    assert Ledger.load(store, "other").done == {("a", 0), ("a", 1)}
    assert Ledger.load(OutputStore(str(tmp_path / "fresh")), H).done == set()  # an empty root


def test_orphan_pages_part_is_indexed_from_its_own_rows(tmp_path: Path) -> None:
    """A crash between the pages rename and the ledger rename: the pages part is the truth. Its
    rows count as done (not redone, which would duplicate them) and a ledger part is written for it,
    so the next load has nothing left to reconcile."""
    store = OutputStore(str(tmp_path))
    _commit(store, _pages(("a", [0])))
    orphan = _commit(store, _pages(("b", [0, 1, 2]), ("c", [0])), ledger=False)
    name = orphan.rsplit("/", 1)[-1]
    assert name not in _files(tmp_path, LEDGER_DIR)

    led = Ledger.load(store, H)
    assert led.done == {("a", 0), ("b", 0), ("b", 1), ("b", 2), ("c", 0)}
    assert led.files[("c", 0)] == orphan and led.reconciled == 1
    entry = pq.read_table(tmp_path / LEDGER_DIR / name)
    assert entry.num_rows == 4 and set(entry.column("file").to_pylist()) == {orphan}
    again = Ledger.load(store, H)
    assert again.reconciled == 0 and again.status == led.status


def test_part_rewritten_by_an_interrupted_forget_is_reindexed(tmp_path: Path) -> None:
    """`forget` rewrites a pages part, then its ledger part. A crash in between leaves a ledger part
    that still lists the removed rows: the row-count check catches it and the removed rows are not
    counted as done (else they would be lost: never redone, no longer on disk)."""
    store = OutputStore(str(tmp_path))
    rel = _commit(store, _pages(("a", [0, 1]), ("b", [0])))
    name = rel.rsplit("/", 1)[-1]
    kept = _pages(("b", [0]))
    store.write_parquet(PAGES_DIR, kept, name=name)  # forget's first step; its second never ran
    assert pq.read_metadata(tmp_path / LEDGER_DIR / name).num_rows == 3

    led = Ledger.load(store, H)
    assert led.done == {("b", 0)} and led.reconciled == 1
    assert _keys(tmp_path / LEDGER_DIR / name) == {("b", 0)}


def test_stale_entry_without_its_pages_part_is_dropped(tmp_path: Path) -> None:
    """A ledger part whose pages part is gone (deleted by hand, lost with a bucket prefix): its rows
    are not on disk, so they must be redone. The entry and the part's side outputs are removed."""
    store = OutputStore(str(tmp_path))
    keep = _commit(store, _pages(("a", [0])), figures=True)
    gone = _commit(store, _pages(("b", [0, 1])), figures=True)
    (tmp_path / gone).unlink()
    gone_name = gone.rsplit("/", 1)[-1]

    led = Ledger.load(store, H)
    assert led.done == {("a", 0)} and led.dropped == 1
    assert gone_name not in _files(tmp_path, LEDGER_DIR)
    assert _files(tmp_path, "figures") == [keep.rsplit("/", 1)[-1]]  # b's figures went with it
    assert Ledger.load(store, H).dropped == 0


def test_side_outputs_of_a_batch_that_never_committed_are_removed(tmp_path: Path) -> None:
    """The writer commits figures before pages: a crash between them leaves figures of rows that
    will be redone (under the same part name), which must not stay as a second copy."""
    store = OutputStore(str(tmp_path))
    table = _pages(("a", [0]))
    store.write_parquet("figures", table.select(["doc_id", "page_index"]))
    assert len(_files(tmp_path, "figures")) == 1
    led = Ledger.load(store, H)
    assert led.done == set() and _files(tmp_path, "figures") == []


def test_leftover_temporaries_are_removed_and_never_read(tmp_path: Path) -> None:
    """Half-written `.tmp-*` files (a crash mid-write) in every directory the job writes: removed,
    and not parsed (their bytes are not Parquet). Other hidden files are not the ledger's business:
    they are skipped, not deleted."""
    store = OutputStore(str(tmp_path))
    _commit(store, _pages(("a", [0])))
    (tmp_path / "figures").mkdir()
    for sub in (PAGES_DIR, LEDGER_DIR, SOURCES_DIR, "_failures", "figures"):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / ".tmp-0123abcd-part-x.parquet").write_bytes(b"PAR1 half a footer")
    (tmp_path / PAGES_DIR / ".keep.parquet").write_bytes(b"not ours")

    led = Ledger.load(store, H)
    assert led.done == {("a", 0)} and (led.reconciled, led.dropped) == (0, 0)
    assert not list(tmp_path.rglob(".tmp-*"))
    assert (tmp_path / PAGES_DIR / ".keep.parquet").exists()


def test_every_kind_of_damage_at_once(tmp_path: Path) -> None:
    """An orphan, a stale entry and temporaries together (what a SIGKILL mid-batch plus a manual
    clean-up can leave): the ledger ends describing exactly the pages parts on disk."""
    store = OutputStore(str(tmp_path))
    _commit(store, _pages(("a", [0, 1])))
    _commit(store, _pages(("b", [0])), ledger=False)
    stale = _commit(store, _pages(("c", [0])))
    (tmp_path / stale).unlink()
    (tmp_path / PAGES_DIR / ".tmp-feed-part-y.parquet").write_bytes(b"")

    led = Ledger.load(store, H)
    on_disk = set().union(*(_keys(p) for p in (tmp_path / PAGES_DIR).glob("part-*.parquet")))
    assert led.done == on_disk == {("a", 0), ("a", 1), ("b", 0)}
    assert (led.reconciled, led.dropped) == (1, 1)
    assert _files(tmp_path, PAGES_DIR) == _files(tmp_path, LEDGER_DIR)


def test_duplicate_row_across_parts_is_logged_not_hidden(tmp_path: Path, caplog) -> None:
    """The same key in two committed parts cannot come from this code; if it is ever there (a
    copied-in part), the load says so instead of silently picking one."""
    store = OutputStore(str(tmp_path))
    _commit(store, _pages(("a", [0])))
    _commit(store, _pages(("a", [0]), ("b", [0])))  # another part name: other keys
    with caplog.at_level(logging.WARNING, logger="pagemill"):
        led = Ledger.load(store, H)
    assert led.done == {("a", 0), ("b", 0)}
    assert any("duplicate row ('a', 0)" in r.getMessage() for r in caplog.records)


def test_forget_removes_exactly_the_given_rows(tmp_path: Path) -> None:
    """`force` on document a: a's rows leave every part (pages, figures, ledger); a part left empty
    is deleted, a shared part is rewritten with b's rows intact; a key that is not done, or of
    another configuration, is left alone. The on-disk state reloads to the same ledger."""
    store = OutputStore(str(tmp_path))
    only_a = _commit(store, _pages(("a", [0, 1])), figures=True)
    shared = _commit(store, _pages(("a", [2]), ("b", [0, 1])), figures=True)
    _commit(store, _pages(("a", [0, 1, 2]), h="other"))
    led = Ledger.load(store, H)
    schema_before = pq.read_schema(tmp_path / shared)

    n = led.forget(store, {("a", 0), ("a", 1), ("a", 2), ("a", 3), ("z", 0)})
    assert n == 3 and led.done == {("b", 0), ("b", 1)}
    only_name, shared_name = only_a.rsplit("/", 1)[-1], shared.rsplit("/", 1)[-1]
    for sub in (PAGES_DIR, LEDGER_DIR, "figures"):
        assert only_name not in _files(tmp_path, sub), sub
        assert _keys(tmp_path / sub / shared_name) == {("b", 0), ("b", 1)}, sub
    rewritten = pq.read_table(tmp_path / shared)
    # still the page schema, with the metadata the writer gave it (HF features, schema version)
    assert rewritten.schema.equals(PAGE_SCHEMA) and rewritten.schema.equals(
        schema_before, check_metadata=True
    )
    assert rewritten.column("markdown").to_pylist() == ["b page 0", "b page 1"]

    reloaded = Ledger.load(store, H)
    assert reloaded.status == led.status and (reloaded.reconciled, reloaded.dropped) == (0, 0)
    assert Ledger.load(store, "other").done == {("a", 0), ("a", 1), ("a", 2)}
    assert led.forget(store, {("a", 0)}) == 0  # already gone: nothing to rewrite


def test_sources_and_failures_are_recorded_once_per_configuration(tmp_path: Path) -> None:
    """`_sources/` parts are named by their content (a rerun with nothing new writes nothing);
    failures count per configuration (what quarantine is decided on)."""
    store = OutputStore(str(tmp_path))
    led = Ledger.load(store, H)
    assert led.record_sources(store, {("a", "/in/a.pdf"), ("a", "/in/copy-of-a.pdf")}) == 2
    assert led.record_sources(store, {("a", "/in/a.pdf")}) == 0
    led.record_failures(store, "run1", {"a": "ocr worker died"})
    Ledger.load(store, "other").record_failures(store, "run1", {"a": "elsewhere"})
    led.record_failures(store, "run2", {})  # nothing failed: no part
    assert len(_files(tmp_path, SOURCES_DIR)) == 1 and len(_files(tmp_path, "_failures")) == 2

    again = Ledger.load(store, H)
    assert again.sources == {("a", "/in/a.pdf"), ("a", "/in/copy-of-a.pdf")}
    assert again.failures == {"a": ["ocr worker died"]}
    assert again.record_sources(store, set(again.sources)) == 0


@pytest.mark.parametrize("rows", [1, 300])
def test_reconcile_reads_parts_of_any_size(tmp_path: Path, rows: int) -> None:
    """The orphan check compares row counts from the footers: a part of several row groups (the
    writer's 256-row groups) is indexed whole."""
    store = OutputStore(str(tmp_path))
    table = _pages(("a", list(range(rows))))
    rel = store.write_parquet(PAGES_DIR, table, row_group_rows=256)
    assert pq.read_metadata(tmp_path / rel).num_row_groups == (2 if rows > 256 else 1)
    assert len(Ledger.load(store, H).done) == rows
