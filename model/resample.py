"""Pillow's BICUBIC resize of 8-bit RGB images in torch, bit-exact, on any device.

Why: the Gundam views are Pillow resizes of the page (`model.preprocess`), and on the OCR
actor's host they cost 3-4x the PNG decode (a 144-dpi Letter page on the 2-core machine: 42-61
ms against 12-20 ms; BENCHMARKS.md, issue 14). The same arithmetic as Pillow's `ImagingResample`
(libImaging/Resample.c), written as matrix products, runs on the engine's GPU instead (about 55
GFLOP of float64 per 144-dpi Gundam page; its GPU time is not measured yet) and gives the same bytes:

* per output pixel, filter weights from the bicubic kernel (a = -0.5, support 2 scaled by the
  downscale factor) over the input pixels ``[xmin, xmin + n)`` around its centre, in double,
  normalised to sum 1, then rounded half away from zero to fixed point with 22 fractional bits;
* one pass per changed axis, each output an integer sum of input bytes times weights plus 2^21,
  shifted right by 22 and clipped to 0..255 (an 8-bit intermediate image between the passes),
  in Pillow's order (`vertical_first`).

The sums are integers below 2^40, so float64 products accumulate them exactly in any order:
each pass is one float64 matmul against a dense (out, in) weight matrix, then floor and clip.
`tests/model/test_resample.py` checks byte equality with Pillow on real pages and random sizes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
_BICUBIC_A = -0.5
_SUPPORT = 2.0


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=16)  # dense: ~10-20 MB each at page sizes
def weight_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 of Pillow's fixed-point bicubic weights (integers)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) truncates toward zero; Pillow then clamps to [0, in_size]
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    n = np.minimum(xmax - xmin, ksize)  # taps of each output pixel
    taps = np.arange(ksize)
    valid = taps[None, :] < n[:, None]
    w = _bicubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(valid, w, 0.0)  # as C: times the reciprocal, summed over the row's taps only
    total = np.cumsum(w, axis=1)[:, -1:]  # C's left-to-right sum (numpy's sum pairs terms up)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    one = float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one))
    out = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], valid.shape)[valid]
    out[rows, (xmin[:, None] + taps[None, :])[valid]] = fixed[valid]
    return out


@lru_cache(maxsize=16)  # dense: ~10-20 MB each at page sizes
def _device_weights(in_size: int, out_size: int, device: torch.device) -> Tensor:
    """`weight_matrix` on `device`, uploaded once per size (page sizes repeat across a corpus)."""
    return torch.from_numpy(weight_matrix(in_size, out_size)).to(device)


def _pass(x: Tensor, weights: Tensor) -> Tensor:
    """x (..., in) float64 of bytes -> (..., out) float64 of bytes: one fixed-point pass."""
    acc = x @ weights.T + float(1 << (PRECISION_BITS - 1))
    return torch.floor(acc / float(1 << PRECISION_BITS)).clamp_(0, 255)


def resize_bicubic(img: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with size = (w, h), as ``Image.resize(size, BICUBIC)``
    of the same RGB image (no `box`, no `reducing_gap`)."""
    if img.dtype != torch.uint8 or img.ndim != 3:
        raise ValueError(f"expected (H, W, C) uint8, got {tuple(img.shape)} {img.dtype}")
    H, W, _ = img.shape
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"target size must be >= 1x1, got {size}")
    if (w, h) == (W, H):
        return img.clone()
    dev = img.device
    x = img.permute(2, 0, 1).to(torch.float64)  # (C, H, W)

    def horizontal(x: Tensor) -> Tensor:
        return _pass(x, _device_weights(x.shape[2], w, dev))

    def vertical(x: Tensor) -> Tensor:
        return _pass(x.transpose(1, 2), _device_weights(x.shape[1], h, dev)).transpose(1, 2)

    if w != W and h != H and vertical_first(W, H, w, h):
        x = horizontal(vertical(x))
    else:
        x = vertical(x) if w == W else (horizontal(x) if h == H else vertical(horizontal(x)))
    return x.to(torch.uint8).permute(1, 2, 0).contiguous()


def vertical_first(W: int, H: int, w: int, h: int) -> bool:
    """Whether Pillow 13 runs the vertical pass first for a (W, H) -> (w, h) resize that needs
    both: when the height shrinks by more than twice as many pixels as the width does. (The two
    orders round differently: this rule was measured against Pillow 13.0.0 over every quadrant
    of up/down-scaling, `tests/model/test_resample.py`; Pillow 12's C code always went
    horizontal first.)"""
    return h < H and 2 * (W - w) < H - h
