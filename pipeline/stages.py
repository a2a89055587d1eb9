"""Ray Data stages of the job: render -> preprocess -> OCR -> post-process -> write (discovery:
`pipeline/discover.py`, planning: `pipeline/plan.py`).

Every stage takes and returns Arrow batches in one internal schema (the page schema plus a few
`_`-prefixed working columns), so blocks from different stages always unify. A row's `status`
is `pending` while it travels; a stage only works on pending rows and passes every other row
through untouched, so error rows (doc_error, render_error, ocr_error) reach the writer like any
other row: one row in, one row out, nothing dropped. Heavy work (PyMuPDF, the model) lives in
`pipeline/render.py` and `model/`; these callables are thin glue.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.plan import Plan
from pipeline.schema import COLUMNS, PAGE_SCHEMA

log = logging.getLogger("pagemill")

WORK_FIELDS = [
    pa.field("_password", pa.string()),
    pa.field("_range_start", pa.int32()),
    pa.field("_range_stop", pa.int32()),
    pa.field("_pixels", pa.binary()),  # rendered page, raw uint8 HxWx3
    pa.field("_global", pa.binary()),  # preprocessed global view, raw uint8 SxSx3
    pa.field("_tiles", pa.binary()),  # preprocessed tiles, raw uint8 Tx s x s x3
    pa.field("_grid_w", pa.int32()),
    pa.field("_grid_h", pa.int32()),
    pa.field("_text_layer", pa.string()),
    pa.field("_force_len", pa.int32()),  # generation.force_length: target before the prompt cap
]
WORK_SCHEMA = pa.schema(list(PAGE_SCHEMA) + WORK_FIELDS)

RECEIPT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("page_index", pa.int32()), ("status", pa.string()), ("file", pa.string())]
)


class ModelUnavailable(RuntimeError):
    """The configured model weights cannot be found or fetched."""


def to_rows(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def to_batch(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


# ----------------------------------------------------------------------------- model check


def check_model_available(cfg: PipelineConfig) -> None:
    """Fail fast, on the driver, when the real weights cannot be reached (cheap: config.json only)."""
    if cfg.model.name != "deepseek_ocr":
        return
    from model.checkpoint import CheckpointUnavailable, resolve_config_json

    try:
        resolve_config_json(cfg.model.source)
    except CheckpointUnavailable as e:  # its message already names the offline option
        raise ModelUnavailable(f"cannot load the DeepSeek-OCR weights: {e}") from None
    except Exception as e:  # anything else (auth, disk): same advice
        raise ModelUnavailable(
            f"cannot load the DeepSeek-OCR weights from {cfg.model.source!r} ({type(e).__name__}: {e}). "
            "Point model.source at a local copy of deepseek-ai/DeepSeek-OCR, or run offline with the "
            "tiny random-weight model: model=tiny_random"
        ) from None


# ----------------------------------------------------------------------------- processing


def process(cfg: PipelineConfig, plan: Plan, store: Any) -> Any:
    """The streaming dataset of write receipts (one row per page row written)."""
    import ray

    n_ocr, gpus = ocr_actor_count(cfg)
    ds = ray.data.from_arrow(to_batch(plan.tasks)) if plan.tasks else ray.data.from_arrow(to_batch([]))
    ds = ds.repartition(max(1, min(len(plan.tasks), 1024)))
    ds = ds.map_batches(
        RenderStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=1, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, _cpu_count() - n_ocr)),
        num_cpus=cfg.ray.render_cpus,
    )
    ds = ds.map_batches(preprocess_batch, fn_kwargs={"cfg": cfg}, batch_size=8, batch_format="pyarrow",
                        num_cpus=0.5)
    ds = ds.map_batches(
        OcrStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.ray.ocr_batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=n_ocr, max_concurrent_calls_per_actor=ocr_calls_per_actor(cfg, gpus)),
        num_cpus=1, max_restarts=-1, max_task_retries=cfg.ray.ocr_max_retries, **ocr_resources(cfg, gpus),
    )
    ds = ds.map_batches(WriteStage, fn_constructor_kwargs={"cfg": cfg, "root": store.uri},
                        batch_size=cfg.ray.write_batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
                        num_cpus=0.25)
    return ds


def _cpu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def ocr_actor_count(cfg: PipelineConfig) -> tuple[int, bool]:
    """(actors, on_gpu): one actor per GPU of the cluster, or `ray.ocr_actors` if set."""
    import ray

    res = cfg.ray.ocr_resource or "GPU"  # a custom resource can stand in for GPUs (tests, pinning)
    gpus = int(ray.cluster_resources().get(res, 0))
    if cfg.ray.ocr_actors:
        return cfg.ray.ocr_actors, gpus > 0
    return (gpus, True) if gpus else (1, False)


def ocr_calls_per_actor(cfg: PipelineConfig, on_gpu: bool) -> int:
    """Batches an OCR actor works on at once: enough to keep twice its KV rows fed.

    NOTE: Ray Data gives each actor task one bundle (~`ocr_batch_size` rows) and runs one task
    per actor at a time unless the actor's concurrency is raised; with the default, an async
    OcrStage would only ever hold one batch (16 pages) on the device. Each concurrent call
    submits its pages to the same engine (`PageOcr.submit`), so they share one running batch."""
    rows = ocr_rows(cfg, on_gpu) or AUTO_ROWS_GUESS
    return max(1, -(-2 * rows // cfg.ray.ocr_batch_size))


AUTO_ROWS_GUESS = 128  # `generation.max_batch=null` on a GPU: rows are fitted in the actor; ~121 on an 80 GB H100


def ocr_rows(cfg: PipelineConfig, on_gpu: bool) -> int | None:
    """KV rows of an OCR actor's engine: `generation.max_batch` (None on a GPU: fitted to its free
    memory once the model is loaded); on CPU at most one Ray batch (`ray.ocr_batch_size`)."""
    mb, bs = cfg.generation.max_batch, cfg.ray.ocr_batch_size
    return mb if on_gpu else min(mb or bs, bs)


def ocr_resources(cfg: PipelineConfig, on_gpu: bool) -> dict[str, Any]:
    """Ray resources of one OCR actor: one GPU (or one unit of `ray.ocr_resource`) each."""
    if not on_gpu:
        return {"num_gpus": 0}
    if cfg.ray.ocr_resource:
        return {"num_gpus": 0, "resources": {cfg.ray.ocr_resource: 1}}
    return {"num_gpus": 1}


class RenderStage:
    """Render one page range in a killable, recycled PyMuPDF subprocess; one row per page out."""

    def __init__(self, cfg: PipelineConfig):
        from pipeline.render import RenderWorker

        self.cfg = cfg
        self.worker = RenderWorker(recycle_after=cfg.render.recycle_after)
        g = cfg.generation
        self.force_max_model_len = g.max_model_len if g.force_length == "text_layer" else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.render import PageError
        from pipeline.sources import read_document

        out: list[dict[str, Any]] = []
        for task in to_rows(batch):
            if task["status"] != "pending":
                out.append(task)
                continue
            r = self.cfg.render
            pages = list(range(task["_range_start"], task["_range_stop"]))
            base = {k: task[k] for k in ("doc_id", "source_uri", "page_count", "mode", "config_hash", "model_id")}
            capped = [i for i in pages if i >= r.max_pages]
            todo = [i for i in pages if i < r.max_pages]
            try:
                data = read_document(task["source_uri"], self.cfg.input.storage_options)
                results = self.worker.render(
                    data, task["_password"] or None, todo, dpi=r.dpi, max_pixels=r.max_pixels,
                    max_side_px=r.max_side_px, timeout_s=r.timeout_s, max_failures=r.max_failures,
                    force_max_model_len=self.force_max_model_len,
                ) if todo else []
            except Exception as e:  # the bytes vanished between probe and render, etc.
                results = [PageError(page_index=i, code="render_error", message=f"{type(e).__name__}: {e}")
                           for i in todo]
            for res in results:
                row = {**base, "page_index": res.page_index, "status": "pending"}
                if isinstance(res, PageError):
                    row.update(status="render_error", error_code=res.code, error=res.message)
                else:
                    row.update(
                        width_pt=res.width_pt, height_pt=res.height_pt, width_px=res.width_px,
                        height_px=res.height_px, dpi=res.dpi, render_ms=res.render_ms,
                        _pixels=res.pixels.tobytes(), text_layer_chars=res.text_chars,
                        _text_layer=res.text, _force_len=res.force_len,
                    )
                out.append(row)
            for i in capped:
                out.append({**base, "page_index": i, "status": "render_error", "error_code": "too_many_pages",
                            "error": f"page beyond render.max_pages={r.max_pages}"})
        return to_batch(out)


def preprocess_batch(batch: pa.Table, cfg: PipelineConfig) -> pa.Table:
    """Mode-specific resize/pad/tiling on CPU; views travel as compact uint8 bytes."""
    from PIL import Image

    from model.preprocess import ImageError, preprocess_image
    from pipeline.schema import page_image_name

    out = []
    for row in to_rows(batch):
        if row["status"] == "pending":
            try:
                img = np.frombuffer(row["_pixels"], np.uint8).reshape(row["height_px"], row["width_px"], 3)
                prep = preprocess_image(Image.fromarray(img), cfg.mode.name, max_crops=cfg.mode.max_crops)
                row.update(
                    _global=prep.global_view.tobytes(),
                    _tiles=prep.tiles.tobytes() if prep.tiles is not None else b"",
                    _grid_w=prep.grid[0], _grid_h=prep.grid[1], num_vision_tokens=prep.num_image_tokens,
                )
                if cfg.output.include_images:
                    row["page_image"] = {"bytes": _png(img), "path": page_image_name(row["doc_id"], row["page_index"])}
            except ImageError as e:
                row.update(status="render_error", error_code="bad_image", error=str(e))
            if row["status"] != "pending" or not cfg.output.write_figures:
                row["_pixels"] = None  # kept only for the writer's figure crops; never in a pages row
        out.append(row)
    return to_batch(out)


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class OcrStage:
    """One actor per GPU (or one on CPU): the model is loaded once; pages stream through the
    continuous-batching engine (model/engine.py) in a background thread.

    `__call__` is a coroutine, so Ray Data runs several batches of this actor at once: their pages
    join one running batch on the device (`PageOcr.submit`) instead of the device draining at every
    Ray batch boundary. Pages that end without EOS go through the same engine once more with the
    stronger n-gram ban (per-request settings), as `attempts=2` - except forced-length pages
    (`generation.force_length`, benchmarks), which end `length` by design."""

    def __init__(self, cfg: PipelineConfig):
        import asyncio

        from model.runner import PageOcr, default_device

        g = cfg.generation
        on_cpu = default_device().type == "cpu"
        self.g = g
        self.ocr = PageOcr.load(
            cfg.model.name, cfg.model.source, cfg.model.dtype, cfg.model.seed, prompt=g.prompt,
            max_batch=ocr_rows(cfg, not on_cpu),
            max_model_len=g.max_model_len, max_new_tokens=g.max_new_tokens, ngram_size=g.ngram_size,
            ngram_window=g.ngram_window, loop_min_span=g.loop_min_span,
            ngram_max_size=max(g.ngram_size, g.fallback_ngram_size),
            ngram_max_window=max(g.ngram_window, g.fallback_ngram_window),
        )
        ec = self.ocr.engine.cfg
        log.info("OCR engine on %s: %d KV rows of %d tokens", self.ocr.engine.device, ec.max_batch, ec.max_model_len)
        self.fallback = g.fallback == "ngram"
        self._retry_lock: asyncio.Lock | None = None
        _test_fault("ocr")

    async def __call__(self, batch: pa.Table) -> pa.Table:
        from dataclasses import replace

        from model.runner import OcrInput

        rows = to_rows(batch)
        todo = [r for r in rows if r["status"] == "pending"]
        inputs = [OcrInput(
            global_view=_views(r["_global"], 1), tiles=_views(r["_tiles"], None) if r["_tiles"] else None,
            grid=(r["_grid_w"], r["_grid_h"]), num_image_tokens=r["num_vision_tokens"],
            force_len=r.get("_force_len"),  # the engine caps it with this prompt's length
        ) for r in todo]
        _test_fault("ocr_call")
        _test_poison(todo)
        results = await self._run(inputs)
        first = [r.finish_reason for r in results]
        retry = [i for i, r in enumerate(results)
                 if r.finish_reason in ("length", "repetition") and inputs[i].force_len is None]
        if retry and self.fallback:  # no EOS: once more with the stronger ban
            again = await self._run([replace(inputs[i], ngram_size=self.g.fallback_ngram_size,
                                             ngram_window=self.g.fallback_ngram_window) for i in retry])
            for i, res in zip(retry, again):
                if res.finish_reason != "error":
                    res.ocr_ms += results[i].ocr_ms
                    results[i] = res
        for i, (row, res) in enumerate(zip(todo, results)):
            row.update(raw_output=res.raw_output, num_output_tokens=res.num_output_tokens,
                       finish_reason=res.finish_reason, ocr_ms=res.ocr_ms, num_vision_tokens=res.num_vision_tokens,
                       attempts=1, fallback=None)
            if self.fallback and i in retry:
                row.update(attempts=2, fallback=f"ngram:{first[i]}->{res.finish_reason}")
            if res.error:
                row.update(status="ocr_error", error_code="ocr_error", error=res.error)
        for row in todo:
            row["_global"] = row["_tiles"] = None
        return to_batch(rows)

    async def _run(self, inputs: list[Any]) -> list[Any]:
        """Results of `inputs`, in order. If the engine raised while a page was in flight, that
        page is submitted again on its own (one retry at a time, so a page that keeps failing only
        fails itself) and, failing again, gets an error result (finish_reason "error")."""
        import asyncio

        from model.runner import OcrOutput

        out = await asyncio.gather(*(asyncio.wrap_future(self.ocr.submit(x)) for x in inputs), return_exceptions=True)
        if self._retry_lock is None:
            self._retry_lock = asyncio.Lock()
        for i, (x, res) in enumerate(zip(inputs, out)):
            if not isinstance(res, BaseException):
                continue
            log.warning("OCR failed with a page in flight (%s: %s); retrying it alone", type(res).__name__, res)
            async with self._retry_lock:
                try:
                    out[i] = await asyncio.wrap_future(self.ocr.submit(x))
                except Exception as e:  # noqa: BLE001 - this page's own failure: an ocr_error row
                    out[i] = OcrOutput(tag=x.tag, raw_output="", ids=[], num_output_tokens=0,
                                       num_vision_tokens=x.num_image_tokens, finish_reason="error", ocr_ms=0.0,
                                       error=f"{type(e).__name__}: {e}")
        return list(out)


def _test_poison(rows: list[dict[str, Any]]) -> None:
    """Test hook (`PAGEMILL_TEST_OCR_POISON=<name>`): a batch holding a page of a document whose
    URI contains <name> kills the OCR process, every time (a document that crashes workers)."""
    import os

    name = os.environ.get("PAGEMILL_TEST_OCR_POISON", "")
    if name and any(name in r["source_uri"] for r in rows):
        os._exit(1)


def _test_fault(where: str) -> None:
    """Test hook (`PAGEMILL_TEST_OCR_FAULT=<where>:<marker file>`): the first process to get here
    creates the marker and dies at once (a real actor death); later ones carry on."""
    import os

    spec = os.environ.get("PAGEMILL_TEST_OCR_FAULT", "")
    if not spec.startswith(where + ":"):
        return
    try:
        fd = os.open(spec.split(":", 1)[1], os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def _views(buf: bytes, n: int | None) -> np.ndarray:
    a = np.frombuffer(buf, np.uint8)
    if n == 1:
        side = int(round((a.size // 3) ** 0.5))
        return a.reshape(side, side, 3)
    # tiles: T x s x s x 3 with s in {640, 1024}
    for s in (640, 1024, 512):
        if a.size % (s * s * 3) == 0:
            return a.reshape(-1, s, s, 3)
    raise ValueError(f"cannot infer tile shape from {a.size} bytes")


STATUS_BY_FINISH = {"stop": "ok", "length": "truncated", "repetition": "repetition"}


def postprocess_row(row: dict[str, Any], quality: Any = None) -> dict[str, Any]:
    """Grounding parse -> markdown + layout; the final status from the finish reason; with a
    `pipeline.quality.PageQuality`, the quality columns. `image` blocks get a figure reference
    (`schema.figure_name`) in the markdown and are listed in the work field `_figures` as
    (block index in `layout`, bbox_norm, name) for the writer's crops."""
    from model.grounding import parse_grounding
    from pipeline.schema import figure_name

    if row["status"] != "pending":
        return row
    doc_id, page_index = row["doc_id"], row["page_index"]
    parsed = parse_grounding(
        row["raw_output"] or "", (row["width_px"], row["height_px"]), (row["width_pt"], row["height_pt"]),
        figure_ref=lambda block, _k: figure_name(doc_id, page_index, block),
    )
    row["markdown"] = parsed.markdown
    row["layout"] = [
        {"label": b.label, "bbox_norm": list(b.bbox_norm) if b.bbox_norm else None,
         "bbox_pt": list(b.bbox_pt) if b.bbox_pt else None, "text": b.text}
        for b in parsed.blocks
    ]
    row["_figures"] = [(i, b.bbox_norm, b.figure_ref) for i, b in enumerate(parsed.blocks) if b.figure_ref]
    row["status"] = STATUS_BY_FINISH.get(row["finish_reason"] or "", "ocr_error")
    if row["status"] == "ocr_error" and not row.get("error"):
        row["error"] = f"unknown finish reason {row['finish_reason']!r}"
    if quality is not None:
        quality.fill(row, row.get("_text_layer"))
    return row


