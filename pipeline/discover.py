"""Discovery on Ray: list the input (one Ray task) and read, hash and probe every document (a Ray
Data actor pool; MuPDF in a killable child). Only small per-document rows come back to the
driver: `(source_uri, doc_id, page_count, error_code, error, password)`, never document bytes.
Inputs unchanged since a previous run (same uri, size and etag or mtime: pipeline.statcache) are
neither read nor hashed again. On the driver the listing, the stat cache and the result are Arrow
tables (the hits by a join, `statcache.split_listing`): no Python object per listed document.
`discover_listed` is that driver side without Ray (jobs/bench_ledger.py measures it at 1 M).
A few new documents (`DRIVER_PROBE_MAX`) are read and probed in the driver itself, a few at a
time: an actor pool's start costs more than they do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.schema import DISCOVERED_SCHEMA, discovered_table

log = logging.getLogger("pagemill")


def discover(cfg: PipelineConfig, store: Any = None, mark: Callable[[str], None] | None = None) -> pa.Table:
    """List the input (a Ray task) and probe every document (Ray Data); small rows come back, as
    one DISCOVERED_SCHEMA table sorted by source_uri.

    With `store` (the output root), inputs whose (uri, size, etag or mtime) is in its stat cache
    (pipeline.statcache) are taken from there, not read, unless `input.rehash`; the others are
    probed and added to it. The listing reaches the driver as one Arrow table
    (sources.LISTING_SCHEMA) and the hits are found by an Arrow join (`discover_listed`).
    `mark(name)` is called once the input is listed (`listed`) and once the new documents are
    probed (`probed`): the run's start-up timeline."""
    import ray
    from ray.exceptions import RayTaskError

    from pipeline.sources import InputError, listing_table

    lister = ray.remote(num_cpus=0.5)(listing_table)
    try:
        listing: pa.Table = ray.get(
            lister.remote(
                cfg.input.uri,
                cfg.input.storage_options,  # pyright: ignore[reportCallIssue]  # ray's .remote() typing: 1-arg fn
                suffixes=list(cfg.input.suffixes),
            )
        )
    except RayTaskError as e:  # bad input spec: surface the InputError itself
        if isinstance(e.cause, InputError):
            raise e.cause from None
        raise
    if mark is not None:
        mark("listed")
    if not listing.num_rows:
        return DISCOVERED_SCHEMA.empty_table()
    if store is not None:  # the stat cache keys on (size, stamp): list-file entries get a HEAD
        listing = _stat_unstated(cfg, listing)

    def probe(uris: pa.Array) -> pa.Table:
        out = _probe(cfg, uris)
        if mark is not None:
            mark("probed")
        return out

    return discover_listed(cfg, listing, store, probe)


