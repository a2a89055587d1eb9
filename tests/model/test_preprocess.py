"""Preprocessing tests: pixel-exact golden views for all 20 parity cases, token-count table of the
spec's worked examples, Gundam candidate order / tie rule, normalisation, and input validation."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.modes import MODES, ModeSpec, get_mode
from model.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    candidate_grids,
    load_image,
    num_image_tokens,
    preprocess_image,
    tile_grid,
    to_pixel_tensor,
)
from model.tokenizer import OcrTokenizer
from tests.conftest import PARITY

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


def _case_ids() -> list[str]:
    f = PARITY / "cases.json"
    return [c["id"] for c in json.loads(f.read_text())["cases"]] if f.exists() else []


@cache
def _cases(parity: Path) -> dict[str, dict]:
    return {c["id"]: c for c in json.loads((parity / "cases.json").read_text())["cases"]}


@cache
def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@cache
def _tokenizer() -> OcrTokenizer:
    return OcrTokenizer.default()


def _mode_args(case: dict) -> tuple[str, int | None]:
    """Golden mode names -> (our mode, max_crops): `gundam` goldens use HF's max 9."""
    mode = "gundam" if case["mode"] == "gundam_max6" else case["mode"]
    return mode, case["max_crops"]


@pytest.mark.parity
def test_all_cases_present(parity_dir: Path) -> None:
    cases = _cases(parity_dir)
    assert len(cases) == 20 and sorted(cases) == sorted(_case_ids())
    assert {c["mode"] for c in cases.values()} == {"tiny", "small", "base", "large", "gundam", "gundam_max6"}


@pytest.mark.parity
@pytest.mark.parametrize("case_id", _case_ids())
def test_golden_views_pixel_exact(parity_dir: Path, case_id: str) -> None:
    case = _cases(parity_dir)[case_id]
    with Image.open(parity_dir / f"{case['input']}.png") as im:
        img = im.convert("RGB")
    assert list(img.size) == case["input_size"]
    mode, max_crops = _mode_args(case)
    spec = get_mode(mode, max_crops)
    assert (spec.base_size, spec.image_size, spec.crop_mode) == (
        case["base_size"],
        case["image_size"],
        case["crop_mode"],
    )
    prep = preprocess_image(img, mode, max_crops=max_crops)

    assert list(prep.grid) == case["grid"]
    assert prep.n_tiles == case["n_tiles"] == len(case["tiles"])
    assert prep.num_image_tokens == case["n_image_positions"]
    width, height = img.size
    assert num_image_tokens(width, height, mode, max_crops=max_crops) == case["n_image_positions"]
    assert prep.size == tuple(case["input_size"])
    ids = _tokenizer().build_prompt_ids(PROMPT, prep.num_image_tokens)
    assert ids == case["input_ids"]
    assert len(ids) == case["seq_len"]
    assert ids[case["image_span"][0] : case["image_span"][1]] == [128815] * prep.num_image_tokens

    gv = case["global_view"]
    assert prep.global_view.dtype == np.uint8 and prep.global_view.shape == (*gv["size"][::-1], 3)
    np.testing.assert_array_equal(prep.global_view, _png(parity_dir / gv["file"]))
    assert hashlib.sha256(prep.global_view.tobytes()).hexdigest() == gv["sha256_rgb"]
    if case["n_tiles"] == 0:
        assert prep.tiles is None
    else:
        assert prep.tiles is not None and prep.tiles.dtype == np.uint8
        for k, tile in enumerate(case["tiles"]):
            np.testing.assert_array_equal(prep.tiles[k], _png(parity_dir / tile["file"]))
            assert hashlib.sha256(prep.tiles[k].tobytes()).hexdigest() == tile["sha256_rgb"]


# --- token counts (spec §3.2 / 3.3 worked examples) -------------------------------------------


