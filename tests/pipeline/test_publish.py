"""`pagemill publish` (pipeline.publish) and the hand-off readers, on a real output: one
`pipeline.run` with the tiny random model on tests/data (page images on), plus a second
configuration written into the same root by the real writer stage and document assembly (known
grounding strings, so it has `ok` pages and figure crops; the tiny model ends no page and draws no
box). The snapshot is loaded back with `datasets.load_dataset` per card config, its card parsed
with `huggingface_hub.DatasetCard`; the Dolma export is read with datatrove's own `JsonlReader`.
The live push to the Hub is not tested here (no network, no token): it is tested by hand."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.publish import build_snapshot
from tests.pipeline.e2e.helpers import REPO, job_env, run_job
from tests.pipeline.pages_fixture import GROUNDING, IMAGE_BOX_PX, render_paper

pytestmark = pytest.mark.slow

PAGE_TEXT = ["First page body.", "Second page, cut by the cap.", "Third page: last words."]


@pytest.fixture(autouse=True)
def _own_ray():
    """export() starts a small local Ray when none runs: shut it down for the next tests."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(root, config A = the real run's, config B = the writer-stage one)."""
    from pipeline.documents import assemble_documents
    from pipeline.outputs import OutputStore
    from pipeline.run import compose
    from pipeline.stages import WriteStage, to_batch
    from tests.pipeline.pages_fixture import ocr_row

    out = tmp_path_factory.mktemp("publish") / "out"
    proc = run_job(
        "input.uri=tests/data",
        f"output.uri={out}",
        "output.include_images=true",
        "mode=tiny",  # the smallest page images and few tokens: the fixture's cost is Ray's start
        "generation.max_new_tokens=8",
        env={"RAY_ADDRESS": "local"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    hash_a = json.loads((out / "_summary.json").read_text())["config_hash"]

    cfg = compose(["model=tiny_random", f"output.uri={out}", "mode=base", "output.include_images=true"])
    hash_b = cfg.config_hash()
    assert hash_b != hash_a
    page = render_paper()
    rows = [
        ocr_row(
            GROUNDING.replace("Some body text of the page.", text),
            page=page,
            doc_id="c" * 64,
            page_index=i,
            page_count=3,
            config_hash=hash_b,
            finish_reason="length" if i == 1 else "stop",  # page 2 is truncated: not in the text
        )
        for i, text in enumerate(PAGE_TEXT)
    ]
    WriteStage(cfg, str(out))(to_batch(rows))
    assemble_documents(OutputStore(str(out)), hash_b)
    # what an interrupted writer leaves behind: a hidden temporary, never published
    shutil.copy(next((out / "pages").glob("part-*.parquet")), out / "pages" / ".tmp-0123-part-x.parquet")
    return out, hash_a, hash_b


def _rows(root: Path, kind: str) -> int:
    return sum(
        pq.ParquetFile(f).metadata.num_rows for f in (root / kind).rglob("*.parquet") if f.name[0] != "."
    )


def test_snapshot_is_clean_and_complete(output, tmp_path: Path) -> None:
    out, hash_a, hash_b = output
    snap = build_snapshot(str(out), tmp_path / "snap")
    files = sorted(p.relative_to(snap.path).as_posix() for p in snap.path.rglob("*") if p.is_file())
    assert files == snap.files and "README.md" in files
    assert not [f for f in files if any(part[0] in "_." for part in f.split("/"))]  # no _ledger/, .tmp-…
    assert {f.split("/")[0] for f in files} == {"pages", "figures", "documents", "README.md"}
    for kind in ("pages", "figures", "documents"):
        assert _rows(snap.path, kind) == _rows(out, kind)  # nothing lost (the .tmp- file is no row)
    assert snap.rows[hash_a] == {"pages": 5, "documents": 5}
    assert snap.rows[hash_b] == {"pages": 3, "figures": 3, "documents": 1}
    assert snap.statuses[hash_a] == {"truncated": 3, "doc_error": 2}
    assert snap.statuses[hash_b] == {"ok": 2, "truncated": 1}
    # single-configuration parts are copied byte for byte (their huggingface features metadata too)
    for f in files:
        if f.startswith("pages/"):
            src = out / "pages" / f.rsplit("/", 1)[1]
            assert (snap.path / f).read_bytes() == src.read_bytes()
    # rebuilding into the same folder is allowed (it is a snapshot), gives the same files and
    # copies only what changed since (an interrupted upload's rerun does not rewrite everything)
    inode = {f: (snap.path / f).stat().st_ino for f in files if f != "README.md"}
    (snap.path / "pages" / "stale.parquet").write_bytes(b"from an older build")
    doc = next(f for f in inode if f.startswith(f"documents/{hash_b}/"))
    src = out / "documents" / doc.rsplit("/", 1)[1]
    os.utime(src, (src.stat().st_mtime + 5, src.stat().st_mtime + 5))  # rewritten by a later run
    again = build_snapshot(str(out), tmp_path / "snap")
    assert again.files == snap.files and again.bytes == snap.bytes
    assert [f for f in inode if (snap.path / f).stat().st_ino != inode[f]] == [doc]
    assert not (snap.path / "pages" / "stale.parquet").exists()


def test_card_parses_and_names_every_configuration(output, tmp_path: Path) -> None:
    from huggingface_hub import DatasetCard

    out, hash_a, hash_b = output
    snap = build_snapshot(str(out), tmp_path / "snap", repo="org/pdf-pages", license="cc-by-4.0")
    card = DatasetCard.load(snap.path / "README.md")
    data = card.data.to_dict()  # the front matter as huggingface_hub parsed it
    assert data["license"] == "cc-by-4.0" and data["pretty_name"] == "pdf-pages"
    configs = {c["config_name"]: c for c in data["configs"]}
    # plain names: the last run's configuration (it has no figures: the tiny model draws no box)
    assert set(configs) == {
        "pages",
        "documents",
        f"pages-{hash_a}",
        f"documents-{hash_a}",
        f"pages-{hash_b}",
        f"figures-{hash_b}",
        f"documents-{hash_b}",
    }
    assert configs["pages"].get("default") is True and configs["pages"]["data_files"][0]["path"].startswith(
        f"pages/{hash_a}/"
    )
    assert f"`{hash_b}`" in card.text and 'load_dataset("org/pdf-pages", "pages"' in card.text


def test_datasets_loads_each_config_and_decodes_images(output, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    out, hash_a, hash_b = output
    snap = str(build_snapshot(str(out), tmp_path / "snap").path)

    pages = datasets.load_dataset(snap, "pages", split="train")
    assert len(pages) == 5 and set(pages["config_hash"]) == {hash_a}
    assert isinstance(pages.features["page_image"], datasets.Image)
    shown = [r for r in pages if r["page_index"] >= 0]
    assert len(shown) == 3
    for r in shown:  # the real run stored page images: they decode to PIL at the rendered size
        assert isinstance(r["page_image"], Image.Image)
        assert r["page_image"].size == (r["width_px"], r["height_px"])
    assert len(datasets.load_dataset(snap, split="train")) == 5  # the default config is `pages`

    figs = datasets.load_dataset(snap, f"figures-{hash_b}", split="train")
    x1, y1, x2, y2 = IMAGE_BOX_PX
    assert len(figs) == 3 and isinstance(figs.features["image"], datasets.Image)
    assert all(f["image"].size == (x2 - x1, y2 - y1) for f in figs)

    docs = datasets.load_dataset(snap, f"documents-{hash_b}", split="train")
    assert len(docs) == 1 and docs[0]["pages_ok"] == 2 and docs[0]["pages_truncated"] == 1
    assert len(datasets.load_dataset(snap, "documents", split="train")) == 5
    assert len(datasets.load_dataset(snap, f"pages-{hash_b}", split="train")) == 3


def test_parts_holding_two_configurations_are_split(tmp_path: Path) -> None:
    """The writer never mixes configurations in a part, but a hand-merged or foreign output may:
    each configuration gets its own rows, nothing is lost, the features metadata stays."""
    from pipeline.outputs import OutputStore
    from pipeline.schema import PAGE_SCHEMA, rows_to_table

    out = tmp_path / "mixed"
    rows = [
        {"doc_id": f"{i:064x}", "source_uri": "u", "page_index": 0, "status": "ok", "config_hash": h}
        for i, h in enumerate(["h1", "h2", "h2"])
    ]
    OutputStore(str(out)).write_parquet("pages", rows_to_table(rows), name="part-0.parquet")
    snap = build_snapshot(str(out), tmp_path / "snap", config_hash="h2")
    assert snap.rows == {"h2": {"pages": 2}} and snap.default == "h2"
    t = pq.read_table(snap.path / "pages" / "h2" / "part-0.parquet")
    assert t.column("config_hash").to_pylist() == ["h2", "h2"]
    assert t.schema.metadata[b"huggingface"] == PAGE_SCHEMA.metadata[b"huggingface"]
    with pytest.raises(ValueError, match="no rows of configuration 'h3'"):
        build_snapshot(str(out), tmp_path / "snap2", config_hash="h3")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "publish", *args],
        cwd=REPO,
        env={**job_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_dry_run_snapshot_only_and_bad_input(output, tmp_path: Path) -> None:
    out, hash_a, _ = output
    dry = _cli(str(out), "--repo", "org/name", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "dry run: nothing uploaded" in dry.stdout and f"pages/{hash_a}/" in dry.stdout
    only = _cli(str(out), "--snapshot-only", str(tmp_path / "s"))
    assert only.returncode == 0 and (tmp_path / "s" / "README.md").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = _cli(str(out), "--snapshot-only", str(tmp_path / "mine"))
    assert refused.returncode == 2 and "not a pagemill snapshot" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    missing = _cli(str(tmp_path / "nothing"), "--dry-run")
    assert missing.returncode == 2 and "is " in missing.stderr and not (tmp_path / "nothing").exists()
    assert _cli(str(out)).returncode == 2  # neither --repo nor a no-upload mode
    # the upload path up to huggingface_hub (the live push is tested by hand): with the Hub out of
    # reach it exits 1 naming the cause, prints no token and removes its temporary snapshot
    token = "hf_NotARealToken0123456789"
    push = _cli(str(out), "--repo", "org/name", env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": token})
    assert push.returncode == 1 and "upload to org/name failed" in push.stderr, push.stderr[-2000:]
    assert token not in push.stdout + push.stderr
    tmp = push.stdout.split("snapshot ", 1)[1].split(":", 1)[0]
    assert "pagemill-publish-" in tmp and not Path(tmp).exists()


def test_publish_from_s3(output, s3_bucket, tmp_path: Path) -> None:
    """An output on an object store (real S3 protocol, moto server): the same snapshot; the
    endpoint passed as --storage-options, the credentials from the environment as advised."""
    out, _, _ = output
    bucket, fs, opts = s3_bucket
    fs.put(str(out), f"{bucket}/out", recursive=True)
    local = build_snapshot(str(out), tmp_path / "local")
    proc = _cli(
        f"s3://{bucket}/out",
        "--snapshot-only",
        str(tmp_path / "remote"),
        "--storage-options",
        json.dumps({"endpoint_url": opts["endpoint_url"]}),
        env={"AWS_ACCESS_KEY_ID": opts["key"], "AWS_SECRET_ACCESS_KEY": opts["secret"]},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in local.files:
        if f != "README.md":
            assert (tmp_path / "remote" / f).read_bytes() == (local.path / f).read_bytes(), f


def test_dolma_export_read_by_datatrove(output, tmp_path: Path) -> None:
    """datatrove's JsonlReader with its default keys (text, id; the rest into metadata) reads the
    export, and every `pdf_page_numbers` span slices back exactly its page's markdown in pages/."""
    from datatrove.pipeline.readers import JsonlReader

    from pipeline.export import export

    out, hash_a, hash_b = output
    markdown = {
        (r["doc_id"], r["page_index"]): r
        for r in ds.dataset(out / "pages", format="parquet").to_table().to_pylist()
    }
    for h, n_docs in ((hash_a, 5), (hash_b, 1)):
        dest = tmp_path / f"dolma-{h}"
        assert export(str(out), "dolma", str(dest), config_hash=h)["records"] == n_docs
        raw = [json.loads(line) for f in dest.glob("*.jsonl.gz") for line in gzip.open(f, "rt")]
        docs = list(JsonlReader(str(dest), glob_pattern="*.jsonl.gz").run())
        # datatrove skips documents with empty text (it warns): the real run's, with no `ok` page
        assert len(docs) == sum(1 for r in raw if r["text"]) == (0 if h == hash_a else 1)
        assert {d.id for d in docs} == {r["id"] for r in raw if r["text"]}
        for r in raw:  # the skipped ones too: no span, all their rows counted by status
            if not r["text"]:
                assert (
                    r["attributes"]["pdf_page_numbers"] == [] and r["metadata"]["pages_by_status"]["ok"] == 0
                )
                assert sum(r["metadata"]["pages_by_status"].values()) == sum(
                    1 for k in markdown if k[0] == r["id"]
                )
        for d in docs:
            m = d.metadata
            assert m["config_hash"] == h and m["source"] == "pagemill" and "<!--" not in d.text
            spans = m["attributes"]["pdf_page_numbers"]
            ok = sorted(p for (doc, p), r in markdown.items() if doc == d.id and r["status"] == "ok")
            assert [page - 1 for _, _, page in spans] == ok
            for start, end, page in spans:
                assert d.text[start:end] == markdown[(d.id, page - 1)]["markdown"]
            assert sum(m["pages_by_status"].values()) == sum(1 for doc, _ in markdown if doc == d.id)
    (doc_b,) = list(JsonlReader(str(tmp_path / f"dolma-{hash_b}")).run())
    assert doc_b.id == "c" * 64 and [p for _, _, p in doc_b.metadata["attributes"]["pdf_page_numbers"]] == [
        1,
        3,
    ]
    assert PAGE_TEXT[0] in doc_b.text and PAGE_TEXT[2] in doc_b.text and PAGE_TEXT[1] not in doc_b.text
