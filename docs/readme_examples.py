"""Regenerate the README's pictures under docs/images/ (small PNGs, committed).

    python docs/readme_examples.py [--report-from OUTPUT]

1. `inspect-example.png` + `figure-example.png`: page 2 of the TraceMonkey paper from the dev corpus
   (`../shared/corpus/dev`), written by the real writer stage and drawn by `pipeline.inspect`.
   The offline tiny model emits no boxes, so the page's model output is replaced by a grounding
   string in the model's format (spec §5.1) built from the PDF's own text blocks and its figure's
   drawing cluster: what the real model emits for such a page, not what it emitted.
2. `report-*.png`: `pipeline.report` on OUTPUT, a real run (the README's is the dev corpus with the
   tiny random model: `mode=tiny generation.max_new_tokens=48 generation.fallback=none`).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CORPUS = Path(os.environ.get("PAGEMILL_SHARED", REPO.parent / "shared")) / "corpus" / "dev"
PAPER = CORPUS / "paper-2col-tracemonkey-01.pdf"
PAGE = 1
IMAGES = REPO / "docs" / "images"
EOS = "<｜end▁of▁sentence｜>"


def grounding_from_pdf(page_index: int) -> str:
    """`<|ref|>label<|/ref|><|det|>[[...]]<|/det|>` blocks from the PDF's text blocks (reading order:
    left column, then right) and one `image` block per cluster of vector drawings."""
    import pymupdf

    page = pymupdf.open(PAPER)[page_index]
    w, h = page.rect.width, page.rect.height
    figures = [r for r in page.cluster_drawings() if r.width > 100 and r.height > 100]

    def det(r) -> str:
        return (
            f"[[{int(r[0] / w * 999)}, {int(r[1] / h * 999)}, {int(r[2] / w * 999)}, {int(r[3] / h * 999)}]]"
        )

    items = []
    for x0, y0, x1, y1, text, *_ in page.get_text("blocks"):
        rect = pymupdf.Rect(x0, y0, x1, y1)
        if any(f.contains(rect) for f in figures):
            continue  # labels inside the diagram belong to the figure
        text = " ".join(text.split())
        label = (
            "image_caption"
            if text.startswith("Figure")
            else "sub_title"
            if len(text) < 60 and text[:2] == "2."
            else "text"
        )
        content = {"sub_title": f"## {text}", "image_caption": f"<center>{text}</center>"}.get(label, text)
        items.append((x0 > w / 2, y0, f"<|ref|>{label}<|/ref|><|det|>{det(rect)}<|/det|>\n{content}\n\n"))
    for f in figures:
        items.append((f.x0 > w / 2, f.y0, f"<|ref|>image<|/ref|><|det|>{det(f)}<|/det|>\n\n"))
    return "".join(t for *_, t in sorted(items)) + EOS


def inspect_example(tmp: Path) -> None:
    import pyarrow.dataset as ds
    from PIL import Image

    from pipeline.inspect import inspect_page
    from pipeline.render import RenderOptions, render_pages
    from pipeline.run import compose
    from pipeline.sources import content_id
    from pipeline.stages import WriteStage, to_batch

    data = PAPER.read_bytes()
    (page,) = render_pages(data, None, [PAGE], RenderOptions(dpi=144))
    out = tmp / "out"
    cfg = compose(["model=tiny_random", f"output.uri={out}", "mode=base"])
    doc_id = content_id(data)
    row = {
        "doc_id": doc_id,
        "source_uri": PAPER.as_uri(),
        "page_index": PAGE,
        "page_count": 14,
        "width_pt": page.width_pt,
        "height_pt": page.height_pt,
        "width_px": page.width_px,
        "height_px": page.height_px,
        "dpi": page.dpi,
        "mode": "base",
        "status": None,  # in flight: the writer's post-processing sets the final status
        "raw_output": grounding_from_pdf(PAGE),
        "num_vision_tokens": 273,
        "num_output_tokens": 0,
        "finish_reason": "stop",
        "text_layer_chars": page.text_chars,
        "model_id": "grounding from the PDF (demo)",
        "config_hash": cfg.config_hash(),
        "_pixels": page.pixels.tobytes(),
        "_text_layer": page.text,
        "page_image": None,
    }
    WriteStage(cfg, str(out))(to_batch([row]))
    path, written = inspect_page(str(out), doc_id, PAGE, str(IMAGES / "inspect-example.png"), max_side=900)
    _shrink(Path(path))
    (fig,) = ds.dataset(out / "figures", format="parquet").to_table().to_pylist()
    img = Image.open(io.BytesIO(fig["image"]["bytes"]))
    img.thumbnail((420, 420))
    img.save(IMAGES / "figure-example.png", optimize=True)
    print(
        f"{path}: {len(written['layout'])} blocks; figure {fig['name']} {fig['width_px']}x{fig['height_px']}"
    )
    print(written["markdown"][:600])


def _shrink(path: Path) -> None:
    """Palette PNG: a page picture in tens of KB instead of hundreds."""
    from PIL import Image

    img = Image.open(path).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    img.save(path, optimize=True)


def report_example(output: str, tmp: Path) -> None:
    from pipeline.report import PLOTS, write_report

    index = write_report(output, str(tmp / "report"), worst=10)
    for name in PLOTS:
        shutil.copy(tmp / "report" / f"{name}.png", IMAGES / f"report-{name}.png")
    print(index)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report-from", help="a run's output.uri to make the report pictures from")
    args = p.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        inspect_example(Path(tmp))
        if args.report_from:
            report_example(args.report_from, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
