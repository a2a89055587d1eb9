"""Multi-node behaviour on one machine: `ray.cluster_utils.Cluster` with a head and three worker
nodes, each worker offering one unit of a custom `ocr_slot` resource that stands in for a GPU (one
OCR actor per unit). A worker node is removed mid-run; the job must still account for every page.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_node_removed_mid_run_every_page_accounted(tmp_path: Path, corpus_copy) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.run import compose, run

    src = corpus_copy("slides-deck-26p-01.pdf", "report-ibm-redbook-18p-01.pdf", "not-a-pdf-01.pdf")
    out = tmp_path / "out"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    workers = [cluster.add_node(num_cpus=2, resources={"ocr_slot": 1}) for _ in range(3)]
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        cfg = compose(
            [
                "model=tiny_random",
                "progress=false",
                f"input.uri={src}",
                f"output.uri={out}",
                f"ray.address={cluster.address}",
                "ray.ocr_resource=ocr_slot",
                "ray.shared_fs=true",
                "mode=tiny",
                "generation.max_new_tokens=4",
                "generation.fallback=none",
                "render.pages_per_task=4",
                "ray.ocr_batch_size=4",
                "ray.write_batch_size=4",
            ]
        )
        removed: list[float] = []

        def remove_one() -> None:
            deadline = time.time() + 300
            while time.time() < deadline and len(list((out / "_ledger").glob("part-*.parquet"))) < 2:
                time.sleep(0.2)
            cluster.remove_node(workers[1])
            removed.append(time.time())

        t = threading.Thread(target=remove_one, daemon=True)
        t.start()
        summary = run(cfg)
        finished = time.time()
        t.join(timeout=60)
        assert removed and removed[0] < finished, "the node was not removed during the run"
        assert summary["accounting_ok"], summary["missing_documents"]
        assert summary["rows_out"] == summary["rows_expected"] == 26 + 18 + 1
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ocr_actor_sigkilled_through_ray_state_is_replaced(tmp_path: Path, corpus_copy) -> None:
    """Find the live OCR actor in Ray's actor table while the job runs and SIGKILL its process:
    Ray Data starts a replacement, the killed actor's batches are rerun, every page is accounted."""
    import os
    import signal

    import ray
    from ray._private import state  # GCS actor table: works without the dashboard

    from pipeline.run import compose, run

    src = corpus_copy("slides-deck-26p-01.pdf", "report-ibm-redbook-18p-01.pdf")
    out = tmp_path / "out"
    cfg = compose(
        [
            "model=tiny_random",
            "progress=false",
            f"input.uri={src}",
            f"output.uri={out}",
            "mode=tiny",
            "generation.max_new_tokens=4",
            "generation.fallback=none",
            "render.pages_per_task=4",
            "ray.ocr_batch_size=4",
            "ray.write_batch_size=4",
        ]
    )
    killed: list[int] = []

    def kill_ocr_actor() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if list((out / "_ledger").glob("part-*.parquet")):  # OCR is producing rows
                for a in state.actors().values():
                    if (
                        "OcrStage" in (a.get("ActorClassName") or "")
                        and a.get("State") == "ALIVE"
                        and a.get("Pid")
                    ):
                        os.kill(a["Pid"], signal.SIGKILL)
                        killed.append(a["Pid"])
                        break
            time.sleep(0.2)

    try:
        from pipeline.run import init_ray

        init_ray(cfg)
        t = threading.Thread(target=kill_ocr_actor, daemon=True)
        t.start()
        summary = run(cfg)
        t.join(timeout=30)
    finally:
        ray.shutdown()
    assert killed, "no OCR actor was found alive to kill"
    assert summary["accounting_ok"], summary["missing_documents"]
    assert summary["rows_out"] == summary["rows_expected"] == 26 + 18
