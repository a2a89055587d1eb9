"""SAM attention with its decomposed relative-position bias in one Triton kernel (CUDA).

Why: on the H200 the plain-torch SAM attention spent half of the vision time copying, not
computing: the window partition and un-partition (pad + permute), the q/k/v permutes, the
augmented q/k concatenation with its one-hot block and alignment pad, and the output permute
(`docs/benchmarks/h200-2026-12-02-vision-profile-70eeb97.txt`). This kernel reads q, k and v
straight out of the qkv projection of the *unpartitioned* token grid, maps each window token to
its grid position itself, adds the bias ``<q_i, Rh[row_i, row_j]> + <q_i, Rw[col_i, col_j]>``
inside the online softmax, and writes the output back in grid layout, ready for ``proj``.

Key blocks are window rows (the row width rounded up to a power of two): the column term of the
bias is then the same for every key block, so it is loaded once per program, and the row term is
one value per query and block. (Gathering both terms per key block ran at ~40 TFLOP/s on the
H200, by row at ~230: `jobs/bench_sam_attention.py`.)

Semantics equal the reference (`model.sam.rel_pos_attention_bias` over `window_partition`):
* a window token that falls in the bottom/right padding is a key whose q/k/v are the qkv bias
  (the reference pads the normed input with zeros, so its projection is the bias); its output is
  never stored (the reference crops it);
* global attention is one window covering the whole grid.

The bias terms themselves, ``rel_h``/``rel_w`` (B, GH, GW, heads, WH|WW), come from a second small
kernel (`grid_rel_terms`): one (tokens x d) @ (d x W) product per grid line, reading q straight
from the qkv projection; rounded to the module dtype like the reference's einsums.
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

# launch configs tried on the GPU: (BM query rows, warps, pipeline stages); the autotuner keeps
# the fastest per window shape at the first call
CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 3), (128, 4, 4)]
LOG2E = 1.4426950408889634


def kernel_available(x: Tensor) -> bool:
    """True where the fused kernel runs: CUDA bf16/fp16 with Triton (or its CPU interpreter)."""
    if triton is None:
        return False
    if INTERPRET:
        return True
    return x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)


def grid_rel_terms_reference(q: Tensor, rh: Tensor, rw: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-torch `grid_rel_terms` (tests): two einsums over the grid."""
    GH, GW = q.shape[1], q.shape[2]
    rows = torch.arange(GH, device=q.device) % rh.shape[0]
    cols = torch.arange(GW, device=q.device) % rw.shape[0]
    rel_h = torch.einsum("byxnc,ykc->byxnk", q, rh[rows])
    rel_w = torch.einsum("byxnc,xkc->byxnk", q, rw[cols])
    return rel_h.contiguous(), rel_w.contiguous()


