"""Page OCR on one device: uint8 views in, raw model text out (what a pipeline GPU actor holds).

`PageOcr` owns the model, the tokenizer and the continuous-batching `Engine`; it turns the compact
uint8 views made by CPU preprocessing into normalised tensors, builds the official prompt ids,
streams pages through the engine and decodes the generated ids with special tokens kept (the
grounding parser needs `<|ref|>`/`<|det|>` and the EOS marker). No Ray, no Hydra: the pipeline
passes plain values.

`load_model` is the one place that knows the model sources: the official checkpoint (hub id
or local directory, strict load), `tiny_random` (same architecture, tiny widths, synthetic
weights from the parity rule) for offline runs and tests, and `full_random` (the full-size
architecture, random weights by the same rule drawn on the device) for GPU benchmarks.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from model.config import DType, ModelName, OcrConfig
from model.engine import Engine, Request, Result, fit_max_batch
from model.engine_config import PAGED_AUTO_ROWS, EngineConfig, FinishReason, KvLayout
from model.modes import get_mode
from model.ocr import OcrModel
from model.preprocess import PreparedImage, device_views, num_image_tokens, tile_grid, to_pixel_tensor
from model.tokenizer import PROMPTS, OcrTokenizer, PromptName
from model.vision import PageViews

if TYPE_CHECKING:
    from model.precompile import KernelShapes

DTYPES = {DType.bfloat16: torch.bfloat16, DType.float16: torch.float16, DType.float32: torch.float32}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_config(name: str, source: str = "", revision: str = "") -> OcrConfig:
    """The config of the model `load_model(name, source, ...)` builds, without building it."""
    from model.hub import resolve_source

    name = ModelName(name)
    if name == ModelName.tiny_random:
        return OcrConfig.tiny()
    if name == ModelName.full_random:
        return OcrConfig.official()
    return OcrConfig.from_hf_config(resolve_source(source, revision or None) / "config.json")


def load_model(
    name: str,
    source: str = "",
    dtype: str = DType.bfloat16,
    seed: int = 0,
    device: torch.device | str | None = None,
    revision: str = "",
) -> tuple[OcrModel, OcrTokenizer]:
    """(model in eval mode on `device`, tokenizer) for `deepseek_ocr` (from `source`), `tiny_random`
    or `full_random` (full size, built and filled on `device`: meaningless text, for benchmarks)."""
    from model.checkpoint import load_checkpoint
    from model.hub import resolve_source
    from model.synth import init_random, random_model

    device = torch.device(device) if device is not None else default_device()
    name, dtype = ModelName(name), DType(dtype)  # ValueError for a name or dtype that is not one
    if name == ModelName.tiny_random:
        model = OcrModel(OcrConfig.tiny())
        init_random(model, seed=seed)
        return model.to(device=device, dtype=DTYPES[dtype]).eval(), OcrTokenizer.default()
    if name == ModelName.full_random:
        return random_model(device, seed, dtype=DTYPES[dtype]), OcrTokenizer.default()
    root = resolve_source(source, revision or None)  # the driver's resolved revision (a hub commit)
    model = load_checkpoint(root, device=device, dtype=DTYPES[dtype])
    tok = OcrTokenizer.from_dir(root) if (Path(root) / "tokenizer.json").is_file() else OcrTokenizer.default()
    return model, tok


@dataclass
class OcrInput:
    """One page for the engine: its uint8 views (`from_views`), or the decoded page itself, whose
    views the engine builds on its device when it takes the page in (`from_page`)."""

    global_view: np.ndarray | None  # (S, S, 3) uint8; None: built from `page` on the device
    tiles: np.ndarray | None  # (T, s, s, 3) uint8 or None
    grid: tuple[int, int]  # (w_tiles, h_tiles)
    num_image_tokens: int
    force_len: int | None = None  # benchmarks: generate exactly this many tokens
    tag: Any = None
    ngram_size: int | None = None  # per-page n-gram ban (a fallback pass); None: the engine's
    ngram_window: int | None = None
    page: np.ndarray | None = None  # (H, W, 3) uint8 RGB page, views not built yet
    mode: str = ""  # the page's mode and max_crops (`page` only)
    max_crops: int | None = None

    @classmethod
    def from_views(cls, prep: PreparedImage, force_len: int | None = None, tag: Any = None) -> OcrInput:
        """The input of a page's views (`model.preprocess.preprocess_image`)."""
        return cls(prep.global_view, prep.tiles, prep.grid, prep.num_image_tokens, force_len, tag)

    @classmethod
    def from_page(
        cls,
        page: np.ndarray,
        mode: str,
        max_crops: int | None = None,
        force_len: int | None = None,
        tag: Any = None,
    ) -> OcrInput:
        """The input of a decoded RGB page (H, W, 3) uint8 whose views the engine builds on its
        device (`model.preprocess.device_views`: the same bytes as `preprocess_image`)."""
        spec = get_mode(mode, max_crops)
        height, width = int(page.shape[0]), int(page.shape[1])
        grid = tile_grid(width, height, spec)
        n = num_image_tokens(width, height, spec)
        return cls(None, None, grid, n, force_len, tag, page=page, mode=str(mode), max_crops=max_crops)

    def device_views(
        self, device: torch.device
    ) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray | None]:
        """(global view, tiles) uint8: the given views, or those of `page` built on `device`."""
        if self.page is None:
            assert self.global_view is not None  # an input has views or a page
            return self.global_view, self.tiles
        page = torch.from_numpy(self.page if self.page.flags.writeable else self.page.copy()).to(device)
        g, tiles, _ = device_views(page, self.mode, self.max_crops)  # its grid is from_page's
        return g, tiles


