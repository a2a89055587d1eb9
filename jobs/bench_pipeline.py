"""End-to-end pipeline benchmark: the Ray job (render -> preprocess -> OCR -> write Parquet) on a
corpus with the engine benchmark's workload (`jobs/benchmark.py`): the full-size architecture with
random bf16 weights (`model=full_random`), Gundam mode, every page's output length forced to its
text-layer target (`generation.force_length=text_layer`).

    python -m jobs.bench_pipeline --corpus ../shared/corpus/dev --out /tmp/bench-e2e \\
        --json-out bench_pipeline.json [hydra overrides, e.g. generation.max_batch=128]

Runs `pipeline.run.run` in this process on embedded local Ray, timed from before Ray starts to the
end of the run (model load, rendering and the documents/ build included), then reads the written
Parquet back and reports JSON (printed and written to --json-out). `--allow-cpu` without CUDA:
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

OCR_DONE = ("ok", "truncated", "repetition")  # OCR produced output (forced pages end `truncated`)


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
        "rows_written": len(rows), "pages_written": len(pages), "pages_ocr_ok": len(done),
        "rows_by_status": by_status, "output_tokens": tokens,
        # forced pages generate exactly their target, so this is the mean forced length
        "mean_forced_tokens": round(tokens / len(done), 1) if done else 0.0,
        "wall_s": round(wall, 2),
        "pages_per_s": round(len(pages) / wall, 4), "pages_per_day": round(len(pages) / wall * 86400),
        "output_tokens_per_s": round(tokens / wall, 1),
    }
    timed = [r for r in done if r["written_at"] is not None and r["ocr_ms"] is not None]
    if timed:
        start = min(r["written_at"].timestamp() - r["ocr_ms"] / 1000 for r in timed)
        window = max(r["written_at"].timestamp() for r in timed) - start
        out["ocr_window_s"] = round(window, 2)
        out["ocr_window_note"] = ("estimate from the rows: earliest (written_at - ocr_ms) to the last written_at; "
                                  "excludes model load and the first render, includes the last write")
        if window > 0:
            out["pages_per_s_ocr_window"] = round(len(done) / window, 4)
            out["pages_per_day_ocr_window"] = round(len(done) / window * 86400)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench_pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=os.environ.get("PAGEMILL_CORPUS", "../shared/corpus/dev"))
    ap.add_argument("--out", required=True, help="output directory of the run (new or empty)")
    ap.add_argument("--json-out", default="", help="report file (default: <out>/_bench_pipeline.json)")
    ap.add_argument("--allow-cpu", action="store_true", help="without CUDA: smoke run with model=tiny_random")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the job (key=value)")
    args = ap.parse_args(argv)

    import ray
    import torch

    from pipeline.run import compose, run

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("bench_pipeline: no CUDA device; the benchmark needs a GPU (--allow-cpu: a CPU smoke run "
              "with model=tiny_random)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        print(f"bench_pipeline: --out {out} is not empty; give a new directory (a rerun there does no work)",
              file=sys.stderr)
        return 2
    overrides = [f"model={'full_random' if cuda else 'tiny_random'}", "generation.force_length=text_layer",
                 f"input.uri={Path(args.corpus).resolve()}", f"output.uri={out}", *args.overrides]
    try:
        cfg = compose(overrides)
    except Exception as e:  # noqa: BLE001 - ConfigValueError, or Hydra's own errors (they name the key too)
        print(f"bench_pipeline: configuration error: {e}", file=sys.stderr)
        return 2
    if not cfg.ray.address:
        os.environ["RAY_ADDRESS"] = "local"  # a fresh embedded Ray, never a cluster found in the environment
    command = "python -m jobs.bench_pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"bench_pipeline: {cfg.model.name}, mode {cfg.mode.name}, corpus {cfg.input.uri}\n  overrides: "
          f"{' '.join(overrides)}", flush=True)

    t0 = time.perf_counter()
    summary = run(cfg, dataset_stats=True)
    wall = time.perf_counter() - t0
    stats = summary.pop("ray_data_stats", "")
    ray.shutdown()

    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "ray": ray.__version__, "date": time.strftime("%Y-%m-%d"), "command": command, "overrides": overrides,
        "model": cfg.model.name, "mode": cfg.mode.name, "config_hash": cfg.config_hash(),
        **report(read_rows(out, cfg.config_hash()), wall),
        "pipeline_wall_s": summary["wall_time_s"], "accounting_ok": summary["accounting_ok"],
        "ray_data_stats": stats,
    }
    print("\n== Ray Data stats\n" + stats)
    json_out = Path(args.json_out) if args.json_out else out / "_bench_pipeline.json"
    json_out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "ray_data_stats"}))
    print(f"report: {json_out}")
    return 0 if summary["accounting_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
