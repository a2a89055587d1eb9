"""The stage UDFs called in-process on small Arrow batches (no Ray), with the tiny random model,
and one small real Ray Data job whose per-operator stats bound the bytes per page.

The contract checked for each stage: it reads only the columns it declares (`READS`: a batch
whose other columns hold junk gives the same output), writes only the columns it declares
(`WRITES`: every other column comes back unchanged), and one row in gives one row out (the render
stage turns one page-range task into one row per page). Views built in the OCR actor from the
page PNG are pixel-identical to today's PIL path on the raw rendered pixels.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from model.preprocess import preprocess_image
from pipeline.config import PipelineConfig, ViewKind
from pipeline.run import compose
from pipeline.sources import content_id
from pipeline.stages import WORK_SCHEMA, OcrStage, RenderStage, WriteStage, to_batch
from pipeline.views import page_views

DATA = Path(__file__).resolve().parents[1] / "data"
PAPER, LOCKED = DATA / "paper-arxiv-math-01.pdf", DATA / "encrypted-needs-password-01.pdf"
MB = 1 << 20


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _passwords(tmp_path: Path) -> str:
    pw = tmp_path / "passwords.tsv"
    pw.write_text("encrypted-needs-password-01.pdf\topenpassword\n")
    return f"input.passwords_file={pw}"


def _cfg(tmp_path: Path, *extra: str) -> PipelineConfig:
    return compose(
        [
            "model=tiny_random",
            "mode=gundam",
            "generation.max_new_tokens=8",
            f"output.uri={tmp_path}",
            _passwords(tmp_path),
            *extra,
        ]
    )


def _task(path: Path, cfg: PipelineConfig, status: str | None = None, **extra: object) -> dict[str, object]:
    return {
        "doc_id": content_id(path.read_bytes()),
        "source_uri": path.as_uri(),
        "page_index": 0,
        "page_count": 1,
        "mode": "gundam",
        "config_hash": cfg.config_hash(),
        "model_id": "tiny",
        "status": status,
        "_range_start": 0,
        "_range_stop": 1,
        **extra,
    }


def _unchanged_outside(before: pa.Table, after: pa.Table, writes: tuple[str, ...]) -> None:
    assert after.schema == WORK_SCHEMA and after.num_rows == before.num_rows
    for name in WORK_SCHEMA.names:
        if name not in writes:
            assert after.column(name).equals(before.column(name)), name


def test_no_password_or_raw_pixel_column_in_rows() -> None:
    names = set(WORK_SCHEMA.names)
    assert not any("password" in n for n in names)
    assert not names & {"_pixels", "_global", "_tiles"}  # the page travels as one PNG


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, pa.Table]:
    cfg = _cfg(tmp_path_factory.mktemp("render"))
    tasks = to_batch(
        [
            _task(PAPER, cfg),
            _task(LOCKED, cfg),
            _task(DATA / "not-a-pdf-01.pdf", cfg, status="doc_error", page_index=-1, error_code="not_a_pdf"),
        ]
    )
    return cfg, RenderStage(cfg)(tasks)


def test_render_stage(rendered) -> None:
    cfg, out = rendered
    assert out.schema == WORK_SCHEMA and out.num_rows == 3  # two one-page tasks + a passed-through error row
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == [None, None, "doc_error"]  # None: in flight
    for r in rows[:2]:  # the locked document opened with the password from the config, found by name
        img = Image.open(io.BytesIO(r["_page_png"]))
        assert img.format == "PNG" and img.size == (r["width_px"], r["height_px"]) and r["dpi"] == 144
        assert len(r["_page_png"]) < 2 * MB
    assert rows[2]["_page_png"] is None and rows[2]["error_code"] == "not_a_pdf"
    # reads only its declared columns: junk elsewhere changes nothing it writes
    tasks = to_batch([_task(PAPER, cfg, raw_output="junk", markdown="junk")])
    again = RenderStage(cfg)(tasks)
    assert again.column("_page_png").equals(out.column("_page_png").slice(0, 1))


def test_views_from_the_png_equal_the_pil_path_on_raw_pixels() -> None:
    from pipeline.render import PageImage, RenderOptions, render_pages

    for dpi in (144, 100):
        (page,) = render_pages(PAPER.read_bytes(), None, [0], RenderOptions(dpi=dpi), output="both")
        assert isinstance(page, PageImage) and page.pixels is not None and page.png is not None
        for mode in ("gundam", "base", "small"):
            want = preprocess_image(Image.fromarray(page.pixels), mode)
            got = page_views(page.png, mode, None)
            assert got.grid == want.grid and got.num_image_tokens == want.num_image_tokens
            assert got.global_view.dtype == np.uint8 and np.array_equal(got.global_view, want.global_view)
            assert (got.tiles is None) == (want.tiles is None)
            if want.tiles is not None and got.tiles is not None:
                assert np.array_equal(got.tiles, want.tiles)
        assert page_views(page.png, "gundam", None).n_tiles > 0  # 144 dpi A4 in Gundam: tiled


@pytest.fixture(scope="module")
def ocred(rendered) -> tuple[PipelineConfig, pa.Table, pa.Table]:
    cfg, out = rendered
    stage = OcrStage(cfg)
    return cfg, out, asyncio.run(stage(out))


def test_ocr_stage_contract(ocred) -> None:
    cfg, before, after = ocred
    _unchanged_outside(before, after, OcrStage.WRITES)
    rows = after.to_pylist()
    for r in rows[:2]:
        assert r["status"] is None and r["finish_reason"] in ("stop", "length", "repetition")
        assert 0 < r["num_output_tokens"] <= 8 and r["num_vision_tokens"] > 273  # Gundam: tiles too
        assert (
            r["_page_png"] == before.column("_page_png")[0 if r is rows[0] else 1].as_py()
        )  # figures need it
    assert rows[2]["status"] == "doc_error" and rows[2]["raw_output"] is None  # untouched
    # without figures and page images the PNG does not leave the actor
    lean = OcrStage(
        compose(
            [
                "model=tiny_random",
                "mode=gundam",
                "generation.max_new_tokens=8",
                "output.write_figures=false",
                "output.include_images=false",
            ]
        )
    )
    out = asyncio.run(lean(before.slice(0, 1)))
    assert out.column("_page_png").null_count == 1 and out.column("raw_output")[0].is_valid


def test_ocr_stage_bad_image_is_an_error_row(ocred) -> None:
    cfg, before, _ = ocred
    bad = before.slice(0, 1).set_column(
        WORK_SCHEMA.get_field_index("_page_png"),
        WORK_SCHEMA.field("_page_png"),
        pa.array([b"not a png"], pa.binary()),
    )
    out = asyncio.run(OcrStage(cfg)(bad)).to_pylist()
    assert len(out) == 1 and out[0]["status"] == "render_error" and out[0]["error_code"] == "bad_image"


def test_views_on_the_engine_device_give_the_same_rows(ocred) -> None:
    """`ray.ocr_views=device`: the actor only decodes the PNG, the engine builds the views (the
    CPU here stands in for the GPU: the same torch code); same columns as the PIL views, and a
    bad PNG is still its page's error row."""
    cfg, before, after = ocred
    on_device = OcrStage(replace(cfg, ray=replace(cfg.ray, ocr_views=ViewKind.device)))
    got = asyncio.run(on_device(before))
    cols = ["status", "raw_output", "num_output_tokens", "num_vision_tokens", "finish_reason"]
    assert got.select(cols).equals(after.select(cols))
    bad = before.slice(0, 1).set_column(
        WORK_SCHEMA.get_field_index("_page_png"),
        WORK_SCHEMA.field("_page_png"),
        pa.array([b"not a png"], pa.binary()),
    )
    (row,) = asyncio.run(on_device(bad)).to_pylist()
    assert row["status"] == "render_error" and row["error_code"] == "bad_image"


