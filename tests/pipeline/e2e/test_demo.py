"""The newcomer's offline demo, exactly as the README gives it: `python -m pipeline.run
model=tiny_random` on the bundled sample PDFs (tests/data). Its rows are checked against the
sample MANIFEST and its console against Ray's internal chatter. Its wall time is checked by the bar
stated in BENCHMARKS.md ("First run"), measured with `time make run ARGS=model=tiny_random`, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parents[3]
# the README's demo, one run: in the default suite (`make test`)


def test_offline_demo_rows_and_quiet_console(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.run", "model=tiny_random", f"output.uri={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pagemill run summary" in proc.stdout
    rows = ds.dataset(out / "pages", format="parquet").to_table().to_pylist()
    # tests/data: 3 one-page PDFs, one encrypted (needs_password) and one not a PDF
    assert len(rows) == 5
    assert sorted(r["error_code"] or "" for r in rows if r["status"] == "doc_error") == [
        "needs_password",
        "not_a_pdf",
    ]
    pages = [r for r in rows if r["page_index"] >= 0]
    assert len(pages) == 3
    # the tiny model's group makes generation short: at most 64 tokens, one pass (no fallback)
    assert all(r["num_output_tokens"] <= 64 and r["attempts"] == 1 for r in pages)
    console = proc.stdout + proc.stderr
    for noise in (
        "core_worker.cc",
        "ray_remote_args",
        "Token authentication",
        "streaming_executor",
        "RayDeprecationWarning",
        "Progress bars disabled",
    ):
        assert noise not in console, noise
