# pyarrow ships no type stubs: its members, values and arguments are Unknown to pyright.
# pyright: reportUnknownMemberType=false, reportUnknownVariableType=false, reportUnknownArgumentType=false
"""Compaction: merge small committed `pages/` parts behind a manifest swap.

    python -m pipeline.compact OUTPUT [--storage-options JSON] [--target-mb 256] [--small-mb 64]
                               [--config-hash H] [--grace-s 0] [--lease-timeout-s 600] [--dry-run]

A nightly writes one part per writer batch, so a corpus grows by many small parts. This command
packs the parts smaller than `--small-mb` into merged parts of at most ~`--target-mb` (file bytes),
never mixing configurations (a group holds parts of one `config_hash`). Each merged part gets its
figures part and its ledger entry under the same name, as the writer's parts do.

Why every reader sees each row exactly once, before, during and after, and a crash loses nothing:
- It holds the run lease (pipeline/lease.py) for the whole time: no nightly runs beside it (a held
  lease: exit code 6, as for `pipeline.run`).
- Each swap has a record `_compact/c-*.json` listing its groups {merged part: [old parts]}. It is
  written `pending` BEFORE any merged part; the merged parts are then written under their final,
  deterministic names (`part_name` of the group's old names: PUT on object stores, temporary +
  rename on POSIX, as the writer does); then the record is rewritten `committed` in one atomic
  write: that is the swap. Only then are the old parts (pages, figures, ledger entry) deleted and,
  last, the record.
- Readers (`live_paths`: the ledger, documents, report, inspect, export, publish, dry runs) hide
  the merged parts of a pending record and the old parts of a committed one, so they see either
  the old parts or the merged ones, never both and never neither.
- A crash leaves a record. `recover` (run by the next `compact` and by every nightly start, both
  under the lease) rolls a pending record back (its merged parts are removed) and a committed one
  forward (its old parts are removed). Merged parts hold exactly the old parts' rows, so the
  ledger's keys are the same either way: a resumed nightly redoes nothing and loses nothing.
- `--grace-s N` keeps the old parts for N seconds after the swap (for readers that listed files
  before it); they are removed by the first `compact` or nightly start after that. A reader that
  lists `pages/` itself instead of going through `live_paths` (a bare `pyarrow.dataset`) sees the
  old parts twice in that window: with the default 0 it lasts only until the deletes are done.

Exit codes: 0 done (or nothing to merge), 2 bad arguments, 6 the lease is held by another run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from pipeline.outputs import MB, OutputStore, part_name

log = logging.getLogger("pagemill")

COMPACT_DIR = "_compact"
PENDING, COMMITTED = "pending", "committed"
DATA_DIRS = ("pages", "figures")  # a merged part's side outputs share its name (ledger.SIDE_DIRS)
FAULT_ENV = "PAGEMILL_TEST_COMPACT_FAULT"  # tests: die at "merged", "committed" or "deleted"
EXIT_OK, EXIT_ARGS, EXIT_LEASE = 0, 2, 6


def _fault(where: str) -> None:
    """Tests only (pipeline/faults.py style): a real process death at step `where`."""
    import os

    if os.environ.get(FAULT_ENV) == where:
        log.error("compact: test fault at %s", where)
        os._exit(9)


# ----------------------------------------------------------------------------- records


def _records(store: OutputStore) -> list[tuple[str, dict[str, Any]]]:
    """(path, record) of every swap record, oldest first; an unreadable one is ignored (a record
    is written atomically, so that is not one of ours)."""
    root = store.join(COMPACT_DIR)
    store.fs.invalidate_cache(root)
    try:
        paths = sorted(str(p) for p in store.fs.ls(root, detail=False))
    except FileNotFoundError:
        return []
    out: list[tuple[str, dict[str, Any]]] = []
    for p in paths:
        name = p.rsplit("/", 1)[-1]
        if not (name.startswith("c-") and name.endswith(".json")):
            continue
        try:
            out.append((p, json.loads(store.fs.cat_file(p))))
        except FileNotFoundError:
            continue
        except ValueError as e:
            log.warning("compact: ignoring unreadable record %s (%s)", name, e)
    return out


def hidden_parts(store: OutputStore) -> set[str]:
    """File names (under pages/, figures/, _ledger/) that readers must not see: the merged parts
    of pending swaps and the old parts of committed ones. Empty without `_compact/` records."""
    hidden: set[str] = set()
    for _, rec in _records(store):
        groups: dict[str, list[str]] = rec.get("groups", {})
        if rec.get("state") == COMMITTED:
            hidden.update(n for olds in groups.values() for n in olds)
        else:
            hidden.update(groups)
    return hidden


def live_paths(store: OutputStore, sub: str, hidden: set[str] | None = None) -> list[str]:
    """Full paths of the committed Parquet parts under `sub` that readers see (see `hidden_parts`),
    sorted; [] when `sub` does not exist."""
    root = store.join(sub)
    store.fs.invalidate_cache(root)
    if not store.fs.exists(root):
        return []
    hidden = hidden_parts(store) if hidden is None else hidden
    out = []
    for p in store.fs.find(root, detail=False):  # pyright: ignore[reportArgumentType]  # fsspec untyped
        p = str(p)
        rel = p[len(root) :].lstrip("/")
        if any(s.startswith((".", "_")) for s in rel.split("/")) or not p.endswith(".parquet"):
            continue  # temporaries and metadata files: pyarrow.dataset skips them too
        if rel.rsplit("/", 1)[-1] not in hidden:
            out.append(p)
    return sorted(out)


def live_dataset(store: OutputStore, sub: str, schema: Any = None) -> pds.Dataset | None:
    """`sub` (pages/, figures/) as a pyarrow dataset of its live parts; None when it has none or
    does not exist. Without swap records this is the plain directory dataset."""
    root = store.join(sub)
    if not store.fs.exists(root):
        return None
    hidden = hidden_parts(store)
    if not hidden:
        return pds.dataset(root, filesystem=store.fs, format="parquet", schema=schema)
    paths = live_paths(store, sub, hidden)
    return pds.dataset(paths, filesystem=store.fs, format="parquet", schema=schema) if paths else None


def _rm(store: OutputStore, names: Iterable[str]) -> int:
    """Remove the parts `names` from pages/ and its side dirs, then their ledger entries (a crash
    in between leaves ledger entries without pages: `Ledger.load` drops those)."""
    from pipeline.ledger import LEDGER_DIR

    n = 0
    for name in sorted(names):
        for sub in (*DATA_DIRS, LEDGER_DIR):
            try:
                store.fs.rm(store.join(sub, name))
                n += sub == "pages"
            except FileNotFoundError:
                pass
            if sub == "pages":
                _fault("deleted")
    return n


def recover(store: OutputStore, grace: bool = False) -> int:
    """Finish what crashed or deferred swaps left (call under the lease): a pending record is
    rolled back (its merged parts removed), a committed one forward (its old parts removed; with
    `grace`, only once the record's `grace_s` has passed since the swap). Returns records done."""
    done = 0
    for path, rec in _records(store):
        groups: dict[str, list[str]] = rec.get("groups", {})
        if rec.get("state") == COMMITTED:
            if grace and time.time() - float(rec.get("committed_at", 0)) < float(rec.get("grace_s", 0)):
                continue
            _rm(store, (n for olds in groups.values() for n in olds))
        else:
            log.warning("compact: rolling back the interrupted swap %s", path.rsplit("/", 1)[-1])
            _rm(store, groups)
        store.fs.rm(path)
        done += 1
    return done


# ----------------------------------------------------------------------------- planning


@dataclass
class Candidate:
    name: str
    size: int
    config_hash: str


@dataclass
class Plan:
    groups: list[list[Candidate]] = field(default_factory=list)
    parts: int = 0  # live pages parts
    small: int = 0  # of them smaller than --small-mb
    mixed: int = 0  # small parts holding several configurations (never merged)


def plan_groups(
    store: OutputStore, target_bytes: int, small_bytes: int, config_hash: str | None = None
) -> Plan:
    """Groups of >= 2 small live parts of one configuration, each summing to <= target_bytes."""
    from pipeline.ledger import LEDGER_DIR

    hidden = hidden_parts(store)
    root = store.join("pages")
    store.fs.invalidate_cache(root)
    plan = Plan()
    if not store.fs.exists(root):
        return plan
    sizes: dict[str, int] = {}
    for info in store.fs.ls(root, detail=True):
        name = str(info["name"]).rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith((".", "_")) and name not in hidden:
            sizes[name] = int(info.get("size") or 0)
    plan.parts = len(sizes)
    small = sorted(n for n, s in sizes.items() if s < small_bytes)
    plan.small = len(small)

    def hashes(name: str) -> list[str]:  # the ledger entry's config_hash column (a small file)
        path = store.join(LEDGER_DIR, name)
        try:  # a part without its entry (a crash between the two commits) waits for a nightly
            t = pq.read_table(path, columns=["config_hash"], filesystem=store.fs)
        except FileNotFoundError:
            return []
        return sorted(set(t.column("config_hash").to_pylist()))

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(hashes, small))
    by_hash: dict[str, list[Candidate]] = {}
    for name, hs in zip(small, found):
        if len(hs) != 1:
            plan.mixed += len(hs) > 1
            continue
        if config_hash is None or hs[0] == config_hash:
            by_hash.setdefault(hs[0], []).append(Candidate(name, sizes[name], hs[0]))
    for _, cands in sorted(by_hash.items()):
        group: list[Candidate] = []
        acc = 0
        for c in cands:
            if group and acc + c.size > target_bytes:
                if len(group) > 1:
                    plan.groups.append(group)
                group, acc = [], 0
            group.append(c)
            acc += c.size
        if len(group) > 1:
            plan.groups.append(group)
    return plan


