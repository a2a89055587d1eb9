"""The writer stage in-process (no Ray): Parquet files sized by `output.target_file_mb`, row groups
by `output.row_group_mb`, figure crops in `figures/` under the names the markdown references, and
page images in the Hugging Face datasets Image layout read back by `datasets.load_dataset`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.outputs import MB, encode_png, row_nbytes, split_by_bytes, split_table
from pipeline.run import compose
from pipeline.schema import COLUMNS, FIGURE_SCHEMA, PAGE_SCHEMA, figure_name, page_image_name
from pipeline.stages import WriteStage, to_batch
from tests.pipeline.pages_fixture import IMAGE_BOX_PX, ocr_row, render_paper

N_ROWS = 6


def test_split_by_bytes() -> None:
    assert split_by_bytes([10, 10, 10, 10], 25) == [(0, 2), (2, 4)]
    assert split_by_bytes([100, 1, 1], 25) == [(0, 1), (1, 3)]  # an oversized row stands alone
    assert split_by_bytes([1] * 5, 100, max_rows=2) == [(0, 2), (2, 4), (4, 5)]
    assert split_by_bytes([], 10) == []


def test_row_nbytes_counts_image_bytes_exactly() -> None:
    rows = [
        {
            "doc_id": "a",
            "source_uri": "u",
            "page_index": 0,
            "status": "ok",
            "page_image": {"bytes": b"x" * n, "path": "p"},
        }
        for n in (1000, 50_000, 0)
    ]
    table = pa.Table.from_pylist(rows, schema=PAGE_SCHEMA)
    sizes = row_nbytes(table)
    assert sizes[1] - sizes[0] == 49_000 and sizes[0] - sizes[2] == 1000
    assert [t.num_rows for t in split_table(table, sizes[1] + sizes[2])] == [1, 2]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table, list[dict]]:
    """Six one-page rows with a figure each, written with a 0.4 MB file target and 0.1 MB groups."""
    out = tmp_path_factory.mktemp("writer")
    cfg = compose(
        [
            "model=tiny_random",
            f"output.uri={out}",
            "output.include_images=true",
            "output.target_file_mb=0.4",
            "output.row_group_mb=0.1",
        ]
    )
    page = render_paper()
    png = encode_png(page.pixels)  # ~150 KB: about two rows per 0.4 MB file
    rows = [
        ocr_row(
            page=page,
            doc_id=f"{i:064x}",
            config_hash=cfg.config_hash(),
            page_image={"bytes": png, "path": page_image_name(f"{i:064x}", 0)},
        )
        for i in range(N_ROWS)
    ]
    receipts = WriteStage(cfg, str(out))(to_batch(rows))
    return out, receipts, rows


def test_files_are_sized_and_receipts_name_them(written) -> None:
    out, receipts, _ = written
    files = sorted((out / "pages").glob("part-*.parquet"))
    assert 2 <= len(files) <= N_ROWS  # the 6-row batch was split by size
    for f in files:
        assert f.stat().st_size <= 0.4 * MB * 1.1
        meta = pq.ParquetFile(f).metadata
        # each ~150 KB row exceeds the 0.1 MB row-group budget: one row per group
        assert meta.num_row_groups == meta.num_rows
    table = ds.dataset(out / "pages", format="parquet").to_table()
    assert table.num_rows == N_ROWS and set(table.column_names) == set(COLUMNS)
    assert "_page_png" not in table.column_names
    by_file = {f.name: set(pq.read_table(f, columns=["doc_id"]).column("doc_id").to_pylist()) for f in files}
    for doc_id, file in zip(receipts.column("doc_id").to_pylist(), receipts.column("file").to_pylist()):
        assert doc_id in by_file[file.rsplit("/", 1)[-1]]
    ledger = {f.name for f in (out / "_ledger").glob("part-*.parquet")}
    assert ledger == set(by_file)  # one ledger entry per pages part, same name


def test_figures_are_crops_under_the_referenced_names(written) -> None:
    out, _, rows = written
    page = render_paper()
    assert page.pixels is not None  # rendered as an array (the default output)
    pages = ds.dataset(out / "pages", format="parquet").to_table().to_pylist()
    figs = ds.dataset(out / "figures", format="parquet").to_table()
    assert figs.schema.field("image").type == FIGURE_SCHEMA.field("image").type
    figs = figs.to_pylist()
    assert len(figs) == N_ROWS
    assert {f.name for f in (out / "figures").glob("*.parquet")} <= {
        f.name for f in (out / "pages").glob("*.parquet")
    }
    x1, y1, x2, y2 = IMAGE_BOX_PX
    by_doc = {r["doc_id"]: r for r in pages}
    for f in figs:
        name = figure_name(f["doc_id"], 0, 1)  # block 1 of the layout is the image
        assert f["name"] == f["image"]["path"] == name and f["block_index"] == 1
        assert f"![]({name})" in by_doc[f["doc_id"]]["markdown"]
        assert by_doc[f["doc_id"]]["layout"][1]["label"] == "image"
        assert f["bbox_px"] == [x1, y1, x2, y2]
        crop = np.asarray(Image.open(io.BytesIO(f["image"]["bytes"])))
        assert crop.shape == (y2 - y1, x2 - x1, 3) == (f["height_px"], f["width_px"], 3)
        assert np.array_equal(crop, page.pixels[y1:y2, x1:x2])


def test_without_write_figures_no_crops_but_same_markdown(tmp_path: Path) -> None:
    cfg = compose(["model=tiny_random", f"output.uri={tmp_path}", "output.write_figures=false"])
    WriteStage(cfg, str(tmp_path))(to_batch([ocr_row(config_hash=cfg.config_hash())]))
    assert not (tmp_path / "figures").exists()
    (row,) = ds.dataset(tmp_path / "pages", format="parquet").to_table().to_pylist()
    assert "![](figures/" in row["markdown"] and row["page_image"] is None


def test_hf_features_metadata_matches_the_schema() -> None:
    datasets = pytest.importorskip("datasets")
    for schema in (PAGE_SCHEMA, FIGURE_SCHEMA):
        features = datasets.Features.from_dict(
            json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        )
        from_meta = features.arrow_schema
        assert [(f.name, f.type) for f in from_meta] == [(f.name, f.type) for f in schema]
    assert isinstance(datasets.Features.from_arrow_schema(PAGE_SCHEMA)["page_image"], datasets.Image)


def test_page_images_and_figures_load_as_images_with_datasets(written) -> None:
    datasets = pytest.importorskip("datasets")
    out, _, _ = written
    page = render_paper()
    assert page.pixels is not None  # rendered as an array (the default output)
    pages = datasets.load_dataset("parquet", data_dir=str(out / "pages"), split="train")
    assert isinstance(pages.features["page_image"], datasets.Image)
    assert len(pages) == N_ROWS
    img = pages[0]["page_image"]
    assert isinstance(img, Image.Image) and img.size == (page.width_px, page.height_px)
    assert np.array_equal(np.asarray(img.convert("RGB")), page.pixels)
    figs = datasets.load_dataset("parquet", data_dir=str(out / "figures"), split="train")
    x1, y1, x2, y2 = IMAGE_BOX_PX
    assert isinstance(figs.features["image"], datasets.Image) and figs[0]["image"].size == (x2 - x1, y2 - y1)
