# pyarrow ships no type stubs: its members, values and arguments are Unknown to pyright.
# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false, reportUnknownArgumentType=false
"""The ledger: which (doc_id, page_index, config_hash) rows are final, and which file holds each.

Why it can be trusted after a crash:
- The unit of commit is one Parquet part under `pages/`, written (POSIX) under a hidden temporary name and
  renamed into place (`OutputStore`). Right after it, the writer commits a ledger part with the
  SAME file name under `_ledger/` holding that part's keys, status and file name.
- A crash between the two renames leaves a pages part without its ledger part. `Ledger.load`
  reconciles on every start: such orphans are indexed from their own key columns (the pages part
  is the truth), ledger parts whose pages part vanished are dropped, and leftover `.tmp-*` files
  older than this run's lease (pipeline/lease.py: one run at a time per root) are removed. So the ledger always describes exactly the committed rows.
- A key that is in the ledger is never processed again (unless `force`), so no row is written twice;
  a key that is not is processed, so nothing is lost. Re-running a finished build writes nothing.
- `force` takes the current inputs' rows out of the committed parts first (`forget`), so the redo
  cannot leave duplicates; other documents' and other configurations' rows stay.
`_sources/` records every (doc_id, source_uri) pair ever seen: the same bytes under two paths are
processed once and both paths kept; parts are named by their content, so nothing new = no write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import pyarrow as pa  # pyright: ignore[reportMissingTypeStubs]  # pyarrow ships no stubs
import pyarrow.parquet as pq  # pyright: ignore[reportMissingTypeStubs]  # pyarrow ships no stubs

log = logging.getLogger("pagemill")

PAGES_DIR = "pages"
LEDGER_DIR = "_ledger"
SOURCES_DIR = "_sources"
SNAPSHOT_DIR = "_ledger_snapshots"  # consolidated ledger at the end of each run (write_snapshot)
MANIFEST_KEY = b"pagemill.ledger_manifest"
SIDE_DIRS = ("figures",)  # per-batch outputs named like their pages part (deleted with it)

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("page_index", pa.int32(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),  # relative to the output root: pages/part-….parquet
    ]
)
SOURCES_SCHEMA = pa.schema([pa.field("doc_id", pa.string()), pa.field("source_uri", pa.string())])
FAILURES_DIR = "_failures"
FAILURES_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("reason", pa.string()),
    ]
)

Key = tuple[str, int]


def ledger_table(pages: pa.Table, file: str) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """Ledger rows for one committed pages part."""
    n = pages.num_rows
    return pa.table(
        {
            "doc_id": pages.column("doc_id").cast(pa.string()),
            "page_index": pages.column("page_index").cast(pa.int32()),
            "config_hash": pages.column("config_hash").cast(pa.string()),
            "status": pages.column("status").cast(pa.string()),
            "file": pa.array([file] * n, pa.string()),
        },
        schema=LEDGER_SCHEMA,
    )


def commit_entry(store: Any, pages: pa.Table, file: str) -> None:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """Write the ledger part of the pages part `file` (call right after that part is committed)."""
    name = file.rsplit("/", 1)[-1]
    store.write_parquet(LEDGER_DIR, ledger_table(pages, file), name=name)


def _names(store: Any, sub: str) -> dict[str, str]:
    """{file name: full path} of the committed parts in `sub` (hidden temporaries excluded)."""
    path = store.join(sub)
    store.fs.invalidate_cache(path)  # other processes wrote here: never trust a cached listing
    if not store.fs.exists(path):
        return {}
    return {
        p.rsplit("/", 1)[-1]: p
        for p in store.fs.ls(path, detail=False)
        if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")
    }


def _listing(store: Any, sub: str) -> dict[str, tuple[str, str | None]]:
    """{file name: (full path, version)} of the committed parts in `sub`; the version (size plus
    ETag, or mtime and inode) comes with the listing and changes whenever the file is rewritten."""
    from pipeline.sources import stat_stamp

    path = store.join(sub)
    store.fs.invalidate_cache(path)
    if not store.fs.exists(path):
        return {}
    out: dict[str, tuple[str, str | None]] = {}
    for info in store.fs.ls(path, detail=True):
        p = str(info["name"])
        name = p.rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith("."):
            stamp = stat_stamp(info)
            out[name] = (p, None if stamp is None else f"{info.get('size')}:{stamp}")
    return out


def _live_listings(
    store: Any,
) -> tuple[dict[str, tuple[str, str | None]], dict[str, tuple[str, str | None]]]:
    """`_listing` of pages/ and _ledger/ without the parts a compaction swap hides from readers
    (pipeline/compact.py: merged parts not yet swapped in, old parts already swapped out)."""
    from pipeline.compact import hidden_parts

    hidden = hidden_parts(store)
    pages, entries = _listing(store, PAGES_DIR), _listing(store, LEDGER_DIR)
    return (
        {n: v for n, v in pages.items() if n not in hidden},
        {n: v for n, v in entries.items() if n not in hidden},
    )


def _read_snapshot(store: Any) -> tuple[pa.Table, dict[str, list[str]]]:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The newest readable ledger snapshot and its manifest {part name: [pages version, ledger
    version]}; an unreadable one is skipped (the parts it covered are then read one by one)."""
    for name, path in sorted(_names(store, SNAPSHOT_DIR).items(), reverse=True):
        try:
            t = pq.read_table(path, filesystem=store.fs)
            manifest = json.loads((t.schema.metadata or {})[MANIFEST_KEY])
            return t.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA), dict(manifest)
        except Exception as e:
            log.warning("ledger: skipping unreadable snapshot %s (%s: %s)", name, type(e).__name__, e)
    return LEDGER_SCHEMA.empty_table(), {}


