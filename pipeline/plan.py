"""Planning: which rows a run must produce, and which of them are still to do.

From the discovered documents and the ledger's final keys, `plan_pages` makes the work items
(page ranges of at most `render.pages_per_task`, only over missing pages; ready-made doc_error
and `quarantined` rows) and the full set of keys the run must account for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa  # pyright: ignore[reportMissingTypeStubs]  # pyarrow ships no stubs

from model.config import ModelName
from pipeline.arrow import pc
from pipeline.config import PipelineConfig
from pipeline.ledger import RUNS_SCHEMA, SOURCES_SCHEMA, covered, expand_runs, runs_from_keys
from pipeline.schema import Status, discovered_table

Key = tuple[str, int]
DOCS_SCHEMA = pa.schema(  # one row per distinct doc_id of the input
    [
        pa.field("doc_id", pa.string()),
        pa.field("page_count", pa.int32()),
        pa.field("is_error", pa.bool_()),  # a doc_error document: its one row is page_index -1
        pa.field("expected", pa.int64()),  # rows it must have
        pa.field("done", pa.int64()),  # of them already final
    ]
)


@dataclass
class Plan:
    """What a run must produce. The keys stay in Arrow: `docs` (DOCS_SCHEMA) and `done`, the
    ledger's runs clipped to this input's expected rows; `expected_keys`, `done_keys` and
    `sources` are Python views for tests and small inputs, never used by the driver."""

    tasks: list[dict[str, Any]]  # page-range rows and doc_error rows still to produce
    expected_rows: int = 0
    doc_error_rows: int = 0
    already_final: int = 0  # rows of these inputs already final in the ledger
    duplicates: int = 0  # documents whose bytes were already seen under another path
    quarantined: int = 0  # documents given `quarantined` rows instead of another attempt
    docs: pa.Table = field(default_factory=DOCS_SCHEMA.empty_table)  # pyright: ignore[reportUnknownVariableType]
    done: pa.Table = field(default_factory=RUNS_SCHEMA.empty_table)  # pyright: ignore[reportUnknownVariableType]
    source_pairs: pa.Table = field(default_factory=SOURCES_SCHEMA.empty_table)  # pyright: ignore[reportUnknownVariableType]
    done_by_status: Counter[str] = field(default_factory=Counter)  # the already final rows by status

    @property
    def expected_keys(self) -> set[Key]:
        ids, n, err = (self.docs.column(c).to_pylist() for c in ("doc_id", "page_count", "is_error"))
        return {(d, i) for d, c, e in zip(ids, n, err) for i in ([-1] if e else range(c))}

    @property
    def done_keys(self) -> set[Key]:
        return {(d, i) for d, i, _, _ in expand_runs(self.done)}

    @property
    def sources(self) -> set[tuple[str, str]]:
        t = self.source_pairs
        return set(zip(t.column("doc_id").to_pylist(), t.column("source_uri").to_pylist()))

    def files_of(self, doc_ids: set[str]) -> set[str]:
        """The committed parts holding already final rows of `doc_ids`."""
        d = self.done
        hit = d.filter(pc.is_in(d.column("doc_id"), value_set=pa.array(sorted(doc_ids), pa.string())))
        return set(pc.unique(hit.column("file")).to_pylist())

    def account(self, written: pa.Table) -> tuple[int, dict[str, int]]:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
        """After the run: (distinct rows written, {doc_id: rows still missing}) from the runs
        (RUNS_SCHEMA) the run's receipts made. A row counts once however often it was written."""
        n_written = int(pc.sum(covered(written)[0].column("pages")).as_py() or 0)
        final, _ = covered(pa.concat_tables([self.done, _clip(written, self.docs)]))
        docs = self.docs
        got = pc.index_in(docs.column("doc_id"), value_set=final.column("doc_id"))
        have = pc.fill_null(pc.take(final.column("pages"), got), 0)
        short = pc.subtract(docs.column("expected"), have)
        mask = pc.greater(short, 0)
        ids = docs.column("doc_id").filter(mask).to_pylist()
        return n_written, dict(zip(ids, short.filter(mask).to_pylist()))


def _missing_ranges(missing: list[int], per_task: int) -> list[range]:
    """Consecutive runs of the missing page indices, cut into ranges of at most `per_task`."""
    out: list[range] = []
    for i in missing:
        if out and out[-1].stop == i and len(out[-1]) < per_task:
            out[-1] = range(out[-1].start, i + 1)
        else:
            out.append(range(i, i + 1))
    return out


