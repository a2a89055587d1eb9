"""The main job: PDF collection -> one Parquet row per page, on embedded local Ray or a cluster.

    python -m pipeline.run input.uri=/data/pdfs output.uri=/data/out mode=gundam model=tiny_random

Two phases, both on Ray, overlapping at start-up:
1. discovery: list the input (a Ray task) and probe every document (a Ray Data stage that reads,
   hashes and opens each file); only small per-document metadata comes back to the driver;
2. processing: page-range rows stream through render (page PNGs) -> OCR (views built in the actor; one actor
   per GPU) -> post-process -> Parquet writer; the driver only consumes per-batch receipts for
   progress and accounting.
The processing dataset starts before discovery (its rows come from a `pipeline.feed.PlanFeed`
once the plan is made), so the OCR actors load the model and allocate their KV pool meanwhile.
The summary's `startup_s` says when each phase ended, relative to the job's start.
This is the only module where Hydra meets Ray (compose -> dataclasses -> `run`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, NoReturn

from omegaconf import OmegaConf

from pipeline import redact
from pipeline.config import ConfigValueError, PipelineConfig
from pipeline.schema import STATUSES

if TYPE_CHECKING:
    from pipeline.lease import Lease

log = logging.getLogger("pagemill")
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

# Exit codes (README "Exit codes"): a nightly alert can tell a typo from data loss.
EXIT_OK = 0
EXIT_HYDRA_OR_CRASH = 1  # Hydra's own composition errors (unknown key/group) and unexpected crashes
EXIT_CONFIG = 2  # an invalid configuration value, or unusable input (e.g. a bad passwords file)
EXIT_MODEL = 3  # the model weights cannot be reached
EXIT_ROWS_MISSING = 4  # the run finished but accounting failed: rows are missing (retried next run)
EXIT_NO_GPU = 5  # on a cluster, no GPU (or `ray.ocr_resource`) node joined within `ray.gpu_wait_s`
EXIT_LEASE = 6  # another run holds the output root's lease (or took this run's over)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pagemill_schema", node=PipelineConfig)


def to_config(cfg: Any) -> PipelineConfig:
    """Composed DictConfig -> validated PipelineConfig (raises ConfigValueError on a bad value)."""
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigValueError:
        raise
    except Exception as e:  # OmegaConf type errors: e.g. render.dpi=abc
        inner = e.__cause__ if isinstance(e.__cause__, ConfigValueError) else None
        if inner is not None:
            raise inner from None
        raise ConfigValueError(str(e).splitlines()[0]) from None
    assert isinstance(obj, PipelineConfig)
    return obj


def schema_error(e: BaseException) -> ConfigValueError | None:
    """Hydra's composition error for a value the schema rejects (OmegaConf: wrong type, not one of
    an enum's values) as a one-line ConfigValueError naming the key and what is allowed; None for
    other composition errors (unknown key or group: Hydra's own message says it best)."""
    from omegaconf.errors import ValidationError

    cause = e.__cause__
    if not isinstance(cause, ValidationError):
        return None
    detail = str(cause).splitlines()[0]
    return ConfigValueError(f"invalid config value {cause.full_key}={cause.value!r}: {detail}")


def compose(overrides: list[str] | None = None) -> PipelineConfig:
    """Compose `conf/` with overrides, as the CLI does (used by tests and notebooks)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = hydra_compose(config_name="config", overrides=overrides or [])
        except Exception as e:
            err = schema_error(e)
            if err is None:
                raise
            raise err from None
    return to_config(cfg)


def quiet_ray(verbose: bool) -> None:
    """Keep Ray's internal INFO/WARNING chatter (token auth, constructor arguments, deprecations,
    per-dataset execution plans) out of the console; `ray.verbose=true` brings it back. Our own
    log lines, errors and the summary table are unaffected. Must run before Ray starts."""
    if verbose:
        return
    import warnings

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # C++ core-worker notices on stderr
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    warnings.filterwarnings("ignore", message=r".*ray_remote_args.*")
    warnings.filterwarnings("ignore", module=r"ray(\..*)?")
    for name in ("ray", "ray._private", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import ray.data  # noqa: F401  # importing it installs Ray Data's console handlers, quieted next

    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__:
            h.setLevel(logging.ERROR)


def init_ray(cfg: PipelineConfig) -> bool:
    """Start or join Ray; returns True when joined to a running cluster.

    Joining passes no num_cpus/num_gpus (Ray refuses them when connecting): a plain
    `ray job submit -- pagemill run …` works without `ray.address=auto`."""
    import ray

    from pipeline.cluster import cluster_address

    address = cluster_address(cfg)
    quiet_ray(cfg.ray.verbose)
    level = logging.INFO if cfg.ray.verbose else logging.ERROR
    if ray.is_initialized():
        return bool(address)
    log_to_driver = cfg.ray.log_to_driver if cfg.ray.log_to_driver is not None else bool(address)
    if address:
        ray.init(
            address=cfg.ray.address or None,  # None: Ray reads RAY_ADDRESS itself
            namespace=cfg.ray.namespace,
            log_to_driver=log_to_driver,
            logging_level=level,
        )
        if not cfg.ray.verbose:
            logging.getLogger("ray").setLevel(logging.ERROR)
        return True
    env = {
        "env_vars": {
            "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **({} if cfg.ray.verbose else {"RAY_BACKEND_LOG_LEVEL": "fatal"}),
        }
    }
    # Embedded local Ray. Logical CPUs are over-committed on small machines so the
    # long-lived render and OCR actors cannot starve the light per-batch tasks.
    port: dict[str, Any] = (
        {"_metrics_export_port": cfg.ray.metrics_export_port} if cfg.ray.metrics_export_port else {}
    )
    ray.init(
        num_cpus=max(4, os.cpu_count() or 1),
        namespace=cfg.ray.namespace,
        include_dashboard=False,
        runtime_env=env,
        log_to_driver=log_to_driver,
        logging_level=level,
        **port,  # Prometheus endpoint of Ray's metrics agent (ray_pagemill_* metrics)
    )
    if not cfg.ray.verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
    return False


def run(cfg: PipelineConfig, dataset_stats: bool = False) -> dict[str, Any]:
    """Run the whole job; returns the summary (also written to `<output>/_summary.json`). With
    `dataset_stats`, the returned summary also holds Ray Data's per-operator stats text
    (`ray_data_stats`, `Dataset.stats()` of the processing run; benchmarks) and its per-operator
    figures (`ray_data_operators`, `pipeline.opstats.operator_stats`)."""
    from pipeline import preflight, provenance
    from pipeline.lease import Lease
    from pipeline.outputs import OutputStore
    from pipeline.sources import read_passwords

    t0 = time.time()
    phases = Phases(t0)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t0))
    preflight.check_model_available(cfg)
    provenance.resolve(cfg)  # before any config_hash(): the revision is part of it
    redact.register(cfg)
    # a bad file fails before any work; its passwords are secrets too
    redact.register_values(read_passwords(cfg.input.passwords_file, cfg.input.storage_options))
    local = not init_ray(cfg)
    phases.mark("ray_init")
    from pipeline.cluster import check_paths

    check_paths(cfg)  # local paths on a multi-node cluster: a config error before anything is written
    if cfg.dry_run:  # discovery and planning only: no model, no OCR actor, nothing written
        from pipeline.dryrun import dry_run

        return dry_run(cfg)
    store = OutputStore(cfg.output.uri, cfg.output.storage_options)
    lease = Lease(store, run_id, cfg.output.lease_timeout_s).acquire()  # LeaseHeld: another run is on it
    phases.mark("lease")
    try:
        return _run_leased(cfg, store, lease, run_id, phases, local, dataset_stats)
    finally:
        lease.release()


class Phases:
    """Start-up timestamps of the run: seconds from the job's start (`t0`, time.time()) to each
    named point, in the order reached (the summary's `startup_s`)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.at: dict[str, float] = {}

    def mark(self, name: str, t: float | None = None) -> None:
        self.at[name] = round((time.time() if t is None else t) - self.t0, 3)


class ReceiptPump:
    """The processing dataset, built and iterated in a thread: its streaming executor (and with it
    the OCR actors' model load and KV pool) starts while the driver discovers and plans. The
    receipts queue up here; the driver takes them (`for receipt in pump`) once it has published
    the plan. An error of the dataset (building it: e.g. no GPU joined the cluster; or running it)
    is raised by the iteration."""

    def __init__(self, build: Any) -> None:
        import queue
        import threading

        self.ds: Any = None
        self.error: BaseException | None = None
        self._build = build
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, name="pagemill-receipts", daemon=True)

    def start(self) -> ReceiptPump:
        self._thread.start()
        return self

    def _pump(self) -> None:
        try:
            self.ds = self._build()
            for receipt in self.ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                self._queue.put(receipt)
        except BaseException as e:  # noqa: BLE001 - raised on the driver's thread by __iter__
            self.error = e
        finally:
            self._queue.put(None)

    def __iter__(self) -> Any:
        while (receipt := self._queue.get()) is not None:
            yield receipt
        self._queue.put(None)  # a second iteration ends at once too
        self._thread.join()
        if self.error is not None:
            raise self.error

    def join(self, timeout_s: float) -> bool:
        """Wait (bounded) for the dataset to end; True when it has."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def _run_leased(
    cfg: PipelineConfig,
    store: Any,
    lease: Lease,
    run_id: str,
    phases: Phases,
    local: bool,
    dataset_stats: bool,
) -> dict[str, Any]:
    """The rest of `run`, while it holds the output root's lease (released by `run`, also on failure).

    The processing dataset starts first, over an empty `pipeline.feed.PlanFeed`: its OCR actors
    load the model while the ledger is read, the input discovered and the plan made. Then the plan
    is published to the feed (an empty one too: the feed is closed on every path, so the dataset
    always ends) and the receipts are consumed."""
    import pyarrow as pa
    import ray
    from ray.exceptions import RayActorError

    from pipeline import metrics, stages
    from pipeline.arrow import pc
    from pipeline.discover import discover
    from pipeline.dryrun import documents_with_errors
    from pipeline.feed import start_feed
    from pipeline.ledger import RUNS_SCHEMA, Ledger, runs_from_rows
    from pipeline.plan import plan_pages

    t0 = phases.t0
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not local  # locally our own tqdm bar is the progress display
    ctx.log_internal_stack_trace_to_stdout = False
    # A batch that still fails after its retries must not stop the night: its rows are reported
    # missing by the accounting below (non-zero exit) and the next run retries them.
    ctx.max_errored_blocks = -1

    reg_name = metrics.registry_name(run_id, cfg.config_hash())
    registry = metrics.start_registry(reg_name, cfg.ray.namespace)
    feed = start_feed()
    pump = ReceiptPump(lambda: stages.process(cfg, feed, store, registry=reg_name)).start()
    phases.mark("dataset_started")
    try:
        ledger = Ledger.load(store, cfg.config_hash(), temporaries_before=lease.started_at)
        phases.mark("ledger")
        # unchanged inputs come from the stat cache in the output root
        docs = discover(cfg, store, mark=phases.mark)
        phases.mark("discovery")
        plan = plan_pages(cfg, docs, ledger, ledger.failures)  # the keys stay in Arrow (ledger.runs)
        if cfg.force and plan.already_final:  # redo this input's rows: take them out of the outputs first
            log.info("force: %d committed rows will be redone", ledger.forget(store, plan.done))
            plan = plan_pages(cfg, docs, ledger, ledger.failures)
        ledger.record_sources(store, plan.source_pairs)
        phases.mark("plan")
        _hold_plan()
        if plan.tasks:
            ray.get(feed.publish.remote(stages.to_batch(plan.tasks)))
        phases.mark("plan_published")
    except BaseException:
        ray.get(feed.close.remote())  # the dataset ends (no rows) instead of waiting for a plan
        if pump.join(FAILED_PLAN_JOIN_S):
            ray.kill(registry)
            ray.kill(feed)
        else:  # its read tasks may still be waiting on the feed: killing it would fail them
            log.info("the processing dataset is still ending (its actors were starting)")
        raise
    # no more rows: with an empty plan the dataset ends once its actors are up (no page reaches OCR)
    ray.get(feed.close.remote())
    todo = plan.expected_rows - plan.already_final
    log.info(
        "discovered %d documents (%d duplicate paths), %d rows: %d already final, %d to do",
        len(docs),
        plan.duplicates,
        plan.expected_rows,
        plan.already_final,
        todo,
    )

    counts: Counter[str] = Counter(plan.done_by_status)  # rows final before this run
    written: list[pa.Table] = []  # this run's receipts as runs (ledger.runs_from_rows): no key set
    new_files: set[str] = set()  # pages parts this run committed
    new_counts: Counter[str] = Counter()
    bar = _progress(cfg, todo, local)
    from pipeline.status import StatusLine

    metrics.inc("quarantined_documents", plan.quarantined)
    # above the local tqdm bar (bar.write) so the bar stays intact; else a log line
    emit = (
        None
        if bar is None
        else (lambda line: bar.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr))
    )
    status = StatusLine(todo, cfg.status_interval_s, emit=emit).start() if plan.tasks else None
    try:
        for receipt in pump:
            if "first_row_written" not in phases.at:
                phases.mark("first_row_written")
            statuses = receipt.column("status").to_pylist()
            new_counts.update(statuses)
            written.append(runs_from_rows(receipt))
            new_files.update(receipt.column("file").to_pylist())
            metrics.record_pages(statuses)
            if status is not None:
                status.update(statuses)
            if bar is not None:
                bar.update(len(statuses))
            lease.check()  # taken over by another run (heartbeat stale): stop here, LeaseLost
    except Exception as e:
        if plan.tasks:
            raise
        # nothing to do: a dataset that could not even start (e.g. no GPU node) costs no row
        log.info("nothing to do; the unused processing dataset ended with %s", type(e).__name__)
    finally:
        if status is not None:
            status.stop()
    phases.mark("processing_done")
    ds = pump.ds
    try:
        actors: dict[str, Any] = ray.get(registry.summary.remote())
        timing: dict[str, Any] = ray.get(registry.timing.remote(phases.t0))
    except RayActorError:  # its node left the cluster: the per-actor figures are lost, no rows
        log.warning("the OCR actor registry is gone (its node left the cluster): no per-actor figures")
        actors, timing = metrics.actors_summary([]), {}
    ray.kill(registry)
    ray.kill(feed)
    if bar is not None:
        bar.close()
    lease.check()
    counts.update(new_counts)
    from pipeline.documents import build_for_run, has_documents

    def files_of(doc_ids: set[str]) -> set[str]:
        """The pages parts holding rows of `doc_ids`: this run's and the ledger's."""
        return plan.files_of(doc_ids) | new_files

    runs = pa.concat_tables(written) if written else RUNS_SCHEMA.empty_table()
    if runs.num_rows or not has_documents(store, cfg.config_hash()):  # a no-op rerun rewrites nothing
        # documents/: one row per document, assembled from pages/; only the touched ones once built
        touched = set(pc.unique(runs.column("doc_id")).to_pylist())
        build_for_run(store, cfg, touched, files_of(touched), run_id, files_of)

    wall = time.time() - t0
    n_written, missing = plan.account(runs)  # {doc_id: rows missing}
    errors = (
        set(plan.docs.filter(plan.docs.column("is_error")).column("doc_id").to_pylist()) if missing else set()
    )
    ledger.record_failures(
        store,
        run_id,
        {
            d: f"{n} row(s) not produced in run {run_id} (OCR/render batch failed after its retries)"
            for d, n in missing.items()
            if d not in errors
        },
    )
    n_missing = sum(missing.values())
    try:  # the next start reads this one file plus only the parts newer than it
        Ledger.write_snapshot(store)
    except Exception as e:  # only a speed-up: without it the next start reads every part
        log.warning("ledger: snapshot not written: %s: %s", type(e).__name__, redact.scrub(str(e)))
    summary = {
        "run_id": run_id,
        "output_uri": store.root,
        "config_hash": cfg.config_hash(),
        "config": redact.redacted_config(cfg),
        "documents_in": len(docs),
        "duplicate_paths": plan.duplicates,
        "documents_quarantined": plan.quarantined,
        "documents_with_errors": documents_with_errors(docs),
        "pages_in": plan.expected_rows - plan.doc_error_rows,
        "rows_expected": plan.expected_rows,
        "rows_already_final": plan.already_final,
        "rows_written": n_written,
        "rows_out": plan.expected_rows - n_missing,
        "rows_by_status": {s: counts.get(s, 0) for s in STATUSES},
        "rows_written_by_status": {s: new_counts.get(s, 0) for s in STATUSES if new_counts.get(s)},
        "missing_rows": n_missing,
        "missing_documents": sorted(missing)[:100],
        "wall_time_s": round(wall, 3),
        "pages_per_s": round(n_written / wall, 4) if wall > 0 else 0.0,
        "accounting_ok": not n_missing and sum(counts.values()) == plan.expected_rows,
        "versions": metrics.versions(),
        **actors,  # ocr_actors, gpus (torch.cuda names -> count; empty on CPU), gpu_hours
        **metrics.cost_fields(len(written), actors["gpu_hours"], cfg.cost.gpu_hour_usd),
        "gpu_hour_usd": cfg.cost.gpu_hour_usd or None,
        **_timing_fields(phases, timing),
    }
    store.write_json(f"_runs/{run_id}-{cfg.config_hash()}.json", summary)
    store.write_json("_summary.json", summary)
    if cfg.output.snapshot_uri:  # "dated" layout: the night's rows, linked/copied from the store
        from pipeline.dated import write_snapshot

        lease.check()
        night = set(
            plan.docs.column("doc_id").to_pylist()
        )  # every document of the night (doc_error ones too)
        summary["snapshot"] = write_snapshot(
            store,
            cfg.output.snapshot_uri,
            cfg.output.storage_options,
            cfg.config_hash(),
            night,
            files_of(night),
            summary,
        )
    print_summary(summary)
    if dataset_stats:
        from pipeline.opstats import operator_stats

        summary["ray_data_stats"] = ds.stats() if ds is not None else ""
        summary["ray_data_operators"] = operator_stats(ds) if ds is not None else []
    return summary


FAILED_PLAN_JOIN_S = 10.0  # how long a failed discovery/planning waits for the dataset to end
HOLD_PLAN_ENV = "PAGEMILL_TEST_HOLD_PLAN_S"  # tests: hold the finished plan back this many seconds


def _hold_plan() -> None:
    """Test switch (`PAGEMILL_TEST_HOLD_PLAN_S`): a slow discovery, to see what overlaps it."""
    hold = float(os.environ.get(HOLD_PLAN_ENV) or 0)
    if hold > 0:
        log.warning("%s: holding the plan back %gs", HOLD_PLAN_ENV, hold)
        time.sleep(hold)


def _timing_fields(phases: Phases, timing: dict[str, Any]) -> dict[str, Any]:
    """The summary's start-up and timing figures: `startup_s` (seconds from the job's start to each
    point: the driver's phases; from the OCR actors their process start, constructor, model load
    start and ready, first and last page in; from the render actors the first and last one up and
    the first call),
    `ocr_steady` (the OCR actors' steady state, `pipeline.metrics.steady_window` over the pages'
    submit and finish times), `ocr_occupancy` (pages in the OCR actors per 10 s from the start:
    `ActorRegistry.occupancy`) and `stage_cpu_s` (CPU seconds by stage, render children included)."""
    at = dict(phases.at)
    for name, t in timing.items():  # the actors' points: time.time() of each
        if isinstance(t, float):
            at[name] = round(t - phases.t0, 3)
    stage_cpu = dict(timing.get("stage_cpu_s", {}))
    stage_cpu["driver"] = round(_process_cpu_s(), 3)
    return {
        "startup_s": dict(sorted(at.items(), key=lambda kv: kv[1])),
        "ocr_steady": timing.get("steady", {}),
        "ocr_occupancy": timing.get("occupancy", []),
        "stage_cpu_s": stage_cpu,
    }


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _progress(cfg: PipelineConfig, total: int, local: bool) -> Any:
    if not (cfg.progress and local):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="page", desc="pages", dynamic_ncols=True, smoothing=0.1)


def print_summary(s: dict[str, Any]) -> None:
    rows = [
        ("documents in", s["documents_in"]),
        ("documents with errors", s["documents_with_errors"]),
        ("pages in", s["pages_in"]),
        ("rows already final", s["rows_already_final"]),
        ("rows written now", s["rows_written"]),
        ("rows out", s["rows_out"]),
        *((f"  {k}", v) for k, v in s["rows_by_status"].items() if v),
        ("pages/s", s["pages_per_s"]),
        *((("GPUs", ", ".join(f"{n}x {k}" for k, n in s["gpus"].items())),) if s.get("gpus") else ()),
        *((("GPU-hours", s["gpu_hours"]),) if s.get("gpus") else ()),
        *((("$ per million pages", s["usd_per_million_pages"]),) if s.get("usd_per_million_pages") else ()),
        ("wall time (s)", s["wall_time_s"]),
        ("accounting", "ok" if s["accounting_ok"] else f"FAILED: {s['missing_rows']} rows missing"),
        ("output", s["output_uri"]),
    ]
    width = max(len(k) for k, _ in rows)
    print("\npagemill run summary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if not s["accounting_ok"]:
        print("  documents with missing rows: " + ", ".join(s["missing_documents"]))


def check_overrides(argv: list[str]) -> None:
    """Exit with EXIT_CONFIG for a bad value before Hydra's own run: Hydra rejects a value outside
    the schema (`model.dtype=bogus`, `render.dpi=abc`) while composing and exits 1 as for an unknown
    key, so the overrides are composed once here first. With Hydra flags (`--cfg`, `-m`, ...) this
    is skipped and Hydra reports everything itself."""
    if any(a.startswith("-") for a in argv):
        return
    try:
        compose(argv)
    except ConfigValueError as e:
        print(f"pagemill: configuration error: {redact.scrub(str(e))}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except Exception:  # noqa: BLE001 - Hydra's own composition errors: hydra.main reports them (exit 1)
        return


def exit_now(code: int) -> NoReturn:
    """Exit with `code` whatever Ray's teardown does. A run that fails early may leave the
    processing dataset's thread still starting its actors; Python's own finalisation (Ray's
    atexit shutdown racing that thread) then ended the process with 1 instead of `code` under
    load. By now the lease is released and nothing is left to commit, and an embedded Ray's
    processes share the driver's fate (on a cluster the GCS ends the job's actors), so the
    process ends here, streams flushed."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    import hydra

    check_overrides(sys.argv[1:])
    register_configs()

    # absolute: the same conf/ whether this runs as __main__ or from `pagemill run` (pipeline.cli)
    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def _main(dcfg: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        redact.install_log_filter()
        redact.note_env_paths(dcfg)
        from pipeline.cluster import NoGpuError
        from pipeline.lease import LeaseHeld, LeaseLost
        from pipeline.preflight import ModelUnavailable
        from pipeline.sources import InputError

        # an expected failure: one line on stderr (secrets scrubbed) and its exit code
        failures: list[tuple[type[Exception], str, int]] = [
            (ConfigValueError, "configuration error: ", EXIT_CONFIG),
            (NoGpuError, "", EXIT_NO_GPU),
            (ModelUnavailable, "", EXIT_MODEL),
            (InputError, "input error: ", EXIT_CONFIG),
            (LeaseHeld, "", EXIT_LEASE),
            (LeaseLost, "", EXIT_LEASE),
        ]
        try:
            summary = run(to_config(dcfg))
        except tuple(kind for kind, _, _ in failures) as e:
            prefix, code = next((p, c) for kind, p, c in failures if isinstance(e, kind))
            print(f"pagemill: {prefix}{redact.scrub(str(e))}", file=sys.stderr)
            exit_now(code)
        if not summary.get("dry_run") and not summary["accounting_ok"]:
            sys.exit(EXIT_ROWS_MISSING)

    _main()


if __name__ == "__main__":
    main()
