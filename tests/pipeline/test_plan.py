"""`plan_pages` without Ray: which rows a run must account for and which it still has to make.

Documents are given as discovery hands them over (doc_id = sha256 of the bytes, page_count, error
code); the done keys come from a real `Ledger` over real Parquet where the case is about resume,
so a planner that redid finished rows, lost missing ones or miscounted would fail here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.ledger import Ledger, commit_entry
from pipeline.outputs import OutputStore
from pipeline.plan import model_id, plan_pages
from pipeline.schema import rows_to_table
from pipeline.sources import content_id

DATA = Path(__file__).resolve().parents[1] / "data"


def _cfg(pages_per_task: int = 16, quarantine_after: int = 2) -> PipelineConfig:
    cfg = PipelineConfig(quarantine_after=quarantine_after)
    cfg.render = replace(cfg.render, pages_per_task=pages_per_task)
    return cfg


def _doc(doc_id: str, pages: int, uri: str = "", error: str | None = None) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "source_uri": uri or f"/in/{doc_id}.pdf",
        "page_count": pages,
        "error_code": error,
        "error": f"{error}: details" if error else None,
    }


def _ranges(plan, doc_id: str) -> list[tuple[int, int]]:
    return [
        (t["_range_start"], t["_range_stop"])
        for t in plan.tasks
        if t["doc_id"] == doc_id and t["status"] is None  # in flight: no status yet
    ]


def _commit_rows(store: OutputStore, keys: list[tuple[str, int]], config_hash: str) -> None:
    """What the writer leaves for these rows: one pages part and its ledger part."""
    table = rows_to_table(
        [
            {
                "doc_id": d,
                "source_uri": f"/in/{d}.pdf",
                "page_index": i,
                "status": "ok",
                "config_hash": config_hash,
            }
            for d, i in keys
        ]
    )
    commit_entry(store, table, store.write_parquet("pages", table))


def test_new_documents_are_cut_into_bounded_ranges() -> None:
    """Nothing done yet: every page in ranges of at most `pages_per_task`, one ready-made doc_error
    row for an unreadable document, and every task carrying the row identity of this config."""
    cfg = _cfg(pages_per_task=16)
    plan = plan_pages(cfg, [_doc("a", 40), _doc("b", 1), _doc("bad", 0, error="corrupt")])
    assert _ranges(plan, "a") == [(0, 16), (16, 32), (32, 40)]
    assert _ranges(plan, "b") == [(0, 1)]
    (err,) = [t for t in plan.tasks if t["status"] == "doc_error"]
    assert (err["doc_id"], err["page_index"], err["error_code"]) == ("bad", -1, "corrupt")
    assert plan.expected_keys == {("a", i) for i in range(40)} | {("b", 0), ("bad", -1)}
    assert (plan.expected_rows, plan.doc_error_rows, plan.done_keys) == (42, 1, set())
    for t in plan.tasks:
        assert t["config_hash"] == cfg.config_hash() and t["model_id"] == model_id(cfg)
        assert t["mode"] == cfg.mode.name and t["page_count"] == {"a": 40, "b": 1, "bad": 0}[t["doc_id"]]
        if t["status"] is None:  # in flight
            assert t["page_index"] == t["_range_start"]


def test_partially_done_document_plans_only_its_missing_pages() -> None:
    """A resumed document: only the missing pages are planned, holes give separate ranges, and a
    long run of missing pages is still cut at `pages_per_task`; done rows are counted, not redone."""
    done = {("a", i) for i in [*range(5), 10, 11, 40, 41]} | {("gone", 0)}  # "gone": not in this input
    plan = plan_pages(_cfg(pages_per_task=16), [_doc("a", 42)], done)
    assert _ranges(plan, "a") == [(5, 10), (12, 28), (28, 40)]
    planned = {i for s, e in _ranges(plan, "a") for i in range(s, e)}
    done_a = {i for d, i in done if d == "a"}
    assert planned.isdisjoint(done_a) and planned | done_a == set(range(42))  # each page once
    assert plan.done_keys == done - {("gone", 0)} and plan.expected_rows == 42


def test_done_documents_plan_nothing() -> None:
    """A rerun over finished inputs (pages and a doc_error row) has no task at all: the driver
    then starts no Ray work and writes nothing."""
    docs = [_doc("a", 3), _doc("bad", 0, error="not_a_pdf")]
    done = {("a", 0), ("a", 1), ("a", 2), ("bad", -1)}
    plan = plan_pages(_cfg(), docs, done)
    assert plan.tasks == [] and plan.done_keys == plan.expected_keys == done


def test_changed_document_is_a_new_document() -> None:
    """The same path with other bytes has another doc_id: it is planned whole, and the rows of its
    old bytes are neither expected nor counted as done for this input."""
    old = (DATA / "form-libreoffice-01.pdf").read_bytes()
    new = old + b"\n% an incremental update\n"
    uri = "/in/form.pdf"
    old_id, new_id = content_id(old), content_id(new)
    assert old_id != new_id
    done = {(old_id, 0), (old_id, 1)}
    plan = plan_pages(_cfg(), [_doc(new_id, 2, uri)], done)
    assert _ranges(plan, new_id) == [(0, 2)]
    assert plan.expected_keys == {(new_id, 0), (new_id, 1)} and plan.done_keys == set()
    assert plan.sources == {(new_id, uri)}


def test_same_bytes_under_two_paths_are_planned_once() -> None:
    """A copy of a document: planned once (no duplicate rows), both paths kept as sources."""
    plan = plan_pages(_cfg(), [_doc("a", 2, "/in/x.pdf"), _doc("a", 2, "/in/copy/x.pdf")])
    assert _ranges(plan, "a") == [(0, 2)] and plan.duplicates == 1 and plan.expected_rows == 2
    assert plan.sources == {("a", "/in/x.pdf"), ("a", "/in/copy/x.pdf")}


def test_documents_that_kept_failing_are_quarantined_on_their_missing_pages() -> None:
    """After `quarantine_after` failed runs the missing pages get `quarantined` rows instead of
    another attempt; done pages keep their rows; one failure short of the limit is retried; a
    finished document is never quarantined, whatever its history."""
    docs = [_doc("a", 4), _doc("b", 2), _doc("c", 1)]
    failures = {"a": ["crash 1", "crash 2"], "b": ["crash 1"], "c": ["x", "y", "z"]}
    plan = plan_pages(_cfg(quarantine_after=2), docs, {("a", 0), ("c", 0)}, failures)
    q = [t for t in plan.tasks if t["doc_id"] == "a"]
    assert [(t["page_index"], t["status"], t["error_code"]) for t in q] == [
        (i, "ocr_error", "quarantined") for i in (1, 2, 3)
    ]
    assert "after 2 runs" in q[0]["error"] and "crash 2" in q[0]["error"]
    assert _ranges(plan, "b") == [(0, 2)] and not [t for t in plan.tasks if t["doc_id"] == "c"]
    assert plan.quarantined == 1


def test_resume_and_force_over_a_real_ledger(tmp_path: Path) -> None:
    """The driver's sequence (pipeline/run.py) on real Parquet: the ledger's done keys make a rerun
    plan nothing; rows under another configuration do not count; `force` forgets this input's rows
    (only those) and the second plan then covers all of them exactly once."""
    cfg = _cfg(pages_per_task=2)
    h = cfg.config_hash()
    store = OutputStore(str(tmp_path))
    _commit_rows(store, [("a", 0), ("a", 1), ("a", 2)], h)
    _commit_rows(store, [("other", 0)], h)  # a document of an earlier input: must survive force
    _commit_rows(store, [("b", 0)], "another-config")
    docs = [_doc("a", 3), _doc("b", 1)]

    ledger = Ledger.load(store, h)
    plan = plan_pages(cfg, docs, ledger.done, ledger.failures)
    assert _ranges(plan, "a") == [] and _ranges(plan, "b") == [(0, 1)]  # b's rows are another config's
    assert plan.done_keys == {("a", 0), ("a", 1), ("a", 2)}

    assert ledger.forget(store, plan.expected_keys) == 3  # force
    plan = plan_pages(cfg, docs, ledger.done, ledger.failures)
    assert _ranges(plan, "a") == [(0, 2), (2, 3)] and plan.done_keys == set()
    reloaded = Ledger.load(store, h)
    assert reloaded.done == {("other", 0)}  # on disk too, not only in memory
    assert Ledger.load(store, "another-config").done == {("b", 0)}


def test_discovery_table_plans_like_the_dict_rows() -> None:
    """`discover` hands the planner one DISCOVERED_SCHEMA table (no dict per document): planned
    column-wise, it gives the same tasks and counts as the same documents as dicts."""
    from pipeline.schema import DISCOVERED_SCHEMA, discovered_table

    docs = [_doc("a", 40), _doc("b", 3), _doc("a", 40, "/in/copy/a.pdf"), _doc("bad", 0, error="corrupt")]
    table = discovered_table(docs)
    assert table.schema.equals(DISCOVERED_SCHEMA) and table.num_rows == 4
    done = {("a", i) for i in range(16)} | {("b", 0), ("b", 1), ("b", 2)}
    want, got = plan_pages(_cfg(), docs, done), plan_pages(_cfg(), table, done)
    assert got.tasks == want.tasks and got.tasks
    assert (
        (got.expected_rows, got.already_final, got.duplicates, got.doc_error_rows)
        == (
            want.expected_rows,
            want.already_final,
            want.duplicates,
            want.doc_error_rows,
        )
        == (44, 19, 1, 1)
    )
    assert got.docs.equals(want.docs) and got.sources == want.sources
    assert _ranges(got, "a") == [(16, 32), (32, 40)] and _ranges(got, "b") == []
