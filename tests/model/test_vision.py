"""DeepEncoder tests: the augmented-q/k rel-pos attention, token layout on the tiny config, and
golden parity of the full-size vision part (SAM-B + CLIP-L + projector) on synthetic weights.

The parity model (401M parameters, fp32) is built once per module on the meta device, then every
parameter is filled with ``synth_tensor("model." + key)``; intermediate SAM/CLIP outputs are
captured with forward hooks during the Gundam forward, so each view is encoded only once.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.config import OcrConfig
from model.sam import (
    Attention,
    PatchEmbed,
    rel_pos_attention,
    rel_pos_attention_bias,
    rel_pos_table,
)
from model.vision import DeepEncoder, PageViews

VISION_PREFIXES = (
    "model.sam_model.",
    "model.vision_model.",
    "model.projector.",
    "model.image_newline",
    "model.view_seperator",
)


# ----------------------------------------------------------------------------- unit: attention


def _dense_rel_pos_attention(q, k, v, table_h, table_w, scale):
    """Reference: explicit (N x N) bias from index arithmetic, explicit softmax.

    q, k, v: (B, nh, H, W, d); table_h: (2H-1, d), table_w: (2W-1, d) (already sized)."""
    B, nh, H, W, d = q.shape
    ih, iw = torch.arange(H), torch.arange(W)
    Rh = table_h[ih[:, None] - ih[None, :] + H - 1]  # (H, H, d)
    Rw = table_w[iw[:, None] - iw[None, :] + W - 1]  # (W, W, d)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q, Rh)  # (B, nh, H, W, Hk)
    bias_w = torch.einsum("bnhwc,wlc->bnhwl", q, Rw)  # (B, nh, H, W, Wk)
    bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(B, nh, H * W, H * W)
    qf, kf, vf = (t.reshape(B, nh, H * W, d) for t in (q, k, v))
    logits = scale * qf @ kf.transpose(-1, -2) + bias  # (B, nh, N, N)
    return torch.softmax(logits, dim=-1) @ vf  # (B, nh, N, d)


@pytest.mark.parametrize("H,W", [(14, 14), (5, 9), (7, 3)])
def test_augmented_qk_equals_dense_bias(H: int, W: int) -> None:
    g = torch.Generator().manual_seed(H * 100 + W)
    B, nh, d = 2, 3, 16
    q, k, v = (torch.randn(B, nh, H, W, d, generator=g, dtype=torch.float64) for _ in range(3))
    th = torch.randn(2 * H - 1, d, generator=g, dtype=torch.float64)
    tw = torch.randn(2 * W - 1, d, generator=g, dtype=torch.float64)
    scale = d**-0.5
    got = rel_pos_attention(q, k, v, rel_pos_table(H, th), rel_pos_table(W, tw), scale)
    ref = _dense_rel_pos_attention(q, k, v, th, tw, scale)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("H,W", [(14, 14), (5, 9)])
def test_bias_path_equals_dense_bias(H: int, W: int) -> None:
    """The dense-mask path (what the benchmark counts FLOPs on) computes the reference attention."""
    g = torch.Generator().manual_seed(H * 10 + W)
    B, nh, d = 2, 3, 16
    q, k, v = (torch.randn(B, nh, H, W, d, generator=g) for _ in range(3))
    th, tw = torch.randn(2 * H - 1, d, generator=g), torch.randn(2 * W - 1, d, generator=g)
    ref = _dense_rel_pos_attention(q, k, v, th, tw, d**-0.5)
    rh, rw = rel_pos_table(H, th), rel_pos_table(W, tw)
    torch.testing.assert_close(rel_pos_attention_bias(q, k, v, rh, rw, d**-0.5), ref, rtol=1e-4, atol=1e-5)


def test_patch_embed_gemm_equals_the_conv() -> None:
    """The unfolded-patch GEMM is the checkpoint's 16x16/16 conv (same weights, same sums)."""
    torch.manual_seed(1)
    pe = PatchEmbed(16, 24).double()
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    ref = pe.proj(x).permute(0, 2, 3, 1)
    torch.testing.assert_close(pe(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rel_size,H,W", [(14, 14, 14), (16, 10, 6), (8, 12, 5)])
def test_sam_attention_module_matches_dense(rel_size: int, H: int, W: int) -> None:
    """Whole Attention module, windowed-size (exact table) and global (resized table, non-square)."""
    torch.manual_seed(0)
    attn = Attention(dim=32, heads=2, rel_size=rel_size).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, H, W, 32, dtype=torch.float64)
    qkv = attn.qkv(x).view(2, H, W, 3, 2, 16).permute(3, 0, 4, 1, 2, 5)

    def resized(t, n):  # independent linear resize, in fp32 like the reference
        if t.shape[0] == n:
            return t
        return F.interpolate(t.float().t()[None], size=n, mode="linear")[0].t().to(t.dtype)

    q, k, v = qkv  # unpacks along dim 0, as *qkv did
    ref = _dense_rel_pos_attention(
        q, k, v, resized(attn.rel_pos_h, 2 * H - 1), resized(attn.rel_pos_w, 2 * W - 1), 16**-0.5
    )
    ref = attn.proj(ref.view(2, 2, H, W, 16).permute(0, 2, 3, 1, 4).reshape(2, H, W, 32))
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- unit: tiny model


@pytest.fixture(scope="module")
def tiny_encoder() -> DeepEncoder:
    torch.manual_seed(0)
    enc = DeepEncoder(OcrConfig.tiny()).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.05)
    return enc


