"""The OCR actor's view builder (pipeline/views.py) with real worker processes: the views built
there equal the in-process PIL path bit for bit, a bad image fails only its page with an
ImageError, and a worker process killed mid-run costs no page (the pool is replaced)."""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from model.preprocess import ImageError, PreparedImage
from pipeline.config import ViewKind
from pipeline.render import PageImage, RenderOptions, render_pages
from pipeline.views import ViewBuilder, page_views

PAPER = Path(__file__).resolve().parents[1] / "data" / "paper-arxiv-math-01.pdf"


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    out = []
    for dpi in (144, 100):  # two pages of different sizes
        (page,) = render_pages(PAPER.read_bytes(), None, [0], RenderOptions(dpi=dpi), output="png")
        assert isinstance(page, PageImage) and page.png is not None
        out.append(page.png)
    return out


def _same(a: PreparedImage, b: PreparedImage) -> bool:
    ga, gb = a.global_view, b.global_view
    ta, tb = a.tiles, b.tiles
    tiles = (ta is None and tb is None) or (ta is not None and tb is not None and np.array_equal(ta, tb))
    return bool(np.array_equal(ga, gb)) and tiles and a.grid == b.grid


@pytest.mark.parametrize("kind", list(ViewKind))
def test_views_from_the_pool_equal_the_in_process_path(kind: ViewKind, pngs: list[bytes]) -> None:
    views = ViewBuilder(kind, workers=2)
    try:

        async def build() -> list[PreparedImage]:
            return list(await asyncio.gather(*(views.build(p, "gundam", None) for p in pngs)))

        got = asyncio.run(build())
        for png, v in zip(pngs, got):
            want = page_views(png, "gundam", None)
            assert v.tiles is not None and _same(v, want)  # 144 dpi A4 in Gundam: tiled
    finally:
        views.close()


def test_a_bad_image_fails_its_page_only(pngs: list[bytes]) -> None:
    views = ViewBuilder(ViewKind.processes, workers=1)
    try:

        async def build() -> list[object]:
            jobs = [views.build(b"not a png", "gundam", None), views.build(pngs[0], "gundam", None)]
            return list(await asyncio.gather(*jobs, return_exceptions=True))

        bad, good = asyncio.run(build())
        assert isinstance(bad, ImageError) and "not a decodable image" in str(bad)
        assert isinstance(good, PreparedImage)
        assert _same(good, page_views(pngs[0], "gundam", None))
        assert views.pools_started == 1
    finally:
        views.close()


def test_a_killed_worker_process_costs_no_page(pngs: list[bytes]) -> None:
    views = ViewBuilder(ViewKind.processes, workers=1)
    try:
        asyncio.run(views.build(pngs[0], "gundam", None))  # the worker is up
        pool = views.pool
        assert isinstance(pool, ProcessPoolExecutor)
        workers = list(pool._processes.values())  # pyright: ignore[reportPrivateUsage]  # no public way to reach them
        assert workers
        for proc in workers:
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)  # e.g. the OOM killer
            proc.join(10)
        got = asyncio.run(views.build(pngs[1], "gundam", None))
        assert _same(got, page_views(pngs[1], "gundam", None))
        assert views.pools_started == 2
    finally:
        views.close()