def _unchanged(
    manifest: dict[str, list[str]],
    pages: dict[str, tuple[str, str | None]],
    entries: dict[str, tuple[str, str | None]],
) -> set[str]:
    """Parts whose pages and ledger files are exactly as the snapshot saw them (consistent then)."""
    out: set[str] = set()
    for name, (_, vp) in pages.items():
        seen = manifest.get(name)
        if seen is not None and name in entries and vp is not None and seen == [vp, entries[name][1]]:
            out.add(name)
    return out


def _ledger_rows(store: Any, snap: pa.Table, unchanged: set[str], paths: list[str]) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The snapshot's rows of the unchanged parts plus the rows of the ledger parts `paths` (read
    in threads)."""
    import pyarrow.compute as pc  # pyright: ignore[reportMissingTypeStubs]  # pyarrow ships no stubs

    keep = pa.array(sorted(f"{PAGES_DIR}/{n}" for n in unchanged), pa.string())
    tables = [snap.filter(pc.is_in(snap.column("file"), value_set=keep))]  # pyright: ignore[reportAttributeAccessIssue]  # pc funcs generated at import
    with ThreadPoolExecutor(max_workers=16) as pool:
        tables += list(pool.map(lambda p: pq.read_table(p, filesystem=store.fs, schema=LEDGER_SCHEMA), paths))  # pyright: ignore[reportUnknownLambdaType]
    return pa.concat_tables(tables)


def _mtime(info: dict[str, Any]) -> float | None:
    """Modification time (epoch seconds) of an fsspec `ls(detail=True)` entry, if it has one."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        stamp = getattr(v, "timestamp", None)  # datetime (object stores)
        if callable(stamp):
            return float(cast(float, stamp()))
    return None


def _remove_temporaries(store: Any, before: float | None = None) -> int:
    """Remove leftover `.tmp-*` files (a crashed run's uncommitted writes). With `before` (the
    start of this run's lease), only those last modified earlier: a temporary written since is
    in flight and not ours to delete. One without a time is kept unless `before` is None."""
    n = 0
    for sub in (PAGES_DIR, LEDGER_DIR, SOURCES_DIR, FAILURES_DIR, *SIDE_DIRS):
        path = store.join(sub)
        if store.fs.exists(path):
            for info in store.fs.ls(path, detail=True):
                p = str(info["name"])
                if not p.rsplit("/", 1)[-1].startswith(".tmp-"):
                    continue
                t = _mtime(info)
                if before is None or (t is not None and t < before):
                    store.fs.rm(p)
                    n += 1
    return n


