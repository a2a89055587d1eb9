"""The ledger's keys as Arrow runs (issue 16, bounded driver memory), checked against Python sets.

Random key sets with holes, several files and a duplicate across parts: the runs must expand back
to exactly the rows, `covered` must count each key once, and planning from runs must give the same
tasks as planning from the key set. A format-1 snapshot (rows plus a JSON manifest, as written
before runs) is still read, and the benchmark's generated ledger (jobs/bench_ledger.py) loads to
the same keys from its snapshot as from its parts one by one.
"""

from __future__ import annotations

import json
import random
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PipelineConfig
from pipeline.ledger import (
    LEDGER_SCHEMA,
    MANIFEST_KEY,
    SNAPSHOT_DIR,
    Ledger,
    _listing,
    commit_entry,
    covered,
    expand_runs,
    runs_from_rows,
)
from pipeline.outputs import OutputStore
from pipeline.plan import plan_pages
from pipeline.schema import rows_to_table


def _rows(rng: random.Random) -> list[tuple[str, int, str, str]]:
    out = []
    for d in range(30):
        n = rng.randint(1, 40)
        for i in range(n):
            if rng.random() < 0.7:
                out.append(
                    (
                        f"doc{d}",
                        i,
                        rng.choice(["ok", "ok", "truncated"]),
                        f"pages/part-{i // 7 + d % 3}.parquet",
                    )
                )
    return out


def _table(rows: list[tuple[str, int, str, str]]) -> pa.Table:
    return pa.table(
        {
            "doc_id": pa.array([r[0] for r in rows], pa.string()),
            "page_index": pa.array([r[1] for r in rows], pa.int32()),
            "status": pa.array([r[2] for r in rows], pa.string()),
            "file": pa.array([r[3] for r in rows], pa.string()),
        }
    )


def test_runs_expand_back_to_the_rows_and_count_each_key_once() -> None:
    rng = random.Random(16)
    for _ in range(20):
        rows = _rows(rng)
        rng.shuffle(rows)
        runs = runs_from_rows(_table(rows))
        assert sorted(expand_runs(runs)) == sorted(rows)
        assert runs.num_rows < len(rows)  # consecutive pages of one file and status: one run
        dup = rows[: 3 + rng.randint(0, 5)]  # the same keys again in another file
        both = pa.concat_tables(
            [runs, runs_from_rows(_table([(d, i, s, "pages/other.parquet") for d, i, s, _ in dup]))]
        )
        cov, first = covered(both)
        want: dict[str, int] = {}
        for d, _i in {(r[0], r[1]) for r in rows}:
            want[d] = want.get(d, 0) + 1
        assert dict(zip(cov.column("doc_id").to_pylist(), cov.column("pages").to_pylist())) == want
        assert first >= 0 and covered(runs)[1] == -1


def test_planning_from_runs_equals_planning_from_the_key_set() -> None:
    rng = random.Random(7)
    cfg = PipelineConfig(quarantine_after=2)
    cfg.render = replace(cfg.render, pages_per_task=5)
    for _ in range(10):
        rows = _rows(rng)
        keys = {(d, i) for d, i, _, _ in rows}
        docs = [
            {
                "doc_id": f"doc{d}",
                "source_uri": f"/in/{d}.pdf",
                "page_count": 40,
                "error_code": "",
                "error": None,
            }
            for d in range(0, 35, 2)
        ] + [
            {
                "doc_id": "bad",
                "source_uri": "/in/bad.pdf",
                "page_count": 0,
                "error_code": "corrupt",
                "error": "x",
            }
        ]
        failures = {"doc4": ["a", "b"]}
        a = plan_pages(cfg, docs, keys, failures)
        b = plan_pages(cfg, docs, runs_from_rows(_table(rows)), failures)
        assert a.tasks == b.tasks and a.done_keys == b.done_keys
        assert (a.expected_rows, a.already_final, a.quarantined) == (
            b.expected_rows,
            b.already_final,
            b.quarantined,
        )
        want = {k for k in keys if int(k[0][3:]) % 2 == 0}
        assert b.done_keys == want and b.already_final == len(want)


def _commit(store: OutputStore, doc: str, pages: list[int], h: str = "h") -> str:
    table = rows_to_table(
        [
            {"doc_id": doc, "source_uri": f"/in/{doc}.pdf", "page_index": i, "status": "ok", "config_hash": h}
            for i in pages
        ]
    )
    rel = store.write_parquet("pages", table)
    commit_entry(store, table, rel)
    return rel


def test_format_1_snapshot_is_still_read(tmp_path: Path) -> None:
    """An output root from before runs: its snapshot (rows + JSON manifest) covers its parts."""
    store = OutputStore(str(tmp_path))
    for d in ("a", "b", "c"):
        _commit(store, d, [0, 1, 2])
    pages, entries = _listing(store, "pages"), _listing(store, "_ledger")
    rows = pa.concat_tables([pq.read_table(p) for p, _ in entries.values()]).cast(LEDGER_SCHEMA)
    manifest = {n: [pages[n][1], entries[n][1]] for n in pages}
    rows = rows.replace_schema_metadata({MANIFEST_KEY: json.dumps(manifest).encode()})
    store.write_parquet(SNAPSHOT_DIR, rows, name="snap-00000000000000000001.parquet")
    led = Ledger.load(store, "h")
    assert led.from_snapshot == 3 and led.done == {(d, i) for d in "abc" for i in range(3)}
    assert Ledger.write_snapshot(store) is None  # nothing changed: no write, even to upgrade it
    _commit(store, "d", [0])
    written = Ledger.write_snapshot(store)  # the next one is format 2, and covers all four parts
    assert (
        written is not None
        and pq.read_schema(tmp_path / written).metadata[b"pagemill.ledger_snapshot"] == b"2"
    )
    again = Ledger.load(store, "h")
    assert again.from_snapshot == 4 and again.done == led.done | {("d", 0)}


def test_bench_ledger_generator_writes_what_the_writer_writes(tmp_path: Path) -> None:
    """jobs/bench_ledger.py's generated parts and snapshot load to the same keys as a ledger read
    part by part (snapshot removed), and its parts are found by the snapshot path."""
    from jobs import bench_ledger

    root = tmp_path / "root"
    made = bench_ledger.make(
        Namespace(root=str(root), parts=60, pages_per_part=20, newer=6, orphans=2, workers=1)
    )
    assert made["parts_in_snapshot"] == 54
    store = OutputStore(str(root))
    led = Ledger.load(store, bench_ledger.CONFIG_HASH, read_only=True)
    assert led.from_snapshot == 54 and led.reconciled == 2 and led.rows == 60 * 20
    for p in (root / SNAPSHOT_DIR).iterdir():
        p.unlink()
    slow = Ledger.load(store, bench_ledger.CONFIG_HASH, read_only=True)
    assert slow.from_snapshot == 0 and slow.status == led.status and slow.files == led.files
