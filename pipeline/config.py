"""Pipeline configuration: the structured-config schema behind `conf/` (Hydra).

One dataclass per component; defaults are the reference behaviour (official PDF script: 144 dpi,
Gundam mode with at most 6 tiles, n-gram ban 20/50 with the `<td>` whitelist). Validation lives in
`__post_init__`, which OmegaConf runs when the composed config is turned into objects, so a bad
value stops the job before any Ray work starts with one message naming the key and what is allowed.
This module has no Hydra import: `pipeline/run.py` registers the schema in the ConfigStore.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from model.engine import EngineConfig
from model.preprocess import MODES
from model.tokenizer import PROMPTS
from pipeline.render import DEFAULT_RENDER, RenderOptions

MODEL_NAMES = ("deepseek_ocr", "tiny_random", "full_random")
FORCE_LENGTHS = ("none", "text_layer")
DTYPES = ("bfloat16", "float16", "float32")
PROMPT_NAMES = tuple(PROMPTS)  # the model side owns the prompt texts

# The engine's knobs have one home, model.engine.EngineConfig; GenerationConfig re-exposes the
# ones a job sets and takes their defaults from there (tests/pipeline/test_config.py checks it).
_ENGINE = EngineConfig()
_RENDER = DEFAULT_RENDER  # the render bounds' defaults live in RenderOptions (benchmarks, inspect)


def _bound(value: int | None) -> int:
    """A RenderOptions pixel bound as a config default (the job always bounds its renders)."""
    assert value is not None, "RenderOptions' default bounds must be set"
    return value


# Version of the code that shapes a row (grounding parser, post-processing, prompts, random-weight
# synthesis): bump it when a change alters output so config_hash (and the ledger) sees new work.
OUTPUT_CODE_VERSION = 1


class ConfigValueError(ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigValueError(f"invalid config value {key}={value!r}: allowed {allowed}")


@dataclass
class InputConfig:
    # Directory, glob, text file listing URIs, or any fsspec URI (s3://bucket/prefix/, ...).
    # The default is the embedded sample set so `make run` works on a fresh machine.
    uri: str = "tests/data"
    suffixes: list[str] = field(default_factory=lambda: [".pdf"])
    # sha256 of the file bytes, or its file name -> user password (for encrypted PDFs). Set it in a
    # YAML experiment, or keep the secrets in `passwords_file` (lines `key<TAB>password`, any fsspec
    # URI): Hydra's command-line grammar cannot add dict keys that contain dots or start with digits.
    passwords: dict[str, str] = field(default_factory=dict)
    passwords_file: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    # discovery skips reading and hashing an input whose (uri, size, etag or mtime) is in the
    # output's stat cache (<output>/_cache/stat/); true: read and hash every input again
    rehash: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.uri), "input.uri", self.uri, "a directory, glob, list file or fsspec URI")


@dataclass
class OutputConfig:
    uri: str = "out/run"
    include_images: bool = False  # PNG bytes of each rendered page, for image-text pairs
    write_figures: bool = True  # crops of `image` blocks -> <uri>/figures/ (markdown refs either way)
    # Parquet sizing: a writer batch is split into files of at most ~target_file_mb, and each file
    # into row groups of at most ~row_group_mb (and row_group_rows rows) so streaming readers
    # (datasets streaming, Ray Data) fetch small units. Small rows: a file holds one writer batch.
    target_file_mb: float = 256.0
    row_group_mb: float = 32.0
    row_group_rows: int = 1000
    storage_options: dict[str, Any] = field(default_factory=dict)
    # one run at a time per output root (pipeline/lease.py): a lease whose heartbeat (refreshed
    # every lease_timeout_s / 6) is older than this may be taken over by another run
    lease_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _check(bool(self.uri), "output.uri", self.uri, "a directory or fsspec URI")
        _check(self.lease_timeout_s > 0, "output.lease_timeout_s", self.lease_timeout_s, "> 0 (seconds)")
        _check(self.target_file_mb > 0, "output.target_file_mb", self.target_file_mb, "> 0 (MB)")
        _check(
            0 < self.row_group_mb <= self.target_file_mb,
            "output.row_group_mb",
            self.row_group_mb,
            "> 0 and <= output.target_file_mb (MB)",
        )
        _check(self.row_group_rows >= 1, "output.row_group_rows", self.row_group_rows, ">= 1")


@dataclass
class ModelConfig:
    name: str = "deepseek_ocr"
    # Hugging Face hub id or local directory with config.json + *.safetensors (+ tokenizer.json).
    source: str = "deepseek-ai/DeepSeek-OCR"
    dtype: str = "bfloat16"
    seed: int = 0  # random-weight models only (tiny_random, full_random)
    # not a setting: the driver resolves it at start (pipeline.provenance) to the hub commit sha,
    # local-<digest>, "" for random weights; part of config_hash and model_id
    revision: str = ""
    # auto: on a cluster one GPU per OCR actor (waiting for GPU nodes), locally GPUs if present;
    # cpu: run the model on CPU on purpose; cuda: require GPUs locally too
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(self.name in MODEL_NAMES, "model.name", self.name, " | ".join(MODEL_NAMES))
        _check(self.dtype in DTYPES, "model.dtype", self.dtype, " | ".join(DTYPES))
        _check(self.device in ("auto", "cpu", "cuda"), "model.device", self.device, "auto | cpu | cuda")
        if self.name == "deepseek_ocr":
            _check(bool(self.source), "model.source", self.source, "a hub id or local directory")


@dataclass
class ModeConfig:
    name: str = "gundam"
    max_crops: int = MODES["gundam"].max_crops  # official PDF pipeline; the HF infer() default is 9

    def __post_init__(self) -> None:
        _check(self.name in MODES, "mode", self.name, " | ".join(MODES))
        _check(2 <= self.max_crops <= 9, "mode.max_crops", self.max_crops, "2..9")


@dataclass
class RenderConfig:
    dpi: int = int(_RENDER.dpi)
    timeout_s: float = _RENDER.timeout_s  # per render task (one page range); the child is killed after it
    pages_per_task: int = 16  # long documents are split into ranges of this many pages
    max_pages: int = 10_000  # pages beyond this get render_error rows instead of being rendered
    max_side_px: int = _bound(_RENDER.max_side_px)  # zoom is lowered per page so the longer side fits
    max_pixels: int = _bound(_RENDER.max_pixels)
    recycle_after: int = 50  # render-worker child is replaced after this many tasks (MuPDF leaks)
    max_failures: int = _RENDER.max_failures  # renderer crashes/timeouts in one task before quarantine

    def __post_init__(self) -> None:
        _check(36 <= self.dpi <= 600, "render.dpi", self.dpi, "an integer in 36..600")
        _check(self.timeout_s > 0, "render.timeout_s", self.timeout_s, "> 0")
        _check(self.pages_per_task >= 1, "render.pages_per_task", self.pages_per_task, ">= 1")
        _check(self.max_pages >= 1, "render.max_pages", self.max_pages, ">= 1")
        _check(self.max_side_px >= 64, "render.max_side_px", self.max_side_px, ">= 64")
        _check(self.max_pixels >= 4096, "render.max_pixels", self.max_pixels, ">= 4096")
        _check(self.max_failures >= 1, "render.max_failures", self.max_failures, ">= 1")

    def options(self) -> RenderOptions:
        """The renderer's bounds for this config (what the job, the benchmarks and inspect pass)."""
        return RenderOptions(
            dpi=float(self.dpi),
            max_pixels=self.max_pixels,
            max_side_px=self.max_side_px,
            timeout_s=self.timeout_s,
            max_failures=self.max_failures,
        )


