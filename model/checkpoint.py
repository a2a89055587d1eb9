"""Official DeepSeek-OCR checkpoint <-> our modules: a rename table, strict loading, random init.

Decisions:
- Renaming is data (vLLM `WeightsMapper` style): `PREFIX_RULES` maps official prefixes to ours,
  `STACKED_RULES` maps the per-expert official keys onto slices of the stacked expert params.
  `official_key_map` enumerates *our* state dict and derives the official key(s) of every slot,
  so the map is complete by construction and its coverage (each element filled once) is checked.
- Loading is strict: every checkpoint key maps to exactly one slot of the right shape and every
  slot is filled, else `CheckpointMismatch` names the missing / unexpected / mis-shaped keys.
  Everything is validated before a single tensor is read.
- The 3.3B model is built with its parameters on the meta device (buffers stay real) and
  materialised with `load_state_dict(assign=True)`, reading safetensors lazily one tensor at a
  time: the weights are never allocated twice.
- `init_random` feeds the same loader from `model.synth` (the parity weight rule), so the offline
  `tiny_random` model and the parity tests share one code path with real checkpoints.
- `random_model` / `init_random_fast` (the `full_random` model of GPU benchmarks) follow the same
  rule but draw with one generator on the target device: the parity *values* need a CPU generator
  per key, far too slow for 3.3B parameters. The model is built on the device in its dtype, so no
  float32 CPU copy is ever made.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import Tensor, nn

from model.config import OcrConfig
from model.synth import scale_by_rule, synth_tensor

if TYPE_CHECKING:
    from model.ocr import OcrModel

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


class CheckpointUnavailable(RuntimeError):
    """The weights could not be found locally nor fetched from the hub."""


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


def load_official_state_dict(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    strict: bool = True,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> set[str]:
    """Load official-named `tensors` into `model`; returns the set of official keys loaded.

    Params on the meta device are materialised (assign) on `device` (default: the tensor's);
    others are copied in place. `dtype` defaults to each parameter's dtype. With strict=False,
    missing and unexpected keys are skipped; mis-shaped keys always raise.
    """
    kmap = official_key_map(model)
    missing = sorted(k for k in kmap if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in kmap)
    misshaped = [
        f"{k} (checkpoint {list(_shape_of(tensors, k))} vs model {list(kmap[k].shape)})"
        for k in sorted(k for k in kmap if k in tensors)
        if _shape_of(tensors, k) != kmap[k].shape
    ]
    if misshaped or (strict and (missing or unexpected)):
        raise CheckpointMismatch(missing if strict else [], unexpected if strict else [], misshaped)

    by_param: dict[str, list[tuple[str, Slot]]] = {}
    for key, slot in kmap.items():
        if key in tensors:
            by_param.setdefault(slot.param, []).append((key, slot))
    current = model.state_dict(keep_vars=True)
    assign = any(t.is_meta for t in current.values())
    state: dict[str, Tensor] = {}
    for name, slots in by_param.items():
        p = current[name]
        tdtype = dtype or p.dtype
        if slots[0][1].index == ():  # whole tensor
            key = slots[0][0]
            src = tensors[key]
            state[name] = src.to(device=device or (src.device if p.is_meta else p.device), dtype=tdtype)
            continue
        # stacked experts: fill a fresh buffer slice by slice (zeros where non-strict left a gap)
        first = tensors[slots[0][0]]
        dev = device or (first.device if p.is_meta else p.device)
        full = len(slots) * math.prod(slots[0][1].shape) == math.prod(p.shape)
        buf = (torch.empty if full else torch.zeros)(p.shape, dtype=tdtype, device=dev)
        for key, slot in slots:
            buf[slot.index].copy_(first if key == slots[0][0] else tensors[key])
        state[name] = buf
    model.load_state_dict(state, strict=False, assign=assign)
    return {k for k, s in kmap.items() if s.param in state}


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
    """Fill every parameter with `synth_tensor(official key, official shape, seed)` (in place, or
    materialising meta params on CPU); returns the official keys loaded."""
    shapes = {k: s.shape for k, s in official_key_map(model).items()}
    return load_official_state_dict(model, _SynthTensors(shapes, seed), strict=True)


@torch.no_grad()
def init_random_fast(model: nn.Module, seed: int = 0) -> set[str]:
    """Fill every parameter in place by the parity rule (`model.synth.scale_by_rule`), drawing from
    one generator on the parameters' device (seconds for the full model on a GPU; the numbers differ
    from `init_random`'s). Returns the official keys filled."""
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
    `dtype`, filled by `init_random_fast`, in eval mode: the `full_random` benchmark model."""
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


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their *parameters* on the meta device (no memory, no init cost)
    while buffers stay real - so non-persistent buffers need no re-initialisation after loading."""
    register = nn.Module.register_parameter

    def register_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = register_meta  # pyright: ignore[reportAttributeAccessIssue] - patching a method on purpose
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # pyright: ignore[reportAttributeAccessIssue] - restoring it


_CHECKPOINT_FILES = ["config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _local_dir(path_or_hub_id: str | Path) -> Path | None:
    """The local directory named by `path_or_hub_id`, None for a hub id; a missing path raises."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if str(path_or_hub_id).startswith(("/", ".", "~")) or path.exists():
        raise CheckpointUnavailable(
            f"checkpoint directory {str(path)!r} does not exist. Point it at a copy of "
            "deepseek-ai/DeepSeek-OCR, or run offline with the random-weight model: model=tiny_random"
        )
    return None


def _hub_download(hub_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as e:  # any hub/network/offline failure gets the same advice
        raise CheckpointUnavailable(
            f"could not fetch {hub_id!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Use a local checkpoint directory, or run "
            "offline with the random-weight model: model=tiny_random"
        ) from e


def resolve_source(path_or_hub_id: str | Path) -> Path:
    """Checkpoint directory of `path_or_hub_id`: a local directory as is, a hub id downloaded."""
    local = _local_dir(path_or_hub_id)
    return local if local is not None else _hub_download(str(path_or_hub_id), _CHECKPOINT_FILES)


def resolve_config_json(path_or_hub_id: str | Path) -> Path:
    """Path of the checkpoint's config.json; fetches only that file from the hub (a cheap probe that
    the weights are reachable before a job starts). Raises CheckpointUnavailable."""
    local = _local_dir(path_or_hub_id)
    root = local if local is not None else _hub_download(str(path_or_hub_id), ["config.json"])
    if not (root / "config.json").is_file():
        raise CheckpointUnavailable(f"{root} has no config.json")
    return root / "config.json"


def load_checkpoint(
    path_or_hub_id: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> OcrModel:
    """OcrModel from a local dir or hub id holding `config.json` + `*.safetensors` (strict)."""
    from model.ocr import OcrModel  # lazy: model.ocr imports the whole vision stack

    root = resolve_source(path_or_hub_id)
    cfg_file = root / "config.json"
    files = sorted(root.glob("*.safetensors"))
    if not cfg_file.is_file() or not files:
        raise CheckpointUnavailable(f"{root} lacks config.json or *.safetensors files")
    cfg = OcrConfig.from_hf_config(cfg_file)
    with params_on_meta():
        model = OcrModel(cfg)
    load_official_state_dict(model, _SafetensorsFiles(files), strict=True, device=device, dtype=dtype)
    return model.to(device).eval()  # moves the (real) buffers; params are already there
