"""PDF probing and rendering (pipeline.render) and the killable renderer child (pipeline.render_proc).

Real MuPDF on the real dev corpus; the worker tests use the documented fault hook
(`PAGEMILL_TEST_RENDER_FAULT`, pipeline.faults) to make the child hang or SIGSEGV, with short
timeouts so the whole file stays fast.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from pathlib import Path
from typing import cast

import numpy as np
import pymupdf
import pytest
from PIL import Image

from pipeline.faults import RENDER_FAULT_ENV, RenderFault, render_fault
from pipeline.render import (
    DocError,
    DocInfo,
    PageError,
    PageImage,
    RenderOptions,
    fit_zoom,
    page_ranges,
    probe_document,
    render_pages,
)
from pipeline.render_proc import RenderWorker, probe_in_subprocess, render_in_subprocess

# MANIFEST expected_behavior -> probe_document's DocError code (without a password)
ERROR_CODES = {
    "error:empty-file": "empty_file",
    "error:not-a-pdf": "not_a_pdf",
    "error:no-pages": "zero_pages",
    "error:password-required": "needs_password",
}


@pytest.fixture(scope="module")
def manifest(corpus_dir: Path) -> list[dict[str, str]]:
    with open(corpus_dir / "MANIFEST.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 68, "the dev corpus README describes 68 files"
    return rows


@pytest.fixture(scope="module")
def corpus_bytes(corpus_dir: Path, manifest: list[dict[str, str]]) -> dict[str, bytes]:
    return {r["file"]: (corpus_dir / r["file"]).read_bytes() for r in manifest}


def _counts(spec: str) -> dict[str, int]:
    """MANIFEST 'a:n;b:m' -> {'a': n, 'b': m}."""
    return {k: int(v) for k, v in (x.rsplit(":", 1) for x in spec.split(";"))} if spec else {}


# ---------------------------------------------------------------- probe_document vs MANIFEST


def test_probe_every_corpus_file_matches_manifest(manifest, corpus_bytes) -> None:
    problems: list[str] = []
    n_pages = n_errors = 0
    for row in manifest:
        name, data, expected = row["file"], corpus_bytes[row["file"]], row["expected_rows"]
        password = row["password"] or None
        if expected.startswith("pages:"):
            n = int(expected.split(":")[1])
            info = probe_document(data, password)
            if not isinstance(info, DocInfo):
                problems.append(f"{name}: expected {n} pages, got {info}")
                continue
            n_pages += n
            got = {
                "page_count": info.page_count,
                "len(pages)": len(info.pages),
                "page_errors": [p.index for p in info.pages if p.error],
                "repaired": info.repaired,
                "encrypted": info.encrypted,
                "has_text_layer": info.has_text_layer,
                "text_pages": info.text_pages,
                # the manifest's measured sizes are page.rect (what gets rendered, after /Rotate)
                "sizes": _size_counts(info),
                "rotations": {str(k): v for k, v in _rotation_counts(info).items()},
            }
            want = {
                "page_count": n,
                "len(pages)": n,
                "page_errors": [],
                "repaired": row["expected_behavior"] == "repairable",
                "encrypted": row["kind"] == "encrypted",
                "has_text_layer": row["has_text_layer"],
                "text_pages": int(row["text_pages"]),
                "sizes": _counts(row["page_sizes_pt"]),
                "rotations": _counts(row["rotations"]),
            }
            bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            if bad:
                problems.append(f"{name}: (got, want) {bad}")
        else:
            assert expected == "doc_error", expected
            n_errors += 1
            err = probe_document(data, None)
            code = ERROR_CODES[row["expected_behavior"]]
            if not (isinstance(err, DocError) and err.code == code and err.message):
                problems.append(f"{name}: expected DocError({code!r}), got {err}")
            if password:  # encrypted-needs-password-*: the right password opens it
                info = probe_document(data, password, extract_text=False)
                if not (
                    isinstance(info, DocInfo) and info.page_count == int(row["pages"]) and info.encrypted
                ):
                    problems.append(f"{name}: with password {password!r}: {info}")
    assert not problems, "\n".join(problems)
    assert (n_pages, n_errors) == (584 - 5, 5)  # README totals: 584 pages, 5 of them in password files


def _size_counts(info: DocInfo) -> dict[str, int]:
    out: dict[str, int] = {}
    for w, h in info.page_sizes_pt:
        key = f"{round(w)}x{round(h)}"
        out[key] = out.get(key, 0) + 1
    return out


def _rotation_counts(info: DocInfo) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in info.pages:
        if p.rotation:
            out[p.rotation] = out.get(p.rotation, 0) + 1
    return out


def test_probe_password_handling(corpus_bytes) -> None:
    data = corpus_bytes["encrypted-needs-password-02.pdf"]
    missing = probe_document(data)
    wrong = probe_document(data, "not-the-password")
    assert (
        isinstance(missing, DocError) and missing.code == "needs_password" and "none given" in missing.message
    )
    assert isinstance(wrong, DocError) and wrong.code == "needs_password" and "wrong" in wrong.message
    ok = probe_document(data, "test")
    assert isinstance(ok, DocInfo) and ok.page_count == 4 and ok.text_pages == 4
    # owner-only encryption (empty user password) opens with no password, and a password is harmless
    for name in ("encrypted-owner-only-aes-01.pdf", "encrypted-owner-only-table-01.pdf"):
        for pw in (None, "whatever"):
            info = probe_document(corpus_bytes[name], pw, extract_text=False)
            assert isinstance(info, DocInfo) and info.page_count == 2 and info.encrypted, (name, pw, info)


def test_probe_options_and_odd_inputs(corpus_bytes) -> None:
    data = corpus_bytes["code-and-formula-01.pdf"]
    full = probe_document(data)
    cheap = probe_document(data, extract_text=False)
    counts_only = probe_document(data, keep_text=False)
    assert isinstance(full, DocInfo) and isinstance(cheap, DocInfo) and isinstance(counts_only, DocInfo)
    assert all(p.text and p.text_chars >= 20 and p.has_text for p in full.pages)
    assert all(p.text is None and p.text_chars == -1 and not p.has_text for p in cheap.pages)
    assert counts_only.text_chars == full.text_chars and all(p.text is None for p in counts_only.pages)
    assert full.without_text() == counts_only
    assert full.header_offset == 0 and not full.missing_eof and full.pdf_format.startswith("PDF ")

    junk = probe_document(corpus_bytes["broken-junk-before-header-01.pdf"], extract_text=False)
    assert isinstance(junk, DocInfo) and junk.header_offset > 0 and junk.repaired
    truncated = probe_document(corpus_bytes["broken-truncated-scan-01.pdf"], extract_text=False)
    assert isinstance(truncated, DocInfo) and truncated.missing_eof and truncated.repaired

    # MuPDF would happily open a PNG or HTML as a "document": content is checked, not the suffix
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    for blob in (png.getvalue(), b"<html><body>hi</body></html>", b"   \n"):
        err = probe_document(blob)
        assert isinstance(err, DocError) and err.code == "not_a_pdf", (blob[:8], err)
    # a header followed by no object syntax is not a PDF either; objects but no page tree: zero pages
    err = probe_document(b"%PDF-1.7\n" + b"garbage" * 50)
    assert isinstance(err, DocError) and err.code == "not_a_pdf", err
    err = probe_document(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer << /Root 1 0 R >>\n%%EOF")
    assert isinstance(err, DocError) and err.code == "zero_pages", err
    # memoryview / bytearray inputs behave like bytes (what Arrow buffers hand us)
    # (probe_document is annotated `bytes`; the casts only tell pyright what is being tested)
    assert probe_document(cast(bytes, bytearray(data)), extract_text=False) == cheap
    assert probe_document(cast(bytes, memoryview(data)), extract_text=False) == cheap


# ---------------------------------------------------------------- render_pages


def _mupdf_size(data: bytes, index: int, zoom: float) -> tuple[int, int]:
    """Pixmap size MuPDF itself produces for page.rect at this zoom (independent of our _px)."""
    with pymupdf.open(stream=data, filetype="pdf") as doc:
        ir = (doc[index].rect * pymupdf.Matrix(zoom, zoom)).irect
        return ir.width, ir.height


@pytest.mark.parametrize(
    ("name", "pages", "dpi"),
    [
        ("paper-2col-mixedsize-01.pdf", [0, 13], 100),  # non-integer point sizes
        ("code-and-formula-01.pdf", [0, 1], 144),  # letter then A4 in one document
        ("rotated-page-90-01.pdf", [0], 144),  # /Rotate 90: rendered landscape
        ("odd-page-small-scan-ocr-01.pdf", [0], 200),  # tiny 180 x 300 pt page
        ("scan-multipage-rotations-4p-01.pdf", [1, 3], 72),  # repaired on open, rotated pages
    ],
)
def test_render_size_matches_page_size_times_dpi(corpus_bytes, name, pages, dpi) -> None:
    data = corpus_bytes[name]
    info = probe_document(data, extract_text=False)
    assert isinstance(info, DocInfo)
    out = render_pages(data, None, pages, RenderOptions(dpi=dpi), extract_text=False)
    assert [r.page_index for r in out] == pages
    for r in out:
        assert isinstance(r, PageImage), r
        probe = info.pages[r.page_index]
        assert (r.width_pt, r.height_pt, r.rotation) == (probe.width_pt, probe.height_pt, probe.rotation)
        assert r.dpi == pytest.approx(dpi) and not r.scaled_down
        exact_w, exact_h = r.width_pt * dpi / 72, r.height_pt * dpi / 72
        assert abs(r.width_px - exact_w) < 1 and abs(r.height_px - exact_h) < 1
        assert (r.width_px, r.height_px) == (math.ceil(exact_w - 1e-3), math.ceil(exact_h - 1e-3))
        assert (r.width_px, r.height_px) == _mupdf_size(data, r.page_index, dpi / 72)
        assert r.pixels is not None and r.pixels.dtype == np.uint8
        assert r.pixels.shape == (r.height_px, r.width_px, 3)
        assert r.pixels.min() < 128 < r.pixels.max() or name.startswith("scan"), "page renders blank"
        assert r.png is None and r.text is None and r.text_chars == -1
    if name == "rotated-page-90-01.pdf":
        assert isinstance(out[0], PageImage)
        assert out[0].rotation == 90 and out[0].width_px > out[0].height_px


def test_very_tall_page_is_shrunk_to_max_side(corpus_bytes) -> None:
    data = corpus_bytes["odd-page-very-tall-01.pdf"]
    default_side = RenderOptions().max_side_px
    assert default_side is not None
    for max_side in (default_side, 2000):
        first, tall = render_pages(
            data, None, [0, 1], RenderOptions(dpi=144, max_side_px=max_side), extract_text=False
        )
        assert isinstance(first, PageImage) and isinstance(tall, PageImage)
        assert not first.scaled_down and first.dpi == 144 and (first.width_px, first.height_px) == (1224, 792)
        assert tall.height_pt > 14000 and tall.scaled_down
        assert max(tall.width_px, tall.height_px) <= max_side
        assert tall.height_px >= 0.99 * max_side  # lowered just enough, not more
        assert tall.dpi < 144 * max_side / (tall.height_pt * 2)  # 234 x 14295 pt at 144 dpi is 28590 px
        assert abs(tall.height_px - tall.height_pt * tall.dpi / 72) < 1
        assert abs(tall.width_px - tall.width_pt * tall.dpi / 72) < 1
        assert tall.pixels is not None and tall.pixels.shape == (tall.height_px, tall.width_px, 3)
        assert (tall.width_px, tall.height_px) == _mupdf_size(data, 1, tall.dpi / 72)


def test_max_pixels_bound_and_fit_zoom(corpus_bytes) -> None:
    data = corpus_bytes["scan-book-6p-01.pdf"]  # page 1 is a 2160 x 2160 pt scan
    (img,) = render_pages(data, None, [1], RenderOptions(dpi=144, max_pixels=1_000_000), extract_text=False)
    assert isinstance(img, PageImage) and img.scaled_down and img.width_pt == 2160
    assert 0.98e6 < img.width_px * img.height_px <= 1_000_000
    for w, h in [(612, 792), (234, 14295), (2160, 2160), (1, 5000), (5000, 1)]:
        for dpi, mp, ms in [(144, 25_000_000, 8192), (600, 4096, 64), (300, None, 1000), (72, 10_000, None)]:
            z = fit_zoom(w, h, dpi, mp, ms)
            pw, ph = _px_mupdf(w, z), _px_mupdf(h, z)
            assert z <= dpi / 72
            assert ms is None or max(pw, ph) <= ms, (w, h, dpi, mp, ms, z)
            assert mp is None or pw * ph <= mp, (w, h, dpi, mp, ms, z)
    with pytest.raises(ValueError):
        fit_zoom(0, 100, 144, None, None)


def _px_mupdf(length_pt: float, zoom: float) -> int:
    return max(1, (pymupdf.Rect(0, 0, length_pt, 1) * pymupdf.Matrix(zoom, zoom)).irect.width)


def test_render_outputs_text_and_errors(corpus_bytes) -> None:
    data = corpus_bytes["paper-arxiv-math-01.pdf"]
    (both,) = render_pages(data, None, [0], RenderOptions(dpi=50), output="both")
    (png,) = render_pages(data, None, [0], RenderOptions(dpi=50), output="png", extract_text=False)
    assert isinstance(both, PageImage) and isinstance(png, PageImage)
    assert both.png is not None and both.png.startswith(b"\x89PNG\r\n\x1a\n") and png.pixels is None
    assert png.png is not None and both.pixels is not None
    decoded = np.asarray(Image.open(io.BytesIO(png.png)).convert("RGB"))
    assert np.array_equal(decoded, both.pixels)
    assert both.text and both.text_chars == len("".join(both.text.split())) > 100
    with pytest.raises(ValueError, match="output"):
        render_pages(data, None, [0], output="jpeg")  # type: ignore[arg-type]

    # out-of-range pages become PageErrors in place; nothing is dropped or reordered
    out = render_pages(data, None, [5, 0, -1, 0], RenderOptions(dpi=36), extract_text=False)
    assert [type(r) for r in out] == [PageError, PageImage, PageError, PageImage]
    assert [r.page_index for r in out] == [5, 0, -1, 0]
    assert isinstance(out[0], PageError) and "out of range" in out[0].message

    # a document that cannot be opened gives one render_error per requested page
    locked = corpus_bytes["encrypted-needs-password-01.pdf"]
    # all PageErrors (asserted just below); the cast lets pyright see `.code` / `.message`
    errs = cast(list[PageError], render_pages(locked, None, [0, 1, 2]))
    assert [(e.page_index, e.code) for e in errs] == [
        (0, "render_error"),
        (1, "render_error"),
        (2, "render_error"),
    ]
    assert all(isinstance(e, PageError) and "needs_password" in e.message for e in errs)
    (ok,) = render_pages(locked, "openpassword", [0], RenderOptions(dpi=36))
    assert isinstance(ok, PageImage) and ok.text_chars > 20
    assert page_ranges(5, 2) == [range(0, 2), range(2, 4), range(4, 5)] and page_ranges(0, 3) == []


# ---------------------------------------------------------------- RenderWorker (child process)

DOC = "paper-2col-tracemonkey-01.pdf"  # 14 born-digital pages, fast at 36 dpi


@pytest.fixture
def fault(monkeypatch):
    """set(spec): the renderer fault of the next renders (None: none). The variable is parsed once
    per process (`render_fault` is cached), so each change clears the cache, as a new process would."""

    def set_(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv(RENDER_FAULT_ENV, raising=False)
        else:
            monkeypatch.setenv(RENDER_FAULT_ENV, spec)
        render_fault.cache_clear()

    yield set_
    set_(None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_matches_in_process_render_and_probe(corpus_bytes) -> None:
    data = corpus_bytes[DOC]
    with RenderWorker() as w:
        got = w.render(data, None, [3, 0, 99], RenderOptions(dpi=40))
        info = w.probe(data, extract_text=False)
        assert w.children_started == 1
    want = render_pages(data, None, [3, 0, 99], RenderOptions(dpi=40))
    assert [type(r) for r in got] == [PageImage, PageImage, PageError]
    for g, e in zip(got[:2], want[:2]):
        assert isinstance(g, PageImage) and isinstance(e, PageImage)
        assert (g.page_index, g.width_px, g.height_px, g.text) == (
            e.page_index,
            e.width_px,
            e.height_px,
            e.text,
        )
        assert g.pixels is not None and e.pixels is not None  # output="array" (the default)
        assert np.array_equal(g.pixels, e.pixels)
    assert got[2] == want[2]
    assert (
        isinstance(info, DocInfo)
        and info.pages == cast(DocInfo, probe_document(data, extract_text=False)).pages
    )
    err = probe_in_subprocess(b"")
    assert isinstance(err, DocError) and err.code == "empty_file"
    one = render_in_subprocess(data, None, [1], RenderOptions(dpi=36))
    assert len(one) == 1 and isinstance(one[0], PageImage) and one[0].page_index == 1


def test_worker_kills_hung_render_and_recovers(corpus_bytes, fault) -> None:
    data = corpus_bytes[DOC]
    with RenderWorker() as w:
        assert isinstance(w.render(data, None, [0], RenderOptions(dpi=36))[0], PageImage)
        pid = w.pid
        assert pid is not None and _alive(pid)
        t0 = time.monotonic()
        # every page times out: all PageErrors (asserted below; the cast is for pyright)
        fault("hang:0")
        out = cast(list[PageError], w.render(data, None, [0, 1, 2], RenderOptions(dpi=36, timeout_s=1.5)))
        elapsed = time.monotonic() - t0
        assert 1.4 < elapsed < 10, elapsed
        assert [(type(r), r.page_index, r.code) for r in out] == [
            (PageError, i, "render_error") for i in (0, 1, 2)
        ]
        assert all("timed out" in r.message for r in out)
        assert w.pid is None and not _alive(pid)  # the hung child was killed and reaped
        fault(None)
        again = w.render(data, None, [2, 1], RenderOptions(dpi=36))
        assert [(type(r), r.page_index) for r in again] == [(PageImage, 2), (PageImage, 1)]
        assert w.children_started == 2 and w.pid != pid

        # a per-page timeout kills only the page in flight; a fresh child does the rest
        t0 = time.monotonic()
        fault("hang:1")
        out = w.render(data, None, [0, 1, 2, 3], RenderOptions(dpi=36, timeout_s=30, page_timeout_s=1.0))
        assert time.monotonic() - t0 < 10
        assert [(type(r), r.page_index) for r in out] == [
            (PageImage, 0),
            (PageError, 1),
            (PageImage, 2),
            (PageImage, 3),
        ]
        assert isinstance(out[1], PageError) and "page render timed out" in out[1].message
        assert w.children_started == 3


def test_worker_crash_costs_only_the_page_in_flight(corpus_bytes, fault) -> None:
    data = corpus_bytes[DOC]
    pages = [4, 0, 7, 1, 2]
    with RenderWorker() as w:
        fault("crash:1")
        out = w.render(data, None, pages, RenderOptions(dpi=36))
        assert [(type(r), r.page_index) for r in out] == [
            (PageImage, 4),
            (PageError, 0),
            (PageImage, 7),
            (PageImage, 1),
            (PageImage, 2),
        ]
        assert isinstance(out[1], PageError)
        assert out[1].code == "render_error" and "crashed" in out[1].message and "SIGSEGV" in out[1].message
        assert w.children_started == 2

        # without retry, the rest of the request gets the same error instead
        out = w.render(data, None, pages, RenderOptions(dpi=36), retry_after_failure=False)
        assert [type(r) for r in out] == [PageImage] + [PageError] * 4
        assert [r.page_index for r in out] == pages and len(
            {r.message for r in cast(list[PageError], out[1:])}
        ) == 1
        assert w.children_started == 2 and w.pid is None  # the dead child is replaced when next needed

        # the fault is read in the parent and sent with each request (the child's env is stale)
        fault("crash:0")
        out = w.render(data, None, [0, 1], RenderOptions(dpi=36))
        assert [type(r) for r in out] == [PageError, PageImage] and w.children_started == 4
        fault(None)
        assert all(isinstance(r, PageImage) for r in w.render(data, None, [0, 1], RenderOptions(dpi=36)))


def test_worker_recycles_child(corpus_bytes) -> None:
    data = corpus_bytes[DOC]
    with RenderWorker(recycle_after=2) as w:
        pids = []
        for i in range(5):
            if i == 2:
                assert isinstance(w.probe(data, extract_text=False), DocInfo)  # a probe is a task too
            else:
                assert isinstance(w.render(data, None, [i], RenderOptions(dpi=36))[0], PageImage)
            pids.append(w.pid)
        # recycled right after the 2nd and 4th task: the child is stopped (pid None) until needed
        assert pids[1] is None and pids[3] is None and pids[0] != pids[2]
        assert pids[4] is not None and w.children_started == 3
        # the children's CPU seconds (as they reported them) survive their recycling
        assert w.children_cpu_s > 0
        before = w.children_cpu_s
        w.render(data, None, [0], RenderOptions(dpi=36))
        assert w.children_cpu_s > before
    with RenderWorker(max_rss_mb=1) as w:  # every child ends above 1 MB: replaced after each task
        for _ in range(2):
            w.render(data, None, [0], RenderOptions(dpi=36))
            assert w.pid is None and w.last_rss_bytes > 2**20
        assert w.children_started == 2
    with pytest.raises(ValueError):
        RenderWorker(recycle_after=0)


def test_document_that_keeps_crashing_renderers_is_quarantined(corpus_dir: Path, fault) -> None:
    """Every page kills its renderer: after `max_failures` crashes the rest of the range is not
    tried again but gets `quarantined` errors, one per page, and the worker still works after."""
    from pipeline.render_proc import RenderWorker

    data = (corpus_dir / "slides-deck-26p-01.pdf").read_bytes()
    with RenderWorker(recycle_after=50) as w:
        fault("crashall")
        # every page fails: all PageErrors (the cast is for pyright; the codes are asserted below)
        out = cast(
            list[PageError],
            w.render(data, None, list(range(6)), RenderOptions(dpi=36, timeout_s=60, max_failures=2)),
        )
        assert [r.page_index for r in out] == list(range(6))
        assert [r.code for r in out] == [
            "render_error",
            "render_error",
            "quarantined",
            "quarantined",
            "quarantined",
            "quarantined",
        ]
        assert "quarantined after 2 renderer crashes" in out[2].message and "SIGSEGV" in out[2].message
        fault(None)
        again = w.render(data, None, [0], RenderOptions(dpi=36, timeout_s=60))
        assert isinstance(again[0], PageImage) and again[0].width_px > 0


def test_render_fault_spec_is_parsed_once_and_strictly(fault) -> None:
    """A malformed PAGEMILL_TEST_RENDER_FAULT is an error, not a test silently run without its
    fault; a retry's fault is re-based on the pages already done."""
    assert RenderFault.parse("") == RenderFault() and not RenderFault()
    assert (
        RenderFault.parse("crash:2") == RenderFault("crash", 2) and RenderFault.parse("sleep:0.5").arg == 0.5
    )
    assert RenderFault.parse("crash") == RenderFault("crash", 0)  # no page: the first
    for bad in ("hang:x", "hang:1.5", "explode:1", "sleep:-1"):
        with pytest.raises(ValueError, match=RENDER_FAULT_ENV):
            RenderFault.parse(bad)
    assert RenderFault("hang", 3).after(2) == RenderFault("hang", 1)
    assert not RenderFault("hang", 3).after(4) and RenderFault("sleep", 1).after(9) == RenderFault("sleep", 1)
    fault("crash:1")
    assert render_fault() == RenderFault("crash", 1)
    os.environ[RENDER_FAULT_ENV] = "hang:0"  # a later change is not seen: parsed once per process
    assert render_fault() == RenderFault("crash", 1)


def test_render_options_are_the_job_defaults() -> None:
    """The job's RenderConfig takes its render bounds from RenderOptions and hands them back whole:
    the benchmarks (RenderOptions()) and the job cannot render under different bounds."""
    from pipeline.config import RenderConfig

    assert RenderConfig().options() == RenderOptions()
    custom = RenderConfig(dpi=200, max_pixels=10_000, max_side_px=900, timeout_s=5, max_failures=1)
    assert custom.options() == RenderOptions(200.0, 10_000, 900, timeout_s=5, max_failures=1)
    with pytest.raises(ValueError, match="max_failures"):
        RenderOptions(max_failures=0)