def merged_name(olds: list[str]) -> str:
    """The merged part's deterministic name: from the group's old part names (a rerun of the same
    group after a rollback writes the same name)."""
    return part_name(pa.table({}), key="compact\n" + "\n".join(sorted(olds)))


# ----------------------------------------------------------------------------- merging


def _merge(store: OutputStore, sub: str, olds: list[str]) -> pa.Table | None:
    paths = [store.join(sub, n) for n in olds if store.fs.exists(store.join(sub, n))]
    if not paths:
        return None
    tables = [pq.read_table(p, filesystem=store.fs) for p in paths]
    return pa.concat_tables(tables, promote_options="default")


def merge_group(
    store: OutputStore, olds: list[str], name: str, row_group_mb: float, row_group_rows: int
) -> int:
    """Write the merged part `name` of `olds` (figures, pages, then its ledger entry: the writer's
    order); returns its rows. Rows are sorted by (doc_id, page_index); a key seen twice aborts."""
    from pipeline.arrow import pc
    from pipeline.ledger import commit_entry

    pages = _merge(store, "pages", olds)
    assert pages is not None, f"compact: parts of group {name} vanished under the lease"
    order = pc.sort_indices(
        pages, sort_keys=[("doc_id", "ascending"), ("page_index", "ascending")]
    )  # generated
    pages = pages.take(order)
    keys = list(zip(pages.column("doc_id").to_pylist(), pages.column("page_index").to_pylist()))
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"compact: parts {olds} hold a row twice; not merging them")
    rg_bytes = int(row_group_mb * MB)
    for sub in DATA_DIRS[1:]:  # side outputs first: a committed page never lacks its figures
        side = _merge(store, sub, olds)
        if side is not None and side.num_rows:
            store.write_parquet(sub, side, name=name, row_group_bytes=rg_bytes, row_group_rows=row_group_rows)
    file = store.write_parquet(
        "pages", pages, name=name, row_group_bytes=rg_bytes, row_group_rows=row_group_rows
    )
    commit_entry(store, pages, file)
    return pages.num_rows


