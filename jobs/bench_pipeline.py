"""End-to-end pipeline benchmark: the Ray job (render -> preprocess -> OCR -> write Parquet) on a
corpus with the engine benchmark's workload (`jobs/benchmark.py`): the full-size architecture with
random bf16 weights (`model=full_random`), Gundam mode, every page's output length forced to its
text-layer target (`generation.force_length=text_layer`).

    python -m jobs.bench_pipeline --corpus ../shared/corpus/dev --out /tmp/bench-e2e \\
        --json-out bench_pipeline.json [hydra overrides, e.g. generation.max_batch=128]

Runs `pipeline.run.run` in this process on embedded local Ray, timed from before Ray starts to the
end of the run (model load, rendering and the documents/ build included), then reads the written
Parquet back and reports JSON (printed and written to --json-out): wall and steady-state pages/s,
bytes per page and CPU seconds per page of every Ray Data operator (Ray Data's stats), GPU
utilisation in 10-s windows (mean and least of 0.5-s polls; pynvml or nvidia-smi, when present;
also beside the engine alone, whose first windows are its untimed rendering), and - right after, on the same
pages, with the same engine settings - the engine alone (`engine_pages_per_s`). The job's steady
state comes from the OCR actors' own per-page timestamps (`ocr_steady` of the run summary), as
the engine alone's; start-up (`startup_spent_s`: seconds from the job's start to each phase,
`first_page_into_ocr_s`), CPU seconds per page by stage (`cpu_s_per_page`, render children
included) and `cores_per_gpu_at_engine_speed` (their sum x the engine's pages/s) come from the
run summary too. `--min-pages N`
makes at least N distinct pages by writing byte-distinct copies of the corpus PDFs (a comment
line appended after `%%EOF`; the ledger dedups identical bytes, the renderer sees the same pages). `--allow-cpu` without CUDA:
a smoke run with `model=tiny_random` (numbers meaningless). `--out` must be new or empty: a rerun
into the same output does no work (the ledger already has the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.metrics import steady_window

# OCR produced output (forced pages end `truncated`)
from pipeline.schema import OUTPUT_STATUSES as OCR_DONE


def read_rows(out: Path, config_hash: str) -> list[dict[str, Any]]:
    import pyarrow.dataset as pads

    cols = ["page_index", "status", "num_output_tokens", "ocr_ms", "written_at", "config_hash"]
    rows = pads.dataset(out / "pages", format="parquet").to_table(columns=cols).to_pylist()
    return [r for r in rows if r["config_hash"] == config_hash]


def report(rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Figures from the rows: pages and tokens, rates over the whole wall time, and over the OCR
    window estimated from the rows (first `written_at - ocr_ms` to last `written_at`)."""
    pages = [r for r in rows if r["page_index"] >= 0]
    done = [r for r in pages if r["status"] in OCR_DONE]
    tokens = sum(r["num_output_tokens"] or 0 for r in done)
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    out: dict[str, Any] = {
        "rows_written": len(rows),
        "pages_written": len(pages),
        "pages_ocr_ok": len(done),
        "rows_by_status": by_status,
        "output_tokens": tokens,
        # forced pages generate exactly their target, so this is the mean forced length
        "mean_forced_tokens": round(tokens / len(done), 1) if done else 0.0,
        "wall_s": round(wall, 2),
        "pages_per_s": round(len(pages) / wall, 4),
        "pages_per_day": round(len(pages) / wall * 86400),
        "output_tokens_per_s": round(tokens / wall, 1),
    }
    timed = [r for r in done if r["written_at"] is not None and r["ocr_ms"] is not None]
    if timed:
        start = min(r["written_at"].timestamp() - r["ocr_ms"] / 1000 for r in timed)
        window = max(r["written_at"].timestamp() for r in timed) - start
        out["ocr_window_s"] = round(window, 2)
        out["ocr_window_note"] = (
            "estimate from the rows: earliest (written_at - ocr_ms) to the last written_at; "
            "excludes model load and the first render, includes the last write"
        )
        if window > 0:
            out["pages_per_s_ocr_window"] = round(len(done) / window, 4)
            out["pages_per_day_ocr_window"] = round(len(done) / window * 86400)
    return out


