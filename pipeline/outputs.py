"""Output store: atomic, deterministically named Parquet parts under an fsspec root.

Readers must never see a partial file, so every file is written under a hidden temporary name
(`.tmp-…`, ignored by pyarrow datasets because of the leading dot) and then renamed into place.
A part's name is derived from the (doc_id, page_index) keys it holds, so re-running the same work
rewrites the same name instead of adding a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


class OutputStore:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.fs = fs
        self.path = path.rstrip("/")
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        self.root = self.path if protocol in ("file", "local") else f"{protocol}://{self.path}"
        self.storage_options = storage_options or {}
        self.uri = uri
        self.fs.makedirs(self.path, exist_ok=True)

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def _atomic_write(self, rel: str, data_writer: Any) -> str:
        final = self.join(rel)
        parent, name = final.rsplit("/", 1)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        with self.fs.open(tmp, "wb") as f:
            data_writer(f)
        self.fs.mv(tmp, final)
        return final

    def write_json(self, rel: str, obj: Any) -> str:
        blob = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self._atomic_write(rel, lambda f: f.write(blob))

    def write_parquet(self, subdir: str, table: pa.Table, key: str | None = None) -> str:
        """Write `table` as one part file; the name comes from `key` (or the table's row keys)."""
        if key is None:
            ids = table.column("doc_id").to_pylist()
            pages = table.column("page_index").to_pylist()
            key = "\n".join(sorted(f"{d}:{p}" for d, p in zip(ids, pages)))
        name = f"part-{hashlib.sha256(key.encode()).hexdigest()[:20]}.parquet"
        self._atomic_write(
            f"{subdir}/{name}",
            lambda f: pq.write_table(table, f, compression="zstd", row_group_size=256),
        )
        return f"{subdir}/{name}"

    def read_table(self, subdir: str) -> pa.Table:
        import pyarrow.dataset as ds

        return ds.dataset(self.join(subdir), filesystem=self.fs, format="parquet").to_table()


def local_path(uri: str) -> str | None:
    """The local filesystem path of `uri`, or None for remote URIs."""
    if "://" not in uri:
        return os.path.abspath(uri)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return None