def test_writer_takes_the_ocr_columns(ocred, tmp_path: Path) -> None:
    cfg, _, after = ocred
    cfg = _cfg(tmp_path, "output.include_images=true")
    receipts = WriteStage(cfg, str(tmp_path))(after)
    assert receipts.num_rows == after.num_rows  # one receipt per page row
    table = pads.dataset(tmp_path / "pages", format="parquet").to_table()
    assert table.num_rows == 3 and "_page_png" not in table.column_names
    images = {r["page_index"]: r["page_image"] for r in table.to_pylist() if r["status"] != "doc_error"}
    assert all(Image.open(io.BytesIO(i["bytes"])).format == "PNG" for i in images.values())


def test_writer_is_column_wise_and_equals_the_row_wise_reference(ocred, tmp_path: Path) -> None:
    """The column-wise writer writes what `postprocess_row` over Python rows + `rows_to_table`
    (the row-wise reference) gives, figure crops included; the work batch is never turned into
    row dicts (a page's PNG is read only for its crops)."""
    from pipeline.outputs import figure_table
    from pipeline.quality import PageQuality
    from pipeline.schema import COLUMNS, rows_to_table
    from pipeline.stages import postprocess_row, with_columns
    from tests.pipeline.pages_fixture import GROUNDING

    cfg, _, after = ocred
    cfg = _cfg(tmp_path, "output.include_images=true")
    after = with_columns(after, [0], {"raw_output": [GROUNDING], "finish_reason": ["stop"]})  # an image block
    table, figures = WriteStage(cfg, str(tmp_path)).page_table(after)
    assert list(figures) == [0] and "_page_png" not in table.column_names
    ref_rows = [postprocess_row(r, PageQuality()) for r in after.to_pylist()]
    for r in ref_rows:
        if r["page_index"] >= 0 and r["_page_png"] is not None:
            r["page_image"] = {"bytes": r["_page_png"], "path": table.column("page_image")[0]["path"].as_py()}
    ref = rows_to_table([{k: r.get(k) for k in COLUMNS} for r in ref_rows])
    got = table.drop_columns(["written_at", "page_image"])
    assert got.equals(ref.drop_columns(["written_at", "page_image"]))
    assert table.column("page_image")[0]["bytes"].as_py() == after.column("_page_png")[0].as_py()
    assert table.column("page_image")[2].as_py() is None  # the doc_error row has no page image
    assert table.schema.metadata == ref.schema.metadata  # the datasets features ride along
    receipts = WriteStage(cfg, str(tmp_path))(after)
    assert receipts.column("status").to_pylist() == table.column("status").to_pylist()
    crops = pads.dataset(tmp_path / "figures", format="parquet").to_table()
    assert crops.drop_columns(["image"]).equals(figure_table([ref_rows[0]]).drop_columns(["image"]))
    assert (
        crops.column("image")[0]["bytes"].as_py()
        == figure_table([ref_rows[0]]).column("image")[0]["bytes"].as_py()
    )