def steady_state(summary: dict[str, Any]) -> dict[str, Any]:
    """The job's steady state, as `jobs/benchmark.py` measures the engine (`steady_window`): the
    OCR actors' own timestamps of every page (into the engine, finished), not the writer's: pages
    finished from the first finished page to the last page into the engine (after it only the
    drain is left), over that window (`ocr_steady` of the run summary)."""
    win = summary.get("ocr_steady") or {}
    return {
        "steady_pages_per_s": win.get("pages_per_s"),
        "steady_window_s": win.get("window_s"),
        "steady_pages": win.get("pages", 0),
        "steady_note": "OCR actor timestamps: pages finished from the first finished page to the last "
        "page into the engine, over that window (the engine benchmark's definition)",
    }


def startup(summary: dict[str, Any], pages: int) -> dict[str, Any]:
    """What start-up time is spent on (`startup_s` of the run summary: seconds from the job's
    start to each point reached) and the CPU seconds per page of each stage's processes (render
    children included; `driver` is the job's driver process; discovery's probe actors and Ray's
    own daemons are not counted)."""
    at = summary.get("startup_s") or {}
    cpu = summary.get("stage_cpu_s") or {}
    per_page = {k: round(v / pages, 4) for k, v in cpu.items()} if pages else {}
    return {
        "startup_spent_s": at,
        "first_page_into_ocr_s": at.get("first_page_into_ocr"),
        "stage_cpu_s": cpu,
        "cpu_s_per_page": per_page,
        "cpu_s_per_page_total": round(sum(per_page.values()), 4) if per_page else None,
    }


