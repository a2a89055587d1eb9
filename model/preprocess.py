"""Image preprocessing for every DeepSeek-OCR resolution mode (spec §3), CPU only.

Adapted from DeepSeek-OCR's `process/image_process.py`.

What: turn one decoded page image into the exact uint8 views the official code normalises — one
global view (stretched or padded to S×S) plus, in the Gundam modes, a row-major list of s×s tiles
— and count the LM ``<image>`` positions those views occupy.  Why here and in uint8: the views are
compact to ship from CPU preprocessing workers to the GPU process, and keeping Pillow's own
resampler (BICUBIC, ``ImageOps.pad``) makes them *pixel-identical* to the reference (a torch
resampler is not; ``shared/parity/README.md``).  ``to_pixel_tensor`` does the float normalisation
``(x/255 - 0.5)/0.5`` on whichever side holds the tensors.

Modes are rows of data in ``MODES``, named by ``ModeName``.  ``num_image_tokens`` is the single source of truth for the
``<image>`` count; ``preprocess_image`` uses the same ``tile_grid`` / count code.

``gundam_m`` (1280 global + 1024 tiles) exists only in the paper (Table 1); the official scripts
cannot run it correctly (spec §3.2).  Here it follows the Gundam algorithm with every 640 replaced
by the tile size: no tiles when both sides are <= 1024, tie rule on 0.5·1024²·i·j, and
``421 + (16·w+1)·(16·h)`` positions.  Treat its outputs as unvalidated against any reference.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.modes import (
    PATCHES_PER_QUERY,
    ModeSpec,
    get_mode,
)

PAD_COLOR = (127, 127, 127)  # tuple(int(0.5 * 255)) — normalises to -1/255, not 0
DEFAULT_MAX_PIXELS = 200_000_000


class ImageError(ValueError):
    """The input is not a usable image (undecodable, empty, or absurdly large)."""


def candidate_grids(min_crops: int, max_crops: int) -> list[tuple[int, int]]:
    """Tile grids (w, h) in the reference's order: a CPython ``set`` sorted (stably) by w·h.

    Equal products keep set-iteration order, which is deterministic for small int tuples (tuple
    hashing is not randomised); we build the set with the same generator so the order matches.
    """
    ratios = set(
        (i, j)
        for n in range(min_crops, max_crops + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_crops <= i * j <= max_crops
    )
    return sorted(ratios, key=lambda x: x[0] * x[1])


def tile_grid(width: int, height: int, mode_spec: ModeSpec) -> tuple[int, int]:
    """(w_tiles, h_tiles) of spec §3.3; (1, 1) means "no tiles" (also for non-crop modes)."""
    s = mode_spec.image_size
    if not mode_spec.crop_mode or (width <= s and height <= s):
        return (1, 1)
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for i, j in candidate_grids(mode_spec.min_crops, mode_spec.max_crops):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * s * s * i * j:
            best = (i, j)  # exact tie: the later (larger) grid wins for big images
    return best


def _count(spec: ModeSpec, grid: tuple[int, int]) -> int:
    n = math.ceil(spec.base_size / PATCHES_PER_QUERY)
    total = n * (n + 1) + 1  # global rows + newline column, + view separator
    if spec.crop_mode and grid != (1, 1):
        q = math.ceil(spec.image_size / PATCHES_PER_QUERY)
        total += (q * grid[0] + 1) * (q * grid[1])  # stitched mosaic, newline per mosaic row
    return total


def num_image_tokens(width: int, height: int, mode: str | ModeSpec, max_crops: int | None = None) -> int:
    """Number of ``<image>`` positions for a W×H image in ``mode`` (spec §3.2 / §3.5)."""
    spec = get_mode(mode, max_crops)
    check_size(width, height, max_pixels=None)
    return _count(spec, tile_grid(width, height, spec))


def check_size(width: int, height: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Raise ImageError for empty (< 1 px side) or absurdly large images."""
    if width < 1 or height < 1:
        raise ImageError(f"image has an empty side: {width}x{height} px (need >= 1x1)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height:,} px, above the limit of "
            f"{max_pixels:,} px (raise max_pixels if this is intended)"
        )


_PIL_LIMIT_LOCK = threading.Lock()


