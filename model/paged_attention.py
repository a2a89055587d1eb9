"""Split-KV (flash-decoding) attention over a paged KV cache, one query per row (Triton, CUDA).

Why: at decode each row has one query and its own context length; one program per (row, head)
would leave most of the chip idle for short batches and serialise long rows. The context is cut
into splits of `SPLIT` tokens (whole blocks); each of `PARTS` programs per (row, head) streams
the blocks of every PARTS-th split through one online softmax and writes a partial output and its
log-sum-exp; a second small kernel merges the partials. A program whose first split starts past
the row's length exits at once, so rows of unequal length cost what they read. The plain-torch reference is `PagedKVCache.reference`.
"""

# Triton's jit kernels take `tl.constexpr` parameters and launch options (num_warps) that its
# type stubs cannot express: those checks are off for this file (the dev install has triton,
# for the CPU-interpreter tests; a CPU run without it never reaches the kernels)
# pyright: reportArgumentType=false, reportAssignmentType=false, reportCallIssue=false, reportOptionalMemberAccess=false

from __future__ import annotations

import torch
from torch import Tensor

try:  # triton ships with CUDA torch; CPU-only installs have no use for it
    import triton  # pyright: ignore[reportMissingImports]  # absent in CPU-only envs
    import triton.language as tl  # pyright: ignore[reportMissingImports]  # absent in CPU-only envs
except ImportError:  # pragma: no cover - CPU-only environment
    triton = None  # type: ignore[assignment]

SPLIT = 512  # tokens per split (a multiple of the block size)
# programs per (row, head): program p streams splits p, p + PARTS, ... of its row, so a batch of
# short rows does not launch (and retire) one idle program per split of the longest possible row,
# and the merge reads PARTS partials instead of one per split. `jobs/benchmark.py --kernel-bench`
# times 2, 4 and one program per split, and keeps the fastest for the rest of its run.
PARTS = 4


def kernel_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    return (
        triton is not None
        and torch.device(device).type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
    )


if triton is not None:

    @triton.jit
    def _attend_block(
        q, k_ptr, v_ptr, table_ptr, b, h, stride_tb, pos0, length, m, acc_l, acc, t, d, H, HD, BS
    ):
        """One block of BS cached tokens into the running (max, sum, weighted V) of one query."""
        # a block past the row's length reads nothing (masked; its table entry may not exist)
        blk = tl.load(table_ptr + b * stride_tb + pos0 // BS, mask=pos0 < length, other=0).to(tl.int64)
        base = (blk * BS + t[:, None]) * (H * HD) + h * HD + d[None, :]  # (BS, HD)
        valid = (pos0 + t) < length
        kb = tl.load(k_ptr + base, mask=valid[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(kb * q[None, :], axis=1)  # (BS,)
        sc = tl.where(valid, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        p = tl.exp(sc - m_new)
        alpha = tl.exp(m - m_new)
        vb = tl.load(v_ptr + base, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vb, axis=0)
        acc_l = acc_l * alpha + tl.sum(p, axis=0)
        return m_new, acc_l, acc

    @triton.jit
    def _split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        table_ptr,
        lens_ptr,
        o_ptr,
        lse_ptr,
        scale,
        stride_tb,
        H: tl.constexpr,
        HD: tl.constexpr,
        BS: tl.constexpr,
        BLOCKS_PER_SPLIT: tl.constexpr,
        NSPLIT: tl.constexpr,  # splits of the longest possible row
        PARTS: tl.constexpr,  # programs per (row, head); program p takes splits p, p + PARTS, ...
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        p = tl.program_id(2)
        length = tl.load(lens_ptr + b)
        d = tl.arange(0, HD)
        t = tl.arange(0, BS)
        out_off = (b * H + h) * PARTS + p
        if p * BLOCKS_PER_SPLIT * BS >= length:
            tl.store(lse_ptr + out_off, float("-inf"))
            tl.store(o_ptr + out_off * HD + d, tl.zeros([HD], dtype=tl.float32))
            return
        q = tl.load(q_ptr + (b * H + h) * HD + d).to(tl.float32) * scale
        m = float("-inf")
        acc_l = 0.0
        acc = tl.zeros([HD], dtype=tl.float32)
        for i in range(0, (NSPLIT + PARTS - 1) // PARTS):  # splits p, p + PARTS, ...
            start = (p + i * PARTS) * BLOCKS_PER_SPLIT * BS
            if start < length:
                for j in range(BLOCKS_PER_SPLIT):
                    pos0 = start + j * BS
                    if pos0 < length:
                        m, acc_l, acc = _attend_block(
                            q, k_ptr, v_ptr, table_ptr, b, h, stride_tb, pos0, length, m, acc_l, acc, t, d, H, HD, BS
                        )  # fmt: skip
        tl.store(o_ptr + out_off * HD + d, acc / acc_l)
        tl.store(lse_ptr + out_off, m + tl.log(acc_l))

    @triton.jit
    def _merge_kernel(o_ptr, lse_ptr, out_ptr, HD: tl.constexpr, NSPLIT: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.arange(0, NSPLIT)
        d = tl.arange(0, HD)
        lse = tl.load(lse_ptr + bh * NSPLIT + sp)  # (NSPLIT,)
        m = tl.max(lse, axis=0)
        w = tl.exp(lse - m)
        o = tl.load(o_ptr + (bh * NSPLIT + sp)[:, None] * HD + d[None, :])  # (NSPLIT, HD)
        res = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + bh * HD + d, res.to(out_ptr.dtype.element_ty))


def paged_decode(q: Tensor, k_pool: Tensor, v_pool: Tensor, table: Tensor, lens: Tensor) -> Tensor:
    """q (B, H, hd); pools (N, bs, H, hd); table (B, max_blocks) int32; lens (B,) >= 1 -> (B, H, hd)."""
    B, H, hd = q.shape
    bs = k_pool.shape[1]
    max_len = table.shape[1] * bs
    split = max(SPLIT, bs) // bs * bs
    assert triton is not None  # callers check kernel_available() first
    nsplit = -(-max_len // split)
    parts = min(triton.next_power_of_2(nsplit), triton.next_power_of_2(PARTS))
    q = q.contiguous()
    o = torch.empty(B, H, parts, hd, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, parts, device=q.device, dtype=torch.float32)
    lens32 = lens.to(torch.int32)
    # triton.jit kernels are launched as kernel[grid](...); triton is unresolved here (no stubs)
    _split_kernel[(B, H, parts)](  # pyright: ignore[reportIndexIssue]
        q,
        k_pool,
        v_pool,
        table,
        lens32,
        o,
        lse,
        hd**-0.5,
        table.stride(0),
        H=H,
        HD=hd,
        BS=bs,
        BLOCKS_PER_SPLIT=split // bs,
        NSPLIT=nsplit,
        PARTS=parts,
        num_warps=4,
    )
    out = torch.empty_like(q)
    _merge_kernel[(B * H,)](  # pyright: ignore[reportIndexIssue]  # triton.jit kernel launch
        o, lse, out, HD=hd, NSPLIT=parts, num_warps=1
    )
    return out
