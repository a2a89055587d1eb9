"""PageOcr (model/runner.py) on the tiny model, CPU: outputs in input order with the callers' tags
untouched, the async server resolving futures, and the one constructor of a failed page's output."""

from __future__ import annotations

import numpy as np
import torch

from model.preprocess import preprocess_image
from model.runner import OcrInput, OcrOutput, PageOcr


def _inputs(n: int) -> list[OcrInput]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        img = Image.fromarray(rng.integers(0, 255, (300 + 40 * k, 400, 3), dtype=np.uint8))
        prep = preprocess_image(img, "tiny")
        out.append(OcrInput.from_views(prep, tag=("page", k)))
    return out


def test_run_keeps_order_and_tags_and_submit_matches_run() -> None:
    torch.set_num_threads(1)
    ocr = PageOcr.load(
        "tiny_random", dtype="float32", device="cpu", max_batch=2, max_new_tokens=6, max_model_len=1024
    )
    inputs = _inputs(5)
    ran = ocr.run(inputs)
    assert [o.tag for o in ran] == [("page", k) for k in range(5)]
    assert [x.tag for x in inputs] == [("page", k) for k in range(5)]  # the callers' inputs untouched
    assert all(o.num_output_tokens == 6 and o.finish_reason == "length" for o in ran)
    served = [f.result(timeout=300) for f in [ocr.submit(x) for x in inputs]]
    assert [(o.tag, o.ids) for o in served] == [(o.tag, o.ids) for o in ran]


def test_failed_output() -> None:
    (x,) = _inputs(1)
    out = OcrOutput.failed(x, "RuntimeError: boom")
    assert (out.tag, out.finish_reason, out.ids, out.num_vision_tokens, out.error) == (
        ("page", 0),
        "error",
        [],
        x.num_image_tokens,
        "RuntimeError: boom",
    )
