"""SAM-ViT-B image encoder of DeepSeek-OCR's DeepEncoder (checkpoint prefix ``model.sam_model.``).

Adapted from DeepSeek-OCR's `deepencoder/sam_vary_sdpa.py`.

ViTDet/SAM encoder: 16x16 patch conv, absolute position table, 12 pre-LN blocks (windowed 14x14
attention except the global blocks), decomposed relative-position bias, conv neck, then the two
stride-2 convs ``net_2``/``net_3`` (the "16x compressor"). Output (B, 1024, S/64, S/64).

Key decisions:
* Attribute names equal the checkpoint keys (``blocks.{i}.attn.rel_pos_h``, ``neck.{0..3}`` ...).
* The decomposed rel-pos bias ``<q_ij, Rh[i-k]> + <q_ij, Rw[j-l]>`` (UNscaled q) is folded into
  the attention logits with an exact "augmented q/k" trick instead of a dense (B, heads, N, N)
  mask: q_aug = [q*scale, q.Rh, q.Rw], k_aug = [k, onehot(row), onehot(col)], SDPA with scale=1.
  ``q_aug . k_aug`` equals ``scale*q.k + bias`` term by term, so no mask is built and the fused
  (flash / memory-efficient) SDPA kernels stay usable for large batches on GPU.
* ``ATTENTION_IMPL = "bias"`` switches to the reference's own formulation (a dense additive
  mask) to count the model's FLOPs independently of the kernel: the augmented q.k runs at head
  dim d+H+W (192 instead of 64 in the 64x64 global blocks).
* The 16x16/16 patch conv runs as one GEMM over unfolded patches (the same sum; cuDNN picks a
  slow implicit-GEMM kernel for its 3 input channels).
* On CUDA the attention (windowed and global) runs as one Triton kernel over the unpartitioned
  grid (`model.sam_attention`): no partition, permute or augmentation copies.
* Position-table resizing runs in fp32 (abs: bicubic antialias; rel: 1-D linear), as the
  reference does, then casts back to the module dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import sam_attention
from model.config import SamConfig


def resize_abs_pos(pos: Tensor, h: int, w: int) -> Tensor:
    """(1, H0, W0, C) table -> (1, h, w, C); bicubic + antialias in fp32 (reference behaviour)."""
    if pos.shape[1] == h and pos.shape[2] == w:
        return pos
    x = pos.permute(0, 3, 1, 2).float()  # (1, C, H0, W0)
    x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return x.to(pos.dtype).permute(0, 2, 3, 1)


def rel_pos_table(size: int, rel_pos: Tensor) -> Tensor:
    """Gathered relative-position table R[i, k] = rel_pos[i - k + size - 1]: (size, size, d).

    The stored table (L, d) is linearly resized (fp32) to 2*size-1 rows when L differs."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        r = rel_pos.float().t().unsqueeze(0)  # (1, d, L)
        r = F.interpolate(r, size=length, mode="linear")  # (1, d, length)
        rel_pos = r[0].t().to(rel_pos.dtype)  # (length, d)
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + size - 1]  # (size, size, d)


# CUDA: pad v to the augmented head dim so SDPA can take the flash kernel (equal head dims) instead
# of the memory-efficient one; `jobs/benchmark.py --kernel-bench` times both (vision A/B)
PAD_V_ON_CUDA = False


def rel_pos_bias(q: Tensor, rh: Tensor, rw: Tensor) -> tuple[Tensor, Tensor]:
    """<q_ij, Rh[i, k]> and <q_ij, Rw[j, l]> with unscaled q: (B, nh, H*W, H) and (B, nh, H*W, W)."""
    B, nh, H, W, _ = q.shape
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q, rh).reshape(B, nh, H * W, H)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q, rw).reshape(B, nh, H * W, W)
    return rel_h, rel_w


def rel_pos_attention_bias(q: Tensor, k: Tensor, v: Tensor, rh: Tensor, rw: Tensor, scale: float) -> Tensor:
    """The reference formulation: SDPA with a dense (B, nh, N, N) additive bias. Memory grows with
    N^2, so it serves FLOP counting and tests, not the engine."""
    B, nh, H, W, d = q.shape
    rel_h, rel_w = rel_pos_bias(q, rh, rw)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, H * W, H * W)
    flat = [t.reshape(B, nh, H * W, d) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*flat, attn_mask=bias, scale=scale)


# which rel-pos attention SAM runs: "augmented" (fused SDPA on q/k augmented with the bias terms)
# or "bias" (dense mask: the reference's math, for FLOP counting)
ATTENTION_IMPL = "augmented"


