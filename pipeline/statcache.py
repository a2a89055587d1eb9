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
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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


class StatCache:
    def __init__(self, store: Any):
        self.store = store
        self.entries: dict[Key, dict[str, Any]] = {}
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
            tables = list(pool.map(read, names))
        cache.parts = list(names)
        for t in tables:
            if t is None:
                continue
            for row in t.to_pylist():
                cache.entries[(row["source_uri"], int(row["size"]), row["stamp"])] = row
        return cache

    def get(self, uri: str, size: int, stamp: str) -> dict[str, Any] | None:
        return self.entries.get((uri, size, stamp))

    def add(self, rows: list[dict[str, Any]], live: set[Key]) -> int:
        """Record new probe outcomes (rows with `size`, `stamp`); writes one part if any is new.
        `live`: the keys this run listed; a rewrite of the whole cache keeps only those."""
        new = [
            {k: r[k] for k in SCHEMA.names}
            for r in rows
            if r.get("stamp") is not None
            and r["error_code"] in CACHEABLE_ERRORS
            and not r.get("password")
            and self.entries.get((r["source_uri"], r["size"], r["stamp"])) != {k: r[k] for k in SCHEMA.names}
        ]
        # an entry that a rehash contradicts (same stamp, other bytes): parts have no order, so
        # the whole cache is rewritten without the old entry
        conflict = any((r["source_uri"], r["size"], r["stamp"]) in self.entries for r in new)
        for r in new:
            self.entries[(r["source_uri"], r["size"], r["stamp"])] = r
        if conflict or len(self.parts) + bool(new) > MAX_PARTS:  # consolidate: the live entries
            keep = sorted((v for k, v in self.entries.items() if k in live), key=lambda r: r["source_uri"])
            written = self._write(keep)
            for p in self.parts:
                if p.rsplit("/", 1)[-1] != written:
                    self.store.fs.rm(p)
            self.parts = [self.store.join(CACHE_DIR, written)]
        elif new:
            self.parts.append(self.store.join(CACHE_DIR, self._write(new)))
        return len(new)

    def _write(self, rows: list[dict[str, Any]]) -> str:
        blob = "\n".join(f"{r['source_uri']}\t{r['size']}\t{r['stamp']}" for r in rows).encode()
        name = f"part-{hashlib.sha256(blob).hexdigest()[:20]}.parquet"
        self.store.write_parquet(CACHE_DIR, pa.Table.from_pylist(rows, schema=SCHEMA), name=name)
        return name
