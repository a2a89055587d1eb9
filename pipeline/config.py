"""Pipeline configuration: the structured-config schema behind `conf/` (Hydra).

One dataclass per component; defaults are the reference behaviour (official PDF script: 144 dpi,
Gundam mode with at most 6 tiles, n-gram ban 20/50 with the `<td>` whitelist). Validation lives in
`__post_init__`, which OmegaConf runs when the composed config is turned into objects, so a bad
value stops the job before any Ray work starts with one message naming the key and what is allowed.
This module has no Hydra import: `pipeline/run.py` registers the schema in the ConfigStore.

Named choices are str-valued enums (`model.config.StrEnum`): OmegaConf itself rejects a value that
is not a member, naming the key and the allowed values. The model side owns its names (`ModelName`,
`DType`, `PromptName`, `ModeName`); `Fallback`, `ForceLength` and `Device` are the pipeline's.

`config_hash`: every leaf field says in its metadata whether it changes what a row contains
(`HASH`: it is hashed) or not (`NO_HASH`: where, how fast, how robustly); a field without a decision
makes `config_hash` raise, so a new setting cannot slip past the ledger unnoticed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from model.config import DType, ModelName, StrEnum
from model.engine_config import EngineConfig
from model.hub import OFFICIAL_HUB_ID
from model.modes import DEFAULT_MODE, MODES, ModeName
from model.tokenizer import PromptName
from pipeline.render import DEFAULT_RENDER, RenderOptions

# The engine's knobs have one home, model.engine_config.EngineConfig; GenerationConfig re-exposes the
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
# Version of the hash input's layout (which fields, how they are spelled): bump it when the way
# config_hash is built changes. 2: built from field metadata (1: a hand-written dict).
CONFIG_HASH_VERSION = 2
HASH = {"hash": True}  # the field changes what a page's row contains: part of config_hash
NO_HASH = {"hash": False}  # it does not (where rows go, speed, robustness, secrets)


class Fallback(StrEnum):
    """What a page that ends without EOS gets (`generation.fallback`)."""

    none = "none"  # keep the first result
    ngram = "ngram"  # one more pass with a stronger no-repeat ban


class ViewKind(StrEnum):
    """Where an OCR actor builds page views (`ray.ocr_views`; pipeline/views.py)."""

    threads = "threads"  # threads of the engine's process (the default: measured faster)
    processes = "processes"  # worker processes (measured slower on the H200: pipeline/views.py)
    device = "device"  # threads decode the PNG; the engine builds the views on its device


class ForceLength(StrEnum):
    """`generation.force_length` (benchmarks only)."""

    none = "none"  # normal decoding
    text_layer = "text_layer"  # every page generates exactly `pipeline.forced.forced_length` tokens


class Device(StrEnum):
    """`model.device`: where the model runs."""

    auto = "auto"  # on a cluster one GPU per OCR actor; locally the GPUs if any, else CPU
    cpu = "cpu"  # the model on CPU on purpose
    cuda = "cuda"  # require GPUs


class ConfigValueError(ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigValueError(f"invalid config value {key}={value!r}: allowed {allowed}")


@dataclass
class InputConfig:
    # Directory, glob, text file listing URIs, or any fsspec URI (s3://bucket/prefix/, ...).
    # The default is the embedded sample set so `make run` works on a fresh machine.
    uri: str = field(default="tests/data", metadata=NO_HASH)
    suffixes: list[str] = field(default_factory=lambda: [".pdf"], metadata=NO_HASH)
    # sha256 of the file bytes, or its file name -> user password (for encrypted PDFs). Set it in a
    # YAML experiment, or keep the secrets in `passwords_file` (lines `key<TAB>password`, any fsspec
    # URI): Hydra's command-line grammar cannot add dict keys that contain dots or start with digits.
    passwords: dict[str, str] = field(default_factory=dict, metadata=NO_HASH)
    passwords_file: str = field(default="", metadata=NO_HASH)
    storage_options: dict[str, Any] = field(default_factory=dict, metadata=NO_HASH)
    # discovery skips reading and hashing an input whose (uri, size, etag or mtime) is in the
    # output's stat cache (<output>/_cache/stat/); true: read and hash every input again
    rehash: bool = field(default=False, metadata=NO_HASH)

    def __post_init__(self) -> None:
        _check(bool(self.uri), "input.uri", self.uri, "a directory, glob, list file or fsspec URI")


@dataclass
class OutputConfig:
    uri: str = field(default="out/run", metadata=NO_HASH)
    # PNG bytes of each rendered page, for image-text pairs (a column of the row: hashed)
    include_images: bool = field(default=False, metadata=HASH)
    # crops of `image` blocks -> <uri>/figures/ (the markdown refs are there either way)
    write_figures: bool = field(default=True, metadata=NO_HASH)
    # Parquet sizing: a writer batch is split into files of at most ~target_file_mb, and each file
    # into row groups of at most ~row_group_mb (and row_group_rows rows) so streaming readers
    # (datasets streaming, Ray Data) fetch small units. Small rows: a file holds one writer batch.
    target_file_mb: float = field(default=256.0, metadata=NO_HASH)
    row_group_mb: float = field(default=32.0, metadata=NO_HASH)
    row_group_rows: int = field(default=1000, metadata=NO_HASH)
    storage_options: dict[str, Any] = field(default_factory=dict, metadata=NO_HASH)
    # one run at a time per output root (pipeline/lease.py): a lease whose heartbeat (refreshed
    # every lease_timeout_s / 6) is older than this may be taken over by another run
    lease_timeout_s: float = field(default=600.0, metadata=NO_HASH)
    # "dated" nightly layout (pipeline/dated.py): after the run, a self-contained snapshot of this
    # run's input rows at this URI (same storage_options), linked/copied from the store; "" = none
    snapshot_uri: str = field(default="", metadata=NO_HASH)

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
    name: ModelName = field(default=ModelName.deepseek_ocr, metadata=HASH)
    # Hugging Face hub id or local directory with config.json + *.safetensors (+ tokenizer.json).
    source: str = field(default=OFFICIAL_HUB_ID, metadata=HASH)
    dtype: DType = field(default=DType.bfloat16, metadata=HASH)
    seed: int = field(default=0, metadata=HASH)  # random-weight models only (tiny_random, full_random)
    # not a setting: the driver resolves it at start (pipeline.provenance) to the hub commit sha,
    # local-<digest>, "" for random weights; part of config_hash and model_id
    revision: str = field(default="", metadata=HASH)
    # auto: on a cluster one GPU per OCR actor (waiting for GPU nodes), locally GPUs if present;
    # cpu: run the model on CPU on purpose; cuda: require GPUs locally too
    device: Device = field(default=Device.auto, metadata=NO_HASH)

    def __post_init__(self) -> None:
        if self.name == ModelName.deepseek_ocr:
            _check(bool(self.source), "model.source", self.source, "a hub id or local directory")


@dataclass
class ModeConfig:
    name: ModeName = field(default=DEFAULT_MODE, metadata=HASH)
    # official PDF pipeline; the HF infer() default is 9
    max_crops: int = field(default=MODES[DEFAULT_MODE].max_crops, metadata=HASH)

    def __post_init__(self) -> None:
        _check(2 <= self.max_crops <= 9, "mode.max_crops", self.max_crops, "2..9")


@dataclass
class RenderConfig:
    dpi: int = field(default=int(_RENDER.dpi), metadata=HASH)
    # per render task (one page range); the child is killed after it
    timeout_s: float = field(default=_RENDER.timeout_s, metadata=NO_HASH)
    # long documents are split into ranges of this many pages
    pages_per_task: int = field(default=16, metadata=NO_HASH)
    # pages beyond this get render_error rows instead of being rendered (a bound on work)
    max_pages: int = field(default=10_000, metadata=NO_HASH)
    # zoom is lowered per page so the longer side fits
    max_side_px: int = field(default=_bound(_RENDER.max_side_px), metadata=HASH)
    max_pixels: int = field(default=_bound(_RENDER.max_pixels), metadata=HASH)
    # render-worker child is replaced after this many tasks (MuPDF leaks)
    recycle_after: int = field(default=50, metadata=NO_HASH)
    # renderer crashes/timeouts within one task before its pages are quarantined
    max_failures: int = field(default=_RENDER.max_failures, metadata=NO_HASH)

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
    prompt: PromptName = field(default=PromptName.document, metadata=HASH)  # model.tokenizer.PROMPTS
    # also capped by max_model_len - prompt length
    max_new_tokens: int = field(default=_ENGINE.max_new_tokens, metadata=HASH)
    max_model_len: int = field(default=_ENGINE.max_model_len, metadata=HASH)
    ngram_size: int = field(default=_ENGINE.ngram_size, metadata=HASH)  # official PDF script; 0: no ban
    ngram_window: int = field(default=_ENGINE.ngram_window, metadata=HASH)
    # stop a page whose tail repeats exactly this long
    loop_min_span: int = field(default=_ENGINE.loop_min_span, metadata=HASH)
    # pages decoded together per OCR actor (KV rows; ~60 KiB/token each); None: as many as fit the
    # GPU (on CPU: one Ray batch). How many pages decode together, not what they produce.
    max_batch: int | None = field(default=None, metadata=NO_HASH)
    # A page that ends without EOS (loop or length) is retried once: "ngram" = with a stronger
    # no-repeat ban (smaller n, wider window); "none" = keep the first result.
    fallback: Fallback = field(default=Fallback.ngram, metadata=HASH)
    fallback_ngram_size: int = field(default=12, metadata=HASH)
    fallback_ngram_window: int = field(default=200, metadata=HASH)
    # Benchmarks only: "text_layer" forces every page to generate exactly the length
    # `pipeline.forced.forced_length` gives (its text layer's tokens + 20 per text block, or 1,000
    # without a text layer; capped by max_model_len - prompt, and by max_new_tokens). Forced pages
    # end `length` (status truncated) by design and get no fallback pass. "none": normal decoding.
    force_length: ForceLength = field(default=ForceLength.none, metadata=HASH)

    def __post_init__(self) -> None:
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
        _check(
            2 <= self.fallback_ngram_size <= self.fallback_ngram_window,
            "generation.fallback_ngram_size",
            self.fallback_ngram_size,
            "2..fallback_ngram_window",
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
    ocr_views: ViewKind = ViewKind.threads  # where an OCR actor builds page views (pipeline/views.py)
    ocr_view_workers: int = 0  # view builders per OCR actor; 0: half the node's cores, at most 8
    # GPU OCR actors compile the engine's Triton kernels in a child process while the model loads
    # (model/precompile.py): a cold Triton cache otherwise costs the first pages ~30 s of JIT
    ocr_precompile: bool = True
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
    # embedded local Ray only: the Prometheus port of Ray's metrics agent (0: Ray picks one); on a
    # cluster the port is the cluster's (`ray start --metrics-export-port`)
    metrics_export_port: int = 0

    def __post_init__(self) -> None:
        _check(self.ocr_actors >= 0, "ray.ocr_actors", self.ocr_actors, ">= 0")
        _check(self.ocr_batch_size >= 1, "ray.ocr_batch_size", self.ocr_batch_size, ">= 1")
        _check(self.write_batch_size >= 1, "ray.write_batch_size", self.write_batch_size, ">= 1")
        _check(
            self.ocr_view_workers >= 0,
            "ray.ocr_view_workers",
            self.ocr_view_workers,
            ">= 0 (0: half the node's cores, at most 8)",
        )
        c = self.ocr_concurrency
        _check(
            not c or (len(c) == 2 and 1 <= c[0] <= c[1]),
            "ray.ocr_concurrency",
            c,
            "[] or [min, max], 1 <= min <= max",
        )
        _check(self.gpu_wait_s >= 0, "ray.gpu_wait_s", self.gpu_wait_s, ">= 0 (seconds)")
        _check(
            0 <= self.metrics_export_port <= 65535,
            "ray.metrics_export_port",
            self.metrics_export_port,
            "0 (Ray picks) or a TCP port",
        )


@dataclass
class CostConfig:
    # price of one GPU-hour (USD); > 0: each `_runs/` record gives $ per million pages
    gpu_hour_usd: float = 0.0

    def __post_init__(self) -> None:
        _check(self.gpu_hour_usd >= 0, "cost.gpu_hour_usd", self.gpu_hour_usd, ">= 0 (USD)")


@dataclass
class PipelineConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # only where and how the work runs: no ray.* setting changes a row (the whole group is NO_HASH)
    ray: RayConfig = field(default_factory=RayConfig, metadata=NO_HASH)
    progress: bool = field(default=True, metadata=NO_HASH)
    # redo every row of this configuration (default: skip rows the ledger has)
    force: bool = field(default=False, metadata=NO_HASH)
    # a document whose rows could not be produced in this many runs gets `quarantined` rows
    # (status ocr_error) instead of another attempt; delete <output>/_failures/ to retry it
    quarantine_after: int = field(default=2, metadata=NO_HASH)
    cost: CostConfig = field(default_factory=CostConfig, metadata=NO_HASH)
    # discovery and planning only: print what a run would do (new/changed/done documents and pages,
    # a GPU-hour estimate from `_runs/`); no model, no OCR actor, nothing written
    dry_run: bool = field(default=False, metadata=NO_HASH)
    # a status line in the job log this often; 0: none
    status_interval_s: float = field(default=30.0, metadata=NO_HASH)

    def __post_init__(self) -> None:
        _check(self.status_interval_s >= 0, "status_interval_s", self.status_interval_s, ">= 0 (seconds)")

    def output_affecting(self) -> dict[str, Any]:
        """The settings that change what a page's row contains (not where or how fast), by dotted
        key: every field whose metadata says HASH (`hash_decisions`)."""
        return {key: _plain(value) for key, hashed, value in _decisions(self) if hashed}

    def config_hash(self) -> str:
        """16 hex digits of sha256 over the output-affecting settings, OUTPUT_CODE_VERSION and
        CONFIG_HASH_VERSION. Rows and ledger entries carry it: another hash is another configuration."""
        blob = {
            "config_hash_version": CONFIG_HASH_VERSION,
            "code_version": OUTPUT_CODE_VERSION,
            "settings": self.output_affecting(),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def hash_decisions(cfg: Any = None) -> dict[str, bool]:
    """Every setting's dotted key -> whether config_hash covers it (default: a PipelineConfig())."""
    return {key: hashed for key, hashed, _ in _decisions(cfg if cfg is not None else PipelineConfig())}


def _decisions(obj: Any, prefix: str = "", inherited: bool | None = None) -> list[tuple[str, bool, Any]]:
    """(dotted key, hashed?, value) of each leaf field of the config dataclass `obj`. A field's own
    metadata decides; without one, the decision of the config it sits in (e.g. all of `ray`); a leaf
    with neither is a programming error, raised here so no setting escapes the hash unnoticed."""
    out: list[tuple[str, bool, Any]] = []
    for f in fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        decision = f.metadata.get("hash", inherited)
        if is_dataclass(value) and not isinstance(value, type):
            out += _decisions(value, f"{key}.", decision)
        elif decision is None:
            raise TypeError(
                f"pipeline.config: {key} has no config_hash decision; give the field "
                "metadata=HASH (it changes what a row contains) or metadata=NO_HASH"
            )
        else:
            out.append((key, bool(decision), value))
    return out


def _plain(value: Any) -> Any:
    """JSON-ready form of a setting: enum members by value (json would too; explicit is stable)."""
    return value.value if isinstance(value, Enum) else value