@dataclass
class _Track:
    """What PageOcr keeps with a request in flight (the engine returns it as the result's tag)."""

    tag: Any  # the caller's tag
    num_image_tokens: int
    t0: float
    future: Future[OcrOutput] | None = None  # serving: resolved when the page is done


@dataclass
class OcrOutput:
    tag: Any
    raw_output: str
    ids: list[int]
    num_output_tokens: int
    num_vision_tokens: int
    finish_reason: FinishReason
    ocr_ms: float
    error: str | None = None

    @classmethod
    def failed(cls, x: OcrInput, error: str) -> OcrOutput:
        """The output of a page that could not be run (finish_reason "error", no tokens)."""
        return cls(
            tag=x.tag,
            raw_output="",
            ids=[],
            num_output_tokens=0,
            num_vision_tokens=x.num_image_tokens,
            finish_reason=FinishReason.error,
            ocr_ms=0.0,
            error=error,
        )


@dataclass(frozen=True)
class EngineNumbers:
    """A snapshot of the engine's counters for the caller's metrics (model/ knows no metrics
    library: the pipeline's OCR stage records these through Ray)."""

    device_name: str  # torch.cuda device name, or "cpu"
    kv_rows: int  # KV rows (sequences the engine can hold)
    kv_rows_in_use: int
    kv_blocks: int  # paged pool size (0: slotted)
    kv_blocks_in_use: int
    decode_steps: int  # cumulative
    decode_s: float  # cumulative wall time of decode steps
    pages: int  # cumulative (every pass)
    output_tokens: int  # cumulative (every pass)