@torch.no_grad()
def test_tiny_gundam_layout(tiny_encoder: DeepEncoder) -> None:
    enc = tiny_encoder
    D = enc.cfg.decoder.hidden_size
    g = torch.randn(1, 3, 1024, 1024)
    tiles = torch.randn(6, 3, 640, 640)
    out = enc.image_embeddings(g, tiles, (2, 3))  # 2 tiles wide, 3 tiles high
    assert out.shape == (903, D)
    # mosaic: row r, column c -> tile (r//10)*2 + c//10, position (r%10, c%10); newline at r*21+20
    tf = enc.encode_views(tiles).view(6, 10, 10, D)
    mosaic = out[:630].view(30, 21, D)
    for r, c in [(0, 0), (3, 17), (15, 9), (29, 19), (22, 10)]:
        torch.testing.assert_close(mosaic[r, c], tf[(r // 10) * 2 + c // 10, r % 10, c % 10])
    assert torch.equal(mosaic[:, 20], enc.image_newline.expand(30, D))
    glob = out[630:902].view(16, 17, D)
    torch.testing.assert_close(glob[:, :16].reshape(256, D), enc.encode_views(g)[0])
    assert torch.equal(glob[:, 16], enc.image_newline.expand(16, D))
    assert torch.equal(out[902], enc.view_seperator)
    # no tiles: 512 -> 8 x 9 + 1
    assert enc.image_embeddings(torch.randn(3, 512, 512), None, (1, 1)).shape == (73, D)


@torch.no_grad()
def test_tiny_batch_helper_equals_per_page(tiny_encoder: DeepEncoder) -> None:
    enc = tiny_encoder
    torch.manual_seed(1)
    pages = [
        PageViews(torch.randn(1, 3, 1024, 1024), torch.randn(6, 3, 640, 640), (2, 3)),
        PageViews(torch.randn(3, 1024, 1024), None, (1, 1)),
        PageViews(torch.randn(1, 3, 1024, 1024), torch.randn(3, 3, 640, 640), (3, 1)),
        PageViews(torch.randn(1, 3, 512, 512), None, (1, 1)),
    ]
    batched = enc.image_embeddings_batch(pages)
    chunked = enc.image_embeddings_batch(pages, max_batch=2)
    assert [t.shape[0] for t in batched] == [903, 273, 583, 73]
    for p, b, c in zip(pages, batched, chunked):
        single = enc.image_embeddings(*p)
        torch.testing.assert_close(b, single, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, single, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- parity (full size)


def _load_synth(parity_dir: Path):
    spec = importlib.util.spec_from_file_location("synth_weights", parity_dir / "synth_weights.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def official_encoder(parity_dir: Path):
    synth = _load_synth(parity_dir)
    with torch.device("meta"):
        enc = DeepEncoder(OcrConfig.official())
    enc = enc.to_empty(device="cpu").float().eval()
    with torch.no_grad():
        for key, t in enc.state_dict().items():
            t.copy_(synth.synth_tensor("model." + key, tuple(t.shape)))
    yield enc, synth
    del enc
    gc.collect()


@pytest.fixture(scope="module")
def golden(parity_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(parity_dir / "golden.safetensors"))


def _view(parity_dir: Path, name: str) -> torch.Tensor:
    img = np.asarray(Image.open(parity_dir / "views" / name).convert("RGB"))
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float()  # (3, S, S)
    return (x / 255.0 - 0.5) / 0.5


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, max_tol: float, mean_tol: float | None = None):
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    diff = (got.float() - ref).abs()
    print(f"{name}: max {diff.max().item():.3e} mean {diff.mean().item():.3e}")
    assert diff.max().item() <= max_tol, f"{name}: max diff {diff.max().item():.3e} > {max_tol}"
    if mean_tol is not None:
        assert diff.mean().item() <= mean_tol, f"{name}: mean diff {diff.mean().item():.3e}"


@pytest.mark.parity
def test_vision_keys_match_checkpoint(official_encoder, parity_dir: Path) -> None:
    enc, synth = official_encoder
    official = {
        k: v
        for k, v in synth.load_keys_tsv(str(parity_dir / "keys.tsv")).items()
        if k.startswith(VISION_PREFIXES)
    }
    ours = {"model." + k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert set(ours) == set(official)
    assert {k: ours[k] for k in official} == official
    assert sum(v.numel() for v in enc.state_dict().values()) == 401_372_160


@pytest.mark.parity
@torch.no_grad()
def test_parity_gundam_with_intermediates(official_encoder, golden, parity_dir: Path) -> None:
    enc, _ = official_encoder
    captured: dict[str, list[torch.Tensor]] = {"sam": [], "clip": []}
    hooks = [
        enc.sam_model.register_forward_hook(lambda m, i, o: captured["sam"].append(o)),
        enc.vision_model.register_forward_hook(lambda m, i, o: captured["clip"].append(o)),
    ]
    try:
        g = _view(parity_dir, "page_pad1024.png")
        tiles = torch.stack([_view(parity_dir, f"page_tiles2x3_{i}.png") for i in range(6)])
        out = enc.image_embeddings(g, tiles, (2, 3))
    finally:
        for h in hooks:
            h.remove()
    sam = {o.shape[-1]: o for o in captured["sam"]}  # 16: global view, 10: the 6 tiles
    clip = {o.shape[1]: o for o in captured["clip"]}  # 257: global view, 101: tiles
    _check("page.global1024.sam_out", sam[16], golden["page.global1024.sam_out"], 5e-5)
    _check("page.global1024.clip_out", clip[257], golden["page.global1024.clip_out"], 2e-4)
    _check("page.tile0.sam_out", sam[10][:1], golden["page.tile0.sam_out"], 5e-5)
    _check("page.tile0.clip_out", clip[101][:1], golden["page.tile0.clip_out"], 2e-4)
    _check("page.gundam.image_embeds", out, golden["page.gundam.image_embeds"], 2e-4, 1e-5)


@pytest.mark.parity
@torch.no_grad()
def test_parity_base_tiny_batched(official_encoder, golden, parity_dir: Path) -> None:
    """No-tile modes through the batch helper (two view sizes -> two SAM/CLIP groups)."""
    enc, _ = official_encoder
    base, tiny = enc.image_embeddings_batch(
        [
            PageViews(_view(parity_dir, "page_pad1024.png"), None, (1, 1)),
            PageViews(_view(parity_dir, "page_resize512.png"), None, (1, 1)),
        ]
    )
    _check("page.base.image_embeds", base, golden["page.base.image_embeds"], 2e-4, 1e-5)
    _check("page.tiny.image_embeds", tiny, golden["page.tiny.image_embeds"], 2e-4, 1e-5)


@pytest.mark.parity
@torch.no_grad()
def test_parity_large(official_encoder, golden, parity_dir: Path) -> None:
    enc, _ = official_encoder
    out = enc.image_embeddings(_view(parity_dir, "page_pad1280.png"), None, (1, 1))
    _check("page.large.image_embeds", out, golden["page.large.image_embeds"], 2e-4, 1e-5)
