"""Discovery's driver-side probe for a few documents (`pipeline.discover._probe_here`, no Ray):
real dev PDFs get their page counts, a broken or missing file gets its error row, and the rows
keep the order of the uris across the probe threads."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa

from pipeline.discover import DRIVER_PROBE_THREADS, _probe_here
from pipeline.run import compose
from pipeline.schema import DISCOVERED_SCHEMA


def test_a_few_documents_are_probed_in_the_driver_in_order(corpus_dir: Path, tmp_path: Path) -> None:
    with open(corpus_dir / "MANIFEST.tsv") as f:
        manifest = {r["file"]: r for r in csv.DictReader(f, delimiter="\t")}
    ok = sorted(n for n, r in manifest.items() if r["expected_behavior"] == "ok" and not r["password"])[:7]
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\nnot a pdf at all")
    uris = [str(corpus_dir / n) for n in ok[:3]] + [str(tmp_path / "missing.pdf"), str(broken)]
    uris += [str(corpus_dir / n) for n in ok[3:]]
    assert len(uris) > DRIVER_PROBE_THREADS  # several threads, each a slice
    cfg = compose(["model=tiny_random", f"input.uri={corpus_dir}", f"output.uri={tmp_path / 'out'}"])

    table = _probe_here(cfg, pa.array(uris))

    assert table.schema == DISCOVERED_SCHEMA
    rows = table.to_pylist()
    assert [r["source_uri"] for r in rows] == uris
    by_uri = {r["source_uri"]: r for r in rows}
    for n in ok:
        r = by_uri[str(corpus_dir / n)]
        assert (r["page_count"], r["error_code"]) == (int(manifest[n]["pages"]), ""), n
        assert len(r["doc_id"]) == 64  # sha256 of the bytes
    assert by_uri[str(tmp_path / "missing.pdf")]["error_code"] == "read_error"
    bad = by_uri[str(broken)]
    assert bad["error_code"] and bad["page_count"] == 0 and bad["error"]
