"""The output contract: the Arrow schema of `pages/` rows, and the row statuses.

One row per input page, plus one `doc_error` row (page_index = -1) per document that cannot be
opened at all. Rows are built as plain dicts by the stages and turned into Arrow here, so the
schema is enforced in one place (a missing or mistyped field fails loudly in tests).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1

# Final page statuses. `ok` = the model ended the page with EOS.
STATUSES = ("ok", "render_error", "ocr_error", "truncated", "repetition", "doc_error")

# Document-level reason codes carried in `error_code` of doc_error rows.
DOC_ERROR_CODES = ("empty_file", "not_a_pdf", "corrupt", "needs_password", "zero_pages", "read_error")

BOX = pa.list_(pa.float32(), 4)

LAYOUT_BLOCK = pa.struct(
    [
        pa.field("label", pa.string()),
        pa.field("bbox_norm", pa.list_(pa.int32(), 4)),  # 0-999 as emitted by the model
        pa.field("bbox_pt", BOX),  # PDF points, origin top-left of the rendered page
        pa.field("text", pa.string()),
    ]
)

PAGE_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),  # sha256 of the file bytes
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("page_index", pa.int32(), nullable=False),  # 0-based; -1 for doc_error
        pa.field("page_count", pa.int32()),
        pa.field("width_pt", pa.float32()),
        pa.field("height_pt", pa.float32()),
        pa.field("width_px", pa.int32()),
        pa.field("height_px", pa.int32()),
        pa.field("dpi", pa.float32()),  # effective dpi (lowered for huge pages)
        pa.field("mode", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error", pa.string()),
        pa.field("markdown", pa.string()),
        pa.field("raw_output", pa.string()),
        pa.field("layout", pa.list_(LAYOUT_BLOCK)),
        pa.field("num_vision_tokens", pa.int32()),
        pa.field("num_output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("text_layer_chars", pa.int32()),
        pa.field("model_id", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("render_ms", pa.float32()),
        pa.field("ocr_ms", pa.float32()),
        pa.field("page_image", pa.binary()),  # PNG, only with output.include_images=true
    ],
    metadata={"pagemill_schema_version": str(SCHEMA_VERSION)},
)

COLUMNS = tuple(PAGE_SCHEMA.names)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Arrow table in PAGE_SCHEMA from row dicts; absent optional fields become null."""
    unknown = {k for r in rows for k in r} - set(COLUMNS)
    if unknown:
        raise KeyError(f"row fields not in the page schema: {sorted(unknown)}")
    cols = {name: [r.get(name) for r in rows] for name in COLUMNS}
    return pa.table(cols, schema=PAGE_SCHEMA)
