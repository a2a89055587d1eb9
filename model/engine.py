"""Continuous-batching greedy generation for many pages on one device (issue 4).

Design (vLLM's scheduler idea in nanochat-sized code):
- KV layout (`EngineConfig.engine`). "paged" (default, issue 13): a pool of fixed-size blocks
  (`PagedKVCache`) shared by `max_batch` row slots, one block table row per sequence. The host
  hands out blocks once per sync round (admission needs the prompt's blocks plus the expected
  growth of every live row; each round every row gets the blocks that round writes). When the
  pool runs dry the newest rows are preempted: blocks freed, request back to the front of the
  queue, recomputed later from its prompt (greedy: same tokens). The oldest row always fits, so
  nothing is lost and nothing runs out of memory. On CUDA, decode attention is the Triton
  split-KV kernel of `model/paged_attention.py`; elsewhere a plain-torch reference. "slotted"
  (the previous engine, kept to compare) is described next.
- A slotted KV cache (`KVCache`, one row per sequence in flight, `max_batch` rows of
  `max_model_len`). Pages are *admitted* into free rows as others finish: their views are encoded
  in one SAM/CLIP batch, their prompts prefilled in right-padded groups straight into their rows
  (`KVCache.rows`), then they join the decode batch. Nothing is ever recomputed.
- The decode step is one fixed-shape call over all `max_batch` rows (finished/empty rows ride
  along masked): embed the last token, decoder over the cache, n-gram ban, EOS forcing, argmax,
  bookkeeping and the loop detector - all on device, no `.item()`, no per-row Python. On CUDA
  (bf16/fp16) each row's attention reads only its own length (flash varlen, `model/kv_cache.py`)
  and the step is replayed from one CUDA graph; elsewhere attention reads the cache up to
  `attend_len`, the longest live sequence rounded up to `len_bucket` (few distinct shapes).
- The host looks at the device state only every `sync_every` steps (one small copy): it retires
  finished rows, yields their results and admits new pages. A finished row idles at most
  `sync_every - 1` steps.
- Requests may carry their own n-gram ban settings (a fallback pass with a stronger ban shares
  the batch with first passes); `ngram_max_size`/`ngram_max_window` bound them so shapes stay
  static. The request source may be a live feed that yields None when nothing is queued
  (`model.runner.PageOcr.submit` serves concurrent callers this way).
- Finish reasons: `stop` (EOS), `length` (max new tokens / model length), `repetition` (the loop
  detector of `model.sampling` flagged the tail). A request with `force_len` (benchmarks) never
  stops early: EOS is banned and the detector's verdict ignored until exactly `force_len` tokens.
The plain one-sequence loop in `model/generate.py` is the reference this engine must match
token for token (tests/model/test_engine.py).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from model.engine_config import (
    DEVICE_FINISH,
    EngineConfig,
    FinishReason,
    KvLayout,
)
from model.kv_cache import KVCache, PagedKVCache
from model.ocr import OcrModel
from model.sampling import no_repeat_ngram_mask, repetition_flags
from model.vision import PageViews


@dataclass
class Request:
    """One page: prompt ids (with its `<image>` run) and its views (normalised float tensors)."""

    input_ids: Sequence[int]
    views: PageViews | None  # None: text-only prompt
    max_new_tokens: int | None = None  # per-request cap (<= the engine's)
    force_len: int | None = None  # benchmark: generate exactly this many tokens
    ngram_size: int | None = None  # per-request n-gram ban (None: the engine's)
    ngram_window: int | None = None
    tag: Any = None  # caller's handle, returned untouched with the result
    # set by the engine once the views are encoded (the views are dropped then): (N_img, D)
    image: Tensor | None = None
    request_id: int = -1  # assigned by the engine when it pulls the request (pull order)


@dataclass
class Result:
    tag: Any
    ids: list[int]  # generated ids; ends with EOS when finish_reason == "stop"
    finish_reason: FinishReason
    prompt_len: int
    error: str | None = None  # a request that could not run (e.g. prompt too long)
    ms: float = 0.0  # admission to retirement, wall time
    request_id: int = -1  # the engine's id of the request (increasing in pull order)

    @property
    def num_output_tokens(self) -> int:
        return len(self.ids) - (1 if self.finish_reason == FinishReason.stop else 0)


@dataclass
class EngineStats:
    pages: int = 0
    output_tokens: int = 0
    decode_steps: int = 0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    occupancy: list[tuple[float, int]] = field(
        default_factory=list[tuple[float, int]]
    )  # (time, live rows) per sync
    admissions: list[int] = field(default_factory=list[int])  # pages admitted together, per admission
    preemptions: int = 0  # rows evicted from a dry KV pool (requeued, recomputed from scratch)
    kv_blocks: int = 0  # paged: pool size in blocks
    blocks_used: list[tuple[float, int]] = field(
        default_factory=list[tuple[float, int]]
    )  # paged: (time, blocks held) per sync
    live_rows: int = 0  # KV rows decoding now (set at admission and retirement; for metrics)


def kv_bytes_per_token(model: OcrModel) -> int:
    """Bytes of K and V per token over all layers, in the decoder's dtype (full model, bf16: 60 KiB)."""
    c, w = model.decoder.config, model.decoder.embed_tokens.weight
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * w.element_size()


