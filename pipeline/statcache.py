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
listing is one too (`pipeline.sources.LISTING_SCHEMA`): `split_listing` finds the hits by a hash
join on (source_uri, size, stamp), so a nightly over a million inputs makes no Python object per
document (issue 16: bounded driver memory).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc  # pyright: ignore[reportMissingTypeStubs]  # pyarrow ships no stubs
import pyarrow.parquet as pq

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
Key = tuple[str, int, str]
KEY = ["source_uri", "size", "stamp"]
VALUES = ["doc_id", "page_count", "error_code", "error"]


class StatCache:
    """The cache's entries as one SCHEMA table (`table`, unique keys) and its parts on disk."""

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
                return pq.read_table(p, filesystem=store.fs, schema=SCHEMA)
            except Exception as e:
                log.warning("stat cache: skipping unreadable %s (%s: %s)", p, type(e).__name__, e)
                return None

        with ThreadPoolExecutor(max_workers=16) as pool:
            tables = [t for t in pool.map(read, names) if t is not None]
        cache.parts = list(names)
        if len(tables) == 1:  # one part: its keys are unique (each part is written so)
            cache.table = tables[0].combine_chunks()
        elif tables:  # the same key in two parts (a crash between a rewrite and its removals)
            cache.table = _unique(pa.concat_tables(tables))
        return cache

    @property
    def entries(self) -> dict[Key, dict[str, Any]]:
        """The entries as a dict of dicts (tests and small callers only: one dict per entry)."""
        return {(r["source_uri"], int(r["size"]), r["stamp"]): r for r in self.table.to_pylist()}

    def get(self, uri: str, size: int, stamp: str) -> dict[str, Any] | None:
        """One entry (a scan of the table: tests and small callers; discovery uses split_listing)."""
        t = self.table
        mask = pc.and_(  # pyright: ignore[reportAttributeAccessIssue]
            pc.and_(pc.equal(t.column("source_uri"), uri), pc.equal(t.column("size"), size)),  # pyright: ignore[reportAttributeAccessIssue]
            pc.equal(t.column("stamp"), stamp),  # pyright: ignore[reportAttributeAccessIssue]
        )
        rows = t.filter(mask).slice(0, 1).to_pylist()
        return rows[0] if rows else None

    def add(self, rows: pa.Table | Iterable[Mapping[str, Any]], live: pa.Table | set[Key]) -> int:
        """Record new probe outcomes (rows with SCHEMA's columns, `password` optional: a table, or
        dicts); writes one part if any is new. Not kept: rows without a stamp, with an error that
        may be transient (not in CACHEABLE_ERRORS) or opened with a password.
        `live`: the keys this run listed (a table with source_uri, size, stamp, e.g. the listing,
        or a set of keys); a rewrite of the whole cache keeps only those."""
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
            keep = merged.join(_keys_table(live), keys=KEY, join_type="left semi")
            del rest, merged
            self.table = _sorted(keep)
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
    stat cache's table (SCHEMA, unique keys): the hits as a DISCOVERED_SCHEMA table (password "")
    in listing order, and the uris to read and probe (in listing order): new or changed (size or
    stamp), without a stamp, all of them with `rehash`, and every hit that a password applies to
    (by doc_id or by file name: a changed password changes the outcome). Vectorised: a hash join
    and two `is_in`s, no Python object per document."""
    uris = listing.column("source_uri").combine_chunks()
    if rehash or cache is None or not cache.num_rows or not listing.num_rows:
        return DISCOVERED_SCHEMA.empty_table(), uris
    row = pa.array(np.arange(listing.num_rows, dtype=np.int64))
    left = listing.select(KEY).append_column("_row", row)
    left = left.filter(pc.and_(pc.is_valid(left.column("stamp")), pc.is_valid(left.column("size"))))  # pyright: ignore[reportAttributeAccessIssue]
    hits = left.join(cache.select(KEY + VALUES), keys=KEY, join_type="inner")
    del left, row
    keys = [k for k, v in (passwords or {}).items() if v]
    if keys and hits.num_rows:
        pw = pa.array(keys, pa.string())
        name = pc.replace_substring_regex(pc.utf8_rtrim(hits.column("source_uri"), "/"), r"^.*/", "")  # pyright: ignore[reportAttributeAccessIssue]
        by_pw = pc.or_(pc.is_in(hits.column("doc_id"), value_set=pw), pc.is_in(name, value_set=pw))  # pyright: ignore[reportAttributeAccessIssue]
        hits = hits.filter(pc.invert(by_pw))  # pyright: ignore[reportAttributeAccessIssue]
        del name, by_pw
    hit_rows = hits.column("_row").to_numpy()
    order = np.argsort(hit_rows, kind="stable")
    hits = hits.take(pa.array(order))
    n = hits.num_rows
    cached = pa.Table.from_arrays(
        [
            hits.column("source_uri"),
            hits.column("doc_id"),
            hits.column("page_count").cast(pa.int32()),
            hits.column("error_code"),
            hits.column("error"),
            pa.nulls(n, pa.string()).fill_null(""),
        ],
        schema=DISCOVERED_SCHEMA,
    ).combine_chunks()
    del hits
    todo = np.ones(listing.num_rows, dtype=bool)
    todo[hit_rows] = False
    return cached, uris.filter(pa.array(todo))


def _cacheable(rows: pa.Table | Iterable[Mapping[str, Any]]) -> pa.Table:
    """The rows of `rows` the cache may keep, in SCHEMA."""
    if isinstance(rows, pa.Table):
        t: pa.Table = rows
    else:
        dicts = list(rows)
        fields = [*SCHEMA, pa.field("password", pa.string())]
        t = pa.table({f.name: pa.array([r.get(f.name) for r in dicts], f.type) for f in fields})
    if not t.num_rows:
        return SCHEMA.empty_table()
    ok = pc.and_(  # pyright: ignore[reportAttributeAccessIssue]
        pc.and_(pc.is_valid(t.column("stamp")), pc.is_valid(t.column("size"))),  # pyright: ignore[reportAttributeAccessIssue]
        pc.fill_null(pc.is_in(t.column("error_code"), value_set=pa.array(CACHEABLE_ERRORS)), False),  # pyright: ignore[reportAttributeAccessIssue]
    )
    if "password" in t.column_names:
        pw = t.column("password").cast(pa.string())
        ok = pc.and_(ok, pc.equal(pc.fill_null(pw, ""), ""))  # pyright: ignore[reportAttributeAccessIssue]
    kept = t.filter(ok)
    return pa.Table.from_arrays(
        [kept.column(f.name).cast(f.type) for f in SCHEMA], schema=SCHEMA
    ).combine_chunks()


def _all_equal(t: pa.Table, names: list[str], suffix: str) -> pa.ChunkedArray | pa.Array:
    """Rows where every `name` equals `name+suffix` (two nulls are equal)."""
    out: Any = None
    for name in names:
        a, b = t.column(name), t.column(name + suffix)
        both_null = pc.and_(pc.is_null(a), pc.is_null(b))  # pyright: ignore[reportAttributeAccessIssue]
        eq = pc.or_(pc.fill_null(pc.equal(a, b), False), both_null)  # pyright: ignore[reportAttributeAccessIssue]
        out = eq if out is None else pc.and_(out, eq)  # pyright: ignore[reportAttributeAccessIssue]
    return out


def _unique(t: pa.Table) -> pa.Table:
    """One row per key (the first in `t`)."""
    g = t.group_by(KEY, use_threads=False).aggregate([(v, "first") for v in VALUES])
    g = g.rename_columns([n.removesuffix("_first") for n in g.column_names])
    return g.select(SCHEMA.names).cast(SCHEMA)


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in KEY]).combine_chunks()


def _keys_table(live: pa.Table | set[Key]) -> pa.Table:
    if not isinstance(live, set):
        return live.select(KEY)
    keys = list(live)
    return pa.table(
        {
            "source_uri": pa.array([k[0] for k in keys], pa.string()),
            "size": pa.array([k[1] for k in keys], pa.int64()),
            "stamp": pa.array([k[2] for k in keys], pa.string()),
        }
    )


def _keys_digest(t: pa.Table) -> str:
    """sha256 hex of the `uri\tsize\tstamp` lines of `t`, joined by newlines, built in Arrow
    (no Python string per entry)."""
    h = hashlib.sha256()
    step = 1 << 18
    for a in range(0, t.num_rows, step):
        s = t.slice(a, step)
        lines = pc.binary_join_element_wise(  # pyright: ignore[reportAttributeAccessIssue]
            s.column("source_uri"), s.column("size").cast(pa.string()), s.column("stamp"), "\t"
        ).combine_chunks()
        joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(lines)], pa.int32()), lines), "\n")  # pyright: ignore[reportAttributeAccessIssue]
        if a:
            h.update(b"\n")
        h.update(joined[0].as_buffer())
    return h.hexdigest()