def discover_listed(
    cfg: PipelineConfig,
    listing: pa.Table,
    store: Any,
    probe: Callable[[pa.Array], pa.Table],
) -> pa.Table:
    """The driver's side of discovery once the input is listed (no Ray here: `probe` reads and
    probes the uris it is given, one DISCOVERED_SCHEMA row each): the stat cache's hits by an
    Arrow join (statcache.split_listing), `probe` for the rest, which then go into the cache.
    `listing`: sources.LISTING_SCHEMA sorted by source_uri; the result has its order."""
    from pipeline.sources import read_passwords
    from pipeline.statcache import StatCache, split_listing

    cache = StatCache.load(store) if store is not None else None
    passwords = {**read_passwords(cfg.input.passwords_file, cfg.input.storage_options), **cfg.input.passwords}
    cached, todo = split_listing(
        listing, cache.table if cache is not None else None, cfg.input.rehash, passwords
    )
    n_cached = cached.num_rows
    # the join's hash table is gone: hand its memory back (mimalloc keeps freed pages otherwise,
    # and the driver holds the ledger meanwhile)
    pa.default_memory_pool().release_unused()
    probed = discovered_table(probe(todo)) if len(todo) else DISCOVERED_SCHEMA.empty_table()
    del todo
    # the probed rows with their listing row (order) and (size, stamp); the join builds its hash
    # table on `probed`, small on a rerun
    row = pa.array(np.arange(listing.num_rows, dtype=np.int64))
    probed = listing.append_column("_row", row).join(probed, keys="source_uri", join_type="inner")
    del row
    if cache is not None:
        new = cache.add(probed, live=listing)
        log.info(
            "discovery: %d of %d document(s) from the stat cache, %d read and hashed (%d cached now)",
            n_cached,
            listing.num_rows,
            probed.num_rows,
            new,
        )
        del cache
        pa.default_memory_pool().release_unused()
    if not probed.num_rows:
        return cached
    # merge in listing order: the hits' rows are those not probed, in order
    hit = np.ones(listing.num_rows, dtype=bool)
    rows = probed.column("_row").to_numpy()
    hit[rows] = False
    where = np.concatenate([np.flatnonzero(hit), rows])  # the listing row of each output row
    out = pa.concat_tables([cached, discovered_table(probed)])
    del cached, probed
    out = out.take(pa.array(np.argsort(where, kind="stable"))).combine_chunks()
    pa.default_memory_pool().release_unused()
    return out


def _stat_unstated(cfg: PipelineConfig, listing: pa.Table) -> pa.Table:
    """(size, stamp) for the listing's rows without them (list-file entries): one HEAD each, in
    Ray workers, 1000 per task."""
    import ray

    from pipeline.arrow import pc
    from pipeline.sources import stat_table

    missing = pc.is_null(listing.column("stamp"))
    unstated = listing.column("source_uri").filter(missing).combine_chunks()
    if not len(unstated):
        return listing
    stat = ray.remote(num_cpus=0.5)(stat_table)
    refs = [
        stat.remote(unstated.slice(a, 1000).to_pylist(), cfg.input.storage_options)  # pyright: ignore[reportCallIssue]  # ray's .remote() typing
        for a in range(0, len(unstated), 1000)
    ]
    del unstated
    return with_stats(listing, pa.concat_tables(ray.get(refs)))


def with_stats(listing: pa.Table, stated: pa.Table) -> pa.Table:
    """`listing` with its rows without a stamp given the size and stamp of `stated`
    (sources.stat_table's output for those rows' uris, in listing order)."""
    from pipeline.arrow import pc

    missing = pc.is_null(listing.column("stamp").combine_chunks())
    cols = {"source_uri": listing.column("source_uri")}
    for k in ("size", "stamp"):
        have = listing.column(k).combine_chunks()
        cols[k] = pc.replace_with_mask(have, missing, stated.column(k).combine_chunks().cast(have.type))
    return pa.table(cols, schema=listing.schema)


