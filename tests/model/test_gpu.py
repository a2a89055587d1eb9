"""GPU-only checks (deselected by default: `pytest -m gpu` on a CUDA machine; CI has no GPU).

- the flash varlen decode path of KVCache reads exactly each row's own slots (== masked SDPA);
- the engine's CUDA-graph decode replays give the same tokens as eager steps.
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
        q, k, v = (torch.randn(B, H, 1, hd, device="cuda", dtype=torch.bfloat16, generator=g.manual_seed(3 + i))
                   for i in range(3))
        out[flash] = cache.attend(0, q, k, v, (lens - 1)[:, None]).float()
    assert (out[True] - out[False]).abs().max().item() < 2e-2


@cuda
def test_engine_graphs_equal_eager() -> None:
    import numpy as np
    from PIL import Image

    from model.checkpoint import init_random
    from model.config import OcrConfig
    from model.engine import Engine, EngineConfig, Request
    from model.ocr import OcrModel
    from model.preprocess import preprocess_image
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
    for graphs in (True, False):
        cfg = EngineConfig(max_batch=3, max_model_len=2048, max_new_tokens=40, cuda_graphs=graphs, sync_every=4)
        res[graphs] = [r.ids for r in Engine(model, cfg).run(Request(i, v) for i, v in reqs)]
    assert res[True] == res[False]


@cuda
def test_pixels_normalised_on_the_device_equal_the_cpu_path() -> None:
    import numpy as np

    from model.preprocess import to_pixel_tensor

    views = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert torch.equal(to_pixel_tensor(views, "cuda").cpu(), to_pixel_tensor(views))
