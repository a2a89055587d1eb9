"""Ray Data stages of the job: render -> OCR -> post-process + write (discovery:
`pipeline/discover.py`, planning: `pipeline/plan.py`, driver checks and actor sizing:
`pipeline/preflight.py`, test faults: `pipeline/faults.py`).

The stage contract. Every stage takes and returns Arrow batches in one internal schema
(`WORK_SCHEMA`: the page schema plus a few `_`-prefixed working columns), so blocks from different
stages always unify. Each stage declares the columns it reads (`READS`) and writes (`WRITES`) and
works column by column: it reads only its `READS` columns out of the batch and replaces only its
`WRITES` columns, every other column passes through as the same Arrow buffers. One row in gives
one row out. A row's `status` is null while it travels (in flight: it has no final status yet); a
stage only works on those rows, so error rows (doc_error, render_error, ocr_error) reach the writer
like any other row. Only final statuses (`schema.Status`) reach disk: the writer sets them.

What travels between stages is small: a page is a compressed image (`_page_png`, PNG encoded by
MuPDF in the render child; lossless, so the views built from it are the views of the raw pixels),
never raw pixels. The OCR actor decodes it and builds the mode's views (global view + tiles) in
CPU threads right where they are consumed; the writer crops figures from the same PNG. Passwords
never ride in rows: the render stage looks them up from the config by doc_id (or file name).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from model.engine_config import FinishReason
from pipeline.config import Fallback, ForceLength, PipelineConfig, ViewKind
from pipeline.schema import PAGE_SCHEMA, Status

log = logging.getLogger("pagemill")

WORK_FIELDS = [
    pa.field("_range_start", pa.int32()),
    pa.field("_range_stop", pa.int32()),
    pa.field("_page_png", pa.binary()),  # the rendered page, PNG (lossless); width_px x height_px RGB
    pa.field("_text_layer", pa.string()),
    pa.field("_text_blocks", pa.int32()),  # generation.force_length: text blocks (pipeline/forced.py)
]
# the page schema, except that `status` is null while a row is in flight
WORK_SCHEMA = pa.schema(
    [f.with_nullable(True) if f.name == "status" else f for f in PAGE_SCHEMA] + WORK_FIELDS
)

RECEIPT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("page_index", pa.int32()), ("status", pa.string()), ("file", pa.string())]
)


def to_batch(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def with_columns(batch: pa.Table, rows: Sequence[int], values: dict[str, list[Any]]) -> pa.Table:
    """`batch` with `values[col][k]` written into row `rows[k]` of each named column (the other
    rows keep their values; columns not named are the same Arrow buffers)."""
    for name, vals in values.items():
        col = batch.column(name).to_pylist()
        for i, v in zip(rows, vals, strict=True):
            col[i] = v
        batch = batch.set_column(
            batch.schema.get_field_index(name),
            WORK_SCHEMA.field(name),
            pa.array(col, WORK_SCHEMA.field(name).type),
        )
    return batch


def pending_rows(batch: pa.Table) -> list[int]:
    """Positions of the rows still in flight (no final status yet)."""
    return [i for i, s in enumerate(batch.column("status").to_pylist()) if s is None]


def _index(rows: list[int]) -> pa.Array:
    """Row positions as an int64 array: `take` has no kernel for the null-typed array that an
    empty Python list becomes (a batch with no pending row, e.g. all quarantined)."""
    return pa.array(rows, type=pa.int64())


def from_result(result: Any, columns: dict[str, str]) -> dict[str, Any]:
    """A stage's result object as row values: `columns` maps each column to its attribute."""
    return {column: getattr(result, attr) for column, attr in columns.items()}


def lookup_password(passwords: dict[str, str], source_uri: str, doc_id: str) -> str | None:
    """The password of a document: by doc_id (sha256), else by file name (as discovery does)."""
    name = source_uri.rstrip("/").rsplit("/", 1)[-1]
    return passwords.get(doc_id) or passwords.get(name)


