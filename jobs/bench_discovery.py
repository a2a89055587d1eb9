"""Discovery at scale: list, read, hash and probe N small PDFs (generated in a temp dir) with the
pipeline's own discovery stage on embedded Ray; reports the time and the driver's memory growth.

    python -m jobs.bench_discovery --files 100000

The files are copies of one small one-page PDF, each with a unique comment appended after
`%%EOF` (so each has its own sha256 and is still a valid PDF). Reading, hashing and probing run in
Ray Data actors; the driver only receives (uri, doc_id, page_count, error) rows. Prints a table
and a final JSON line.

    python -m jobs.bench_discovery --compare-probe --corpus .devcorpus --min-pages 2000

times the probe of a few documents (byte-distinct copies of a corpus, as `jobs.bench_pipeline`
makes them) both ways, in the driver (`pipeline.discover.DRIVER_PROBE_MAX`) and on the probe actor
pool, alternately, `--rounds` times each, on one embedded Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def make_files(root: Path, n: int) -> int:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page(width=200, height=200).insert_text((20, 100), "pagemill discovery benchmark")
    base = doc.tobytes()
    total = 0
    for i in range(n):
        sub = root / f"{i // 1000:04d}"
        sub.mkdir(exist_ok=True)
        data = base + f"\n% file {i}\n".encode()
        (sub / f"doc-{i:07d}.pdf").write_bytes(data)
        total += len(data)
    return total


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def compare_probe(corpus: Path, min_pages: int, rounds: int, argv: list[str] | None) -> int:
    """Seconds from listed to probed, in the driver and on the actor pool, alternately."""
    import ray

    import pipeline.discover as discovery
    from jobs.bench_pipeline import make_copies
    from pipeline.run import compose, init_ray

    driver_max = discovery.DRIVER_PROBE_MAX
    runs: dict[str, list[float]] = {"driver": [], "pool": []}
    pages: set[int] = set()
    with tempfile.TemporaryDirectory() as tmp:
        root, _ = make_copies(corpus, Path(tmp) / "in", min_pages)
        files = len(list(root.glob("*.pdf")))
        if files > driver_max:
            raise SystemExit(f"{files} documents: more than DRIVER_PROBE_MAX={driver_max}")
        cfg = compose(["model=tiny_random", f"input.uri={root}", f"output.uri={tmp}/out"])
        init_ray(cfg)
        try:
            for _ in range(rounds):
                for way in ("pool", "driver"):
                    discovery.DRIVER_PROBE_MAX = driver_max if way == "driver" else 0
                    at: dict[str, float] = {}

                    def mark(k: str, at: dict[str, float] = at) -> None:
                        at.setdefault(k, time.perf_counter())

                    docs = discovery.discover(cfg, mark=mark)
                    runs[way].append(round(at["probed"] - at["listed"], 2))
                    pages.add(sum(docs.column("page_count").to_pylist()))
        finally:
            discovery.DRIVER_PROBE_MAX = driver_max
            ray.shutdown()
    report = {
        "documents": files,
        "pages": sorted(pages),  # one value: both ways found the same pages
        "probe_s_driver": runs["driver"],
        "probe_s_pool": runs["pool"],
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m jobs.bench_discovery " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps(report))
    return 0 if len(pages) == 1 else 1


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None  # module docstring is present
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_discovery", description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", default="", help="where to generate the files (default: a temp dir)")
    ap.add_argument("--compare-probe", action="store_true", help="driver probe vs the actor pool")
    ap.add_argument("--corpus", default="", help="--compare-probe: copies of this corpus's PDFs")
    ap.add_argument("--min-pages", type=int, default=2000, help="--compare-probe: pages of the copies")
    ap.add_argument("--rounds", type=int, default=2, help="--compare-probe: runs of each way")
    args = ap.parse_args(argv)
    if args.compare_probe:
        return compare_probe(Path(args.corpus), args.min_pages, args.rounds, argv)

    from pipeline.discover import discover
    from pipeline.run import compose, init_ray

    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        root = Path(tmp) / "in"
        root.mkdir()
        t0 = time.perf_counter()
        nbytes = make_files(root, args.files)
        gen_s = time.perf_counter() - t0
        cfg = compose(["model=tiny_random", f"input.uri={root}", f"output.uri={tmp}/out"])
        init_ray(cfg)
        rss0 = rss_mb()
        t0 = time.perf_counter()
        docs = discover(cfg)
        wall = time.perf_counter() - t0
        rss1 = rss_mb()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = docs.to_pylist()  # the discovery output is one Arrow table (schema.DISCOVERED_SCHEMA)
    ok = sum(1 for d in rows if not d["error_code"] and d["page_count"] == 1)
    report = {
        "files": args.files,
        "bytes": nbytes,
        "generate_s": round(gen_s, 1),
        "discover_s": round(wall, 1),
        "docs_per_s": round(len(docs) / wall, 1),
        "docs_ok": ok,
        "distinct_doc_ids": len({d["doc_id"] for d in rows}),
        "driver_rss_growth_mb": round(rss1 - rss0, 1),
        "driver_peak_rss_mb": round(peak, 1),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m jobs.bench_discovery " + " ".join(argv or sys.argv[1:]),
    }
    for k, v in report.items():
        print(f"  {k:<22} {v}")
    print(json.dumps(report))
    return 0 if ok == args.files else 1


if __name__ == "__main__":
    sys.exit(main())
