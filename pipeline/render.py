"""PDF probing and page rendering with PyMuPDF (no Ray, in-process).

`probe_document` classifies a document by its *content* (MuPDF also opens HTML, images and text,
so we force the PDF parser and look for `%PDF-` in the first 1024 bytes) and returns either a
`DocInfo` (page count, rendered page sizes, rotation, repair state, per-page text layer) or a
`DocError` with a stable code for the ledger. `render_pages` renders pages the way the official
DeepSeek-OCR script does (PyMuPDF, `zoom = dpi/72`, `get_pixmap(matrix, alpha=False)`, RGB at 144
dpi), but shrinks the zoom of oversized pages to fit pixel bounds instead of failing, and turns
every per-page failure into a `PageError` row: a requested page is never dropped.

`RenderOptions` is the one home of the render bounds (dpi, pixel bounds, timeouts, failure budget):
the job's `RenderConfig` takes its defaults from it and hands one to the renderer, and the
benchmarks and inspect build theirs from it, so they all render under the same bounds.

These functions run MuPDF in the calling process; the pipeline calls them through
`pipeline.render_proc` (killable child process with timeouts and recycling), which imports this
module (never the other way round).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, TypedDict, cast

import numpy as np
import pymupdf

from pipeline import forced
from pipeline.forced import MIN_TEXT_CHARS

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack for **kwargs is 3.12+

__all__ = [
    "DocError",
    "DocInfo",
    "PageProbe",
    "PageImage",
    "PageError",
    "probe_document",
    "render_pages",
    "iter_render_pages",
    "PageProducts",
    "page_ranges",
    "fit_zoom",
    "RenderOptions",
    "DEFAULT_RENDER",
    "MIN_TEXT_CHARS",
]

HEADER_WINDOW = 1024  # `%PDF-` may follow junk (e.g. a Ghostscript banner) within this window
_OBJ_RE = re.compile(rb"\d+\s+\d+\s+obj\b")

pymupdf.TOOLS.mupdf_display_errors(False)  # keep MuPDF chatter off stderr; we collect warnings

ErrorCode = Literal["empty_file", "not_a_pdf", "corrupt", "needs_password", "zero_pages", "probe_error"]


@dataclass(frozen=True)
class RenderOptions:
    """How pages are rendered: the bounds every caller (job, benchmarks, inspect) shares.

    dpi is the requested resolution (the official PDF pipeline's 144); a page whose pixmap would
    exceed `max_side_px` on its longer side or `max_pixels` in area is rendered at the largest
    lower zoom that fits (None: no bound). The timeouts and `max_failures` bound the killable
    renderer (`pipeline.render_proc`): `timeout_s` one call, `page_timeout_s` (None: off) one
    page, `max_failures` crashes/timeouts in one call before its other pages are quarantined.
    """

    dpi: float = 144.0
    max_pixels: int | None = 40_000_000  # ~120 MB as RGB; a 2160x2160 pt scan (18.7 MP) fits
    max_side_px: int | None = 8192  # the 234x14295 pt page (28590 px at 144 dpi) is shrunk
    timeout_s: float = 120.0
    page_timeout_s: float | None = None
    max_failures: int = 3

    def __post_init__(self) -> None:
        if not self.dpi > 0:
            raise ValueError(f"dpi must be > 0, not {self.dpi!r}")
        if self.timeout_s <= 0 or (self.page_timeout_s is not None and self.page_timeout_s <= 0):
            raise ValueError("timeout_s and page_timeout_s must be > 0")
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, not {self.max_failures!r}")

    def zoom(self, width_pt: float, height_pt: float) -> float:
        """The zoom a page of this size is rendered at (`fit_zoom` under these bounds)."""
        return fit_zoom(width_pt, height_pt, self.dpi, self.max_pixels, self.max_side_px)


DEFAULT_RENDER = RenderOptions()  # the defaults of every render call (and of the job's RenderConfig)

Output = Literal["array", "png", "both"]


class PageProducts(TypedDict, total=False):
    """What a render call yields for each page besides its size: the keywords `render_pages` and
    `RenderWorker.render` pass through to `iter_render_pages`, whose signature holds the defaults."""

    output: Output  # "array": RGB pixels, "png": PNG bytes, "both"
    extract_text: bool  # the page's text layer (PageImage.text / text_chars)
    count_blocks: bool  # its non-empty text blocks (PageImage.text_blocks, `pipeline.forced`)


@dataclass(frozen=True)
class DocError:
    """Document-level failure: one ledger row instead of page rows."""

    code: str  # one of ErrorCode
    message: str


@dataclass(frozen=True)
class PageProbe:
    index: int
    width_pt: float  # page.rect, i.e. after /Rotate (what gets rendered)
    height_pt: float
    rotation: int  # /Rotate: 0, 90, 180 or 270
    text_chars: int  # non-whitespace characters in the extractable text (-1: not extracted)
    has_text: bool  # text_chars >= MIN_TEXT_CHARS
    text: str | None = None  # extracted text when keep_text=True
    error: str | None = None  # the page could not be loaded (its other fields are then zero)


@dataclass(frozen=True)
class DocInfo:
    page_count: int
    pages: list[PageProbe]
    repaired: bool  # MuPDF rebuilt the xref (on open or while loading pages)
    encrypted: bool  # has an /Encrypt dictionary (owner-only files open without a password)
    header_offset: int  # bytes of junk before `%PDF-`
    missing_eof: bool  # no `%%EOF` in the last 1024 bytes: likely truncated (MuPDF repairs these)
    pdf_format: str = ""  # e.g. "PDF 1.7"
    warnings: list[str] = field(default_factory=list)  # MuPDF warnings (first few lines)

    @property
    def text_pages(self) -> int:
        return sum(p.has_text for p in self.pages)

    @property
    def has_text_layer(self) -> str:
        """'yes' (every page), 'no' (none) or 'partial' — the corpus manifest's vocabulary."""
        n = self.text_pages
        return "yes" if n == self.page_count else "no" if n == 0 else "partial"

    @property
    def page_sizes_pt(self) -> list[tuple[float, float]]:
        """(width, height) in points per page, after /Rotate."""
        return [(p.width_pt, p.height_pt) for p in self.pages]

    @property
    def text_chars(self) -> list[int]:
        return [p.text_chars for p in self.pages]

    def without_text(self) -> DocInfo:
        """Copy with the per-page text dropped (counts kept), for callers that don't store it."""
        return replace(self, pages=[replace(p, text=None) for p in self.pages])


@dataclass(frozen=True)
class PageImage:
    page_index: int
    width_px: int
    height_px: int
    dpi: float  # effective dpi (lower than requested when the page had to be shrunk)
    width_pt: float
    height_pt: float
    rotation: int
    scaled_down: bool  # the requested dpi exceeded max_pixels / max_side_px
    render_ms: float
    text_chars: int = -1  # non-whitespace text-layer chars (-1: extract_text=False)
    text: str | None = None  # the page's text layer when extract_text=True
    pixels: np.ndarray | None = None  # uint8 (H, W, 3) RGB when output is "array" or "both"
    png: bytes | None = None  # PNG bytes when output is "png" or "both"
    text_blocks: int = -1  # non-empty text blocks when count_blocks=True (forced lengths, pipeline/forced.py)


@dataclass(frozen=True)
class PageError:
    page_index: int
    code: str = "render_error"
    message: str = ""


def _mupdf_warnings(limit: int = 5) -> list[str]:
    lines = [ln for ln in pymupdf.TOOLS.mupdf_warnings(reset=True).splitlines() if ln.strip()]
    return lines[:limit]


def _open(data: bytes, password: str | None) -> tuple[pymupdf.Document | None, DocError | None, int]:
    """Open `data` strictly as a PDF. Returns (doc, None, header_offset) or (None, error, offset)."""
    if len(data) == 0:
        return None, DocError("empty_file", "file is empty (0 bytes)"), -1
    offset = bytes(data[:HEADER_WINDOW]).find(b"%PDF-")
    if offset < 0:
        head = bytes(data[:16])
        return (
            None,
            DocError("not_a_pdf", f"no %PDF- header in the first {HEADER_WINDOW} bytes (starts {head!r})"),
            -1,
        )
    pymupdf.TOOLS.mupdf_warnings(reset=True)
    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except Exception as e:  # FileDataError and friends: MuPDF could not even repair it
        # A header followed by no object syntax at all is a non-PDF that happens to start with
        # `%PDF-` (the corpus' not-a-pdf case); anything with objects is a damaged PDF.
        code = "corrupt" if _OBJ_RE.search(data) else "not_a_pdf"
        return None, DocError(code, f"MuPDF cannot open the file: {e}"), offset
    if doc.needs_pass:
        if password is None:
            doc.close()
            return None, DocError("needs_password", "document needs a user password; none given"), offset
        if not doc.authenticate(password):
            doc.close()
            return (
                None,
                DocError("needs_password", "document needs a user password; the given one is wrong"),
                offset,
            )
    return doc, None, offset


def probe_document(
    data: bytes,
    password: str | None = None,
    *,
    extract_text: bool = True,
    keep_text: bool = True,
    min_text_chars: int = MIN_TEXT_CHARS,
) -> DocInfo | DocError:
    """Classify a document and describe its pages. Never raises for bad input.

    extract_text=False skips text extraction (text_chars=-1, has_text=False): a cheaper probe.
    keep_text=False extracts text for the counts but does not keep the strings.
    """
    doc, err, offset = _open(data, password)
    if err is not None:
        return err
    assert doc is not None
    try:
        encrypted = bool((doc.metadata or {}).get("encryption"))
        n = doc.page_count
        if n == 0:
            return DocError("zero_pages", "document opens but has no readable pages")
        pages: list[PageProbe] = []
        for i in range(n):
            try:
                page = doc.load_page(i)
                rect = page.rect
                text, chars = None, -1
                if extract_text:
                    text = cast(str, page.get_text("text"))  # "text" mode returns str
                    chars = len("".join(text.split()))
                pages.append(
                    PageProbe(
                        i,
                        float(rect.width),
                        float(rect.height),
                        int(page.rotation),
                        chars,
                        chars >= min_text_chars,
                        text if keep_text else None,
                    )
                )
            except Exception as e:  # a broken page is recorded, never dropped
                pages.append(PageProbe(i, 0.0, 0.0, 0, -1, False, None, f"{type(e).__name__}: {e}"))
        return DocInfo(
            page_count=n,
            pages=pages,
            repaired=bool(doc.is_repaired),  # read after loading pages: repair can happen lazily
            encrypted=encrypted,
            header_offset=offset,
            missing_eof=b"%%EOF" not in bytes(data[-1024:]),
            pdf_format=(doc.metadata or {}).get("format", "") or "",
            warnings=_mupdf_warnings(),
        )
    except Exception as e:
        return DocError("corrupt", f"{type(e).__name__}: {e}")
    finally:
        doc.close()


def _px(length_pt: float, zoom: float) -> int:
    # MuPDF's fz_round_rect: ceil(x - 0.001) for the far edge of a rect starting at 0.
    return max(1, math.ceil(length_pt * zoom - 1e-3))


def fit_zoom(
    width_pt: float, height_pt: float, dpi: float, max_pixels: int | None, max_side_px: int | None
) -> float:
    """Zoom for `dpi`, lowered just enough that the pixmap fits both pixel bounds."""
    if not (width_pt > 0 and height_pt > 0):
        raise ValueError(f"empty page rectangle {width_pt}x{height_pt} pt")
    zoom = dpi / 72.0

    def fits(z: float) -> bool:
        w, h = _px(width_pt, z), _px(height_pt, z)
        return (max_side_px is None or max(w, h) <= max_side_px) and (
            max_pixels is None or w * h <= max_pixels
        )

    if fits(zoom):
        return zoom
    w, h = width_pt, height_pt
    if max_side_px is not None:
        zoom = min(zoom, (max_side_px - 1) / max(w, h))  # rounding up adds < 1 px
    if max_pixels is not None:  # largest z with (w z + 1)(h z + 1) <= max_pixels
        disc = (w + h) ** 2 - 4 * w * h * (1 - max_pixels)
        zoom = min(zoom, (-(w + h) + math.sqrt(disc)) / (2 * w * h))
    while not fits(zoom) and zoom > 1e-6:  # guard against float edge cases
        zoom *= 0.999
    return zoom


def iter_render_pages(
    data: bytes,
    password: str | None,
    page_indices: Sequence[int],
    options: RenderOptions = DEFAULT_RENDER,
    *,
    output: Output = "array",
    extract_text: bool = True,
    count_blocks: bool = False,
) -> Iterator[PageImage | PageError]:
    """Yield one PageImage or PageError per requested index, in order, as each is rendered (lazily:
    a page is rendered when the next item is asked for; `options` gives dpi and pixel bounds).

    count_blocks: also count each page's non-empty text blocks into PageImage.text_blocks (the
    forced-length rule of `pipeline.forced`; the tokenizer never runs in the renderer)."""
    if output not in ("array", "png", "both"):
        raise ValueError(f"output must be 'array', 'png' or 'both', not {output!r}")
    doc, err, _ = _open(data, password)
    if err is not None:
        for i in page_indices:
            yield PageError(i, "render_error", f"cannot open document: {err.code}: {err.message}")
        return
    assert doc is not None
    try:
        n = doc.page_count
        for i in page_indices:
            t0 = time.perf_counter()
            if not 0 <= i < n:
                yield PageError(i, "render_error", f"page index {i} out of range (document has {n} pages)")
                continue
            try:
                page = doc.load_page(i)
                rect = page.rect
                zoom = options.zoom(rect.width, rect.height)
                pix = page.get_pixmap(
                    matrix=pymupdf.Matrix(zoom, zoom), alpha=False, colorspace=pymupdf.csRGB
                )
                pixels = png = None
                if output in ("array", "both"):
                    assert pix.n == 3 and pix.stride == pix.width * 3, (pix.n, pix.stride)
                    pixels = np.frombuffer(pix.samples, dtype=np.uint8).reshape(pix.height, pix.width, 3)
                if output in ("png", "both"):
                    png = pix.tobytes("png")
                text = cast(str, page.get_text("text")) if extract_text else None  # "text" mode returns str
                blocks = forced.text_blocks(page) if count_blocks else -1
                img = PageImage(
                    page_index=i,
                    width_px=pix.width,
                    height_px=pix.height,
                    dpi=zoom * 72.0,
                    width_pt=float(rect.width),
                    height_pt=float(rect.height),
                    rotation=int(page.rotation),
                    scaled_down=zoom < options.dpi / 72.0,
                    render_ms=(time.perf_counter() - t0) * 1000.0,
                    text_chars=len("".join(text.split())) if text is not None else -1,
                    text=text,
                    pixels=pixels,
                    png=png,
                    text_blocks=blocks,
                )
                del pix, page
            except Exception as e:
                yield PageError(i, "render_error", f"{type(e).__name__}: {e}")
                continue
            yield img
    finally:
        doc.close()


def render_pages(
    data: bytes,
    password: str | None,
    page_indices: Sequence[int],
    options: RenderOptions = DEFAULT_RENDER,
    **products: Unpack[PageProducts],
) -> list[PageImage | PageError]:
    """Render the requested pages in-process; exactly one result per requested index, in order
    (`iter_render_pages`, all at once)."""
    return list(iter_render_pages(data, password, page_indices, options, **products))


def page_ranges(page_count: int, max_pages_per_task: int) -> list[range]:
    """Split [0, page_count) into consecutive ranges of at most `max_pages_per_task` pages."""
    if max_pages_per_task < 1:
        raise ValueError("max_pages_per_task must be >= 1")
    return [
        range(s, min(s + max_pages_per_task, page_count))
        for s in range(0, max(page_count, 0), max_pages_per_task)
    ]
