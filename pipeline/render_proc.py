"""Killable, recycled renderer process around `pipeline.render` (no Ray).

MuPDF can hang on a pathological page, segfault, or be OOM-killed, and it retains memory over long
loops (PyMuPDF #130/#1430/#3625). So, like NeMo Curator, MinerU and olmOCR, the pipeline never
renders in the worker process itself: `RenderWorker` keeps one child process alive across calls,
streams results back page by page over a pipe (drained while waiting, so a large result cannot
deadlock and pages finished before a crash or timeout are kept), kills the child on timeout or
crash, and replaces it after `recycle_after` tasks or when its RSS passes `max_rss_mb`.
`render_in_subprocess` / `probe_in_subprocess` are one-shot wrappers.

Start method: never "fork". A Ray worker is multi-threaded (gRPC, core-worker threads); forking
it copies locks held by other threads into a child where nobody will release them, so the child
can deadlock at random, and Python 3.12+ warns about exactly this. We use "forkserver" where the
platform has it: the fork server is a fresh, single-threaded interpreter (exec'd, not forked from
the Ray worker) that preloads numpy + PyMuPDF once, so each new child is a cheap fork of a clean
process (tens of ms instead of ~1 s for "spawn", which matters when recycling). Elsewhere we fall
back to "spawn". Consequence: the child does not see environment changes made in the parent after
the fork server started, so the test fault (`pipeline.faults.render_fault`) is read in the parent
and sent with each request.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import TYPE_CHECKING, Any, Literal, cast

from pipeline import render as _render
from pipeline.faults import RenderFault, render_fault
from pipeline.render import (
    DEFAULT_RENDER,
    DocError,
    DocInfo,
    PageError,
    PageImage,
    PageProducts,
    RenderOptions,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack for **kwargs is 3.12+

__all__ = ["RenderWorker", "render_in_subprocess", "probe_in_subprocess"]


def _context(start_method: str | None) -> ForkServerContext | SpawnContext:
    method = start_method or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if method == "fork":
        raise ValueError(
            "start_method='fork' is unsafe in multi-threaded (Ray) workers; use forkserver or spawn"
        )
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([_render.__name__])  # no effect once the server runs; harmless
    return cast("ForkServerContext | SpawnContext", ctx)  # fork is refused above; others raise in get_context


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # non-Linux: peak RSS is the best cheap proxy
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _child_main(conn: Any) -> None:
    """Child loop: one request at a time, results streamed as ("item", x), then ("done", stats)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    import pymupdf

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if msg is None:
            return
        op, kwargs = msg
        fatal = None
        try:
            if op == "render":
                fault: RenderFault = kwargs.pop("fault")
                pages = _render.iter_render_pages(**kwargs)  # lazy: each next() renders one page
                for done in range(len(kwargs["page_indices"])):
                    fault.before_page(done)
                    conn.send(("item", next(pages)))
            elif op == "probe":
                conn.send(("item", _render.probe_document(**kwargs)))
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # per-page errors are already PageErrors; this is a bug or bad args
            fatal = f"{type(e).__name__}: {e}"
        pymupdf.TOOLS.store_shrink(100)  # drop MuPDF's resource cache between tasks
        conn.send(("done", {"rss": _rss_bytes(), "fatal": fatal, "cpu_s": time.process_time()}))


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exit code {code}"