def make_copies(corpus: Path, dest: Path, min_pages: int) -> tuple[Path, int]:
    """`dest` with byte-distinct copies of every PDF of `corpus`, enough copies for `min_pages`
    pages (copy k has `%pagemill-copy k` appended: a new doc_id, the same pages). Returns
    (dest, pages)."""
    import pymupdf

    files = sorted(corpus.glob("*.pdf"))
    pages = 0
    for f in files:
        try:
            with pymupdf.open(f, filetype="pdf") as doc:
                pages += doc.page_count if not doc.needs_pass else 0
        except Exception:  # noqa: BLE001 - broken corpus files count no pages (they become doc_error rows)
            pass
    copies = max(1, -(-min_pages // max(1, pages)))
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = f.read_bytes()
        for k in range(copies):
            (dest / f"{f.stem}-copy{k:03d}.pdf").write_bytes(
                data + b"\n%pagemill-copy " + str(k).encode() + b"\n"
            )
    return dest, pages * copies


def window_sample(t_s: float, polls: list[list[int]], errors: list[str]) -> dict[str, Any]:
    """One reporting window of GpuSampler: per GPU, the mean and the least of its polls."""
    out: dict[str, Any] = {"t_s": t_s, "polls": len(polls)}
    if polls:
        per_gpu = list(zip(*polls))
        out["util_pct"] = [round(sum(g) / len(g), 1) for g in per_gpu]
        out["min_pct"] = [min(g) for g in per_gpu]
    if errors:
        out["error"] = errors[-1]
    return out


class GpuSampler:
    """GPU utilisation in a thread (pynvml, else nvidia-smi; none on CPU): polled every `poll_s`,
    reported once per `every_s` window as the window's mean and least poll per GPU.

    One NVML reading covers only the driver's last sample period (1/6 s to 1 s), so one reading
    every 10 s says whether a kernel ran in that instant, not how busy the 10 s were: a 200 ms gap
    at the moment of reading shows as a few percent. The mean of 20 polls is the window's figure;
    the least poll shows whether there was a gap in it."""

    def __init__(self, every_s: float = 10.0, poll_s: float = 0.5):
        import threading

        self.every_s, self.poll_s, self.samples, self.source = every_s, poll_s, [], "none"
        self._stop = threading.Event()
        self._read = self._reader()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _reader(self) -> Any:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.source = "pynvml"
            return lambda: [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
        except Exception:  # noqa: BLE001 - no NVML: try the CLI
            import shutil
            import subprocess

            if not shutil.which("nvidia-smi"):
                return None
            self.source = "nvidia-smi"

            def smi() -> list[int]:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                return [int(x) for x in out.split()]

            return smi

    def _loop(self) -> None:
        t0 = time.time()
        polls: list[list[int]] = []
        errors: list[str] = []
        next_report = t0 + self.every_s
        while not self._stop.wait(self.poll_s):
            try:
                polls.append(self._read())
            except Exception as e:  # noqa: BLE001 - a failed poll is recorded, not fatal
                errors.append(str(e))
            if time.time() >= next_report:
                self.samples.append(window_sample(round(time.time() - t0, 1), polls, errors))
                polls, errors = [], []
                next_report += self.every_s

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


WARM_UP_TOKENS = 16  # tokens the warm-up page generates (decode kernels and graphs run)


def warm_up_input(cfg: Any) -> Any:
    """A blank A4 page at the configured dpi in the configured mode (`PageOcr.warm_up` before
    the engine alone is timed: its Triton kernels compiled and autotuned and its graphs captured
    for a typical page's shapes, Gundam's global view and a grid of tiles, so its timed window
    holds none of that even on a machine with a cold Triton cache)."""
    from PIL import Image

    from model.preprocess import preprocess_image
    from model.runner import OcrInput

    size = (round(8.27 * cfg.render.dpi), round(11.69 * cfg.render.dpi))
    prep = preprocess_image(Image.new("RGB", size, "white"), cfg.mode.name, max_crops=cfg.mode.max_crops)
    return OcrInput.from_views(prep, force_len=WARM_UP_TOKENS)


def engine_alone(cfg: Any, corpus: Path, on_gpu: bool) -> dict[str, Any]:
    """The job's engine (same config, `pipeline.stages.load_page_ocr`) alone on the job's pages:
    every page of every PDF in `corpus` rendered and turned into views first (untimed; byte copies
    of one PDF share its views), then all submitted at once and timed to the last result. With
    `ray.ocr_views=device` the inputs are the decoded pages, as in the job: the engine's timed
    work then includes building the views on its device."""
    import hashlib

    from model.runner import OcrInput
    from pipeline.config import ForceLength, ViewKind
    from pipeline.forced import forced_from_text
    from pipeline.render import PageImage, render_pages
    from pipeline.stages import load_page_ocr
    from pipeline.views import page_pixels, page_views

    r, g, m = cfg.render, cfg.generation, cfg.mode
    force = g.force_length == ForceLength.text_layer
    ocr = load_page_ocr(cfg, on_gpu=on_gpu)
    ocr.warm_up(warm_up_input(cfg))
    cache: dict[str, list[OcrInput]] = {}
    inputs: list[OcrInput] = []
    for f in sorted(corpus.glob("*.pdf")):
        data = f.read_bytes()
        key = hashlib.sha256(data.rsplit(b"\n%pagemill-copy ", 1)[0]).hexdigest()
        if key not in cache:
            try:
                import pymupdf

                with pymupdf.open(stream=data, filetype="pdf") as doc:
                    n = 0 if doc.needs_pass else doc.page_count
            except Exception:  # noqa: BLE001 - not a PDF: no pages, as in the job
                n = 0
            pages = (
                render_pages(
                    data,
                    None,
                    list(range(min(n, r.max_pages))),
                    r.options(),
                    output="png",
                    count_blocks=force,
                )
                if n
                else []
            )
            cache[key] = []
            for p in pages:
                if isinstance(p, PageImage) and p.png is not None:
                    n_force = (
                        forced_from_text(p.text, p.text_blocks, ocr.tokenizer, 0, g.max_model_len)
                        if force
                        else None
                    )  # as the OCR stage computes it
                    if cfg.ray.ocr_views == ViewKind.device:  # as the job: the engine builds the views
                        x = OcrInput.from_page(page_pixels(p.png), m.name, m.max_crops, force_len=n_force)
                    else:
                        x = OcrInput.from_views(page_views(p.png, m.name, m.max_crops), force_len=n_force)
                    cache[key].append(x)
        inputs += cache[key]
    t0 = time.perf_counter()
    futures = [ocr.submit(x) for x in inputs]
    done_at: dict[int, float] = {}  # future index -> when it finished
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _f, i=i: done_at.__setitem__(i, time.perf_counter()))
    results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    tokens = sum(x.num_output_tokens for x in results)
    ends = [done_at.get(i, t0 + wall) for i in range(len(results))]
    steady = steady_window(ends, [t - x.ocr_ms / 1000 for t, x in zip(ends, results)])
    return {
        "engine_pages": len(inputs),
        "engine_wall_s": round(wall, 2),
        "engine_pages_per_s": round(len(inputs) / wall, 4) if wall > 0 else None,
        "engine_steady_pages_per_s": steady["pages_per_s"],
        "engine_steady_window_s": steady["window_s"],
        "engine_output_tokens": tokens,
        "engine_kv_rows": ocr.engine.cfg.max_batch,
    }


def _wait_gpu_free(timeout_s: float = 120.0) -> None:
    """Block until the GPU's memory is (nearly) free again: the engine-alone phase fits its KV pool
    to free memory and would run out of it next to a job actor that is still exiting."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        used = _gpu_used_fraction()
        if used is not None and used < 0.1:
            return
        time.sleep(1.0)
    print(f"bench_pipeline: GPU memory still in use after {timeout_s:.0f}s", file=sys.stderr)


def _gpu_used_fraction() -> float | None:
    """GPU 0's used memory fraction through NVML (no CUDA context in this process: creating one
    fails while the job's actor still holds the memory), else through torch."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        return float(info.used) / float(info.total)
    except Exception:  # noqa: BLE001 - no NVML, or NVML failing: try torch
        pass
    try:
        import torch

        free, total = torch.cuda.mem_get_info()
        return 1.0 - free / total
    except Exception:  # noqa: BLE001 - e.g. out of memory creating the context: not free yet
        return None


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None  # module docstring is present
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=os.environ.get("PAGEMILL_CORPUS", "../shared/corpus/dev"))
    ap.add_argument("--out", required=True, help="output directory of the run (new or empty)")
    ap.add_argument("--json-out", default="", help="report file (default: <out>/_bench_pipeline.json)")
    ap.add_argument(
        "--min-pages",
        type=int,
        default=0,
        help="make >= this many distinct pages from byte-distinct copies of the corpus PDFs",
    )
    ap.add_argument("--no-engine-alone", action="store_true", help="skip the engine-alone run after the job")
    ap.add_argument("--allow-cpu", action="store_true", help="without CUDA: smoke run with model=tiny_random")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the job (key=value)")
    args = ap.parse_args(argv)

    import ray
    import torch

    from pipeline.run import compose, run

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(
            "bench_pipeline: no CUDA device; the benchmark needs a GPU (--allow-cpu: a CPU smoke run "
            "with model=tiny_random)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        print(
            f"bench_pipeline: --out {out} is not empty; give a new directory (a rerun there does no work)",
            file=sys.stderr,
        )
        return 2
    corpus, pages_made = Path(args.corpus).resolve(), None
    if args.min_pages:
        corpus, pages_made = make_copies(corpus, out.parent / f"{out.name}-corpus", args.min_pages)
    overrides = [
        f"model={'full_random' if cuda else 'tiny_random'}",
        "generation.force_length=text_layer",
        f"input.uri={corpus}",
        f"output.uri={out}",
        *args.overrides,
    ]
    try:
        cfg = compose(overrides)
    except Exception as e:  # noqa: BLE001 - ConfigValueError, or Hydra's own errors (they name the key too)
        print(f"bench_pipeline: configuration error: {e}", file=sys.stderr)
        return 2
    if not cfg.ray.address:
        os.environ["RAY_ADDRESS"] = "local"  # a fresh embedded Ray, never a cluster found in the environment
    command = "python -m jobs.bench_pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"bench_pipeline: {cfg.model.name}, mode {cfg.mode.name}, corpus {cfg.input.uri}\n  overrides: "
        f"{' '.join(overrides)}",
        flush=True,
    )

    t0 = time.perf_counter()
    with GpuSampler() as gpu:
        summary = run(cfg, dataset_stats=True)
    wall = time.perf_counter() - t0
    stats = summary.pop("ray_data_stats", "")
    operators = summary.pop("ray_data_operators", [])
    ray.shutdown()
    if cuda:
        _wait_gpu_free()  # the OCR actor's process exits after shutdown returns; its KV pool with it
    rows = read_rows(out, cfg.config_hash())
    json_out = Path(args.json_out) if args.json_out else out / "_bench_pipeline.json"
    result = _result(
        args, cfg, cuda, command, overrides, corpus, pages_made, rows, wall, summary, operators, gpu
    )
    result["ray_data_stats"] = stats
    json_out.write_text(json.dumps(result, indent=1, default=str))  # the job's figures survive a cut run
    print("\n== Ray Data stats\n" + stats)
    if not args.no_engine_alone:
        with GpuSampler() as engine_gpu:  # the same sampling beside the engine alone: its own gaps
            result.update(engine_alone(cfg, corpus, on_gpu=cuda))
        result["engine_gpu_util_samples"] = engine_gpu.samples
        for key, job, eng in (
            ("wall_ratio_job_vs_engine", "pages_per_s", "engine_pages_per_s"),
            ("steady_ratio_job_vs_engine", "steady_pages_per_s", "engine_steady_pages_per_s"),
        ):  # the targets: wall >= 0.85, steady >= 0.95
            if result.get(job) and result.get(eng):
                result[key] = round(result[job] / result[eng], 3)
        if result.get("cpu_s_per_page_total") and result.get("engine_pages_per_s"):
            # measured CPU seconds per page of the job's processes x the engine's pages/s (one GPU)
            result["cores_per_gpu_at_engine_speed"] = round(
                result["cpu_s_per_page_total"] * result["engine_pages_per_s"], 2
            )
        json_out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "ray_data_stats"}))
    print(f"report: {json_out}")
    return 0 if summary["accounting_ok"] else 1


