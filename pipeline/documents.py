"""Document assembly: `pages/` -> `documents/`, one row per document and configuration.

    python -m pipeline.documents OUTPUT [--config-hash H]        # (re)build documents/ of a run
    python -m pipeline.documents OUTPUT --export DIR [--doc ID]  # DOC.md + figures/*.png files
    (either with --storage-options JSON: OUTPUT's fsspec options, as the job's output.storage_options)

`assemble_documents` runs at the end of `pipeline.run` on the driver and reads `pages/` with
pyarrow in two streaming passes, so driver memory is bounded by `budget_mb` of markdown, not by
the corpus: (1) keys, status and markdown sizes of every row of the configuration; (2) per group
of documents holding at most `budget_mb` of `ok` markdown, those pages' markdown. A document's
`text` is its `ok` pages' markdown in page order joined by `PAGE_SEPARATOR`, with no inline page
markers, and `page_spans` gives each page's [start, end) in it; other pages are counted by status.
Figure references stay as the pages wrote them (`schema.figure_name`), so exporting the crops of
`figures/` under their `name` next to the markdown makes every `![](...)` resolve.

Files are `documents/part-<config_hash>-NNNNN.parquet` (~`output.target_file_mb` each); a rebuild
rewrites them and removes this configuration's stale parts, other configurations' stay.

Incremental (`update_documents`, what a run does once documents/ exists): only the documents the
run touched are assembled, from the pages parts that hold their rows (this run's parts plus the
ledger's), into `part-<config_hash>-<run_id>-NNNNN.parquet`; then their old rows are taken out of
the older parts (rewritten, or removed when empty). A crash in between leaves a document in two
parts: the next update finds it by its `id` and rebuilds it, so readers of a finished run never
see a document twice. Cost: the touched documents' pages plus one `id` column per documents part.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.arrow import pc
from pipeline.cli import add_storage_options, parse_storage_options
from pipeline.outputs import MB, OutputStore, split_by_bytes
from pipeline.schema import DOCUMENT_SCHEMA, PAGE_SCHEMA, PAGE_SEPARATOR, STATUSES, Status

log = logging.getLogger("pagemill")

PAGES_DIR, DOCUMENTS_DIR, FIGURES_DIR = "pages", "documents", "figures"


def pages_dataset(store: OutputStore) -> ds.Dataset | None:
    """`pages/` as a pyarrow dataset in the current schema (None when nothing was written)."""
    from pipeline.compact import live_dataset

    # the parts readers see: a compaction swap in progress hides either its old or its new parts
    return live_dataset(store, PAGES_DIR, schema=PAGE_SCHEMA)


def _config_filter(config_hash: str | None) -> Any:
    return None if config_hash is None else pc.field("config_hash") == config_hash


def _new_doc() -> dict[str, Any]:
    return {
        "source_uri": "",
        "page_count": 0,
        "error_code": None,
        "model_id": None,
        "counts": Counter(),
        "ok": {},
    }


def _scan_keys(pages: ds.Dataset, flt: Any) -> dict[str, dict[str, Any]]:
    """Pass 1: per document, status counts and the markdown size of each `ok` page (no text)."""
    docs: dict[str, dict[str, Any]] = {}
    seen: set[tuple[str, int]] = set()
    columns = {
        n: pc.field(n)
        for n in ("doc_id", "source_uri", "page_index", "page_count", "status", "error_code", "model_id")
    }
    columns["md_bytes"] = pc.binary_length(pc.field("markdown"))  # generated
    for batch in pages.to_batches(columns=columns, filter=flt):
        for r in batch.to_pylist():
            key = (r["doc_id"], r["page_index"])
            if key in seen:  # a duplicate row (e.g. an interrupted pre-ledger rerun): count once
                continue
            seen.add(key)
            d = docs.setdefault(r["doc_id"], _new_doc())
            d["source_uri"] = d["source_uri"] or r["source_uri"]
            d["page_count"] = max(d["page_count"], r["page_count"] or 0)
            d["model_id"] = d["model_id"] or r["model_id"]
            d["counts"][r["status"]] += 1
            if r["status"] == Status.doc_error:
                d["error_code"] = r["error_code"]
            elif r["status"] == Status.ok:
                d["ok"][r["page_index"]] = r["md_bytes"] or 0
    return docs


def join_pages(pages: dict[int, str]) -> tuple[str, list[dict[str, int]]]:
    """A document's text from {page_index: markdown} of its `ok` pages, and the span of each page
    in it (`text[start:end]` is exactly that page's markdown)."""
    parts: list[str] = []
    spans: list[dict[str, int]] = []
    pos = 0
    for i in sorted(pages):
        if parts:
            parts.append(PAGE_SEPARATOR)
            pos += len(PAGE_SEPARATOR)
        md = pages[i]
        parts.append(md)
        spans.append({"start": pos, "end": pos + len(md), "page_index": i})
        pos += len(md)
    return "".join(parts), spans


def assemble_documents(
    store: OutputStore,
    config_hash: str | None,
    *,
    target_file_mb: float = 256.0,
    row_group_mb: float = 32.0,
    budget_mb: float = 256.0,
) -> int:
    """Build `documents/` for `config_hash` (None: every row, e.g. outputs of one configuration)
    from `pages/`; returns the number of documents written."""
    n, _ = _assemble(store, config_hash, target_file_mb, row_group_mb, budget_mb)
    return n


def _assemble(
    store: OutputStore,
    config_hash: str | None,
    target_file_mb: float,
    row_group_mb: float,
    budget_mb: float,
    only: set[str] | None = None,
    files: list[str] | None = None,
    tag_suffix: str = "",
) -> tuple[int, set[str]]:
    """`assemble_documents`; with `only` (doc ids), `files` (the pages parts, relative to the
    root, holding their rows) and `tag_suffix`: those documents only, in new parts named with
    the suffix (`update_documents`). Returns (documents written, names of the parts written)."""
    if files is not None:
        paths = [store.join(f) for f in sorted(set(files))]
        pages = (
            ds.dataset(paths, filesystem=store.fs, format="parquet", schema=PAGE_SCHEMA) if paths else None
        )
    else:
        pages = pages_dataset(store)
    scope = _config_filter(config_hash)
    if only is not None:
        members = pc.field("doc_id").isin(sorted(only))
        scope = members if scope is None else scope & members
    docs = _scan_keys(pages, scope) if pages is not None else {}
    order = sorted(docs, key=lambda d: (docs[d]["source_uri"], d))
    groups = split_by_bytes([sum(docs[d]["ok"].values()) + 1 for d in order], int(budget_mb * MB))
    tag = config_hash or "all"
    prefix = f"part-{tag}-{tag_suffix}-" if only is not None else f"part-{tag}-"
    written: list[str] = []
    pending: list[dict[str, Any]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        name = f"{prefix}{len(written):05d}.parquet"
        table = pa.Table.from_pylist(pending, schema=DOCUMENT_SCHEMA)
        written.append(
            store.write_parquet(
                DOCUMENTS_DIR, table, name=name, row_group_bytes=int(row_group_mb * MB), row_group_rows=1000
            )
        )
        pending.clear()
        pending_bytes = 0

    for a, b in groups:
        ids = order[a:b]
        text: dict[str, dict[int, str]] = {d: {} for d in ids}
        wanted = [d for d in ids if docs[d]["ok"]]
        if wanted:
            assert pages is not None  # docs (hence wanted) is empty when pages/ is
            flt = (pc.field("status") == Status.ok) & pc.field("doc_id").isin(wanted)  # pyright: ignore[reportUnknownMemberType]
            if config_hash is not None:
                flt = flt & (pc.field("config_hash") == config_hash)
            for batch in pages.to_batches(columns=["doc_id", "page_index", "markdown"], filter=flt):
                for d, i, md in zip(
                    *(batch.column(n).to_pylist() for n in ("doc_id", "page_index", "markdown"))
                ):
                    text[d].setdefault(i, md or "")
        for d in ids:
            info, (markdown, spans) = docs[d], join_pages(text[d])
            row = {
                "id": d,
                "doc_id": d,
                "source_uri": info["source_uri"],
                "page_count": info["page_count"],
                "text": markdown,
                "page_spans": spans,
                "pages_included": sorted(text[d]),
                **{f"pages_{s}": info["counts"].get(s, 0) for s in STATUSES},
                "error_code": info["error_code"],
                "num_figures": markdown.count("](figures/"),
                "model_id": info["model_id"],
                "config_hash": config_hash,
            }
            size = len(markdown.encode()) + len(d) + len(info["source_uri"]) + 128
            if pending and pending_bytes + size > target_file_mb * MB:
                flush()
            pending.append(row)
            pending_bytes += size
    if pending:
        flush()
    if only is None:
        _remove_stale(store, tag, {w.rsplit("/", 1)[-1] for w in written})
    log.info("documents: %d documents in %d file(s) under %s/", len(docs), len(written), DOCUMENTS_DIR)
    return len(docs), {w.rsplit("/", 1)[-1] for w in written}


def _document_parts(store: OutputStore, config_hash: str) -> dict[str, str]:
    """{file name: path} of this configuration's documents parts."""
    path = store.join(DOCUMENTS_DIR)
    store.fs.invalidate_cache(path)  # other processes wrote here
    if not store.fs.exists(path):
        return {}
    return {
        p.rsplit("/", 1)[-1]: p
        for p in store.fs.ls(path, detail=False)
        if p.rsplit("/", 1)[-1].startswith(f"part-{config_hash}-") and p.endswith(".parquet")
    }


def _ids_by_part(store: OutputStore, parts: dict[str, str]) -> dict[str, list[str]]:
    """{part name: the document ids it holds} (its `id` column only)."""
    return {
        name: pq.read_table(path, columns=["id"], filesystem=store.fs).column("id").to_pylist()
        for name, path in parts.items()
    }


def update_documents(
    store: OutputStore,
    config_hash: str,
    touched: set[str],
    files: set[str],
    run_id: str,
    *,
    files_of: Any = None,
    target_file_mb: float = 256.0,
    row_group_mb: float = 32.0,
    budget_mb: float = 256.0,
) -> int:
    """Rebuild the document rows of `touched` doc ids only (see the module docstring). `files`:
    the pages parts (relative paths) that hold their rows; `files_of(doc_ids) -> set of parts`
    gives them for documents found in two parts (a crash between the two steps of an earlier
    update), which are rebuilt too. Returns the number of documents written."""
    parts = _document_parts(store, config_hash)
    ids = _ids_by_part(store, parts)
    seen: Counter[str] = Counter(d for names in ids.values() for d in names)
    twice = {d for d, n in seen.items() if n > 1}
    if twice:
        log.warning(
            "documents: %d document(s) found in two parts (an interrupted update): rebuilt", len(twice)
        )
        touched = touched | twice
        files = files | (files_of(twice) if files_of is not None else set())
    if not touched:
        return 0
    digest = hashlib.sha256("\n".join(sorted(touched)).encode()).hexdigest()[:8]
    n, fresh = _assemble(
        store,
        config_hash,
        target_file_mb,
        row_group_mb,
        budget_mb,
        only=touched,
        files=sorted(files),
        tag_suffix=f"{run_id}-{digest}",
    )
    for name, names in ids.items():  # the older parts: take the rebuilt documents out
        if name in fresh or not touched.intersection(names):
            continue
        table = pq.read_table(parts[name], filesystem=store.fs)
        keep = pc.invert(
            pc.is_in(table.column("id"), value_set=pa.array(sorted(touched), pa.string()))
        )  # generated
        kept = table.filter(keep)
        if kept.num_rows:
            store.write_parquet(
                DOCUMENTS_DIR, kept, name=name, row_group_bytes=int(row_group_mb * MB), row_group_rows=1000
            )
        else:
            store.fs.rm(parts[name])
    return n


def _remove_stale(store: OutputStore, tag: str, keep: set[str]) -> None:
    path = store.join(DOCUMENTS_DIR)
    if not store.fs.exists(path):
        return
    for p in store.fs.ls(path, detail=False):
        name = p.rsplit("/", 1)[-1]
        if name.startswith(f"part-{tag}-") and name.endswith(".parquet") and name not in keep:
            store.fs.rm(p)


def has_documents(store: OutputStore, config_hash: str) -> bool:
    """Whether `documents/` already holds this configuration's parts."""
    path = store.join(DOCUMENTS_DIR)
    return store.fs.exists(path) and any(
        p.rsplit("/", 1)[-1].startswith(f"part-{config_hash}-") for p in store.fs.ls(path, detail=False)
    )


def build_for_run(
    store: OutputStore,
    cfg: Any,
    touched: set[str] | None = None,
    files: set[str] | None = None,
    run_id: str = "",
    files_of: Any = None,
) -> int:
    """The end-of-run step of `pipeline.run`: documents of this run's configuration. The first
    time (no documents/ parts of it yet) or without `touched`: a full build; else only the
    documents the run touched (`update_documents`)."""
    o = cfg.output
    h = cfg.config_hash()
    if touched is None or files is None or not has_documents(store, h):
        return assemble_documents(store, h, target_file_mb=o.target_file_mb, row_group_mb=o.row_group_mb)
    return update_documents(
        store,
        h,
        touched,
        files,
        run_id,
        files_of=files_of,
        target_file_mb=o.target_file_mb,
        row_group_mb=o.row_group_mb,
    )


# ----------------------------------------------------------------------------- reading / export


def last_config_hash(store: OutputStore) -> str | None:
    """The configuration of the last run into `store` (from `_summary.json`), if any."""
    import json

    path = store.join("_summary.json")
    if not store.fs.exists(path):
        return None
    with store.fs.open(path, "rb") as f:
        return json.load(f).get("config_hash")


def read_documents(store: OutputStore, doc_id: str | None = None) -> list[dict[str, Any]]:
    path = store.join(DOCUMENTS_DIR)
    if not store.fs.exists(path):
        return []
    data = ds.dataset(path, filesystem=store.fs, format="parquet")
    return data.to_table(filter=None if doc_id is None else pc.field("doc_id") == doc_id).to_pylist()


def export_documents(store: OutputStore, dest: str, doc_id: str | None = None) -> list[str]:
    """Write `<dest>/<doc_id>.md` and the figure crops it references (`<dest>/figures/...png`)."""
    import os

    from pipeline.compact import live_dataset

    written = []
    for doc in read_documents(store, doc_id):
        os.makedirs(os.path.join(dest, FIGURES_DIR), exist_ok=True)
        md_path = os.path.join(dest, f"{doc['doc_id']}.md")
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(doc["text"] or "")
        written.append(md_path)
        figures = live_dataset(store, FIGURES_DIR) if doc["num_figures"] else None
        if figures is not None:
            flt = pc.field("doc_id") == doc["doc_id"]
            if doc["config_hash"]:
                flt = flt & (pc.field("config_hash") == doc["config_hash"])
            figs = figures.to_table(columns=["name", "image"], filter=flt)
            for name, image in zip(figs.column("name").to_pylist(), figs.column("image").to_pylist()):
                out = os.path.join(dest, name)
                with open(out, "wb") as f:
                    f.write(image["bytes"])
                written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None  # module docstring is present
    p = argparse.ArgumentParser(prog="python -m pipeline.documents", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the run's output.uri")
    p.add_argument(
        "--config-hash",
        default=None,
        help="rows of this configuration (default: the last run's, from _summary.json; 'all': every row)",
    )
    p.add_argument("--export", metavar="DIR", help="write DOC_ID.md files and their figures into DIR")
    p.add_argument("--doc", help="with --export: only this document")
    add_storage_options(p)
    args = p.parse_args(argv)
    store = OutputStore(args.output, parse_storage_options(p, args.storage_options))
    if args.export:
        for path in export_documents(store, args.export, args.doc):
            print(path)
        return 0
    config_hash = args.config_hash or last_config_hash(store)
    n = assemble_documents(store, None if config_hash == "all" else config_hash)
    print(f"{n} documents -> {store.join(DOCUMENTS_DIR)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(main())
