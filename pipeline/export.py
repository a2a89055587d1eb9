"""Hand-off formats: an output -> sized, compressed shards for the next tool, on Ray Data.

    pagemill export OUTPUT --format dolma --dest s3://bucket/dolma/v1 [--shard-mb 256]
    pagemill export OUTPUT --format jsonl --dest DIR         # one record per page
    pagemill export OUTPUT --format webdataset --dest DIR    # per page: png (if stored), md, json

- dolma (datatrove's JsonlReader, dolma, NeMo Curator read it with their default keys): one
  document per line, `id`, `text` (the `ok` pages, no inline markers), `source`, `added`,
  `created`, `metadata` (source URIs, model id/source/revision, config hash, pagemill version,
  pages by status) and `attributes`: `pdf_page_numbers` = [[start, end, page]] as olmOCR writes it
  (page 1-based) plus per-page quality spans `pagemill_<signal>` = [[start, end, value]].
- jsonl: the `pages/` rows as records, `text` = the page's markdown, `id` = `<doc_id>-p<page>`.
- webdataset: tar shards, one sample per page (`<key>.md`, `<key>.json`, `<key>.png` when the run
  stored page images).
Shards are gzip-compressed JSON lines (`*.jsonl.gz`) or tar, written by Ray Data to any fsspec
URI; their count is the data size over `--shard-mb`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from typing import Any

import pyarrow as pa

from pipeline.arrow import pc
from pipeline.outputs import MB, OutputStore
from pipeline.schema import STATUSES, Status

FORMATS = ("dolma", "jsonl", "webdataset")
QUALITY = ("repetition_score", "text_layer_agreement", "compression_ratio")


def pagemill_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pagemill")
    except metadata.PackageNotFoundError:  # run from a checkout (PYTHONPATH=.)
        from pathlib import Path

        import tomllib

        return tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]


def _summary(store: OutputStore) -> dict[str, Any]:
    path = store.join("_summary.json")
    if not store.fs.exists(path):
        return {}
    with store.fs.open(path, "rb") as f:
        return json.load(f)


def _run_time(summary: dict[str, Any]) -> str:
    rid = summary.get("run_id")
    if not rid:
        return dt.datetime.now(dt.timezone.utc).isoformat()
    return dt.datetime.strptime(rid, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc).isoformat()


def page_quality(store: OutputStore, config_hash: str | None) -> dict[str, dict[int, dict[str, float]]]:
    """{doc_id: {page_index: {signal: value}}} of `ok` pages (small columns only)."""
    from pipeline.compact import live_dataset

    out: dict[str, dict[int, dict[str, float]]] = {}
    pages = live_dataset(store, "pages")  # a compaction swap hides its old or its new parts
    if pages is None:
        return out
    flt = pc.field("status") == Status.ok
    if config_hash:
        flt = flt & (pc.field("config_hash") == config_hash)
    t = pages.to_table(columns=["doc_id", "page_index", *QUALITY], filter=flt)
    for r in t.to_pylist():
        out.setdefault(r["doc_id"], {})[r["page_index"]] = {q: r[q] for q in QUALITY if r[q] is not None}
    return out


def dolma_record(
    doc: dict[str, Any], meta: dict[str, Any], quality: dict[int, dict[str, float]]
) -> dict[str, Any]:
    spans = doc["page_spans"] or []
    statuses = {s: int(doc.get(f"pages_{s}") or 0) for s in STATUSES}  # every status: one JSON shape
    attributes: dict[str, Any] = {
        "pdf_page_numbers": [[s["start"], s["end"], s["page_index"] + 1] for s in spans]
    }
    for q in QUALITY:
        attributes[f"pagemill_{q}"] = [
            [s["start"], s["end"], quality.get(s["page_index"], {}).get(q)] for s in spans
        ]
    return {
        "id": doc["id"],
        "text": doc["text"] or "",
        "source": "pagemill",
        "added": meta["added"],
        "created": meta["created"],
        "metadata": {
            "source_uris": [doc["source_uri"]],
            "model_id": doc["model_id"],
            "model_source": meta["model_source"],
            "model_revision": meta["model_revision"],
            "config_hash": doc["config_hash"],
            "pagemill_version": meta["version"],
            "page_count": doc["page_count"],
            "pages_by_status": statuses,
        },
        "attributes": attributes,
    }


def _names(prefix: str, ext: str) -> Any:
    """Ray Data file names: `<prefix>-<task>.<ext>` (one shard per write task)."""
    from ray.data.datasource import FilenameProvider

    class Names(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{prefix}-{task_index:05d}.{ext}"

        def get_filename_for_block(
            self, block: Any, write_uuid: str, task_index: int, block_index: int
        ) -> str:
            return f"{prefix}-{task_index:05d}-{block_index:05d}.{ext}"

    return Names()


def _to_dolma(batch: pa.Table, meta: dict[str, Any], quality: dict[str, Any]) -> pa.Table:
    rows = [dolma_record(d, meta, quality.get(d["doc_id"], {})) for d in batch.to_pylist()]
    return pa.Table.from_pylist(rows)


def _to_page_json(batch: pa.Table) -> pa.Table:
    out = []
    for r in batch.to_pylist():
        r.pop("page_image", None)
        rec = {"id": f"{r['doc_id']}-p{r['page_index']}", "text": r.pop("markdown") or "", **r}
        out.append(rec)
    return pa.Table.from_pylist(out)


def _to_wds(batch: pa.Table) -> list[dict[str, Any]] | dict[str, Any]:
    rows = batch.to_pylist()
    keys, md, js, png = [], [], [], []
    for r in rows:
        img = (r.pop("page_image", None) or {}).get("bytes")
        keys.append(f"{r['doc_id']}-p{r['page_index']:05d}")
        md.append((r.pop("markdown") or "").encode())
        js.append(json.dumps(r, default=str).encode())
        png.append(img)
    out = {"__key__": keys, "md": md, "json": js}
    if any(p is not None for p in png):
        out["png"] = [p or b"" for p in png]
    return out


def export(
    output: str,
    fmt: str,
    dest: str,
    *,
    config_hash: str | None = None,
    shard_mb: float = 256.0,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `fmt` shards of `output` to `dest`; returns {"format", "dest", "records", "shards"}."""
    import fsspec
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    store = OutputStore(output, storage_options or {})
    summary = _summary(store)
    config_hash = config_hash or summary.get("config_hash")
    src = store.join("documents" if fmt == "dolma" else "pages")
    if not store.fs.exists(src):
        raise FileNotFoundError(f"{src} does not exist: is {output} a pagemill output?")
    from pipeline.compact import live_dataset

    data = live_dataset(store, "documents" if fmt == "dolma" else "pages")
    if data is None:
        raise FileNotFoundError(f"{src} holds no parts: is {output} a pagemill output?")
    flt = pc.field("config_hash") == config_hash if config_hash else None
    table = data.to_table(filter=flt)  # the driver reads the (already sized) Parquet once
    if not ray.is_initialized():  # join RAY_ADDRESS's cluster (as a submitted job), else a local Ray
        import os

        from pipeline.run import quiet_ray

        quiet_ray(False)
        if os.environ.get("RAY_ADDRESS", "local") != "local":
            ray.init(logging_level="ERROR")  # pyright: ignore[reportArgumentType]  # ray takes level names too
        else:
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                logging_level="ERROR",  # pyright: ignore[reportArgumentType]  # ray takes level names too
                log_to_driver=False,
            )
    n_shards = max(1, math.ceil(table.nbytes / (shard_mb * MB)))
    ds = ray.data.from_arrow(table).repartition(n_shards)
    fs, root = fsspec.core.url_to_fs(dest, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    pafs = PyFileSystem(FSSpecHandler(fs))
    if fmt == "dolma":
        cfg = summary.get("config", {}).get("model", {})
        meta = {
            "added": dt.datetime.now(dt.timezone.utc).isoformat(),
            "created": _run_time(summary),
            "model_source": cfg.get("source"),
            "model_revision": cfg.get("revision"),
            "version": pagemill_version(),
        }
        ds = ds.map_batches(
            _to_dolma,  # pyright: ignore[reportArgumentType]  # ray's fn type does not model fn_kwargs
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"meta": meta, "quality": page_quality(store, config_hash)},
        )
    if fmt in ("dolma", "jsonl"):
        if fmt == "jsonl":
            ds = ds.map_batches(_to_page_json, batch_format="pyarrow", batch_size=None)
        ds.write_json(
            root,
            filesystem=pafs,
            filename_provider=_names(fmt, "jsonl.gz"),
            arrow_open_stream_args={"compression": "gzip"},
        )
    else:
        ds.map_batches(_to_wds, batch_format="pyarrow", batch_size=None).write_webdataset(
            root, filesystem=pafs, filename_provider=_names("pages", "tar"), encoder=None
        )  # already bytes
    shards = [
        p
        for p in fs.ls(root, detail=False)
        if p.rsplit("/", 1)[-1].startswith(("dolma-", "jsonl-", "pages-"))
    ]
    return {"format": fmt, "dest": dest, "records": table.num_rows, "shards": len(shards)}


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None  # module docstring is present
    p = argparse.ArgumentParser(prog="pagemill export", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the run's output.uri")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--dest", required=True, help="directory or fsspec URI for the shards")
    p.add_argument("--config-hash", default=None, help="rows of this configuration (default: the last run's)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="target uncompressed size of one shard")
    a = p.parse_args(argv)
    res = export(a.output, a.format, a.dest, config_hash=a.config_hash, shard_mb=a.shard_mb)
    print(f"{res['records']} records -> {res['shards']} {res['format']} shard(s) under {res['dest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
