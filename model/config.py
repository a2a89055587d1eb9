"""Model configuration: frozen dataclasses mirroring the official DeepSeek-OCR ``config.json``.

The official checkpoint hard-codes the vision dimensions (SAM-ViT-B, CLIP-L) and keeps the
language-model hyper-parameters at the top level of ``config.json``. ``OcrConfig.from_hf_config``
reads exactly those keys (defaults = DeepseekV2Config defaults), through transformers'
``PretrainedConfig`` as the model authors' code does; ``OcrConfig.tiny()`` is a random-weight model
of the *same architecture* with small widths for CPU tests.

The model side's vocabulary lives here too: ``StrEnum`` (str-valued enums, the base of every named
choice in the project), ``ModelName`` (the model sources) and ``DType``.

NOTE: the SAM patch size (16) and the two stride-2 convs are part of the architecture in every
config, so one view of side S always yields (S/64)^2 vision tokens; preprocessing and token
counts therefore do not depend on which config is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any


class StrEnum(str, Enum):
    """A str-valued enum: each member is its value wherever a string goes (comparisons, f-strings,
    json, Arrow/Parquet columns), so stored data keeps plain strings. Member names equal their
    values (tests/pipeline/test_config.py checks it), because OmegaConf looks an Enum-typed config
    field up by name: `model.dtype=float32` on the command line or in YAML is the member itself."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class ModelName(StrEnum):
    """Where the weights come from (`model.runner.load_model`)."""

    deepseek_ocr = "deepseek_ocr"  # the official checkpoint (hub id or local directory)
    tiny_random = "tiny_random"  # same architecture, tiny widths, synthetic weights (tests, offline)
    full_random = "full_random"  # full size, random weights drawn on the device (GPU benchmarks)

    @property
    def default_dtype(self) -> DType:
        """The dtype a run of this model gets when none is named: the tiny model runs on CPU."""
        return DType.float32 if self is ModelName.tiny_random else DType.bfloat16


class DType(StrEnum):
    """Parameter and activation dtype of the model (`torch.<name>`)."""

    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class ConfigError(ValueError):
    """A configuration value is missing, unsupported or inconsistent."""


@dataclass(frozen=True)
class SamConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    img_size: int = 1024  # size the abs/rel position tables were trained for (64x64 grid)
    patch_size: int = 16
    neck_dim: int = 256
    downsample_channels: tuple[int, int] = (512, 1024)  # net_2, net_3 outputs; net_3 feeds CLIP
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"sam.width {self.width} not divisible by sam.heads {self.heads}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"sam.global_attn_indexes {bad} outside 0..{self.depth - 1}")


@dataclass(frozen=True)
class ClipConfig:
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    image_size: int = 224  # position table is (224/14)^2 + 1 = 257 rows
    patch_size: int = 14
    eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"clip.width {self.width} not divisible by clip.heads {self.heads}")


@dataclass(frozen=True)
class DecoderConfig:
    """DeepSeek-V2 decoder as used by DeepSeek-OCR: plain MHA (no MLA), dense layer 0, MoE after."""

    vocab_size: int = 129280
    hidden_size: int = 1280
    intermediate_size: int = 6848  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 896
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10
    n_routed_experts: int = 64
    n_shared_experts: int = 2  # implemented as ONE SwiGLU of width n_shared * moe_intermediate
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False  # official: top-6 softmax weights are NOT renormalised
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be divisible by num_attention_heads")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError("DeepSeek-OCR uses plain MHA: num_key_value_heads must equal heads")
        if self.scoring_func != "softmax" or self.topk_method != "greedy":
            raise ConfigError(
                f"unsupported router {self.scoring_func}/{self.topk_method} (need softmax/greedy)"
            )
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError("num_experts_per_tok must be in 1..n_routed_experts")


