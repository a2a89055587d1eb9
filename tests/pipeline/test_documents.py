"""Document assembly (pipeline.documents): pages/ -> documents/, one row per document."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow.dataset as ds

from pipeline.documents import assemble_documents, export_documents, join_pages, main
from pipeline.outputs import OutputStore
from pipeline.run import compose
from pipeline.schema import DOCUMENT_SCHEMA, STATUSES, figure_name, rows_to_table
from pipeline.stages import WriteStage, to_batch
from tests.pipeline.pages_fixture import ocr_row

A, B, C = "a" * 64, "b" * 64, "c" * 64


def _page(doc: str, i: int, status: str, md: str | None, config_hash: str = "h1", **kw) -> dict:
    return {
        "doc_id": doc,
        "source_uri": f"s3://bucket/{doc[0]}.pdf",
        "page_index": i,
        "page_count": kw.pop("n", 4),
        "status": status,
        "markdown": md,
        "config_hash": config_hash,
        "model_id": "m",
        **kw,
    }


def _write_pages(store: OutputStore) -> None:
    rows = [
        _page(A, 0, "ok", "# A zero"),
        _page(A, 1, "truncated", "A one (cut)"),
        _page(A, 2, "ok", "A two"),
        _page(A, 3, "ok", "A three"),
        _page(B, -1, "doc_error", None, n=0, error_code="not_a_pdf"),
        _page(C, 0, "truncated", "c0", n=2),
        _page(C, 1, "repetition", "c1", n=2),
        _page(A, 0, "ok", "OTHER CONFIG", config_hash="h2"),  # another configuration's row
        _page(A, 2, "ok", "A two"),  # a duplicate row of the same key: counted once
    ]
    random.Random(0).shuffle(rows)
    for k in range(0, len(rows), 3):  # several part files, pages out of order
        store.write_parquet("pages", rows_to_table(rows[k : k + 3]), name=f"part-{k}.parquet")


def _docs(out: Path, config_hash: str | None = None) -> dict[str, dict]:
    table = ds.dataset(out / "documents", format="parquet").to_table()
    assert table.schema.remove_metadata().equals(DOCUMENT_SCHEMA.remove_metadata())
    return {r["doc_id"]: r for r in table.to_pylist() if config_hash in (None, r["config_hash"])}


def test_documents_join_ok_pages_with_markers_and_count_statuses(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path))
    _write_pages(store)
    assert assemble_documents(store, "h1") == 3
    docs = _docs(tmp_path)
    a = docs[A]
    assert a["text"] == "# A zero\n\nA two\n\nA three" and a["id"] == a["doc_id"]
    assert [(sp["page_index"], a["text"][sp["start"] : sp["end"]]) for sp in a["page_spans"]] == [
        (0, "# A zero"),
        (2, "A two"),
        (3, "A three"),
    ]
    assert (
        a["pages_included"] == [0, 2, 3] and a["page_count"] == 4 and a["source_uri"] == "s3://bucket/a.pdf"
    )
    assert (a["pages_ok"], a["pages_truncated"], a["pages_doc_error"]) == (3, 1, 0)
    assert a["config_hash"] == "h1" and a["model_id"] == "m" and a["error_code"] is None
    b = docs[B]
    assert (b["text"], b["pages_included"], b["pages_doc_error"], b["error_code"]) == ("", [], 1, "not_a_pdf")
    c = docs[C]
    assert c["text"] == "" and (c["pages_truncated"], c["pages_repetition"], c["pages_ok"]) == (1, 1, 0)
    for d in docs.values():
        assert sum(d[f"pages_{s}"] for s in STATUSES) == max(d["page_count"], 1)


def test_small_budgets_give_the_same_documents_and_rebuild_removes_stale_parts(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path))
    _write_pages(store)
    assemble_documents(store, "h1", budget_mb=1e-6, target_file_mb=1e-6)  # one group, one file per doc
    many = sorted(p.name for p in (tmp_path / "documents").iterdir())
    assert many == [f"part-h1-{i:05d}.parquet" for i in range(3)]
    small = _docs(tmp_path)
    assemble_documents(store, "h2")
    assemble_documents(store, "h1")
    names = sorted(p.name for p in (tmp_path / "documents").iterdir())
    assert names == ["part-h1-00000.parquet", "part-h2-00000.parquet"]  # stale h1 parts gone, h2 kept
    assert _docs(tmp_path, "h1") == small
    (h2,) = _docs(tmp_path, "h2").values()
    assert h2["text"] == "OTHER CONFIG" and h2["pages_included"] == [0]


def test_join_pages_orders_by_page_index() -> None:
    pages = {2: "two", 0: "zero", 1: ""}
    text, spans = join_pages(pages)
    assert text == "zero\n\n\n\ntwo" and "<!--" not in text
    assert [sp["page_index"] for sp in spans] == [0, 1, 2]
    assert all(
        text[sp["start"] : sp["end"]] == pages[sp["page_index"]] for sp in spans
    )  # spans slice back exactly
    assert join_pages({}) == ("", [])


def test_figure_references_resolve_after_export(tmp_path: Path) -> None:
    """Pages written by the real writer (figures/ with crops); the document's markdown references
    them by name, and exporting the document puts each crop where its reference points."""
    out = tmp_path / "out"
    cfg = compose(["model=tiny_random", f"output.uri={out}"])
    rows = [
        ocr_row(page_index=0, config_hash=cfg.config_hash()),
        ocr_row("Second page text.<｜end▁of▁sentence｜>", page_index=1, config_hash=cfg.config_hash()),
    ]
    for r in rows:
        r["page_count"] = 2
    WriteStage(cfg, str(out))(to_batch(rows))
    assert main([str(out), "--config-hash", cfg.config_hash()]) == 0
    (doc,) = _docs(out).values()
    ref = figure_name(doc["doc_id"], 0, 1)
    assert doc["num_figures"] == 1 and f"![]({ref})" in doc["text"] and doc["pages_included"] == [0, 1]
    dest = tmp_path / "export"
    written = export_documents(OutputStore(str(out)), str(dest))
    md = (dest / f"{doc['doc_id']}.md").read_text()
    refs = re.findall(r"!\[\]\(([^)]+)\)", md)
    assert refs == [ref] and (dest / ref).is_file() and str(dest / ref) in written


def test_no_pages_no_documents(tmp_path: Path) -> None:
    assert assemble_documents(OutputStore(str(tmp_path)), "h1") == 0
    assert not (tmp_path / "documents").exists() or not list((tmp_path / "documents").iterdir())


def test_unknown_configuration_gives_no_documents(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path))
    _write_pages(store)
    assert assemble_documents(store, "h9") == 0


def _pages_part(store: OutputStore, name: str, rows: list[dict]) -> str:
    return store.write_parquet("pages", rows_to_table(rows), name=name)


def test_update_rebuilds_only_the_touched_documents(tmp_path: Path) -> None:
    """A run that touched documents C (new) and A (one page redone) rebuilds those two only:
    the part holding B is not rewritten, A's old row is taken out of its old part, and the
    result equals a full rebuild (no document twice)."""
    from pipeline.documents import update_documents

    store = OutputStore(str(tmp_path))
    first = [
        _pages_part(
            store, "part-1.parquet", [_page(A, 0, "ok", "a0", n=2), _page(A, 1, "truncated", "a1", n=2)]
        ),
        _pages_part(store, "part-2.parquet", [_page(B, 0, "ok", "b0", n=1)]),
    ]
    assert assemble_documents(store, "h1", budget_mb=1e-6, target_file_mb=1e-6) == 2  # one part per doc
    parts = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "documents").iterdir()}
    b_part = next(n for n in parts if ds.dataset(tmp_path / "documents" / n).to_table()["id"][0].as_py() == B)
    # the next run: A's page 1 redone (its old row taken out of part-1 as `force` would), C new
    store.write_parquet("pages", rows_to_table([_page(A, 0, "ok", "a0", n=2)]), name="part-1.parquet")
    new = [
        _pages_part(
            store, "part-3.parquet", [_page(A, 1, "ok", "a1 redone", n=2), _page(C, 0, "ok", "c0", n=1)]
        )
    ]
    assert update_documents(store, "h1", {A, C}, set(first[:1] + new), "run2") == 2
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "documents").iterdir()}
    assert after[b_part] == parts[b_part]  # B's part untouched
    assert len(after) == 2  # A's old part emptied and removed; one new part with A and C
    docs = _docs(tmp_path)
    assert docs[A]["text"] == "a0\n\na1 redone" and docs[C]["text"] == "c0" and docs[B]["text"] == "b0"
    table = ds.dataset(tmp_path / "documents").to_table()
    assert sorted(table["id"].to_pylist()) == [A, B, C]  # each once
    full = tmp_path / "full"
    for p in (tmp_path / "pages").iterdir():
        (full / "pages").mkdir(parents=True, exist_ok=True)
        (full / "pages" / p.name).write_bytes(p.read_bytes())
    assemble_documents(OutputStore(str(full)), "h1")
    assert _docs(full) == docs


def test_update_heals_a_document_left_in_two_parts(tmp_path: Path) -> None:
    """An update interrupted between writing its new part and rewriting the old one leaves a
    document in two parts; the next update (even one that touched nothing) rebuilds it once."""
    import shutil

    from pipeline.documents import update_documents

    store = OutputStore(str(tmp_path))
    f = _pages_part(store, "part-1.parquet", [_page(A, 0, "ok", "a0", n=1), _page(B, 0, "ok", "b0", n=1)])
    assemble_documents(store, "h1")
    (only,) = list((tmp_path / "documents").iterdir())
    shutil.copy(only, only.with_name("part-h1-crashed-00000.parquet"))  # A and B twice
    assert update_documents(store, "h1", set(), set(), "run3", files_of=lambda ids: {f}) == 2
    table = ds.dataset(tmp_path / "documents").to_table()
    assert sorted(table["id"].to_pylist()) == [A, B]
    assert update_documents(store, "h1", set(), set(), "run4") == 0  # nothing touched, nothing twice
