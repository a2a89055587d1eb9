"""Ledger at corpus scale (issue 16): resume start-up on a synthetic ledger of committed parts.

    python -m jobs.bench_ledger make    --root /tmp/ledger-1m --parts 1000000 --pages-per-part 20
    python -m jobs.bench_ledger measure --root /tmp/ledger-1m [--profile prof.txt] [--json-out x.json]

`make` lays a synthetic corpus (documents of 1-39 pages, 20 on average, one stream of pages cut
into parts of `--pages-per-part` rows) out as the writer leaves it on disk:
- `pages/part-….parquet` and `_ledger/part-….parquet` for every part: real Parquet files, the ledger
  part in LEDGER_SCHEMA with the real rows (doc_id = 64 hex digits like a sha256 content id,
  page_index, config_hash, status, file); the pages part holds the page schema's key columns
  (doc_id, page_index, config_hash, status), which is all the resume path ever reads of it (its
  listing entry, its footer, those columns for an orphan). Part names are `part-<20 hex>.parquet`
  like the writer's, hashed from the part number rather than from the rows (nothing reads that).
  To make a million of each in minutes, each file is one Parquet template (uncompressed, plain
  encoding, no statistics) with the row values patched in place: fixed-width values (64-char ids,
  int32 pages) keep every offset, so each file is valid Parquet that pyarrow reads back (checked).
- a ledger snapshot in the real format (`ledger._snapshot_parts` + `ledger.write_snapshot_table`,
  the functions `Ledger.write_snapshot` uses), covering all but the last `--newer` parts, with the
  part versions from the real listing (`ledger._scan`);
- then the last `--newer` parts (written after the snapshot, so the load reads them one by one),
  `--orphans` of them as pages parts without a ledger part (a crash between the two commits), and a
  few stale `.tmp-*` temporaries.

- a stat cache (`_cache/stat/`, pipeline.statcache) with one entry per document, written by the
  real writer (`StatCache.add`) from the bench's listing (`bench_listing`: uri
  `s3://corpus/pdfs/{i:08d}.pdf`, a size and an ETag-like stamp per document), doc_id and page
  count as in the ledger, so a resume finds every known document done. `--stat-cache-only` writes
  just that, into a root made before it had this step.

`measure` (a fresh process) times `Ledger.load` and `plan_pages` exactly as `pipeline.run` calls
them, and reports the driver's peak RSS (getrusage), how many parts came from the snapshot and how
many were read one by one. JSON on stdout. The discovery output the planner gets is either
- (default) built directly: the corpus plus `--new-docs` new documents as one
  schema.DISCOVERED_SCHEMA Arrow table, or
- `--stat-cache`: made by the real driver-side discovery, after `Ledger.load` as in `pipeline.run`:
  `discover.discover_listed` over the listing of the corpus plus `--new-docs` new documents
  (`s3://corpus/new/…`), i.e. `StatCache.load` of the cache under the root, the Arrow split
  (`statcache.split_listing`), and the new documents' entries added to the cache (the first
  measure after `make` writes that part, `--read-only` or not; later ones find them cached). Not
  run here: the Ray parts of `discover`. The listing, which a real run gets from a Ray task
  (`sources.listing_table`, Arrow buffers), is built in this process as that table
  (`bench_listing`, vectorised; its time is `listing_build_s`, outside `startup_s`, its memory
  counts); the probe of the new documents (a Ray Data pool) is a stand-in that returns the rows the
  pool would (doc_id, 20 pages). Peak RSS is reported after each phase.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import struct
import sys
import time
from multiprocessing import Pool
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CONFIG_HASH = "bench0123456789a"  # 16 hex characters, like config_hash()
ID_LEN = 64
NAME_HEX = 20


def doc_id(i: int) -> str:
    return hashlib.sha256(f"bench-doc-{i}".encode()).hexdigest()


def part_file(k: int) -> str:
    return f"pages/part-{hashlib.sha256(f'bench-part-{k}'.encode()).hexdigest()[:NAME_HEX]}.parquet"


def page_counts(total_pages: int, seed: int = 16) -> np.ndarray:
    """Pages per document, 1..39 (mean 20), summing to exactly `total_pages`."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 40, size=total_pages // 20 + 1000)
    while int(n.sum()) < total_pages:
        n = np.concatenate([n, rng.integers(1, 40, size=1000)])
    c = np.cumsum(n)
    last = int(np.searchsorted(c, total_pages))
    n = n[: last + 1].copy()
    n[-1] -= int(c[last]) - total_pages
    return n[n > 0]