def config_passwords(cfg: PipelineConfig) -> dict[str, str]:
    from pipeline.sources import read_passwords

    return {**read_passwords(cfg.input.passwords_file, cfg.input.storage_options), **cfg.input.passwords}


# ----------------------------------------------------------------------------- processing


def configure_data_context(cfg: PipelineConfig) -> None:
    """Ray Data streaming settings of the job: reserve resources per operator so the OCR operator's
    input queue is never starved by upstream operators (and the renderers cannot flood the object
    store ahead of it)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.op_resource_reservation_enabled = True
    ctx.op_resource_reservation_ratio = 0.5
    ctx.execution_options.preserve_order = False


def process(cfg: PipelineConfig, feed: Any, store: Any, registry: str = "") -> Any:
    """The streaming dataset of write receipts (one row per page row written), over the task
    rows that `feed` (a `pipeline.feed.PlanFeed` actor) gets once the plan is made: the dataset
    (its OCR actors included) can start before planning ends. `registry`: the name of the run's
    actor registry (`pipeline.metrics.ActorRegistry`), if any."""
    import ray

    from pipeline.cluster import connected, ocr_pool
    from pipeline.feed import read_feed
    from pipeline.preflight import ocr_calls_per_actor, ocr_resources, render_pool

    configure_data_context(cfg)
    min_ocr, n_ocr, gpus = ocr_pool(cfg, connected(cfg))  # waits (bounded) for GPU nodes on a cluster
    min_render, max_render = render_pool(cfg, n_ocr)
    ds = read_feed(feed)
    ds = ds.map_batches(
        RenderStage,
        fn_constructor_kwargs={"cfg": cfg, "registry": registry},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=min_render, max_size=max_render),
        num_cpus=cfg.ray.render_cpus,
    )
    ds = ds.map_batches(
        OcrStage,
        fn_constructor_kwargs={"cfg": cfg, "registry": registry},
        batch_size=cfg.ray.ocr_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=min_ocr, max_size=n_ocr, max_concurrent_calls_per_actor=ocr_calls_per_actor(cfg, gpus)
        ),
        num_cpus=1,
        max_restarts=-1,
        max_task_retries=cfg.ray.ocr_max_retries,
        **ocr_resources(cfg, gpus),
    )
    ds = ds.map_batches(
        WriteStage,
        fn_constructor_kwargs={"cfg": cfg, "root": store.uri, "registry": registry},
        batch_size=cfg.ray.write_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
        num_cpus=0.25,
    )
    return ds


class RenderStage:
    """Render one page range in a killable, recycled PyMuPDF subprocess; one row per page out.

    The one stage that changes the row count: a task row (a page range) becomes its pages."""

    READS = (
        "doc_id",
        "source_uri",
        "page_count",
        "mode",
        "config_hash",
        "model_id",
        "status",
        "_range_start",
        "_range_stop",
    )
    # a rendered page's columns: column -> `pipeline.render.PageImage` attribute
    FROM_PAGE = {
        "width_pt": "width_pt",
        "height_pt": "height_pt",
        "width_px": "width_px",
        "height_px": "height_px",
        "dpi": "dpi",
        "render_ms": "render_ms",
        "text_layer_chars": "text_chars",
        "_page_png": "png",
        "_text_layer": "text",
        "_text_blocks": "text_blocks",
    }
    WRITES = ("page_index", "status", "error_code", "error", *FROM_PAGE)

    def __init__(self, cfg: PipelineConfig, registry: str = ""):
        from pipeline.metrics import CpuReporter
        from pipeline.render_proc import RenderWorker

        self.cfg = cfg
        self.worker = RenderWorker(recycle_after=cfg.render.recycle_after)
        self.worker.warm()  # the pool starts while discovery runs: its first pages pay no child start
        self.cpu = CpuReporter(registry, cfg.ray.namespace, "render")  # with the render children
        self.passwords = config_passwords(cfg)
        self.count_blocks = cfg.generation.force_length == ForceLength.text_layer
        self.called = False
        self.cpu.point("render_actor_up_first")
        self.cpu.point("render_actor_up_last", latest=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.render import PageError
        from pipeline.sources import read_document

        if not self.called:
            self.called = True
            self.cpu.point("first_render_call")
        out: list[dict[str, Any]] = []
        for task in batch.to_pylist():  # task rows: a few small scalars each
            if task["status"] is not None:  # a finished row (doc_error, quarantined)
                out.append(task)
                continue
            r = self.cfg.render
            pages = list(range(task["_range_start"], task["_range_stop"]))
            base = {
                k: task[k] for k in ("doc_id", "source_uri", "page_count", "mode", "config_hash", "model_id")
            }
            capped = [i for i in pages if i >= r.max_pages]
            todo = [i for i in pages if i < r.max_pages]
            try:
                data = read_document(task["source_uri"], self.cfg.input.storage_options)
                password = lookup_password(self.passwords, task["source_uri"], task["doc_id"])
                results = (
                    self.worker.render(
                        data,
                        password,
                        todo,
                        r.options(),
                        output="png",
                        count_blocks=self.count_blocks,
                    )
                    if todo
                    else []
                )
            except Exception as e:  # the bytes vanished between probe and render, etc.
                results = [
                    PageError(page_index=i, code="render_error", message=f"{type(e).__name__}: {e}")
                    for i in todo
                ]
            from pipeline import metrics

            metrics.inc(
                "render_timeouts",
                sum(1 for x in results if isinstance(x, PageError) and metrics.is_render_timeout(x.message)),
            )
            for res in results:
                row = {**base, "page_index": res.page_index, "status": None}
                if isinstance(res, PageError):
                    row.update(status=Status.render_error, error_code=res.code, error=res.message)
                else:
                    row.update(from_result(res, self.FROM_PAGE))
                out.append(row)
            for i in capped:
                out.append(
                    {
                        **base,
                        "page_index": i,
                        "status": Status.render_error,
                        "error_code": "too_many_pages",
                        "error": f"page beyond render.max_pages={r.max_pages}",
                    }
                )
        self.cpu.report(self.worker.children_cpu_s)
        return to_batch(out)


def _engine_kwargs(cfg: PipelineConfig, on_gpu: bool) -> dict[str, Any]:
    """`PageOcr.load`'s engine settings from the config (the one place they are spelled out)."""
    from pipeline.preflight import ocr_rows

    g = cfg.generation
    return {
        "max_batch": ocr_rows(cfg, on_gpu),
        "max_model_len": g.max_model_len,
        "max_new_tokens": g.max_new_tokens,
        "ngram_size": g.ngram_size,
        "ngram_window": g.ngram_window,
        "loop_min_span": g.loop_min_span,
        "ngram_max_size": max(g.ngram_size, g.fallback_ngram_size),
        "ngram_max_window": max(g.ngram_window, g.fallback_ngram_window),
    }


