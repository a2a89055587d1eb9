"""The run lease with real concurrent processes, on local disk and on a real S3 server (moto):
of racing runs exactly one holds the root, a stale lease (frozen holder) is taken over and its
holder finds out, a `kill -9`ed holder on this host is replaced at once, the job refuses with
exit code 6 naming the holder and releases its lease also when it fails, and start-up removes
only temporaries older than the lease."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline.e2e.helpers import REPO, job_env, run_job


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path: Path) -> tuple[str, dict[str, Any], Any]:
    """(output uri, storage options, fsspec filesystem) of one backend."""
    import fsspec

    if request.param == "file":
        return str(tmp_path / "out"), {}, fsspec.filesystem("file")
    bucket, fs, so = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", dict(so), fs


def _holder(uri: str, opts: dict[str, Any], timeout_s: float, run_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.pipeline.lease_holder", uri, str(timeout_s), run_id, json.dumps(opts)],
        cwd=REPO,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_line(p: subprocess.Popen[str], timeout: float = 60) -> str:
    assert p.stdout is not None
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if line:
            return line.strip()
        if p.poll() is not None:
            raise AssertionError(f"holder exited {p.returncode}: {p.stderr.read() if p.stderr else ''}")
    raise AssertionError("holder said nothing")


def _records(fs: Any, uri: str) -> list[dict[str, Any]]:
    path = uri.split("://", 1)[-1]
    fs.invalidate_cache()
    names = sorted(
        p for p in fs.ls(f"{path}/_lease", detail=False) if p.rsplit("/", 1)[-1].startswith("gen-")
    )
    return [json.loads(fs.cat_file(p)) for p in names]


def _stop(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_racing_runs_exactly_one_holds(root) -> None:
    uri, opts, _ = root
    procs = [_holder(uri, opts, 600, f"race{i}") for i in range(4)]
    try:
        lines = [_first_line(p) for p in procs]
    finally:
        _stop(*procs)
    held = [x for x in lines if x.startswith("held")]
    assert len(held) == 1, lines
    refused = [x for x in lines if x.startswith("refused")]
    assert len(refused) == 3 and all("in use by run race" in x for x in refused), lines


def test_stale_lease_is_taken_over_and_its_holder_finds_out(root) -> None:
    uri, opts, fs = root
    first = _holder(uri, opts, 1.5, "frozen")
    second = None
    try:
        assert _first_line(first) == "held 1"
        os.kill(first.pid, signal.SIGSTOP)  # alive but silent: its heartbeat goes stale
        time.sleep(0.3)
        refused = _holder(uri, opts, 600, "early")  # heartbeat still fresh for a 600 s timeout
        assert _first_line(refused).startswith("refused"), "took a fresh lease"
        refused.wait()
        assert refused.returncode == 6
        time.sleep(2.0)
        second = _holder(uri, opts, 1.5, "taker")
        assert _first_line(second) == "held 2"
        os.kill(first.pid, signal.SIGCONT)
        assert _first_line(first) == "lost"
        first.wait(timeout=30)
        assert first.returncode == 7
        recs = _records(fs, uri)
        assert [r["run_id"] for r in recs][-1] == "taker"
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
        _stop(first, *([second] if second else []))


def test_killed_holder_on_this_host_is_replaced_at_once(root) -> None:
    uri, opts, _ = root
    first = _holder(uri, opts, 600, "killed")
    assert _first_line(first) == "held 1"
    first.kill()
    first.wait()
    second = _holder(uri, opts, 600, "next")  # 600 s timeout: only the dead pid lets it in
    try:
        assert _first_line(second) == "held 2"
    finally:
        _stop(second)


def test_startup_removes_only_temporaries_older_than_the_lease(tmp_path: Path) -> None:
    from pipeline.lease import Lease
    from pipeline.ledger import Ledger
    from pipeline.outputs import OutputStore

    store = OutputStore(str(tmp_path / "out"))
    pages = tmp_path / "out" / "pages"
    pages.mkdir(parents=True)
    old, new = pages / ".tmp-aaa-part-1.parquet", pages / ".tmp-bbb-part-2.parquet"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # a crashed run's, an hour ago
    lease = Lease(store, "r", 600).acquire()
    try:
        new.write_bytes(b"y")  # in flight since the lease started (e.g. a run that lost its lease)
        Ledger.load(store, "h", temporaries_before=lease.started_at)
    finally:
        lease.release()
    assert not old.exists() and new.exists()
    assert _records(__import__("fsspec").filesystem("file"), str(tmp_path / "out"))[-1]["released"]


# ----------------------------------------------------------------------------- the job itself


def _job(src: Path, uri: str, opts: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    return run_job(
        "mode=tiny",
        "generation.max_new_tokens=4",
        f"input.uri={src}",
        f"output.uri={uri}",
        *(f"+output.storage_options.{k}='{v}'" for k, v in opts.items()),
        *extra,
        timeout=600,
        env={"RAY_ADDRESS": "local"},
    )


@pytest.fixture
def s3_root(s3_bucket) -> tuple[str, dict[str, Any], Any]:
    bucket, fs, so = s3_bucket
    return f"s3://{bucket}/out", dict(so), fs


@pytest.mark.slow
def test_job_refuses_takes_over_and_releases(s3_root, corpus_copy) -> None:
    """The job's use of the lease (exit 6 naming the holder, taking a stale lease over, releasing it
    also when the run fails) is the same code on every backend; it runs here on S3, the harder one
    (conditional writes), while the lease itself is tested on both backends above."""
    uri, opts, fs = s3_root
    src = corpus_copy("form-libreoffice-01.pdf")
    holder = _holder(uri, opts, 3, "holder-run")
    try:
        assert _first_line(holder) == "held 1"
        # 1. a second run on the same root refuses, naming the holder
        refused = _job(src, uri, opts)
        assert refused.returncode == 6, refused.stderr[-2000:]
        msg = refused.stderr
        assert "in use by run holder-run" in msg and f"pid {holder.pid}" in msg
        assert "host " in msg and "started 20" in msg
        path = uri.split("://", 1)[-1]
        assert not fs.exists(f"{path}/pages"), "a refused run wrote output"
        # 2. the holder freezes: past output.lease_timeout_s the job takes its lease over
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(3.5)
        took = _job(src, uri, opts, "output.lease_timeout_s=3")
        assert took.returncode == 0, took.stderr[-3000:]
        assert "took over the stale lease of run holder-run" in took.stderr
        recs = _records(fs, uri)
        assert recs[-1]["released"] and recs[-1]["run_id"] != "holder-run"
        os.kill(holder.pid, signal.SIGCONT)
        assert _first_line(holder) == "lost"
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
        _stop(holder)
    # 3. a run that fails after taking the lease releases it
    failed = _job(tmp := src / "missing", uri, opts)
    assert failed.returncode == 2 and str(tmp.name) in failed.stderr, failed.stderr[-2000:]
    recs = _records(fs, uri)
    assert recs[-1]["released"] and len(recs) == 2  # older generations are pruned