def fit_max_batch(model: OcrModel, max_model_len: int, headroom_gib: float = 14.0, cap: int = 1024) -> int:
    """KV rows (of `max_model_len` slots) that fit the device's free memory minus `headroom_gib`
    (vision and prefill activations, CUDA graphs). On an 80 GB H100 with the full model: ~121.
    Off CUDA there is no budget to read; the caller decides (the pipeline uses its batch size)."""
    dev = model.decoder.embed_tokens.weight.device
    if dev.type != "cuda":
        raise ValueError("fit_max_batch needs a CUDA model")
    free, _ = torch.cuda.mem_get_info(dev)
    rows = int((free - headroom_gib * 2**30) // (kv_bytes_per_token(model) * max_model_len))
    if rows < 1:
        raise RuntimeError(
            f"no room for one KV row of {max_model_len} tokens: {free / 2**30:.1f} GiB free, "
            f"{headroom_gib} GiB kept as headroom; lower generation.max_model_len"
        )
    return min(rows, cap)


def fit_kv_blocks(model: OcrModel, block_size: int, headroom_gib: float = 14.0) -> int:
    """Blocks of `block_size` tokens that fit the device's free memory minus `headroom_gib`."""
    dev = model.decoder.embed_tokens.weight.device
    if dev.type != "cuda":
        raise ValueError("fit_kv_blocks needs a CUDA model")
    free, _ = torch.cuda.mem_get_info(dev)
    return int((free - headroom_gib * 2**30) // (kv_bytes_per_token(model) * block_size))


class Engine:
    def __init__(self, model: OcrModel, cfg: EngineConfig | None = None) -> None:
        self.model, self.cfg = model, cfg or EngineConfig()
        c, dec = self.cfg, model.decoder
        self.device = dec.embed_tokens.weight.device
        self.vocab = dec.config.vocab_size
        B, T, dev = c.max_batch, c.max_model_len, self.device
        with torch.inference_mode():  # state is only ever touched inside inference mode
            self._alloc(B, T, dev)
        self.stats = EngineStats(kv_blocks=getattr(self, "stats_kv_blocks", 0))
        self._t0 = time.perf_counter()
        self._ids = itertools.count()  # request ids, increasing in pull order over the engine's life

    def reset_stats(self) -> None:
        """Counters and timelines from zero (after a warm-up run: `PageOcr.warm_up`)."""
        self.stats = EngineStats(kv_blocks=getattr(self, "stats_kv_blocks", 0))
        self._t0 = time.perf_counter()

    def _alloc(self, B: int, T: int, dev: torch.device) -> None:
        c, dec = self.cfg, self.model.decoder
        self.paged = c.engine == KvLayout.paged
        if self.paged:
            bs = c.kv_block_size
            per_row = -(-T // bs)
            nb = c.kv_blocks or (
                fit_kv_blocks(self.model, bs, c.kv_headroom_gib) if dev.type == "cuda" else B * per_row + 1
            )
            if nb - 1 < per_row:
                raise ValueError(
                    f"a KV pool of {nb} blocks cannot hold one row of max_model_len={T} "
                    f"({per_row} blocks of {bs} + the trash block)"
                )
            w = dec.embed_tokens.weight
            cfgd = dec.config
            self.cache = PagedKVCache(
                cfgd.num_hidden_layers,
                B,
                nb,
                bs,
                cfgd.num_key_value_heads,
                cfgd.head_dim,
                T,
                device=dev,
                dtype=w.dtype,
            )
            self._table = np.zeros((B, per_row), dtype=np.int32)  # host mirror of the block table
            self._free_blocks = list(range(nb - 1, 0, -1))  # block 0 is the trash block
            self._row_blocks: dict[int, list[int]] = {}
            self.stats_kv_blocks = nb
        else:
            self.cache = dec.make_cache(B, T)
        # decode graphs per (attend length, row bucket), or per row bucket where decode ignores it
        self._graphs_by_len = getattr(self.cache, "decode_reads_attend_len", True)
        self.out = torch.zeros(B, T, dtype=torch.long, device=dev)  # generated tokens per row
        self.n = torch.zeros(B, dtype=torch.long, device=dev)  # generated count
        self.prompt_len = torch.zeros(B, dtype=torch.long, device=dev)
        self.max_new = torch.ones(B, dtype=torch.long, device=dev)
        self.force = torch.zeros(B, dtype=torch.bool, device=dev)
        self.done = torch.ones(B, dtype=torch.bool, device=dev)  # empty rows count as done
        self.reason = torch.zeros(B, dtype=torch.long, device=dev)
        self.last = torch.zeros(B, dtype=torch.long, device=dev)  # last token of each row
        self.whitelist = torch.tensor(c.whitelist, dtype=torch.long, device=dev)
        self.ng_n = torch.full((B,), c.ngram_size, dtype=torch.long, device=dev)  # per-row ban settings
        self.ng_w = torch.full((B,), c.ngram_window, dtype=torch.long, device=dev)
        self._ng_max = (max(c.ngram_max_size, c.ngram_size), max(c.ngram_max_window, c.ngram_window))
        self._admit_min = min(c.admit_min, max(1, B // 8))  # free rows before a group is admitted
        self._flash = (
            (not self.paged)
            and dev.type == "cuda"
            and cast(KVCache, self.cache).use_flash  # not paged: the contiguous cache
            and dec.embed_tokens.weight.dtype in (torch.float16, torch.bfloat16)
        )
        self._n_out, self._sum_out = (
            0,
            0,
        )  # finished unforced pages: count, output tokens (admission estimate)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool: Any = None
        # paged: the step runs over row slots [0, hi) only, hi = the highest live row rounded up to
        # this bucket (admission takes the lowest free rows, so live rows stay packed low)
        self._row_bucket = max(1, B // 8) if self.paged else B
        cuda = dev.type == "cuda"
        self._decode_stream = torch.cuda.Stream(dev, priority=-1) if cuda else None
        self._vision_stream = torch.cuda.Stream(dev, priority=0) if cuda else None
        self._vision_events: list[tuple[Any, Any, int]] = []  # (start, end, pages) not yet counted

    # ------------------------------------------------------------------ device step pieces

    def _advance(self, logits: Tensor, active: Tensor) -> None:
        """Pick the next token of every `active` row from fp32 `logits` (b, V) of row slots
        [0, b); update their state in place (views of the state tensors)."""
        c, b = self.cfg, logits.shape[0]
        out, n, done, reason, last = self.out[:b], self.n[:b], self.done[:b], self.reason[:b], self.last[:b]
        force, max_new = self.force[:b], self.max_new[:b]
        if self._ng_max[0] >= 2:
            banned = no_repeat_ngram_mask(
                out,
                n,
                self.ng_n[:b],
                self.ng_w[:b],
                self.whitelist,
                self.vocab,
                max_ngram=self._ng_max[0],
                max_window=self._ng_max[1],
            )
            logits = logits.masked_fill(banned, float("-inf"))
        no_eos = force & (n + 1 < max_new)  # forced rows: EOS banned until the end
        logits[:, c.eos_id] = torch.where(no_eos, float("-inf"), logits[:, c.eos_id])
        tok = logits.argmax(dim=-1)  # (b,)
        rows = torch.arange(b, device=tok.device)
        slot = n.clamp(max=out.shape[1] - 1)
        out[rows, slot] = torch.where(active, tok, out[rows, slot])
        n += active.long()
        last.copy_(torch.where(active, tok, last))  # in place: graph-replay safe
        eos = active & (tok == c.eos_id) & ~force
        full = active & (n >= max_new)
        loop = torch.zeros_like(eos)
        if c.loop_detect:
            loop = active & ~force & repetition_flags(out, n, min_span=c.loop_min_span)
        code = torch.where(eos, 1, torch.where(loop, 3, torch.where(full, 2, 0)))
        reason.copy_(torch.where(active & ~done, code, reason))
        done |= eos | loop | full

    def _step_body(self, hi: int) -> None:
        """One decode step over row slots [0, hi) (rows >= hi are all idle)."""
        done = self.done[:hi]
        positions = (self.prompt_len[:hi] + self.n[:hi] - 1).clamp(min=0)
        if self.paged:  # idle rows attend one slot (their table row points at the trash block)
            positions = positions.masked_fill(done, 0)
        logits = self.model(self.last[:hi, None], positions[:, None], None, self.cache)[:, 0]  # (hi, V)
        self._advance(logits, ~done)

    @torch.inference_mode()
    def _decode_step(self, attend_len: int, hi: int) -> None:
        self.cache.attend_len = attend_len
        if not (self.cfg.cuda_graphs and self.device.type == "cuda"):
            self._step_body(hi)
            return
        key = (attend_len if self._graphs_by_len else 0, hi)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(hi)
        graph.replay()

    def _capture(self, hi: int) -> torch.cuda.CUDAGraph:
        """Record one decode step for the current attend_len. Every state tensor is updated in
        place, so replaying the graph advances the live state. The state is saved around the
        warm-up/capture runs (they execute the step for real) and restored afterwards."""
        state = [self.out, self.n, self.done, self.reason, self.last]
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step_body(hi)  # warm-up (lazy inits, cuBLAS handles) outside the capture
            for t, v in zip(state, saved):
                t.copy_(v)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step_body(hi)
        self._pool = graph.pool()
        for t, v in zip(state, saved):
            t.copy_(v)
        return graph

    # ------------------------------------------------------------------ admission

    @torch.inference_mode()
    def _encode(self, reqs: Sequence[Request]) -> None:
        """SAM/CLIP for every request with views and no image yet, in shared batches: sets each
        one's `image` and drops its views (the engine owns a request once pulled)."""
        todo = [r for r in reqs if r.views is not None and r.image is None]
        if todo:
            views = [cast(PageViews, r.views) for r in todo]
            embeds = self.model.vision.image_embeddings_batch(views, max_batch=self.cfg.vision_batch)
            for r, e in zip(todo, embeds):
                r.image, r.views = e, None

    @torch.inference_mode()
    def _admit(self, rows: list[int], reqs: list[Request], events: dict[int, Any]) -> None:
        """Prefill `reqs` into cache rows `rows` and take their first token; views not encoded
        ahead (`EngineConfig.vision_ahead`) are encoded here, on the decode stream."""
        t0 = time.perf_counter()
        inline = any(r.views is not None and r.image is None for r in reqs)
        self._encode(reqs)
        for r in reqs:  # encoded ahead on the vision stream: the decode stream waits for it
            ev = events.pop(id(r), None)
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)
        if inline:
            self._sync()
        t1 = time.perf_counter()
        per_req = [r.image for r in reqs]
        logits = torch.zeros(self.cfg.max_batch, self.vocab, device=self.device)
        order = sorted(range(len(reqs)), key=lambda i: len(reqs[i].input_ids))  # similar lengths together
        group: list[int] = []
        for i in order + [-1]:
            longest = max(
                [len(reqs[j].input_ids) for j in group] + ([len(reqs[i].input_ids)] if i >= 0 else [])
            )
            if group and (i < 0 or longest * (len(group) + 1) > self.cfg.prefill_tokens):
                self._prefill(
                    [rows[j] for j in group], [reqs[j] for j in group], [per_req[j] for j in group], logits
                )
                group = []
            if i >= 0:
                group.append(i)
        c = self.cfg
        idx = torch.tensor(rows, device=self.device)
        plen = torch.tensor([len(r.input_ids) for r in reqs], device=self.device)
        cap = [
            min(r.max_new_tokens or c.max_new_tokens, c.max_new_tokens, c.max_model_len - len(r.input_ids))
            for r in reqs
        ]
        cap = [min(r.force_len, m) if r.force_len else m for r, m in zip(reqs, cap)]
        self.prompt_len[idx] = plen
        self.max_new[idx] = torch.tensor(cap, device=self.device)
        self.force[idx] = torch.tensor([bool(r.force_len) for r in reqs], device=self.device)
        self.ng_n[idx] = torch.tensor(
            [c.ngram_size if r.ngram_size is None else r.ngram_size for r in reqs], device=self.device
        )
        self.ng_w[idx] = torch.tensor(
            [c.ngram_window if r.ngram_window is None else r.ngram_window for r in reqs], device=self.device
        )
        self.n[idx] = 0
        self.done[idx] = False
        self.reason[idx] = 0
        active = torch.zeros(c.max_batch, dtype=torch.bool, device=self.device)
        active[idx] = True
        self._advance(logits, active)
        self._sync()
        if inline:
            self.stats.vision_s += t1 - t0
        self.stats.prefill_s += time.perf_counter() - t1

    def _prefill(
        self, rows: list[int], reqs: list[Request], embeds: list[Tensor | None], logits: Tensor
    ) -> None:
        """One right-padded prefill forward; last-position logits land in `logits[rows]`."""
        T = max(len(r.input_ids) for r in reqs)
        ids = torch.zeros(len(reqs), T, dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, : len(r.input_ids)] = torch.as_tensor(list(r.input_ids))
        ids = ids.to(self.device)
        lens = torch.tensor([len(r.input_ids) for r in reqs], device=self.device)
        # padded tokens sit past each row's end: their cache writes are overwritten by decode
        positions = torch.arange(T, device=self.device).expand(len(reqs), T)
        image = [e for e in embeds if e is not None]
        idx = torch.tensor(rows, device=self.device)
        out = self.model(ids, positions, torch.cat(image) if image else None, self.cache.rows(idx), lens - 1)
        logits[idx] = out

    # ------------------------------------------------------------------ host loop

    def _sync(self) -> None:
        """Wait for the current stream only (the vision stream keeps running)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _pull(self, source: Iterator[Request | None], errors: list[Result]) -> Request | None | bool:
        """The next valid request of `source`: a Request, None (a live feed has nothing queued)
        or False (exhausted). Invalid requests become error results in `errors`."""
        while True:
            try:
                req = next(source)
            except StopIteration:
                return False
            if req is None:
                return None
            req.request_id = next(self._ids)
            bad = self._check(req)
            if bad is None:
                return req
            errors.append(
                Result(
                    req.tag, [], FinishReason.error, len(req.input_ids), error=bad, request_id=req.request_id
                )
            )

    @torch.inference_mode()
    def _pull_ahead(
        self,
        source: Iterator[Request | None],
        ahead: deque[Request],
        events: dict[int, Any],
        errors: list[Result],
    ) -> bool:
        """Top up `ahead` to `vision_ahead` pages (in chunks of at least `admit_min`) and launch
        their SAM/CLIP on the vision stream; the pulls themselves (the caller's H2D copies and
        normalisation) run there too. Returns True when `source` is exhausted."""
        c = self.cfg
        want = c.vision_ahead - len(ahead)
        if want < min(c.vision_ahead, self._admit_min):
            return False
        pulled: list[Request] = []
        exhausted = False
        with self._on(self._vision_stream):
            while len(pulled) < want:
                req = self._pull(source, errors)
                if req is None or req is False:
                    exhausted = req is False
                    break
                assert isinstance(req, Request)
                pulled.append(req)
            if pulled:
                vs = self._vision_stream
                start = torch.cuda.Event(enable_timing=True) if vs is not None else None
                if start is not None:
                    start.record(vs)
                t0 = time.perf_counter()
                self._encode(pulled)
                if vs is None:  # CPU: encoded synchronously, host time is its time
                    self.stats.vision_s += time.perf_counter() - t0
                else:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record(vs)
                    self._vision_events.append((start, end, len(pulled)))
                    for r in pulled:
                        events[id(r)] = end
                        if r.image is not None:  # read by prefill on the decode stream
                            r.image.record_stream(cast(torch.cuda.Stream, self._decode_stream))
        ahead.extend(pulled)
        return exhausted

    def _count_vision(self, wait: bool = False) -> None:
        """Add the GPU time of finished vision-stream encodes to `stats.vision_s`."""
        keep: list[tuple[Any, Any, int]] = []
        for start, end, pages in self._vision_events:
            if wait:
                end.synchronize()
            if end.query():
                self.stats.vision_s += start.elapsed_time(end) / 1000.0
            else:
                keep.append((start, end, pages))
        self._vision_events = keep

    def generate(self, requests: Iterable[Request | None]) -> Iterator[Result]:
        """Run every request; yields each Result as soon as its sequence is retired.

        `requests` may be a lazy iterator (e.g. fed by another thread): it is pulled only when
        the look-ahead queue (`vision_ahead`) or, without one, a row (and, paged, enough KV
        blocks) is free, so admission streams; it may yield None for "nothing queued now" (the
        engine keeps decoding and asks again at the next sync). Each round: admit, launch the
        decode steps, launch the vision of the next pages on the vision stream (it overlaps the
        decode), then the one host sync. Paged: a request preempted from a dry pool goes back to
        the front of the queue and is recomputed from its prompt and its kept image embeddings
        (greedy decoding gives the same tokens again)."""
        c = self.cfg
        source = iter(requests)
        exhausted = False
        waiting: deque[Request] = deque()  # preempted, or pulled but held back for KV blocks
        ahead: deque[Request] = deque()  # pulled, encoded (or encoding) on the vision stream
        events: dict[int, Any] = {}  # id(request) -> its vision-stream event, until admitted
        live: dict[int, list[Any]] = {}  # row -> [request, t_admit, steps bound, admission seq]
        seq = itertools.count()
        decode = self._decode_stream
        if decode is not None:  # the caller's work so far (state allocation, views made up front)
            caller = torch.cuda.current_stream(self.device)
            decode.wait_stream(caller)
            cast(torch.cuda.Stream, self._vision_stream).wait_stream(caller)
        with self._on(decode), torch.inference_mode():
            self.done.fill_(True)  # rows left over by an earlier, aborted call are not live
            if self.paged:
                self._reset_blocks()
        while True:
            errors: list[Result] = []
            if c.vision_ahead and not live and not exhausted:  # idle: fill the queue first
                exhausted = self._pull_ahead(source, ahead, events, errors)
            yield from errors
            errors = []
            free = [r for r in range(c.max_batch) if r not in live]
            if live and (c.static_batches or len(free) < self._admit_min):
                free = []  # keep decoding; admit a group later (see EngineConfig.admit_min)
            new_rows: list[int] = []
            new_reqs: list[Request] = []
            reserve = (
                sum(
                    max(0, self._expected_blocks(q) - len(self._row_blocks[r])) for r, (q, *_) in live.items()
                )
                if self.paged
                else 0
            )
            while free and len(new_reqs) < c.admit_max:
                if waiting:
                    req = waiting.popleft()
                elif ahead:
                    ev = events.get(id(ahead[0]))
                    if live and ev is not None and not ev.query():
                        break  # still encoding: keep decoding, admit it next round
                    req = ahead.popleft()
                elif exhausted or c.vision_ahead:
                    break
                else:
                    with self._on(decode):
                        got = self._pull(source, errors)
                    if got is None or got is False:
                        exhausted = got is False
                        break
                    assert isinstance(got, Request)
                    req = got
                if self.paged:
                    need = self._blocks_for(len(req.input_ids))
                    grow = max(0, self._expected_blocks(req) - need)
                    watermark = int(c.kv_watermark * self._paged_cache.num_blocks)
                    short = len(self._free_blocks) - need < (
                        reserve + grow + watermark if live or new_reqs else 0
                    )
                    if short:
                        waiting.appendleft(req)  # admission is limited by free blocks
                        break
                    reserve += grow
                    row = free.pop(0)
                    self._take_blocks(row, need)
                else:
                    row = free.pop(0)
                new_rows.append(row)
                new_reqs.append(req)
            yield from errors
            errors = []
            if new_reqs:
                with self._on(decode):
                    if self.paged:
                        self._upload_table()
                    self._admit(new_rows, new_reqs, events)
                self.stats.admissions.append(len(new_reqs))
                now = time.perf_counter()
                for row, req in zip(new_rows, new_reqs):
                    live[row] = [req, now, 1, next(seq)]
                self.stats.live_rows = len(live)
            if not live:
                self.stats.live_rows = 0
                if exhausted and not waiting and not ahead:
                    self._count_vision(wait=True)
                    return
                time.sleep(0.002)  # idle live feed: wait for work without spinning the GPU
                continue
            t0 = time.perf_counter()
            with self._on(decode):
                if self.paged:
                    self._grow(live, waiting)
                # attend is computed once per sync round (no host work per token)
                longest = max(len(q.input_ids) + s for q, _, s, _ in live.values()) + c.sync_every
                attend = min(c.max_model_len, -(-longest // c.len_bucket) * c.len_bucket)
                if self._flash or (self.paged and self._paged_cache.use_kernel):
                    attend = c.max_model_len  # the kernel reads each row's own length: one shape
                hi = min(c.max_batch, -(-(max(live) + 1) // self._row_bucket) * self._row_bucket)
                for _ in range(c.sync_every):
                    self._decode_step(attend, hi)
            if c.vision_ahead and not exhausted:  # launched while the decode round runs
                exhausted = self._pull_ahead(source, ahead, events, errors)
            with self._on(decode):
                done, n, reason = (x.cpu() for x in (self.done, self.n, self.reason))  # the one host sync
            yield from errors
            for v in live.values():
                v[2] += c.sync_every
            self._count_vision()
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.decode_steps += c.sync_every
            self.stats.occupancy.append((time.perf_counter() - self._t0, len(live)))
            if self.paged:
                self.stats.blocks_used.append(
                    (
                        time.perf_counter() - self._t0,
                        self._paged_cache.num_blocks - 1 - len(self._free_blocks),
                    )
                )
            out_rows = [r for r in live if bool(done[r])]
            with self._on(decode):
                toks = self.out[out_rows].cpu() if out_rows else None
            for k, row in enumerate(out_rows):
                assert toks is not None  # out_rows is not empty
                req, t_admit, _, _ = live.pop(row)
                self.stats.live_rows = len(live)
                if self.paged:
                    self._release(row)
                # torch's stub types Tensor.tolist() as a bare list; a 1-D long tensor gives list[int]
                ids = cast("list[int]", toks[k, : int(n[row])].tolist())  # pyright: ignore[reportUnknownMemberType]
                self.stats.pages += 1
                self.stats.output_tokens += len(ids)
                if not req.force_len:
                    self._n_out += 1
                    self._sum_out += len(ids)
                yield Result(
                    req.tag,
                    ids,
                    DEVICE_FINISH[int(reason[row])],
                    len(req.input_ids),
                    ms=(time.perf_counter() - t_admit) * 1000.0,
                    request_id=req.request_id,
                )

    # ------------------------------------------------------------------ paged KV bookkeeping (host)

    @property
    def _paged_cache(self) -> PagedKVCache:
        """`self.cache` of a paged engine (only used when `self.paged`)."""
        return cast(PagedKVCache, self.cache)

    def _blocks_for(self, tokens: int) -> int:
        return min(self._paged_cache.max_blocks, -(-tokens // self.cfg.kv_block_size))

    def _expected_blocks(self, req: Request) -> int:
        """Blocks this request is expected to hold when it ends (see EngineConfig.expect_new_tokens)."""
        c, L = self.cfg, len(req.input_ids)
        cap = min(req.max_new_tokens or c.max_new_tokens, c.max_new_tokens, c.max_model_len - L)
        if req.force_len:
            new = min(req.force_len, cap)
        else:
            mean = self._sum_out / self._n_out if self._n_out else c.expect_new_tokens
            new = min(cap, int(mean))
        return self._blocks_for(L + new)

    def _reset_blocks(self) -> None:
        nb = self._paged_cache.num_blocks
        self._free_blocks = list(range(nb - 1, 0, -1))
        self._row_blocks = {}
        self._table.fill(0)
        self._n_out, self._sum_out = 0, 0
        self._upload_table()

    def _take_blocks(self, row: int, count: int) -> None:
        held = self._row_blocks.setdefault(row, [])
        for _ in range(count):
            b = self._free_blocks.pop()
            self._table[row, len(held)] = b
            held.append(b)

    def _release(self, row: int) -> None:
        self._free_blocks.extend(reversed(self._row_blocks.pop(row, [])))
        self._table[row] = 0  # its writes go to the trash block from the next upload on

    @torch.inference_mode()
    def _upload_table(self) -> None:
        # torch's stub leaves from_numpy's parameter unannotated
        self._paged_cache.block_table.copy_(torch.from_numpy(self._table))  # pyright: ignore[reportUnknownMemberType]

    def _grow(self, live: dict[int, list[Any]], waiting: deque[Request]) -> None:
        """Give every live row the blocks its next sync round writes; oldest rows first. When the
        pool runs dry the newest rows are preempted: blocks freed, request back to the front of
        `waiting` (it is recomputed from its prompt). The oldest row always fits (a pool holds at
        least one max_model_len row), so the engine always makes progress."""
        c = self.cfg
        for row in sorted(live, key=lambda r: live[r][3]):
            if row not in live:
                continue
            req, _, steps, _ = live[row]
            need = self._blocks_for(len(req.input_ids) + steps + c.sync_every - 1) - len(
                self._row_blocks[row]
            )
            while need > len(self._free_blocks):
                victim = max(live, key=lambda r: live[r][3])
                waiting.appendleft(live.pop(victim)[0])
                self._release(victim)
                with torch.inference_mode():
                    self.done[victim] = True
                self.stats.preemptions += 1
                if victim == row:
                    break
            if row in live and need > 0:
                self._take_blocks(row, need)
        self._upload_table()

    def _check(self, req: Request) -> str | None:
        n = len(req.input_ids)
        if n == 0:
            return "empty prompt"
        if n >= self.cfg.max_model_len:
            return f"prompt of {n} tokens does not fit max_model_len={self.cfg.max_model_len}"
        if (req.ngram_size or 0) > self._ng_max[0] or (req.ngram_window or 0) > self._ng_max[1]:
            return f"n-gram settings {req.ngram_size}/{req.ngram_window} exceed the engine's {self._ng_max}"
        return None

    def run(self, requests: Iterable[Request]) -> list[Result]:
        """All results, in request order (by the ids the engine assigns in pull order)."""
        return sorted(self.generate(requests), key=lambda res: res.request_id)