if triton is not None:

    @triton.jit
    def _rel_terms_kernel(
        qkv_ptr,  # (B, GH, GW, 3, NH, HD): q of every grid token
        table_ptr,  # (WIN, WIN, HD) contiguous: R[window position, key position]
        out_ptr,  # (B, GH, GW, NH, WIN)
        N_LINES,  # grid lines per image (rows for rel_h, columns for rel_w)
        LINE_STRIDE,  # tokens between consecutive lines
        POS_STRIDE,  # tokens between consecutive positions along a line
        N_POS,  # positions per line
        IMG_TOKENS,
        NH: tl.constexpr,
        HD: tl.constexpr,
        WIN: tl.constexpr,
        WINP: tl.constexpr,  # WIN rounded up to a power of two (>= 16)
        POSP: tl.constexpr,  # N_POS rounded up to a power of two (>= 16)
    ):
        """out[token, h, k] = <q[token, h], R[line mod WIN, k]> for every token of one line."""
        bl = tl.program_id(0)
        h = tl.program_id(1)
        b = (bl // N_LINES).to(tl.int64)
        line = bl % N_LINES
        pos = tl.arange(0, POSP)
        tok = line * LINE_STRIDE + pos * POS_STRIDE
        valid = pos < N_POS
        d = tl.arange(0, HD)
        q = tl.load(
            qkv_ptr + (b * IMG_TOKENS + tok)[:, None] * (3 * NH * HD) + h * HD + d[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        k = tl.arange(0, WINP)
        t = tl.load(
            table_ptr + ((line % WIN) * WIN + k)[:, None] * HD + d[None, :],
            mask=(k < WIN)[:, None],
            other=0.0,
        )
        r = tl.dot(q, tl.trans(t))  # (POSP, WINP)
        dst = out_ptr + ((b * IMG_TOKENS + tok) * NH + h)[:, None] * WIN + k[None, :]
        tl.store(dst, r.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (k < WIN)[None, :])

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
        WWP: tl.constexpr,  # WW rounded up to a power of two: the key block
        BM: tl.constexpr,
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

        # one key block per window row: its column term is the same for every block
        cn = tl.arange(0, WWP)
        in_row = cn < WW
        xn = x0 + cn
        rw_tile = tl.load(rw_row[:, None] + cn[None, :], mask=valid_m[:, None] & in_row[None, :], other=0.0)
        rw_tile = rw_tile.to(tl.float32) * LOG2E
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, HD], tl.float32)
        for rn in range(0, WH):
            yn = y0 + rn
            valid_n = in_row & (yn < GH) & (xn < GW)
            kv_off = (yn * GW + xn)[:, None] * (3 * C) + h * HD + offs_d[None, :]
            k = tl.load(qkv_img + kv_off + C, mask=valid_n[:, None], other=0.0)
            k = tl.where(valid_n[:, None], k, k_pad[None, :])
            rh_col = tl.load(rh_row + rn, mask=valid_m, other=0.0).to(tl.float32) * LOG2E
            s = tl.dot(q, tl.trans(k)) * qk_scale + rw_tile + rh_col[:, None]
            s = tl.where(in_row[None, :], s, float("-inf"))
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
        nt = kwargs.get("WH", named_args.get("WH", 1)) * kwargs.get("WW", named_args.get("WW", 1))
        keep = [c for c in configs if c.kwargs["BM"] <= max(64, triton.next_power_of_2(nt))]
        return keep or configs

    _tuned = triton.autotune(
        configs=[triton.Config({"BM": m}, num_warps=w, num_stages=s) for m, w, s in CONFIGS],
        key=["WH", "WW", "NH", "HD"],
        prune_configs_by={"early_config_prune": _prune},
        cache_results=True,  # the choice goes to Triton's disk cache (model/precompile.py fills it)
    )(_relpos_kernel)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # tl.dot needs every dim >= 16


def grid_rel_terms(qkv: Tensor, rh: Tensor, rw: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """rel_h[b, y, x, n, k] = <q[b, y, x, n], Rh[y mod WH, k]>, rel_w likewise over columns.

    qkv: (B, GH, GW, 3*C) contiguous (q is its first third); rh: (WH, WH, d); rw: (WW, WW, d)
    (`rel_pos_table`). The window row of grid row y is y mod WH (global: WH = GH). Returns
    (B, GH, GW, heads, WH) and (B, GH, GW, heads, WW), unscaled q as in the reference."""
    assert triton is not None  # callers check kernel_available() first
    B, GH, GW, C3 = qkv.shape
    hd = C3 // 3 // heads
    out = []
    # rel_h: one program per grid row (positions along it: its columns); rel_w: per column
    for table, lines, line_stride, pos_stride, n_pos in ((rh, GH, GW, 1, GW), (rw, GW, 1, GW, GH)):
        win = table.shape[0]
        r = qkv.new_empty(B, GH, GW, heads, win)
        _rel_terms_kernel[(B * lines, heads)](  # pyright: ignore[reportIndexIssue]
            qkv, table.contiguous(), r, lines, line_stride, pos_stride, n_pos, GH * GW,
            NH=heads, HD=hd, WIN=win, WINP=_pow2(win), POSP=_pow2(n_pos),
        )  # fmt: skip
        out.append(r)
    return out[0], out[1]


def relpos_attention(
    qkv: Tensor,
    qkv_bias: Tensor | None,
    rel_h: Tensor,
    rel_w: Tensor,
    heads: int,
    window: int,
    scale: float,
    config: tuple[int, int, int] | None = None,
) -> Tensor:
    """Windowed (`window` > 0) or global (0) SAM attention over the grid in one kernel.

    qkv: (B, GH, GW, 3*C) contiguous, the qkv projection of the normed grid (not partitioned);
    qkv_bias: (3*C,) or None; rel_h, rel_w: from `grid_rel_terms`. Returns (B, GH, GW, C).
    `config` (one of CONFIGS) skips the autotuner (benchmarks); the CPU interpreter uses a fixed one."""
    assert triton is not None  # callers check kernel_available() first
    B, GH, GW, C3 = qkv.shape
    C = C3 // 3
    hd = C // heads
    WH, WW = (window, window) if window else (GH, GW)
    nwx, nwy = math.ceil(GW / WW), math.ceil(GH / WH)
    qkv = qkv.contiguous()
    bias = qkv_bias if qkv_bias is not None else qkv.new_zeros(C3)
    out = qkv.new_empty(B, GH, GW, C)
    args = (qkv, bias.contiguous(), rel_h, rel_w, out, scale * LOG2E, GH, GW, nwx, nwx * nwy)
    meta = {"NH": heads, "HD": hd, "WH": WH, "WW": WW, "WWP": _pow2(WW)}
    nt = WH * WW
    if config is None and INTERPRET:  # the CPU interpreter times nothing: no autotuning
        config = (32, 4, 1)
    # triton.jit kernels are launched as kernel[grid](...); triton is unresolved here (no stubs)
    if config is not None:
        bm, warps, stages = config
        launch = (triton.cdiv(nt, bm), B * nwx * nwy, heads)
        _relpos_kernel[launch](*args, **meta, BM=bm, num_warps=warps, num_stages=stages)  # pyright: ignore[reportIndexIssue]
    else:
        grid = lambda m: (triton.cdiv(nt, m["BM"]), B * nwx * nwy, heads)  # noqa: E731
        _tuned[grid](*args, **meta)  # pyright: ignore[reportIndexIssue, reportPossiblyUnbound]
    return out
