"""End to end: one `python -m pipeline.run` on the bundled samples with the tiny random model and
page images on, then everything a user looks at: documents/, quality columns, the page images
through `datasets`, `python -m pipeline.report` and `python -m pipeline.inspect` on that output.
(The tiny model never ends a page: every page is `truncated`, the case the report must handle.)"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from PIL import Image

from pipeline.schema import DOCUMENT_SCHEMA
from tests.pipeline.e2e.helpers import REPO, job_env, read_pages, run_job

# one run shared by every test here: in the default suite (`make test`)


@pytest.fixture(scope="module")
def run_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "out"
    proc = run_job(
        "input.uri=tests/data",
        f"output.uri={out}",
        "mode=tiny",
        "generation.max_new_tokens=8",
        "generation.fallback=none",
        "output.include_images=true",
        timeout=600,
        env={"RAY_ADDRESS": "local"},
    )  # its own embedded Ray, even beside a running cluster
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_documents_and_quality_columns(run_output: Path) -> None:
    docs = ds.dataset(run_output / "documents", format="parquet").to_table()
    assert docs.schema.remove_metadata().equals(DOCUMENT_SCHEMA.remove_metadata())
    docs = {r["source_uri"].rsplit("/", 1)[-1]: r for r in docs.to_pylist()}
    assert len(docs) == 5
    for name in ("paper-arxiv-math-01.pdf", "cjk-ja-vertical-01.pdf", "form-libreoffice-01.pdf"):
        d = docs[name]
        assert (d["page_count"], d["pages_truncated"], d["pages_ok"], d["text"]) == (1, 1, 0, "")
    assert (
        docs["not-a-pdf-01.pdf"]["error_code"] == "not_a_pdf"
        and docs["not-a-pdf-01.pdf"]["pages_doc_error"] == 1
    )

    pages = [r for r in read_pages(run_output) if r["page_index"] >= 0]
    assert len(pages) == 3
    for r in pages:
        assert r["status"] == "truncated" and r["finish_reason"] == "length" and r["written_at"] is not None
        assert r["attempts"] == 1 and r["fallback"] is None  # generation.fallback=none: no second pass
        assert r["num_text_tokens"] >= 0 and 0.0 <= r["repetition_score"] <= 1.0
        assert r["compression_ratio"] == pytest.approx(r["num_text_tokens"] / r["num_vision_tokens"])
        assert r["text_layer_chars"] > 0 and 0.0 <= r["text_layer_agreement"] <= 1.0
        img = Image.open(io.BytesIO(r["page_image"]["bytes"]))
        assert img.size == (r["width_px"], r["height_px"]) and r["page_image"]["path"].endswith(".png")


def test_page_images_read_back_as_images_by_datasets(run_output: Path) -> None:
    datasets = pytest.importorskip("datasets")
    pages = datasets.load_dataset("parquet", data_dir=str(run_output / "pages"), split="train")
    assert isinstance(pages.features["page_image"], datasets.Image)
    rows = [r for r in pages if r["page_index"] >= 0]
    assert len(rows) == 3
    for r in rows:
        assert isinstance(r["page_image"], Image.Image) and r["page_image"].size == (
            r["width_px"],
            r["height_px"],
        )


def test_report_and_inspect_on_the_run(run_output: Path, tmp_path: Path) -> None:
    rep = subprocess.run(
        [sys.executable, "-m", "pipeline.report", str(run_output), "--out", str(tmp_path / "rep")],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr[-3000:]
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "<td>truncated</td><td>3</td>" in html and "paper-arxiv-math-01.pdf" in html
    png = tmp_path / "page.png"
    ins = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.inspect",
            str(run_output),
            "--doc",
            "paper-arxiv-math-01.pdf",
            "--page",
            "0",
            "--out",
            str(png),
            "--max-side",
            "0",
        ],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ins.returncode == 0, ins.stderr[-3000:]
    (row,) = [r for r in read_pages(run_output) if r["source_uri"].endswith("paper-arxiv-math-01.pdf")]
    assert ins.stdout == (row["markdown"] or "") + "\n"
    assert Image.open(png).size == (row["width_px"], row["height_px"])
