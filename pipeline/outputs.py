"""Output store: atomic, deterministically named Parquet parts under an fsspec root.

Readers must never see a partial file. On POSIX every file is written under a hidden temporary
name (`.tmp-…`, ignored by pyarrow datasets because of the leading dot) and then renamed into place;
on object stores (s3, gcs, memory, …) it is PUT directly under its final key, which is atomic there.
A part's name is derived from the (doc_id, page_index) keys it holds, so re-running the same work
rewrites the same name instead of adding a duplicate.

Sizing: `split_table` cuts a batch into files of at most ~`output.target_file_mb` (estimated from
the rows' bytes: image and text bytes counted exactly) and `write_row_groups` cuts a file into row
groups of at most ~`output.row_group_mb` / `output.row_group_rows`, the unit a streaming reader
fetches. Figure crops (`figure_rows`) use the official 0-999 -> pixel mapping of model.grounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any, cast

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

LOCAL_PROTOCOLS = ("file", "local")


def fresh_options(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """`storage_options` plus, on remote stores, no shared instance and no listing cache: other
    processes (Ray workers, other runs) write under the same root, so a cached listing is stale."""
    opts = dict(storage_options or {})
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol not in (None, *LOCAL_PROTOCOLS):
        opts.setdefault("skip_instance_cache", True)
        if protocol in ("s3", "s3a", "gs", "gcs", "abfs", "az"):
            opts.setdefault("use_listings_cache", False)
    return opts


class OutputStore:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, create: bool = True):
        fs, path = fsspec.core.url_to_fs(uri, **fresh_options(uri, storage_options))
        self.fs = fs
        self.path = path.rstrip("/")
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        self.posix = protocol in LOCAL_PROTOCOLS
        self.root = self.path if self.posix else f"{protocol}://{self.path}"
        self.storage_options = storage_options or {}
        self.uri = uri
        if create:  # False: a reader that must leave the tree as it is (dry runs)
            self.fs.makedirs(self.path, exist_ok=True)

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def _atomic_write(self, rel: str, data_writer: Any) -> str:
        final = self.join(rel)
        parent, name = final.rsplit("/", 1)
        if not self.posix:
            # object store: one PUT under the final deterministic key is atomic (readers see the
            # whole object or none); a rename would be a server-side copy plus a delete
            with self.fs.open(final, "wb") as f:
                data_writer(f)
            self.fs.invalidate_cache(parent)
            return final
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        with self.fs.open(tmp, "wb") as f:
            data_writer(f)
        self.fs.mv(tmp, final)
        return final

    def write_bytes(self, rel: str, data: bytes) -> str:
        return self._atomic_write(rel, lambda f: f.write(data))

    def write_json(self, rel: str, obj: Any) -> str:
        blob = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self._atomic_write(rel, lambda f: f.write(blob))

    def write_parquet(
        self,
        subdir: str,
        table: pa.Table,
        key: str | None = None,
        name: str | None = None,
        *,
        row_group_bytes: int | None = None,
        row_group_rows: int = 256,
    ) -> str:
        """Write `table` as one part file named `name`, or from `key` (default: the table's
        (config_hash, doc_id, page_index) row keys, so a redo of the same rows has the same name).
        Row groups hold at most `row_group_rows` rows and, if given, ~`row_group_bytes` bytes."""
        if name is None:
            name = part_name(table, key)
        self._atomic_write(
            f"{subdir}/{name}",
            lambda f: write_row_groups(f, table, row_group_bytes, row_group_rows),
        )
        return f"{subdir}/{name}"

    def read_table(self, subdir: str) -> pa.Table:
        import pyarrow.dataset as ds

        return ds.dataset(self.join(subdir), filesystem=self.fs, format="parquet").to_table()


def part_name(table: pa.Table, key: str | None = None) -> str:
    """Deterministic part file name from `key`, by default from the table's (config_hash, doc_id,
    page_index) row keys: a redo of the same rows gets the same name."""
    if key is None:
        ids = table.column("doc_id").to_pylist()
        pages = table.column("page_index").to_pylist()
        conf = (
            table.column("config_hash").to_pylist()
            if "config_hash" in table.column_names
            else [""] * len(ids)
        )
        key = "\n".join(sorted(f"{c}:{d}:{p}" for c, d, p in zip(conf, ids, pages)))
    return f"part-{hashlib.sha256(key.encode()).hexdigest()[:20]}.parquet"


# ----------------------------------------------------------------------------- sized writing

MB = 1 << 20


def row_nbytes(table: pa.Table) -> list[int]:
    """Estimated in-memory bytes of each row: exact for string/binary data (top level and inside
    structs, e.g. image bytes), the rest of the table's buffers spread evenly over the rows."""
    from pipeline.arrow import pc

    n = table.num_rows
    if n == 0:
        return []
    var = [0] * n
    var_total = 0

    def add(arr: pa.ChunkedArray) -> None:
        nonlocal var_total
        t = arr.type
        if (
            pa.types.is_string(t)
            or pa.types.is_binary(t)
            or pa.types.is_large_string(t)
            or pa.types.is_large_binary(t)
        ):
            lengths = pc.fill_null(pc.binary_length(arr), 0).to_pylist()  # pc funcs generated
            for i, v in enumerate(lengths):
                var[i] += v
            var_total += sum(lengths)
        elif pa.types.is_struct(t):
            for j in range(t.num_fields):
                add(pc.struct_field(arr, [j]))  # generated at import

    for col in table.columns:
        add(col)
    rest = max(0, table.nbytes - var_total) / n
    return [int(v + rest) for v in var]


