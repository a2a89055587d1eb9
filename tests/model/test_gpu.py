"""GPU-only checks (deselected by default: `pytest -m gpu` on a CUDA machine; CI has no GPU).

- the flash varlen decode path of KVCache reads exactly each row's own slots (== masked SDPA);
- the engine's CUDA-graph decode replays give the same tokens as eager steps (paged and slotted);
- the Triton split-KV kernel over the paged cache equals the plain-torch reference (ragged lengths);
- the fused SAM rel-pos attention kernel equals the dense-bias reference in bf16 (windowed with
  padding, global, full-size widths);
- uint8 views normalised on the device equal the CPU path within float rounding;
- views resampled on the GPU (`model.preprocess.device_views`) are the PIL bytes;
- the kernel-precompile child leaves the engine nothing to compile (`model.precompile`).
"""

from __future__ import annotations

import pytest
import torch

from model.kv_cache import KVCache

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_flash_decode_equals_masked_sdpa() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, hd, L = 5, 10, 128, 1024
    lens = torch.tensor([1, 7, 300, 1000, 513], device="cuda")
    out = {}
    for flash in (True, False):
        cache = KVCache(1, B, H, L, hd, device="cuda", dtype=torch.bfloat16)
        cache.use_flash = flash
        cache.k[0].normal_(generator=g.manual_seed(1))
        cache.v[0].normal_(generator=g.manual_seed(2))
        q, k, v = (
            torch.randn(B, H, 1, hd, device="cuda", dtype=torch.bfloat16, generator=g.manual_seed(3 + i))
            for i in range(3)
        )
        out[flash] = cache.attend(0, q, k, v, (lens - 1)[:, None]).float()
    assert (out[True] - out[False]).abs().max().item() < 2e-2


@cuda
def test_engine_graphs_equal_eager() -> None:
    import numpy as np
    from PIL import Image

    from model.config import OcrConfig
    from model.engine import Engine, Request
    from model.engine_config import EngineConfig, KvLayout
    from model.ocr import OcrModel
    from model.preprocess import preprocess_image
    from model.synth import init_random
    from model.tokenizer import DEFAULT_PROMPT, OcrTokenizer
    from model.vision import PageViews

    model = OcrModel(OcrConfig.tiny())
    init_random(model, seed=3)
    model = model.to("cuda", torch.bfloat16).eval()
    tok = OcrTokenizer.default()
    rng = np.random.default_rng(0)
    reqs = []
    for w, h in [(900, 1200), (500, 400), (1300, 600), (700, 700)]:
        prep = preprocess_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "gundam")
        gv, tiles = prep.pixel_tensors()
        views = PageViews(gv.cuda().bfloat16(), None if tiles is None else tiles.cuda().bfloat16(), prep.grid)
        reqs.append((tok.build_prompt_ids(DEFAULT_PROMPT, prep.num_image_tokens), views))
    res = {}
    for engine in KvLayout:
        for graphs in (True, False):
            cfg = EngineConfig(
                max_batch=3,
                max_model_len=2048,
                max_new_tokens=40,
                cuda_graphs=graphs,
                sync_every=4,
                engine=engine,
                kv_blocks=3 * 32 + 1,
            )
            res[engine, graphs] = [r.ids for r in Engine(model, cfg).run(Request(i, v) for i, v in reqs)]
    assert res["paged", True] == res["paged", False]
    assert res["slotted", True] == res["slotted", False]
    # vision encoded at admission on the decode stream (no look-ahead) vs ahead on the vision
    # stream (the runs above): the same tokens; 16 row slots, so the step runs over a bucket of them
    for ahead, rows in ((0, 3), (64, 16)):
        cfg = EngineConfig(
            max_batch=rows, max_model_len=2048, max_new_tokens=40, sync_every=4, vision_ahead=ahead,
            kv_blocks=3 * 32 + 1, admit_min=1,
        )  # fmt: skip
        assert [r.ids for r in Engine(model, cfg).run(Request(i, v) for i, v in reqs)] == res["paged", True]


