"""Deterministic synthetic weights: each tensor is a pure function of (official key, shape, seed).

NOTE: this mirrors the parity generator `shared/parity/synth_weights.py` formula for formula (its
docstring is normative); tests/model/test_checkpoint.py checks it against the SHA-256
fingerprints in `shared/parity/cases.json`. Keep it bit-identical: the goldens depend on it.

Used for the parity tests (same weights as the reference run) and for the offline
`tiny_random` model (`model.checkpoint.init_random`). Always generated on CPU in float32 - a
CUDA generator gives different numbers; move/cast afterwards. `scale_by_rule` is the rule alone:
`model.checkpoint.init_random_fast` applies it to numbers drawn on the GPU (`full_random`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

import torch

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