def split_by_bytes(sizes: list[int], budget: int, max_rows: int | None = None) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges whose summed sizes stay within `budget` (a row larger than
    the budget gets a range of its own) and that hold at most `max_rows` rows."""
    out: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, s in enumerate(sizes):
        full = max_rows is not None and i - start >= max_rows
        if i > start and (acc + s > budget or full):
            out.append((start, i))
            start, acc = i, 0
        acc += s
    if sizes:
        out.append((start, len(sizes)))
    return out


def split_table(table: pa.Table, target_bytes: int) -> list[pa.Table]:
    """`table` cut into consecutive slices of at most ~`target_bytes` (estimated, uncompressed)."""
    return [table.slice(a, b - a) for a, b in split_by_bytes(row_nbytes(table), target_bytes)]


def write_row_groups(f: Any, table: pa.Table, row_group_bytes: int | None, row_group_rows: int) -> None:
    """One Parquet file (zstd) whose row groups are cut by bytes and rows (see split_by_bytes)."""
    if row_group_bytes is None or table.num_rows == 0:
        pq.write_table(table, f, compression="zstd", row_group_size=row_group_rows)
        return
    with pq.ParquetWriter(f, table.schema, compression="zstd") as w:
        for a, b in split_by_bytes(row_nbytes(table), row_group_bytes, row_group_rows):
            w.write_table(table.slice(a, b - a), row_group_size=b - a)


def local_path(uri: str) -> str | None:
    """The local filesystem path of `uri`, or None for remote URIs."""
    if "://" not in uri:
        return os.path.abspath(uri)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return None


# ----------------------------------------------------------------------------- figures


def figure_box_px(box_norm: Any, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box (x1, y1, x2, y2), x2/y2 exclusive, of a 0-999 box on a W x H page: the official
    mapping `int(x / 999 * W)` (model.grounding.norm_to_px), clamped to the page and at least
    one pixel wide and high. Crops and drawn boxes both use this."""
    from model.grounding import Box, norm_to_px

    w, h = size
    x1, y1, x2, y2 = norm_to_px(cast(Box, tuple(int(v) for v in box_norm)), (w, h))  # 4 coordinates
    x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
    return x1, y1, min(max(x2, x1 + 1), w), min(max(y2, y1 + 1), h)


def encode_png(pixels: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def figure_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Crops of a post-processed page row's `_figures` from its `_page_png` (the rendered page, PNG)."""
    import io

    import numpy as np
    from PIL import Image

    figures = row.get("_figures") or []
    if not figures or not row.get("_page_png"):
        return []
    w, h = row["width_px"], row["height_px"]
    page = np.asarray(Image.open(io.BytesIO(row["_page_png"])).convert("RGB"))
    if page.shape != (h, w, 3):
        raise ValueError(f"page image is {page.shape}, the row says {h}x{w}")
    out = []
    for block_index, box_norm, name in figures:
        x1, y1, x2, y2 = figure_box_px(box_norm, (w, h))
        out.append(
            {
                "doc_id": row["doc_id"],
                "page_index": row["page_index"],
                "block_index": block_index,
                "name": name,
                "label": "image",
                "bbox_norm": list(box_norm),
                "bbox_px": [x1, y1, x2, y2],
                "width_px": x2 - x1,
                "height_px": y2 - y1,
                "config_hash": row.get("config_hash"),
                "image": {"bytes": encode_png(page[y1:y2, x1:x2]), "path": name},
            }
        )
    return out


def figure_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The `figures/` table of a batch of post-processed page rows (FIGURE_SCHEMA)."""
    from pipeline.schema import FIGURE_SCHEMA

    return pa.Table.from_pylist([f for r in rows for f in figure_rows(r)], schema=FIGURE_SCHEMA)
