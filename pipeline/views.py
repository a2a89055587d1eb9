"""Where the OCR actor builds a page's views (global view + tiles) from its PNG.

`ViewKind.threads` (the default): a pool of threads in the OCR actor's process, beside the
engine's host thread (Pillow's decoder and resampler release the interpreter lock).
`ViewKind.device`: the threads only decode the PNG; the engine builds the views from the
decoded page on its device when it takes the page in (`model.runner.OcrInput.from_page`,
`model.preprocess.device_views`: Pillow's bytes, by matrix products), which takes the resampling
(~3/4 of a Gundam page's view CPU time, measured on the 2-core machine) off the host.
`ViewKind.processes`: a pool of worker processes. It was built to take view building off the
engine's interpreter lock, and measured slower on the H200 (BENCHMARKS.md, issue 14, 2026-12-04):
20-30 pages/s of views out of 8 workers against ~50 pages/s from 8 threads. Likely cause (a
profile points there, it does not prove it): each page's ~10.5 MB of uint8 views comes back
through one pipe, read in 64 KB pieces by one thread of the engine's process, each piece a new
wait for the interpreter lock that the engine's host loop holds most of the time.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import ViewKind

if TYPE_CHECKING:
    from model.preprocess import PreparedImage

log = logging.getLogger("pagemill")


def page_views(png: bytes, mode: str, max_crops: int | None) -> PreparedImage:
    """The mode's uint8 views of one page PNG (`model.preprocess.PreparedImage`); the PIL path of
    `preprocess_image`, on the decoded (lossless) page."""
    from model.preprocess import load_image, preprocess_image

    return preprocess_image(load_image(png, max_pixels=None), mode, max_crops=max_crops, max_pixels=None)


def page_pixels(png: bytes) -> np.ndarray:
    """The decoded page (H, W, 3) uint8 RGB, as `page_views` decodes it; writeable, so the
    engine's thread wraps it for the copy to the device without copying it first."""
    from model.preprocess import load_image

    return np.array(load_image(png, max_pixels=None))


def _warm() -> None:
    """A worker's first task: the imports, so the first page pays none."""
    import model.preprocess  # noqa: F401


class ViewBuilder:
    """`await build(png, mode, max_crops)`: a page's views, built in a pool of `workers` worker
    processes (or threads). A worker process that dies (OOM-killed, a crash in a decoder) breaks
    the pool: it is replaced and the page built once more in the new one; a page that breaks
    that one too fails with the pool's error (its batch is retried by Ray Data)."""

    def __init__(self, kind: ViewKind, workers: int) -> None:
        self.kind, self.workers = kind, max(1, workers)
        self._lock = threading.Lock()
        self.pool = self._new_pool()
        self.pools_started = 1

    def _new_pool(self) -> Executor:
        if self.kind in (ViewKind.threads, ViewKind.device):
            return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="views")
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        if method == "forkserver":  # each worker forks from a server that imported these once
            ctx.set_forkserver_preload(["model.preprocess", "pipeline.views"])
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        for _ in range(self.workers):
            pool.submit(_warm)  # start the workers now (while the model loads), not at the first page
        return pool

    async def build(self, png: bytes, mode: str, max_crops: int | None) -> PreparedImage:
        loop = asyncio.get_running_loop()
        pool = self.pool
        try:
            return await loop.run_in_executor(pool, page_views, png, mode, max_crops)
        except BrokenProcessPool as e:
            log.warning("a view worker process died (%s); starting a new pool", e)
            with self._lock:
                if self.pool is pool:  # the first caller to see it replaces it
                    pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._new_pool()
                    self.pools_started += 1
                pool = self.pool
            return await loop.run_in_executor(pool, page_views, png, mode, max_crops)

    async def decode(self, png: bytes) -> np.ndarray:
        """The decoded page (`ViewKind.device`: its views are built on the engine's device)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, page_pixels, png)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
