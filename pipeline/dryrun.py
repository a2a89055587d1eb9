"""`dry_run=true`: what a run would do, without doing it.

Discovery (on Ray, as a real run: list, read, hash, probe) and planning against a read-only view
of the ledger; then a report of the documents and pages that are new, changed (a known path whose
bytes changed), partly done (an interrupted run) and done, and an estimate of the GPU-hours from
earlier runs' `_runs/` records (pages per GPU-hour). No model is loaded, no OCR actor started,
nothing under the output root is written, moved or removed (not even the root itself is made).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline.config import PipelineConfig

log = logging.getLogger("pagemill")

CATEGORIES = ("new", "changed", "partial", "done")
RUNS_DIR = "_runs"


def classify(docs: Any, done: Any, known_sources: Any) -> dict[str, dict[str, int]]:
    """Documents (distinct doc_ids) and rows per category. A document is `done` when all its rows
    are final, `partial` when some are, `changed` when none are and one of its paths was seen
    before with other bytes (another doc_id), else `new`. `docs`: the discovery output
    (DISCOVERED_SCHEMA table, or a list of dicts); `done`: the ledger, its runs or a key set;
    `known_sources`: a (doc_id, source_uri) table or set. Matched in Arrow (no key set)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.arrow import pc
    from pipeline.ledger import SOURCES_SCHEMA
    from pipeline.plan import _as_runs, _clip, covered, distinct_docs, docs_table
    from pipeline.schema import discovered_table

    if not isinstance(known_sources, pa.Table):
        ks = sorted(known_sources)
        known_sources = pa.table(
            {"doc_id": [d for d, _ in ks], "source_uri": [u for _, u in ks]}, schema=SOURCES_SCHEMA
        )
    table = discovered_table(docs)
    uniq, _ = distinct_docs(table)
    doc_t = docs_table(uniq)
    cov, _ = covered(_clip(_as_runs(done), doc_t))
    at = pc.index_in(doc_t.column("doc_id"), value_set=cov.column("doc_id"))
    x = pc.fill_null(pc.take(cov.column("pages"), at), 0).cast(pa.int64()).to_numpy()
    inputs = pa.Table.from_arrays([table.column("doc_id"), table.column("source_uri")], schema=SOURCES_SCHEMA)
    seen = known_sources.select(SOURCES_SCHEMA.names).rename_columns(["seen_id", "source_uri"])
    j = inputs.join(seen, "source_uri", join_type="inner")
    other = j.filter(pc.not_equal(j.column("doc_id"), j.column("seen_id")))
    changed = pc.is_in(doc_t.column("doc_id"), value_set=pc.unique(other.column("doc_id"))).to_numpy()
    err = doc_t.column("is_error").to_numpy()
    rows = doc_t.column("expected").to_numpy()
    is_done = x >= rows
    is_partial = ~is_done & (x > 0)
    is_changed = ~is_done & ~is_partial & changed
    is_new = ~is_done & ~is_partial & ~changed
    left = np.where(is_partial, rows - x, rows)
    out = {c: {"documents": 0, "pages": 0, "rows": 0} for c in CATEGORIES}
    for cat, m in (("new", is_new), ("changed", is_changed), ("partial", is_partial), ("done", is_done)):
        out[cat]["documents"] = int(m.sum())
        out[cat]["rows"] = int(left[m].sum())
        out[cat]["pages"] = int(left[m & ~err].sum())
    return out


def earlier_runs(store: Any) -> list[dict[str, Any]]:
    """The `_runs/` records under the output root (unreadable ones skipped)."""
    path = store.join(RUNS_DIR)
    store.fs.invalidate_cache(path)
    if not store.fs.exists(path):
        return []
    out: list[dict[str, Any]] = []
    for p in sorted(store.fs.ls(path, detail=False)):
        if not p.endswith(".json") or p.rsplit("/", 1)[-1].startswith("."):
            continue
        try:
            out.append(json.loads(store.fs.cat_file(p)))
        except (OSError, ValueError) as e:
            log.warning("dry run: skipping unreadable run record %s (%s)", p, e)
    return out