def test_ray_job_bytes_per_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Ray Data run on tests/data at 144 dpi in Gundam mode: every operator's output is
    <= 2 MB per row, from Ray Data's own per-operator output-bytes stats."""
    import ray

    from pipeline.run import run

    monkeypatch.setenv("RAY_ADDRESS", "local")  # a fresh embedded Ray, never another job's cluster
    cfg = compose(
        [
            "model=tiny_random",
            "mode=gundam",
            "render.dpi=144",
            "generation.max_new_tokens=8",
            "progress=false",
            f"input.uri={DATA}",
            f"output.uri={tmp_path / 'out'}",
            _passwords(tmp_path),
        ]
    )
    try:
        summary = run(cfg, dataset_stats=True)
    finally:
        ray.shutdown()
    assert summary["accounting_ok"] and summary["rows_written"] == 5
    ops = summary["ray_data_operators"]
    names = " ".join(o["name"] for o in ops)
    assert "RenderStage" in names and "OcrStage" in names and "WriteStage" in names
    for op in ops:
        assert op["output_rows"] > 0 and op["output_bytes"] > 0, op
        assert op["bytes_per_row"] <= 2 * MB, op
    ocr = next(o for o in ops if "OcrStage" in o["name"])
    assert ocr["output_rows"] == 5  # one row in, one row out


