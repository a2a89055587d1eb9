# pyarrow ships no type stubs: its members, values and arguments are Unknown to pyright.
# pyright: reportUnknownMemberType=false, reportUnknownVariableType=false, reportUnknownArgumentType=false
"""Dated snapshots over the incremental store (the nightly "dated" layout).

A dated night runs the incremental build into one store (`jobs/nightly.sh`: `<output.uri>/_store/`,
where the ledger, lease and stat cache live) and then, with `output.snapshot_uri` set
(`<output.uri>/<YYYY-MM-DD>/`), writes a self-contained output root holding exactly that night's
input under this configuration: `pages/`, `figures/`, `documents/`, `_summary.json`. So a night
OCRs only what is new or changed, and every tool (report, inspect, documents, export, publish, a
bare `pyarrow.dataset`) reads a dated snapshot as it reads any output.

What it writes (`write_snapshot`): the store's parts that hold the night's rows, each
- hard-linked on POSIX (no bytes copied; a later rewrite or compaction of the store replaces or
  removes the store's name, never the linked file), or server-side copied on object stores
  (CopyObject: nothing downloaded), when the part holds only rows of the night's documents;
- rewritten with only those rows when it also holds other documents' rows (documents removed from
  the input since, or of another configuration);
and the store's `documents/` parts of this configuration the same way. Parts of an earlier
snapshot of the same day that are no longer wanted are removed; a part it already has under the
same name and size is kept. `_snapshot.json` (what came from where) and `_summary.json` (the
run's) are written last: a dated directory with `_summary.json` is complete. It is written while
the run still holds the store's lease, so no compaction or other run changes the store meanwhile;
a crash before it is done leaves an incomplete directory that the rerun of that night (no OCR:
the ledger has the rows) completes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.arrow import pc
from pipeline.outputs import OutputStore

log = logging.getLogger("pagemill")

SNAPSHOT_FILE = "_snapshot.json"


def _same_fs(src: OutputStore, dest: OutputStore) -> bool:
    return src.posix == dest.posix and type(src.fs) is type(dest.fs)


def _place(
    src: OutputStore, dest: OutputStore, sub: str, name: str, id_col: str, keep: set[str], config_hash: str
) -> str:
    """Put the part `sub/name` of `src` into `dest` with only rows of `keep` documents under
    `config_hash`: "linked", "copied", "filtered", "kept" (already there), "empty" or "missing"."""
    path, target = src.join(sub, name), dest.join(sub, name)
    try:
        t = pq.read_table(path, columns=[id_col, "config_hash"], filesystem=src.fs)
    except FileNotFoundError:
        return "missing"
    mask = pc.and_(  # generated
        pc.is_in(t.column(id_col), value_set=pa.array(sorted(keep), pa.string())),
        pc.equal(t.column("config_hash"), config_hash),
    )
    wanted = int(pc.sum(mask).as_py() or 0)
    if wanted == 0:
        return "empty"
    if wanted == t.num_rows:
        if not src.posix and dest.fs.exists(target):
            a, b = src.fs.info(path), dest.fs.info(target)
            etag = a.get("ETag") or a.get("etag")
            if etag and a.get("size") == b.get("size") and etag == (b.get("ETag") or b.get("etag")):
                return "kept"  # the same night's earlier snapshot: the same object
        if src.posix and dest.posix:
            if os.path.exists(target) and os.path.samefile(path, target):
                return "kept"  # linked by the same night's earlier snapshot
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{os.path.dirname(target)}/.tmp-link-{os.getpid()}-{name}"
            try:
                os.link(path, tmp)
                os.replace(tmp, target)  # atomic, like every other write
                return "linked"
            except OSError:  # another device: copy
                if os.path.exists(tmp):
                    os.unlink(tmp)
        if _same_fs(src, dest) and not src.posix:
            src.fs.copy(path, target)  # server-side copy, a single PUT-like commit of the object
            return "copied"
        dest.write_bytes(f"{sub}/{name}", src.fs.cat_file(path))
        return "copied"
    full = pq.read_table(path, filesystem=src.fs)
    dest.write_parquet(sub, full.filter(mask), name=name)
    return "filtered"


def _documents_parts(store: OutputStore, config_hash: str) -> list[str]:
    path = store.join("documents")
    store.fs.invalidate_cache(path)
    if not store.fs.exists(path):
        return []
    names = (str(p).rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False))
    return sorted(n for n in names if n.startswith(f"part-{config_hash}-") and n.endswith(".parquet"))


def _prune(dest: OutputStore, sub: str, keep: Iterable[str]) -> int:
    """Remove `dest`'s parts under `sub` that this snapshot does not hold (an earlier snapshot of
    the same day, before the input changed)."""
    path = dest.join(sub)
    dest.fs.invalidate_cache(path)
    if not dest.fs.exists(path):
        return 0
    wanted = set(keep)
    n = 0
    for p in dest.fs.ls(path, detail=False):
        name = str(p).rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith(".") and name not in wanted:
            dest.fs.rm(str(p))
            n += 1
    return n


def write_snapshot(
    store: OutputStore,
    uri: str,
    storage_options: dict[str, Any] | None,
    config_hash: str,
    doc_ids: set[str],
    files: set[str],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Write the dated snapshot of `doc_ids` (the night's input) at `uri` from the store's parts
    `files` (relative paths under pages/ holding their rows) and its documents/ (see the module
    docstring); returns what `_snapshot.json` records."""
    dest = OutputStore(uri, storage_options)
    for rel in ("_summary.json", SNAPSHOT_FILE):  # incomplete until these are written again
        if dest.fs.exists(dest.join(rel)):
            dest.fs.rm(dest.join(rel))
    names = sorted({f.rsplit("/", 1)[-1] for f in files})
    docs = _documents_parts(store, config_hash)
    jobs = [(sub, n, "doc_id") for sub in ("pages", "figures") for n in names]
    jobs += [("documents", n, "id") for n in docs]
    with ThreadPoolExecutor(max_workers=16) as pool:
        how = list(pool.map(lambda j: _place(store, dest, j[0], j[1], j[2], doc_ids, config_hash), jobs))
    held: dict[str, list[str]] = {"pages": [], "figures": [], "documents": []}
    counts: dict[str, int] = {}
    for (sub, name, _), h in zip(jobs, how):
        if h == "missing":  # a pages part without figures
            continue
        counts[h] = counts.get(h, 0) + 1
        if h != "empty":
            held[sub].append(name)
    removed = sum(_prune(dest, sub, held[sub]) for sub in held)
    record = {
        "store": store.root,
        "config_hash": config_hash,
        "run_id": summary.get("run_id"),
        "documents": len(doc_ids),
        "parts": {sub: len(v) for sub, v in held.items()},
        "placed": dict(sorted(counts.items())),
        "removed": removed,
    }
    dest.write_json(SNAPSHOT_FILE, record)
    dest.write_json("_summary.json", {**summary, "output_uri": dest.root, "snapshot_of": store.root})
    log.info(
        "dated snapshot: %d documents, %d pages parts -> %s (%s)",
        len(doc_ids),
        len(held["pages"]),
        dest.root,
        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    )
    return record