class RenderWorker:
    """One long-lived renderer child; not shareable across processes, calls are serialised.

    recycle_after: replace the child after this many tasks (render/probe calls).
    max_rss_mb: replace the child after a task that leaves it above this resident size.
    """

    def __init__(
        self,
        *,
        recycle_after: int = 50,
        max_rss_mb: float | None = 2048,
        start_method: Literal["forkserver", "spawn"] | None = None,
    ) -> None:
        if recycle_after < 1:
            raise ValueError("recycle_after must be >= 1")
        self.recycle_after, self.max_rss_mb, self.start_method = recycle_after, max_rss_mb, start_method
        self._proc: Any = None
        self._conn: Any = None
        self._tasks = 0  # tasks done by the current child
        self.children_started = 0
        self.last_rss_bytes = 0
        self.children_cpu_s = 0.0  # CPU seconds of the children, as they last reported it
        self._child_cpu_s = 0.0  # of it, the current child's
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        ctx = _context(self.start_method)
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_child_main, args=(child,), daemon=True, name="pagemill-render")
        proc.start()
        child.close()  # only the child holds its end now: its death reads as EOF here
        self._proc, self._conn, self._tasks = proc, parent, 0
        self._child_cpu_s = 0.0
        self.children_started += 1

    def warm(self) -> None:
        """Start the child now, not at the first call: a stage actor calls this in its
        constructor, so the fork server's start (a fresh interpreter importing MuPDF) happens
        while the job is still discovering, not in front of its first pages."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._stop(kill=True)
                self._start()

    def _stop(self, kill: bool = False) -> int | None:
        """Stop the child (politely unless kill) and return its exit code."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return None
        self._proc = self._conn = None
        if not kill and proc.is_alive():
            try:
                conn.send(None)
                proc.join(2.0)
            except (OSError, ValueError):
                pass
        if proc.is_alive():
            proc.kill()
        proc.join(10.0)
        conn.close()
        return proc.exitcode

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __enter__(self) -> RenderWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop(kill=True)
        except Exception:
            pass

    def _call(
        self, op: str, kwargs: dict[str, Any], deadline: float, timeout_s: float, page_timeout_s: float | None
    ) -> tuple[list[Any], str | None]:
        """Run one request; return (items received, None) or (items received before failure, why)."""
        if self._proc is None or not self._proc.is_alive():
            self._stop(kill=True)
            self._start()
        try:
            self._conn.send((op, kwargs))
        except OSError:  # child died while idle (e.g. OOM-killed): one fresh start
            self._stop(kill=True)
            self._start()
            self._conn.send((op, kwargs))
        items: list[Any] = []
        last = time.monotonic()
        while True:
            now = time.monotonic()
            total_wait = deadline - now
            page_wait = last + page_timeout_s - now if page_timeout_s else math.inf
            wait = min(total_wait, page_wait)
            if wait <= 0 or not self._conn.poll(wait):
                self._stop(kill=True)
                if total_wait <= page_wait:
                    return items, f"{op} timed out after {timeout_s:g}s"
                return items, f"page {op} timed out after {page_timeout_s:g}s"
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                return items, f"renderer crashed: {_exit_text(self._stop(kill=True))}"
            if kind == "item":
                items.append(payload)
                last = time.monotonic()
                continue
            self._tasks += 1
            self.last_rss_bytes = payload["rss"]
            cpu = payload.get("cpu_s", self._child_cpu_s)
            self.children_cpu_s += cpu - self._child_cpu_s
            self._child_cpu_s = cpu
            too_big = self.max_rss_mb is not None and payload["rss"] > self.max_rss_mb * 2**20
            if self._tasks >= self.recycle_after or too_big:
                self._stop()
            return items, (f"renderer error: {payload['fatal']}" if payload["fatal"] else None)

    def render(
        self,
        data: bytes,
        password: str | None,
        page_indices: Sequence[int],
        options: RenderOptions = DEFAULT_RENDER,
        *,
        retry_after_failure: bool = True,
        **products: Unpack[PageProducts],
    ) -> list[PageImage | PageError]:
        """Render pages in the child: exactly one result per requested index, in request order
        (`products`: what each page yields, as for `pipeline.render.iter_render_pages`).

        options.timeout_s bounds the whole call; options.page_timeout_s (optional) bounds each
        page. On a timeout or crash the child is killed and the page being rendered gets a
        PageError; with retry_after_failure and budget left, a fresh child renders the remaining
        pages (after options.max_failures failures they are quarantined), otherwise they all get
        PageErrors carrying the same message.
        """
        indices = list(page_indices)
        timeout_s, page_timeout_s, max_failures = (
            options.timeout_s,
            options.page_timeout_s,
            options.max_failures,
        )
        fault = render_fault()
        opts: dict[str, Any] = dict(data=data, password=password, options=options, fault=fault, **products)
        out: list[PageImage | PageError] = []
        failures = 0
        with self._lock:
            deadline = time.monotonic() + timeout_s
            while len(out) < len(indices):
                items, failure = self._call(
                    "render",
                    {**opts, "page_indices": indices[len(out) :]},
                    deadline,
                    timeout_s,
                    page_timeout_s,
                )
                out.extend(items)
                if failure is None:
                    break
                if len(out) < len(indices):  # the page that was in flight
                    out.append(PageError(indices[len(out)], "render_error", failure))
                failures += 1
                if failures >= max_failures and len(out) < len(indices):
                    # the document keeps killing renderers: quarantine the rest of this range
                    why = f"quarantined after {failures} renderer crashes/timeouts (last: {failure})"
                    out.extend(PageError(i, "quarantined", why) for i in indices[len(out) :])
                if not retry_after_failure or time.monotonic() >= deadline:
                    out.extend(PageError(i, "render_error", failure) for i in indices[len(out) :])
                # The fault hook counts pages per child call; re-based so a retry doesn't fire it again.
                opts["fault"] = fault.after(len(out))
        if len(out) != len(indices):  # protocol invariant; never silently drop a page
            raise RuntimeError(f"renderer returned {len(out)} results for {len(indices)} pages")
        return out

    def probe(
        self,
        data: bytes,
        password: str | None = None,
        *,
        extract_text: bool = True,
        keep_text: bool = True,
        timeout_s: float = 60.0,
    ) -> DocInfo | DocError:
        """`probe_document` in the child; a timeout or crash becomes DocError('probe_error')."""
        with self._lock:
            items, failure = self._call(
                "probe",
                dict(data=data, password=password, extract_text=extract_text, keep_text=keep_text),
                time.monotonic() + timeout_s,
                timeout_s,
                None,
            )
        return items[0] if items else DocError("probe_error", failure or "no result")


def render_in_subprocess(
    data: bytes,
    password: str | None,
    page_indices: Sequence[int],
    options: RenderOptions = DEFAULT_RENDER,
    *,
    start_method: Literal["forkserver", "spawn"] | None = None,
    **kwargs: Any,
) -> list[PageImage | PageError]:
    """One-shot `RenderWorker.render` in a fresh child (see there for kwargs and failure rules)."""
    with RenderWorker(recycle_after=1, start_method=start_method) as w:
        return w.render(data, password, page_indices, options, **kwargs)


def probe_in_subprocess(
    data: bytes,
    password: str | None = None,
    *,
    timeout_s: float = 60.0,
    start_method: Literal["forkserver", "spawn"] | None = None,
    **kwargs: Any,
) -> DocInfo | DocError:
    """One-shot `RenderWorker.probe` in a fresh child."""
    with RenderWorker(recycle_after=1, start_method=start_method) as w:
        return w.probe(data, password, timeout_s=timeout_s, **kwargs)