@pytest.mark.slow
def test_bench_pipeline_json(tmp_path: Path) -> None:
    """`jobs/bench_pipeline.py --allow-cpu` on 3 byte-distinct copies of one PDF: the job, then the
    engine alone on the same pages; the JSON carries both rates, the device, per-operator bytes and
    CPU per page, and the GPU sampler's fields."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    src = tmp_path / "corpus"
    src.mkdir()
    shutil.copy(DATA / "form-libreoffice-01.pdf", src)
    out, report = tmp_path / "out", tmp_path / "bench.json"
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "RAY_ADDRESS": "local",
        "PYTHONPATH": str(DATA.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.bench_pipeline",
            "--allow-cpu",
            "--corpus",
            str(src),
            "--out",
            str(out),
            "--min-pages",
            "3",
            "--json-out",
            str(report),
            "mode=tiny",
            "generation.max_model_len=1024",
            "progress=false",
        ],
        cwd=DATA.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rep = json.loads(report.read_text())
    assert rep["device"] == "cpu" and rep["pages_made"] == 3 and rep["pages_written"] == 3
    assert rep["pages_per_s"] > 0 and rep["engine_pages"] == 3 and rep["engine_pages_per_s"] > 0
    assert rep["engine_output_tokens"] == rep["output_tokens"]  # same pages, same forced lengths
    ops = {o["name"]: o for o in rep["operators"]}
    for name in ("MapBatches(RenderStage)", "MapBatches(OcrStage)", "MapBatches(WriteStage)"):
        assert ops[name]["output_rows"] == 3 and 0 < ops[name]["bytes_per_page"] <= 2 * MB
        assert ops[name]["cpu_s_per_page"] >= 0
    assert rep["gpu_util_source"] == "none" and rep["gpu_util_samples"] == []
    assert rep["engine_gpu_util_samples"] == []
    at = rep["startup_spent_s"]
    assert 0 < at["ray_init"] <= at["plan"] <= rep["first_page_into_ocr_s"] == at["first_page_into_ocr"]
    assert set(rep["cpu_s_per_page"]) == {"render", "ocr", "write", "driver"}
    assert all(v > 0 for v in rep["cpu_s_per_page"].values())
    assert rep["cores_per_gpu_at_engine_speed"] == round(
        rep["cpu_s_per_page_total"] * rep["engine_pages_per_s"], 2
    )
    assert "steady_pages_per_s" in rep  # None: fewer than 10 pages


def test_gpu_window_sample_is_the_mean_and_least_of_its_polls() -> None:
    """bench_pipeline's GPU utilisation per 10-s window: one reading is an instant, so a window
    reports the mean of its polls per GPU and the least one (a gap shows in min_pct)."""
    from jobs.bench_pipeline import window_sample

    polls = [[100, 40], [100, 60], [4, 50], [96, 50]]
    assert window_sample(10.0, polls, []) == {
        "t_s": 10.0,
        "polls": 4,
        "util_pct": [75.0, 50.0],
        "min_pct": [4, 40],
    }
    assert window_sample(20.0, [], ["NVML gone"]) == {"t_s": 20.0, "polls": 0, "error": "NVML gone"}


def test_steady_window_is_the_engine_benchmarks_definition() -> None:
    """bench_pipeline's steady state for the job and the engine alone: pages finished after the
    first finished page up to the last admission, over that window (as jobs/benchmark.py)."""
    from jobs.bench_pipeline import steady_window

    done = [10.0 + i for i in range(20)]  # one page a second from t=10 to t=29
    admitted = [t - 5.0 for t in done]  # the last page entered at t=24: the drain follows
    w = steady_window(done, admitted)
    assert w == {"pages_per_s": 1.0, "window_s": 14.0, "pages": 14}
    assert steady_window(done[:5], admitted[:5])["pages_per_s"] is None  # too few pages


def test_warm_up_page_leaves_no_trace(tmp_path: Path) -> None:
    """`PageOcr.warm_up` (the engine-alone benchmark runs it before its timer, so Triton
    compiles and graph captures fall outside it): the engine's counters are back at zero and a
    page afterwards gives the same tokens as on a fresh engine."""
    from jobs.bench_pipeline import WARM_UP_TOKENS, warm_up_input
    from pipeline.stages import load_page_ocr

    cfg = _cfg(tmp_path)
    x = warm_up_input(cfg)
    assert x.tiles is not None and len(x.tiles) > 1  # a blank A4 page in Gundam: tiled
    fresh = load_page_ocr(cfg, on_gpu=False).run([x])[0]
    ocr = load_page_ocr(cfg, on_gpu=False)
    ocr.warm_up(x)
    st = ocr.engine.stats
    assert (st.pages, st.output_tokens, st.decode_steps, st.occupancy) == (0, 0, 0, [])
    again = ocr.run([x])[0]
    assert again.ids == fresh.ids
    assert again.num_output_tokens == min(WARM_UP_TOKENS, cfg.generation.max_new_tokens)


def test_precompile_is_a_speed_up_only(tmp_path: Path) -> None:
    """The kernel-precompile child is never started without a GPU, is off with
    `ray.ocr_precompile=false`, and a model it cannot describe costs a warning, not the actor."""
    from pipeline.stages import start_precompile

    assert start_precompile(compose(["model=tiny_random"])) is None  # no CUDA here
    assert start_precompile(compose(["model=tiny_random", "ray.ocr_precompile=false"])) is None
    missing = compose(["model=deepseek_ocr", f"model.source={tmp_path / 'no-checkpoint'}"])
    assert start_precompile(missing) is None


def test_bench_engine_alone_follows_the_views_setting(tmp_path: Path) -> None:
    """`jobs.bench_pipeline.engine_alone` hands the engine what the job's OCR stage would: views
    (threads) or decoded pages (`ray.ocr_views=device`); both run every page (the byte equality
    of the two paths' views is `tests/model/test_resample.py`'s)."""
    import shutil

    from jobs.bench_pipeline import engine_alone

    torch.set_num_threads(1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(PAPER, corpus)
    figures = {}
    for kind in ("threads", "device"):
        cfg = compose(
            ["model=tiny_random", "mode=tiny", "generation.max_new_tokens=4", f"ray.ocr_views={kind}"]
        )
        figures[kind] = engine_alone(cfg, corpus, on_gpu=False)
    assert figures["threads"]["engine_pages"] == figures["device"]["engine_pages"] >= 1
    assert figures["threads"]["engine_output_tokens"] == figures["device"]["engine_output_tokens"] > 0
