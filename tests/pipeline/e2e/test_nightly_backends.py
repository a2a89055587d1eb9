"""The nightly guarantees on both backends, input and output: local `file://` and a real S3 server
(moto server mode on 127.0.0.1, reached through s3fs `storage_options` by the driver and by every
Ray worker). An incremental rerun writes nothing, a run whose driver is SIGKILLed mid-run resumes,
and the final rows are equal across backends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from tests.pipeline.e2e.helpers import REPO, job_env

pytestmark = pytest.mark.slow
FAST = [
    "mode=tiny",
    "generation.max_new_tokens=4",
    "render.pages_per_task=4",
    "ray.ocr_batch_size=4",
    "ray.write_batch_size=8",
]
DOCS = ("slides-deck-26p-01.pdf", "form-libreoffice-01.pdf", "not-a-pdf-01.pdf")
COLUMNS = ["doc_id", "page_index", "status", "config_hash", "markdown", "error_code"]


def _opts(side: str, so: dict[str, Any]) -> list[str]:
    return [f"+{side}.storage_options.{k}='{v}'" for k, v in so.items()]


@pytest.fixture(params=["file", "s3"])
def backend(request, tmp_path: Path, corpus_dir: Path):
    """(input uri, output uri, extra overrides, fsspec filesystem, output path) of one backend."""
    import fsspec

    if request.param == "file":
        src = tmp_path / "in"
        src.mkdir()
        for n in DOCS:
            (src / n).write_bytes((corpus_dir / n).read_bytes())
        return (
            f"file://{src}",
            f"file://{tmp_path / 'out'}",
            [],
            fsspec.filesystem("file"),
            str(tmp_path / "out"),
        )
    bucket, fs, so = request.getfixturevalue("s3_bucket")
    for n in DOCS:
        fs.pipe(f"{bucket}/in/{n}", (corpus_dir / n).read_bytes())
    return (
        f"s3://{bucket}/in",
        f"s3://{bucket}/out",
        [*_opts("input", so), *_opts("output", so)],
        fs,
        f"{bucket}/out",
    )


def _cmd(src: str, out: str, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.run",
        "model=tiny_random",
        "progress=false",
        f"input.uri={src}",
        f"output.uri={out}",
        *FAST,
        *extra,
    ]


def _env_local() -> dict[str, str]:
    return {**job_env(), "RAY_ADDRESS": "local"}  # embedded Ray even if another cluster runs here


def _run(src: str, out: str, extra: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cmd(src, out, extra),
        check=False,
        cwd=REPO,
        env=_env_local(),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _rows(fs: Any, path: str) -> list[tuple]:
    fs.invalidate_cache()
    t = ds.dataset(f"{path}/pages", filesystem=fs, format="parquet").to_table(columns=COLUMNS)
    return sorted(tuple(r.values()) for r in t.to_pylist())


def _summary(fs: Any, path: str) -> dict:
    import json

    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{path}/_summary.json"))


_REFERENCE: dict[str, list[tuple]] = {}


@pytest.mark.parametrize("step", ["incremental_and_resume"])
def test_backends_incremental_and_resume(backend, step: str) -> None:
    src, out, extra, fs, path = backend
    # 1. a run whose driver is SIGKILLed after its first commits (its log kept for a failure message)
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        _cmd(src, out, extra),
        cwd=REPO,
        env=_env_local(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(
                f"the run ended (exit {proc.returncode}) before it could be killed:\n{log.read()[-4000:]}"
            )
        fs.invalidate_cache()
        if len([p for p in (fs.glob(f"{path}/_ledger/part-*.parquet") or [])]) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(_rows(fs, path))
    assert partial > 0

    # 2. the resume completes the build
    resumed = _run(src, out, extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = _summary(fs, path)
    assert s["accounting_ok"] and s["rows_already_final"] >= partial
    final = _rows(fs, path)
    assert len(final) == len(set(final)) == s["rows_expected"]

    # 3. an incremental rerun over unchanged inputs writes nothing
    again = _run(src, out, extra)
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = _summary(fs, path)
    assert s2["rows_written"] == 0 and s2["accounting_ok"] and _rows(fs, path) == final

    # 4. equal across backends (the file run is parametrized first)
    other = _REFERENCE.setdefault("rows", final)
    assert final == other