@dataclass
class GenerationConfig:
    prompt: str = "document"  # key of model.tokenizer.PROMPTS
    max_new_tokens: int = _ENGINE.max_new_tokens  # also capped by max_model_len - prompt length
    max_model_len: int = _ENGINE.max_model_len
    ngram_size: int = _ENGINE.ngram_size  # official PDF script; 0 disables the ban
    ngram_window: int = _ENGINE.ngram_window
    loop_min_span: int = _ENGINE.loop_min_span  # stop a page whose tail repeats exactly this long
    # pages decoded together per OCR actor (KV rows; ~60 KiB/token each); None: as many as fit the
    # GPU (on CPU: one Ray batch)
    max_batch: int | None = None
    # A page that ends without EOS (loop or length) is retried once: "ngram" = with a stronger
    # no-repeat ban (smaller n, wider window); "none" = keep the first result.
    fallback: str = "ngram"
    fallback_ngram_size: int = 12
    fallback_ngram_window: int = 200
    # Benchmarks only: "text_layer" forces every page to generate exactly the length
    # `pipeline.forced.forced_length` gives (its text layer's tokens + 20 per text block, or 1,000
    # without a text layer; capped by max_model_len - prompt, and by max_new_tokens). Forced pages
    # end `length` (status truncated) by design and get no fallback pass. "none": normal decoding.
    force_length: str = "none"

    def __post_init__(self) -> None:
        _check(self.prompt in PROMPT_NAMES, "generation.prompt", self.prompt, " | ".join(PROMPT_NAMES))
        _check(self.max_new_tokens >= 1, "generation.max_new_tokens", self.max_new_tokens, ">= 1")
        _check(
            1024 <= self.max_model_len <= 8192,
            "generation.max_model_len",
            self.max_model_len,
            "1024..8192",
        )
        _check(self.ngram_size >= 0, "generation.ngram_size", self.ngram_size, ">= 0")
        _check(
            self.ngram_window >= self.ngram_size,
            "generation.ngram_window",
            self.ngram_window,
            ">= ngram_size",
        )
        _check(self.loop_min_span >= 8, "generation.loop_min_span", self.loop_min_span, ">= 8")
        _check(
            self.max_batch is None or self.max_batch >= 1,
            "generation.max_batch",
            self.max_batch,
            ">= 1, or null: as many as fit the GPU",
        )
        _check(self.fallback in ("none", "ngram"), "generation.fallback", self.fallback, "none | ngram")
        _check(
            2 <= self.fallback_ngram_size <= self.fallback_ngram_window,
            "generation.fallback_ngram_size",
            self.fallback_ngram_size,
            "2..fallback_ngram_window",
        )
        _check(
            self.force_length in FORCE_LENGTHS,
            "generation.force_length",
            self.force_length,
            " | ".join(FORCE_LENGTHS),
        )