def _cut(start: int, stop: int, per_task: int) -> list[range]:
    return [range(a, min(a + per_task, stop)) for a in range(start, stop, per_task)]


def _clip(runs: pa.Table, docs: pa.Table) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The part of `runs` that are expected rows of `docs`: pages [0, page_count) of a readable
    document, page -1 of a doc_error one (a run of another input or page range is dropped)."""
    import numpy as np

    if runs.num_rows == 0 or docs.num_rows == 0:
        return RUNS_SCHEMA.empty_table()
    r = runs.filter(pc.is_in(runs.column("doc_id"), value_set=docs.column("doc_id")))
    if r.num_rows == 0:
        return RUNS_SCHEMA.empty_table()
    at = pc.index_in(r.column("doc_id"), value_set=docs.column("doc_id"))
    n = docs.column("page_count").take(at).to_numpy().astype(np.int64)
    err = docs.column("is_error").take(at).to_numpy(zero_copy_only=False)
    s = r.column("page_index").to_numpy().astype(np.int64)
    e = r.column("page_stop").to_numpy().astype(np.int64)
    lo, hi = np.where(err, -1, 0), np.where(err, 0, n)
    s2, e2 = np.maximum(s, lo), np.minimum(e, hi)
    keep = e2 > s2
    out = pa.table(
        {
            "doc_id": r.column("doc_id"),
            "page_index": pa.array(s2, pa.int32()),
            "page_stop": pa.array(e2, pa.int32()),
            "status": r.column("status"),
            "file": r.column("file"),
        },
        schema=RUNS_SCHEMA,
    )
    return out.filter(pa.array(keep))


def _as_runs(done: Any) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    if done is None:
        return RUNS_SCHEMA.empty_table()
    if isinstance(done, (set, frozenset, list)):
        return runs_from_keys(set(done))  # pyright: ignore[reportUnknownArgumentType]
    if isinstance(done, pa.Table):
        return done
    return done.runs  # a Ledger


def distinct_docs(docs: Any) -> tuple[pa.Table, int]:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The first row of each distinct doc_id of the discovery output (DISCOVERED_SCHEMA; a list
    of dicts is converted), in input order, and how many rows were duplicates of an earlier one."""
    import numpy as np

    t = discovered_table(docs)
    if t.num_rows == 0:
        return t, 0
    idx = pa.table({"doc_id": t.column("doc_id"), "i": pa.array(np.arange(t.num_rows, dtype=np.int64))})
    first = np.sort(idx.group_by("doc_id").aggregate([("i", "min")]).column("i_min").to_numpy())
    return t.take(pa.array(first)), t.num_rows - len(first)


def docs_table(uniq: pa.Table) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """DOCS_SCHEMA's columns but `done` for distinct documents (`distinct_docs`)."""
    import numpy as np

    err = pc.fill_null(pc.not_equal(uniq.column("error_code"), ""), False).to_numpy()
    counts = pc.fill_null(uniq.column("page_count"), 0).to_numpy().astype(np.int64)
    return pa.table(
        {
            "doc_id": uniq.column("doc_id"),
            "page_count": pa.array(counts, pa.int32()),
            "is_error": pa.array(err, pa.bool_()),
            "expected": pa.array(np.where(err, 1, counts), pa.int64()),
        }
    )


