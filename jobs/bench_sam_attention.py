"""SAM attention alone on the GPU (issue 13): the fused Triton kernel per launch config against
plain torch, on the full-size shapes of a Gundam page (1024 global view: 64x64 grid; 640 tiles:
40x40; windowed blocks: 14x14 windows over each).

    python -m jobs.bench_sam_attention [--views 32] [--json-out x.json]

Per shape it times, with CUDA events over 10 calls after a warm-up:
- `kernel[config]`: `sam_attention.relpos_attention` alone for every entry of `CONFIGS` (the
  bias terms precomputed), and `autotuned` (what the model runs);
- `rel_terms`: `grid_rel_terms` (its Triton kernel), and the two einsums it replaces;
- `module_fused` / `module_torch`: the whole `Attention` (qkv, bias terms, attention, proj) on
  the fused path and on the plain-torch path with its window partition (what it replaces);
- `sdpa_no_bias`: cuDNN/flash SDPA on contiguous (B, 12, N, 64) q/k/v without any bias, a
  floor for the attention part.
TFLOP/s use the attention's model FLOPs, 4*N^2*d per head and window (q.k and p.v). JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def _time(fn, reps: int = 10) -> float:  # noqa: ANN001 - any callable
    from jobs.benchmark import cuda_ms

    return cuda_ms(fn, reps)


def bench_shape(grid: int, window: int, views: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from model import sam, sam_attention

    heads, hd, width = 12, 64, 768
    torch.manual_seed(0)
    attn = sam.Attention(width, heads, window or grid).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(views, grid, grid, width, device="cuda", dtype=torch.bfloat16)
    ws = window or grid
    nwin = math.ceil(grid / ws) ** 2
    flops = 4 * (ws * ws) ** 2 * hd * heads * nwin * views
    out: dict[str, Any] = {
        "grid": grid,
        "window": window,
        "views": views,
        "attention_gflop": round(flops / 1e9, 1),
    }

    def rate(ms: float) -> dict[str, float]:
        return {"ms": round(ms, 3), "tflop_per_s": round(flops / 1e12 / (ms / 1e3), 1)}

    with torch.inference_mode():
        qkv = attn.qkv(x)
        rh = sam.rel_pos_table(ws, attn.rel_pos_h)
        rw = sam.rel_pos_table(ws, attn.rel_pos_w)
        q = qkv.view(views, grid, grid, 3, heads, hd)[:, :, :, 0]
        rel_h, rel_w = sam_attention.grid_rel_terms(qkv, rh, rw, heads)
        out["rel_terms_ms"] = round(_time(lambda: sam_attention.grid_rel_terms(qkv, rh, rw, heads)), 3)
        out["rel_terms_einsum_ms"] = round(
            _time(lambda: sam_attention.grid_rel_terms_reference(q, rh, rw)), 3
        )
        kernels = {}
        for cfg in sam_attention.CONFIGS:
            name = "BM{}_w{}_s{}".format(*cfg)
            try:
                kernels[name] = rate(
                    _time(
                        lambda c=cfg: sam_attention.relpos_attention(
                            qkv, attn.qkv.bias, rel_h, rel_w, heads, window, attn.scale, config=c
                        )
                    )
                )
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                kernels[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        out["kernel"] = kernels
        out["autotuned"] = rate(
            _time(
                lambda: sam_attention.relpos_attention(
                    qkv, attn.qkv.bias, rel_h, rel_w, heads, window, attn.scale
                )
            )
        )
        out["module_fused_ms"] = round(_time(lambda: attn.fused(x, window)), 3)

        def torch_path() -> Any:
            saved = sam.FUSED_ON_CUDA
            sam.FUSED_ON_CUDA = False
            try:
                if not window:
                    return attn(x)
                y, hp, wp = sam.window_partition(x, window)
                return sam.window_unpartition(attn(y), window, hp, wp, grid, grid)
            finally:
                sam.FUSED_ON_CUDA = saved

        out["module_torch_ms"] = round(_time(torch_path), 3)
        n = ws * ws
        qs, ks, vs = (
            torch.randn(views * nwin, heads, n, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3)
        )
        out["sdpa_no_bias"] = rate(_time(lambda: F.scaled_dot_product_attention(qs, ks, vs)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=32, help="views per call (the engine's vision batch)")
    ap.add_argument("--json-out", default="")
    args = ap.parse_args(argv)
    import torch

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shapes": [],
    }
    for grid, window in [(64, 0), (40, 0), (64, 14), (40, 14)]:
        r = bench_shape(grid, window, args.views)
        print(json.dumps(r), flush=True)
        report["shapes"].append(r)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
