"""The job as a Ray-native cluster job, on a real local multi-node cluster (`ray.cluster_utils`):
a bare `ray.init()` joins through RAY_ADDRESS (no num_cpus passed, which Ray would refuse), a local
output path on a multi-node cluster is a config error, and the OCR pool waits for its GPU-like
resource (`ocr_slot`, standing in for GPUs: CI has none) that joins only after the job started
instead of running the model on CPU; with none ever joining it fails, bounded, with a clear message.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.cluster import NoGpuError
from pipeline.config import ConfigValueError

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
FAST = ["model=tiny_random", "progress=false", f"input.uri={REPO / 'tests' / 'data'}", "mode=tiny",
        "generation.max_new_tokens=4", "ray.ocr_resource=ocr_slot"]


def test_cluster_job_joins_waits_for_gpu_nodes_and_checks_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.run import compose, run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)  # a CPU worker; the GPU-like node comes later
    cluster.wait_for_nodes()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    try:
        # 1. local output on a 2-node cluster: config error, nothing written
        out = tmp_path / "local-out"
        with pytest.raises(ConfigValueError, match="output.uri.*shared storage"):
            run(compose([*FAST, f"output.uri={out}", f"input.uri=s3://bucket/in"]))
        assert not out.exists()
        assert ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) == 2  # joined, not embedded
        ray.shutdown()

        # 2. no OCR resource ever: bounded wait, clear message (not a silent CPU fallback)
        with pytest.raises(NoGpuError, match="ocr_slot.*ray.gpu_wait_s=3.*model.device=cpu"):
            run(compose([*FAST, f"output.uri={tmp_path / 'none'}", "ray.shared_fs=true", "ray.gpu_wait_s=3"]))
        ray.shutdown()

        # 3. the GPU-like node joins 5 s after the job started: the job waits for it and finishes.
        # The job runs in a thread (nodes can only be added from the main thread).
        cfg = compose([*FAST, f"output.uri={tmp_path / 'out'}", "ray.shared_fs=true", "ray.gpu_wait_s=120",
                       "ray.ocr_concurrency=[1,2]"])
        result: dict = {}

        def job() -> None:
            try:
                result["summary"] = run(cfg)
            except BaseException as e:  # surfaced by the assertion below
                result["error"] = e

        started = time.time()
        t = threading.Thread(target=job, daemon=True)
        t.start()
        time.sleep(5)
        assert t.is_alive() and not (tmp_path / "out" / "pages").exists()  # waiting, not OCR on CPU
        cluster.add_node(num_cpus=2, resources={"ocr_slot": 1})
        added = time.time()
        t.join(timeout=400)
        assert "error" not in result, result.get("error")
        summary = result["summary"]
        assert added > started and summary["accounting_ok"] and summary["rows_out"] == 5
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_nightly_submission_is_ray_native_and_refused_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs/nightly.sh against a real local cluster's job server (a `ray.cluster_utils` head with
    the dashboard, shut down by the test itself): the job is a plain `ray job submit -- python -m
    pipeline.run +cluster=ray …` whose driver joins through RAY_ADDRESS, under the submission id
    derived from the output root and the date; the same night submitted again is refused by Ray."""
    import os
    import socket
    import subprocess
    import sys

    from ray.cluster_utils import Cluster

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dash = s.getsockname()[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
               NIGHTLY_DATE="2026-12-01")
    env.pop("RAY_ADDRESS", None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway loopback cluster; real clusters keep their auth
    monkeypatch.setenv("PATH", env["PATH"])  # the job's `python` entrypoint: this interpreter (as in a venv)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash})
    try:
        address = f"http://127.0.0.1:{dash}"
        for _ in range(60):  # the job server comes up a little after the head
            if subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True,
                              timeout=60).returncode == 0:
                break
            time.sleep(1)
        out = tmp_path / "nightly"
        cmd = ["bash", "jobs/nightly.sh", "input.uri=tests/data", f"output.uri={out}", *FAST[:2], *FAST[3:5]]
        env["RAY_ADDRESS"] = address
        for _ in range(30):  # the job agent registers a little after the job server answers
            first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in first.stderr:
                break
            time.sleep(2)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        sid = next(line.split()[-1] for line in first.stderr.splitlines() if "submission id" in line)
        assert sid.startswith("pagemill-nightly-") and sid.endswith("-2026-12-01")
        assert (out / "2026-12-01" / "_summary.json").exists()
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0 and "already exists" in (second.stdout + second.stderr).lower()
    finally:
        cluster.shutdown()