# ----------------------------------------------------------------------------- templates


def _doc_sentinel(r: int) -> str:
    return f"{r:04d}" + "~" * (ID_LEN - 4)


def _page_sentinel(r: int) -> int:
    return 0x5A5A0000 + r


FILE_SENTINEL = "pages/part-" + "^" * NAME_HEX + ".parquet"


def _template(schema: pa.Schema, rows: int, with_file: bool) -> tuple[bytes, list[int], list[int], list[int]]:
    """Parquet bytes of a `rows`-row table in `schema` with sentinel values, and the byte offsets
    of each row's doc_id and page_index value and of every `file` value."""
    cols: dict[str, Any] = {
        "doc_id": pa.array([_doc_sentinel(r) for r in range(rows)], pa.string()),
        "page_index": pa.array([_page_sentinel(r) for r in range(rows)], pa.int32()),
        "config_hash": pa.array([CONFIG_HASH] * rows, pa.string()),
        "status": pa.array(["ok"] * rows, pa.string()),
    }
    if with_file:
        cols["file"] = pa.array([FILE_SENTINEL] * rows, pa.string())
    table = pa.table({f.name: cols[f.name] for f in schema}, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none", use_dictionary=False, write_statistics=False)
    blob = sink.getvalue().to_pybytes()

    def once(b: bytes) -> int:
        i = blob.find(b)
        assert i >= 0 and blob.find(b, i + 1) < 0, b
        return i

    docs = [once(_doc_sentinel(r).encode()) for r in range(rows)]
    pages = [once(struct.pack("<i", _page_sentinel(r))) for r in range(rows)]
    files: list[int] = []
    if with_file:
        i = blob.find(FILE_SENTINEL.encode())
        while i >= 0:
            files.append(i)
            i = blob.find(FILE_SENTINEL.encode(), i + 1)
        assert len(files) == rows, len(files)
    return blob, docs, pages, files


def _pages_schema() -> pa.Schema:
    from pipeline.schema import PAGE_SCHEMA

    return pa.schema([PAGE_SCHEMA.field(n) for n in ("doc_id", "page_index", "config_hash", "status")])


_T: dict[str, Any] = {}


def _init(rows: int, starts: np.ndarray) -> None:
    from pipeline.ledger import LEDGER_SCHEMA

    _T["ledger"] = _template(LEDGER_SCHEMA, rows, True)
    _T["pages"] = _template(_pages_schema(), rows, False)
    _T["rows"] = rows
    _T["starts"] = starts  # first global page of each document


def _part_rows(k: int) -> tuple[list[str], list[int]]:
    rows, starts = _T["rows"], _T["starts"]
    g = np.arange(k * rows, (k + 1) * rows)
    d = np.searchsorted(starts, g, side="right") - 1
    return [doc_id(int(i)) for i in d], [int(x) for x in (g - starts[d])]


def _fill(kind: str, ids: list[str], pages: list[int], file: str) -> bytes:
    blob, doff, poff, foff = _T[kind]
    buf = bytearray(blob)
    for o, v in zip(doff, ids):
        buf[o : o + ID_LEN] = v.encode()
    for o, p in zip(poff, pages):
        buf[o : o + 4] = struct.pack("<i", p)
    for o in foff:
        buf[o : o + len(file)] = file.encode()
    return bytes(buf)


def _write_parts(job: tuple[str, int, int, int]) -> int:
    """Parts [a, b) under `root`; the last `orphans` of them without their ledger part."""
    root, a, b, orphans = job
    for k in range(a, b):
        ids, pages = _part_rows(k)
        file = part_file(k)
        name = file.rsplit("/", 1)[-1]
        with open(f"{root}/pages/{name}", "wb") as f:
            f.write(_fill("pages", ids, pages, file))
        if k < b - orphans:
            with open(f"{root}/_ledger/{name}", "wb") as f:
                f.write(_fill("ledger", ids, pages, file))
    return b - a


def _runs_of(parts: int, rows: int, starts: np.ndarray, counts: np.ndarray) -> pa.Table:
    """All-configuration runs (ledger.runs_from_rows's output) of parts [0, parts), vectorised:
    one run per (document, part) overlap."""
    total = parts * rows
    doc_starts = starts[starts < total]
    cuts = np.union1d(doc_starts, np.arange(0, total, rows))
    ends = np.append(cuts[1:], total)
    d = np.searchsorted(starts, cuts, side="right") - 1
    k = cuts // rows
    ids = [doc_id(int(i)) for i in d]
    names = [part_file(int(x)) for x in range(parts)]
    return pa.table(
        {
            "doc_id": pa.array(ids, pa.string()),
            "page_index": pa.array(cuts - starts[d], pa.int32()),
            "page_stop": pa.array(ends - starts[d], pa.int32()),
            "status": pa.array(["ok"] * len(ids), pa.string()),
            "file": pa.array(names, pa.string()).take(pa.array(k)),
            "config_hash": pa.array([CONFIG_HASH] * len(ids), pa.string()),
        }
    )


OLD_PREFIX = "s3://corpus/pdfs/"
NEW_PREFIX = "s3://corpus/new/"
NEW_ID_BASE = 10**9  # doc_id(NEW_ID_BASE + i): the i-th new document


def _numbered(prefix: str, idx: np.ndarray) -> pa.Array:
    """`f"{prefix}{i:08d}.pdf"` for each i, in Arrow (no Python string per document)."""
    from pipeline.arrow import pc

    digits = pc.utf8_lpad(pa.array(idx, pa.int64()).cast(pa.string()), 8, "0")
    return pc.binary_join_element_wise(prefix, digits, ".pdf", "")


def bench_listing(n_old: int, new_docs: int) -> pa.Table:
    """The input listing as `sources.listing_table` returns it (LISTING_SCHEMA, sorted by
    source_uri): the `n_old` known documents `s3://corpus/pdfs/{i:08d}.pdf` and `new_docs` new ones
    `s3://corpus/new/{i:08d}.pdf`, each with a size and a 37-character ETag stamp (like S3's
    `etag:<32 hex>`) derived from its number; built vectorised."""
    from pipeline.arrow import pc
    from pipeline.sources import LISTING_SCHEMA

    new_i = np.arange(new_docs, dtype=np.int64) + NEW_ID_BASE
    old_i = np.arange(n_old, dtype=np.int64)
    key = np.concatenate([new_i, old_i])  # "…/new/" sorts before "…/pdfs/"
    uris = pa.chunked_array([_numbered(NEW_PREFIX, new_i - NEW_ID_BASE), _numbered(OLD_PREFIX, old_i)])
    size = 10_000 + (key * 7919) % 5_000_000
    tag = pc.utf8_lpad(pa.array((key * 2654435761) % 10**16, pa.int64()).cast(pa.string()), 32, "0")
    stamp = pc.binary_join_element_wise("etag:", tag, "")
    return pa.Table.from_arrays(
        [uris.combine_chunks(), pa.array(size, pa.int64()), stamp], schema=LISTING_SCHEMA
    )


def write_stat_cache(root: str, counts: np.ndarray) -> dict[str, Any]:
    """One stat-cache entry per known document (listing of `bench_listing`, doc_id and page count
    as in the ledger), written by the real writer (`StatCache.add`) into an empty cache."""
    from pipeline.outputs import OutputStore
    from pipeline.statcache import CACHE_DIR, StatCache

    t0 = time.perf_counter()
    listing = bench_listing(len(counts), 0)
    n = listing.num_rows
    rows = listing.append_column("doc_id", pa.array([doc_id(i) for i in range(n)], pa.string()))
    rows = rows.append_column("page_count", pa.array(counts, pa.int32()))
    rows = rows.append_column("error_code", pa.nulls(n, pa.string()).fill_null(""))
    rows = rows.append_column("error", pa.nulls(n, pa.string()).fill_null(""))
    store = OutputStore(root)
    cache = StatCache.load(store)
    if cache.parts:
        raise SystemExit(f"{root}/{CACHE_DIR} already has {len(cache.parts)} part(s)")
    added = cache.add(rows, live=listing)
    (part,) = cache.parts
    return {
        "stat_cache_entries": added,
        "stat_cache_part": part.rsplit("/", 1)[-1],
        "stat_cache_bytes": os.path.getsize(part),
        "generate_stat_cache_s": round(time.perf_counter() - t0, 1),
    }


def make(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline import ledger as L
    from pipeline.outputs import OutputStore

    root, rows, parts = args.root, args.pages_per_part, args.parts
    if getattr(args, "stat_cache_only", False):  # a root made before `make` wrote the cache
        return {"stat_cache_only": True, **write_stat_cache(root, np.load(f"{root}/_bench_counts.npy"))}
    counts = page_counts(parts * rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    os.makedirs(f"{root}/pages", exist_ok=True)
    os.makedirs(f"{root}/_ledger", exist_ok=True)
    np.save(f"{root}/_bench_counts.npy", counts)
    t0 = time.perf_counter()
    old = parts - args.newer
    chunk = 5000
    jobs = [(root, a, min(a + chunk, old), 0) for a in range(0, old, chunk)]
    with Pool(args.workers, initializer=_init, initargs=(rows, starts)) as pool:
        written = sum(pool.imap_unordered(_write_parts, jobs))
    t_parts = time.perf_counter() - t0
    store = OutputStore(root)
    t1 = time.perf_counter()
    runs = _runs_of(old, rows, starts, counts)
    listing = L._scan(store, L.PAGES_DIR)[0].join(  # pyright: ignore[reportPrivateUsage]
        L._scan(store, L.LEDGER_DIR)[0].rename_columns(["name", "lv"]),  # pyright: ignore[reportPrivateUsage]
        "name",
    )
    versions = pa.table(
        {
            "file": pa.array([f"pages/{n}" for n in listing.column("name").to_pylist()], pa.string()),
            "pages_version": listing.column("version"),
            "ledger_version": listing.column("lv"),
        }
    )
    snap = L.write_snapshot_table(store, L._snapshot_parts(runs, versions))  # pyright: ignore[reportPrivateUsage]
    t_snap = time.perf_counter() - t1
    time.sleep(0.05)
    _init(rows, starts)
    _write_parts((root, old, parts, args.orphans))
    for sub in ("pages", "_ledger"):
        for i in range(3):
            with open(f"{root}/{sub}/.tmp-{i:08x}-part-crashed.parquet", "wb") as f:
                f.write(b"PAR1 half")
    # the generated files are read back as real Parquet: the first and last part
    for k in (0, parts - 1 - args.orphans):
        name = part_file(k).rsplit("/", 1)[-1]
        want = _part_rows(k)
        for sub in ("pages", "_ledger"):
            t = pq.read_table(f"{root}/{sub}/{name}")
            assert t.column("doc_id").to_pylist() == want[0] and t.column("page_index").to_pylist() == want[1]
            if sub == "_ledger":
                assert t.schema.equals(L.LEDGER_SCHEMA) and set(t.column("file").to_pylist()) == {
                    part_file(k)
                }
    du = sum(e.stat().st_size for sub in ("pages", "_ledger") for e in os.scandir(f"{root}/{sub}"))
    cache = write_stat_cache(root, counts)
    return {
        "parts": parts,
        "pages": parts * rows,
        "documents": len(counts),
        "pages_per_part": rows,
        "parts_in_snapshot": old,
        "parts_after_snapshot": args.newer,
        "orphans": args.orphans,
        "snapshot": snap,
        "snapshot_bytes": os.path.getsize(f"{root}/{snap}"),
        "part_bytes_total": du,
        "generate_parts_s": round(t_parts, 1),
        "generate_snapshot_s": round(t_snap, 1),
        "written": written + args.newer,
        "workers": args.workers,
        **cache,
    }


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _bench_docs(counts: np.ndarray, new_docs: int) -> pa.Table:
    """What `discover` hands the planner, built directly: one DISCOVERED_SCHEMA table."""
    from pipeline.schema import DISCOVERED_SCHEMA

    n_old = len(counts)
    return pa.table(
        {
            "source_uri": pa.array(
                [f"{OLD_PREFIX}{i:08d}.pdf" for i in range(n_old)]
                + [f"{NEW_PREFIX}{i:08d}.pdf" for i in range(new_docs)],
                pa.string(),
            ),
            "doc_id": pa.array(
                [doc_id(i) for i in range(n_old)] + [doc_id(NEW_ID_BASE + i) for i in range(new_docs)],
                pa.string(),
            ),
            "page_count": pa.array(np.concatenate([counts, np.full(new_docs, 20)]), pa.int32()),
            "error_code": pa.array([""] * (n_old + new_docs), pa.string()),
            "error": pa.nulls(n_old + new_docs, pa.string()),
            "password": pa.array([""] * (n_old + new_docs), pa.string()),
        },
        schema=DISCOVERED_SCHEMA,
    )


def _stand_in_probe(counts: np.ndarray) -> Any:
    """What the Ray Data probe pool returns for `uris` (DISCOVERED_SCHEMA rows), for the bench's
    documents: doc_id and page count of the numbered document (20 pages for a new one)."""
    from pipeline.schema import discovered_table

    def probe(uris: pa.Array) -> pa.Table:
        rows = []
        for u in uris.to_pylist():
            i = int(u.rsplit("/", 1)[-1].removesuffix(".pdf"))
            new = u.startswith(NEW_PREFIX)
            rows.append(
                {
                    "source_uri": u,
                    "doc_id": doc_id(NEW_ID_BASE + i if new else i),
                    "page_count": 20 if new else int(counts[i]),
                    "error_code": "",
                    "error": "",
                    "password": "",
                }
            )
        return discovered_table(rows)

    return probe


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import PipelineConfig
    from pipeline.ledger import Ledger
    from pipeline.outputs import OutputStore
    from pipeline.plan import plan_pages

    rss_start = _current_rss_mb()
    load_start = os.getloadavg()[0]
    counts = np.load(f"{args.root}/_bench_counts.npy")
    cfg = PipelineConfig()
    store = OutputStore(args.root)
    out: dict[str, Any] = {}
    if not args.stat_cache:
        docs = _bench_docs(counts, args.new_docs)
    rss_docs = _current_rss_mb()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    # read_only: the same reads; nothing on disk changes, so the measurement can be repeated
    led = Ledger.load(store, CONFIG_HASH, temporaries_before=time.time(), read_only=args.read_only)
    t1, c1 = time.perf_counter(), time.process_time()
    rss_load, peak_load = _current_rss_mb(), _rss_mb()
    disc_s = disc_cpu_s = 0.0
    if args.stat_cache:
        from pipeline.arrow import pc
        from pipeline.discover import discover_listed

        # the listing as discover's Ray task hands it over (built here: outside startup_s)
        tl = time.perf_counter()
        listing = bench_listing(len(counts), args.new_docs)
        listing_s = time.perf_counter() - tl
        rss_listing, peak_listing = _current_rss_mb(), _rss_mb()
        probe = _stand_in_probe(counts)
        probed: list[int] = []

        def counted(uris: pa.Array) -> pa.Table:
            probed.append(len(uris))
            return probe(uris)

        td0, cd0 = time.perf_counter(), time.process_time()
        docs = discover_listed(cfg, listing, store, counted)
        del listing  # discover's own listing ends with it
        td1, cd1 = time.perf_counter(), time.process_time()
        disc_s, disc_cpu_s = td1 - td0, cd1 - cd0
        out = {
            "listing_build_s": round(listing_s, 2),
            "rss_after_listing_mb": round(rss_listing, 1),
            "peak_rss_after_listing_mb": round(peak_listing, 1),
            "rss_after_discovery_mb": round(_current_rss_mb(), 1),
            "peak_rss_after_discovery_mb": round(_rss_mb(), 1),
            "documents_probed": sum(probed),
            "documents_from_stat_cache": docs.num_rows - sum(probed),
            "documents_with_errors": int(pc.sum(pc.not_equal(docs.column("error_code"), "")).as_py() or 0),
        }
    else:
        td1, cd1 = t1, c1
    plan = plan_pages(cfg, docs, led, led.failures)
    t2, c2 = time.perf_counter(), time.process_time()
    if prof is not None:
        import io
        import pstats

        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
        with open(args.profile, "w") as f:
            f.write(s.getvalue())
    # what the ledger found: parts from the snapshot vs read one by one
    load_s, plan_s = t1 - t0, t2 - td1
    load_cpu_s, plan_cpu_s = c1 - c0, c2 - cd1
    return {
        "stat_cache": args.stat_cache,
        "load_s": round(load_s, 2),
        **({"discovery_s": round(disc_s, 2)} if args.stat_cache else {}),
        "plan_s": round(plan_s, 2),
        "startup_s": round(load_s + disc_s + plan_s, 2),
        # CPU seconds of this process (all threads): on a shared machine the wall time above also
        # holds the time other sessions' processes had the 2 cores
        "load_cpu_s": round(load_cpu_s, 2),
        **({"discovery_cpu_s": round(disc_cpu_s, 2)} if args.stat_cache else {}),
        "plan_cpu_s": round(plan_cpu_s, 2),
        "startup_cpu_s": round(load_cpu_s + disc_cpu_s + plan_cpu_s, 2),
        "peak_rss_mb": round(_rss_mb(), 1),
        "rss_at_start_mb": round(rss_start, 1),
        **({} if args.stat_cache else {"rss_after_discovery_output_mb": round(rss_docs, 1)}),
        "rss_before_load_mb": round(rss_docs, 1),
        "rss_after_load_mb": round(rss_load, 1),
        "peak_rss_after_load_mb": round(peak_load, 1),
        **out,
        "documents_in": docs.num_rows,
        "ledger_runs": led.runs.num_rows,
        "ledger_rows": led.rows,
        "parts_from_snapshot": led.from_snapshot,
        "orphans_reconciled": led.reconciled,
        "stale_dropped": led.dropped,
        "expected_rows": plan.expected_rows,
        "rows_already_final": plan.already_final,
        "tasks": len(plan.tasks),
        "read_only": args.read_only,
        "profiled": bool(args.profile),
        "cpus": os.cpu_count(),
        "loadavg_1m_at_start": load_start,
        "loadavg_1m_at_end": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["make", "measure"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--parts", type=int, default=1_000_000)
    ap.add_argument("--pages-per-part", type=int, default=20)
    ap.add_argument("--newer", type=int, default=2000, help="parts written after the snapshot")
    ap.add_argument("--orphans", type=int, default=8, help="of those, pages parts without a ledger part")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--new-docs", type=int, default=1000, help="documents of the input not in the ledger")
    ap.add_argument("--read-only", action="store_true", help="Ledger.load(read_only=True): repeatable")
    ap.add_argument(
        "--stat-cache",
        action="store_true",
        help="measure: the discovery output from the real driver-side discovery (stat cache, Arrow split)",
    )
    ap.add_argument(
        "--stat-cache-only", action="store_true", help="make: only write the stat cache into an existing root"
    )
    ap.add_argument("--profile", default="", help="write a cProfile listing (cumulative) here")
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()
    out = make(args) if args.what == "make" else measure(args)
    out = {"bench": f"ledger_{args.what}", "root": args.root, **out}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