def load_page_ocr(cfg: PipelineConfig, on_gpu: bool) -> Any:
    """The job's `model.runner.PageOcr` (model + engine) from the config; shared by the OCR actor
    and the benchmark's engine-alone run, so both run the same engine settings."""
    from model.runner import PageOcr

    m = cfg.model
    return PageOcr.load(
        m.name,
        m.source,
        m.dtype,
        m.seed,
        prompt=cfg.generation.prompt,
        revision=m.revision,  # resolved on the driver: every worker loads the same snapshot
        **_engine_kwargs(cfg, on_gpu),
    )


def start_precompile(cfg: PipelineConfig) -> Any:
    """Compile the OCR engine's Triton kernels in a child process (`model.precompile`) while
    this process loads the model; None on CPU or with `ray.ocr_precompile=false`."""
    if not cfg.ray.ocr_precompile:
        return None
    from model import precompile
    from model.runner import PageOcr

    m = cfg.model
    try:
        shapes = PageOcr.kernel_shapes(
            m.name, cfg.mode.name, m.source, m.dtype, m.revision, **_engine_kwargs(cfg, on_gpu=True)
        )
        return precompile.start(shapes)
    except Exception as e:  # noqa: BLE001 - a speed-up only: the load below reports real errors
        log.warning("kernel precompile not started: %s: %s", type(e).__name__, e)
        return None


