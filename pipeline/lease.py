"""The run lease: one run at a time per output root, on local disk and on object stores.

Why generations: a lease is a file `_lease/gen-<N>.json`; the holder is the run of the highest N.
Taking a lease means creating the next generation with an *exclusive* create, so of two runs
that race for the same free (or stale) lease exactly one wins, without ever overwriting another
run's file:
- POSIX: the record is written to a private temporary file, then hard-linked to its final name
  (`link` fails if the name exists; the file is complete when it appears; NFS-safe);
- s3: a PUT with `If-None-Match: *` (s3fs `mode="create"`; AWS S3, MinIO and moto honour it);
- other fsspec stores: fsspec's `mode="create"`, which may be a check-then-write. Every create
  is read back and its token compared, which catches a lost race unless both runs write and read
  back within the same instant (that window is the documented race on such stores).
The holder rewrites its own generation's heartbeat from a background thread every
`timeout_s / 6`; before each rewrite it checks that no higher generation exists, else it has
been taken over (`lost`). It is released at the end of the run (also on failure) by marking its
file `released`. A lease whose heartbeat is older than `timeout_s` (clocks of the hosts are
assumed to agree within a small part of it), or whose holder was on this host and its process is
gone (a `kill -9`: resume at once), can be taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("pagemill")

LEASE_DIR = "_lease"
_PREFIX = "gen-"


class LeaseHeld(RuntimeError):
    """Another run holds the output root's lease (its heartbeat is fresh)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (its heartbeat had gone stale)."""


@dataclass
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    pid_start: str  # the process's start time (Linux /proc), to tell a reused pid from the holder
    token: str
    started_at: float
    heartbeat_at: float
    timeout_s: float
    released: bool = False

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.heartbeat_at
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at))
        return (
            f"run {self.run_id} (host {self.host}, pid {self.pid}, started {started}, "
            f"last heartbeat {age:.0f} s ago)"
        )


