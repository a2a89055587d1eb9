"""Driver-side checks and sizing before the Ray Data job starts: are the weights reachable, how
many OCR actors, how many KV rows each, how many concurrent calls per actor."""

from __future__ import annotations

from typing import Any

from model.config import ModelName
from model.engine_config import PAGED_AUTO_ROWS, EngineConfig
from pipeline.config import PipelineConfig


class ModelUnavailable(RuntimeError):
    """The configured model weights cannot be found or fetched."""


def check_model_available(cfg: PipelineConfig) -> None:
    """Fail fast, on the driver, when the real weights cannot be reached (cheap: config.json only)."""
    if cfg.model.name != ModelName.deepseek_ocr:
        return
    from model.hub import CheckpointUnavailable, resolve_config_json

    try:
        resolve_config_json(cfg.model.source)
    except CheckpointUnavailable as e:  # its message already names the offline option
        raise ModelUnavailable(f"cannot load the DeepSeek-OCR weights: {e}") from None
    except Exception as e:  # anything else (auth, disk): same advice
        raise ModelUnavailable(
            f"cannot load the DeepSeek-OCR weights from {cfg.model.source!r} ({type(e).__name__}: {e}). "
            "Point model.source at a local copy of deepseek-ai/DeepSeek-OCR, or run offline with the "
            "tiny random-weight model: model=tiny_random"
        ) from None


def cpu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


# CPUs left free while the render pool starts: for the writer pool and for discovery's listing
# task and probe actors, which run beside the starting pool
START_HEADROOM_CPUS = 2.0


def render_pool(cfg: PipelineConfig, n_ocr: int) -> tuple[int, int]:
    """(min, max) render actors. The max: one per CPU left beside the OCR actors (as many as
    could ever be busy). The min, started with the dataset (while discovery and planning run):
    all but `START_HEADROOM_CPUS` of them. Ray Data's autoscaler adds actors only once rows
    arrive, one start-up after another, so a pool that began at one actor rendered a trickle for
    the first ~30 s of a run (BENCHMARKS.md, issue 14). Starting only half of them measured no
    faster start (the last render actor was up later, discovery no sooner)."""
    cpus = cpu_count()
    hi = max(1, cpus - n_ocr)
    fit = int((cpus - n_ocr - START_HEADROOM_CPUS) / max(cfg.ray.render_cpus, 1e-3))
    return max(1, min(hi, fit)), hi


def ocr_calls_per_actor(cfg: PipelineConfig, on_gpu: bool) -> int:
    """Batches an OCR actor works on at once: enough to fill its KV rows and keep the engine's
    look-ahead (`EngineConfig.vision_ahead`, pages encoded while decode runs) fed twice over.

    NOTE: Ray Data gives each actor task one bundle (~`ocr_batch_size` rows) and runs one task
    per actor at a time unless the actor's concurrency is raised; with the default, an async
    OcrStage would only ever hold one batch (16 pages) on the device. Each concurrent call
    submits its pages to the same engine (`PageOcr.submit`), so they share one running batch.
    The pages queued beyond the rows and the look-ahead hold host memory only (PNG and uint8
    views, ~10 MB a Gundam page), so the spare is kept small."""
    bs = cfg.ray.ocr_batch_size
    rows = ocr_rows(cfg, on_gpu) or PAGED_AUTO_ROWS  # paged engine, max_batch=None: its row slots
    spare = 2 * max(EngineConfig.vision_ahead, bs) if on_gpu else rows
    return max(1, -(-(rows + spare) // bs))


def ocr_rows(cfg: PipelineConfig, on_gpu: bool) -> int | None:
    """KV rows of an OCR actor's engine: `generation.max_batch` (None on a GPU: fitted to its free
    memory once the model is loaded); on CPU at most one Ray batch (`ray.ocr_batch_size`)."""
    mb, bs = cfg.generation.max_batch, cfg.ray.ocr_batch_size
    return mb if on_gpu else min(mb or bs, bs)


def ocr_resources(cfg: PipelineConfig, on_gpu: bool) -> dict[str, Any]:
    """Ray resources of one OCR actor: one GPU (or one unit of `ray.ocr_resource`) each."""
    if not on_gpu:
        return {"num_gpus": 0}
    acc = {"accelerator_type": cfg.ray.accelerator_type} if cfg.ray.accelerator_type else {}
    if cfg.ray.ocr_resource:
        return {"num_gpus": 0, "resources": {cfg.ray.ocr_resource: 1}, **acc}
    return {"num_gpus": 1, **acc}
