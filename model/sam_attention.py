"""SAM attention with its decomposed relative-position bias in one Triton kernel (CUDA).

Why: on the H200 the plain-torch SAM attention spent half of the vision time copying, not
computing: the window partition and un-partition (pad + permute), the q/k/v permutes, the
augmented q/k concatenation with its one-hot block and alignment pad, and the output permute
(`docs/benchmarks/h200-2026-12-02-vision-profile-70eeb97.txt`). This kernel reads q, k and v
straight out of the qkv projection of the *unpartitioned* token grid, maps each window token to
its grid position itself, adds the bias ``<q_i, Rh[row_i, row_j]> + <q_i, Rw[col_i, col_j]>``
inside the online softmax, and writes the output back in grid layout, ready for ``proj``.

Semantics equal the reference (`model.sam.rel_pos_attention_bias` over `window_partition`):
* a window token that falls in the bottom/right padding is a key whose q/k/v are the qkv bias
  (the reference pads the normed input with zeros, so its projection is the bias); its output is
  never stored (the reference crops it);
* global attention is one window covering the whole grid.

The bias terms themselves, ``rel_h``/``rel_w`` (B, GH, GW, heads, WH|WW), are two small einsums
over the grid (`grid_rel_terms`), computed in the module dtype like the reference's.
`tests/model/test_sam_attention.py` checks the kernel against the reference under Triton's CPU
interpreter; `tests/model/test_gpu.py` on the GPU in bf16.
"""

# Triton's jit kernels take `tl.constexpr` parameters and launch options (num_warps) that its
# type stubs cannot express: those checks are off for this file (the dev install has triton,
# for the CPU-interpreter tests; a CPU run without it never reaches the kernels)
# pyright: reportArgumentType=false, reportAssignmentType=false, reportCallIssue=false, reportOptionalMemberAccess=false

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # triton ships with CUDA torch; CPU-only installs have no use for it
    import triton  # pyright: ignore[reportMissingImports]  # absent in CPU-only envs
    import triton.language as tl  # pyright: ignore[reportMissingImports]  # absent in CPU-only envs
except ImportError:  # pragma: no cover - CPU-only environment
    triton = None  # type: ignore[assignment]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)

# block sizes tried on the GPU (BM query rows, BN keys, warps, pipeline stages); the autotuner keeps
# the fastest per window shape at the first call
CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3)]


def kernel_available(x: Tensor) -> bool:
    """True where the fused kernel runs: CUDA bf16/fp16 with Triton (or its CPU interpreter)."""
    if triton is None:
        return False
    if INTERPRET:
        return True
    return x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)


def grid_rel_terms(q: Tensor, rh: Tensor, rw: Tensor) -> tuple[Tensor, Tensor]:
    """rel_h[b, y, x, n, k] = <q[b, y, x, n], Rh[y mod WH, k]>, rel_w likewise over columns.

    q: (B, GH, GW, heads, d), any strides; rh: (WH, WH, d); rw: (WW, WW, d) (`rel_pos_table`).
    The window row of grid row y is y mod WH (global: WH = GH). Returns contiguous
    (B, GH, GW, heads, WH) and (B, GH, GW, heads, WW), unscaled q as in the reference."""
    GH, GW = q.shape[1], q.shape[2]
    rows = torch.arange(GH, device=q.device) % rh.shape[0]
    cols = torch.arange(GW, device=q.device) % rw.shape[0]
    rel_h = torch.einsum("byxnc,ykc->byxnk", q, rh[rows])
    rel_w = torch.einsum("byxnc,xkc->byxnk", q, rw[cols])
    return rel_h.contiguous(), rel_w.contiguous()


