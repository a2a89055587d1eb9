"""Compile the engine's Triton kernels in a child process while the model loads (CUDA).

Why: on a machine whose Triton cache is cold, the first pages of a run spent ~30 s in Triton's
JIT (ptxas, the MLIR passes, the autotuner's benchmark) on the engine's host thread, with the
GPU idle: SAM attention at every view shape of the mode, its relative-position terms, the paged
decode kernels (BENCHMARKS.md, 2026-12-04 profile). Triton keeps what it compiles in its on-disk
cache (and, with `cache_results`, the autotuner's choice), keyed by the kernel source and its
specialisation, so a child process that runs the same kernels at the same shapes fills the cache
that the engine then reads in milliseconds. It runs beside the model load instead of after it.

The child runs the real modules, not a hand-kept list of shapes: the vision encoder of the
model's config (random weights, built on the device) over one page of the mode's views, and one
decode attention over a `PagedKVCache` of the engine's block size and `max_model_len` (a
two-block pool: the pool size is not part of any kernel's key). So the kernels it compiles are
those the engine launches, by construction. `tests/model/test_gpu.py` checks that a process
after the child compiles nothing new.

Nothing depends on the child: if it fails or is late, the engine compiles what it needs itself,
as before. It holds ~2 GB of GPU memory while it runs (inside the KV pool's headroom).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.config import DType, OcrConfig
from model.modes import get_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelShapes:
    """What fixes the kernels' shapes: the model config, the mode's view sides, the KV layout."""

    config: OcrConfig
    mode: str
    dtype: str = "bfloat16"
    kv_block_size: int = 64
    max_model_len: int = 8192
    vision_batch: int = 32

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config.to_hf_config(),
                "mode": self.mode,
                "dtype": self.dtype,
                "kv_block_size": self.kv_block_size,
                "max_model_len": self.max_model_len,
                "vision_batch": self.vision_batch,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> KernelShapes:
        d = json.loads(text)
        return cls(OcrConfig.from_hf_config(d.pop("config")), **d)


def run_kernels(shapes: KernelShapes, device: torch.device | str = "cuda") -> dict[str, float]:
    """Launch every Triton kernel the engine uses at `shapes` once (in this process): seconds
    spent on the vision encoder and on decode attention."""
    from model.kv_cache import PagedKVCache
    from model.vision import DeepEncoder, PageViews

    dev = torch.device(device)
    dtype = getattr(torch, DType(shapes.dtype).value)  # the enum's values are torch's names
    spec = get_mode(shapes.mode)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            encoder = DeepEncoder(shapes.config).eval()
    finally:
        torch.set_default_dtype(previous)
    g = torch.zeros(1, 3, spec.base_size, spec.base_size, device=dev, dtype=dtype)
    views = [PageViews(g, None, (1, 1))]
    if spec.crop_mode:  # a page with tiles: the tile side's kernels too
        tiles = torch.zeros(2, 3, spec.image_size, spec.image_size, device=dev, dtype=dtype)
        views.append(PageViews(g, tiles, (2, 1)))
    with torch.inference_mode():
        encoder.image_embeddings_batch(views, max_batch=shapes.vision_batch)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timings["vision_s"] = time.perf_counter() - t
    del encoder

    t = time.perf_counter()
    d = shapes.config.decoder
    cache = PagedKVCache(
        1, 2, 2, shapes.kv_block_size, d.num_key_value_heads, d.head_dim, shapes.max_model_len,
        device=dev, dtype=dtype,
    )  # fmt: skip
    q = torch.zeros(2, d.num_attention_heads, 1, d.head_dim, device=dev, dtype=dtype)
    kv = torch.zeros(2, d.num_key_value_heads, 1, d.head_dim, device=dev, dtype=dtype)
    with torch.inference_mode():
        cache.attend(0, q, kv, kv, torch.zeros(2, 1, dtype=torch.long, device=dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timings["decode_s"] = time.perf_counter() - t
    return timings


@dataclass
class Precompile:
    """A running child (`start`); `done_at` is set (time.time()) once it has exited."""

    proc: subprocess.Popen[bytes]
    started_at: float
    done_at: float | None = None
    returncode: int | None = None
    _callbacks: list[Callable[[float], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _reap(self) -> None:
        rc = self.proc.wait()
        with self._lock:
            self.done_at, self.returncode = time.time(), rc
            callbacks = list(self._callbacks)
        took = self.done_at - self.started_at
        if rc == 0:
            log.info("Triton kernels precompiled in %.1f s", took)
        else:  # the engine compiles for itself: slower first pages, nothing else
            log.warning("kernel precompile child exited with %d after %.1f s", rc, took)
        for cb in callbacks:
            cb(self.done_at)

    def on_done(self, callback: Callable[[float], None]) -> None:
        """Call `callback(done_at)` once the child has exited (now, if it has)."""
        with self._lock:
            if self.done_at is None:
                self._callbacks.append(callback)
                return
            done = self.done_at
        callback(done)


def start(shapes: KernelShapes) -> Precompile | None:
    """Start the child that compiles the kernels of `shapes`; None where there is nothing to
    compile (no CUDA device, no Triton). The child inherits the environment (the device Ray
    pinned, `TRITON_CACHE_DIR`) and this process's import path."""
    from model.sam_attention import triton

    if triton is None or not torch.cuda.is_available():
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "model.precompile", shapes.to_json()],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # its errors (stderr) reach this process's log
    )
    job = Precompile(proc, time.time())
    threading.Thread(target=job._reap, name="pagemill-precompile", daemon=True).start()
    return job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compile the engine's Triton kernels (model/precompile.py).")
    p.add_argument("shapes", help="KernelShapes as JSON")
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    timings = run_kernels(KernelShapes.from_json(a.shapes), a.device)
    print(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