class PageOcr:
    def __init__(
        self,
        model: OcrModel,
        tokenizer: OcrTokenizer,
        engine_cfg: EngineConfig | None = None,
        prompt: str = PromptName.document,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, engine_cfg)
        self.prompt = PROMPTS.get(prompt, prompt)
        self._dtype = model.vision.dtype
        self._queue: queue.SimpleQueue[tuple[OcrInput, Future[OcrOutput]]] = queue.SimpleQueue()
        self._server: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        name: str,
        source: str = "",
        dtype: str = DType.bfloat16,
        seed: int = 0,
        prompt: str = PromptName.document,
        device: str | None = None,
        revision: str = "",
        **engine: Any,
    ) -> PageOcr:
        model, tok = load_model(name, source, dtype, seed, device, revision)
        if not engine.get("max_batch"):  # None (or 0): auto, as many KV rows as the device holds
            if engine.get("engine", EngineConfig.engine) == KvLayout.paged:  # rows are cheap; the pool limits
                if model.decoder.embed_tokens.weight.device.type != "cuda":
                    raise ValueError("max_batch=None (fit to the device) needs a CUDA model")
                engine["max_batch"] = PAGED_AUTO_ROWS
            else:
                engine["max_batch"] = fit_max_batch(
                    model, engine.get("max_model_len", EngineConfig.max_model_len)
                )
        return cls(model, tok, EngineConfig(**engine), prompt)

    @staticmethod
    def kernel_shapes(
        name: str,
        mode: str,
        source: str = "",
        dtype: str = DType.bfloat16,
        revision: str = "",
        **engine: Any,
    ) -> KernelShapes:
        """What fixes the Triton kernels' shapes of the PageOcr that `load(name, source, dtype,
        revision=revision, **engine)` builds, serving pages of `mode` (`model.precompile`)."""
        from model.precompile import KernelShapes

        e = EngineConfig(**{k: v for k, v in engine.items() if k != "max_batch"})
        return KernelShapes(
            model_config(name, source, revision), str(mode), str(DType(dtype)),
            e.kv_block_size, e.max_model_len, e.vision_batch,
        )  # fmt: skip

    def warm_up(self, x: OcrInput) -> None:
        """Run `x` once and forget it (counters reset): on a GPU, the first page of a shape
        JIT-compiles and autotunes the Triton kernels (SAM attention, paged decode) and captures
        the CUDA graphs, ~30 s on the H200 with a cold Triton cache (BENCHMARKS.md, issue 14).
        The engine-alone benchmark runs it before its timer starts. Call it before serving."""
        self.run([x])
        self.engine.reset_stats()

    def device_name(self) -> str:
        dev = self.engine.device
        return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type

    def engine_numbers(self) -> EngineNumbers:
        """The engine's counters now; safe to call from another thread while it serves."""
        st, blocks = self.engine.stats, self.engine.stats.blocks_used
        return EngineNumbers(
            device_name=self.device_name(),
            kv_rows=self.engine.cfg.max_batch,
            kv_rows_in_use=st.live_rows,
            kv_blocks=st.kv_blocks or getattr(self.engine, "stats_kv_blocks", 0),
            kv_blocks_in_use=blocks[-1][1] if blocks else 0,
            decode_steps=st.decode_steps,
            decode_s=st.decode_s,
            pages=st.pages,
            output_tokens=st.output_tokens,
        )

    def _request(self, x: OcrInput, future: Future[OcrOutput] | None = None) -> Request:
        dev = self.engine.device
        gv, tv = x.device_views(dev)  # a page's views built here, on the device, if not given
        g = to_pixel_tensor(gv, dev).to(self._dtype)  # uint8 copied, normalised on the device
        tiles = to_pixel_tensor(tv, dev).to(self._dtype) if tv is not None and len(tv) else None
        ids = self.tokenizer.build_prompt_ids(self.prompt, x.num_image_tokens)
        return Request(
            ids,
            PageViews(g, tiles, cast("tuple[int, int]", tuple(x.grid))),
            force_len=x.force_len,
            ngram_size=x.ngram_size,
            ngram_window=x.ngram_window,
            tag=_Track(x.tag, x.num_image_tokens, time.perf_counter(), future),
        )

    def _output(self, res: Result) -> OcrOutput:
        """The one place an engine result becomes an OcrOutput (stream and the async server)."""
        track = cast(_Track, res.tag)
        return OcrOutput(
            tag=track.tag,
            raw_output=self.tokenizer.decode(res.ids),
            ids=res.ids,
            num_output_tokens=res.num_output_tokens,
            num_vision_tokens=track.num_image_tokens,
            finish_reason=res.finish_reason,
            ocr_ms=(time.perf_counter() - track.t0) * 1000.0,
            error=res.error,
        )

    def stream(self, inputs: Iterable[OcrInput]) -> Iterator[OcrOutput]:
        """OCR pages as they come; outputs are yielded as pages finish (not in input order)."""
        for res in self.engine.generate(self._request(x) for x in inputs):
            yield self._output(res)

    def run(self, inputs: list[OcrInput]) -> list[OcrOutput]:
        """OCR a list of pages; outputs in input order (the engine's request ids follow it)."""
        done = [
            (r.request_id, self._output(r)) for r in self.engine.generate(self._request(x) for x in inputs)
        ]
        return [o for _, o in sorted(done, key=lambda d: d[0])]

    # ------------------------------------------------------------------ serving (async callers)

    def submit(self, x: OcrInput) -> Future[OcrOutput]:
        """Queue one page for the engine's background thread; the future resolves when it is done.

        Pages from many concurrent callers (e.g. the async Ray Data batches of one GPU actor) share
        one continuous batch, so the device never drains at a caller's batch boundary.
        NOTE: once serving, the engine belongs to the serving thread: do not call `run`/`stream`
        on the same PageOcr concurrently."""
        fut: Future[OcrOutput] = Future()
        with self._lock:
            if self._server is None or not self._server.is_alive():
                self._server = threading.Thread(target=self._serve, name="pagemill-engine", daemon=True)
                self._server.start()
        self._queue.put((x, fut))
        return fut

    def _serve(self) -> None:
        inflight: set[Future[OcrOutput]] = set()  # pulled by the engine, not yet resolved

        def requests() -> Iterator[Request | None]:
            while True:
                try:
                    x, fut = self._queue.get_nowait()
                except queue.Empty:
                    yield None  # nothing queued now: the engine keeps decoding its rows
                    continue
                if not fut.set_running_or_notify_cancel():
                    continue
                inflight.add(fut)
                yield self._request(x, fut)

        while True:
            try:
                for res in self.engine.generate(requests()):
                    fut = cast(Future[OcrOutput], cast(_Track, res.tag).future)
                    inflight.discard(fut)
                    fut.set_result(self._output(res))
            except Exception as e:  # noqa: BLE001 - fail what was in flight, keep serving
                for fut in inflight:
                    fut.set_exception(e)
                inflight.clear()
