"""Helpers for the end-to-end scenario tests: the job as a subprocess, its environment, its rows.

`run_job` runs `python -m pipeline.run` exactly as a user would (tiny random model, no progress
bar), with the environment of an activated venv on a machine without GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parents[3]


def job_env() -> dict[str, str]:
    """The job's environment: no GPU, this repo importable, unbuffered, Ray's logs undeduplicated."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # as in an activated venv: the job's `python` entrypoint is this interpreter
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_job(
    *overrides: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline.run", "model=tiny_random", "progress=false", *overrides]
    return subprocess.run(
        cmd, cwd=REPO, env={**job_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def read_pages(out: Path) -> list[dict]:
    """Every row under `<out>/pages/`, read back with pyarrow."""
    return ds.dataset(out / "pages", format="parquet").to_table().to_pylist()
