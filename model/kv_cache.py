"""Preallocated key/value cache for the decoder (one contiguous buffer per layer, gpt-fast style).

Decisions:
- Buffers are (B, H, max_len, hd) and never reallocated: a step writes its keys/values at the
  *positions* of its tokens (cache slot index == RoPE position), with `scatter_`, so rows of a
  batch may sit at different lengths and no host-side length bookkeeping is needed.
- Attention reads the whole buffer; `attn_mask(positions)` hides every slot after a query's own
  position (slot <= position). Stale values there (right padding of a batched prefill, old
  decode steps) are therefore never read, and the next decode step overwrites them.
- NOTE: padded tokens of a right-padded prefill must use positions past the row's real length
  (e.g. `arange(T)` for every row), otherwise they overwrite real cache slots.
- The interface the attention sees is two methods (`update`, `attn_mask`); a later slot/paged
  cache only has to provide the same two.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer k/v buffers (B, H, max_len, hd); see module docstring for the position contract."""

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
        shape = (batch_size, num_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.attend_len = max_len  # decode reads slots [0, attend_len); the engine lowers it
        self._slots = torch.arange(max_len, device=device)  # (S,)

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

    def update(self, layer_idx: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, H, T, hd) at `positions` (B, T); return the full buffers (B, H, S, hd)."""
        B, H, T, hd = k.shape
        idx = positions[:, None, :, None].expand(B, H, T, hd)  # (B, H, T, hd)
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        kb.scatter_(2, idx, k.to(kb.dtype))
        vb.scatter_(2, idx, v.to(vb.dtype))
        S = self.attend_len
        return kb[:, :, :S], vb[:, :, :S]

    def attn_mask(self, positions: Tensor) -> Tensor:
        """Boolean mask (B, 1, T, S): query at position p may read slots 0..p (S = attend_len)."""
        slots = self._slots[: self.attend_len]
        return (slots[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)

    def rows(self, rows: Tensor) -> RowPrefill:
        """A cache view that prefills the batch rows `rows` (b,) of this cache from position 0."""
        return RowPrefill(self, rows)


class RowPrefill:
    """Prefill of fresh sequences into some rows of a KVCache (continuous batching admission).

    The prompt's keys/values are written into rows `rows` at their positions, and attention uses
    the fresh k/v directly (a fresh sequence has nothing cached before it), so no cache row is
    gathered. Same two-method interface as KVCache.
    """

    def __init__(self, cache: KVCache, rows: Tensor) -> None:
        self.cache, self.rows_idx = cache, rows

    def update(self, layer_idx: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (b, H, T, hd) at positions (b, T) -> written to cache rows; returned unchanged."""
        r = self.rows_idx[:, None]  # (b, 1) broadcasts against positions (b, T)
        kb, vb = self.cache.k[layer_idx], self.cache.v[layer_idx]
        kb[r, :, positions] = k.transpose(1, 2).to(kb.dtype)  # indexed view is (b, T, H, hd)
        vb[r, :, positions] = v.transpose(1, 2).to(vb.dtype)
        return k, v

    def attn_mask(self, positions: Tensor) -> Tensor:
        """Causal mask over the prompt itself: (b, 1, T, T)."""
        return (positions[:, None, :] <= positions[:, :, None])[:, None]