@pytest.mark.parametrize(
    ("size", "mode", "max_crops", "expected"),
    [
        ((1191, 1684), "gundam", None, 903),  # A4 @144 dpi
        ((1224, 1584), "gundam", None, 903),  # Letter @144 dpi
        ((1654, 2339), "gundam", 9, 903),  # A4 @200 dpi
        ((1684, 1191), "gundam", None, 893),  # A4 landscape
        ((1000, 1000), "gundam", None, 693),
        ((1000, 1000), "gundam", 9, 693),
        ((2000, 2000), "gundam", None, 693),  # default max 6 -> 2x2
        ((2000, 2000), "gundam", 6, 693),
        ((2000, 2000), "gundam", 9, 1203),  # 3x3
        ((2000, 600), "gundam", None, 583),
        ((600, 800), "gundam", None, 903),
        ((640, 640), "gundam", None, 273),
        ((500, 400), "gundam", 9, 273),
        ((1191, 1684), "tiny", None, 73),
        ((1191, 1684), "small", None, 111),
        ((1191, 1684), "base", None, 273),
        ((1191, 1684), "large", None, 421),
        ((1, 1), "base", None, 273),
        ((1024, 1024), "gundam_m", None, 421),  # paper-only: no tiles up to the 1024 tile size
        ((2000, 2000), "gundam_m", None, 421 + 33 * 32),
    ],
)
def test_num_image_tokens_table(
    size: tuple[int, int], mode: str, max_crops: int | None, expected: int
) -> None:
    assert num_image_tokens(*size, mode, max_crops=max_crops) == expected


@pytest.mark.parametrize(
    ("size", "max_crops", "grid"),
    [
        ((1191, 1684), 6, (2, 3)),
        ((1684, 1191), 6, (3, 2)),
        ((2000, 600), 9, (3, 1)),
        ((600, 800), 6, (2, 3)),
        ((641, 100), 6, (6, 1)),  # (1,1) is never a candidate once a side exceeds 640
        ((641, 640), 6, (2, 2)),
        ((1000, 1000), 9, (2, 2)),  # tie (2,2)/(3,3), small image keeps the first
        ((1400, 1400), 9, (3, 3)),  # same tie, area > 0.5*640^2*9 -> later grid wins
        ((1400, 700), 9, (2, 1)),  # tie (2,1)/(4,2): 980k px <= 1.64M -> (2,1)
        ((2000, 1000), 9, (4, 2)),  # 2M px > 1.64M -> (4,2)
        ((640, 640), 9, (1, 1)),
    ],
)
def test_tile_grid(size: tuple[int, int], max_crops: int, grid: tuple[int, int]) -> None:
    assert tile_grid(*size, get_mode("gundam", max_crops)) == grid


def test_non_crop_modes_have_no_grid() -> None:
    for name in ("tiny", "small", "base", "large"):
        assert tile_grid(3000, 1000, MODES[name]) == (1, 1)


def test_candidate_order_matches_spec() -> None:
    assert candidate_grids(2, 6) == [
        (1, 2),
        (2, 1),
        (3, 1),
        (1, 3),
        (4, 1),
        (1, 4),
        (2, 2),
        (1, 5),
        (5, 1),
        (6, 1),
        (2, 3),
        (1, 6),
        (3, 2),
    ]
    assert candidate_grids(2, 9) == [
        (1, 2),
        (2, 1),
        (3, 1),
        (1, 3),
        (2, 2),
        (4, 1),
        (1, 4),
        (5, 1),
        (1, 5),
        (1, 6),
        (6, 1),
        (3, 2),
        (2, 3),
        (7, 1),
        (1, 7),
        (4, 2),
        (2, 4),
        (1, 8),
        (8, 1),
        (1, 9),
        (3, 3),
        (9, 1),
    ]


def test_mode_table() -> None:
    assert MODES["gundam"] == ModeSpec(1024, 640, crop_mode=True, min_crops=2, max_crops=6)
    assert MODES["gundam_m"].base_size == 1280 and MODES["gundam_m"].image_size == 1024
    stretch = [MODES[m].stretch for m in ("tiny", "small", "base", "large")]
    assert stretch == [True, True, False, False]
    assert get_mode("base", max_crops=9) == MODES["base"]  # ignored outside crop modes
    assert get_mode("gundam", max_crops=9).max_crops == 9
    with pytest.raises(ValueError, match="unknown mode"):
        get_mode("huge")
    with pytest.raises(ValueError, match="min_crops"):
        get_mode("gundam", max_crops=1)


