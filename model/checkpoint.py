"""Official DeepSeek-OCR checkpoint <-> our modules: the rename tables and strict loading.

Decisions:
- Renaming is data (vLLM `WeightsMapper` style): `PREFIX_RULES` maps official prefixes to ours,
  `STACKED_RULES` maps the per-expert official keys onto slices of the stacked expert params.
  `official_key_map` enumerates *our* state dict and derives the official key(s) of every slot,
  so the map is complete by construction and its coverage (each element filled once) is checked.
- Loading is strict, with no opt-out: every checkpoint key maps to exactly one slot of the right
  shape and every slot is filled, else `CheckpointMismatch` names the missing / unexpected /
  mis-shaped keys. Everything is validated before a single tensor is read. `load_weights`
  returns the set of official keys it loaded.
- The 3.3B model is built on the meta device (`with torch.device("meta")`: the model has no
  buffers, so every tensor it holds is a parameter the checkpoint fills) and materialised with
  `load_state_dict(assign=True)`, reading safetensors lazily one tensor at a time: the weights
  are never allocated twice.
- Where the weights come from is `model.hub`; synthetic weights (parity, `tiny_random`,
  `full_random`) are `model.synth`, which feeds this same loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import Tensor, nn

from model.config import OcrConfig
from model.hub import CheckpointUnavailable, resolve_source

if TYPE_CHECKING:
    from model.ocr import OcrModel

__all__ = [
    "PREFIX_RULES",
    "STACKED_RULES",
    "CheckpointMismatch",
    "CheckpointUnavailable",
    "Slot",
    "load_checkpoint",
    "load_weights",
    "official_key_map",
    "official_state_dict",
]

# (official prefix, internal prefix), first match wins; the reverse direction swaps the columns.
PREFIX_RULES: tuple[tuple[str, str], ...] = (
    ("model.sam_model.", "vision.sam_model."),
    ("model.vision_model.", "vision.vision_model."),
    ("model.projector.", "vision.projector."),
    ("model.image_newline", "vision.image_newline"),
    ("model.view_seperator", "vision.view_seperator"),  # (sic) - the checkpoint's spelling
    ("model.embed_tokens.", "decoder.embed_tokens."),
    ("model.layers.", "decoder.layers."),
    ("model.norm.", "decoder.norm."),
    ("lm_head.", "decoder.lm_head."),
)

# (internal param suffix, official per-expert suffix, part, parts): expert e's tensor is part
# `part` of `parts` equal chunks of param[e] along dim 0 (gate rows first, then up rows).
STACKED_RULES: tuple[tuple[str, str, int, int], ...] = (
    ("mlp.experts.gate_up_proj", "mlp.experts.{e}.gate_proj.weight", 0, 2),
    ("mlp.experts.gate_up_proj", "mlp.experts.{e}.up_proj.weight", 1, 2),
    ("mlp.experts.down_proj", "mlp.experts.{e}.down_proj.weight", 0, 1),
)

# Internal prefix of a sub-model when it is loaded on its own (by class name: no import cycle).
_ROOT_PREFIX = {"Decoder": "decoder.", "DeepEncoder": "vision."}


class CheckpointMismatch(ValueError):
    """Checkpoint keys/shapes do not match the model; the message names the offending keys."""

    def __init__(
        self,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        misshaped: Sequence[str] = (),
    ) -> None:
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
        parts = []
        for what, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", self.misshaped),
        ):
            if keys:
                more = f", ... (+{len(keys) - 10})" if len(keys) > 10 else ""
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:10])}{more}")
        super().__init__("checkpoint does not match the model: " + "; ".join(parts))


class Slot(NamedTuple):
    """Where one official tensor goes: `param[index]` (index () = the whole param) of `shape`."""

    param: str
    index: tuple[int | slice, ...]
    shape: tuple[int, ...]


def _to_official(internal: str) -> str:
    for official, ours in PREFIX_RULES:
        if internal.startswith(ours):
            return official + internal[len(ours) :]
    raise ValueError(f"no rename rule for model parameter {internal!r}")


def official_key_map(model: nn.Module) -> dict[str, Slot]:
    """{official key: Slot} for every tensor of `model` (an OcrModel, Decoder or DeepEncoder)."""
    root = _ROOT_PREFIX.get(type(model).__name__, "")
    out: dict[str, Slot] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        shape = tuple(t.shape)
        stacked = [r for r in STACKED_RULES if name.endswith("." + r[0])]
        slots: list[tuple[str, Slot]] = []
        if not stacked:
            slots.append((_to_official(root + name), Slot(name, (), shape)))
        for suffix, per_expert, part, parts in stacked:
            base = _to_official(root + name[: -len(suffix)])
            rows = shape[1] // parts
            for e in range(shape[0]):
                index = (e,) if parts == 1 else (e, slice(part * rows, (part + 1) * rows))
                key = base + per_expert.format(e=e)
                slots.append((key, Slot(name, index, (rows, *shape[2:]))))
        filled = sum(math.prod(s.shape) for _, s in slots)
        if filled != math.prod(shape):
            raise ValueError(f"rename rules fill {filled} of {math.prod(shape)} elements of {name!r}")
        for key, slot in slots:
            if key in out:
                raise ValueError(f"official key {key!r} claimed by {out[key].param!r} and {slot.param!r}")
            out[key] = slot
    return out


def _shape_of(tensors: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    shape_fn = getattr(tensors, "shape", None)  # lazy mappings report shapes without reading
    if callable(shape_fn):
        return tuple(int(d) for d in cast("Iterable[int]", shape_fn(key)))
    return tuple(tensors[key].shape)


def load_weights(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> set[str]:
    """Load official-named `tensors` into `model`, strictly; returns the set of official keys loaded
    (always every key of `official_key_map(model)`: anything less raises CheckpointMismatch).

    Params on the meta device are materialised (assign) on `device` (default: the tensor's);
    others are copied in place. `dtype` defaults to each parameter's dtype.
    """
    kmap = official_key_map(model)
    missing = sorted(k for k in kmap if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in kmap)
    misshaped = [
        f"{k} (checkpoint {list(_shape_of(tensors, k))} vs model {list(kmap[k].shape)})"
        for k in sorted(k for k in kmap if k in tensors)
        if _shape_of(tensors, k) != kmap[k].shape
    ]
    if missing or unexpected or misshaped:
        raise CheckpointMismatch(missing, unexpected, misshaped)

    by_param: dict[str, list[tuple[str, Slot]]] = {}
    for key, slot in kmap.items():
        by_param.setdefault(slot.param, []).append((key, slot))
    current = model.state_dict(keep_vars=True)
    assign = any(t.is_meta for t in current.values())
    state: dict[str, Tensor] = {}
    for name, slots in by_param.items():
        p = current[name]
        tdtype = dtype or p.dtype
        first = tensors[slots[0][0]]
        dev = device or (first.device if p.is_meta else p.device)
        if slots[0][1].index == ():  # whole tensor
            state[name] = first.to(device=dev, dtype=tdtype)
            continue
        # stacked experts: every slice is filled (official_key_map checked the coverage)
        buf = torch.empty(p.shape, dtype=tdtype, device=dev)
        for key, slot in slots:
            buf[slot.index].copy_(first if key == slots[0][0] else tensors[key])
        state[name] = buf
    model.load_state_dict(state, strict=True, assign=assign)
    return set(kmap)


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{official key: tensor view} - the inverse of loading (export, round-trip tests)."""
    current = model.state_dict()
    return {k: current[s.param][s.index] for k, s in official_key_map(model).items()}


class _SafetensorsFiles(Mapping[str, Tensor]):
    """Lazy {key: tensor} over several .safetensors files (reads one tensor per lookup)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __getitem__(self, key: str) -> Tensor:
        return self._where[key].get_tensor(key)

    def shape(self, key: str) -> list[int]:
        return self._where[key].get_slice(key).get_shape()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_checkpoint(
    path_or_hub_id: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    revision: str | None = None,
) -> OcrModel:
    """OcrModel from a local dir or hub id (`model.hub.resolve_source`) holding `config.json` +
    `*.safetensors`, loaded strictly, in eval mode on `device`."""
    from model.ocr import OcrModel  # lazy: model.ocr imports the whole vision stack

    root = resolve_source(path_or_hub_id, revision)
    cfg_file = root / "config.json"
    files = sorted(root.glob("*.safetensors"))
    if not cfg_file.is_file() or not files:
        raise CheckpointUnavailable(f"{root} lacks config.json or *.safetensors files")
    cfg = OcrConfig.from_hf_config(cfg_file)
    with torch.device("meta"):
        model = OcrModel(cfg)
    load_weights(model, _SafetensorsFiles(files), device=device, dtype=dtype)
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:  # a tensor outside the state dict (a non-persistent buffer) was built on meta
        raise RuntimeError(f"tensors left on the meta device after loading: {', '.join(unfilled)}")
    return model.eval()
