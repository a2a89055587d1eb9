"""Application metrics (Ray's `ray.util.metrics`, exported by every node's metrics agent on its
Prometheus endpoint, as `ray_pagemill_*`), the run's OCR-actor registry (GPUs by type and
GPU-hours for the `_runs/` record) and the run record's versions and cost figures.

Where each metric is recorded:
- the driver, from the writer's receipts: `pagemill_pages_total{status}` (rows written by this
  run; they sum to `_summary.json`'s `rows_written_by_status`) and
  `pagemill_quarantined_documents_total` (documents given `quarantined` rows by the plan);
- the render stage: `pagemill_render_timeouts_total` (pages whose renderer was killed at
  `render.timeout_s`);
- the OCR stage: `pagemill_output_tokens_total` (the rows' `num_output_tokens`),
  `pagemill_fallback_passes_total`, `pagemill_repetition_stops_total` (every pass stopped by the
  loop detector), and from the engine's numbers (`model.runner.PageOcr.engine_numbers`, sampled
  by a thread every `SAMPLE_S`): the gauges `pagemill_kv_rows_in_use` / `pagemill_kv_rows` and
  the histogram `pagemill_decode_step_seconds` (mean decode step time per sample).
Metric objects are made lazily in each process (Ray must be initialised there first).
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from typing import Any

log = logging.getLogger("pagemill")

SAMPLE_S = 5.0  # how often an OCR actor samples its engine's numbers
STEP_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0]
REGISTRY_PREFIX = "pagemill-ocr-actors-"


class _Metrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.pages = Counter("pagemill_pages", "page rows written, by status", tag_keys=("status",))
        self.quarantined_documents = Counter(
            "pagemill_quarantined_documents", "documents given quarantined rows instead of another attempt"
        )
        self.render_timeouts = Counter(
            "pagemill_render_timeouts", "pages whose renderer was killed at render.timeout_s"
        )
        self.output_tokens = Counter("pagemill_output_tokens", "generated tokens in the written rows")
        self.fallback_passes = Counter("pagemill_fallback_passes", "second OCR passes (no EOS on the first)")
        self.repetition_stops = Counter(
            "pagemill_repetition_stops", "OCR passes stopped by the loop detector (finish_reason repetition)"
        )
        self.kv_rows_in_use = Gauge("pagemill_kv_rows_in_use", "KV rows decoding now, per OCR actor")
        self.kv_rows = Gauge("pagemill_kv_rows", "KV rows of the engine, per OCR actor")
        self.decode_step = Histogram(
            "pagemill_decode_step_seconds",
            "mean decode step time over a sample interval, per OCR actor",
            boundaries=STEP_BUCKETS,
        )


@lru_cache(maxsize=1)
def metrics() -> _Metrics:
    """This process's metric objects (made once, after Ray is initialised)."""
    return _Metrics()


