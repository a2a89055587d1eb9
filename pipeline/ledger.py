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
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import pyarrow as pa  # pyright: ignore[reportMissingTypeStubs]  # pyarrow ships no stubs
import pyarrow.parquet as pq  # pyright: ignore[reportMissingTypeStubs]  # pyarrow ships no stubs

from pipeline.arrow import pc

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


# ----------------------------------------------------------------------------- keys as Arrow runs
# The driver never holds one Python object per page key: the final rows are kept as *runs*, one
# Arrow row per maximal stretch of consecutive pages of one document with one status in one file
# (doc_id, page_index = first page, page_stop = last page + 1, status, file). A committed part
# of 64 rows holds one to a few runs, so 20 M pages are ~1-2 M Arrow rows, not 20 M tuples.

RUNS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("page_index", pa.int32()),  # first page of the run
        pa.field("page_stop", pa.int32()),  # one past its last page
        pa.field("status", pa.string()),
        pa.field("file", pa.string()),
    ]
)
# the snapshot (format 2): one row per covered part, with the versions it was seen at and its runs
SNAP_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),  # pages/part-….parquet
        pa.field("pages_version", pa.string()),
        pa.field("ledger_version", pa.string()),
        pa.field("doc_id", pa.list_(pa.string())),
        pa.field("page_index", pa.list_(pa.int32())),
        pa.field("page_stop", pa.list_(pa.int32())),
        pa.field("config_hash", pa.list_(pa.string())),
        pa.field("status", pa.list_(pa.string())),
    ]
)
SNAPSHOT_FORMAT_KEY = b"pagemill.ledger_snapshot"  # format 2; format 1 had MANIFEST_KEY (JSON)
SNAPSHOT_FORMAT = b"2"
LISTING_SCHEMA = pa.schema([pa.field("name", pa.string()), pa.field("version", pa.string())])
_THREADS = 16