@dataclass(frozen=True)
class OcrConfig:
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    projector_input_dim: int = 2048  # concat(CLIP, SAM) features
    image_token_id: int = 128815
    name: str = "deepseek-ocr"

    def __post_init__(self) -> None:
        if self.sam.downsample_channels[-1] != self.clip.width:
            raise ConfigError("SAM net_3 channels must equal the CLIP width (CLIP eats SAM features)")
        if self.projector_input_dim != 2 * self.clip.width:
            raise ConfigError("projector_input_dim must be clip.width + sam net_3 channels")

    @classmethod
    def official(cls) -> OcrConfig:
        return cls()

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any] | str | Path) -> OcrConfig:
        """Build from an official ``config.json`` (its path, or its content as a dict); LM keys are
        read at top level. Either form goes through ``transformers.PretrainedConfig`` (the reader
        the model authors' code uses), so a file and its dict give the same config."""
        cfg = read_hf_config(cfg)
        if cfg.get("use_mla"):
            raise ConfigError("config.json has use_mla=true: DeepSeek-OCR uses plain MHA")
        names = DecoderConfig.__dataclass_fields__.keys()
        dec: dict[str, Any] = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        if "num_key_value_heads" not in dec and "num_attention_heads" in dec:
            dec["num_key_value_heads"] = dec["num_attention_heads"]
        proj: dict[str, Any] = cfg.get("projector_config") or {}
        # The official file leaves the vision dims to the code (SAM-B, CLIP-L); a non-official
        # checkpoint (e.g. the tiny test model) states them under "pagemill_vision".
        vis: dict[str, Any] = cfg.get("pagemill_vision") or {}

        def tup(d: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        return cls(
            sam=SamConfig(**tup(vis["sam"])) if "sam" in vis else SamConfig(),
            clip=ClipConfig(**tup(vis["clip"])) if "clip" in vis else ClipConfig(),
            decoder=DecoderConfig(**dec),
            projector_input_dim=proj.get("input_dim", 2048),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """config.json content for this config: LM keys at the top level (as the official file),
        plus "pagemill_vision" when the vision dims are not the official ones."""
        from dataclasses import asdict

        out: dict[str, Any] = {
            "model_type": "deepseek_vl_v2",
            "use_mla": False,
            **asdict(self.decoder),
            "projector_config": {
                "input_dim": self.projector_input_dim,
                "n_embed": self.decoder.hidden_size,
                "projector_type": "linear",
            },
        }
        if (self.sam, self.clip) != (SamConfig(), ClipConfig()):
            out["pagemill_vision"] = {"sam": asdict(self.sam), "clip": asdict(self.clip)}
        return out

    @classmethod
    def tiny(cls) -> OcrConfig:
        """Same architecture, tiny widths: the random-weight model for CPU tests and offline runs."""
        return cls(
            sam=SamConfig(
                width=64,
                depth=2,
                heads=2,
                mlp_dim=128,
                global_attn_indexes=(1,),
                neck_dim=32,
                downsample_channels=(64, 64),
            ),
            clip=ClipConfig(width=64, layers=2, heads=2, mlp_dim=128),
            decoder=DecoderConfig(
                hidden_size=64,
                intermediate_size=128,
                moe_intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                n_routed_experts=8,
                n_shared_experts=1,
                num_experts_per_tok=2,
            ),
            projector_input_dim=128,
            name="tiny-random",
        )

    def with_layers(self, n: int) -> OcrConfig:
        """Same config with `n` decoder layers (the parity goldens use a 2-layer LM)."""
        return replace(self, decoder=replace(self.decoder, num_hidden_layers=n))


def read_hf_config(cfg: dict[str, Any] | str | Path) -> dict[str, Any]:
    """``config.json`` (a path to the file or to its directory, or its content) as transformers
    reads it: ``PretrainedConfig.from_json_file`` / ``from_dict``, then ``to_dict()``. Keys of a
    model type transformers does not know (deepseek_vl_v2) are kept as they are."""
    import warnings

    from transformers import PretrainedConfig

    file = None
    if not isinstance(cfg, dict):
        p = Path(cfg)
        file = p / "config.json" if p.is_dir() else p
        if not file.is_file():
            raise ConfigError(f"no config.json at {file}")
    with warnings.catch_warnings():
        # transformers 5 deprecates the `rope_scaling` key the official file has (null); nothing
        # here reads it, and the warning would land in every OCR actor's log
        warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
        if isinstance(cfg, dict):
            hf = PretrainedConfig.from_dict(cfg)
        else:
            hf = PretrainedConfig.from_json_file(str(file))
    return hf.to_dict()
