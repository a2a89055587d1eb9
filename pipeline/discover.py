"""Discovery on Ray: list the input (one Ray task) and read, hash and probe every document (a Ray
Data actor pool; MuPDF in a killable child). Only small per-document rows come back to the
driver: `(source_uri, doc_id, page_count, error_code, error, password)`, never document bytes.
Inputs unchanged since a previous run (same uri, size and etag or mtime: pipeline.statcache) are
neither read nor hashed again.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.schema import DISCOVERED_SCHEMA, discovered_table

log = logging.getLogger("pagemill")


def discover(cfg: PipelineConfig, store: Any = None) -> pa.Table:
    """List the input (a Ray task) and probe every document (Ray Data); small rows come back, as
    one DISCOVERED_SCHEMA table sorted by source_uri.

    With `store` (the output root), inputs whose (uri, size, etag or mtime) is in its stat cache
    (pipeline.statcache) are taken from there, not read, unless `input.rehash`; the others are
    probed and added to it."""
    import ray
    from ray.exceptions import RayTaskError

    from pipeline.sources import InputError, expand_input_stats, read_passwords, stat_many
    from pipeline.statcache import StatCache

    lister = ray.remote(num_cpus=0.5)(expand_input_stats)
    try:
        listed = ray.get(
            lister.remote(
                cfg.input.uri,
                cfg.input.storage_options,  # pyright: ignore[reportCallIssue]  # ray's .remote() typing: 1-arg fn
                suffixes=list(cfg.input.suffixes),
            )
        )
    except RayTaskError as e:  # bad input spec: surface the InputError itself
        if isinstance(e.cause, InputError):
            raise e.cause from None
        raise
    if not listed:
        return DISCOVERED_SCHEMA.empty_table()
    stats: dict[str, Any] = dict(listed)
    cache = StatCache.load(store) if store is not None else None
    unstated = [u for u, st in listed if st is None]  # list-file entries: one HEAD each, in workers
    if cache is not None and unstated:
        stat = ray.remote(num_cpus=0.5)(stat_many)
        chunks = [unstated[i : i + 1000] for i in range(0, len(unstated), 1000)]
        got = ray.get([stat.remote(c, cfg.input.storage_options) for c in chunks])  # pyright: ignore[reportCallIssue]  # ray's .remote() typing
        stats.update(zip(unstated, (st for part in got for st in part)))
    passwords = {**read_passwords(cfg.input.passwords_file, cfg.input.storage_options), **cfg.input.passwords}
    # the stat-cache hits as columns (no dict per document: a nightly over a million inputs)
    hit_cols: dict[str, list[Any]] = {
        k: [] for k in ("source_uri", "doc_id", "page_count", "error_code", "error")
    }
    todo: list[str] = []
    for uri, _ in listed:
        st = stats[uri]
        hit = cache.get(uri, *st) if cache is not None and st is not None and not cfg.input.rehash else None
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if hit is None or passwords.get(hit["doc_id"]) or passwords.get(name):
            todo.append(uri)  # new, changed, rehash, or a password applies: read and probe it
            continue
        hit_cols["source_uri"].append(uri)
        for k in ("doc_id", "page_count", "error_code", "error"):
            hit_cols[k].append(hit[k])
    n_cached = len(hit_cols["source_uri"])
    cached = pa.table(
        {
            **{f.name: pa.array(hit_cols[f.name], f.type) for f in DISCOVERED_SCHEMA if f.name != "password"},
            "password": pa.array([""] * n_cached, pa.string()),
        },
        schema=DISCOVERED_SCHEMA,
    )
    del hit_cols
    docs = _probe(cfg, todo) if todo else []
    if cache is not None:
        new = cache.add(
            [
                {**d, "size": stats[d["source_uri"]][0], "stamp": stats[d["source_uri"]][1]}
                for d in docs
                if stats[d["source_uri"]]
            ],
            live={(u, *st) for u, st in stats.items() if st is not None},
        )
        log.info(
            "discovery: %d of %d document(s) from the stat cache, %d read and hashed (%d cached now)",
            n_cached,
            len(listed),
            len(docs),
            new,
        )
    out = pa.concat_tables([discovered_table(docs), cached]) if docs else cached
    return out.sort_by("source_uri").combine_chunks()


def _probe(cfg: PipelineConfig, uris: list[str]) -> list[dict[str, Any]]:
    """Read, hash and probe `uris` on a Ray Data actor pool; one small row each."""
    import ray

    ds = ray.data.from_items([{"source_uri": u} for u in uris], override_num_blocks=min(len(uris), 256))
    return ds.map_batches(
        ProbeDocuments,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=32,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=64),
        num_cpus=0.5,
    ).take_all()


class ProbeDocuments:
    """Read + hash + open each document; emit one metadata row per document (no bytes kept)."""

    def __init__(self, cfg: PipelineConfig):
        from pipeline.render_proc import RenderWorker
        from pipeline.sources import read_passwords

        self.cfg = cfg
        self.passwords = {
            **read_passwords(cfg.input.passwords_file, cfg.input.storage_options),
            **cfg.input.passwords,
        }
        # MuPDF runs in a killable child here too: a file that hangs the parser costs one
        # doc_error row (probe_error), not the discovery of the whole collection
        self.worker = RenderWorker(recycle_after=cfg.render.recycle_after * 20)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.render import DocError
        from pipeline.sources import content_id, read_document

        out = []
        for uri in batch.column("source_uri").to_pylist():
            row: dict[str, Any] = {
                "source_uri": uri,
                "doc_id": "",
                "page_count": 0,
                "error_code": "",
                "error": "",
                "password": "",
            }
            try:
                data = read_document(uri, self.cfg.input.storage_options)
            except Exception as e:  # missing / unreadable object: a doc_error row, not a crash
                row.update(doc_id=_uri_id(uri), error_code="read_error", error=f"{type(e).__name__}: {e}")
                out.append(row)
                continue
            row["doc_id"] = content_id(data)
            password = self._password(uri, row["doc_id"])
            info = self.worker.probe(data, password, extract_text=False, timeout_s=self.cfg.render.timeout_s)
            del data
            if isinstance(info, DocError):
                row.update(error_code=info.code, error=info.message)
            else:
                row.update(page_count=info.page_count, password=password or "")
            out.append(row)
        return pa.Table.from_pylist(out)

    def _password(self, uri: str, doc_id: str) -> str | None:
        pw = self.passwords
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        return pw.get(doc_id) or pw.get(name)


def _uri_id(uri: str) -> str:
    import hashlib

    return "uri:" + hashlib.sha256(uri.encode()).hexdigest()