class OcrStage:
    """One actor per GPU (or one on CPU): the model is loaded once; pages stream through the
    continuous-batching engine (model/engine.py) in a background thread.

    The page views are built here, from the page PNG, in a pool of threads of this actor
    (`pipeline.views`): what crosses the object store is the compressed page, not ~10 MB of
    Gundam views.
    The OCR output columns are written; the page PNG passes through (the writer crops figures from
    it) only when the outputs need it (`output.write_figures` / `output.include_images`).

    `__call__` is a coroutine, so Ray Data runs several batches of this actor at once: their pages
    join one running batch on the device (`PageOcr.submit`) instead of the device draining at every
    Ray batch boundary. Pages that end without EOS go through the same engine once more with the
    stronger n-gram ban (per-request settings), as `attempts=2` - except forced-length pages
    (`generation.force_length`, benchmarks), which end `length` by design."""

    READS = ("status", "source_uri", "_page_png", "_text_layer", "_text_blocks")
    # a page's OCR columns: column -> `model.runner.OcrOutput` attribute (the same names)
    FROM_OUTPUT = {
        c: c for c in ("raw_output", "num_output_tokens", "finish_reason", "ocr_ms", "num_vision_tokens")
    }
    WRITES = ("status", "error_code", "error", *FROM_OUTPUT, "attempts", "fallback", "_page_png")

    def __init__(self, cfg: PipelineConfig, registry: str = ""):
        import time

        # the actor's start-up timeline: its process created, this constructor entered (the
        # worker is up and this module imported); `t_start` below: torch and the model code imported
        marks = {"init_start": time.time()}
        import asyncio
        import os

        from pipeline.metrics import process_start_time
        from pipeline.profiling import StackSampler

        if (t_proc := process_start_time()) is not None:
            marks["process_start"] = t_proc
        self.profiler = StackSampler.from_env("ocr")  # opt-in diagnostics (PAGEMILL_PROFILE_DIR)

        from model.runner import default_device
        from pipeline.faults import ocr_faults
        from pipeline.views import ViewBuilder

        g = cfg.generation
        t_start = time.time()  # GPU time counts from the model load on
        on_cpu = default_device().type == "cpu"
        self.precompile = None if on_cpu else start_precompile(cfg)  # beside the load below
        self.cfg, self.g = cfg, g
        self.faults = ocr_faults()
        self.keep_png = cfg.output.write_figures or cfg.output.include_images
        workers = cfg.ray.ocr_view_workers or max(1, min(8, (os.cpu_count() or 2) // 2))
        self.views = ViewBuilder(cfg.ray.ocr_views, workers)  # its workers start while the model loads
        self.ocr = load_page_ocr(cfg, on_gpu=not on_cpu)
        ec = self.ocr.engine.cfg
        log.info(
            "OCR engine on %s: %d KV rows of %d tokens",
            self.ocr.engine.device,
            ec.max_batch,
            ec.max_model_len,
        )
        self.fallback = g.fallback == Fallback.ngram
        self._retry_lock: asyncio.Lock | None = None
        self.faults.die_once("ocr")
        self._metrics(registry, t_start, marks)

    def _metrics(self, registry: str, t_start: float, marks: dict[str, float]) -> None:
        """Engine numbers -> Ray metrics (a sampler thread), and this actor in the run's registry
        (device name, start time: the run record's GPUs by type and GPU-hours)."""
        from pipeline.metrics import CpuReporter, EngineSampler, RegistryClient

        self.sampler = EngineSampler(self.ocr)
        self.cpu = CpuReporter(registry, self.cfg.ray.namespace, "ocr")
        if self.precompile is not None:  # the start-up timeline: when the kernels were ready
            self.precompile.on_done(lambda t: self.cpu.point("ocr_precompiled", t=t))
        self.registry = (
            RegistryClient(registry, self.cfg.ray.namespace, self.ocr.device_name(), t_start, marks)
            if registry
            else None
        )

    @staticmethod
    def _count(results: list[Any], passes: list[str], fallbacks: int) -> None:
        """This batch's OCR counters: tokens of the rows, fallback passes, loop-detector stops
        (`passes`: the finish reason of every pass, first and fallback)."""
        from pipeline import metrics

        metrics.inc("output_tokens", sum(r.num_output_tokens for r in results))
        metrics.inc("fallback_passes", fallbacks)
        metrics.inc("repetition_stops", sum(1 for f in passes if f == "repetition"))

    async def _input(self, png: bytes, force_len: int | None) -> Any:
        from model.runner import OcrInput

        m = self.cfg.mode
        if self.views.kind == ViewKind.device:  # views built by the engine, on its device
            return OcrInput.from_page(await self.views.decode(png), m.name, m.max_crops, force_len)
        prep = await self.views.build(png, m.name, m.max_crops)
        return OcrInput.from_views(prep, force_len)  # the engine caps it with this prompt's length

    def _forced(self, batch: pa.Table, todo: list[int]) -> list[int | None]:
        """`generation.force_length=text_layer`: each page's forced length (prompt length 0 here;
        the engine caps it with the real prompt's length); otherwise None."""
        if self.g.force_length != ForceLength.text_layer:
            return [None] * len(todo)
        from pipeline.forced import forced_from_text

        texts = batch.column("_text_layer").take(_index(todo)).to_pylist()
        blocks = batch.column("_text_blocks").take(_index(todo)).to_pylist()
        return [
            forced_from_text(t, b or 0, self.ocr.tokenizer, 0, self.g.max_model_len)
            for t, b in zip(texts, blocks)
        ]

    async def __call__(self, batch: pa.Table) -> pa.Table:
        import asyncio
        import time
        from dataclasses import replace

        from model.preprocess import ImageError

        t_in = time.time()  # the batch's pages enter OCR
        todo = pending_rows(batch)
        pngs = batch.column("_page_png").take(_index(todo)).to_pylist()
        forced = self._forced(batch, todo)
        self.faults.die_once("ocr_call")
        self.faults.poisoned(batch.column("source_uri").take(_index(todo)).to_pylist())
        made = await asyncio.gather(
            *(self._input(p, f) for p, f in zip(pngs, forced)), return_exceptions=True
        )
        bad = {k: str(x) for k, x in enumerate(made) if isinstance(x, ImageError)}
        for x in made:
            if isinstance(x, BaseException) and not isinstance(x, ImageError):
                raise x
        ok = [k for k in range(len(todo)) if k not in bad]
        inputs: list[Any] = [made[k] for k in ok]  # OcrInput (errors were split off above)
        results, submitted, done = await self._run(inputs)
        first = [r.finish_reason for r in results]
        retry = [
            i
            for i, r in enumerate(results)
            if r.finish_reason in (FinishReason.length, FinishReason.repetition)
            and inputs[i].force_len is None
        ]
        second: list[str] = []
        if retry and self.fallback:  # no EOS: once more with the stronger ban
            again, _, done_again = await self._run(
                [
                    replace(
                        inputs[i],
                        ngram_size=self.g.fallback_ngram_size,
                        ngram_window=self.g.fallback_ngram_window,
                    )
                    for i in retry
                ]
            )
            second = [r.finish_reason for r in again]
            for i, res, t in zip(retry, again, done_again):
                done[i] = t  # the page is done with its second pass
                if res.finish_reason != FinishReason.error:
                    res.ocr_ms += results[i].ocr_ms
                    results[i] = res
        self._count(results, first + second, len(second))
        self.sampler.sample()  # the engine's gauges after every batch too, not only every SAMPLE_S
        self.cpu.report()
        if self.registry is not None:
            await self.registry.beat(len(todo), t_in if todo else None, submitted, done)
        cols: dict[str, list[Any]] = {c: [] for c in self.WRITES}
        status = batch.column("status").take(_index(todo)).to_pylist()
        err_code = batch.column("error_code").take(_index(todo)).to_pylist()
        err = batch.column("error").take(_index(todo)).to_pylist()
        by_k = dict(zip(ok, range(len(ok))))
        for k in range(len(todo)):
            vals: dict[str, Any] = {c: None for c in self.WRITES}
            vals.update(
                status=status[k],
                error_code=err_code[k],
                error=err[k],
                _page_png=pngs[k] if self.keep_png else None,
            )
            if k in bad:
                vals.update(status=Status.render_error, error_code="bad_image", error=bad[k], _page_png=None)
            else:
                i = by_k[k]
                res = results[i]
                vals.update(from_result(res, self.FROM_OUTPUT), attempts=1)
                if self.fallback and i in retry:
                    vals.update(attempts=2, fallback=f"{Fallback.ngram}:{first[i]}->{res.finish_reason}")
                if res.error:
                    vals.update(status=Status.ocr_error, error_code="ocr_error", error=res.error)
            for c in self.WRITES:
                cols[c].append(vals[c])
        return with_columns(batch, todo, cols)

    async def _run(self, inputs: list[Any]) -> tuple[list[Any], list[float], list[float]]:
        """Results of `inputs`, in order, with each page's times (time.time()): into the engine,
        and finished. If the engine raised while a page was in flight, that page is submitted
        again on its own (one retry at a time, so a page that keeps failing only fails itself)
        and, failing again, gets an error result (finish_reason `error`)."""
        import asyncio
        import time

        from model.runner import OcrOutput

        futures, submitted = [], []
        done = [0.0] * len(inputs)
        for i, x in enumerate(inputs):
            fut = self.ocr.submit(x)
            submitted.append(time.time())
            fut.add_done_callback(lambda _f, i=i: done.__setitem__(i, time.time()))
            futures.append(asyncio.wrap_future(fut))
        out = await asyncio.gather(*futures, return_exceptions=True)
        if self._retry_lock is None:
            self._retry_lock = asyncio.Lock()
        for i, (x, res) in enumerate(zip(inputs, out)):
            if not isinstance(res, BaseException):
                continue
            log.warning(
                "OCR failed with a page in flight (%s: %s); retrying it alone", type(res).__name__, res
            )
            async with self._retry_lock:
                try:
                    out[i] = await asyncio.wrap_future(self.ocr.submit(x))
                except Exception as e:  # noqa: BLE001 - this page's own failure: an ocr_error row
                    out[i] = OcrOutput.failed(x, f"{type(e).__name__}: {e}")
                done[i] = time.time()
        return list(out), submitted, done


# the final status of a row the model finished (FinishReason.error and anything else: ocr_error)
STATUS_BY_FINISH: dict[str, Status] = {
    FinishReason.stop: Status.ok,
    FinishReason.length: Status.truncated,
    FinishReason.repetition: Status.repetition,
}


def postprocess_row(row: dict[str, Any], quality: Any = None) -> dict[str, Any]:
    """Grounding parse -> markdown + layout; the final status from the finish reason; with a
    `pipeline.quality.PageQuality`, the quality columns. `image` blocks get a figure reference
    (`schema.figure_name`) in the markdown and are listed in the work field `_figures` as
    (block index in `layout`, bbox_norm, name) for the writer's crops."""
    from model.grounding import parse_grounding
    from pipeline.schema import figure_name

    if row["status"] is not None:  # already final (an error row)
        return row
    doc_id, page_index = row["doc_id"], row["page_index"]
    parsed = parse_grounding(
        row["raw_output"] or "",
        (row["width_px"], row["height_px"]),
        (row["width_pt"], row["height_pt"]),
        figure_ref=lambda block, _k: figure_name(doc_id, page_index, block),
    )
    row["markdown"] = parsed.markdown
    row["layout"] = [
        {
            "label": b.label,
            "bbox_norm": list(b.bbox_norm) if b.bbox_norm else None,
            "bbox_pt": list(b.bbox_pt) if b.bbox_pt else None,
            "text": b.text,
        }
        for b in parsed.blocks
    ]
    row["_figures"] = [(i, b.bbox_norm, b.figure_ref) for i, b in enumerate(parsed.blocks) if b.figure_ref]
    row["status"] = STATUS_BY_FINISH.get(row["finish_reason"] or "", Status.ocr_error)
    if row["status"] == Status.ocr_error and not row.get("error"):
        row["error"] = f"unknown finish reason {row['finish_reason']!r}"
    if quality is not None:
        quality.fill(row, row.get("_text_layer"))
    return row


# the columns post-processing derives its output from, and the ones it writes; every other
# column (the page PNG included) stays in Arrow through the writer
POST_READS = (
    "doc_id",
    "page_index",
    "status",
    "raw_output",
    "finish_reason",
    "error",
    "width_px",
    "height_px",
    "width_pt",
    "height_pt",
    "num_vision_tokens",
    "text_layer_chars",
    "_text_layer",
)
POST_WRITES = (
    "markdown",
    "layout",
    "status",
    "error",
    "repetition_score",
    "num_text_tokens",
    "compression_ratio",
    "text_layer_agreement",
)


def postprocess(batch: pa.Table, quality: Any = None) -> tuple[pa.Table, dict[int, list[Any]]]:
    """`postprocess_row` over the pending rows of `batch`, column-wise: only the POST_READS
    columns of those rows go to Python, only the POST_WRITES columns are replaced. Returns the
    batch and, per row index with figures, its `_figures` list (for the writer's crops)."""
    todo = pending_rows(batch)
    if not todo:
        return batch, {}
    take = _index(todo)
    inputs = {c: batch.column(c).take(take).to_pylist() for c in POST_READS if c in batch.column_names}
    done = [postprocess_row({c: v[k] for c, v in inputs.items()}, quality) for k in range(len(todo))]
    figures = {i: r["_figures"] for i, r in zip(todo, done) if r["_figures"]}
    return with_columns(batch, todo, {c: [r.get(c) for r in done] for c in POST_WRITES}), figures


class WriteStage:
    """Post-process, then write each batch as atomic Parquet parts of at most ~output.target_file_mb
    (row groups of ~output.row_group_mb); per part: its figure crops (`figures/`, same part name,
    cut from the page PNG), then the pages part, then its ledger entry. Emit small receipts (one
    per page row). With `output.include_images`, the page PNG becomes the `page_image` column.
    Column-wise: the batch stays an Arrow table (see `postprocess`); only the pages with figures
    have their PNG decoded, for the crops."""

    READS = tuple(WORK_SCHEMA.names)
    WRITES = tuple(RECEIPT_SCHEMA.names)  # the receipts replace the batch

    def __init__(self, cfg: PipelineConfig, root: str, registry: str = ""):
        from pipeline.metrics import CpuReporter
        from pipeline.outputs import MB, OutputStore
        from pipeline.quality import PageQuality

        self.cfg = cfg
        self.cpu = CpuReporter(registry, cfg.ray.namespace, "write")
        self.store = OutputStore(root, cfg.output.storage_options)
        self.quality = PageQuality()
        o = cfg.output
        self.target_bytes = int(o.target_file_mb * MB)
        self.sizing: dict[str, Any] = {
            "row_group_bytes": int(o.row_group_mb * MB),
            "row_group_rows": o.row_group_rows,
        }

    def page_table(self, batch: pa.Table) -> tuple[pa.Table, dict[int, list[Any]]]:
        """The PAGE_SCHEMA table of a work batch (work columns dropped) and its figures by row."""
        from datetime import datetime, timezone

        from pipeline.arrow import pc
        from pipeline.schema import IMAGE, STATUSES, page_image_name

        batch, figures = postprocess(batch, self.quality)
        bad = set(batch.column("status").to_pylist()) - set(STATUSES)
        if bad:  # e.g. None: a row still in flight must never reach disk
            raise ValueError(f"rows without a final status: {sorted(map(repr, bad))} (allowed {STATUSES})")
        n = batch.num_rows
        now = pa.array([datetime.now(timezone.utc)] * n, PAGE_SCHEMA.field("written_at").type)
        batch = batch.set_column(batch.schema.get_field_index("written_at"), "written_at", now)
        if self.cfg.output.include_images and "_page_png" in batch.column_names:
            old = batch.column("page_image").combine_chunks()
            png = batch.column("_page_png").combine_chunks()
            ids, pages = batch.column("doc_id").to_pylist(), batch.column("page_index").to_pylist()
            # True: the row keeps what it has (an image already, no PNG, or a doc_error row)
            keep = [old[i].is_valid or not png[i].is_valid or pages[i] < 0 for i in range(n)]
            paths = pa.array(
                [None if k else page_image_name(ids[i], pages[i]) for i, k in enumerate(keep)], pa.string()
            )
            made = pa.StructArray.from_arrays([png, paths], fields=list(IMAGE), mask=pa.array(keep))
            # the PNG bytes stay in Arrow buffers; pyarrow.compute functions are generated at import
            merged = pc.if_else(pa.array(keep), old, made)
            batch = batch.set_column(batch.schema.get_field_index("page_image"), "page_image", merged)
        return batch.select(list(PAGE_SCHEMA.names)).cast(PAGE_SCHEMA), figures

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.ledger import commit_entry
        from pipeline.outputs import figure_table, part_name, split_table

        table, figures = self.page_table(batch)
        pngs = batch.column("_page_png") if "_page_png" in batch.column_names else None
        files: list[str] = []
        start = 0
        for part in split_table(table, self.target_bytes) if table.num_rows else []:
            name = part_name(part)
            if self.cfg.output.write_figures:
                crops = [
                    self._figure_source(table, i, figures[i], pngs)
                    for i in range(start, start + part.num_rows)
                    if i in figures
                ]
                figs = figure_table(crops)
                if figs.num_rows:  # before the pages part: a crash leaves no committed page without them
                    self.store.write_parquet("figures", figs, name=name, **self.sizing)
            path = self.store.write_parquet("pages", part, name=name, **self.sizing)
            commit_entry(self.store, part, path)  # after the pages part: the ledger never runs ahead
            files += [path] * part.num_rows
            start += part.num_rows
        self.cpu.report()
        return pa.table(
            {
                "doc_id": table.column("doc_id"),
                "page_index": table.column("page_index"),
                "status": table.column("status"),
                "file": pa.array(files, pa.string()),
            },
            schema=RECEIPT_SCHEMA,
        )

    @staticmethod
    def _figure_source(table: pa.Table, i: int, figures: list[Any], pngs: Any) -> dict[str, Any]:
        """What `outputs.figure_rows` reads of row `i`: its figures, page PNG, size and ids."""
        row = {
            c: table.column(c)[i].as_py()
            for c in ("doc_id", "page_index", "width_px", "height_px", "config_hash")
        }
        png = pngs[i] if pngs is not None else None
        return {
            **row,
            "_figures": figures,
            "_page_png": png.as_py() if png is not None and png.is_valid else None,
        }
