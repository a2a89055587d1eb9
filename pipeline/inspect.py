"""Look at one page of a run: its image with the layout boxes and labels drawn, and its markdown.

    python -m pipeline.inspect OUTPUT --doc DOC_ID --page N [--out PAGE.png] [--max-side 1600]
        [--storage-options JSON] [--input-storage-options JSON]

DOC_ID may be a unique prefix of the doc_id or the document's file name. The page image is the
row's `page_image` when the run stored it (`output.include_images=true`); otherwise the page is
rendered again from `source_uri` at the row's effective dpi (so it has the row's pixel size).
`--storage-options` are OUTPUT's fsspec options and `--input-storage-options` those of the
source documents (the job's `output.storage_options` and `input.storage_options`).
Boxes use the mapping of the crops and of the official scripts (`int(x / 999 * W)`,
`pipeline.outputs.figure_box_px`) and the official drawing style (spec §5.2: outline width 4 for
`title`, 2 otherwise, translucent fill, label above the box on a white box), with a fixed colour
per label and a label font scaled to the page.
The PNG path and the row's quality signals go to stderr; the page's markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from typing import Any

from pipeline.arrow import pc
from pipeline.cli import add_storage_options, parse_storage_options
from pipeline.outputs import OutputStore, figure_box_px
from pipeline.schema import PAGE_SIGNALS, Status

PALETTE = {
    "title": (220, 20, 60),
    "sub_title": (255, 140, 0),
    "text": (30, 144, 255),
    "table": (34, 139, 34),
    "table_caption": (46, 139, 87),
    "table_footnote": (107, 142, 35),
    "image": (148, 0, 211),
    "image_caption": (199, 21, 133),
    "equation": (0, 139, 139),
}


class InspectError(RuntimeError):
    pass


def label_colour(label: str) -> tuple[int, int, int]:
    if label in PALETTE:
        return PALETTE[label]
    h = hashlib.sha256(label.encode()).digest()
    return (h[0] % 200, h[1] % 200, h[2])  # the official random range, made stable per label


def draw_layout(image: Any, layout: list[dict[str, Any]] | None, labels: bool = True) -> Any:
    """RGB copy of `image` with each block's box (pixels x1..x2-1, y1..y2-1, the crop's pixels)."""
    from PIL import Image, ImageDraw, ImageFont

    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    size = max(11, round(min(base.size) / 70))  # readable after the usual downscale of a page
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    boxes = []
    for block in layout or []:
        if not block.get("bbox_norm"):
            continue
        x1, y1, x2, y2 = figure_box_px(block["bbox_norm"], base.size)
        colour = label_colour(block.get("label") or "unknown")
        width = 4 if block.get("label") == "title" else 2
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(*colour, 255), width=width, fill=(*colour, 20))
        boxes.append((x1, y1, block.get("label") or "unknown", colour))
    if labels:
        for x1, y1, label, colour in boxes:
            ty = max(0, y1 - size - 4)
            draw.rectangle(draw.textbbox((x1, ty), label, font=font), fill=(255, 255, 255, 220))
            draw.text((x1, ty), label, font=font, fill=(*colour, 255))
    return Image.alpha_composite(base, overlay).convert("RGB")


# ----------------------------------------------------------------------------- finding the row


def find_row(store: OutputStore, doc: str, page: int, config_hash: str | None = None) -> dict[str, Any]:
    """The pages/ row of (doc, page); `doc` = doc_id, a unique doc_id prefix, or a file name."""
    from pipeline.documents import last_config_hash, pages_dataset

    pages = pages_dataset(store)
    if pages is None:
        raise InspectError(f"no pages/ under {store.root}")
    keys = pages.to_table(columns=["doc_id", "source_uri"]).to_pylist()
    ids = {k["doc_id"] for k in keys}
    if doc not in ids:
        by_name = {k["doc_id"] for k in keys if k["source_uri"].rstrip("/").rsplit("/", 1)[-1] == doc}
        by_prefix = {d for d in ids if d.startswith(doc)}
        match = by_name or by_prefix
        if len(match) != 1:
            what = "no document" if not match else f"{len(match)} documents"
            raise InspectError(f"{what} matching {doc!r} in {store.root}")
        doc = match.pop()
    flt = (pc.field("doc_id") == doc) & (pc.field("page_index") == page)
    rows = pages.to_table(filter=flt).to_pylist()
    if not rows:
        n = pages.to_table(columns=["page_index"], filter=pc.field("doc_id") == doc).num_rows
        raise InspectError(f"document {doc} has no row for page {page} ({n} rows)")
    config_hash = config_hash or last_config_hash(store)
    mine = [r for r in rows if r["config_hash"] == config_hash] or rows
    return max(mine, key=lambda r: r["written_at"].timestamp() if r["written_at"] else 0.0)


def page_image(
    row: dict[str, Any], password: str | None = None, storage_options: dict[str, Any] | None = None
) -> Any:
    """The page as a PIL image of the row's pixel size: stored PNG, else rendered again (from
    `source_uri`, read with `storage_options`)."""
    from PIL import Image

    if row["status"] == Status.doc_error or not row["width_px"]:
        raise InspectError(f"row has no page image ({row['status']}: {row['error_code']})")
    stored = row.get("page_image")
    if stored and stored.get("bytes"):
        return Image.open(io.BytesIO(stored["bytes"])).convert("RGB")
    from pipeline.render import PageError, RenderOptions, render_pages
    from pipeline.sources import read_document

    data = read_document(row["source_uri"], storage_options)
    (res,) = render_pages(
        data,
        password,
        [row["page_index"]],
        # the row's dpi is the effective one, already lowered to the job's bounds: no bound again
        RenderOptions(dpi=row["dpi"], max_pixels=None, max_side_px=None),
        extract_text=False,
    )
    if isinstance(res, PageError):
        raise InspectError(f"cannot render page {row['page_index']} of {row['source_uri']}: {res.message}")
    assert res.pixels is not None  # output="array" (the default) keeps the pixels
    img = Image.fromarray(res.pixels)
    size = (row["width_px"], row["height_px"])
    return img if img.size == size else img.resize(size)


def inspect_page(
    output: str,
    doc: str,
    page: int,
    out: str | None = None,
    *,
    max_side: int = 1600,
    labels: bool = True,
    password: str | None = None,
    config_hash: str | None = None,
    storage_options: dict[str, Any] | None = None,
    input_storage_options: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Write the annotated page PNG; returns (its path, the row). `storage_options`: OUTPUT's
    fsspec options; `input_storage_options`: those of the row's `source_uri`."""
    store = OutputStore(output, storage_options, create=False)
    row = find_row(store, doc, page, config_hash)
    img = draw_layout(page_image(row, password, input_storage_options), row["layout"], labels=labels)
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    path = out or f"inspect-{row['doc_id'][:12]}-p{page}.png"
    img.save(path, format="PNG", optimize=True)
    return path, row


