"""The kernel-precompile child (`model.precompile`) on CPU: its spec survives the JSON trip to the
child, the child's entry point runs the real modules at the mode's shapes (tiny config, the
plain-torch paths: no kernels to compile here), and nothing is started without a GPU. That a
process after the child compiles nothing new is checked on the GPU (`tests/model/test_gpu.py`)."""

from __future__ import annotations

import json

import pytest
import torch

from model import precompile
from model.config import OcrConfig
from model.kv_cache import PagedKVCache
from model.runner import PageOcr


def test_kernel_shapes_follow_the_engine_settings_and_survive_json() -> None:
    shapes = PageOcr.kernel_shapes(
        "tiny_random", "gundam", dtype="float32", max_batch=None, max_model_len=1024
    )
    assert shapes.config == OcrConfig.tiny()
    assert (shapes.max_model_len, shapes.kv_block_size, shapes.mode, shapes.dtype) == (
        1024,
        64,
        "gundam",
        "float32",
    )
    back = precompile.KernelShapes.from_json(shapes.to_json())  # the config's name is not sent
    assert back.to_json() == shapes.to_json() and back.config.sam == shapes.config.sam
    full = PageOcr.kernel_shapes("full_random", "base")
    assert full.config == OcrConfig.official() and full.dtype == "bfloat16"
    with pytest.raises(ValueError):
        PageOcr.kernel_shapes("no_such_model", "gundam")


@pytest.mark.parametrize("mode", ["gundam", "tiny"])
def test_the_child_entry_point_runs_the_modules_of_the_mode(
    mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)  # this machine's torch: wrong sqrt on a second CPU thread
    shapes = PageOcr.kernel_shapes("tiny_random", mode, dtype="float32", max_model_len=512)
    assert precompile.main([shapes.to_json(), "--device", "cpu"]) == 0
    timings = json.loads(capsys.readouterr().out)
    assert set(timings) == {"vision_s", "decode_s"} and all(t >= 0 for t in timings.values())


def test_nothing_starts_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precompile.start(PageOcr.kernel_shapes("tiny_random", "gundam")) is None


def test_decode_graphs_key_on_attend_length_only_where_decode_reads_it() -> None:
    cache = PagedKVCache(1, 2, 4, 16, 2, 16, 64)  # CPU: the reference path reads attend_len
    assert cache.decode_reads_attend_len