def _result(
    args: argparse.Namespace,
    cfg: Any,
    cuda: bool,
    command: str,
    overrides: list[str],
    corpus: Path,
    pages_made: int | None,
    rows: list[dict[str, Any]],
    wall: float,
    summary: dict[str, Any],
    operators: list[dict[str, Any]],
    gpu: GpuSampler,
) -> dict[str, Any]:
    """The job's part of the report (the engine-alone figures are added after)."""
    import ray
    import torch

    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "overrides": overrides,
        "model": cfg.model.name,
        "mode": cfg.mode.name,
        "config_hash": cfg.config_hash(),
        "corpus": str(corpus),
        "pages_made": pages_made,
        **report(rows, wall),
        **steady_state(summary),
        **startup(summary, sum(1 for r in rows if r["page_index"] >= 0)),
        "pipeline_wall_s": summary["wall_time_s"],
        "accounting_ok": summary["accounting_ok"],
        # per Ray Data operator: bytes out per row (a page, after the render stage) and CPU s per row
        "operators": [
            {**o, "bytes_per_page": o["bytes_per_row"], "cpu_s_per_page": o["cpu_s_per_row"]}
            for o in operators
        ],
        "gpu_util_source": gpu.source,
        "gpu_util_every_s": gpu.every_s,
        "gpu_util_poll_s": gpu.poll_s,
        "gpu_util_samples": gpu.samples,
        # the same 10-s windows (from the job's start, ~the sampler's): pages in the OCR actors
        "ocr_occupancy_samples": summary.get("ocr_occupancy", []),
    }


if __name__ == "__main__":
    sys.exit(main())