SIGNALS = ("status", *PAGE_SIGNALS)


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None  # module docstring is present
    p = argparse.ArgumentParser(prog="python -m pipeline.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the run's output.uri")
    p.add_argument("--doc", required=True, help="doc_id, a unique prefix of it, or the file name")
    p.add_argument("--page", type=int, required=True, help="0-based page index")
    p.add_argument("--out", help="PNG path (default: inspect-<doc>-p<N>.png in the current directory)")
    p.add_argument(
        "--max-side", type=int, default=1600, help="shrink the PNG to this longest side (0: full size)"
    )
    p.add_argument("--no-labels", action="store_true", help="boxes only")
    p.add_argument("--password", help="user password, to re-render an encrypted document")
    p.add_argument("--config-hash", help="which configuration's row (default: the last run's)")
    add_storage_options(p)
    add_storage_options(p, "--input-storage-options", "the source documents (to render the page again)")
    args = p.parse_args(argv)
    so = parse_storage_options(p, args.storage_options)
    input_so = parse_storage_options(p, args.input_storage_options, "--input-storage-options")
    try:
        path, row = inspect_page(
            args.output,
            args.doc,
            args.page,
            args.out,
            max_side=args.max_side,
            labels=not args.no_labels,
            password=args.password,
            config_hash=args.config_hash,
            storage_options=so,
            input_storage_options=input_so,
        )
    except InspectError as e:
        print(f"pagemill inspect: {e}", file=sys.stderr)
        return 2
    blocks = [b for b in row["layout"] or [] if b.get("bbox_norm")]
    print(f"{row['source_uri']} page {row['page_index']}: {len(blocks)} boxes -> {path}", file=sys.stderr)
    print("  " + "  ".join(f"{k}={row.get(k)}" for k in SIGNALS), file=sys.stderr)
    print(row["markdown"] or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