def runs_from_rows(rows: pa.Table, with_config: bool = False) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """Runs of ledger rows (doc_id, page_index, status, file[, config_hash]): consecutive pages of
    one document with one status in one file (and one configuration) become one row. Vectorised:
    one sort, then boundaries where a key column changes or a page is skipped."""
    import numpy as np

    group = ["config_hash", "file", "doc_id", "status"] if with_config else ["file", "doc_id", "status"]
    schema = RUNS_SCHEMA.append(pa.field("config_hash", pa.string())) if with_config else RUNS_SCHEMA
    n = rows.num_rows
    if n == 0:
        return schema.empty_table()
    t = rows.select([*group, "page_index"]).sort_by(
        [(c, "ascending") for c in (*group[:-1], "page_index", "status")]
    )
    brk = np.zeros(n, dtype=bool)
    brk[0] = True
    for c in group:
        col = t.column(c).combine_chunks().cast(pa.string())
        brk[1:] |= pc.not_equal(col.slice(1), col.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    p = t.column("page_index").to_numpy().astype(np.int64)
    brk[1:] |= p[1:] != p[:-1] + 1
    starts = np.flatnonzero(brk)
    last = np.append(starts[1:], n) - 1
    head = t.take(pa.array(starts))
    cols = {
        "doc_id": head.column("doc_id").cast(pa.string()),
        "page_index": head.column("page_index").cast(pa.int32()),
        "page_stop": pa.array(p[last] + 1, pa.int32()),
        "status": head.column("status").cast(pa.string()),
        "file": head.column("file").cast(pa.string()),
    }
    if with_config:
        cols["config_hash"] = head.column("config_hash").cast(pa.string())
    return pa.table(cols, schema=schema)


def runs_from_keys(keys: set[Key] | list[Key], status: str = "", file: str = "") -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """Runs of a Python key set (tests and small callers; the driver never builds one)."""
    ks = sorted(keys)
    rows = pa.table(
        {
            "doc_id": pa.array([d for d, _ in ks], pa.string()),
            "page_index": pa.array([i for _, i in ks], pa.int32()),
            "status": pa.array([status] * len(ks), pa.string()),
            "file": pa.array([file] * len(ks), pa.string()),
        }
    )
    return runs_from_rows(rows)


def expand_runs(runs: pa.Table) -> list[tuple[str, int, str, str]]:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """(doc_id, page_index, status, file) of every row of `runs`: for small tables only."""
    cols = [runs.column(c).to_pylist() for c in ("doc_id", "page_index", "page_stop", "status", "file")]
    return [(d, i, s, f) for d, a, b, s, f in zip(*cols) for i in range(a, b)]


def covered(runs: pa.Table) -> tuple[pa.Table, int]:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """Per document, how many distinct pages `runs` cover (overlapping runs count once):
    a table (doc_id, pages), and the index in `runs` sorted order of the first overlap (-1: none).
    Vectorised: sort by (doc_id, first page), running max of the stops within each document."""
    import numpy as np

    n = runs.num_rows
    if n == 0:
        return pa.table({"doc_id": pa.array([], pa.string()), "pages": pa.array([], pa.int64())}), -1
    t = runs.select(["doc_id", "page_index", "page_stop"]).sort_by(
        [("doc_id", "ascending"), ("page_index", "ascending")]
    )
    d = t.column("doc_id").combine_chunks()
    s = t.column("page_index").to_numpy().astype(np.int64)
    e = t.column("page_stop").to_numpy().astype(np.int64)
    new = np.zeros(n, dtype=bool)
    new[0] = True
    new[1:] = pc.not_equal(d.slice(1), d.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    gid = np.cumsum(new) - 1
    big, shift = 1 << 34, 1 << 31  # stops are int32: shifted positive, they stay below `big`
    run_max = np.maximum.accumulate(gid * big + e + shift) - gid * big - shift
    prev = np.empty(n, dtype=np.int64)
    prev[0] = -shift
    prev[1:] = run_max[:-1]
    prev[new] = -shift
    contrib = np.maximum(0, e - np.maximum(s, prev))
    first = np.flatnonzero(s < prev)
    heads = np.flatnonzero(new)
    out = pa.table({"doc_id": d.take(pa.array(heads)), "pages": pa.array(np.add.reduceat(contrib, heads))})
    return out, (int(first[0]) if first.size else -1)


def _first_overlap(runs: pa.Table) -> tuple[Key, list[str]] | None:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The first key held by two runs (two parts), with the files of the runs around it."""
    _, i = covered(runs)
    if i < 0:
        return None
    t = runs.sort_by([("doc_id", "ascending"), ("page_index", "ascending")])
    row = t.slice(i, 1).to_pylist()[0]
    doc = row["doc_id"]
    key = (doc, int(row["page_index"]))
    same = t.filter(pc.equal(t.column("doc_id"), doc)).to_pylist()
    files = [r["file"] for r in same if r["page_index"] <= key[1] < r["page_stop"]]
    return key, files


# ----------------------------------------------------------------------------- listings


def _scan(store: Any, sub: str) -> tuple[pa.Table, list[tuple[str, float | None]]]:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The committed parts of `sub` as an Arrow table (name, version) sorted by name, and its
    `.tmp-*` temporaries as (path, mtime). The version (size plus ETag, or mtime and inode) comes
    with the listing and changes whenever the file is rewritten. On local disk the directory is
    read with `os.scandir` (fsspec's `ls(detail=True)` builds a dict of ~10 fields per file: a
    million parts would cost ~1 GB of driver memory for one listing); remote listings are never
    taken from a cache (other processes wrote there)."""
    from pipeline.sources import stat_stamp

    path = store.join(sub)
    names: list[str] = []
    versions: list[str | None] = []
    temps: list[tuple[str, float | None]] = []
    chunks: list[pa.Table] = []

    def flush() -> None:  # into Arrow every 64k entries: the Python strings never pile up
        chunks.append(
            pa.table({"name": pa.array(names, pa.string()), "version": pa.array(versions, pa.string())})
        )
        names.clear()
        versions.clear()

    if store.posix:
        try:
            it = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            return LISTING_SCHEMA.empty_table(), []
        with it:
            for e in it:
                n = e.name
                tmp = n.startswith(".tmp-")
                if not tmp and (n.startswith(".") or not n.endswith(".parquet")):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if tmp:
                    temps.append((f"{path}/{n}", float(st.st_mtime)))
                else:  # the same text as stat_stamp gives for fsspec's local `info`
                    names.append(n)
                    versions.append(f"{st.st_size}:mtime:{float(st.st_mtime)!r}:ino:{st.st_ino}")
                    if len(names) >= 1 << 16:
                        flush()
    else:
        store.fs.invalidate_cache(path)
        if not store.fs.exists(path):
            return LISTING_SCHEMA.empty_table(), []
        for info in store.fs.ls(path, detail=True):
            p = str(info["name"])
            n = p.rsplit("/", 1)[-1]
            if n.startswith(".tmp-"):
                temps.append((p, _mtime(info)))
            elif n.endswith(".parquet") and not n.startswith("."):
                stamp = stat_stamp(info)
                names.append(n)
                versions.append(None if stamp is None else f"{info.get('size')}:{stamp}")
    flush()
    return pa.concat_tables(chunks).combine_chunks().sort_by("name"), temps


def _names(store: Any, sub: str) -> dict[str, str]:
    """{file name: full path} of the committed parts in `sub` (hidden temporaries excluded)."""
    return {n: store.join(sub, n) for n in _scan(store, sub)[0].column("name").to_pylist()}


def _listing(store: Any, sub: str) -> dict[str, tuple[str, str | None]]:  # pyright: ignore[reportUnusedFunction]  # kept for tools
    """{file name: (full path, version)} of the committed parts in `sub` (small roots and tools;
    the load and the snapshot keep the listing in Arrow, `_scan`)."""
    t = _scan(store, sub)[0]
    return {
        n: (store.join(sub, n), v)
        for n, v in zip(t.column("name").to_pylist(), t.column("version").to_pylist())
    }


def _part_scans(store: Any) -> dict[str, tuple[pa.Table, list[tuple[str, float | None]]]]:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """`_scan` of pages/ and _ledger/: the one listing of the committed parts that `load` and
    `write_snapshot` work from, without the parts a compaction swap hides from readers
    (pipeline/compact.py: merged parts not yet swapped in, old parts already swapped out)."""
    from pipeline.compact import hidden_parts

    hidden = pa.array(sorted(hidden_parts(store)), pa.string())
    out = {}
    for sub in (PAGES_DIR, LEDGER_DIR):
        t, temps = _scan(store, sub)
        if len(hidden):
            t = t.filter(pc.invert(_is_in(t.column("name"), hidden)))
        out[sub] = (t, temps)
    return out


SNAP_VERSIONS = ["file", "pages_version", "ledger_version"]
SNAP_RUNS = ["file", "doc_id", "page_index", "page_stop", "config_hash", "status"]


def _read_snapshot(store: Any, columns: list[str] | None = None) -> tuple[pa.Table, str | None]:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The newest readable ledger snapshot, as SNAP_SCHEMA rows (one per covered part; only
    `columns` of a format-2 one), and its path (None: none, or a converted format-1 one, which
    is returned whole). A format-1 snapshot (rows plus a JSON manifest in the footer) is
    converted; an unreadable one is skipped (the parts it covered are then read one by one)."""
    for name in sorted(_names(store, SNAPSHOT_DIR), reverse=True):
        path = store.join(SNAPSHOT_DIR, name)
        try:
            meta = pq.read_schema(path, filesystem=store.fs).metadata or {}
            if meta.get(SNAPSHOT_FORMAT_KEY) == SNAPSHOT_FORMAT:
                t = pq.read_table(path, filesystem=store.fs, columns=columns or SNAP_SCHEMA.names)
                want = pa.schema([SNAP_SCHEMA.field(c) for c in columns or SNAP_SCHEMA.names])
                return t.select(want.names).cast(want), path
            t = pq.read_table(path, filesystem=store.fs)
            manifest = json.loads(meta[MANIFEST_KEY])  # format 1
            rows = t.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)
            versions = pa.table(
                {
                    "file": pa.array([f"{PAGES_DIR}/{n}" for n in manifest], pa.string()),
                    "pages_version": pa.array([v[0] for v in manifest.values()], pa.string()),
                    "ledger_version": pa.array([v[1] for v in manifest.values()], pa.string()),
                }
            )
            return _snapshot_parts(runs_from_rows(rows, with_config=True), versions), None
        except Exception as e:
            log.warning("ledger: skipping unreadable snapshot %s (%s: %s)", name, type(e).__name__, e)
    return SNAP_SCHEMA.empty_table(), None


def _snapshot_rows(store: Any, snap: pa.Table, path: str | None, unchanged: pa.Array) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The snapshot rows (with their runs) of the `unchanged` parts: read now from `path` when
    `snap` holds only the versions (the load reads the runs after the versions were compared)."""
    if len(unchanged) == 0:
        return SNAP_SCHEMA.empty_table()
    if path is not None and "doc_id" not in snap.column_names:
        snap = pq.read_table(path, filesystem=store.fs, columns=SNAP_RUNS)
    if len(unchanged) == snap.num_rows:  # the usual case: every covered part is as it was
        return snap
    return snap.filter(_is_in(snap.column("file"), unchanged))


def _snapshot_parts(runs: pa.Table, versions: pa.Table) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """SNAP_SCHEMA rows from all-configuration runs and the parts' versions (file,
    pages_version, ledger_version): one row per part that has both."""
    import numpy as np

    runs = runs.filter(pc.is_in(runs.column("file"), value_set=versions.column("file")))
    runs = runs.sort_by([("file", "ascending"), ("doc_id", "ascending"), ("page_index", "ascending")])
    n = runs.num_rows
    if n == 0:
        return SNAP_SCHEMA.empty_table()
    f = runs.column("file").combine_chunks()
    new = np.zeros(n, dtype=bool)
    new[0] = True
    new[1:] = pc.not_equal(f.slice(1), f.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    heads = np.flatnonzero(new)
    offsets = pa.array(np.append(heads, n), pa.int32())
    files = f.take(pa.array(heads))
    v = versions.take(pc.index_in(files, value_set=versions.column("file")))

    def lists(c: str, typ: Any) -> Any:
        return pa.ListArray.from_arrays(offsets, runs.column(c).combine_chunks().cast(typ))

    return pa.table(
        {
            "file": files,
            "pages_version": v.column("pages_version"),
            "ledger_version": v.column("ledger_version"),
            "doc_id": lists("doc_id", pa.string()),
            "page_index": lists("page_index", pa.int32()),
            "page_stop": lists("page_stop", pa.int32()),
            "config_hash": lists("config_hash", pa.string()),
            "status": lists("status", pa.string()),
        },
        schema=SNAP_SCHEMA,
    )


def _snapshot_runs(parts: pa.Table, config_hash: str | None = None) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The runs of SNAP_SCHEMA rows (of one configuration, or all with their config_hash)."""
    if parts.num_rows == 0:
        return runs_from_rows(LEDGER_SCHEMA.empty_table(), with_config=config_hash is None)
    cfgs = parts.column("config_hash").combine_chunks()
    parent = pc.list_parent_indices(cfgs)
    cols = {
        c: parts.column(c).combine_chunks().flatten() for c in ("doc_id", "page_index", "page_stop", "status")
    }
    flat_cfg = cfgs.flatten()
    t = pa.table(
        {**cols, "file": parts.column("file").combine_chunks().take(parent), "config_hash": flat_cfg}
    )
    if config_hash is None:
        return t.select([*RUNS_SCHEMA.names, "config_hash"])
    mine = pc.equal(flat_cfg, config_hash)
    if pc.all(mine).as_py():  # one configuration: no copy
        return t.select(RUNS_SCHEMA.names)
    return t.filter(mine).select(RUNS_SCHEMA.names)


def _unchanged(snap: pa.Table, pages: pa.Table, entries: pa.Table) -> pa.Array:  # pyright: ignore[reportUnknownParameterType]  # pa.Array untyped
    """Files (pages/…) of the parts whose pages and ledger files are exactly as the snapshot saw
    them (consistent then): each snapshot part is looked up in the two listings (`index_in`, one
    hash table per listing) and its versions compared; no join, no per-part Python object."""
    if snap.num_rows == 0 or pages.num_rows == 0:
        return pa.array([], pa.string())
    files = snap.column("file").combine_chunks()
    names = pc.utf8_slice_codeunits(files, len(PAGES_DIR) + 1)
    ok = None
    for listing, col in ((pages, "pages_version"), (entries, "ledger_version")):
        at = pc.index_in(names, value_set=listing.column("name"))
        now = pc.take(listing.column("version"), at)
        same = pc.fill_null(pc.equal(now, snap.column(col)), False)
        ok = same if ok is None else pc.and_(ok, same)
    return pc.filter(files, ok)


def _not_in(names: pa.Array, others: pa.Array) -> list[str]:  # pyright: ignore[reportUnknownParameterType]  # pa.Array untyped
    """The strings of `names` that are not in `others` (vectorised; the result is usually short)."""
    if len(names) == 0:
        return []
    mask = pc.invert(pc.is_in(names, value_set=others))
    return pc.filter(names, mask).to_pylist()


def _read_ledger_parts(store: Any, paths: list[str]) -> pa.Table:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """The ledger parts `paths` (rows, all configurations), read in threads."""
    if not paths:
        return LEDGER_SCHEMA.empty_table()
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        tables = list(pool.map(lambda p: pq.read_table(p, filesystem=store.fs, schema=LEDGER_SCHEMA), paths))  # pyright: ignore[reportUnknownLambdaType]
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


def _drop_temporaries(store: Any, temps: list[tuple[str, float | None]], before: float | None) -> int:
    """Remove the temporaries `temps` (path, mtime) last modified before `before`; all with None."""
    n = 0
    for p, t in temps:
        if before is None or (t is not None and t < before):
            try:
                store.fs.rm(p)
            except FileNotFoundError:
                continue
            n += 1
    return n


def _remove_temporaries(
    store: Any, before: float | None = None, scanned: dict[str, Any] | None = None
) -> int:
    """Remove leftover `.tmp-*` files (a crashed run's uncommitted writes). With `before` (the
    start of this run's lease), only those last modified earlier: a temporary written since is
    in flight and not ours to delete. One without a time is kept unless `before` is None.
    `scanned`: {sub: _scan result} already listed by the caller (not listed again)."""
    n = 0
    for sub in (PAGES_DIR, LEDGER_DIR, SOURCES_DIR, FAILURES_DIR, *SIDE_DIRS):
        got = (scanned or {}).get(sub) or _scan(store, sub)
        n += _drop_temporaries(store, got[1], before)
    return n


def _is_in(values: Any, keep: Any) -> Any:
    return pc.is_in(values, value_set=keep)


@dataclass
class Ledger:
    config_hash: str
    # this configuration's final rows as runs (RUNS_SCHEMA): see `runs_from_rows`
    runs: pa.Table = field(default_factory=RUNS_SCHEMA.empty_table)  # pyright: ignore[reportUnknownVariableType]
    source_pairs: pa.Table = field(  # pyright: ignore[reportUnknownVariableType]
        default_factory=SOURCES_SCHEMA.empty_table  # every (doc_id, source_uri) ever recorded
    )
    failures: dict[str, list[str]] = field(default_factory=dict)  # doc_id -> reasons, one per failed run
    reconciled: int = 0  # orphan pages parts indexed on load
    dropped: int = 0  # ledger parts without their pages part
    from_snapshot: int = 0  # parts taken from the ledger snapshot (not read one by one)

    # Python views of the keys: for tests and small roots only (the driver uses `runs`)
    @property
    def status(self) -> dict[Key, str]:
        return {(d, i): s for d, i, s, _ in expand_runs(self.runs)}

    @property
    def files(self) -> dict[Key, str]:
        return {(d, i): f for d, i, _, f in expand_runs(self.runs)}

    @property
    def done(self) -> set[Key]:
        return {(d, i) for d, i, _, _ in expand_runs(self.runs)}

    @property
    def sources(self) -> set[tuple[str, str]]:
        t = self.source_pairs
        return set(zip(t.column("doc_id").to_pylist(), t.column("source_uri").to_pylist()))

    @property
    def rows(self) -> int:
        """How many rows of this configuration are final."""
        import numpy as np

        r = self.runs
        return int(np.sum(r.column("page_stop").to_numpy() - r.column("page_index").to_numpy()))

    def counts(self, keys: set[Key]) -> Counter[str]:
        status = self.status
        return Counter(status[k] for k in keys if k in status)

    @classmethod
    def load(
        cls, store: Any, config_hash: str, temporaries_before: float | None = None, read_only: bool = False
    ) -> Ledger:
        """Reconcile the output root, then read this configuration's committed keys.
        `temporaries_before`: remove only temporaries older than this (the run lease's start).
        `read_only` (dry runs): the same keys, with nothing written or removed (orphan parts are
        indexed in memory, stale entries skipped, temporaries left alone).
        The listings stay in Arrow; the snapshot covers the parts it saw unchanged, and only the
        parts not in it have their footers (row counts) and ledger parts read, in threads."""
        if not read_only:
            from pipeline.compact import recover

            recover(store)  # finish an interrupted compaction swap (pipeline/compact.py)
        scanned = _part_scans(store)
        if not read_only:
            _remove_temporaries(store, temporaries_before, scanned)
        pages, entries = scanned[PAGES_DIR][0], scanned[LEDGER_DIR][0]
        page_names, entry_names = (
            pages.column("name").combine_chunks(),
            entries.column("name").combine_chunks(),
        )
        snap, snap_path = _read_snapshot(store, SNAP_VERSIONS)  # the runs are read below
        unchanged = _unchanged(snap, pages, entries)  # no footer read for these
        led = cls(config_hash)
        stale = set(_not_in(entry_names, page_names))  # rows gone: they must be redone
        for name in sorted(stale):
            if not read_only:
                store.fs.rm(store.join(LEDGER_DIR, name))
            led.dropped += 1
        unchanged_names = pc.utf8_slice_codeunits(unchanged, len(PAGES_DIR) + 1)
        todo = _not_in(page_names, unchanged_names)
        has_entry = set(pc.filter(entry_names, _is_in(entry_names, pa.array(todo, pa.string()))).to_pylist())

        def rows(path: str | None) -> int:
            return -1 if path is None else int(pq.read_metadata(path, filesystem=store.fs).num_rows)

        def both(name: str) -> tuple[int, int]:
            entry = store.join(LEDGER_DIR, name) if name in has_entry else None
            return rows(store.join(PAGES_DIR, name)), rows(entry)

        # the footers are many small reads (two per part not in the snapshot): in threads
        with ThreadPoolExecutor(max_workers=_THREADS) as pool:
            counts = list(pool.map(both, todo))
        reindexed: list[pa.Table] = []
        to_read = [n for n in todo if n in has_entry]
        for name, (n_pages, n_entry) in zip(todo, counts):  # crash between the two commits
            if n_entry == n_pages:
                continue
            table = pq.read_table(
                store.join(PAGES_DIR, name),
                filesystem=store.fs,
                columns=["doc_id", "page_index", "config_hash", "status"],
            )
            if read_only:
                reindexed.append(ledger_table(table, f"{PAGES_DIR}/{name}"))
                if name in has_entry:
                    to_read.remove(name)
            else:
                commit_entry(store, table, f"{PAGES_DIR}/{name}")
                if name not in has_entry:
                    to_read.append(name)
            led.reconciled += 1
        for sub in () if read_only else SIDE_DIRS:  # side outputs of a batch whose pages part never committed
            side = _scan(store, sub)[0].column("name").combine_chunks()
            for name in _not_in(side, page_names):
                store.fs.rm(store.join(sub, name))
        parts = _read_ledger_parts(store, [store.join(LEDGER_DIR, n) for n in sorted(to_read)])
        if reindexed:
            parts = pa.concat_tables([parts, *reindexed])
        parts = parts.filter(pc.equal(parts.column("config_hash"), config_hash))
        keep = _snapshot_rows(store, snap, snap_path, unchanged)
        del snap
        fresh = runs_from_rows(parts)
        led.runs = pa.concat_tables([_snapshot_runs(keep, config_hash), fresh])
        del keep
        pa.default_memory_pool().release_unused()  # the snapshot's buffers: back to the OS
        led.from_snapshot = len(unchanged)
        # duplicate check (cannot happen through this code) over the documents of the parts read
        # one by one: sorting the whole ledger for it was a third of the load (profile, 100k
        # parts); a duplicate between two parts that are both in the snapshot is not re-checked
        near = led.runs.filter(_is_in(led.runs.column("doc_id"), pc.unique(fresh.column("doc_id"))))
        dup = _first_overlap(near)
        if dup is not None:  # cannot happen through this code; never hide it
            log.warning("ledger: duplicate row %s in %s", dup[0], " and ".join(dup[1]))
        if _names(store, FAILURES_DIR):
            fail = store.read_table(FAILURES_DIR)
            for d, c, r in zip(*(fail.column(n).to_pylist() for n in ("doc_id", "config_hash", "reason"))):
                if c == config_hash:
                    led.failures.setdefault(d, []).append(r)
        if _names(store, SOURCES_DIR):
            led.source_pairs = store.read_table(SOURCES_DIR).select(SOURCES_SCHEMA.names).cast(SOURCES_SCHEMA)
        if led.reconciled or led.dropped:
            log.info(
                "ledger: indexed %d orphan part(s), dropped %d stale entr(ies)", led.reconciled, led.dropped
            )
        return led

    @staticmethod
    def write_snapshot(store: Any) -> str | None:
        """End of a run: one consolidated Parquet file of the whole ledger (all configurations):
        one row per covered part with the versions of its pages and ledger files and its runs,
        so the next `load` reads it plus only the parts written or rewritten since. Parts not
        consistent now (a pages part without its ledger part) are left out: `load` reconciles
        them as before. Keeps the previous one; writes nothing when no part changed (a no-op
        rerun touches no file)."""
        scanned = _part_scans(store)
        pages, entries = scanned[PAGES_DIR][0], scanned[LEDGER_DIR][0]
        snap, _ = _read_snapshot(store)
        unchanged = _unchanged(snap, pages, entries)
        unchanged_names = pc.utf8_slice_codeunits(unchanged, len(PAGES_DIR) + 1)
        both = pages.rename_columns(["name", "pv"]).join(
            entries.rename_columns(["name", "lv"]), "name", join_type="inner"
        )
        both = both.filter(pc.invert(_is_in(both.column("name"), unchanged_names)))
        both = both.filter(pc.is_valid(both.column("pv"))).sort_by("name")
        fresh = both.column("name").to_pylist()

        def consistent(name: str) -> bool:
            n_pages = pq.read_metadata(store.join(PAGES_DIR, name), filesystem=store.fs).num_rows
            return n_pages == pq.read_metadata(store.join(LEDGER_DIR, name), filesystem=store.fs).num_rows

        with ThreadPoolExecutor(max_workers=_THREADS) as pool:
            ok = [n for n, good in zip(fresh, pool.map(consistent, fresh)) if good]
        if not ok and len(unchanged) == snap.num_rows:  # nothing committed, rewritten or removed since
            return None
        keep = _snapshot_rows(store, snap, None, unchanged)
        fresh_rows = _read_ledger_parts(store, [store.join(LEDGER_DIR, n) for n in ok])
        okt = both.filter(_is_in(both.column("name"), pa.array(ok, pa.string())))
        versions = pa.table(
            {
                "file": pc.binary_join_element_wise(f"{PAGES_DIR}/", okt.column("name"), ""),
                "pages_version": okt.column("pv"),
                "ledger_version": okt.column("lv"),
            }
        )
        # a ledger part's `file` column names its pages part; the versions are keyed by that name
        fresh_parts = _snapshot_parts(runs_from_rows(fresh_rows, with_config=True), versions)
        table = pa.concat_tables([keep, fresh_parts]).sort_by("file")
        return write_snapshot_table(store, table)

    def forget(self, store: Any, keys: set[Key] | pa.Table) -> int:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
        """`force`: take `keys` (a key set, or runs such as `Plan.done`) out of the committed
        outputs so they are redone exactly once.

        Each part holding some of them is rewritten without them (pages first, then its ledger
        part: a crash in between is caught by `load`'s row-count check) or removed when empty.
        Rows of other documents in the same part are kept."""
        if isinstance(keys, set):
            docs = pa.array(sorted({d for d, _ in keys}), pa.string())
            mine = self.runs.filter(_is_in(self.runs.column("doc_id"), docs))
            hit = [(d, i, s, f) for d, i, s, f in expand_runs(mine) if (d, i) in keys]
            drop_rows = pa.table(
                {
                    "doc_id": pa.array([h[0] for h in hit], pa.string()),
                    "page_index": pa.array([h[1] for h in hit], pa.int32()),
                    "status": pa.array([h[2] for h in hit], pa.string()),
                    "file": pa.array([h[3] for h in hit], pa.string()),
                }
            )
            drop = runs_from_rows(drop_rows)
        else:
            drop = keys
        if drop.num_rows == 0:
            return 0
        by_file: dict[str, set[Key]] = {}
        for d, i, _, f in expand_runs(drop):
            by_file.setdefault(f, set()).add((d, i))
        kept_runs: list[pa.Table] = []
        for file, gone in sorted(by_file.items()):
            name = file.rsplit("/", 1)[-1]
            for sub in (PAGES_DIR, *SIDE_DIRS, LEDGER_DIR):
                path = store.join(sub, name)
                if not store.fs.exists(path):
                    continue
                t = pq.read_table(path, filesystem=store.fs)
                keep = [
                    (d, int(p)) not in gone
                    for d, p in zip(t.column("doc_id").to_pylist(), t.column("page_index").to_pylist())
                ]
                if not any(keep):
                    store.fs.rm(path)
                else:
                    store.write_parquet(sub, t.filter(pa.array(keep)), name=name)
                    if sub == LEDGER_DIR:
                        left = t.filter(pa.array(keep)).cast(LEDGER_SCHEMA)
                        left = left.filter(pc.equal(left.column("config_hash"), self.config_hash))
                        kept_runs.append(runs_from_rows(left))
        touched = pa.array(sorted(by_file), pa.string())
        others = self.runs.filter(pc.invert(_is_in(self.runs.column("file"), touched)))
        self.runs = pa.concat_tables([others, *kept_runs])
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

    def record_sources(self, store: Any, pairs: set[tuple[str, str]] | pa.Table) -> int:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
        """Append the (doc_id, source_uri) pairs not seen before; returns how many were new.
        `pairs`: a set, or a table (doc_id, source_uri) such as `Plan.source_pairs`."""
        given: Any = pairs
        if not isinstance(given, pa.Table):
            ps = sorted(cast(set[tuple[str, str]], pairs))
            given = pa.table(
                {"doc_id": [d for d, _ in ps], "source_uri": [u for _, u in ps]}, schema=SOURCES_SCHEMA
            )
        if given.num_rows == 0:
            return 0
        new = (
            given.select(SOURCES_SCHEMA.names)
            .cast(SOURCES_SCHEMA)
            .group_by(SOURCES_SCHEMA.names)
            .aggregate([])
            .join(self.source_pairs, SOURCES_SCHEMA.names, join_type="left anti")
            .sort_by([("doc_id", "ascending"), ("source_uri", "ascending")])
            .select(SOURCES_SCHEMA.names)
        )
        if new.num_rows:
            blob = "\n".join(
                f"{d}\t{u}"
                for d, u in zip(new.column("doc_id").to_pylist(), new.column("source_uri").to_pylist())
            ).encode()
            name = f"part-{hashlib.sha256(blob).hexdigest()[:20]}.parquet"
            new = pa.table(
                {c: new.column(c).combine_chunks() for c in SOURCES_SCHEMA.names}, schema=SOURCES_SCHEMA
            )
            store.write_parquet(SOURCES_DIR, new, name=name)
            self.source_pairs = pa.concat_tables([self.source_pairs, new])
        return new.num_rows


def write_snapshot_table(store: Any, table: pa.Table) -> str:  # pyright: ignore[reportUnknownParameterType]  # pa.Table untyped
    """Write SNAP_SCHEMA rows as the newest snapshot (format 2); the newest previous one stays, in
    case this one is unreadable, older ones are removed. (A format-1 reader finds no manifest in
    it and skips it: it then reads the parts one by one, never a wrong key set.)"""
    table = table.cast(SNAP_SCHEMA).replace_schema_metadata({SNAPSHOT_FORMAT_KEY: SNAPSHOT_FORMAT})
    older = sorted(_names(store, SNAPSHOT_DIR).values())
    written = store.write_parquet(
        SNAPSHOT_DIR, table, name=f"snap-{time.time_ns():020d}.parquet", row_group_rows=1 << 16
    )
    for path in older[:-1]:
        store.fs.rm(path)
    return written
