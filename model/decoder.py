"""DeepSeek-V2 language model as used by DeepSeek-OCR (spec §1.5): plain MHA, dense layer 0, MoE after.

Adapted from DeepSeek-OCR's `modeling_deepseekv2.py` (HF remote code).

Decisions:
- Module names mirror the checkpoint (`embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.gate`,
  `mlp.shared_experts`, `norm`, `lm_head`) except the routed experts, which are STACKED into
  `mlp.experts.gate_up_proj` (E, 2I, D) [gate rows, then up rows] and `mlp.experts.down_proj`
  (E, D, I); `model/checkpoint.py` maps the per-expert official keys onto slices.
- MoE: fp32 softmax router, greedy top-k, no renormalisation, x routed_scaling_factor; (token,
  expert) pairs sorted by expert and run through `torch._grouped_mm` with on-device int32 group
  offsets - no Python loop over experts or tokens, no host sync. The (E, 2I, D) storage
  transposed is exactly the column-major B operand grouped GEMM wants (no copy).
- RMSNorm statistics in fp32, then `weight * normed.to(input_dtype)`; Llama rotate-half RoPE over
  the full head_dim with cos/sin computed in fp32 from explicit `positions`; SDPA attention;
  logits returned in fp32 - all as in the reference remote code.
- The forward is graph-friendly: no `.item()`/`.tolist()`, no branches on tensor values. Batches
  are right-padded; `positions` (B, T) say where each token sits (see model/kv_cache.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import DecoderConfig
from model.kv_cache import AnyCache, KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (B, T, hd) for integer `positions` (B, T); computed in fp32, then cast."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (hd/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, hd); cos/sin (B, T, hd). Non-interleaved (rotate-half) as in Llama."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        D, self.heads, self.head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: AnyCache | None,
        layer_idx: int,
    ) -> Tensor:
        """x (B, T, D); mask (B, 1, T, T) bool, used without a cache (the cache attends itself)."""
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        else:
            o = cache.attend(layer_idx, q, k, v, positions)  # writes k/v, reads the row's slots
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); also the shared experts (width n_shared * moe_inter)."""

    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E routed SwiGLU experts stacked: gate_up_proj (E, 2I, D), down_proj (E, D, I)."""

    def __init__(self, num_experts: int, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, inter))
        self.inter = inter
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.gate_up_proj.shape[-1] ** -0.5)
        nn.init.normal_(self.down_proj, std=self.down_proj.shape[-1] ** -0.5)

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        """x (N, D) rows sorted by expert; offsets (E,) int32 = end row of each expert's group."""
        # NOTE: grouped_mm needs 16-byte aligned strides (D, I multiples of 8 in bf16); the
        # transposed views are column-major B operands, no copy.
        gu = torch._grouped_mm(  # pyright: ignore[reportPrivateImportUsage]  # no public alias
            x, self.gate_up_proj.transpose(1, 2), offs=offsets
        )  # (N, 2I)
        h = F.silu(gu[:, : self.inter]) * gu[:, self.inter :]  # (N, I)
        return torch._grouped_mm(  # pyright: ignore[reportPrivateImportUsage]  # no public alias
            h, self.down_proj.transpose(1, 2), offs=offsets
        )  # (N, D)


class MoE(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        D, E = cfg.hidden_size, cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.gate = nn.Linear(D, E, bias=False)  # router, weight (E, D)
        self.experts = Experts(E, D, cfg.moe_intermediate_size)
        self.shared_experts = MLP(D, cfg.n_shared_experts * cfg.moe_intermediate_size)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, D) -> fp32 weights (N, K), expert ids (N, K)."""
        logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # (N, K)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        N, K, E = x.shape[0], self.top_k, self.gate.weight.shape[0]
        weights, ids = self.route(x)  # (N, K)
        sorted_ids, order = ids.reshape(-1).sort(stable=True)  # (N*K,): pair order by expert
        # end offset of each expert group = cumsum of per-expert counts, found without a host sync
        experts = torch.arange(E, device=x.device, dtype=sorted_ids.dtype)
        offsets = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)  # (E,)
        out_sorted = self.experts(x[order // K], offsets)  # (N*K, D)
        out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)  # (N*K, D) token-major
        y = (out.view(N, K, -1).float() * weights[..., None]).sum(dim=1).to(x.dtype)  # (N, D)
        return (y + self.shared_experts(x)).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(cfg) if cfg.is_moe_layer(idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )
        self.idx = idx

    def forward(
        self,
        h: Tensor,
        positions: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: AnyCache | None,
    ) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, cos, sin, mask, cache, self.idx)
        return h + self.mlp(self.post_attention_layernorm(h))  # (B, T, D)


class Decoder(nn.Module):
    """Token embedding, decoder stack, final norm and (untied) lm_head."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache.for_model(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def hidden(self, inputs_embeds: Tensor, positions: Tensor, cache: AnyCache | None = None) -> Tensor:
        """Residual stream after the last layer, before the final norm: (B, T, D)."""
        cfg = self.config
        h = inputs_embeds  # (B, T, D)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)  # (B, T, hd)
        mask = None
        if cache is None:
            mask = (positions[:, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, T)
        for layer in self.layers:
            h = layer(h, positions, cos, sin, mask, cache)
        return h

    def forward(
        self,
        inputs_embeds: Tensor,
        positions: Tensor,
        cache: AnyCache | None = None,
        logits_index: Tensor | None = None,
    ) -> Tensor:
        """fp32 logits: (B, T, V), or (B, V) at token index `logits_index` (B,) of each row.

        inputs_embeds (B, T, D), positions (B, T) int64. With `cache`, k/v are written at
        `positions` and attention reads all cached slots <= each query's position.
        """
        h = self.hidden(inputs_embeds, positions, cache)  # (B, T, D)
        if logits_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_index]  # (B, D)
        return self.lm_head(self.norm(h)).float()
