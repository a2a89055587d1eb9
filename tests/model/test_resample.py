"""Pillow's BICUBIC resize in torch (`model.resample`) and the views built with it
(`model.preprocess.device_views`, the OCR engine's `ViewKind.device` path) against Pillow itself:
the same bytes for random images of every up/down-scaling combination, for extreme aspects, and
for real dev-corpus pages in every mode; a page given to the engine undecided (`OcrInput.from_page`)
gives the same tokens as its PIL views (tiny model, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import device_views, load_image, preprocess_image
from model.resample import resize_bicubic, vertical_first
from model.runner import OcrInput, PageOcr
from pipeline.render import PageImage, RenderOptions, render_pages

B = Image.Resampling.BICUBIC


def _same_tiles(got: torch.Tensor | None, want: np.ndarray | None) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return bool(np.array_equal(got.numpy(), want))


def _pil(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, B))


def test_random_sizes_match_pillow_byte_for_byte() -> None:
    rng = np.random.default_rng(0)
    orders = set()
    for _ in range(160):
        H, W = (int(v) for v in rng.integers(1, 160, 2))
        h, w = (int(v) for v in rng.integers(1, 160, 2))
        a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        got = resize_bicubic(torch.from_numpy(a), (w, h)).numpy()
        assert np.array_equal(got, _pil(a, (w, h))), ((W, H), (w, h))
        if w != W and h != H:
            orders.add(vertical_first(W, H, w, h))
    assert orders == {True, False}  # both pass orders were exercised


@pytest.mark.parametrize("size", [(1, 1), (1, 600), (600, 1), (3, 900), (900, 3)])
def test_extreme_aspects_match_the_pil_views(size: tuple[int, int]) -> None:
    a = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    for mode in ("gundam", "base", "tiny"):
        prep = preprocess_image(Image.fromarray(a), mode)
        g, tiles, grid = device_views(torch.from_numpy(a), mode)
        assert np.array_equal(g.numpy(), prep.global_view) and grid == prep.grid, mode
        assert _same_tiles(tiles, prep.tiles), mode


def _pages(corpus_dir: Path) -> list[np.ndarray]:
    out = []
    names = ["paper-2col-tracemonkey-01.pdf", "cjk-ja-horizontal-01.pdf", "book-math-chapter-48p-01.pdf"]
    for name, dpi in zip(names, (144, 144, 100)):
        (page,) = render_pages(
            (corpus_dir / name).read_bytes(), None, [0], RenderOptions(dpi=dpi), output="png"
        )
        assert isinstance(page, PageImage) and page.png is not None
        out.append(np.asarray(load_image(page.png)))
    return out


def test_real_pages_give_the_pil_views_in_every_mode(corpus_dir: Path) -> None:
    for page in _pages(corpus_dir):
        for mode in ("gundam", "gundam_m", "base", "large", "small", "tiny"):
            prep = preprocess_image(Image.fromarray(page), mode)
            g, tiles, grid = device_views(torch.from_numpy(page.copy()), mode)
            assert grid == prep.grid, mode
            assert np.array_equal(g.numpy(), prep.global_view), mode
            assert _same_tiles(tiles, prep.tiles), mode


def test_a_page_input_runs_like_its_views(corpus_dir: Path) -> None:
    torch.set_num_threads(1)
    page = _pages(corpus_dir)[0]
    prep = preprocess_image(Image.fromarray(page), "gundam", max_crops=6)
    by_views = OcrInput.from_views(prep, tag="views")
    by_page = OcrInput.from_page(page, "gundam", max_crops=6, tag="page")
    assert (by_page.grid, by_page.num_image_tokens) == (by_views.grid, by_views.num_image_tokens)
    ocr = PageOcr.load(
        "tiny_random", dtype="float32", device="cpu", max_batch=2, max_new_tokens=6, max_model_len=4096
    )
    a, b = ocr.run([by_views, by_page])
    assert (a.tag, b.tag) == ("views", "page")
    assert a.ids == b.ids and a.num_vision_tokens == b.num_vision_tokens
