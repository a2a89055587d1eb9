"""CLIP-L tower of DeepSeek-OCR's DeepEncoder (checkpoint prefix ``model.vision_model.``).

Adapted from DeepSeek-OCR's `deepencoder/clip_sdpa.py`.

It never looks at pixels: the SAM output map (B, 1024, h, w) is used as the patch embeddings
(flattened row-major), a class token is prepended, the 16x16(+CLS) position table is added
(bicubic-antialias resized in fp32 to h x w when the grid is not 16x16), then ``pre_layrnorm``
(sic) and 24 pre-LN blocks with quick-GELU. No post-layernorm; the caller drops the CLS row.

Key decisions:
* ``embeddings.patch_embedding`` (conv, no bias) is dead weight kept only so the checkpoint loads
  strictly; no ``position_ids`` buffer (the official file has none), the table is indexed directly.
* Attribute names equal the checkpoint keys (``transformer.layers.{j}.self_attn.qkv_proj`` ...);
  ``qkv_proj`` rows are [q; k; v], each split into heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ClipConfig


def resize_clip_pos(table: Tensor, h: int, w: int) -> Tensor:
    """(1 + g*g, C) table -> (1 + h*w, C): CLS row kept, grid part bicubic+antialias in fp32."""
    g = math.isqrt(table.shape[0] - 1)
    if g == h and g == w:
        return table
    C = table.shape[1]
    grid = table[1:].reshape(1, g, g, C).permute(0, 3, 1, 2).float()  # (1, C, g, g)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(h * w, C)
    return torch.cat([table[:1], grid], dim=0)


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(
            3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )  # unused: SAM features replace it
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)

    def forward(self, patch_embeds: Tensor) -> Tensor:
        B, C, h, w = patch_embeds.shape  # (B, C, h, w) SAM net_3 output
        x = patch_embeds.flatten(2).transpose(1, 2)  # (B, h*w, C) row-major
        cls = self.class_embedding.to(x.dtype).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1+h*w, C)
        return x + resize_clip_pos(self.position_embedding.weight, h, w).to(x.dtype)


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.qkv_proj = nn.Linear(cfg.width, 3 * cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape  # (B, L, C)
        qkv = self.qkv_proj(x).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale 1/sqrt(d)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class ClipLayer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipVisionModel(nn.Module):
    """SAM map (B, C, h, w) -> (B, 1 + h*w, C); row 0 is the class token."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.transformer = ClipTransformer(cfg)

    def forward(self, patch_embeds: Tensor) -> Tensor:
        x = self.pre_layrnorm(self.embeddings(patch_embeds))  # (B, 1+h*w, C)
        return self.transformer(x)  # no post-layernorm
