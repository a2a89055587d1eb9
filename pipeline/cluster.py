"""Where the job runs: cluster checks and the OCR pool's size and resources.

On a cluster the job follows Ray's conventions: the OCR pool always asks for one GPU per actor
(or one unit of `ray.ocr_resource`, optionally of `ray.accelerator_type`) unless `model.device=cpu`
is said, and waits, bounded by `ray.gpu_wait_s`, for such nodes to join (an autoscaling GPU group
at zero) instead of quietly running the model on CPU. Embedded local Ray has no autoscaler: there
the model runs on the machine's GPUs if it has any, else on its CPU.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from pipeline.config import ConfigValueError, Device, PipelineConfig

log = logging.getLogger("pagemill")


class NoGpuError(RuntimeError):
    """The OCR pool's GPUs (or custom resource) never appeared within `ray.gpu_wait_s`."""


def cluster_address(cfg: PipelineConfig) -> str:
    """Where Ray is: `ray.address`, else RAY_ADDRESS (set by `ray job submit` for the driver and by
    users), else "" = start an embedded local Ray ("local" also means embedded)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    return "" if address == "local" else address


def connected(cfg: PipelineConfig) -> bool:
    """Joined to a running cluster (by address, or a Ray started by the caller with several nodes)."""
    return bool(cluster_address(cfg)) or len(alive_nodes()) > 1


def is_local_uri(uri: str) -> bool:
    return "://" not in uri or uri.startswith(("file://", "local://"))


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_paths(cfg: PipelineConfig) -> None:
    """On a cluster of more than one node a local path would scatter outputs over node disks (and
    read inputs only some nodes have): a config error before any work."""
    if cfg.ray.shared_fs or len(alive_nodes()) <= 1:
        return
    for key, uri in (("input.uri", cfg.input.uri), ("output.uri", cfg.output.uri)):
        if is_local_uri(uri):
            raise ConfigValueError(
                f"invalid config value {key}={uri!r}: this Ray cluster has {len(alive_nodes())} nodes, so "
                f"{key} must be shared storage every node reaches (s3://, gs://, abfs://, … any fsspec URI), "
                f"or set ray.shared_fs=true if the path is on a filesystem every node mounts (NFS, Lustre)"
            )


def ocr_resource_name(cfg: PipelineConfig) -> str:
    return cfg.ray.ocr_resource or "GPU"


def ocr_on_gpu(cfg: PipelineConfig, connected: bool) -> bool:
    """Whether OCR actors request GPUs: always on a cluster unless model.device=cpu; locally only
    with GPUs present (or model.device=cuda)."""
    if cfg.model.device == Device.cpu:
        return False
    if connected or cfg.model.device == Device.cuda:
        return True
    import ray

    return ray.cluster_resources().get(ocr_resource_name(cfg), 0) > 0


def wait_for_ocr_resources(cfg: PipelineConfig, poll_s: float = 2.0) -> int:
    """Units of the OCR resource in the cluster, waiting up to `ray.gpu_wait_s` for the first one
    (the autoscaler may still be adding GPU nodes). Raises NoGpuError with what to do."""
    import ray

    res = ocr_resource_name(cfg)
    acc = f"accelerator_type:{cfg.ray.accelerator_type}" if cfg.ray.accelerator_type else ""
    deadline = time.monotonic() + cfg.ray.gpu_wait_s
    announced = False
    while True:
        total = ray.cluster_resources()
        have = int(total.get(res, 0))
        if have and (not acc or total.get(acc, 0) > 0):
            return have
        if time.monotonic() >= deadline:
            want = f"{res}" + (f" on {cfg.ray.accelerator_type} nodes" if acc else "")
            raise NoGpuError(
                f"no {want} joined the cluster within ray.gpu_wait_s={cfg.ray.gpu_wait_s:g}s: start GPU "
                f"workers (or let the autoscaler add them), raise ray.gpu_wait_s, or run the model on "
                f"CPU on purpose with model.device=cpu"
            )
        if not announced:
            log.info(
                "waiting up to %gs for %s in the cluster (OCR actors need one each)", cfg.ray.gpu_wait_s, res
            )
            announced = True
        time.sleep(poll_s)


def ocr_pool(cfg: PipelineConfig, connected: bool) -> tuple[int, int, bool]:
    """(min actors, max actors, on_gpu) of the OCR pool. `ray.ocr_concurrency: [min, max]` wins;
    else `ray.ocr_actors`; else one actor per unit of the OCR resource seen once the first is up."""
    on_gpu = ocr_on_gpu(cfg, connected)
    seen = wait_for_ocr_resources(cfg) if on_gpu else 1
    if cfg.ray.ocr_concurrency:
        lo, hi = cfg.ray.ocr_concurrency
        return lo, hi, on_gpu
    n = cfg.ray.ocr_actors or seen
    return 1, n, on_gpu
