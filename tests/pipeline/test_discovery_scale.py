"""Discovery runs in Ray workers and keeps document bytes off the driver (the 100k-file figure is
in BENCHMARKS.md, from `python -m jobs.bench_discovery --files 100000`; this is the CI-sized run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_discovery_is_distributed_and_driver_stays_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pymupdf
    import ray

    import pipeline.discover
    import pipeline.sources
    from pipeline.discover import discover
    from pipeline.run import compose, init_ray

    doc = pymupdf.open()
    doc.new_page(width=200, height=200).insert_text((20, 100), "discovery")
    base = doc.tobytes()
    root = tmp_path / "in"
    n, pad = 1000, b"%" + b"x" * 60_000 + b"\n"  # ~60 KB per file: 60 MB in all
    for i in range(n):
        sub = root / f"{i // 500}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"d{i:05d}.pdf").write_bytes(base + pad + f"% {i}\n".encode())
    (tmp_path / "warm").mkdir()
    for i in range(5):
        (tmp_path / "warm" / f"w{i}.pdf").write_bytes(base + f"% w{i}\n".encode())

    def driver_must_not_read(*a, **k):
        raise AssertionError("document bytes read on the driver")

    monkeypatch.setattr(pipeline.sources, "read_document", driver_must_not_read)  # workers import their own
    monkeypatch.setattr(pipeline.discover, "DRIVER_PROBE_MAX", 0)  # the 5 warm-up files: the pool too
    cfg = compose(["model=tiny_random", f"input.uri={root}", f"output.uri={tmp_path / 'out'}"])
    warm = compose(["model=tiny_random", f"input.uri={tmp_path / 'warm'}", f"output.uri={tmp_path / 'out'}"])
    try:
        init_ray(cfg)
        discover(warm)  # first use of Ray Data on the driver (imports, executor): not data
        before = _rss_mb()
        docs = discover(cfg)
        growth = _rss_mb() - before
    finally:
        ray.shutdown()
    rows = docs.to_pylist()  # one Arrow table (schema.DISCOVERED_SCHEMA), not a dict per document
    assert len(rows) == n and all(d["page_count"] == 1 and not d["error_code"] for d in rows)
    assert len({d["doc_id"] for d in rows}) == n
    assert growth < 30, f"driver grew {growth:.0f} MB for {n} documents of 60 KB"