@cuda
def test_sam_attention_padded_v_equals_memory_efficient() -> None:
    """SAM's rel-pos attention with v padded (flash-eligible) equals the unpadded path."""
    from model import sam

    g = torch.Generator(device="cuda").manual_seed(0)
    B, nh, H, W, d = 2, 12, 14, 14, 64
    q, k, v = (
        torch.randn(B, nh, H, W, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)
    )
    rh = torch.randn(H, H, d, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    rw = torch.randn(W, W, d, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    out = {}
    saved = sam.PAD_V_ON_CUDA
    try:
        for pad in (False, True):
            sam.PAD_V_ON_CUDA = pad
            out[pad] = sam.rel_pos_attention(q, k, v, rh, rw, d**-0.5).float()
    finally:
        sam.PAD_V_ON_CUDA = saved
    assert out[False].shape == out[True].shape == (B, nh, H * W, d)
    assert (out[False] - out[True]).abs().max().item() < 2e-2


@cuda
@pytest.mark.parametrize("grid,window", [(40, 14), (64, 14), (40, 0), (64, 0)])
def test_fused_sam_attention_equals_the_dense_bias_reference(grid: int, window: int) -> None:
    """Full-size SAM widths (768 = 12 x 64), bf16: the Triton kernel over the unpartitioned grid
    against the reference's dense-bias SDPA over partitioned windows, in fp32."""
    from model import sam

    torch.manual_seed(0)
    attn = sam.Attention(768, 12, window or grid).cuda()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.05)
        x = torch.randn(3, grid, grid, 768, device="cuda")
        saved = sam.ATTENTION_IMPL
        try:
            sam.ATTENTION_IMPL = "bias"
            if window:
                y, Hp, Wp = sam.window_partition(x, window)
                ref = sam.window_unpartition(attn(y), window, Hp, Wp, grid, grid)
            else:
                ref = attn(x)
        finally:
            sam.ATTENTION_IMPL = saved
        got = attn.to(torch.bfloat16).fused(x.to(torch.bfloat16), window).float()
    err = (got - ref).abs().max().item()
    assert err < 3e-2 * ref.abs().max().item(), (err, ref.abs().max().item())


@cuda
def test_pixels_normalised_on_the_device_equal_the_cpu_path() -> None:
    import numpy as np

    from model.preprocess import to_pixel_tensor

    views = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    # the device may round (x/255 - mean)/std differently by 1 ulp (H200: max |d| 1.2e-7); values
    # lie in [-1, 1], so 1e-6 is a few ulps of fp32 and far below one bf16 step (7.8e-3)
    torch.testing.assert_close(
        to_pixel_tensor(views, "cuda").cpu(), to_pixel_tensor(views), rtol=0, atol=1e-6
    )


@cuda
@pytest.mark.parametrize("parts", [2, 4, 16])
@pytest.mark.parametrize("block_size", [16, 64])
def test_paged_kernel_equals_torch_reference(
    block_size: int, parts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Split-KV Triton decode over a shuffled block pool, rows of very unequal length (1 token to
    the full row, across split boundaries) == the plain-torch paged reference, within bf16 tolerance."""
    from model import paged_attention
    from model.kv_cache import PagedKVCache

    monkeypatch.setattr(paged_attention, "PARTS", parts)  # programs per (row, head)
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, hd, L = 7, 10, 128, 4096
    lens = torch.tensor([1, 2, 63, 64, 511, 1500, 4096], device="cuda")
    per_row = L // block_size
    cache = PagedKVCache(1, B, B * per_row + 1, block_size, H, hd, L, device="cuda", dtype=torch.bfloat16)
    assert cache.use_kernel
    cache.k[0].normal_(generator=g)
    cache.v[0].normal_(generator=g)
    perm = torch.randperm(B * per_row, generator=torch.Generator().manual_seed(1)) + 1  # scattered blocks
    cache.block_table.copy_(perm.view(B, per_row).to(torch.int32))
    q, k, v = (torch.randn(B, H, 1, hd, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    pos = (lens - 1)[:, None]
    got = cache.attend(0, q, k, v, pos).float()
    want = cache.reference(0, q, pos).float()
    assert (got - want).abs().max().item() < 2e-2


@cuda
def test_precompile_child_leaves_the_engine_nothing_to_compile(tmp_path) -> None:  # noqa: ANN001
    """The child's kernels are the engine's: a process serving a page after it (the full-size
    random model, default engine, Gundam) adds nothing to the Triton cache."""
    import os
    import subprocess
    import sys

    from model.runner import PageOcr

    cache = tmp_path / "triton"
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
    shapes = PageOcr.kernel_shapes("full_random", "gundam")
    subprocess.run(
        [sys.executable, "-m", "model.precompile", shapes.to_json()], env=env, check=True, timeout=600
    )
    before = sorted(p.name for p in cache.iterdir())
    assert before, "the child compiled nothing"
    serve = (
        "from PIL import Image\n"
        "from model.preprocess import preprocess_image\n"
        "from model.runner import OcrInput, PageOcr\n"
        "ocr = PageOcr.load('full_random', max_batch=None)\n"
        "prep = preprocess_image(Image.new('RGB', (1191, 1684), 'white'), 'gundam', max_crops=6)\n"
        "small = preprocess_image(Image.new('RGB', (600, 600), 'white'), 'gundam', max_crops=6)\n"
        "ocr.run([OcrInput.from_views(prep, force_len=40), OcrInput.from_views(small, force_len=40)])\n"
    )
    subprocess.run([sys.executable, "-c", serve], env=env, check=True, timeout=600)
    after = sorted(p.name for p in cache.iterdir())
    assert after == before, f"compiled after the child: {sorted(set(after) - set(before))}"


@cuda
def test_views_built_on_the_gpu_are_the_pil_bytes() -> None:
    """`model.preprocess.device_views` on CUDA (float64 matrix products) equals Pillow's views."""
    import numpy as np
    from PIL import Image

    from model.preprocess import device_views, preprocess_image

    rng = np.random.default_rng(0)
    for size in ((1224, 1584), (1584, 1224), (700, 500), (2000, 300)):
        page = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        for mode in ("gundam", "base"):
            want = preprocess_image(Image.fromarray(page), mode)
            g, tiles, grid = device_views(torch.from_numpy(page).cuda(), mode)
            assert grid == want.grid and np.array_equal(g.cpu().numpy(), want.global_view)
            assert (tiles is None) == (want.tiles is None)
            if tiles is not None and want.tiles is not None:
                assert np.array_equal(tiles.cpu().numpy(), want.tiles)