def inc(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    """Add `value` to counter `name`; zero adds nothing (Ray refuses non-positive increments)."""
    if value > 0:
        getattr(metrics(), name).inc(value, tags=tags)


def record_pages(statuses: list[str]) -> None:
    from collections import Counter

    for status, n in Counter(statuses).items():
        inc("pages", n, {"status": status})


def is_render_timeout(error: str | None) -> bool:
    """A render_error row's message says the renderer was killed at its timeout (render_proc)."""
    return bool(error) and "timed out" in (error or "")


class EngineSampler:
    """An OCR actor's thread: every `interval_s`, the engine's KV rows in use (gauge) and its mean
    decode step time since the last sample (histogram)."""

    def __init__(self, ocr: Any, interval_s: float = SAMPLE_S) -> None:
        self.ocr, self.interval_s = ocr, interval_s
        n = ocr.engine_numbers()
        self._steps, self._decode_s = n.decode_steps, n.decode_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pagemill-metrics", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        n = self.ocr.engine_numbers()
        m = metrics()
        m.kv_rows.set(n.kv_rows)
        m.kv_rows_in_use.set(n.kv_rows_in_use)
        steps = n.decode_steps - self._steps
        if steps > 0:
            m.decode_step.observe((n.decode_s - self._decode_s) / steps)
        self._steps, self._decode_s = n.decode_steps, n.decode_s

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - metrics must never stop the OCR actor
                log.debug("metrics sample failed: %s", e)

    def stop(self) -> None:
        self._stop.set()


# ----------------------------------------------------------------------------- OCR actor registry


def process_start_time() -> float | None:
    """When this process was created (time.time() scale; Linux /proc), or None elsewhere."""
    import os

    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


MAX_OCCUPANCY_WINDOWS = 360  # the run record's occupancy list stays small on a night-long run


def registry_name(run_id: str, config_hash: str) -> str:
    return f"{REGISTRY_PREFIX}{run_id}-{config_hash}"


class ActorRegistry:
    """A small Ray actor (no CPU) the stage actors report to. OCR actors: device name and model
    load start/ready at start, a heartbeat after each batch with its pages' OCR times. Its
    `summary` gives the run's GPUs by type and GPU-hours (each GPU actor's life from the start of
    its model load to its last batch); `timing` the OCR start-up points, the OCR steady state
    (`steady_window` over every page's submit and finish times) and CPU seconds by stage (every
    stage actor reports its process's CPU time, render children included: `CpuReporter`)."""

    def __init__(self) -> None:
        from array import array

        self.actors: dict[str, dict[str, Any]] = {}
        self.first_in: float | None = None  # the first page into an OCR actor
        self.submitted, self.done = array("d"), array("d")  # per page: into the engine, finished
        self.arrived = array("d")  # per page into the engine: when its batch reached the actor
        self.cpu_s: dict[str, dict[str, float]] = {}  # stage -> process key -> its CPU seconds
        self.points: dict[str, float] = {}  # start-up points reported by the actors (`point`)

    def register(
        self,
        key: str,
        device: str,
        t: float,
        ready: float | None = None,
        marks: dict[str, float] | None = None,
    ) -> None:
        """An OCR actor up: `t` its model load's start, `ready` its end; `marks` its earlier
        start-up points (`process_start`, `init_start`: time.time() of each)."""
        self.actors[key] = {"device": device, "start": t, "last": t, "pages": 0, "ready": ready or t}
        for name, t_mark in (marks or {}).items():  # the earliest actor's counts
            self.point(f"ocr_{name}", t_mark)

    def beat(
        self,
        key: str,
        t: float,
        pages: int,
        first_in: float | None = None,
        submitted: list[float] | None = None,
        done: list[float] | None = None,
    ) -> None:
        a = self.actors.get(key)
        if a is not None:
            a["last"] = max(a["last"], t)
            a["pages"] += pages
        if first_in is not None:
            self.first_in = first_in if self.first_in is None else min(self.first_in, first_in)
        self.submitted.extend(submitted or [])
        self.done.extend(done or [])
        if first_in is not None and submitted:
            self.arrived.extend([first_in] * len(submitted))

    def point(self, name: str, t: float, latest: bool = False) -> None:
        """A start-up point reported by many actors: the earliest report counts (the latest
        with `latest`), e.g. the first and the last render actor up."""
        have = self.points.get(name)
        self.points[name] = t if have is None else (max(have, t) if latest else min(have, t))

    def cpu(self, stage: str, key: str, seconds: float) -> None:
        """A stage process's CPU seconds so far (the latest figure of each process counts)."""
        self.cpu_s.setdefault(stage, {})[key] = seconds

    def summary(self) -> dict[str, Any]:
        return actors_summary(list(self.actors.values()))

    def occupancy(self, t0: float, every_s: float = 10.0) -> list[dict[str, Any]]:
        """Pages in the OCR actors over time, in windows of `every_s` from `t0` (those of the
        benchmark's GPU-utilisation samples), each the mean of one reading a second:
        `in_engine` (submitted, not finished: the engine's rows and look-ahead) and `waiting`
        (in an actor, not yet submitted: views being built). A GPU dip with pages in the engine
        is the actor's own; one with none is starvation upstream."""
        import bisect

        arrived, submitted, done = sorted(self.arrived), sorted(self.submitted), sorted(self.done)
        if not submitted:
            return []
        out: list[dict[str, Any]] = []
        end = max(done[-1], submitted[-1])
        every_s = max(every_s, (end - t0) / MAX_OCCUPANCY_WINDOWS)  # a long run: wider windows
        k = 0
        while t0 + k * every_s < end:
            points = [t0 + k * every_s + (j + 0.5) * every_s / 10 for j in range(10)]
            n_sub = [bisect.bisect_right(submitted, t) for t in points]
            in_engine = [s - bisect.bisect_right(done, t) for s, t in zip(n_sub, points)]
            waiting = [bisect.bisect_right(arrived, t) - s for s, t in zip(n_sub, points)]
            out.append(
                {
                    "t_s": round((k + 1) * every_s, 1),
                    "in_engine": round(sum(in_engine) / len(points), 1),
                    "waiting": round(max(0.0, sum(waiting) / len(points)), 1),
                }
            )
            k += 1
        return out

    def timing(self, t0: float | None = None) -> dict[str, Any]:
        """The run's OCR timing (see the class); with `t0` (the job's start), the `occupancy`
        windows from it too."""
        starts = [a["start"] for a in self.actors.values()]
        ready = [a["ready"] for a in self.actors.values()]
        return {
            **self.points,
            "ocr_load_start": min(starts, default=None),
            "ocr_ready": min(ready, default=None),
            "first_page_into_ocr": self.first_in,
            "last_page_into_ocr": max(self.submitted, default=None),
            "steady": steady_window(list(self.done), list(self.submitted)),
            "stage_cpu_s": {k: round(sum(v.values()), 3) for k, v in sorted(self.cpu_s.items())},
            "occupancy": self.occupancy(t0) if t0 is not None else [],
        }


def steady_window(done_at: list[float], admitted_at: list[float]) -> dict[str, Any]:
    """Steady state as `jobs/benchmark.py` measures the engine: pages finished from the first
    finished page to the last admission (after it only the drain is left), over that window.
    `done_at` / `admitted_at`: per page, when it finished and when it entered the engine (for
    the engine alone: finish time minus its OCR time; in the job: the OCR actor's timestamps)."""
    if len(done_at) < 10:
        return {"pages_per_s": None, "window_s": None, "pages": 0}
    t_first, t_last = min(done_at), max(admitted_at)
    n = sum(1 for t in done_at if t_first < t <= t_last)
    return {
        "pages_per_s": round(n / (t_last - t_first), 4) if t_last > t_first and n else None,
        "window_s": round(t_last - t_first, 2),
        "pages": n,
    }


def actors_summary(actors: list[dict[str, Any]]) -> dict[str, Any]:
    """GPUs by type (`cpu` actors are not GPUs) and GPU-hours from the registered OCR actors."""
    gpus: dict[str, int] = {}
    gpu_s = 0.0
    for a in actors:
        if a["device"] == "cpu":
            continue
        gpus[a["device"]] = gpus.get(a["device"], 0) + 1
        gpu_s += max(0.0, a["last"] - a["start"])
    return {"ocr_actors": len(actors), "gpus": gpus, "gpu_hours": round(gpu_s / 3600.0, 6)}


def start_registry(name: str, namespace: str) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node: a worker node that leaves mid-run must not take the registry with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return (
        ray.remote(num_cpus=0)(ActorRegistry)
        .options(name=name, namespace=namespace, max_concurrency=4, scheduling_strategy=here)
        .remote()
    )


class RegistryClient:
    """The OCR actor's side of the registry."""

    def __init__(
        self, name: str, namespace: str, device: str, t_start: float, marks: dict[str, float] | None = None
    ) -> None:
        import os

        import ray

        self.key = f"{os.getpid()}-{id(self)}"
        self.handle: Any = None
        try:
            self.handle = ray.get_actor(name, namespace=namespace)
            ray.get(self.handle.register.remote(self.key, device, t_start, time.time(), marks), timeout=60)
        except Exception as e:  # noqa: BLE001 - the run record then lacks this actor's GPU time
            log.warning("OCR actor registry %s not reachable: %s", name, e)
            self.handle = None

    async def beat(
        self,
        pages: int,
        t_in: float | None = None,
        submitted: list[float] | None = None,
        done: list[float] | None = None,
    ) -> None:
        """After each batch (awaited, so the run's last beat lands before its rows are counted),
        with the batch's times: when it reached the actor (`t_in`), and per page when it went
        into the engine (`submitted`) and finished (`done`)."""
        if self.handle is None:
            return
        try:
            await self.handle.beat.remote(self.key, time.time(), pages, t_in, submitted, done)
        except Exception as e:  # noqa: BLE001 - a lost beat only shortens GPU-hours
            log.debug("registry beat failed: %s", e)


class CpuReporter:
    """A stage actor's CPU seconds so far (its process, plus `extra_s`: e.g. its render children)
    to the registry after each call (fire and forget; nothing when there is no registry)."""

    def __init__(self, name: str, namespace: str, stage: str) -> None:
        import os

        self.stage, self.key = stage, f"{os.getpid()}-{id(self)}"
        self.handle: Any = None
        if name:
            try:
                import ray

                self.handle = ray.get_actor(name, namespace=namespace)
            except Exception as e:  # noqa: BLE001 - the run record then lacks this stage's CPU
                log.debug("registry %s not reachable: %s", name, e)

    def point(self, name: str, latest: bool = False, t: float | None = None) -> None:
        """Now (or `t`, a time.time()), as the start-up point `name` (`ActorRegistry.point`;
        fire and forget)."""
        if self.handle is None:
            return
        try:
            self.handle.point.remote(name, time.time() if t is None else t, latest)
        except Exception as e:  # noqa: BLE001 - metrics must never stop a stage
            log.debug("point report failed: %s", e)

    def report(self, extra_s: float = 0.0) -> None:
        if self.handle is None:
            return
        try:
            self.handle.cpu.remote(self.stage, self.key, time.process_time() + extra_s)
        except Exception as e:  # noqa: BLE001 - metrics must never stop a stage
            log.debug("cpu report failed: %s", e)


# ----------------------------------------------------------------------------- run record


def versions() -> dict[str, str]:
    """Versions of what made the rows (the `_runs/` record)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for key, dist in (("pagemill", "pagemill"), ("torch", "torch"), ("ray", "ray"), ("pymupdf", "pymupdf")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = ""
    if not out["pagemill"]:  # run from a checkout without an install: pyproject's version
        out["pagemill"] = _checkout_version()
    return out


def _checkout_version() -> str:
    import re
    from pathlib import Path

    p = Path(__file__).resolve().parents[1] / "pyproject.toml"
    m = re.search(r'^version\s*=\s*"([^"]+)"', p.read_text(), re.M) if p.is_file() else None
    return m.group(1) if m else ""


def cost_fields(pages: int, gpu_hours: float, gpu_hour_usd: float) -> dict[str, float | None]:
    """Pages per GPU-hour and, given a price, $ per million pages (None where undefined: no GPU
    time, as on CPU, or no price)."""
    per_hour = pages / gpu_hours if gpu_hours > 0 else None
    usd = gpu_hour_usd * 1e6 / per_hour if per_hour and gpu_hour_usd > 0 else None
    return {
        "pages_per_gpu_hour": round(per_hour, 3) if per_hour is not None else None,
        "usd_per_million_pages": round(usd, 4) if usd is not None else None,
    }