def estimate(runs: list[dict[str, Any]], config_hash: str, rows: int) -> dict[str, Any]:
    """GPU-hours for `rows` at the pages per GPU-hour of earlier GPU runs (rows written / GPU-hours
    summed), preferring runs of this configuration."""
    gpu_runs = [r for r in runs if (r.get("gpu_hours") or 0) > 0 and r.get("rows_written")]
    same = [r for r in gpu_runs if r.get("config_hash") == config_hash]
    basis = same or gpu_runs
    if not basis:
        return {"gpu_hours": None, "pages_per_gpu_hour": None, "runs": 0, "basis": "none"}
    rate = sum(r["rows_written"] for r in basis) / sum(r["gpu_hours"] for r in basis)
    return {
        "gpu_hours": round(rows / rate, 4),
        "pages_per_gpu_hour": round(rate, 3),
        "runs": len(basis),
        "basis": "this configuration" if same else "other configurations",
    }


def dry_run(cfg: PipelineConfig) -> dict[str, Any]:
    """Discover and plan; print and return the plan's figures. Writes nothing."""
    from pipeline.discover import discover
    from pipeline.ledger import Ledger
    from pipeline.outputs import OutputStore
    from pipeline.plan import plan_pages

    store = OutputStore(cfg.output.uri, cfg.output.storage_options, create=False)
    ledger = Ledger.load(store, cfg.config_hash(), read_only=True)
    done = None if cfg.force else ledger  # force: every row of this input is redone
    docs = discover(cfg)
    plan = plan_pages(cfg, docs, done, ledger.failures)
    cats = classify(docs, done, ledger.source_pairs)
    todo = plan.expected_rows - plan.already_final
    result: dict[str, Any] = {
        "dry_run": True,
        "output_uri": store.root,
        "config_hash": cfg.config_hash(),
        "documents_in": len(docs),
        "duplicate_paths": plan.duplicates,
        "documents_quarantined": plan.quarantined,
        "documents_with_errors": documents_with_errors(docs),
        "rows_expected": plan.expected_rows,
        "rows_already_final": plan.already_final,
        "rows_to_do": todo,
        "pages_to_do": sum(cats[c]["pages"] for c in ("new", "changed", "partial")),
        "by_category": cats,
        "estimate": estimate(earlier_runs(store), cfg.config_hash(), todo),
    }
    print_dry_run(result)
    return result


def documents_with_errors(docs: Any) -> int:
    """Inputs (rows of the discovery output, duplicates included) with an error code."""
    from pipeline.arrow import pc
    from pipeline.schema import discovered_table

    code = discovered_table(docs).column("error_code")
    return int(pc.sum(pc.fill_null(pc.not_equal(code, ""), False)).as_py() or 0)


def print_dry_run(r: dict[str, Any]) -> None:
    c, e = r["by_category"], r["estimate"]

    def row(what: str) -> str:
        return "  ".join(f"{k} {c[k][what]}" for k in CATEGORIES)

    if e["gpu_hours"] is None:
        est = "no earlier GPU run in _runs/ to estimate from"
    else:
        est = (
            f"{e['gpu_hours']} GPU-hours at {e['pages_per_gpu_hour']} pages per GPU-hour "
            f"({e['runs']} earlier run(s), {e['basis']})"
        )
    rows = [
        ("documents", row("documents")),
        ("pages", row("pages")),
        (
            "rows to do",
            f"{r['rows_to_do']} of {r['rows_expected']} ({r['rows_already_final']} already final)",
        ),
        ("duplicate paths", r["duplicate_paths"]),
        ("documents with errors", r["documents_with_errors"]),
        ("quarantined documents", r["documents_quarantined"]),
        ("estimate", est),
        ("output", r["output_uri"]),
    ]
    width = max(len(k) for k, _ in rows)
    print("\npagemill dry run (nothing processed, nothing written)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
