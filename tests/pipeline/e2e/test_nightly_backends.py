"""The nightly guarantees on both backends, input and output: local `file://` and a real S3 server
(moto server mode on 127.0.0.1, reached through s3fs `storage_options` by the driver and by every
Ray worker). A run whose driver is SIGKILLed mid-run resumes to exactly the rows of one
uninterrupted build (so the backends agree), and an incremental rerun on S3 writes nothing.

The tiny random-weight model is deterministic on CPU, so an interrupted-then-resumed build must
end with exactly the rows (and statuses, and text) of an uninterrupted one."""

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


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> list[tuple]:
    """The rows of one uninterrupted build of DOCS (local files): what every interrupted-then-resumed
    build must end with, on either backend."""
    import fsspec

    root = tmp_path_factory.mktemp("reference")
    src = root / "in"
    src.mkdir()
    for n in DOCS:
        (src / n).write_bytes((corpus_dir / n).read_bytes())
    full = _run(str(src), str(root / "out"), [])
    assert full.returncode == 0, full.stderr[-3000:]
    return _rows(fsspec.filesystem("file"), str(root / "out"))


def _kill_mid_run(proc: subprocess.Popen, log: Any, fs: Any, path: str, driver_only: bool) -> None:
    """SIGKILL the run once it has committed two ledger parts: on file:// its driver alone (its
    embedded Ray must go down with it), on s3:// its whole process group."""
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
    if not driver_only:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # wait for the driver's embedded Ray to go down with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)


def test_sigkill_then_resume_equals_uninterrupted(backend, reference: list[tuple]) -> None:
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
    _kill_mid_run(proc, log, fs, path, driver_only=src.startswith("file://"))
    partial = len(_rows(fs, path))
    assert 0 < partial < len(reference), "kill came too late to test a resume"

    # 2. the resume completes the build, with exactly the rows of the uninterrupted one (the tiny
    # model is deterministic on CPU), so also equal across backends
    resumed = _run(src, out, extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = _summary(fs, path)
    assert s["accounting_ok"] and s["rows_already_final"] >= partial and s["rows_written"] > 0
    final = _rows(fs, path)
    assert len(final) == len(set(final)) == s["rows_expected"]
    assert final == reference

    # 3. on S3, an incremental rerun over unchanged inputs writes nothing (on local files
    # test_nightly.py's incremental test checks that, down to every data file's bytes and mtime)
    if src.startswith("s3://"):
        again = _run(src, out, extra)
        assert again.returncode == 0, again.stderr[-3000:]
        s2 = _summary(fs, path)
        assert s2["rows_written"] == 0 and s2["accounting_ok"] and _rows(fs, path) == final
