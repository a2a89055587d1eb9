"""`pagemill export` (pipeline.export) on Ray Data: Dolma shards read back with a reader written to
datatrove's documented JsonlReader schema (default keys `text`, `id`, everything else into
`metadata`; test_publish.py reads a real run's export with datatrove itself), every `pdf_page_numbers` span slices back
exactly its page's markdown; page-level JSONL and WebDataset tars carry one record per page."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.documents import assemble_documents
from pipeline.export import export
from pipeline.outputs import OutputStore
from pipeline.schema import rows_to_table


@pytest.fixture(autouse=True)
def _own_ray():
    """export() starts a small local Ray when none runs; shut it down so that later tests in this
    process get their own embedded Ray (sized by pipeline.run) instead of this 2-CPU one."""
    yield
    import ray

    ray.shutdown()


A, B = "a" * 64, "b" * 64
PAGES = {0: "# A zero\n\ncafé", 2: "A two", 3: "A three"}


def _page(doc: str, i: int, status: str, md: str | None, **kw) -> dict:
    return {
        "doc_id": doc,
        "source_uri": f"s3://bucket/{doc[0]}.pdf",
        "page_index": i,
        "page_count": kw.pop("n", 4),
        "status": status,
        "markdown": md,
        "config_hash": "h1",
        "model_id": "m",
        **kw,
    }


@pytest.fixture()
def output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    store = OutputStore(str(out))
    rows = [
        *(_page(A, i, "ok", md, repetition_score=0.1 * i) for i, md in PAGES.items()),
        _page(A, 1, "truncated", "cut"),
        _page(B, -1, "doc_error", None, n=0, error_code="not_a_pdf"),
    ]
    store.write_parquet("pages", rows_to_table(rows), name="part-0.parquet")
    assemble_documents(store, "h1")
    (out / "_summary.json").write_text(
        json.dumps(
            {
                "config_hash": "h1",
                "run_id": "20261201T120000Z",
                "config": {"model": {"source": "deepseek-ai/DeepSeek-OCR"}},
            }
        )
    )
    return out


def _jsonl(dest: Path) -> list[dict]:
    files = sorted(dest.glob("*.jsonl.gz"))
    assert files
    return [json.loads(line) for f in files for line in gzip.open(f, "rt", encoding="utf-8") if line.strip()]


def datatrove_style_read(record: dict) -> dict:
    """datatrove JsonlReader's default adapter: text_key='text', id_key='id', the rest -> metadata."""
    rest = {k: v for k, v in record.items() if k not in ("text", "id")}
    return {"text": record["text"], "id": record["id"], "metadata": rest.pop("metadata", {}) | rest}


def test_dolma_export(output: Path, tmp_path: Path) -> None:
    res = export(str(output), "dolma", str(tmp_path / "dolma"))
    docs = {d["id"]: d for d in (datatrove_style_read(r) for r in _jsonl(tmp_path / "dolma"))}
    assert res["records"] == len(docs) == 2
    a = docs[A]
    assert "<!--" not in a["text"]
    spans = a["metadata"]["attributes"]["pdf_page_numbers"]
    assert [p for _, _, p in spans] == [1, 3, 4]  # 1-based, as olmOCR
    for start, end, page in spans:
        assert a["text"][start:end] == PAGES[page - 1]
    rep = a["metadata"]["attributes"]["pagemill_repetition_score"]
    assert [(s, e) for s, e, _ in rep] == [(s, e) for s, e, _ in spans] and rep[1][2] == pytest.approx(0.2)
    m = a["metadata"]  # datatrove merges the record's metadata and its other keys
    assert m["source_uris"] == ["s3://bucket/a.pdf"] and m["config_hash"] == "h1" and m["pagemill_version"]
    assert m["model_source"] == "deepseek-ai/DeepSeek-OCR" and m["pages_by_status"]["ok"] == 3
    assert m["pages_by_status"]["truncated"] == 1
    assert a["metadata"]["source"] == "pagemill" and a["metadata"]["created"].startswith(
        "2026-12-01T12:00:00"
    )
    assert docs[B]["text"] == "" and docs[B]["metadata"]["pages_by_status"]["doc_error"] == 1


def test_page_jsonl_and_webdataset(output: Path, tmp_path: Path) -> None:
    export(str(output), "jsonl", str(tmp_path / "jsonl"))
    recs = {r["id"]: r for r in _jsonl(tmp_path / "jsonl")}
    assert len(recs) == 5 and recs[f"{A}-p2"]["text"] == "A two" and recs[f"{A}-p2"]["status"] == "ok"
    export(str(output), "webdataset", str(tmp_path / "wds"))
    (tar,) = (tmp_path / "wds").glob("*.tar")
    with tarfile.open(tar) as t:
        files = {m.name: t.extractfile(m).read() for m in t.getmembers()}  # type: ignore[union-attr]
    assert files[f"{A}-p00002.md"].decode() == "A two"
    meta = json.load(io.BytesIO(files[f"{A}-p00002.json"]))
    assert meta["page_index"] == 2 and meta["status"] == "ok"
    assert sum(n.endswith(".md") for n in files) == 5
