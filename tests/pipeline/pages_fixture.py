"""Known pages and known grounding strings for the output tests (no model, no Ray).

The tiny random model rarely emits grounding tags, so box and figure logic is fed the model's
output format (spec §5.1) directly: `ocr_row` builds the row a page has when it reaches the writer
(the page PNG, text layer, raw output, finish reason), exactly as the OCR stage leaves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.outputs import encode_png
from pipeline.render import PageImage, RenderOptions, render_pages
from pipeline.sources import content_id

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "tests" / "data" / "paper-arxiv-math-01.pdf"  # 595.276 x 841.89 pt, one page
EOS = "<｜end▁of▁sentence｜>"

# A known grounding string: title, a figure, a text block (0-999 boxes, spec §5.1).
GROUNDING = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# A known title\n\n"
    "<|ref|>image<|/ref|><|det|>[[250, 300, 750, 600]]<|/det|>\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 650, 900, 950]]<|/det|>\nSome body text of the page.\n\n" + EOS
)
# At 72 dpi the page is 596 x 842 px; x_px = int(x / 999 * W), y_px = int(y / 999 * H):
IMAGE_BOX_PX = (149, 252, 447, 505)  # int(250/999*596), int(300/999*842), int(750/999*596), int(600/999*842)
TITLE_BOX_PX = (59, 42, 536, 101)


def render_paper(dpi: float = 72) -> PageImage:
    (page,) = render_pages(PAPER.read_bytes(), None, [0], RenderOptions(dpi=dpi))
    assert isinstance(page, PageImage)
    return page


def ocr_row(
    raw_output: str = GROUNDING,
    *,
    page: PageImage | None = None,
    doc_id: str | None = None,
    page_index: int = 0,
    finish_reason: str = "stop",
    config_hash: str = "cfg0",
    source_uri: str | None = None,
    num_output_tokens: int = 60,
    num_vision_tokens: int = 273,
    **extra: Any,
) -> dict[str, Any]:
    """A row as the OCR stage hands it to the writer (in flight: no status yet)."""
    page = page or render_paper()
    row = {
        "doc_id": doc_id or content_id(PAPER.read_bytes()),
        "source_uri": source_uri or PAPER.as_uri(),
        "page_index": page_index,
        "page_count": 1,
        "width_pt": page.width_pt,
        "height_pt": page.height_pt,
        "width_px": page.width_px,
        "height_px": page.height_px,
        "dpi": page.dpi,
        "mode": "base",
        "status": None,
        "raw_output": raw_output,
        "num_vision_tokens": num_vision_tokens,
        "num_output_tokens": num_output_tokens,
        "finish_reason": finish_reason,
        "text_layer_chars": page.text_chars,
        "model_id": "test",
        "config_hash": config_hash,
        "render_ms": 1.0,
        "ocr_ms": 2.0,
        "_page_png": encode_png(page.pixels),
        "_text_layer": page.text,
    }
    row.update(extra)
    return row