@dataclass
class RayConfig:
    address: str = ""  # "" = start an embedded local Ray; "auto" = join the running cluster
    ocr_actors: int = 0  # 0 = one per GPU (or 1 without GPUs)
    ocr_batch_size: int = 16  # pages handed to an OCR actor at once
    ocr_max_retries: int = 3  # a batch whose actor dies is rerun on a fresh actor this many times
    ocr_resource: str = ""  # "" = one OCR actor per GPU; else per unit of this custom resource
    write_batch_size: int = 64  # rows per committed Parquet part (the unit a crash can lose)
    render_cpus: float = 1.0
    namespace: str = "pagemill"
    # -- ux: console and cluster behaviour
    verbose: bool = False  # Ray's own INFO/WARNING logs on the console (off: only ours, errors, summary)
    log_to_driver: bool | None = None  # worker logs on the driver; None: on when joined to a cluster
    # OCR actor pool [min, max] (Ray Data autoscales between them); empty: one actor per GPU seen
    ocr_concurrency: list[int] = field(default_factory=list)
    accelerator_type: str = ""  # e.g. H100, A100: OCR actors only on nodes of this type
    gpu_wait_s: float = 900.0  # how long to wait for the first GPU node (autoscaling) before failing
    shared_fs: bool = (
        False  # local paths are a filesystem every node mounts (NFS, Lustre): allowed on a cluster
    )

    def __post_init__(self) -> None:
        _check(self.ocr_actors >= 0, "ray.ocr_actors", self.ocr_actors, ">= 0")
        _check(self.ocr_batch_size >= 1, "ray.ocr_batch_size", self.ocr_batch_size, ">= 1")
        _check(self.write_batch_size >= 1, "ray.write_batch_size", self.write_batch_size, ">= 1")
        c = self.ocr_concurrency
        _check(
            not c or (len(c) == 2 and 1 <= c[0] <= c[1]),
            "ray.ocr_concurrency",
            c,
            "[] or [min, max], 1 <= min <= max",
        )
        _check(self.gpu_wait_s >= 0, "ray.gpu_wait_s", self.gpu_wait_s, ">= 0 (seconds)")


@dataclass
class PipelineConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    progress: bool = True
    force: bool = False  # redo every row of this configuration (default: skip rows the ledger has)
    # a document whose rows could not be produced in this many runs gets `quarantined` rows
    # (status ocr_error) instead of another attempt; delete <output>/_failures/ to retry it
    quarantine_after: int = 2

    def output_affecting(self) -> dict[str, Any]:
        """The settings that change what a page's row contains (not where or how fast)."""
        return {
            "model": {
                "name": self.model.name,
                "source": self.model.source,
                "seed": self.model.seed,
                "dtype": self.model.dtype,
            },
            "mode": asdict(self.mode),
            "dpi": self.render.dpi,
            "max_side_px": self.render.max_side_px,
            "max_pixels": self.render.max_pixels,
            # max_batch only changes how many pages decode together, not what they produce;
            # force_length only when set, so configurations from before it keep their hash (ledger)
            "generation": {
                k: v
                for k, v in asdict(self.generation).items()
                if k != "max_batch" and not (k == "force_length" and v == "none")
            },
            "include_images": self.output.include_images,
            "model_revision": self.model.revision,
            "code_version": OUTPUT_CODE_VERSION,
        }

    def config_hash(self) -> str:
        blob = json.dumps(self.output_affecting(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