def _probe(cfg: PipelineConfig, uris: pa.Array) -> pa.Table:
    """Read, hash and probe `uris` on a Ray Data actor pool; one small row each, as Arrow (the
    blocks come back as tables, not a dict per row). A few documents (<= DRIVER_PROBE_MAX) are
    probed here in the driver instead (`_probe_here`)."""
    import ray

    if len(uris) <= DRIVER_PROBE_MAX:
        return _probe_here(cfg, uris)

    blocks = min(len(uris), 256)
    step = -(-len(uris) // blocks)
    ds = ray.data.from_arrow(
        [pa.table({"source_uri": uris.slice(a, step)}) for a in range(0, len(uris), step)]
    )
    calls = -(-len(uris) // PROBE_BATCH)
    out = ds.map_batches(
        ProbeDocuments,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=PROBE_BATCH,
        batch_format="pyarrow",
        # a few actors from the start (the autoscaler adds more only as calls queue up)
        compute=ray.data.ActorPoolStrategy(min_size=min(calls, PROBE_PRESTART), max_size=64),
        num_cpus=0.5,
    )
    tables = [discovered_table(t) for t in ray.get(out.to_arrow_refs())]  # pyright: ignore[reportArgumentType, reportCallIssue]  # ray.get typing
    return pa.concat_tables(tables) if tables else DISCOVERED_SCHEMA.empty_table()


PROBE_BATCH = 32  # documents per probe call
PROBE_PRESTART = 3  # probe actors started at once (beside the starting render pool: 1.5 CPUs)
# up to this many new documents are probed in the driver, by DRIVER_PROBE_THREADS threads with a
# MuPDF child each: a probe actor pool's start (Ray Data executor, actors booting beside the
# render pool and the OCR actor) cost 13 s for 145 files on the H200 machine (BENCHMARKS.md,
# 2026-12-04), more than probing them takes; a nightly rerun's few new documents go this way too
DRIVER_PROBE_MAX = 256
DRIVER_PROBE_THREADS = 4


def _probe_here(cfg: PipelineConfig, uris: pa.Array) -> pa.Table:
    """`ProbeDocuments` in this process: threads (reads and MuPDF calls release the GIL), each
    with its own killable MuPDF child, over contiguous slices of `uris` (order kept)."""
    from concurrent.futures import ThreadPoolExecutor

    n = max(1, min(DRIVER_PROBE_THREADS, len(uris)))
    step = -(-len(uris) // n)
    slices = [uris.slice(a, step) for a in range(0, len(uris), step)]

    def probe_slice(part: pa.Array) -> pa.Table:
        probe = ProbeDocuments(cfg)
        try:
            return probe(pa.table({"source_uri": part}))
        finally:
            probe.close()

    with ThreadPoolExecutor(len(slices), thread_name_prefix="pagemill-probe") as pool:
        tables = [discovered_table(t) for t in pool.map(probe_slice, slices)]
    return pa.concat_tables(tables) if tables else DISCOVERED_SCHEMA.empty_table()


class ProbeDocuments:
    """Read + hash + open each document; emit one metadata row per document (no bytes kept)."""

    def __init__(self, cfg: PipelineConfig):
        from pipeline.render_proc import RenderWorker
        from pipeline.sources import read_passwords

        self.cfg = cfg
        self.passwords = {
            **read_passwords(cfg.input.passwords_file, cfg.input.storage_options),
            **cfg.input.passwords,
        }
        # MuPDF runs in a killable child here too: a file that hangs the parser costs one
        # doc_error row (probe_error), not the discovery of the whole collection
        self.worker = RenderWorker(recycle_after=cfg.render.recycle_after * 20)
        self.worker.warm()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.render import DocError
        from pipeline.sources import content_id, read_document

        out = []
        for uri in batch.column("source_uri").to_pylist():
            row: dict[str, Any] = {
                "source_uri": uri,
                "doc_id": "",
                "page_count": 0,
                "error_code": "",
                "error": "",
                "password": "",
            }
            try:
                data = read_document(uri, self.cfg.input.storage_options)
            except Exception as e:  # missing / unreadable object: a doc_error row, not a crash
                row.update(doc_id=_uri_id(uri), error_code="read_error", error=f"{type(e).__name__}: {e}")
                out.append(row)
                continue
            row["doc_id"] = content_id(data)
            password = self._password(uri, row["doc_id"])
            info = self.worker.probe(data, password, extract_text=False, timeout_s=self.cfg.render.timeout_s)
            del data
            if isinstance(info, DocError):
                row.update(error_code=info.code, error=info.message)
            else:
                row.update(page_count=info.page_count, password=password or "")
            out.append(row)
        return pa.Table.from_pylist(out)

    def close(self) -> None:
        """Stop the MuPDF child (the driver's probe; an actor's ends with its process)."""
        self.worker.close()

    def _password(self, uri: str, doc_id: str) -> str | None:
        pw = self.passwords
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        return pw.get(doc_id) or pw.get(name)


def _uri_id(uri: str) -> str:
    import hashlib

    return "uri:" + hashlib.sha256(uri.encode()).hexdigest()