def compact(
    store: OutputStore,
    *,
    target_mb: float = 256.0,
    small_mb: float | None = None,
    config_hash: str | None = None,
    grace_s: float = 0.0,
    lease_timeout_s: float = 600.0,
    groups_per_swap: int = 64,
    row_group_mb: float = 32.0,
    row_group_rows: int = 1000,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Compact `store` (see the module docstring); returns a summary. Raises LeaseHeld."""
    from pipeline.lease import Lease
    from pipeline.ledger import Ledger

    t0 = time.time()
    run_id = "compact-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t0))
    small_bytes = int((target_mb / 4 if small_mb is None else small_mb) * MB)
    lease = Lease(store, run_id, lease_timeout_s).acquire()
    try:
        recovered = 0 if dry_run else recover(store, grace=True)
        plan = plan_groups(store, int(target_mb * MB), small_bytes, config_hash)
        merged_rows = merged_parts = 0
        swaps = 0
        for i in range(0, 0 if dry_run else len(plan.groups), groups_per_swap):
            batch = plan.groups[i : i + groups_per_swap]
            groups = {merged_name([c.name for c in g]): sorted(c.name for c in g) for g in batch}
            record = {"state": PENDING, "run_id": run_id, "groups": groups, "grace_s": grace_s}
            rel = f"{COMPACT_DIR}/c-{time.time_ns():020d}.json"
            store.write_json(rel, record)  # before any merged part: a crash from here rolls back
            for name, olds in groups.items():
                lease.check()
                merged_rows += merge_group(store, olds, name, row_group_mb, row_group_rows)
                merged_parts += 1
                _fault("merged")
            lease.check()
            store.write_json(rel, {**record, "state": COMMITTED, "committed_at": time.time()})  # the swap
            swaps += 1
            _fault("committed")
            if grace_s <= 0:
                _rm(store, (n for olds in groups.values() for n in olds))
                store.fs.rm(store.join(rel))
        if swaps:
            Ledger.write_snapshot(store)
        lease.check()
    finally:
        lease.release()
    return {
        "output_uri": store.root,
        "dry_run": dry_run,
        "parts_before": plan.parts,
        "small_parts": plan.small,
        "mixed_parts_skipped": plan.mixed,
        "groups": len(plan.groups),
        "parts_merged": sum(len(g) for g in plan.groups) if not dry_run else 0,
        "merged_parts_written": merged_parts,
        "rows_merged": merged_rows,
        "swaps": swaps,
        "records_recovered": recovered,
        "grace_s": grace_s,
        "wall_time_s": round(time.time() - t0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None
    p = argparse.ArgumentParser(prog="python -m pipeline.compact", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the build's output.uri (any fsspec URI)")
    p.add_argument("--storage-options", default=None, help="fsspec storage options of OUTPUT, a JSON object")
    p.add_argument("--target-mb", type=float, default=256.0, help="merged parts up to ~this many MB")
    p.add_argument("--small-mb", type=float, default=None, help="merge parts below this (default target/4)")
    p.add_argument("--config-hash", default=None, help="only this configuration's parts (default: all)")
    p.add_argument("--grace-s", type=float, default=0.0, help="keep old parts this long after the swap")
    p.add_argument("--lease-timeout-s", type=float, default=600.0, help="as output.lease_timeout_s")
    p.add_argument("--dry-run", action="store_true", help="report the groups, write nothing")
    a = p.parse_args(argv)
    try:
        so = json.loads(a.storage_options) if a.storage_options else {}
        if not isinstance(so, dict):
            raise ValueError("not an object")
    except ValueError as e:
        p.error(f"--storage-options must be a JSON object ({e})")  # exit 2
    if a.target_mb <= 0 or (a.small_mb is not None and a.small_mb <= 0) or a.grace_s < 0:
        p.error("--target-mb and --small-mb must be > 0, --grace-s >= 0")
    from pipeline import redact
    from pipeline.lease import LeaseHeld, LeaseLost

    redact.register_values([str(v) for v in so.values()])
    redact.install_log_filter()
    store = OutputStore(a.output, so)
    try:
        summary = compact(
            store,
            target_mb=a.target_mb,
            small_mb=a.small_mb,
            config_hash=a.config_hash,
            grace_s=a.grace_s,
            lease_timeout_s=a.lease_timeout_s,
            dry_run=a.dry_run,
        )
    except (LeaseHeld, LeaseLost) as e:
        print(f"pagemill compact: {redact.scrub(str(e))}", file=sys.stderr)
        return EXIT_LEASE
    print(json.dumps(summary, sort_keys=True))
    return EXIT_OK


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(main())
