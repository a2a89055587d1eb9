"""Preallocated key/value cache for the decoder (one contiguous buffer per layer, gpt-fast style).

Decisions:
- Buffers are (B, max_len, H, hd) and never reallocated: a step writes its keys/values at the
  *positions* of its tokens (cache slot index == RoPE position), with `scatter_`, so rows of a
  batch may sit at different lengths and no host-side length bookkeeping is needed.
- Attention lives here (`attend`), because how to read the cache is the cache's business:
  * CUDA decode (one query per row): FlashAttention's varlen kernel with `seqused_k` = each
    row's own length, over the buffer viewed as packed (B*max_len, H, hd). Every row reads only
    its own keys, so one 8,000-token page does not make a hundred 1,000-token pages read 8,000
    slots each (what a padded, masked SDPA does), and the call has one shape for all lengths.
  * elsewhere (CPU, fp32, multi-token steps): SDPA over slots [0, attend_len) with a mask that
    hides every slot after a query's own position (stale slots are never read and the next
    decode step overwrites them).
- NOTE: padded tokens of a right-padded prefill must use positions past the row's real length
  (e.g. `arange(T)` for every row), otherwise they overwrite real cache slots.
- `RowPrefill` fills some rows of the cache with fresh prompts (continuous-batching admission):
  it writes their k/v and attends causally over the prompt itself (flash-eligible SDPA).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def _flash_ok(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


_FLASH_CHECKED: dict[tuple[str, torch.dtype], bool] = {}


def flash_decode_works(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Once per (device, dtype): does the varlen flash kernel run here and agree with masked SDPA?

    NOTE: `aten._flash_attention_forward` is a private op whose arguments have changed across
    torch releases; rather than trusting a version number, a tiny decode is run both ways and the
    SDPA path is used if flash raises or disagrees (a warning says so)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    key = (str(device), dtype)
    if key not in _FLASH_CHECKED:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            B, L, H, hd = 3, 64, 2, 64
            k, v = (torch.randn(B, L, H, hd, device=device, dtype=dtype, generator=g) for _ in range(2))
            q = torch.randn(B, H, 1, hd, device=device, dtype=dtype, generator=g)
            used = torch.tensor([1, 17, 64], device=device)
            cu = torch.arange(B + 1, device=device, dtype=torch.int32)
            out = torch.ops.aten._flash_attention_forward(
                q[:, :, 0].contiguous(),
                k.view(B * L, H, hd),
                v.view(B * L, H, hd),
                cu,
                cu * L,
                1,
                L,
                0.0,
                False,
                False,
                seqused_k=used.to(torch.int32),
            )[0]
            mask = (torch.arange(L, device=device)[None, :] < used[:, None])[:, None, None]  # (B, 1, 1, L)
            ref = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)[
                :, :, 0
            ]
            ok = bool((out.float() - ref.float()).abs().max() < 2e-2)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use this path
            warnings.warn(
                f"flash varlen decode unavailable ({type(e).__name__}: {e}); using SDPA", stacklevel=2
            )
        if not ok:
            warnings.warn("flash varlen decode disagrees with SDPA or failed; using SDPA", stacklevel=2)
        _FLASH_CHECKED[key] = ok
    return _FLASH_CHECKED[key]


class KVCache:
    """Per-layer k/v buffers (B, max_len, H, hd); see module docstring for the position contract."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, max_len, num_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.attend_len = max_len  # SDPA path reads slots [0, attend_len); the engine lowers it
        self.use_flash = flash_decode_works(device, dtype)  # CUDA decode via varlen flash (module doc)
        self._slots = torch.arange(max_len, device=device)  # (S,)
        self._cu_q = torch.arange(batch_size + 1, device=device, dtype=torch.int32)  # (B+1,)
        self._cu_k = self._cu_q * max_len  # row b's keys start at b * max_len in the packed view

    @classmethod
    def for_model(
        cls,
        cfg: object,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """Cache sized for a `DecoderConfig` (duck-typed to avoid an import cycle)."""
        return cls(
            cfg.num_hidden_layers,  # type: ignore[attr-defined]
            batch_size,
            cfg.num_key_value_heads,  # type: ignore[attr-defined]
            max_len,
            cfg.head_dim,  # type: ignore[attr-defined]
            device=device,
            dtype=dtype,
        )

    def write(self, layer_idx: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, H, T, hd) at `positions` (B, T); return this layer's buffers."""
        B, H, T, hd = k.shape
        idx = positions[:, :, None, None].expand(B, T, H, hd)  # (B, T, H, hd)
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        kb.scatter_(1, idx, k.transpose(1, 2).to(kb.dtype))
        vb.scatter_(1, idx, v.transpose(1, 2).to(vb.dtype))
        return kb, vb

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Store k/v (B, H, T, hd) at `positions` (B, T), attend q (B, H, T, hd) over the row's
        slots <= each query's position; returns (B, H, T, hd)."""
        kb, vb = self.write(layer_idx, positions, k, v)
        B, H, T, hd = q.shape
        if T == 1 and self.use_flash and _flash_ok(q) and kb.dtype == q.dtype:
            L = self.max_len
            out = torch.ops.aten._flash_attention_forward(
                q[:, :, 0].contiguous(),
                kb.view(B * L, H, hd),
                vb.view(B * L, H, hd),
                self._cu_q[: B + 1],
                self._cu_k[: B + 1],
                1,
                L,
                0.0,
                False,
                False,
                seqused_k=(positions[:, 0] + 1).to(torch.int32),
            )[0]  # (B, H, hd)
            return out[:, :, None]
        S = self.attend_len
        mask = (self._slots[:S][None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        ks, vs = kb[:, :S].transpose(1, 2), vb[:, :S].transpose(1, 2)  # (B, H, S, hd)
        return F.scaled_dot_product_attention(q, ks.to(q.dtype), vs.to(q.dtype), attn_mask=mask)

    def rows(self, rows: Tensor) -> RowPrefill:
        """A cache view that prefills the batch rows `rows` (b,) of this cache from position 0."""
        return RowPrefill(self, rows)


class RowPrefill:
    """Prefill of fresh sequences into some rows of a KVCache (continuous batching admission).

    The prompts' keys/values are written into rows `rows` at their positions, and attention uses
    the fresh k/v directly (a fresh sequence has nothing cached before it), so no cache row is
    gathered. Positions must be `arange(T)` per row (right padding), hence plain causal attention.
    """

    def __init__(self, cache: KVCache, rows: Tensor) -> None:
        self.cache, self.rows_idx = cache, rows

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        r = self.rows_idx[:, None]  # (b, 1) broadcasts against positions (b, T)
        kb, vb = self.cache.k[layer_idx], self.cache.v[layer_idx]
        kb[r, positions] = k.transpose(1, 2).to(kb.dtype)  # indexed view is (b, T, H, hd)
        vb[r, positions] = v.transpose(1, 2).to(vb.dtype)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class PagedKVCache:
    """K/V in a pool of fixed-size blocks shared by all rows (vLLM's paged attention idea).

    Layout: per layer a pool (num_blocks, block_size, H, hd); `block_table` (rows, max_blocks)
    int32 says which pool block holds a row's slots [j*bs, (j+1)*bs). Block 0 is a reserved
    "trash" block: unallocated table entries point at it, so the writes of empty/padded rows and
    of padded prefill positions land there and are never read. The engine owns the allocation
    (host side, once per sync round) and uploads the table in place (graph-replay safe).

    Decode attention (`attend`, one query per row) reads only a row's own length:
    - CUDA bf16/fp16 with Triton: the split-KV kernel of `model/paged_attention.py`;
    - elsewhere (CPU runs, tests): the plain-torch reference, which gathers each row's first
      `attend_len // block_size` blocks and runs masked SDPA (slots > position hidden).
    """

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_blocks < 2 or block_size & (block_size - 1):
            raise ValueError(
                "a paged KV pool needs >= 2 blocks (block 0 is the trash block) of a power-of-2 size"
            )
        shape = (num_blocks, block_size, num_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.block_size, self.num_blocks, self.max_len = block_size, num_blocks, max_len
        self.max_blocks = -(-max_len // block_size)
        self.block_table = torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=device)
        self.attend_len = self.max_blocks * block_size  # reference path: slots read per row
        from model.paged_attention import kernel_available  # noqa: PLC0415 - optional triton

        self.use_kernel = kernel_available(device, dtype)
        # decode through the kernel reads each row's own length, not `attend_len`: one CUDA graph
        # per row bucket serves every attend length (the engine keys its graphs on this)
        self.decode_reads_attend_len = not (self.use_kernel and head_dim & (head_dim - 1) == 0)
        self._slots = torch.arange(self.max_blocks * block_size, device=device)

    def _flat(self, rows: Tensor, positions: Tensor) -> Tensor:
        """Pool slot index (b, T) of `positions` (b, T) of table rows `rows` (b,)."""
        blk = self.block_table[rows[:, None], positions // self.block_size].long()
        return blk * self.block_size + positions % self.block_size

    def write_rows(self, layer_idx: int, rows: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k/v (b, H, T, hd) at `positions` (b, T) of table rows `rows` (b,)."""
        H, hd = k.shape[1], k.shape[3]
        flat = self._flat(rows, positions).reshape(-1)
        kp, vp = self.k[layer_idx], self.v[layer_idx]
        kp.view(-1, H, hd).index_copy_(0, flat, k.transpose(1, 2).reshape(-1, H, hd).to(kp.dtype))
        vp.view(-1, H, hd).index_copy_(0, flat, v.transpose(1, 2).reshape(-1, H, hd).to(vp.dtype))

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Decode: store k/v (B, H, 1, hd) at `positions` (B, 1) and attend each row's slots <= its
        position; returns (B, H, 1, hd). Rows are table rows 0..B-1."""
        B, _, T, _ = q.shape
        rows = torch.arange(B, device=q.device)
        self.write_rows(layer_idx, rows, positions, k, v)
        if T == 1 and not self.decode_reads_attend_len and q.dtype == self.k[layer_idx].dtype:
            from model.paged_attention import paged_decode  # noqa: PLC0415

            return paged_decode(
                q[:, :, 0], self.k[layer_idx], self.v[layer_idx], self.block_table[:B], positions[:, 0] + 1
            )[:, :, None]
        return self.reference(layer_idx, q, positions)

    def reference(self, layer_idx: int, q: Tensor, positions: Tensor) -> Tensor:
        """Plain-torch attention over the paged cache: q (B, H, T, hd) at `positions` (B, T)."""
        B = q.shape[0]
        nb = -(-self.attend_len // self.block_size)
        table = self.block_table[:B, :nb].long()  # (B, nb)
        H, hd = q.shape[1], q.shape[3]
        ks = self.k[layer_idx][table].reshape(B, nb * self.block_size, H, hd).transpose(1, 2)  # (B, H, S, hd)
        vs = self.v[layer_idx][table].reshape(B, nb * self.block_size, H, hd).transpose(1, 2)
        S = nb * self.block_size
        mask = (self._slots[:S][None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        return F.scaled_dot_product_attention(q, ks.to(q.dtype), vs.to(q.dtype), attn_mask=mask)

    def rows(self, rows: Tensor) -> PagedPrefill:
        return PagedPrefill(self, rows)


class PagedPrefill:
    """Prefill of fresh prompts into table rows `rows` of a PagedKVCache (positions arange(T)):
    k/v are scattered into the rows' blocks, attention is causal over the prompt itself."""

    def __init__(self, cache: PagedKVCache, rows: Tensor) -> None:
        self.cache, self.rows_idx = cache, rows

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        self.cache.write_rows(layer_idx, self.rows_idx, positions, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


AnyCache = KVCache | RowPrefill | PagedKVCache | PagedPrefill  # what the decoder's attention accepts