@dataclass
class Ledger:
    config_hash: str
    status: dict[Key, str] = field(default_factory=dict)  # final rows of this configuration
    files: dict[Key, str] = field(default_factory=dict)
    sources: set[tuple[str, str]] = field(default_factory=set)
    failures: dict[str, list[str]] = field(default_factory=dict)  # doc_id -> reasons, one per failed run
    reconciled: int = 0  # orphan pages parts indexed on load
    dropped: int = 0  # ledger parts without their pages part
    from_snapshot: int = 0  # parts taken from the ledger snapshot (not read one by one)

    @property
    def done(self) -> set[Key]:
        return set(self.status)

    def counts(self, keys: set[Key]) -> Counter[str]:
        return Counter(self.status[k] for k in keys if k in self.status)

    @classmethod
    def load(
        cls, store: Any, config_hash: str, temporaries_before: float | None = None, read_only: bool = False
    ) -> Ledger:
        """Reconcile the output root, then read this configuration's committed keys.
        `temporaries_before`: remove only temporaries older than this (the run lease's start).
        `read_only` (dry runs): the same keys, with nothing written or removed (orphan parts are
        indexed in memory, stale entries skipped, temporaries left alone)."""
        if not read_only:
            from pipeline.compact import recover

            recover(store)  # finish an interrupted compaction swap (pipeline/compact.py)
            _remove_temporaries(store, temporaries_before)
        listed_pages, listed_entries = _live_listings(store)
        pages = {n: p for n, (p, _) in listed_pages.items()}
        entries = {n: p for n, (p, _) in listed_entries.items()}
        snap, manifest = _read_snapshot(store)
        unchanged = _unchanged(manifest, listed_pages, listed_entries)  # no footer read for these
        led = cls(config_hash)
        for name in sorted(set(entries) - set(pages)):  # rows gone: they must be redone
            path = entries.pop(name)
            if not read_only:
                store.fs.rm(path)
            led.dropped += 1

        def rows(path: str | None) -> int:
            return -1 if path is None else int(pq.read_metadata(path, filesystem=store.fs).num_rows)

        def both(name: str) -> tuple[int, int]:
            return rows(pages[name]), rows(entries.get(name))

        # the footers are many small reads (two per part not in the snapshot): in threads
        with ThreadPoolExecutor(max_workers=16) as pool:
            names = sorted(set(pages) - unchanged)
            counts = list(pool.map(both, names))
        reindexed: list[pa.Table] = []
        for name, (n_pages, n_entry) in zip(names, counts):  # crash between the two commits
            if n_entry == n_pages:
                continue
            table = pq.read_table(
                pages[name], filesystem=store.fs, columns=["doc_id", "page_index", "config_hash", "status"]
            )
            if read_only:
                entries.pop(name, None)
                reindexed.append(ledger_table(table, f"{PAGES_DIR}/{name}"))
            else:
                commit_entry(store, table, f"{PAGES_DIR}/{name}")
            led.reconciled += 1
        for sub in () if read_only else SIDE_DIRS:  # side outputs of a batch whose pages part never committed
            for name, path in _names(store, sub).items():
                if name not in pages:
                    store.fs.rm(path)
        now = entries if read_only else _names(store, LEDGER_DIR)
        table = _ledger_rows(
            store, snap, unchanged, [p for n, p in sorted(now.items()) if n not in unchanged]
        )
        if reindexed:
            table = pa.concat_tables([table, *reindexed])
        led.from_snapshot = len(unchanged)
        for d, p, c, s, f in zip(*(table.column(n).to_pylist() for n in LEDGER_SCHEMA.names)):
            if c == config_hash:
                key = (d, int(p))
                if key in led.status:  # cannot happen through this code; never hide it
                    log.warning("ledger: duplicate row %s in %s and %s", key, led.files[key], f)
                led.status[key], led.files[key] = s, f
        if _names(store, FAILURES_DIR):
            fail = store.read_table(FAILURES_DIR)
            for d, c, r in zip(*(fail.column(n).to_pylist() for n in ("doc_id", "config_hash", "reason"))):
                if c == config_hash:
                    led.failures.setdefault(d, []).append(r)
        if _names(store, SOURCES_DIR):
            src = store.read_table(SOURCES_DIR)
            led.sources = set(zip(src.column("doc_id").to_pylist(), src.column("source_uri").to_pylist()))
        if led.reconciled or led.dropped:
            log.info(
                "ledger: indexed %d orphan part(s), dropped %d stale entr(ies)", led.reconciled, led.dropped
            )
        return led

    @staticmethod
    def write_snapshot(store: Any) -> str | None:
        """End of a run: one consolidated Parquet file of the whole ledger (all configurations)
        with a manifest of the part versions it covers, so the next `load` reads it plus only the
        parts written or rewritten since. Parts not consistent now (a pages part without its
        ledger part) are left out: `load` reconciles them as before. Keeps the previous one; writes
        nothing when no part changed (a no-op rerun touches no file)."""
        pages, entries = _live_listings(store)
        snap, manifest = _read_snapshot(store)
        unchanged = _unchanged(manifest, pages, entries)
        fresh = sorted(n for n in entries if n in pages and n not in unchanged and pages[n][1] is not None)

        def consistent(name: str) -> bool:
            n_pages = pq.read_metadata(pages[name][0], filesystem=store.fs).num_rows
            return n_pages == pq.read_metadata(entries[name][0], filesystem=store.fs).num_rows

        with ThreadPoolExecutor(max_workers=16) as pool:
            ok = [n for n, good in zip(fresh, pool.map(consistent, fresh)) if good]
        covered = {n: [pages[n][1], entries[n][1]] for n in sorted(unchanged | set(ok))}
        if covered == manifest:  # nothing committed, rewritten or removed since: no write
            return None
        table = _ledger_rows(store, snap, unchanged, [entries[n][0] for n in ok])
        blob = json.dumps(covered).encode()
        table = table.replace_schema_metadata({MANIFEST_KEY: blob})
        older = sorted(_names(store, SNAPSHOT_DIR).values())
        written = store.write_parquet(SNAPSHOT_DIR, table, name=f"snap-{time.time_ns():020d}.parquet")
        for path in older[:-1]:  # the newest previous one stays, in case this one is unreadable
            store.fs.rm(path)
        return written

    def forget(self, store: Any, keys: set[Key]) -> int:
        """`force`: take `keys` out of the committed outputs so they are redone exactly once.

        Each part holding some of them is rewritten without them (pages first, then its ledger
        part: a crash in between is caught by `load`'s row-count check) or removed when empty.
        Rows of other documents in the same part are kept."""
        by_file: dict[str, set[Key]] = {}
        for k in keys & self.done:
            by_file.setdefault(self.files[k], set()).add(k)
        for file, drop in sorted(by_file.items()):
            name = file.rsplit("/", 1)[-1]
            for sub in (PAGES_DIR, *SIDE_DIRS, LEDGER_DIR):
                path = store.join(sub, name)
                if not store.fs.exists(path):
                    continue
                t = pq.read_table(path, filesystem=store.fs)
                keep = [
                    (d, int(p)) not in drop
                    for d, p in zip(t.column("doc_id").to_pylist(), t.column("page_index").to_pylist())
                ]
                if not any(keep):
                    store.fs.rm(path)
                else:
                    store.write_parquet(sub, t.filter(pa.array(keep)), name=name)
            for k in drop:
                del self.status[k], self.files[k]
        return sum(len(v) for v in by_file.values())

    def record_failures(self, store: Any, run_id: str, reasons: dict[str, str]) -> None:
        """Note the documents whose rows this run could not produce (their batch kept killing the
        OCR worker, say); after `quarantine_after` such runs they are quarantined, not retried."""
        if not reasons:
            return
        docs = sorted(reasons)
        table = pa.table(
            {
                "doc_id": docs,
                "config_hash": [self.config_hash] * len(docs),
                "run_id": [run_id] * len(docs),
                "reason": [reasons[d] for d in docs],
            },
            schema=FAILURES_SCHEMA,
        )
        store.write_parquet(FAILURES_DIR, table, name=f"part-{run_id}-{self.config_hash}.parquet")
        for d in docs:
            self.failures.setdefault(d, []).append(reasons[d])

    def record_sources(self, store: Any, pairs: set[tuple[str, str]]) -> int:
        """Append the (doc_id, source_uri) pairs not seen before; returns how many were new."""
        new = sorted(pairs - self.sources)
        if new:
            blob = "\n".join(f"{d}\t{u}" for d, u in new).encode()
            name = f"part-{hashlib.sha256(blob).hexdigest()[:20]}.parquet"
            table = pa.table(
                {"doc_id": [d for d, _ in new], "source_uri": [u for _, u in new]}, schema=SOURCES_SCHEMA
            )
            store.write_parquet(SOURCES_DIR, table, name=name)
            self.sources.update(new)
        return len(new)
