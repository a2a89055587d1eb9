"""The resolution modes (DeepSeek-OCR's Tiny ... Gundam-M), without torch or Pillow: the job's
config and its Ray workers import these, not `model.preprocess` (which re-exports every name)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from model.config import StrEnum

PATCHES_PER_QUERY = 64  # SAM patch 16 × two stride-2 convs: one view of side S -> (S/64)^2 queries


@dataclass(frozen=True)
class ModeSpec:
    """One resolution mode. ``base_size``: global view side; ``image_size``: tile side."""

    base_size: int
    image_size: int
    crop_mode: bool = False
    min_crops: int = 2
    max_crops: int = 6
    stretch: bool = False  # global view: stretch-resize (aspect lost) instead of aspect-keeping pad

    def __post_init__(self) -> None:
        for side in (self.base_size, self.image_size):
            if side <= 0 or side % PATCHES_PER_QUERY:
                raise ValueError(f"view side {side} must be a positive multiple of 64")
        if self.crop_mode and not 1 <= self.min_crops <= self.max_crops:
            raise ValueError(f"need 1 <= min_crops <= max_crops, got {self.min_crops}/{self.max_crops}")


class ModeName(StrEnum):
    """The resolution modes (keys of ``MODES``; `mode.name` of the job, `--mode` of `python -m model`)."""

    tiny = "tiny"
    small = "small"
    base = "base"
    large = "large"
    gundam = "gundam"
    gundam_m = "gundam_m"


MODES: dict[str, ModeSpec] = {
    ModeName.tiny: ModeSpec(512, 512, stretch=True),
    ModeName.small: ModeSpec(640, 640, stretch=True),
    ModeName.base: ModeSpec(1024, 1024),
    ModeName.large: ModeSpec(1280, 1280),
    # min 2 / max 6 as in the official vLLM PDF pipeline (HF `infer` uses max 9: pass max_crops=9)
    ModeName.gundam: ModeSpec(1024, 640, crop_mode=True, min_crops=2, max_crops=6),
    # paper-only (see module docstring): no-tile threshold is "<= tile size" (1024), not 640
    ModeName.gundam_m: ModeSpec(1280, 1024, crop_mode=True, min_crops=2, max_crops=6),
}
DEFAULT_MODE = ModeName.gundam  # the official PDF pipeline's mode (the job's and the CLI's default)


def get_mode(mode: str | ModeSpec, max_crops: int | None = None) -> ModeSpec:
    """Resolve a mode name (or pass a ModeSpec through); ``max_crops`` overrides crop modes only."""
    if isinstance(mode, ModeSpec):
        spec = mode
    else:
        try:
            spec = MODES[mode]
        except KeyError:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}") from None
    if max_crops is not None and spec.crop_mode:
        spec = replace(spec, max_crops=int(max_crops))
    return spec