def load_image(
    source: bytes | bytearray | str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode bytes or a file into an RGB image (EXIF orientation applied), as the official scripts.

    The size is checked against ``max_pixels`` from the header *before* decoding. Pillow's own
    decompression-bomb guard is replaced by that check for the duration of the call (under a
    lock), so a configured limit above Pillow's ~179 MP default works and Pillow's
    DecompressionBombError/Warning never escape; every decode failure becomes ImageError.
    """
    what = f"{len(source)} bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with _PIL_LIMIT_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with img:  # closes a file we opened, also when the checks below fail
            check_size(*img.size, max_pixels=max_pixels)
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"image file not found: {what}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"not a decodable image ({what}): unknown or corrupt format") from e
    except Image.DecompressionBombError as e:  # only if a caller re-enabled Pillow's guard mid-way
        raise ImageError(f"image too large to decode safely ({what}): {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated / corrupt data
        raise ImageError(f"could not decode image ({what}): {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class PreparedImage:
    """uint8 views of one image, ready to ship between processes (no float tensors yet)."""

    global_view: np.ndarray  # (S, S, 3) uint8
    tiles: np.ndarray | None  # (T, s, s, 3) uint8, row-major (tile k: col k % w, row k // w)
    grid: tuple[int, int]  # (w_tiles, h_tiles); (1, 1) without tiles
    num_image_tokens: int
    size: tuple[int, int]  # original (W, H)

    @property
    def n_tiles(self) -> int:
        return 0 if self.tiles is None else int(self.tiles.shape[0])

    def pixel_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(global (1,3,S,S), tiles (T,3,s,s) or None) as normalised float32 tensors."""
        tiles = None if self.tiles is None else to_pixel_tensor(self.tiles)
        return to_pixel_tensor(self.global_view), tiles


def _global_view(img: Image.Image, spec: ModeSpec) -> Image.Image:
    size = (spec.base_size, spec.base_size)
    if spec.stretch:
        return img.resize(size, Image.Resampling.BICUBIC)
    # Pillow's pad: longer side -> S, shorter round(short*S/long), centred at round((S-short)/2)
    # with Python round (half-to-even), exactly what the goldens record.
    return ImageOps.pad(img, size, method=Image.Resampling.BICUBIC, color=PAD_COLOR)


def preprocess_image(
    img: Image.Image,
    mode: str | ModeSpec,
    max_crops: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Global view + tiles for ``mode`` (non-RGB input is converted to RGB first)."""
    spec = get_mode(mode, max_crops)
    width, height = img.size
    check_size(width, height, max_pixels)
    if img.mode != "RGB":
        img = img.convert("RGB")
    grid = tile_grid(width, height, spec)
    global_view = np.array(_global_view(img, spec), dtype=np.uint8)
    tiles = None
    if spec.crop_mode and grid != (1, 1):
        s, (gw, gh) = spec.image_size, grid
        big = np.array(img.resize((s * gw, s * gh), Image.Resampling.BICUBIC), dtype=np.uint8)
        # (gh*s, gw*s, 3) -> (gh, s, gw, s, 3) -> (gh, gw, s, s, 3): row-major tiles
        tiles = np.ascontiguousarray(
            big.reshape(gh, s, gw, s, 3).transpose(0, 2, 1, 3, 4).reshape(gw * gh, s, s, 3)
        )
    return PreparedImage(
        global_view=global_view,
        tiles=tiles,
        grid=grid,
        num_image_tokens=_count(spec, grid),
        size=(width, height),
    )


def device_views(
    page: torch.Tensor, mode: str | ModeSpec, max_crops: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """`preprocess_image`'s views of an RGB page (H, W, 3) uint8 tensor, computed with torch on
    the page's device (`model.resample`, Pillow's BICUBIC bit for bit; the padding as
    ``ImageOps.pad``): (global (S, S, 3), tiles (T, s, s, 3) or None, grid), the same bytes as
    the PIL path (`tests/model/test_resample.py` on real pages)."""
    from model.resample import resize_bicubic

    spec = get_mode(mode, max_crops)
    height, width = int(page.shape[0]), int(page.shape[1])
    check_size(width, height, max_pixels=None)
    S = spec.base_size
    if spec.stretch:
        global_view = resize_bicubic(page, (S, S))
    else:  # ImageOps.pad: ImageOps.contain's size, then pasted centred on the pad colour
        size = (S, S)
        if width / height != 1.0:  # S / S: the destination ratio
            if width / height > 1.0:
                size = (S, round(height / width * S))
            else:
                size = (round(width / height * S), S)
        if size == (S, S):
            global_view = resize_bicubic(page, size)
        else:
            global_view = (
                torch.tensor(PAD_COLOR, dtype=torch.uint8, device=page.device).expand(S, S, 3).clone()
            )
            if min(size) > 0:
                resized = resize_bicubic(page, size)
                if size[0] != S:
                    x = round((S - size[0]) * 0.5)
                    global_view[:, x : x + size[0]] = resized
                else:
                    y = round((S - size[1]) * 0.5)
                    global_view[y : y + size[1]] = resized
    grid = tile_grid(width, height, spec)
    tiles = None
    if spec.crop_mode and grid != (1, 1):
        s, (gw, gh) = spec.image_size, grid
        big = resize_bicubic(page, (s * gw, s * gh))
        tiles = big.reshape(gh, s, gw, s, 3).permute(0, 2, 1, 3, 4).reshape(gw * gh, s, s, 3).contiguous()
    return global_view, tiles, grid


def to_pixel_tensor(
    views: np.ndarray | torch.Tensor | list[np.ndarray], device: torch.device | str | None = None
) -> torch.Tensor:
    """uint8 view(s) (S,S,3) / (N,S,S,3) / list of (S,S,3) -> float32 (N,3,S,S) in [-1, 1].

    Same arithmetic as the reference (ToTensor then Normalize): x/255 in float32, then
    (x - 0.5) / 0.5. With `device`, the uint8 pixels are copied there first and the float work
    runs on it: a Gundam page is ~30 ms of single-core CPU work otherwise (BENCHMARKS.md: the
    host share of the engine's wall time), and 4x the bytes to copy.
    """
    if isinstance(views, torch.Tensor):
        t = views
    else:
        arr = np.stack(views) if isinstance(views, list) else np.asarray(views)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected (S,S,3) or (N,S,S,3) views, got shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    x = t.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    return x.sub(0.5).div(0.5)
