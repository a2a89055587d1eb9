"""Looking at results: layout boxes drawn at the right pixels (pipeline.inspect) and the run report
(pipeline.report) rendered without a display, on outputs written by the real writer stage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.inspect import PALETTE, draw_layout, main as inspect_main
from pipeline.outputs import encode_png
from pipeline.run import compose
from pipeline.schema import page_image_name
from pipeline.stages import WriteStage, postprocess_row, to_batch
from tests.pipeline.pages_fixture import GROUNDING, IMAGE_BOX_PX, REPO, TITLE_BOX_PX, ocr_row, render_paper


@pytest.fixture(scope="module")
def page():
    return render_paper()


def _changed_bbox(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.any(a != b, axis=2))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_boxes_land_at_the_right_pixels(page) -> None:
    """The known grounding string on the known page (596 x 842 px): each drawn box covers exactly
    the pixels int(x/999*W) .. int(x2/999*W)-1 (the crop's pixels), outline in the label's colour."""
    layout = postprocess_row(ocr_row(GROUNDING, page=page))["layout"]
    assert [b["label"] for b in layout] == ["title", "image", "text"]
    orig = page.pixels
    for block, (x1, y1, x2, y2), width in ((layout[0], TITLE_BOX_PX, 4), (layout[1], IMAGE_BOX_PX, 2)):
        drawn = np.asarray(draw_layout(Image.fromarray(orig), [block], labels=False))
        assert drawn.shape == orig.shape
        assert _changed_bbox(drawn, orig) == (x1, y1, x2, y2)
        colour = PALETTE[block["label"]]
        ymid, xmid = (y1 + y2) // 2, (x1 + x2) // 2
        for x in (x1, x1 + width - 1, x2 - 1):  # outline: `width` px inside the box edges
            assert tuple(drawn[ymid, x]) == colour
        assert tuple(drawn[y1, xmid]) == colour and tuple(drawn[y2 - 1, xmid]) == colour
        assert np.array_equal(drawn[ymid, x1 - 1], orig[ymid, x1 - 1])  # just outside: untouched
        assert np.array_equal(drawn[y2, xmid], orig[y2, xmid])


def test_labels_are_drawn_above_the_box(page) -> None:
    layout = postprocess_row(ocr_row(GROUNDING, page=page))["layout"]
    x1, y1, x2, y2 = IMAGE_BOX_PX
    plain = np.asarray(draw_layout(Image.fromarray(page.pixels), [layout[1]], labels=False))
    labelled = np.asarray(draw_layout(Image.fromarray(page.pixels), [layout[1]], labels=True))
    diff = np.any(plain != labelled, axis=2)
    ys, xs = np.nonzero(diff)
    assert ys.size and y1 - 30 <= ys.min() < y1 and xs.min() >= x1  # a label line above the box


def _write(out: Path, rows: list[dict], *overrides: str) -> str:
    cfg = compose(["model=tiny_random", f"output.uri={out}", *overrides])
    for r in rows:
        r["config_hash"] = cfg.config_hash()
    WriteStage(cfg, str(out))(to_batch(rows))
    return cfg.config_hash()


def test_inspect_cli_writes_the_annotated_page_and_prints_markdown(tmp_path: Path, page, capsys) -> None:
    """With the page image stored and without it (re-rendered from the PDF): same annotated PNG."""
    stored, rendered = tmp_path / "stored", tmp_path / "rendered"
    png = encode_png(page.pixels)
    row = ocr_row(GROUNDING, page=page)
    _write(
        stored,
        [dict(row, page_image={"bytes": png, "path": page_image_name(row["doc_id"], 0)})],
        "output.include_images=true",
    )
    _write(rendered, [dict(row)])
    images = []
    for out in (stored, rendered):
        target = tmp_path / f"{out.name}.png"
        assert (
            inspect_main(
                [
                    str(out),
                    "--doc",
                    "paper-arxiv-math-01.pdf",
                    "--page",
                    "0",
                    "--out",
                    str(target),
                    "--max-side",
                    "0",
                ]
            )
            == 0
        )
        cap = capsys.readouterr()
        assert cap.out.startswith("# A known title") and "![](figures/" in cap.out
        assert "3 boxes" in cap.err and str(target) in cap.err and "status=ok" in cap.err
        img = np.asarray(Image.open(target).convert("RGB"))
        assert img.shape == page.pixels.shape
        x1, y1, x2, y2 = IMAGE_BOX_PX
        assert tuple(img[(y1 + y2) // 2, x1]) == PALETTE["image"]
        images.append(img)
    assert np.array_equal(images[0], images[1])
    # a doc_id prefix works too; an unknown document is a clear error
    assert (
        inspect_main(
            [
                str(stored),
                "--doc",
                row["doc_id"][:10],
                "--page",
                "0",
                "--out",
                str(tmp_path / "p.png"),
                "--max-side",
                "400",
            ]
        )
        == 0
    )
    assert max(Image.open(tmp_path / "p.png").size) == 400
    assert inspect_main([str(stored), "--doc", "nope", "--page", "0"]) == 2
    assert "no document matching 'nope'" in capsys.readouterr().err


def test_report_renders_without_a_display_on_an_all_truncated_run(tmp_path: Path, page) -> None:
    """What the tiny model produces: every page `truncated`, plus a doc_error row."""
    out = tmp_path / "out"
    rows = [
        ocr_row(text, page=page, doc_id=f"{i:064x}", finish_reason="length", num_output_tokens=8 + i)
        for i, text in enumerate(["MajMajMaj", page.text[:400], "年以后年以后"])
    ]
    rows.append(
        {
            **ocr_row(page=page, doc_id="e" * 64),
            "page_index": -1,
            "status": "doc_error",
            "error_code": "not_a_pdf",
            "error": "x",
        }
    )
    _write(out, rows)
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env.update(
        MPLBACKEND="TkAgg", PYTHONPATH=str(REPO)
    )  # a GUI backend asked for, no display: must not matter
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.report", str(out), "--worst", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out / "_report"
    assert proc.stdout.strip() == str(report / "index.html")
    html = (report / "index.html").read_text()
    for name in ("status", "throughput", "tokens", "compression", "agreement"):
        assert f'src="{name}.png"' in html
        with Image.open(report / f"{name}.png") as img:
            assert img.format == "PNG" and img.size[0] >= 400 and img.size[1] >= 200
    assert re.search(r"<td>truncated</td><td>3</td>", html) and re.search(
        r"<td>doc_error</td><td>1</td>", html
    )
    # worst pages: the two lowest agreements, ascending; the page that copied its text layer is best
    worst = re.findall(r"<tr><td>(\d)</td><td>([0-9.e-]+)</td>", html)
    assert [w[0] for w in worst] == ["1", "2"]
    assert float(worst[0][1]) <= float(worst[1][1]) < 0.5
    assert f"python -m pipeline.inspect {out} --doc {rows[0]['doc_id']} --page 0" in html


def test_report_without_pages_is_a_clear_error(tmp_path: Path) -> None:
    from pipeline.report import main

    assert main([str(tmp_path)]) == 2
