"""Compaction and dated snapshots with the real job (subprocess, embedded Ray, tiny random model).

- A build is compacted, the compaction process dies right after its swap, report / inspect /
  documents / a resumed nightly all see every row once; the resumed nightly OCRs nothing; the
  next compaction finishes and the rows are exactly those of the uncompacted build.
- "dated" nightlies (jobs/nightly.sh) build into one store and write per-day snapshots: the second
  night OCRs only the new document, each day's snapshot holds exactly that night's input, and the
  first night's snapshot survives the store's compaction (hard links).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.compact import FAULT_ENV
from tests.pipeline.e2e.helpers import REPO, job_env, run_job

pytestmark = pytest.mark.slow
FAST = [
    "mode=tiny",
    "generation.max_new_tokens=4",
    "render.pages_per_task=1",
    "ray.ocr_batch_size=1",
    "ray.write_batch_size=1",  # one part per page: many small parts to compact
]
COLUMNS = ["doc_id", "page_index", "status", "config_hash", "markdown"]


def _rows(root: Path) -> list[tuple]:
    t = ds.dataset(root / "pages", format="parquet").to_table(columns=COLUMNS)
    return sorted(zip(*(t.column(n).to_pylist() for n in COLUMNS)))


def _summary(root: Path) -> dict:
    return json.loads((root / "_summary.json").read_text())


def _compact(out: Path, fault: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.compact", str(out), "--target-mb", "64"],
        cwd=REPO,
        env={**job_env(), FAULT_ENV: fault},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compaction_between_nightlies_keeps_readers_and_resume_exact(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for n in ("paper-arxiv-math-01.pdf", "form-libreoffice-01.pdf", "not-a-pdf-01.pdf"):
        shutil.copy(REPO / "tests" / "data" / n, src / n)
    out = tmp_path / "out"
    args = [f"input.uri={src}", f"output.uri={out}", *FAST]
    first = run_job(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _rows(out)
    parts = len(list((out / "pages").glob("*.parquet")))
    assert parts >= 3 and len(before) == _summary(out)["rows_out"]
    docs_before = ds.dataset(out / "documents", format="parquet").to_table().num_rows

    died = _compact(out, fault="committed")  # killed right after the swap, old parts still there
    assert died.returncode == 9, died.stderr[-3000:]
    assert len(list((out / "pages").glob("*.parquet"))) == parts + 1
    from pipeline.documents import assemble_documents
    from pipeline.inspect import find_row
    from pipeline.outputs import OutputStore
    from pipeline.report import load_rows

    store = OutputStore(str(out))
    assert len(load_rows(store, None)["doc_id"]) == len(before)  # report: each row once
    doc, page = before[0][0], before[0][1]
    assert find_row(store, doc, page, None)["page_index"] == page  # inspect: one row
    assert assemble_documents(store, _summary(out)["config_hash"]) == docs_before  # documents

    resumed = run_job(*args)  # the nightly: rolls the swap forward, OCRs nothing
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = _summary(out)
    assert s["rows_written"] == 0 and s["accounting_ok"] and s["rows_out"] == len(before)
    assert len(list((out / "pages").glob("*.parquet"))) == 1 and _rows(out) == before
    assert not list((out / "_compact").glob("*.json"))

    done = _compact(out)  # nothing small left to pair
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["swaps"] == 0 and _rows(out) == before


def test_dated_nightlies_reuse_the_store(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for n in ("paper-arxiv-math-01.pdf", "not-a-pdf-01.pdf"):
        shutil.copy(REPO / "tests" / "data" / n, src / n)
    nightly = tmp_path / "nightly"
    common = ["model=tiny_random", "progress=false", f"input.uri={src}", *FAST]

    def night(day: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "jobs/nightly.sh", f"output.uri={nightly}", *common],
            cwd=REPO,
            env={**job_env(), "NIGHTLY_DATE": day},
            capture_output=True,
            text=True,
            timeout=900,
        )

    one = night("2026-01-01")
    assert one.returncode == 0, one.stderr[-3000:]
    store, day1 = nightly / "_store", nightly / "2026-01-01"
    first = _summary(store)
    assert first["rows_written"] == first["rows_out"] > 0
    rows1 = _rows(day1)
    assert rows1 == _rows(store) and len(rows1) == first["rows_out"]
    assert _summary(day1)["snapshot_of"] == str(store)
    linked = next((day1 / "pages").glob("*.parquet"))  # hard link: no bytes copied
    assert linked.stat().st_ino == (store / "pages" / linked.name).stat().st_ino

    (src / "not-a-pdf-01.pdf").unlink()  # the second night: one document gone, one new
    shutil.copy(REPO / "tests" / "data" / "form-libreoffice-01.pdf", src / "form-libreoffice-01.pdf")
    two = night("2026-01-02")
    assert two.returncode == 0, two.stderr[-3000:]
    day2 = nightly / "2026-01-02"
    second = _summary(store)
    new_doc = {r[0] for r in _rows(store)} - {r[0] for r in rows1}
    assert len(new_doc) == 1
    rows_new = [r for r in _rows(store) if r[0] in new_doc]
    assert second["rows_written"] == len(rows_new)  # only the new document was OCRed
    gone = {r[0] for r in rows1 if r[2] == "doc_error"}
    rows2 = _rows(day2)
    assert rows2 == sorted([r for r in rows1 if r[0] not in gone] + rows_new)  # exactly night 2's input
    docs2 = ds.dataset(day2 / "documents", format="parquet").to_table(columns=["doc_id"])
    assert set(docs2.column("doc_id").to_pylist()) == {r[0] for r in rows2}
    assert _rows(day1) == rows1  # the first night's snapshot is unchanged

    compacted = _compact(store)  # compaction of the store leaves the dated snapshots intact
    assert compacted.returncode == 0, compacted.stderr[-3000:]
    assert json.loads(compacted.stdout.splitlines()[-1])["swaps"] == 1
    assert _rows(day1) == rows1 and _rows(day2) == rows2
    again = night("2026-01-02")  # a rerun of the night: no OCR, the same snapshot
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary(store)["rows_written"] == 0 and _rows(day2) == rows2
