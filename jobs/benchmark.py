"""Engine benchmark: full-size DeepSeek-OCR architecture, random bf16 weights, Gundam mode, real
pages from the dev corpus, forced realistic output lengths (issue 4).

    python -m jobs.benchmark --corpus ../shared/corpus/dev --pages 2000 --json-out bench.json

Each page's output length is forced (EOS banned until then; the n-gram ban and loop detector still
run and cost what they cost, but stop nothing) to: the token count of the page's PDF text layer
plus 20 tokens per text block, or 1,000 tokens for a page without a text layer; capped at
8,192 minus the prompt. Phases, all on the same rendered pages:
  1. continuous batching on `--pages` pages (the headline figure);
  2. on a `--subset` of them: continuous vs static batches of 64;
  3. on `--baseline-pages` of them: one page at a time, eager, host sync per token (how the
     official Hugging Face script runs), to give the speed-up ratios.
Prints a table per phase and a final JSON line (also written to --json-out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from model.engine_config import EngineConfig
from model.modes import DEFAULT_MODE
from model.synth import random_model
from pipeline.render import RenderOptions

PROMPT_TOKENS = 10  # BOS + "\n<|grounding|>Convert the document to markdown." after the image run
MAX_MODEL_LEN = EngineConfig.max_model_len  # the official max_model_len, as the engine's default
VISION_BATCH = EngineConfig.vision_batch


# ----------------------------------------------------------------------------- pages (CPU)


def _render_pdf(path: str, options: RenderOptions) -> list[dict[str, Any]]:
    """Render (under the job's bounds) + preprocess (Gundam, max 6 tiles) every page of one PDF;
    forced-length target."""
    import pymupdf
    from PIL import Image

    from model.preprocess import preprocess_image
    from model.tokenizer import OcrTokenizer
    from pipeline.forced import forced_length

    tok = OcrTokenizer.default()
    out = []
    try:
        doc = pymupdf.open(path, filetype="pdf")
        if doc.needs_pass:
            return []
        for page in doc:
            z = options.zoom(page.rect.width, page.rect.height)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(z, z), alpha=False, colorspace=pymupdf.csRGB)
            img = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
            prep = preprocess_image(img, DEFAULT_MODE)  # Gundam, min 2 / max 6 tiles (the job's default mode)
            prompt_len = prep.num_image_tokens + PROMPT_TOKENS
            out.append(
                dict(
                    source=f"{Path(path).name}#{page.number}",
                    global_view=prep.global_view,
                    tiles=prep.tiles,
                    grid=prep.grid,
                    num_image_tokens=prep.num_image_tokens,
                    force_len=forced_length(page, tok, prompt_len, MAX_MODEL_LEN),
                )
            )
    except Exception as e:  # unreadable corpus files (encrypted, empty, not a PDF) are skipped
        print(f"skip {Path(path).name}: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def render_corpus(corpus: Path, options: RenderOptions, workers: int) -> list[dict[str, Any]]:
    files = sorted(str(p) for p in corpus.glob("*.pdf"))
    with ProcessPoolExecutor(workers) as ex:
        pages = [p for doc in ex.map(_render_pdf, files, [options] * len(files)) for p in doc]
    return pages


# ----------------------------------------------------------------------------- model (GPU)


# ----------------------------------------------------------------------------- phases


def run_engine(model, pages: list[dict[str, Any]], label: str, **engine_kw: Any) -> dict[str, Any]:
    import gc

    import torch

    from model.engine import Engine, Request
    from model.engine_config import EngineConfig
    from model.preprocess import to_pixel_tensor
    from model.tokenizer import DEFAULT_PROMPT, OcrTokenizer
    from model.vision import PageViews

    gc.collect()
    torch.cuda.empty_cache()  # the previous phase's KV pool is gone before this one is fitted
    tok = OcrTokenizer.default()
    cfg = EngineConfig(max_model_len=MAX_MODEL_LEN, **engine_kw)
    engine = Engine(model, cfg)
    dev = engine.device
    t_pulled = [0.0]

    def requests():
        for i, p in enumerate(pages):
            t_pulled[0] = time.perf_counter()
            g = to_pixel_tensor(p["global_view"], dev).to(torch.bfloat16)
            t = to_pixel_tensor(p["tiles"], dev).to(torch.bfloat16) if p["tiles"] is not None else None
            yield Request(
                tok.build_prompt_ids(DEFAULT_PROMPT, p["num_image_tokens"]),
                PageViews(g, t, p["grid"]),
                force_len=p["force_len"],
                tag=i,
            )

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    results, t_log, t_done = [], t0, []
    for res in engine.generate(requests()):
        results.append(res)
        t_done.append(time.perf_counter())
        if time.perf_counter() - t_log > 30:  # progress on long phases (a killed run still tells its rate)
            t_log = time.perf_counter()
            print(f"  [{label}] {len(results)}/{len(pages)} pages in {t_log - t0:.0f}s", flush=True)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    st = engine.stats
    assert len(results) == len(pages), (len(results), len(pages))
    wrong = [r for r in results if len(r.ids) != pages[r.tag]["force_len"]]
    assert not wrong, f"{len(wrong)} pages did not get their forced length"
    tokens = sum(len(r.ids) for r in results)
    occ = [n for _, n in st.occupancy]
    deciles = [occ[int(i * (len(occ) - 1) / 9)] for i in range(10)] if occ else []
    # steady state: from the first finished page to the moment the last page was pulled into the
    # engine (after that only the final drain is left); pages finished in that window / its length
    t_first, t_last = t_done[0], t_pulled[0]
    in_win = sum(1 for t in t_done if t_first < t <= t_last)
    steady = round(in_win / (t_last - t_first), 3) if t_last > t_first and in_win else None
    t_eng0 = st.occupancy[0][0] if st.occupancy else 0.0
    timeline = [(round(t - t_eng0, 1), n) for t, n in st.occupancy[:: max(1, len(st.occupancy) // 40)]]
    blocks = [b for _, b in st.blocks_used]
    del engine
    return {
        "phase": label,
        "pages": len(pages),
        "wall_s": round(wall, 2),
        "pages_per_s": round(len(pages) / wall, 3),
        "pages_per_day": round(len(pages) / wall * 86400),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 1),
        "mean_output_tokens": round(tokens / len(pages), 1),
        "vision_ms_per_page": round(1000 * st.vision_s / len(pages), 2),
        "vision_s": round(st.vision_s, 2),
        "prefill_s": round(st.prefill_s, 2),
        "decode_s": round(st.decode_s, 2),
        "decode_steps": st.decode_steps,
        "max_batch": cfg.max_batch,
        "mean_occupancy": round(statistics.fmean(occ), 1) if occ else 0,
        "occupancy_deciles": deciles,
        "admissions": len(st.admissions),
        "mean_admission_group": round(statistics.fmean(st.admissions), 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "steady_pages_per_s": steady,
        "steady_window_s": round(t_last - t_first, 2),
        "steady_pages": in_win,
        "max_rows_in_flight": max(occ) if occ else 0,
        "rows_in_flight_over_time": timeline,
        "preemptions": st.preemptions,
        "kv_blocks": st.kv_blocks,
        "peak_kv_blocks_used": max(blocks) if blocks else None,
        "engine": {
            k: getattr(cfg, k)
            for k in (
                "engine",
                "max_batch",
                "sync_every",
                "len_bucket",
                "cuda_graphs",
                "static_batches",
                "admit_min",
                "vision_ahead",
                "kv_headroom_gib",
                "kv_block_size",
                "ngram_size",
                "ngram_window",
                "loop_detect",
            )
        },
    }


def profile_decode(model, max_batch: int, ctx_lens: list[int], out_dir: str) -> dict[str, Any]:
    """Decode-step cost at full occupancy (every row live at context `ctx`), flash vs masked SDPA,
    timed with CUDA events over graph replays; plus one eager step under torch.profiler (kernel
    table written to `out_dir`). This is the profile behind the account in BENCHMARKS.md."""
    import torch

    from model.engine import Engine, kv_bytes_per_token
    from model.engine_config import EngineConfig, KvLayout

    # the slotted engine: flash varlen vs masked SDPA are its two attention paths
    engine = Engine(
        model, EngineConfig(max_batch=max_batch, max_model_len=MAX_MODEL_LEN, engine=KvLayout.slotted)
    )
    per_tok = kv_bytes_per_token(model)
    rows: list[dict[str, Any]] = []

    def fill(e: Engine, ctx: int) -> None:
        e.prompt_len.fill_(ctx)
        e.n.fill_(1)
        e.max_new.fill_(MAX_MODEL_LEN - ctx - 1)
        e.force.fill_(True)
        e.done.fill_(False)
        e.reason.zero_()

    flash_ok = engine._flash
    for use_flash in [True, False] if flash_ok else [False]:
        engine._flash = engine.cache.use_flash = use_flash  # pyright: ignore[reportAttributeAccessIssue]
        for ctx in ctx_lens:
            with torch.inference_mode():
                fill(engine, ctx)
            attend = MAX_MODEL_LEN if use_flash else min(MAX_MODEL_LEN, -(-(ctx + 64) // 256) * 256)
            for _ in range(3):
                engine._decode_step(attend, max_batch)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            steps = 20
            a.record()
            for _ in range(steps):
                engine._decode_step(attend, max_batch)
            b.record()
            torch.cuda.synchronize()
            ms = a.elapsed_time(b) / steps
            rows.append(
                {
                    "attention": "flash varlen" if use_flash else "masked SDPA",
                    "rows": max_batch,
                    "ctx": ctx,
                    "ms_per_step": round(ms, 3),
                    "tokens_per_s": round(max_batch / ms * 1000),
                    "kv_read_gb": round(max_batch * ctx * per_tok / 1e9, 2),
                }
            )
            print(f"  decode step {rows[-1]}", flush=True)
    engine._flash = engine.cache.use_flash = flash_ok  # pyright: ignore[reportAttributeAccessIssue]  # as above
    table = ""
    try:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode():
            fill(engine, ctx_lens[0])
            engine._step_body(max_batch)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    engine._step_body(max_batch)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        if out_dir:
            Path(out_dir, "decode_profile.txt").write_text(table)
        print(table, flush=True)
    except Exception as e:  # noqa: BLE001 - the timing rows above stand on their own
        print(f"profiler failed: {type(e).__name__}: {e}", flush=True)
    del engine
    torch.cuda.empty_cache()
    return {"phase": "decode step profile", "steps": rows, "eager_kernel_table": table}


def cuda_ms(fn: Any, reps: int, warmup: int = 1) -> float:
    """Milliseconds per call of `fn` on the GPU: `warmup` untimed calls, then `reps` calls between
    two CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def device_rates() -> dict[str, float]:
    """What this chip does in this run: device copy bandwidth (bytes read + written per second, a
    4 GiB clone) and the bf16 matmul rate (8192^3), both timed with CUDA events."""
    import torch

    def timed(fn, reps: int) -> float:  # seconds per call
        return cuda_ms(fn, reps) / 1000

    def copy_rate() -> float:
        src = torch.empty(2**31, dtype=torch.bfloat16, device="cuda")  # 4 GiB
        dst = torch.empty_like(src)
        return timed(lambda: dst.copy_(src), 10)

    def matmul_rate() -> float:
        x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        y = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        return timed(lambda: x @ y, 20)

    copy_s = copy_rate()  # its buffers are freed on return, before the matmul's
    mm_s = matmul_rate()
    torch.cuda.empty_cache()
    return {
        "copy_gb_per_s": round(2 * 2**32 / copy_s / 1e9, 1),
        "matmul_tflop_per_s": round(2 * 8192**3 / mm_s / 1e12, 1),
    }


PARTS_TRIED = (2, 4, 16)  # programs per (row, head) of the paged decode kernel (16: one per split)


def kernel_bench(model, rows_list: list[int], ctx_list: list[int], block_size: int) -> list[dict[str, Any]]:
    """Decode attention alone (one layer) over a paged pool: the Triton split-KV kernel with 2, 4
    and one program per split for each (row, head) (`model.paged_attention.PARTS`), ms per call and achieved KV read bandwidth (K+V
    bytes of every row's context). The fastest is kept for the rest of the run."""
    import torch

    from model import paged_attention
    from model.paged_attention import paged_decode

    c = model.decoder.config
    H, hd = c.num_key_value_heads, c.head_dim
    out = []
    for rows in rows_list:
        for ctx in ctx_list:
            per_row = MAX_MODEL_LEN // block_size
            used = -(-ctx // block_size)
            nb = rows * used + 1
            k = torch.randn(nb, block_size, H, hd, dtype=torch.bfloat16, device="cuda")
            v = torch.randn_like(k)
            table = torch.zeros(rows, per_row, dtype=torch.int32, device="cuda")
            table[:, :used] = (
                (torch.randperm(rows * used, device="cuda") + 1).view(rows, used).to(torch.int32)
            )
            lens = torch.full((rows,), ctx, device="cuda")
            q = torch.randn(rows, H, hd, dtype=torch.bfloat16, device="cuda")
            gb = rows * ctx * H * hd * 2 * 2 / 1e9
            point: dict[str, Any] = {"rows": rows, "ctx": ctx, "kv_gb": round(gb, 3)}
            for parts in PARTS_TRIED:
                paged_attention.PARTS = parts
                ms = cuda_ms(partial(paged_decode, q, k, v, table, lens), 20, warmup=3)
                point[f"parts{parts}"] = {
                    "kernel_ms": round(ms, 3),
                    "kv_gb_per_s": round(gb / ms * 1000, 1),
                }
            out.append(point)
            print(f"  paged decode kernel {out[-1]}", flush=True)
            del k, v
            torch.cuda.empty_cache()
    # the variant with the least total time over all points serves the rest of the run
    best = min(PARTS_TRIED, key=lambda n: sum(p[f"parts{n}"]["kernel_ms"] for p in out))
    paged_attention.PARTS = best
    for p in out:
        p.update(p[f"parts{best}"], parts=best)
    return out


def step_profile(
    model,
    rows_list: list[int],
    ctx_list: list[int],
    profile_at: tuple[int, int] | None = None,
    out_dir: str = "",
) -> list[dict[str, Any]]:
    """Whole decode step of the paged engine (graph replay, all layers) with `rows` rows live at
    context `ctx` in the low row slots; the step runs over them rounded up to the engine's row
    bucket (as in the engine), idle slots in it attend one slot. At `profile_at` (rows, ctx), also
    an eager op profile (`_profile_step`, table to `out_dir`)."""
    import torch

    from model.engine import Engine
    from model.engine_config import PAGED_AUTO_ROWS, EngineConfig
    from model.kv_cache import PagedKVCache

    engine = Engine(model, EngineConfig(max_batch=PAGED_AUTO_ROWS, max_model_len=MAX_MODEL_LEN))
    assert isinstance(engine.cache, PagedKVCache)  # default engine="paged"
    bs = engine.cfg.kv_block_size
    out = []
    for rows in rows_list:
        for ctx in ctx_list:
            used = -(-(ctx + 64) // bs)
            if rows * used + 1 > engine.cache.num_blocks or rows > engine.cfg.max_batch:
                continue
            engine._table.fill(0)
            engine._table[:rows, :used] = np.arange(1, rows * used + 1, dtype=np.int32).reshape(rows, used)
            engine._upload_table()
            with torch.inference_mode():
                live = torch.arange(engine.cfg.max_batch, device="cuda") < rows
                engine.prompt_len.copy_(torch.where(live, ctx, 1))
                engine.n.fill_(1)
                engine.max_new.fill_(60)
                engine.force.fill_(True)
                engine.done.copy_(~live)
                engine.reason.zero_()
            bucket = engine._row_bucket
            hi = min(engine.cfg.max_batch, -(-rows // bucket) * bucket)
            for _ in range(3):
                engine._decode_step(MAX_MODEL_LEN, hi)
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                engine._decode_step(MAX_MODEL_LEN, hi)
            b.record()
            torch.cuda.synchronize()
            ms = a.elapsed_time(b) / 20
            out.append(
                {
                    "rows": rows,
                    "ctx": ctx,
                    "ms_per_step": round(ms, 3),
                    "tokens_per_s": round(rows / ms * 1000),
                }
            )
            print(f"  paged decode step {out[-1]}", flush=True)
            if (rows, ctx) == profile_at:
                _profile_step(engine, hi, out_dir)
    del engine
    torch.cuda.empty_cache()
    return out


def _profile_step(engine: Any, hi: int, out_dir: str) -> None:
    """Three eager paged decode steps (no graph: the kernels keep their aten op) under
    torch.profiler, CPU and CUDA: the op table sorted by CUDA time attributes the step's cost."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with torch.inference_mode():
            engine.cache.attend_len = MAX_MODEL_LEN
            engine._step_body(hi)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    engine._step_body(hi)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)
        print(table, flush=True)
        if out_dir:
            Path(out_dir, "paged_step_profile.txt").write_text(table)
    except Exception as e:  # noqa: BLE001 - the step timings stand on their own
        print(f"step profiler failed: {type(e).__name__}: {e}", flush=True)


def vision_flops(model, page: dict[str, Any], attention: str = "bias") -> float:
    """FLOPs of one page's SAM+CLIP+projector forward (torch's flop counter), eager.

    attention="bias" counts SAM's rel-pos attention as the model defines it (q.k at head dim 64
    plus an added bias): the figure MFU is quoted against, whatever kernel runs. "augmented"
    counts what the augmented-q/k kernel executes (q.k at head dim d+H+W)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model import sam
    from model.preprocess import to_pixel_tensor
    from model.vision import PageViews

    g = to_pixel_tensor(page["global_view"], "cuda").to(torch.bfloat16)
    t = to_pixel_tensor(page["tiles"], "cuda").to(torch.bfloat16) if page["tiles"] is not None else None
    # plain torch only: the counter does not see inside a Triton kernel
    before = sam.ATTENTION_IMPL, sam.FUSED_ON_CUDA
    sam.ATTENTION_IMPL, sam.FUSED_ON_CUDA = attention, False
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            model.vision.image_embeddings_batch([PageViews(g, t, page["grid"])], max_batch=VISION_BATCH)
    finally:
        sam.ATTENTION_IMPL, sam.FUSED_ON_CUDA = before
    return float(fc.get_total_flops())


def vision_bench(model, pages: list[dict[str, Any]], flops_per_page: float, out_dir: str) -> dict[str, Any]:
    """SAM/CLIP alone (nothing else on the GPU), in admission-sized groups of pages: ms/page and
    TFLOP/s, for SAM's attention as the fused Triton kernel (`model.sam.FUSED_ON_CUDA`), and in
    plain torch on the memory-efficient kernel and with v padded for flash (`model.sam.PAD_V_ON_CUDA`);
    the fastest is kept for the rest of the run; then one group under torch.profiler (kernel table to `out_dir`)."""
    import torch

    from model import sam
    from model.preprocess import to_pixel_tensor
    from model.vision import PageViews

    group = [
        PageViews(
            to_pixel_tensor(p["global_view"], "cuda").to(torch.bfloat16),
            to_pixel_tensor(p["tiles"], "cuda").to(torch.bfloat16) if p["tiles"] is not None else None,
            p["grid"],
        )
        for p in pages
    ]
    out: dict[str, Any] = {"pages": len(group)}
    # (fused Triton kernel, pad v) per variant: the fused kernel, then plain torch's two SDPA paths
    variants = {"fused_triton": (True, False), "mem_efficient": (False, False), "pad_v_flash": (False, True)}
    best, best_ms = "fused_triton", float("inf")
    for key, (fused, pad_v) in variants.items():
        sam.FUSED_ON_CUDA, sam.PAD_V_ON_CUDA = fused, pad_v
        with torch.inference_mode():  # the warm-up call also runs the Triton autotuner
            ms = cuda_ms(lambda: model.vision.image_embeddings_batch(group, max_batch=VISION_BATCH), 3) / len(
                group
            )
        out[key] = {"ms_per_page": round(ms, 2), "tflop_per_s": round(flops_per_page / 1e12 / (ms / 1000), 1)}
        print(f"  vision alone ({key}): {out[key]}", flush=True)
        if ms < best_ms:
            best, best_ms = key, ms
    sam.FUSED_ON_CUDA, sam.PAD_V_ON_CUDA = variants[best]  # the rest of the run uses the fastest
    out["chosen"] = best
    try:
        from torch.profiler import ProfilerActivity, profile

        # CPU too: each kernel's CUDA time is then also summed under its aten op (which copy, which norm)
        with (
            torch.inference_mode(),
            profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
        ):
            model.vision.image_embeddings_batch(group, max_batch=VISION_BATCH)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)
        print(table, flush=True)
        out["kernel_table"] = table
        if out_dir:
            Path(out_dir, "vision_profile.txt").write_text(table)
    except Exception as e:  # noqa: BLE001 - the timings above stand on their own
        print(f"vision profiler failed: {type(e).__name__}: {e}", flush=True)
    return out


def print_row(r: dict[str, Any]) -> None:
    keys = [
        "pages",
        "wall_s",
        "pages_per_s",
        "steady_pages_per_s",
        "pages_per_day",
        "output_tokens_per_s",
        "mean_output_tokens",
        "vision_ms_per_page",
        "vision_s",
        "prefill_s",
        "decode_s",
        "mean_occupancy",
        "max_rows_in_flight",
        "preemptions",
        "peak_gpu_mem_gib",
    ]
    print(f"\n== {r['phase']} (max_batch {r['max_batch']})")
    for k in keys:
        print(f"  {k:<22} {r[k]}")
    print(f"  {'occupancy deciles':<22} {r['occupancy_deciles']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    import inspect

    from model.engine import fit_max_batch
    from model.engine_config import EngineConfig, KvLayout

    assert __doc__ is not None  # module docstring is present
    ap = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=os.environ.get("PAGEMILL_CORPUS", "../shared/corpus/dev"))
    ap.add_argument("--pages", type=int, default=2000, help="pages in the headline run (corpus cycled)")
    ap.add_argument("--subset", type=int, default=256, help="pages for continuous-vs-static (0: skip)")
    ap.add_argument("--baseline-pages", type=int, default=4, help="pages for one-at-a-time (0: skip)")
    ap.add_argument("--max-batch", type=int, default=0, help="0: as many KV rows as memory allows")
    ap.add_argument(
        "--headroom-gib",
        type=float,
        default=inspect.signature(fit_max_batch).parameters["headroom_gib"].default,
        help="slotted: memory kept free when fitting rows",
    )
    ap.add_argument(
        "--kv-headroom-gib",
        type=float,
        default=None,
        help="paged: memory kept free when fitting the pool (default: EngineConfig's)",
    )
    # engine knobs: defaults from their one home, EngineConfig
    ap.add_argument("--sync-every", type=int, default=EngineConfig.sync_every)
    ap.add_argument(
        "--admit-min",
        type=int,
        default=EngineConfig.admit_min,
        help="admit new pages in groups of this many free rows",
    )
    ap.add_argument(
        "--compare-admit-min",
        type=int,
        default=0,
        help="also run the headline pages with this admit_min (A/B of admission grouping)",
    )
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument(
        "--no-headline", action="store_true", help="skip the headline phase (comparisons on the subset only)"
    )
    ap.add_argument(
        "--vision-ahead",
        type=int,
        default=EngineConfig.vision_ahead,
        help="pages encoded ahead on a second stream, overlapping decode (0: at admission, serialised)",
    )
    ap.add_argument(
        "--compare-vision-ahead",
        action="store_true",
        help="subset phase: also the paged engine with vision_ahead=0 (overlap A/B on the same pages)",
    )
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--json-out", default="")
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=0.0,
        help="fit the run in this many seconds: the headline page count is cut to what the "
        "measured subset rate allows (0: no limit)",
    )
    ap.add_argument("--profile", action="store_true", help="also time/profile single decode steps (slotted)")
    ap.add_argument(
        "--engine", choices=KvLayout.values(), default=EngineConfig.engine, help="engine of the headline run"
    )
    ap.add_argument(
        "--compare-slotted",
        action="store_true",
        help="subset phase: the paged and the slotted engine on the same pages (ratio)",
    )
    ap.add_argument(
        "--kernel-bench",
        action="store_true",
        help="device copy/matmul rates, paged decode kernel bandwidth, paged step time vs rows/ctx, "
        "vision FLOPs/page",
    )
    ap.add_argument(
        "--paged-parts",
        type=int,
        default=0,
        help="programs per (row, head) of the paged decode kernel (model.paged_attention.PARTS; 0: its default)",
    )
    ap.add_argument(
        "--vision-only", action="store_true", help="with --kernel-bench: stop after the vision-alone timings"
    )
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.paged_parts:
        from model import paged_attention

        paged_attention.PARTS = args.paged_parts
    t_start = t0 = time.perf_counter()
    unique = render_corpus(Path(args.corpus), RenderOptions(), args.workers)  # the job's defaults
    render_s = time.perf_counter() - t0
    pages = [unique[i % len(unique)] for i in range(args.pages)]
    print(
        f"rendered {len(unique)} unique pages in {render_s:.1f}s; cycled to {len(pages)}; mean forced length "
        f"{statistics.fmean(p['force_len'] for p in unique):.0f} tokens; mean <image> positions "
        f"{statistics.fmean(p['num_image_tokens'] for p in unique):.0f}",
        flush=True,
    )

    t0 = time.perf_counter()
    model = random_model("cuda")
    print(
        f"model ready in {time.perf_counter() - t0:.1f}s, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params",
        flush=True,
    )
    from model.engine import fit_max_batch
    from model.engine_config import PAGED_AUTO_ROWS

    slotted_rows = args.max_batch or fit_max_batch(model, MAX_MODEL_LEN, args.headroom_gib)
    paged_rows = args.max_batch or PAGED_AUTO_ROWS
    max_batch = paged_rows if args.engine == "paged" else slotted_rows
    common = dict(
        sync_every=args.sync_every,
        cuda_graphs=not args.no_cuda_graphs,
        admit_min=args.admit_min,
        engine=args.engine,
        vision_ahead=args.vision_ahead,
    )
    if args.kv_headroom_gib is not None:
        common["kv_headroom_gib"] = args.kv_headroom_gib
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m jobs.benchmark " + " ".join(argv or sys.argv[1:]),
        "unique_pages": len(unique),
        "render_preprocess_s": round(render_s, 1),
        "mean_forced_tokens_unique": round(statistics.fmean(p["force_len"] for p in unique), 1),
        "phases": [],
    }

    def record(r: dict[str, Any]) -> None:
        print_row(r)
        report["phases"].append(r)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=1))

    if args.kernel_bench:
        report["device_rates"] = device_rates()
        print(f"device rates {report['device_rates']}", flush=True)
        sample = unique[:: max(1, len(unique) // 8)]
        report["vision_flops_per_page_unique_mean"] = round(
            statistics.fmean(vision_flops(model, p) for p in sample) / 1e12, 3
        )  # TFLOP
        report["vision_flops_per_page_augmented_mean"] = round(
            statistics.fmean(vision_flops(model, p, "augmented") for p in sample) / 1e12, 3
        )  # TFLOP the augmented-q/k kernel executes (not the model's; MFU uses the figure above)
        print(
            f"vision TFLOP/page {report['vision_flops_per_page_unique_mean']} (model), "
            f"{report['vision_flops_per_page_augmented_mean']} (augmented q/k executes)",
            flush=True,
        )
        group = unique[:: max(1, len(unique) // 32)][:32]
        report["vision_alone"] = vision_bench(
            model,
            group,
            statistics.fmean(vision_flops(model, p) for p in group),
            os.path.dirname(args.json_out),
        )
        if args.vision_only:
            print(json.dumps(report))
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(report, indent=1))
            return 0
        # prefill alone: one forced token per page, vision at admission (so prefill_s is the
        # prompt forwards only, not a wait for the vision stream)
        few = [dict(p, force_len=1) for p in (unique * 2)[:256]]
        pf = run_engine(
            model,
            few,
            "prefill-alone",
            max_batch=256,
            vision_ahead=0,
            admit_min=256,
        )
        prompt_tokens = sum(p["num_image_tokens"] for p in few)
        report["prefill_alone"] = {
            "pages": len(few),
            "prefill_ms_per_page": round(1000 * pf["prefill_s"] / len(few), 2),
            "image_tokens_per_page": round(prompt_tokens / len(few), 1),
            "prefill_tokens_per_s": round(prompt_tokens / pf["prefill_s"]) if pf["prefill_s"] else None,
            "vision_ms_per_page": pf["vision_ms_per_page"],
            "admissions": pf["admissions"],
        }
        print(f"prefill alone {report['prefill_alone']}", flush=True)
        report["paged_kernel"] = kernel_bench(model, [256, 1024], [1024, 2048, 4096], 64)
        report["paged_step"] = step_profile(
            model, [128, 256, 512, 1024], [1024, 2048], (512, 2048), os.path.dirname(args.json_out)
        )
        if args.json_out:  # a run cut short later still keeps these
            Path(args.json_out).write_text(json.dumps(report, indent=1))
    # warm-up: a few pages, so graph capture and kernel selection are not timed
    run_engine(model, pages[:8], "warm-up", max_batch=max_batch, **common)
    # the subset phases run first: their rate sizes the headline run under --time-budget-s
    if args.subset:
        sub = pages[: args.subset]
        record(run_engine(model, sub, "subset: continuous", max_batch=max_batch, **common))
        if args.compare_vision_ahead:
            record(
                run_engine(
                    model,
                    sub,
                    "subset: continuous, vision_ahead=0",
                    max_batch=max_batch,
                    **{**common, "vision_ahead": 0},
                )
            )
        if args.compare_slotted:
            record(
                run_engine(
                    model, sub, "subset: slotted", max_batch=slotted_rows, **{**common, "engine": "slotted"}
                )
            )
        else:
            record(
                run_engine(
                    model,
                    sub,
                    "subset: static batches of 64",
                    max_batch=64,
                    static_batches=True,
                    **{**common, "engine": "slotted"},
                )
            )
    if args.baseline_pages:
        base = pages[: args.baseline_pages]
        one = run_engine(
            model,
            base,
            "one page at a time (eager, sync per token)",
            max_batch=1,
            sync_every=1,
            cuda_graphs=False,
            engine="slotted",
        )
        record(one)
        report["baseline_pages_per_s"] = one["pages_per_s"]
    if args.profile:
        try:
            report["profile"] = profile_decode(
                model, max_batch, [1024, 2048, 4096], os.path.dirname(args.json_out)
            )
        except Exception as e:  # noqa: BLE001 - the profile must not cost the headline run
            print(f"decode profile failed: {type(e).__name__}: {e}", flush=True)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=1))
    headline = pages
    if args.time_budget_s and report["phases"]:
        left = args.time_budget_s - (time.perf_counter() - t_start) - 20.0
        rate = report["phases"][0]["pages_per_s"]
        fit = max(128, int(0.85 * rate * left))
        if fit < len(pages):
            print(f"time budget: headline cut from {len(pages)} to {fit} pages", flush=True)
            headline = pages[:fit]
    if not args.no_headline:
        record(run_engine(model, headline, "continuous", max_batch=max_batch, **common))
    if args.compare_admit_min and not args.no_headline:
        record(
            run_engine(
                model,
                headline,
                f"continuous, admit_min={args.compare_admit_min}",
                max_batch=max_batch,
                **{**common, "admit_min": args.compare_admit_min},
            )
        )
    if args.baseline_pages:
        for key, ph in (
            ("speedup_vs_one_at_a_time", "continuous"),
            ("subset_speedup_vs_one_at_a_time", "subset: continuous"),
        ):
            cont = next((p for p in report["phases"] if p["phase"] == ph), None)
            if cont:
                report[key] = round(cont["pages_per_s"] / report["baseline_pages_per_s"], 2)
    slotted = next((p for p in report["phases"] if p["phase"] == "subset: slotted"), None)
    if slotted:
        cont = next(p for p in report["phases"] if p["phase"] == "subset: continuous")
        report["subset_speedup_paged_vs_slotted"] = round(cont["pages_per_s"] / slotted["pages_per_s"], 2)
        if cont.get("steady_pages_per_s") and slotted.get("steady_pages_per_s"):
            report["subset_steady_speedup_paged_vs_slotted"] = round(
                cont["steady_pages_per_s"] / slotted["steady_pages_per_s"], 2
            )
    rates = report.get("device_rates")
    if rates:
        for k in report.get("paged_kernel", []):
            k["fraction_of_copy_bw"] = round(k["kv_gb_per_s"] / rates["copy_gb_per_s"], 3)
        head = next((p for p in report["phases"] if p["phase"] == "continuous"), {"vision_ms_per_page": 0})
        tf = report["vision_flops_per_page_unique_mean"]
        alone = report.get("vision_alone", {})
        if alone:  # vision on its own (in the engine it overlaps decode: its GPU time there is shared)
            best = alone[alone["chosen"]]
            report["vision_alone_mfu_vs_measured_matmul"] = round(
                best["tflop_per_s"] / rates["matmul_tflop_per_s"], 3
            )
        if head["vision_ms_per_page"]:
            report["vision_tflop_per_s"] = round(tf / (head["vision_ms_per_page"] / 1000), 1)
            report["vision_mfu_vs_measured_matmul"] = round(
                report["vision_tflop_per_s"] / rates["matmul_tflop_per_s"], 3
            )
    static = next((p for p in report["phases"] if p["phase"].startswith("subset: static")), None)
    if static:
        cont = next(p for p in report["phases"] if p["phase"] == "subset: continuous")
        report["speedup_vs_static64"] = round(cont["pages_per_s"] / static["pages_per_s"], 2)
    print(json.dumps(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
