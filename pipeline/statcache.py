# pyarrow ships no type stubs: its members, values and arguments are Unknown to pyright.
# pyright: reportUnknownMemberType=false, reportUnknownVariableType=false, reportUnknownArgumentType=false
"""The stat cache: what discovery learnt about an input version, so a rerun neither reads nor
hashes it again (a no-op night over a 10 TB corpus would otherwise download 10 TB).

Keyed by (source_uri, size, stamp), the stamp being the store's ETag (GCS generation) or the local
mtime and inode (`pipeline.sources.stat_stamp`), all taken from the listing discovery makes anyway:
a hit costs no request. It holds the probe's outcome (doc_id, page_count, deterministic error
codes). Not cached: read/probe errors (may be transient) and documents a password applies to (a
changed password changes the outcome), which are probed every run. A local file rewritten with the
same size, mtime and inode would be missed (mtime has sub-second resolution on today's
filesystems); `input.rehash=true` reads and hashes everything again.

It lives in `<output>/_cache/stat/` as Parquet parts, each written atomically (OutputStore) and
named by its content, so a run with nothing new writes nothing. A missing or unreadable part is
skipped with a warning: those inputs are just hashed again. Past `MAX_PARTS` parts the cache is
rewritten as one part.

On the driver the cache is one Arrow table (`StatCache.table`, SCHEMA, one row per key), and the
listing is one too (`pipeline.sources.LISTING_SCHEMA`): `split_listing` finds the hits on
(source_uri, size, stamp) with Arrow kernels (an `index_in` of the uris, a join for the few cached
in another version), so a nightly over a million inputs makes no Python object per document
(issue 16: bounded driver memory; measured by `jobs/bench_ledger.py measure --stat-cache`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.arrow import pc
from pipeline.schema import DISCOVERED_SCHEMA

log = logging.getLogger("pagemill")

CACHE_DIR = "_cache/stat"
MAX_PARTS = 64
# probe outcomes that depend only on the bytes (others: read_error, probe_error are retried)
CACHEABLE_ERRORS = ("", "empty_file", "not_a_pdf", "corrupt", "needs_password", "zero_pages")
SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("stamp", pa.string()),
        pa.field("doc_id", pa.string()),
        pa.field("page_count", pa.int32()),
        pa.field("error_code", pa.string()),
        pa.field("error", pa.string()),
    ]
)
KEY = ["source_uri", "size", "stamp"]
VALUES = ["doc_id", "page_count", "error_code", "error"]


class StatCache:
    """The cache's entries as one SCHEMA table (`table`: the parts' chunks; a key is in one part
    but after a crash between a rewrite and its removals) and its parts on disk."""

    def __init__(self, store: Any):
        self.store = store
        self.table: pa.Table = SCHEMA.empty_table()
        self.parts: list[str] = []

    @classmethod
    def load(cls, store: Any) -> StatCache:
        """Every readable part of the cache (a corrupt one is skipped: its inputs are rehashed)."""
        from concurrent.futures import ThreadPoolExecutor

        cache = cls(store)
        path = store.join(CACHE_DIR)
        store.fs.invalidate_cache(path)
        try:
            names = [p for p in store.fs.ls(path, detail=False) if str(p).endswith(".parquet")]
        except FileNotFoundError:
            return cache
        names = [p for p in names if not str(p).rsplit("/", 1)[-1].startswith(".")]

        def read(p: str) -> pa.Table | None:
            try:
                # parts are read in parallel here; Arrow's own pool threads would keep the
                # decoding's freed memory in their allocator heaps (the driver holds the ledger)
                return pq.read_table(p, filesystem=store.fs, schema=SCHEMA, use_threads=False)
            except Exception as e:
                log.warning("stat cache: skipping unreadable %s (%s: %s)", p, type(e).__name__, e)
                return None

        with ThreadPoolExecutor(max_workers=16) as pool:
            tables = [t for t in pool.map(read, names) if t is not None]
        cache.parts = list(names)
        # chunks, not copied; a key may be in two parts (a crash between a rewrite and the removal
        # of the old parts): split_listing and a rewrite take it once
        if tables:
            cache.table = pa.concat_tables(tables)
        return cache

    def add(self, rows: pa.Table, live: pa.Table) -> int:
        """Record new probe outcomes (a table with SCHEMA's columns, `password` optional); writes
        one part if any is new. Not kept: rows without a stamp, with an error that may be
        transient (not in CACHEABLE_ERRORS) or opened with a password.
        `live`: the keys this run listed (source_uri, size, stamp: the listing); a rewrite of the
        whole cache keeps only those."""
        new = _cacheable(rows)
        if new.num_rows and self.table.num_rows:
            # the new keys already in the cache (the join builds its hash table on `new`: small on
            # a rerun, whatever the cache's size)
            known = self.table.join(new, keys=KEY, join_type="inner", right_suffix="_new")
            same = known.filter(_all_equal(known, VALUES, "_new")).select(KEY)
            new = new.join(same, keys=KEY, join_type="left anti") if same.num_rows else new
            # an entry that a rehash contradicts (same stamp, other bytes): parts have no order,
            # so the whole cache is rewritten without the old entry
            conflict = known.num_rows > same.num_rows
            del known, same
        else:
            conflict = False
        n_new = new.num_rows
        if conflict or len(self.parts) + bool(n_new) > MAX_PARTS:  # consolidate: the live entries
            rest = (
                self.table.join(new.select(KEY), keys=KEY, join_type="left anti") if conflict else self.table
            )
            merged = (
                pa.concat_tables([rest.select(SCHEMA.names), new.select(SCHEMA.names)]) if n_new else rest
            )
            keep = merged.join(live.select(KEY), keys=KEY, join_type="left semi")
            del rest, merged
            self.table = _sorted(keep, unique=True)
            written = self._write(self.table)
            for p in self.parts:
                if p.rsplit("/", 1)[-1] != written:
                    self.store.fs.rm(p)
            self.parts = [self.store.join(CACHE_DIR, written)]
        elif n_new:
            new = _sorted(new)
            self.parts.append(self.store.join(CACHE_DIR, self._write(new)))
            self.table = pa.concat_tables([self.table, new]) if self.table.num_rows else new
        return n_new

    def _write(self, table: pa.Table) -> str:
        """One part, named by the sha256 of its keys (`uri\tsize\tstamp` lines): the same entries
        give the same name."""
        table = table.select(SCHEMA.names).cast(SCHEMA)
        name = f"part-{_keys_digest(table)[:20]}.parquet"
        self.store.write_parquet(CACHE_DIR, table, name=name)
        return name


def split_listing(
    listing: pa.Table,
    cache: pa.Table | None,
    rehash: bool = False,
    passwords: Mapping[str, str] | None = None,
) -> tuple[pa.Table, pa.Array]:
    """The listing (pipeline.sources.LISTING_SCHEMA: source_uri, size, stamp) split against the
    stat cache's table (SCHEMA; a key twice is taken once): the hits as a DISCOVERED_SCHEMA table
    (password "") in listing order, and the uris to read and probe, in listing order: new or
    changed (size or stamp), without a stamp, all of them with `rehash`, and every hit that a
    password applies to (by doc_id or by file name: a changed password changes the outcome).

    Vectorised, no Python object per document, and lean: one `index_in` of the listed uris in the
    cache's (a hash table of the uris only, not a join's of every column), the size and stamp
    compared at the match; only a uri whose first cache entry is another version of it (the cache
    keeps every listed version until a rewrite) goes through a join on (source_uri, size, stamp),
    over those few uris."""
    uris = listing.column("source_uri").combine_chunks()
    n = listing.num_rows
    if rehash or cache is None or not cache.num_rows or not n:
        return DISCOVERED_SCHEMA.empty_table(), uris
    c_uri = cache.column("source_uri").combine_chunks()
    at = pc.index_in(uris, value_set=c_uri)
    found = pc.and_(
        pc.is_valid(at),
        pc.and_(pc.is_valid(listing.column("stamp")), pc.is_valid(listing.column("size"))),
    )
    rows = np.flatnonzero(found.to_numpy(zero_copy_only=False))
    crows = at.take(pa.array(rows)).to_numpy(zero_copy_only=False).astype(np.int64)
    del at, found
    same = np.ones(len(rows), dtype=bool)
    for k in ("size", "stamp"):
        mine = listing.column(k).take(pa.array(rows))
        theirs = cache.column(k).take(pa.array(crows))
        same &= pc.fill_null(pc.equal(mine, theirs), False).to_numpy(zero_copy_only=False)
        del mine, theirs
    other = rows[~same]  # the uri is cached, its first entry is another version: join those
    rows, crows = rows[same], crows[same]
    if len(other):
        sub = pc.is_in(c_uri, value_set=uris.take(pa.array(other)))
        csub = np.flatnonzero(sub.to_numpy(zero_copy_only=False))
        right = cache.select(KEY).take(pa.array(csub)).append_column("_crow", pa.array(csub))
        left = listing.select(KEY).take(pa.array(other)).append_column("_row", pa.array(other))
        more = left.join(right, keys=KEY, join_type="inner")
        rows = np.concatenate([rows, more.column("_row").to_numpy()])
        crows = np.concatenate([crows, more.column("_crow").to_numpy()])
        order = np.argsort(rows, kind="stable")
        rows, crows = rows[order], crows[order]
        once = np.ones(len(rows), dtype=bool)  # a key in two parts matched twice: take it once
        once[1:] = rows[1:] != rows[:-1]
        rows, crows = rows[once], crows[once]
        del sub, csub, right, left, more
    del c_uri
    take = pa.array(crows)
    cached = pa.Table.from_arrays(
        [
            uris.take(pa.array(rows)),
            *(cache.column(k).take(take) for k in VALUES),
            pa.nulls(len(rows), pa.string()).fill_null(""),
        ],
        schema=DISCOVERED_SCHEMA,
    ).combine_chunks()
    del take
    keys = [k for k, v in (passwords or {}).items() if v]
    if keys and cached.num_rows:
        pw = pa.array(keys, pa.string())
        name = pc.replace_substring_regex(pc.utf8_rtrim(cached.column("source_uri"), "/"), r"^.*/", "")
        by_pw = pc.or_(pc.is_in(cached.column("doc_id"), value_set=pw), pc.is_in(name, value_set=pw))
        keep = ~by_pw.to_numpy(zero_copy_only=False)
        cached, rows = cached.filter(pa.array(keep)), rows[keep]
        del name, by_pw, keep
    todo = np.ones(n, dtype=bool)
    todo[rows] = False
    return cached, uris.filter(pa.array(todo))


def _cacheable(t: pa.Table) -> pa.Table:
    """The rows of `t` the cache may keep, in SCHEMA."""
    if not t.num_rows:
        return SCHEMA.empty_table()
    ok = pc.and_(
        pc.and_(pc.is_valid(t.column("stamp")), pc.is_valid(t.column("size"))),
        pc.fill_null(pc.is_in(t.column("error_code"), value_set=pa.array(CACHEABLE_ERRORS)), False),
    )
    if "password" in t.column_names:
        pw = t.column("password").cast(pa.string())
        ok = pc.and_(ok, pc.equal(pc.fill_null(pw, ""), ""))
    kept = t.filter(ok)
    return pa.Table.from_arrays(
        [kept.column(f.name).cast(f.type) for f in SCHEMA], schema=SCHEMA
    ).combine_chunks()


def _all_equal(t: pa.Table, names: list[str], suffix: str) -> pa.ChunkedArray | pa.Array:
    """Rows where every `name` equals `name+suffix` (two nulls are equal)."""
    out: Any = None
    for name in names:
        a, b = t.column(name), t.column(name + suffix)
        both_null = pc.and_(pc.is_null(a), pc.is_null(b))
        eq = pc.or_(pc.fill_null(pc.equal(a, b), False), both_null)
        out = eq if out is None else pc.and_(out, eq)
    return out


def _sorted(t: pa.Table, unique: bool = False) -> pa.Table:
    """`t` sorted by KEY; `unique`: one row per key (the first of each run of equal keys)."""
    t = t.sort_by([(k, "ascending") for k in KEY]).combine_chunks()
    n = t.num_rows
    if unique and n > 1:
        first = np.ones(n, dtype=bool)
        same = np.ones(n - 1, dtype=bool)
        for k in KEY:
            c = t.column(k)
            same &= pc.equal(c.slice(1), c.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        first[1:] = ~same
        if not first.all():
            t = t.filter(pa.array(first))
    return t


def _keys_digest(t: pa.Table) -> str:
    """sha256 hex of the `uri\tsize\tstamp` lines of `t`, joined by newlines, built in Arrow
    (no Python string per entry)."""
    h = hashlib.sha256()
    step = 1 << 18
    for a in range(0, t.num_rows, step):
        s = t.slice(a, step)
        lines = pc.binary_join_element_wise(
            s.column("source_uri"), s.column("size").cast(pa.string()), s.column("stamp"), "\t"
        ).combine_chunks()
        joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(lines)], pa.int32()), lines), "\n")
        if a:
            h.update(b"\n")
        h.update(joined[0].as_buffer())
    return h.hexdigest()