def _proc_start(pid: int) -> str:
    """Start time of `pid` in clock ticks since boot ("" where /proc is not available)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return fields[19] if len(fields) > 19 else ""


def _pid_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # killed, not yet reaped
                return False
    except OSError:
        pass
    now = _proc_start(pid)
    return not (start and now and now != start)  # a different process under a reused pid


class Lease:
    """The lease of one output root (`store`: pipeline.outputs.OutputStore). `acquire` or raise
    LeaseHeld; `release` at the end; `check` raises LeaseLost once another run took it over."""

    def __init__(self, store: Any, run_id: str, timeout_s: float):
        self.store, self.run_id, self.timeout_s = store, run_id, float(timeout_s)
        self.dir = store.join(LEASE_DIR)
        self.record: LeaseRecord | None = None
        self.generation = 0
        self.replaced: LeaseRecord | None = None  # the stale lease this run took over
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ files

    def _path(self, gen: int) -> str:
        return f"{self.dir}/{_PREFIX}{gen:012d}.json"

    def _generations(self) -> list[int]:
        fs = self.store.fs
        fs.invalidate_cache(self.dir)
        try:
            names = fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for p in names:
            name = str(p).rsplit("/", 1)[-1]
            if name.startswith(_PREFIX) and name.endswith(".json"):
                try:
                    out.append(int(name[len(_PREFIX) : -len(".json")]))
                except ValueError:
                    continue
        return sorted(out)

    def _read(self, gen: int) -> LeaseRecord:
        path = self._path(gen)
        try:
            raw = json.loads(self.store.fs.cat_file(path))
            return LeaseRecord(**{k: raw[k] for k in LeaseRecord.__dataclass_fields__ if k in raw})
        except FileNotFoundError:
            raise
        except (ValueError, TypeError, KeyError):  # half-written on a store without atomic create
            try:
                seen = float(self.store.fs.modified(path).timestamp())
            except Exception:
                seen = time.time()
            return LeaseRecord("?", "?", -1, "", "", seen, seen, self.timeout_s)

    def _create(self, gen: int, blob: bytes) -> bool:
        """Create generation `gen` exclusively; False if it exists already."""
        path, fs = self._path(gen), self.store.fs
        if self.store.posix:
            os.makedirs(self.dir, exist_ok=True)
            tmp = f"{self.dir}/.lease-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            fs.pipe_file(path, blob, mode="create")
        except FileExistsError:
            return False
        return True

    def _write(self, record: LeaseRecord) -> None:
        """Rewrite this run's own generation (heartbeat, release): complete or not at all."""
        blob = json.dumps(asdict(record), sort_keys=True).encode()
        path = self._path(self.generation)
        if self.store.posix:
            tmp = f"{self.dir}/.lease-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        else:
            self.store.fs.pipe_file(path, blob)

    # ------------------------------------------------------------------ protocol

    def stale(self, rec: LeaseRecord, now: float) -> str:
        """Why `rec` may be taken over ("" = it may not)."""
        if rec.released:
            return "released"
        if now - rec.heartbeat_at > self.timeout_s:
            return f"heartbeat {now - rec.heartbeat_at:.0f} s old > output.lease_timeout_s={self.timeout_s:g}"
        if rec.host == socket.gethostname() and rec.pid > 0 and not _pid_alive(rec.pid, rec.pid_start):
            return f"its process {rec.pid} on this host is gone"
        return ""

    def acquire(self) -> Lease:
        """Take the lease or raise LeaseHeld naming the holder; starts the heartbeat thread."""
        for _ in range(3):  # a lost race re-reads the winner and reports it
            gens = self._generations()
            top = gens[-1] if gens else 0
            prev: LeaseRecord | None = None
            why = ""
            if top:
                try:
                    prev = self._read(top)
                except FileNotFoundError:
                    continue
                why = self.stale(prev, time.time())
                if not why:
                    raise LeaseHeld(
                        f"output root {self.store.root} is in use by {prev.describe()}; "
                        f"it can be taken over once its heartbeat is older than "
                        f"output.lease_timeout_s={self.timeout_s:g} s (or, on host {prev.host}, "
                        f"once process {prev.pid} is gone)"
                    )
            now = time.time()
            record = LeaseRecord(
                run_id=self.run_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                pid_start=_proc_start(os.getpid()),
                token=uuid.uuid4().hex,
                started_at=now,
                heartbeat_at=now,
                timeout_s=self.timeout_s,
            )
            if not self._create(top + 1, json.dumps(asdict(record), sort_keys=True).encode()):
                continue
            try:
                mine = self._read(top + 1).token == record.token
            except FileNotFoundError:
                mine = False
            if not mine:  # a store without atomic create let another run overwrite it
                continue
            self.generation, self.record, self.replaced = top + 1, record, prev
            if prev is not None and not prev.released:
                log.warning("lease: took over the stale lease of %s (%s)", prev.describe(now), why)
            for g in gens[:-1]:  # older generations: only the one just replaced is kept
                try:
                    self.store.fs.rm(self._path(g))
                except FileNotFoundError:
                    pass
            self._thread = threading.Thread(target=self._beat, name="pagemill-lease", daemon=True)
            self._thread.start()
            return self
        raise LeaseHeld(f"output root {self.store.root}: lost the race for its lease to another run")

    @property
    def started_at(self) -> float:
        assert self.record is not None
        return self.record.started_at

    def heartbeat(self) -> None:
        """Refresh the heartbeat once, unless another run took the lease over (then `lost`)."""
        assert self.record is not None
        if self.lost:
            return
        gens = self._generations()
        if gens and gens[-1] > self.generation:
            self.lost = True
            log.error("lease: output root %s was taken over by another run", self.store.root)
            return
        self.record.heartbeat_at = time.time()
        self._write(self.record)

    def _beat(self) -> None:
        interval = max(0.2, self.timeout_s / 6)
        while not self._stop.wait(interval):
            try:
                self.heartbeat()
            except Exception as e:  # a network blip: try again next tick (timeout_s leaves room)
                log.warning("lease: heartbeat failed: %s: %s", type(e).__name__, e)
            if self.lost:
                return

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(
                f"output root {self.store.root}: this run's lease was taken over by another run "
                f"(its heartbeat was older than output.lease_timeout_s={self.timeout_s:g} s)"
            )

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (unless another run holds it now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.record is None or self.lost:
            return
        gens = self._generations()
        if gens and gens[-1] > self.generation:
            return
        self.record.released = True
        self.record.heartbeat_at = time.time()
        try:
            self._write(self.record)
        except Exception as e:  # the next run then waits for the timeout (or sees the pid gone)
            log.warning("lease: could not release %s: %s: %s", self.store.root, type(e).__name__, e)