def plan_pages(
    cfg: PipelineConfig,
    docs: Any,
    done: Any = None,
    failures: dict[str, list[str]] | None = None,
) -> Plan:
    """Work items for the rows not yet final, page ranges of at most `render.pages_per_task`;
    each distinct doc_id is planned once. `docs`: the discovery output, a DISCOVERED_SCHEMA table
    (a list of dicts is converted). `done`: the ledger (or its runs, or a key set) whose final rows
    are skipped. A document that failed in `quarantine_after` earlier runs gets `quarantined` error
    rows instead.

    Per document: page count minus the done ranges, column-wise in Arrow and numpy (`_clip`,
    `covered`): only documents that still have rows to do become Python rows (tasks); only partly
    done ones have their done ranges looked at in Python; a finished one is never a Python object."""
    import numpy as np

    failures = failures or {}
    per_task = cfg.render.pages_per_task
    base = _base_row(cfg)
    plan = Plan(tasks=[])
    table = discovered_table(docs)
    plan.source_pairs = pa.Table.from_arrays(
        [table.column("doc_id"), table.column("source_uri")], schema=SOURCES_SCHEMA
    )
    uniq, plan.duplicates = distinct_docs(table)
    del table
    doc_t = docs_table(uniq)
    plan.done = _clip(_as_runs(done), doc_t)
    cov, _ = covered(plan.done)
    at = pc.index_in(doc_t.column("doc_id"), value_set=cov.column("doc_id"))
    n_done = pc.fill_null(pc.take(cov.column("pages"), at), 0).cast(pa.int64())
    plan.docs = doc_t.append_column("done", n_done)
    is_err = doc_t.column("is_error").to_numpy()
    counts = doc_t.column("page_count").to_numpy().astype(np.int64)
    x = n_done.to_numpy()
    expected = np.where(is_err, 1, counts)
    partial = doc_t.column("doc_id").filter(pa.array((x > 0) & (x < expected))).to_pylist()
    ranges: dict[str, list[tuple[int, int]]] = {}
    if partial:
        pr = plan.done.filter(pc.is_in(plan.done.column("doc_id"), value_set=pa.array(partial, pa.string())))
        for d, a, b in zip(*(pr.column(c).to_pylist() for c in ("doc_id", "page_index", "page_stop"))):
            ranges.setdefault(d, []).append((a, b))
    plan.doc_error_rows = int(is_err.sum())
    # the documents with rows still to do: a doc_error one without its row, a readable one short
    sel = np.nonzero(np.where(is_err, x == 0, x < counts))[0]
    todo_t = uniq.take(pa.array(sel, pa.int64()))
    cols = ("doc_id", "source_uri", "page_count", "error_code", "error")
    for (doc, uri, raw_count, code, error), c, e in zip(
        zip(*(todo_t.column(k).to_pylist() for k in cols)), counts[sel].tolist(), is_err[sel].tolist()
    ):
        common = {**base, "doc_id": doc, "source_uri": uri, "page_count": raw_count}
        if e:
            plan.tasks.append(
                {**common, "page_index": -1, "status": Status.doc_error, "error_code": code, "error": error}
            )
            continue
        past = failures.get(doc, [])
        if len(past) >= cfg.quarantine_after:
            have: set[int] = {i for a, b in ranges.get(doc, []) for i in range(a, b)}
            why = f"quarantined after {len(past)} runs that could not process it (last: {past[-1]})"
            plan.tasks.extend(
                {
                    **common,
                    "page_index": i,
                    "status": Status.ocr_error,
                    "error_code": "quarantined",
                    "error": why,
                }
                for i in range(c)
                if i not in have
            )
            plan.quarantined += 1
            continue
        if doc not in ranges:
            todo = _cut(0, c, per_task)
        else:
            have = {i for a, b in ranges[doc] for i in range(a, b)}
            todo = _missing_ranges([i for i in range(c) if i not in have], per_task)
        for r in todo:
            plan.tasks.append(
                {
                    **common,
                    "page_index": r.start,
                    "status": None,  # in flight: the stages give it its final status
                    "_range_start": r.start,
                    "_range_stop": r.stop,
                }
            )
    plan.expected_rows = int(pc.sum(doc_t.column("expected")).as_py() or 0)
    plan.already_final = int(x.sum())
    if plan.done.num_rows:
        widths = pc.subtract(plan.done.column("page_stop"), plan.done.column("page_index"))
        t = pa.table({"status": plan.done.column("status"), "n": widths.cast(pa.int64())})
        agg = t.group_by("status").aggregate([("n", "sum")])
        plan.done_by_status = Counter(
            dict(zip(agg.column("status").to_pylist(), agg.column("n_sum").to_pylist()))
        )
    return plan


def _base_row(cfg: PipelineConfig) -> dict[str, Any]:
    return {"mode": cfg.mode.name, "config_hash": cfg.config_hash(), "model_id": model_id(cfg)}


def model_id(cfg: PipelineConfig) -> str:
    if cfg.model.name in (ModelName.tiny_random, ModelName.full_random):
        return f"{cfg.model.name}:seed={cfg.model.seed}"  # the seed is the revision
    return f"{cfg.model.source}@{cfg.model.revision}" if cfg.model.revision else cfg.model.source