def rel_pos_attention(q: Tensor, k: Tensor, v: Tensor, rh: Tensor, rw: Tensor, scale: float) -> Tensor:
    """softmax(scale*q.k + <q, Rh[i,k]> + <q, Rw[j,l]>) v without materialising the bias.

    q, k, v: (B, nh, H, W, d) over an H x W token grid; rh: (H, H, d); rw: (W, W, d).
    Returns (B, nh, H*W, d)."""
    B, nh, H, W, d = q.shape
    rel_h, rel_w = rel_pos_bias(q, rh, rw)  # (B, nh, N, H), (B, nh, N, W): unscaled q
    e = d + H + W
    pad = (-e) % 8  # keep the qk head dim a multiple of 8 (fused-kernel alignment)
    q_aug = torch.cat([(q * scale).reshape(B, nh, H * W, d), rel_h, rel_w], dim=-1)  # (B, nh, N, e)
    rows = torch.eye(H, dtype=k.dtype, device=k.device)[:, None, :].expand(H, W, H)
    cols = torch.eye(W, dtype=k.dtype, device=k.device)[None, :, :].expand(H, W, W)
    onehot = torch.cat([rows, cols], dim=-1).expand(B, nh, H, W, H + W)  # key (k, l) -> [e_k, e_l]
    k_aug = torch.cat([k, onehot], dim=-1).reshape(B, nh, H * W, e)
    v = v.reshape(B, nh, H * W, d)
    if pad:
        q_aug, k_aug = F.pad(q_aug, (0, pad)), F.pad(k_aug, (0, pad))
    if q.device.type == "cpu" or PAD_V_ON_CUDA:
        # The flash kernels need equal q/k/v head dims (CPU: else a slow math path with an N x N
        # matrix); zero columns of v only add zero output columns, sliced off below.
        out = F.scaled_dot_product_attention(q_aug, k_aug, F.pad(v, (0, e + pad - d)), scale=1.0)
        return out[..., :d]  # (B, nh, N, d)
    # CUDA: the memory-efficient kernel accepts a smaller v head dim.
    return F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0)  # (B, nh, N, d)


# CUDA: run the windowed and global attention as one Triton kernel over the unpartitioned grid
# (`model.sam_attention`); False = the plain-torch path below (`jobs/benchmark.py --kernel-bench`
# times both)
FUSED_ON_CUDA = True


def use_fused(x: Tensor) -> bool:
    return FUSED_ON_CUDA and ATTENTION_IMPL == "augmented" and sam_attention.kernel_available(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, rel_size: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape  # (B, H, W, C): one window or the whole grid
        qkv = self.qkv(x).view(B, H, W, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, nh, H, W, d)
        rh = rel_pos_table(H, self.rel_pos_h)  # (H, H, d)
        rw = rel_pos_table(W, self.rel_pos_w)  # (W, W, d)
        attend = rel_pos_attention_bias if ATTENTION_IMPL == "bias" else rel_pos_attention
        out = attend(q, k, v, rh, rw, self.scale)  # (B, nh, H*W, d)
        out = out.view(B, self.heads, H, W, self.head_dim).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj(out)

    def fused(self, x: Tensor, window: int) -> Tensor:
        """The same attention for the whole (B, GH, GW, C) grid, windowed (`window` > 0, no
        partition copy: the kernel maps window tokens to grid tokens) or global (0)."""
        GH, GW = x.shape[1], x.shape[2]
        qkv = self.qkv(x)  # (B, GH, GW, 3C)
        rh = rel_pos_table(window or GH, self.rel_pos_h)  # (WH, WH, d)
        rw = rel_pos_table(window or GW, self.rel_pos_w)  # (WW, WW, d)
        rel_h, rel_w = sam_attention.grid_rel_terms(qkv, rh, rw, self.heads)
        out = sam_attention.relpos_attention(qkv, self.qkv.bias, rel_h, rel_w, self.heads, window, self.scale)
        return self.proj(out)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.gelu(self.lin1(x)))  # exact (erf) GELU


def window_partition(x: Tensor, ws: int) -> tuple[Tensor, int, int]:
    """(B, H, W, C) -> (B*nWin, ws, ws, C), zero-padding bottom/right; returns padded Hp, Wp."""
    B, H, W, C = x.shape
    ph, pw = (-H) % ws, (-W) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, C), Hp, Wp


def window_unpartition(x: Tensor, ws: int, Hp: int, Wp: int, H: int, W: int) -> Tensor:
    """Inverse of window_partition: (B*nWin, ws, ws, C) -> (B, H, W, C), crop the padding."""
    C = x.shape[-1]
    B = x.shape[0] // ((Hp // ws) * (Wp // ws))
    x = x.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return x[:, :H, :W, :]


class Block(nn.Module):
    def __init__(self, cfg: SamConfig, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size  # 0 = global attention
        rel_size = window_size if window_size else cfg.img_size // cfg.patch_size
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.heads, rel_size)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLPBlock(cfg.width, cfg.mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape  # (B, H, W, C)
        y = self.norm1(x)
        if use_fused(y):
            y = self.attn.fused(y, self.window_size)
        elif self.window_size:
            y, Hp, Wp = window_partition(y, self.window_size)  # pad AFTER norm1 (reference)
            y = window_unpartition(self.attn(y), self.window_size, Hp, Wp, H, W)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW map (biased variance), affine per channel."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, S/16, S/16, C) channels-last: one GEMM over the unfolded patches."""
        B, C, S1, S2 = x.shape
        p = self.proj.kernel_size[0]
        h, w = S1 // p, S2 // p
        patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h, w, C * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class ImageEncoderViT(nn.Module):
    """SAM-B encoder + neck + net_2/net_3: (B, 3, S, S) -> (B, net_3 channels, S/64, S/64)."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.depth)
        )
        n = cfg.neck_dim
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.width, n, kernel_size=1, bias=False),
            LayerNorm2d(n, cfg.eps),
            nn.Conv2d(n, n, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(n, cfg.eps),
        )
        c2, c3 = cfg.downsample_channels
        self.net_2 = nn.Conv2d(n, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, H, W, C)
        x = x + resize_abs_pos(self.pos_embed, x.shape[1], x.shape[2])
        for blk in self.blocks:
            x = blk(x)  # (B, H, W, C)
        x = self.neck(x.permute(0, 3, 1, 2))  # (B, neck, H, W)
        return self.net_3(self.net_2(x))  # (B, c3, H/4, W/4), no norm/act between