def test_preprocess_matches_count_and_layout() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (600, 2000, 3), dtype=np.uint8))
    prep = preprocess_image(img, "gundam")
    assert prep.grid == (3, 1) and prep.tiles is not None and prep.tiles.shape == (3, 640, 640, 3)
    assert prep.num_image_tokens == num_image_tokens(2000, 600, "gundam") == 583
    big = np.asarray(img.resize((1920, 640), Image.Resampling.BICUBIC))
    for k in range(3):  # row-major: tile k is column k % w
        np.testing.assert_array_equal(prep.tiles[k], big[:, 640 * k : 640 * (k + 1)])
    # non-RGB input is converted first
    gray = preprocess_image(img.convert("L"), "tiny")
    assert gray.global_view.shape == (512, 512, 3) and gray.tiles is None


def test_to_pixel_tensor() -> None:
    views = np.array([[[[0, 127, 255]]], [[[255, 0, 127]]]], dtype=np.uint8)  # (2,1,1,3)
    x = to_pixel_tensor(views)
    assert x.shape == (2, 3, 1, 1) and x.dtype == torch.float32
    ref = torch.tensor([0, 127, 255], dtype=torch.float32).div(255).sub(0.5).div(0.5)
    assert torch.equal(x[0, :, 0, 0], ref)
    assert x[0, 0, 0, 0] == -1.0 and x[0, 2, 0, 0] == 1.0
    assert to_pixel_tensor(views[0]).shape == (1, 3, 1, 1)
    assert torch.equal(to_pixel_tensor([views[0], views[1]]), x)
    with pytest.raises(TypeError):
        to_pixel_tensor(views.astype(np.float32))
    # `device`: the uint8 copy moves first, the same arithmetic runs there (here: CPU, `meta` shape)
    assert torch.equal(to_pixel_tensor(views, "cpu"), x)
    on_meta = to_pixel_tensor(views, "meta")
    assert on_meta.device.type == "meta" and on_meta.shape == x.shape and on_meta.dtype == torch.float32
    prep = preprocess_image(Image.new("RGB", (700, 300), (10, 20, 30)), "gundam")
    g, t = prep.pixel_tensors()
    assert g.shape == (1, 3, 1024, 1024) and t is not None and t.shape == (2, 3, 640, 640)


# --- input validation ----------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose valid IHDR claims width x height, with a tiny IDAT (no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_zero_size_image_rejected() -> None:
    for size in ((0, 10), (10, 0)):
        with pytest.raises(ImageError, match="empty side"):
            preprocess_image(Image.new("RGB", size), "base")
        with pytest.raises(ImageError, match="empty side"):
            num_image_tokens(*size, "gundam")


def test_garbage_bytes_rejected() -> None:
    with pytest.raises(ImageError, match="not a decodable image"):
        load_image(b"this is not an image at all")
    with pytest.raises(ImageError, match="not a decodable image"):
        load_image(b"")
    truncated = _encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    with pytest.raises(ImageError, match="decod"):
        load_image(truncated)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_absurd_size_rejected_before_decoding() -> None:
    # 900 MP header: far above Pillow's bomb limit too — must surface as ImageError, not
    # PIL.Image.DecompressionBombError.
    with pytest.raises(ImageError, match="above the limit"):
        load_image(_png_header(30_000, 30_000))
    # 187.5 MP: above Pillow's default guard (~179 MP) but under our 200 MP limit -> ours rules;
    # it then fails only because the file has no pixel data.
    assert 15_000 * 12_500 < DEFAULT_MAX_PIXELS
    with pytest.raises(ImageError, match="could not decode") as info:
        load_image(_png_header(15_000, 12_500))
    assert "limit" not in str(info.value)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global guard restored
    ok = _encode(Image.new("RGB", (20, 10)))
    with pytest.raises(ImageError, match="above the limit"):
        load_image(ok, max_pixels=100)
    with pytest.raises(ImageError, match="above the limit"):
        preprocess_image(Image.new("RGB", (20, 10)), "tiny", max_pixels=100)


def test_load_image_rgb_and_exif(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 128))
    img = load_image(_encode(rgba))
    assert img.mode == "RGB" and img.size == (30, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° CW on display
    path = tmp_path / "rot.jpg"
    path.write_bytes(_encode(Image.new("RGB", (40, 10), (0, 200, 0)), "JPEG", exif=exif))
    rotated = load_image(path)
    assert rotated.size == (10, 40) and rotated.mode == "RGB"
    assert load_image(str(path)).size == (10, 40)