class WriteStage:
    """Post-process, then write each batch as atomic Parquet parts of at most ~output.target_file_mb
    (row groups of ~output.row_group_mb); per part: its figure crops (`figures/`, same part name),
    then the pages part, then its ledger entry. Emit small receipts (one per page row)."""

    def __init__(self, cfg: PipelineConfig, root: str):
        from pipeline.outputs import MB, OutputStore
        from pipeline.quality import PageQuality

        self.cfg = cfg
        self.store = OutputStore(root, cfg.output.storage_options)
        self.quality = PageQuality()
        o = cfg.output
        self.target_bytes = int(o.target_file_mb * MB)
        self.sizing = {"row_group_bytes": int(o.row_group_mb * MB), "row_group_rows": o.row_group_rows}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from datetime import datetime, timezone

        from pipeline.ledger import commit_entry
        from pipeline.outputs import figure_table, part_name, split_table
        from pipeline.schema import rows_to_table

        # the raw pages stay in Arrow: only those of pages with figures are copied out, for the crops
        pixels = batch.column("_pixels") if "_pixels" in batch.column_names else None
        light = batch if pixels is None else batch.drop_columns(["_pixels"])
        rows = [postprocess_row(r, self.quality) for r in to_rows(light)]
        now = datetime.now(timezone.utc)
        for i, r in enumerate(rows):
            r["written_at"] = now
            if r.get("_figures") and pixels is not None:
                r["_pixels"] = pixels[i].as_py()
        table = rows_to_table([{k: r.get(k) for k in COLUMNS} for r in rows])  # work fields dropped here
        files: list[str] = []
        for part in split_table(table, self.target_bytes) if rows else []:
            name = part_name(part)
            if self.cfg.output.write_figures:
                figures = figure_table(rows[len(files):len(files) + part.num_rows])
                if figures.num_rows:  # before the pages part: a crash leaves no committed page without them
                    self.store.write_parquet("figures", figures, name=name, **self.sizing)
            path = self.store.write_parquet("pages", part, name=name, **self.sizing)
            commit_entry(self.store, part, path)  # after the pages part: the ledger never runs ahead
            files += [path] * part.num_rows
        return pa.table(
            {"doc_id": [r["doc_id"] for r in rows], "page_index": [r["page_index"] for r in rows],
             "status": [r["status"] for r in rows], "file": files},
            schema=RECEIPT_SCHEMA,
        )
