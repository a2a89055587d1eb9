"""Planning: which rows a run must produce, and which of them are still to do.

From the discovered documents and the ledger's final keys, `plan_pages` makes the work items
(page ranges of at most `render.pages_per_task`, only over missing pages; ready-made doc_error
and `quarantined` rows) and the full set of keys the run must account for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.config import ModelName
from pipeline.config import PipelineConfig
from pipeline.schema import Status


@dataclass
class Plan:
    tasks: list[dict[str, Any]]  # page-range rows and doc_error rows still to produce
    expected_keys: set[tuple[str, int]] = field(default_factory=set)  # every row of these inputs
    expected_rows: int = 0
    doc_error_rows: int = 0
    done_keys: set[tuple[str, int]] = field(default_factory=set)  # already final in the ledger
    duplicates: int = 0  # documents whose bytes were already seen under another path
    quarantined: int = 0  # documents given `quarantined` rows instead of another attempt
    sources: set[tuple[str, str]] = field(default_factory=set)  # every (doc_id, source_uri)


def _missing_ranges(missing: list[int], per_task: int) -> list[range]:
    """Consecutive runs of the missing page indices, cut into ranges of at most `per_task`."""
    out: list[range] = []
    for i in missing:
        if out and out[-1].stop == i and len(out[-1]) < per_task:
            out[-1] = range(out[-1].start, i + 1)
        else:
            out.append(range(i, i + 1))
    return out


def plan_pages(
    cfg: PipelineConfig,
    docs: list[dict[str, Any]],
    done: set[tuple[str, int]] | None = None,
    failures: dict[str, list[str]] | None = None,
) -> Plan:
    """Work items for the rows not yet final (`done` keys from the ledger are skipped), page
    ranges of at most `render.pages_per_task`; each distinct doc_id is planned once. A document
    that failed in `quarantine_after` earlier runs gets `quarantined` error rows instead."""
    done, failures = done or set(), failures or {}
    base = _base_row(cfg)
    plan = Plan(tasks=[])
    seen: set[str] = set()
    for d in docs:
        plan.sources.add((d["doc_id"], d["source_uri"]))
        if d["doc_id"] in seen:
            plan.duplicates += 1
            continue
        seen.add(d["doc_id"])
        common = {**base, "doc_id": d["doc_id"], "source_uri": d["source_uri"], "page_count": d["page_count"]}
        if d["error_code"]:
            key = (d["doc_id"], -1)
            plan.expected_keys.add(key)
            plan.doc_error_rows += 1
            if key not in done:
                plan.tasks.append(
                    {
                        **common,
                        "page_index": -1,
                        "status": Status.doc_error,
                        "error_code": d["error_code"],
                        "error": d["error"],
                    }
                )
            continue
        keys = [(d["doc_id"], i) for i in range(d["page_count"])]
        plan.expected_keys.update(keys)
        missing = [i for (_, i) in keys if (d["doc_id"], i) not in done]
        past = failures.get(d["doc_id"], [])
        if missing and len(past) >= cfg.quarantine_after:
            why = f"quarantined after {len(past)} runs that could not process it (last: {past[-1]})"
            plan.tasks.extend(
                {
                    **common,
                    "page_index": i,
                    "status": Status.ocr_error,
                    "error_code": "quarantined",
                    "error": why,
                }
                for i in missing
            )
            plan.quarantined += 1
            continue
        for r in _missing_ranges(missing, cfg.render.pages_per_task):
            plan.tasks.append(
                {
                    **common,
                    "page_index": r.start,
                    "status": None,  # in flight: the stages give it its final status
                    "_range_start": r.start,
                    "_range_stop": r.stop,
                }
            )
    plan.expected_rows = len(plan.expected_keys)
    plan.done_keys = plan.expected_keys & done
    return plan


def _base_row(cfg: PipelineConfig) -> dict[str, Any]:
    return {"mode": cfg.mode.name, "config_hash": cfg.config_hash(), "model_id": model_id(cfg)}


def model_id(cfg: PipelineConfig) -> str:
    if cfg.model.name in (ModelName.tiny_random, ModelName.full_random):
        return f"{cfg.model.name}:seed={cfg.model.seed}"  # the seed is the revision
    return f"{cfg.model.source}@{cfg.model.revision}" if cfg.model.revision else cfg.model.source
