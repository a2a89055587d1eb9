"""Deterministic synthetic weights: each tensor is a pure function of (official key, shape, seed).

NOTE: this mirrors the parity generator `shared/parity/synth_weights.py` formula for formula (its
docstring is normative); tests/model/test_checkpoint.py checks it against the SHA-256
fingerprints in `shared/parity/cases.json`. Keep it bit-identical: the goldens depend on it.

Used for the parity tests (same weights as the reference run) and for the offline
`tiny_random` model (`init_random`, through the strict loader of `model.checkpoint`). Always
generated on CPU in float32 - a CUDA generator gives different numbers; move/cast afterwards.
`scale_by_rule` is the rule alone: `init_random_fast` / `random_model` apply it to numbers drawn
on the GPU (`full_random`, GPU benchmarks).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from model.checkpoint import load_weights, official_key_map
from model.config import OcrConfig

if TYPE_CHECKING:
    from model.ocr import OcrModel

_NECK_NORM_SUFFIXES = (
    "sam_model.neck.1.weight",
    "sam_model.neck.3.weight",
    "sam_model.neck.1.bias",
    "sam_model.neck.3.bias",
)
_TABLE_MARKERS = ("embed_tokens", "position_embedding", "pos_embed", "rel_pos_h", "rel_pos_w")


def synth_seed(name: str, seed: int = 0) -> int:
    """Seed of the CPU generator for one tensor: crc32(name) + seed, 31 bits."""
    return (zlib.crc32(name.encode("utf-8")) + int(seed)) & 0x7FFFFFFF


def _is_norm_param(name: str) -> bool:
    return "norm" in name.lower() or name.endswith(_NECK_NORM_SUFFIXES)


def synth_rule(name: str, shape: Iterable[int]) -> str:
    """'norm_weight' | 'norm_bias' | 'table' | 'vector' | 'fan_in' (first matching rule wins)."""
    shape = tuple(int(s) for s in shape)
    if _is_norm_param(name) and name.endswith(".weight"):
        return "norm_weight"
    if _is_norm_param(name) and name.endswith(".bias"):
        return "norm_bias"
    if any(m in name for m in _TABLE_MARKERS):
        return "table"
    if len(shape) <= 1:
        return "vector"
    return "fan_in"


def synth_tensor(name: str, shape: Iterable[int], seed: int = 0) -> torch.Tensor:
    """Float32 CPU tensor for official key `name` of `shape`."""
    shape = tuple(int(s) for s in shape)
    g = torch.Generator(device="cpu")
    g.manual_seed(synth_seed(name, seed))
    x = torch.randn(shape, generator=g, dtype=torch.float32)  # whole shape at once, row-major
    return scale_by_rule(x, name)


def scale_by_rule(x: torch.Tensor, name: str) -> torch.Tensor:
    """Standard-normal `x` (float32, the official shape of key `name`) scaled in place by the rule:
    norm weights 1 + 0.05 x, norm biases / tables / vectors 0.02 x, matrices x / sqrt(fan_in)."""
    rule = synth_rule(name, x.shape)
    if rule == "norm_weight":
        return x.mul_(0.05).add_(1.0)
    if rule in ("norm_bias", "table", "vector"):
        return x.mul_(0.02)
    return x.div_(math.sqrt(math.prod(x.shape[1:])))  # fan_in


class _SynthTensors(Mapping[str, Tensor]):
    """Lazy {official key: synth_tensor(key, shape, seed)} for the keys of a model."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], seed: int) -> None:
        self._shapes, self._seed = shapes, seed

    def __getitem__(self, key: str) -> Tensor:
        return synth_tensor(key, self._shapes[key], self._seed)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def init_random(model: nn.Module, seed: int = 0) -> set[str]:
    """Fill every parameter with `synth_tensor(official key, official shape, seed)` through the
    strict checkpoint loader (in place, or materialising meta params on CPU), so `tiny_random` and
    the parity tests take the same path as a real checkpoint. Returns the official keys loaded."""
    shapes = {k: s.shape for k, s in official_key_map(model).items()}
    return load_weights(model, _SynthTensors(shapes, seed))


@torch.no_grad()
def init_random_fast(model: nn.Module, seed: int = 0) -> set[str]:
    """Fill every parameter in place by the parity rule (`scale_by_rule`), drawing from one
    generator on the parameters' device (seconds for the full model on a GPU, where a CPU
    generator per key would take far too long; the numbers differ from `init_random`'s).
    Returns the official keys filled."""
    current = model.state_dict(keep_vars=True)
    kmap = official_key_map(model)
    device = next(iter(current.values())).device
    g = torch.Generator(device=device).manual_seed(seed)
    for key, slot in kmap.items():
        x = torch.randn(slot.shape, generator=g, device=device, dtype=torch.float32)
        current[slot.param][slot.index].copy_(scale_by_rule(x, key))
    return set(kmap)


def random_model(
    device: torch.device | str,
    seed: int = 0,
    *,
    config: OcrConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> OcrModel:
    """OcrModel of `config` (default: the official full-size one) built directly on `device` in
    `dtype` (no float32 CPU copy is ever made), filled by `init_random_fast`, in eval mode: the
    `full_random` benchmark model."""
    from model.ocr import OcrModel  # lazy: model.ocr imports the whole vision stack

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OcrModel(config or OcrConfig.official())
    finally:
        torch.set_default_dtype(previous)
    init_random_fast(model, seed)
    return model.eval()