if triton is not None:

    @triton.jit
    def _relpos_kernel(
        qkv_ptr,  # (B, GH, GW, 3, NH, HD) contiguous: the qkv projection of the grid
        bias_ptr,  # (3, NH, HD): the qkv bias, i.e. q/k/v of a padding token
        rh_ptr,  # (B, GH, GW, NH, WH)
        rw_ptr,  # (B, GH, GW, NH, WW)
        o_ptr,  # (B, GH, GW, NH, HD)
        qk_scale,  # softmax scale * log2(e)
        GH,
        GW,
        NWX,  # windows per grid row
        NWIN,  # windows per image
        NH: tl.constexpr,
        HD: tl.constexpr,
        WH: tl.constexpr,  # window height and width in tokens (global: the grid's)
        WW: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
    ):
        LOG2E: tl.constexpr = 1.4426950408889634
        C: tl.constexpr = NH * HD
        NT: tl.constexpr = WH * WW
        pid_m = tl.program_id(0)
        bw = tl.program_id(1)
        h = tl.program_id(2)
        b = (bw // NWIN).to(tl.int64)
        win = bw % NWIN
        y0 = (win // NWX) * WH
        x0 = (win % NWX) * WW
        img_tokens = (GH * GW).to(tl.int64)
        qkv_img = qkv_ptr + b * img_tokens * (3 * C)
        offs_d = tl.arange(0, HD)

        # queries: window positions -> grid tokens
        offs_m = pid_m * BM + tl.arange(0, BM)
        ym = y0 + offs_m // WW
        xm = x0 + offs_m % WW
        valid_m = (offs_m < NT) & (ym < GH) & (xm < GW)
        tok_m = ym * GW + xm
        q = tl.load(
            qkv_img + tok_m[:, None] * (3 * C) + h * HD + offs_d[None, :], mask=valid_m[:, None], other=0.0
        )
        rh_row = rh_ptr + ((b * img_tokens + tok_m) * NH + h) * WH  # (BM,) row starts
        rw_row = rw_ptr + ((b * img_tokens + tok_m) * NH + h) * WW
        k_pad = tl.load(bias_ptr + C + h * HD + offs_d)
        v_pad = tl.load(bias_ptr + 2 * C + h * HD + offs_d)

        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, HD], tl.float32)
        for start_n in range(0, NT, BN):
            offs_n = start_n + tl.arange(0, BN)
            rn = offs_n // WW
            cn = offs_n % WW
            yn = y0 + rn
            xn = x0 + cn
            in_win = offs_n < NT
            valid_n = in_win & (yn < GH) & (xn < GW)
            tok_n = yn * GW + xn
            kv_off = tok_n[:, None] * (3 * C) + h * HD + offs_d[None, :]
            k = tl.load(qkv_img + kv_off + C, mask=valid_n[:, None], other=0.0)
            k = tl.where(valid_n[:, None], k, k_pad[None, :])
            s = tl.dot(q, tl.trans(k)) * qk_scale
            bmask = valid_m[:, None] & in_win[None, :]
            bias = tl.load(rh_row[:, None] + rn[None, :], mask=bmask, other=0.0).to(tl.float32)
            bias += tl.load(rw_row[:, None] + cn[None, :], mask=bmask, other=0.0).to(tl.float32)
            s = tl.where(in_win[None, :], s + bias * LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(qkv_img + kv_off + 2 * C, mask=valid_n[:, None], other=0.0)
            v = tl.where(valid_n[:, None], v, v_pad[None, :])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        o_img = o_ptr + b * img_tokens * C
        tl.store(
            o_img + tok_m[:, None] * C + h * HD + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=valid_m[:, None],
        )

    def _prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton's hook signature
        nt = named_args["WH"] * named_args["WW"] if "WH" in named_args else kwargs["WH"] * kwargs["WW"]
        keep = [c for c in configs if c.kwargs["BM"] <= max(64, triton.next_power_of_2(nt))]
        return keep or configs

    _tuned = triton.autotune(
        configs=[triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in CONFIGS],
        key=["WH", "WW", "NH", "HD"],
        prune_configs_by={"early_config_prune": _prune},
    )(_relpos_kernel)


def relpos_attention(
    qkv: Tensor, qkv_bias: Tensor | None, rel_h: Tensor, rel_w: Tensor, heads: int, window: int, scale: float
) -> Tensor:
    """Windowed (`window` > 0) or global (0) SAM attention over the grid in one kernel.

    qkv: (B, GH, GW, 3*C) contiguous, the qkv projection of the normed grid (not partitioned);
    qkv_bias: (3*C,) or None; rel_h, rel_w: from `grid_rel_terms`. Returns (B, GH, GW, C)."""
    assert triton is not None  # callers check kernel_available() first
    B, GH, GW, C3 = qkv.shape
    C = C3 // 3
    hd = C // heads
    WH, WW = (window, window) if window else (GH, GW)
    nwx, nwy = math.ceil(GW / WW), math.ceil(GH / WH)
    qkv = qkv.contiguous()
    bias = qkv_bias if qkv_bias is not None else qkv.new_zeros(C3)
    out = qkv.new_empty(B, GH, GW, C)
    args = (qkv, bias.contiguous(), rel_h, rel_w, out, scale * 1.4426950408889634, GH, GW, nwx, nwx * nwy)
    meta = {"NH": heads, "HD": hd, "WH": WH, "WW": WW}
    nt = WH * WW
    # triton.jit kernels are launched as kernel[grid](...); triton is unresolved here (no stubs)
    if INTERPRET:  # the CPU interpreter: one fixed config, no autotuning (it times on CUDA)
        _relpos_kernel[(triton.cdiv(nt, 32), B * nwx * nwy, heads)](*args, **meta, BM=32, BN=16)  # pyright: ignore[reportIndexIssue]
    else:
        grid = lambda m: (triton.cdiv(nt, m["BM"]), B * nwx * nwy, heads)  # noqa: E731
        _tuned[grid](*args, **meta)  # pyright: ignore[reportIndexIssue, reportPossiblyUnbound]
    return out
