"""The output contract: the Arrow schemas of `pages/`, `figures/` and `documents/`, and the statuses.

One `pages/` row per input page, plus one `doc_error` row (page_index = -1) per document that cannot
be opened at all. Rows are built as plain dicts by the stages and turned into Arrow here, so the
schema is enforced in one place (a missing or mistyped field fails loudly in tests). Image columns
use the Hugging Face `datasets` Image layout (struct of `bytes`, `path`) and every schema carries
the `huggingface` features metadata, so `datasets.load_dataset("parquet", ...)` decodes them.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from model.config import StrEnum

SCHEMA_VERSION = 2  # 2: page_image became an Image struct; quality columns


class Status(StrEnum):
    """A row's final status: the only values of the `status` column on disk. A row still in flight
    between the stages has no status yet (null in the work batches, `stages.pending_rows`);
    `rows_to_table` refuses a row without one of these."""

    ok = "ok"  # the model ended the page with EOS
    render_error = "render_error"
    ocr_error = "ocr_error"
    truncated = "truncated"  # no EOS within the token cap
    repetition = "repetition"  # stopped by the loop detector
    doc_error = "doc_error"  # the document could not be opened (one row, page_index -1)


STATUSES = Status.values()
# rows that carry model output (markdown, layout, quality columns); plain strings (numpy's isin)
OUTPUT_STATUSES = (Status.ok.value, Status.truncated.value, Status.repetition.value)

# Document-level reason codes carried in `error_code` of doc_error rows.
DOC_ERROR_CODES = (
    "empty_file",
    "not_a_pdf",
    "corrupt",
    "needs_password",
    "zero_pages",
    "read_error",
    "probe_error",
)  # probe_error: the parser hung or crashed on the file (killed)

BOX = pa.list_(pa.float32(), 4)

# The Hugging Face `datasets` Image feature's storage type: readers decode `bytes` (or open `path`).
IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
IMAGE_COLUMNS = ("page_image", "image")  # columns in IMAGE layout, declared as `Image` features


def hf_feature(t: pa.DataType, name: str = "") -> Any:
    """The `datasets` feature JSON of an Arrow type, in the long-standing format (`Value`,
    `Sequence`, a one-element list for lists of structs) that old and new `datasets` both read."""
    if name in IMAGE_COLUMNS and t == IMAGE:
        return {"_type": "Image"}
    if pa.types.is_struct(t):
        return {t.field(i).name: hf_feature(t.field(i).type) for i in range(t.num_fields)}
    if pa.types.is_fixed_size_list(t):
        return {"_type": "Sequence", "feature": hf_feature(t.value_type), "length": t.list_size}
    if pa.types.is_list(t):
        inner = hf_feature(t.value_type)
        return [inner] if pa.types.is_struct(t.value_type) else {"_type": "Sequence", "feature": inner}
    if pa.types.is_timestamp(t):
        return {
            "_type": "Value",
            "dtype": f"timestamp[{t.unit}, tz={t.tz}]" if t.tz else f"timestamp[{t.unit}]",
        }
    names = {
        pa.string(): "string",
        pa.binary(): "binary",
        pa.int32(): "int32",
        pa.int64(): "int64",
        pa.float32(): "float32",
        pa.float64(): "float64",
        pa.bool_(): "bool",
    }
    if t not in names:
        raise TypeError(f"no datasets feature mapping for {t}")
    return {"_type": "Value", "dtype": names[t]}


def with_hf_features(schema: pa.Schema, metadata: dict[str, str] | None = None) -> pa.Schema:
    """`schema` with the `huggingface` metadata that makes `datasets.load_dataset("parquet", ...)`
    decode IMAGE columns as images (the same key `datasets` itself writes into Parquet files)."""
    features = {f.name: hf_feature(f.type, f.name) for f in schema}
    hf = json.dumps({"info": {"features": features}}, separators=(",", ":"))
    return schema.with_metadata({**(metadata or {}), "huggingface": hf})


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
        pa.field("attempts", pa.int32()),  # OCR passes: 2 when the no-EOS fallback ran
        pa.field("fallback", pa.string()),  # e.g. "ngram:repetition->stop" (first -> final finish)
        pa.field("text_layer_chars", pa.int32()),
        pa.field("model_id", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("render_ms", pa.float32()),
        pa.field("ocr_ms", pa.float32()),
        # Hugging Face `Image` layout (struct of bytes + path): PNG, only with output.include_images=true
        pa.field("page_image", IMAGE),
        # quality signals (pipeline/quality.py); null where they do not apply
        pa.field("repetition_score", pa.float32()),  # 1 - distinct/total token 10-grams of raw_output
        pa.field("num_text_tokens", pa.int32()),  # tokens of the markdown (tags, boxes, figure refs out)
        pa.field("compression_ratio", pa.float32()),  # num_text_tokens / num_vision_tokens
        pa.field("text_layer_agreement", pa.float32()),  # 1 - normalised Levenshtein vs the PDF text layer
        pa.field("written_at", pa.timestamp("ms", tz="UTC")),  # when the writer committed the row
    ],
)
PAGE_SCHEMA = with_hf_features(PAGE_SCHEMA, {"pagemill_schema_version": str(SCHEMA_VERSION)})

COLUMNS = tuple(PAGE_SCHEMA.names)
# how a page went, in a few numbers: `inspect` prints them, the report charts and lists them
PAGE_SIGNALS = (
    "finish_reason",
    "num_output_tokens",
    "num_vision_tokens",
    "num_text_tokens",
    "compression_ratio",
    "repetition_score",
    "text_layer_agreement",
    "text_layer_chars",
)

# `figures/`: one row per `image` block with a box, cropped from the rendered page. `name` is the
# relative reference the page's markdown uses (`![](name)`) and also the image's `path`.
FIGURE_SCHEMA = with_hf_features(
    pa.schema(
        [
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("page_index", pa.int32(), nullable=False),
            pa.field("block_index", pa.int32(), nullable=False),  # index in the page's `layout`
            pa.field("name", pa.string(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("bbox_norm", pa.list_(pa.int32(), 4)),
            pa.field("bbox_px", pa.list_(pa.int32(), 4)),  # x1, y1, x2, y2 (x2, y2 exclusive)
            pa.field("width_px", pa.int32()),
            pa.field("height_px", pa.int32()),
            pa.field("config_hash", pa.string()),
            pa.field("image", IMAGE),
        ]
    ),
    {"pagemill_schema_version": str(SCHEMA_VERSION)},
)

# `documents/`: one row per document (per configuration), assembled from `pages/` after a run.
DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # = doc_id, the name datatrove/dolma/NeMo Curator read
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("page_count", pa.int32()),
        pa.field("text", pa.string()),  # `ok` pages' markdown in order, joined by PAGE_SEPARATOR, no markers
        # one span per included page: text[start:end] is exactly that page's markdown (olmOCR's
        # attributes.pdf_page_numbers: [start, end, page], page 1-based there, 0-based page_index here)
        pa.field(
            "page_spans",
            pa.list_(pa.struct([("start", pa.int64()), ("end", pa.int64()), ("page_index", pa.int32())])),
        ),
        pa.field("pages_included", pa.list_(pa.int32())),  # page indices whose markdown is in `text`
        *(pa.field(f"pages_{s}", pa.int32()) for s in STATUSES),  # rows by status
        pa.field("error_code", pa.string()),  # doc_error documents: the reason code
        pa.field("num_figures", pa.int32()),  # figure references in `text`
        pa.field("model_id", pa.string()),
        pa.field("config_hash", pa.string()),
    ],
    metadata={"pagemill_schema_version": str(SCHEMA_VERSION)},
)

# Between two pages' markdown in `documents/`.text (no inline page markers: they would end up in
# training data; `page_spans` says where each page is).
# What discovery hands the planner: one row per listed input (pipeline.discover, pipeline.plan).
# The driver holds this table, never one Python object per document (issue 16: a million inputs).
DISCOVERED_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string()),
        pa.field("doc_id", pa.string()),  # sha256 of the bytes ("uri:…" for an unreadable object)
        pa.field("page_count", pa.int32()),
        pa.field("error_code", pa.string()),  # "" or null: readable
        pa.field("error", pa.string()),
        pa.field("password", pa.string()),  # the password that opened it ("" if none)
    ]
)


def discovered_table(docs: Any) -> pa.Table:
    """`docs` as a DISCOVERED_SCHEMA table: a table is cast (columns in schema order; a missing
    column is null), a list of dicts (tests, small callers) is converted."""
    if not isinstance(docs, pa.Table):
        docs = list(docs)
        cols = {f.name: pa.array([d.get(f.name) for d in docs], f.type) for f in DISCOVERED_SCHEMA}
        return pa.table(cols, schema=DISCOVERED_SCHEMA)
    n = docs.num_rows
    cols = [
        docs.column(f.name).cast(f.type) if f.name in docs.column_names else pa.nulls(n, f.type)
        for f in DISCOVERED_SCHEMA
    ]
    return pa.Table.from_arrays(cols, schema=DISCOVERED_SCHEMA)


PAGE_SEPARATOR = "\n\n"


def figure_name(doc_id: str, page_index: int, block_index: int) -> str:
    """Stable relative name of a figure crop: the markdown's `![](...)` target, the `figures/` row's
    `name` and its image `path`. Export the crops under these names next to the markdown."""
    return f"figures/{doc_id}-p{page_index:05d}-b{block_index:03d}.png"


def page_image_name(doc_id: str, page_index: int) -> str:
    """The `path` of a page image (informative; readers decode the `bytes`)."""
    return f"{doc_id}-p{page_index:05d}.png"


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Arrow table in PAGE_SCHEMA from row dicts; absent optional fields become null."""
    unknown = {k for r in rows for k in r} - set(COLUMNS)
    if unknown:
        raise KeyError(f"row fields not in the page schema: {sorted(unknown)}")
    bad = {r.get("status") for r in rows} - set(STATUSES)
    if bad:  # e.g. None: a row still in flight must never reach disk
        raise ValueError(f"rows without a final status: {sorted(map(repr, bad))} (allowed {STATUSES})")
    cols = {name: [r.get(name) for r in rows] for name in COLUMNS}
    return pa.table(cols, schema=PAGE_SCHEMA)
