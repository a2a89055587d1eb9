"""Operability: the status line, Ray metrics scraped from a real run's Prometheus endpoint, the
`_runs/` record (versions, GPUs, cost) and `dry_run=true`.

One small real job (embedded Ray, the tiny random model, real PDFs; one renderer hang injected so
a render timeout happens, one document pre-failed twice so it is quarantined) is shared by the
slow tests; the dry run then runs as the CLI does, in a subprocess, against its output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest

from pipeline.dryrun import classify, estimate
from pipeline.metrics import actors_summary, cost_fields
from pipeline.status import StatusLine

REPO = Path(__file__).resolve().parents[2]
STATUS_RE = re.compile(
    r"pagemill status: done=(\d+)/(\d+) pct=([\d.]+) pages_per_s_5m=([\d.]+)((?: [a-z_]+=\d+)*) eta=(\S+)"
)


def parse_status(line: str) -> dict[str, Any]:
    m = STATUS_RE.search(line)
    assert m, line
    counts = dict(kv.split("=") for kv in m.group(5).split())
    return {
        "done": int(m.group(1)),
        "total": int(m.group(2)),
        "rate": float(m.group(4)),
        "counts": {k: int(v) for k, v in counts.items()},
        "eta": m.group(6),
    }


# ----------------------------------------------------------------------------- fast, no Ray


def test_status_line_rate_is_over_the_last_five_minutes_and_eta_follows() -> None:
    now = [0.0]
    s = StatusLine(total=1000, interval_s=0, clock=lambda: now[0])
    now[0] = 100.0
    s.update(["ok"] * 100)  # 100 rows in the first 100 s
    now[0] = 400.0
    s.update(["ok"] * 290 + ["truncated"] * 10)  # 300 more by t=400
    st = parse_status(s.line())
    assert st["done"] == 400 and st["total"] == 1000
    assert st["counts"] == {"ok": 390, "truncated": 10}
    # the window is (100, 400]: 300 rows in 300 s, not 400 rows in 400 s
    assert st["rate"] == pytest.approx(1.0)
    assert st["eta"] == "10m00s"  # 600 rows left at 1/s
    now[0] = 800.0  # nothing for 400 s: the rate over the last 5 minutes is 0, the ETA unknown
    st = parse_status(s.line())
    assert st["rate"] == 0 and st["eta"] == "?"


def test_status_thread_prints_on_its_interval() -> None:
    lines: list[str] = []
    s = StatusLine(total=3, interval_s=0.05, emit=lines.append).start()
    s.update(["ok", "ok", "ok"])
    time.sleep(0.4)
    s.stop()
    assert len(lines) >= 3
    assert parse_status(lines[-1])["done"] == 3 and parse_status(lines[-1])["eta"] == "0s"


def test_cost_fields_and_gpu_hours() -> None:
    actors = [
        {"device": "NVIDIA H100 80GB HBM3", "start": 0.0, "last": 1800.0},
        {"device": "NVIDIA H100 80GB HBM3", "start": 0.0, "last": 1800.0},
        {"device": "cpu", "start": 0.0, "last": 7200.0},  # a CPU actor is no GPU time
    ]
    s = actors_summary(actors)
    assert s == {"ocr_actors": 3, "gpus": {"NVIDIA H100 80GB HBM3": 2}, "gpu_hours": 1.0}
    c = cost_fields(pages=18_000, gpu_hours=1.0, gpu_hour_usd=2.5)
    assert c == {"pages_per_gpu_hour": 18_000.0, "usd_per_million_pages": pytest.approx(138.8889)}
    assert cost_fields(100, 0.0, 2.5) == {"pages_per_gpu_hour": None, "usd_per_million_pages": None}
    assert cost_fields(100, 1.0, 0.0)["usd_per_million_pages"] is None


def test_classify_and_estimate() -> None:
    docs = [
        {"doc_id": "a", "source_uri": "/in/a.pdf", "page_count": 2, "error_code": ""},
        {"doc_id": "b2", "source_uri": "/in/b.pdf", "page_count": 3, "error_code": ""},  # b.pdf was b1
        {"doc_id": "c", "source_uri": "/in/c.pdf", "page_count": 4, "error_code": ""},
        {"doc_id": "d", "source_uri": "/in/d.pdf", "page_count": 1, "error_code": ""},
        {"doc_id": "a", "source_uri": "/in/copy-of-a.pdf", "page_count": 2, "error_code": ""},
    ]
    done = {("a", 0), ("a", 1), ("c", 0), ("b1", 0)}
    known = {("a", "/in/a.pdf"), ("b1", "/in/b.pdf"), ("c", "/in/c.pdf")}
    cats = classify(docs, done, known)
    assert {k: v["documents"] for k, v in cats.items()} == {"new": 1, "changed": 1, "partial": 1, "done": 1}
    assert {k: v["pages"] for k, v in cats.items()} == {"new": 1, "changed": 3, "partial": 3, "done": 2}
    runs = [
        {"config_hash": "h", "rows_written": 3000, "gpu_hours": 1.0},
        {"config_hash": "h", "rows_written": 1000, "gpu_hours": 1.0},
        {"config_hash": "other", "rows_written": 10, "gpu_hours": 1.0},
        {"config_hash": "h", "rows_written": 50, "gpu_hours": 0.0},  # a CPU run: no rate
    ]
    e = estimate(runs, "h", 4000)
    assert e["pages_per_gpu_hour"] == 2000 and e["gpu_hours"] == 2.0 and e["runs"] == 2
    assert estimate(runs, "unseen", 10)["basis"] == "other configurations"
    assert estimate([], "h", 10)["gpu_hours"] is None


def test_engine_numbers_for_the_ocr_stage_metrics() -> None:
    """`PageOcr.engine_numbers` (model/ side, no Ray): rows in use while a page is still decoding,
    none after; decode steps and time, pages and tokens counted."""
    import numpy as np
    from PIL import Image

    from model.engine_config import EngineConfig
    from model.preprocess import preprocess_image
    from model.runner import OcrInput, PageOcr, load_model

    model, tok = load_model("tiny_random", dtype="float32", device="cpu")
    ocr = PageOcr(model, tok, EngineConfig(max_batch=2, max_model_len=1024, max_new_tokens=64))
    prep = preprocess_image(Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)), "tiny")
    inputs = [OcrInput.from_views(prep, force_len=n, tag=n) for n in (4, 40)]
    assert ocr.engine_numbers().kv_rows_in_use == 0
    in_use = []
    for _ in ocr.stream(inputs):
        in_use.append(ocr.engine_numbers().kv_rows_in_use)
    assert in_use == [1, 0]  # the 40-token page was still decoding when the 4-token one finished
    n = ocr.engine_numbers()
    assert n.device_name == "cpu" and n.kv_rows == 2 and n.pages == 2 and n.output_tokens == 44
    assert n.decode_steps >= 40 and n.decode_s > 0


def test_read_only_ledger_load_sees_what_reconciling_would_and_touches_nothing(tmp_path: Path) -> None:
    """The dry run's ledger view: on a root a crash left untidy (an orphan pages part, a stale
    ledger entry, a part rewritten by an interrupted `force`, a temporary), `read_only` gives the
    keys a reconciling load gives, and the tree stays byte-for-byte as it was."""
    from pipeline.ledger import LEDGER_DIR, PAGES_DIR, Ledger, commit_entry
    from pipeline.outputs import OutputStore
    from pipeline.schema import rows_to_table

    def part(doc: str, pages: list[int], status: str = "ok") -> Any:
        return rows_to_table(
            [
                {
                    "doc_id": doc,
                    "source_uri": f"/in/{doc}.pdf",
                    "page_index": i,
                    "status": status,
                    "config_hash": "h",
                }
                for i in pages
            ]
        )

    store = OutputStore(str(tmp_path))
    a = store.write_parquet(PAGES_DIR, part("a", [0, 1]))
    commit_entry(store, part("a", [0, 1]), a)
    store.write_parquet(PAGES_DIR, part("b", [0], "truncated"))  # crash before its ledger part
    c = store.write_parquet(PAGES_DIR, part("c", [0]))
    commit_entry(store, part("c", [0]), c)
    (tmp_path / c).unlink()  # its ledger entry is stale
    d = store.write_parquet(PAGES_DIR, part("d", [0, 1, 2]))
    commit_entry(store, part("d", [0, 1, 2]), d)
    store.write_parquet(PAGES_DIR, part("d", [0]), name=d.rsplit("/", 1)[-1])  # rewritten, entry not yet
    (tmp_path / LEDGER_DIR / ".tmp-x-part.parquet").write_bytes(b"partial")
    before = _tree(tmp_path)
    ro = Ledger.load(store, "h", read_only=True)
    assert _tree(tmp_path) == before
    assert ro.status == {("a", 0): "ok", ("a", 1): "ok", ("b", 0): "truncated", ("d", 0): "ok"}
    rw = Ledger.load(store, "h")
    assert rw.status == ro.status and (rw.reconciled, rw.dropped) == (ro.reconciled, ro.dropped) == (2, 1)
    assert _tree(tmp_path) != before  # the reconciling load did tidy up


# ----------------------------------------------------------------------------- one real job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SETTINGS = [
    "model=tiny_random",
    "mode=tiny",
    "generation.max_new_tokens=24",
    "generation.fallback=ngram",
    "generation.loop_min_span=8",
    "render.timeout_s=20",  # the planted hang waits this out; margin for a loaded machine
    "ray.ocr_batch_size=4",
    "ray.write_batch_size=4",
    "progress=false",
    "status_interval_s=0.5",
    "cost.gpu_hour_usd=2.5",
]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Any:
    import logging

    import ray

    from pipeline.ledger import Ledger
    from pipeline.outputs import OutputStore
    from pipeline.run import compose, run
    from pipeline.sources import content_id

    base = tmp_path_factory.mktemp("ops")
    src, out = base / "in", base / "out"
    src.mkdir()
    # code-and-formula: 2 pages, the renderer hangs on page 1 (a render timeout); form-libreoffice
    # failed in two earlier runs (quarantined now); not-a-pdf: a doc_error row
    for name in (
        "code-and-formula-01.pdf",
        "paper-arxiv-math-01.pdf",
        "form-libreoffice-01.pdf",
        "not-a-pdf-01.pdf",
    ):
        shutil.copy(corpus_dir / name, src / name)
    port = _free_port()
    cfg = compose([*SETTINGS, f"input.uri={src}", f"output.uri={out}", f"ray.metrics_export_port={port}"])
    store = OutputStore(str(out))
    led = Ledger(cfg.config_hash())
    bad = content_id((src / "form-libreoffice-01.pdf").read_bytes())
    for run_id in ("r1", "r2"):
        led.record_failures(store, run_id, {bad: "OCR batch failed after its retries"})

    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "pagemill status:" in record.getMessage():
                lines.append(record.getMessage())

    handler = Grab()
    logging.getLogger("pagemill").addHandler(handler)
    logging.getLogger("pagemill").setLevel(logging.INFO)
    if ray.is_initialized():
        ray.shutdown()  # our own embedded Ray: the metrics port and the fault env are set at start
    os.environ["PAGEMILL_TEST_RENDER_FAULT"] = "hang:1"
    try:
        summary = run(cfg)
    finally:
        os.environ.pop("PAGEMILL_TEST_RENDER_FAULT", None)
        logging.getLogger("pagemill").removeHandler(handler)
    yield {"src": src, "out": out, "summary": summary, "lines": lines, "port": port, "cfg": cfg}
    ray.shutdown()


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """ray_pagemill_* samples from the metrics agent: name -> [(labels, value)]."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line.startswith("ray_pagemill_"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


@pytest.mark.slow
def test_metrics_endpoint_counters_sum_to_the_accounting(job: Any) -> None:
    s = job["summary"]
    assert s["accounting_ok"] and s["rows_written"] == 5
    rows = pads.dataset(job["out"] / "pages", format="parquet").to_table().to_pylist()
    pages = [r for r in rows if r["page_index"] >= 0 and r["num_output_tokens"] is not None]
    timed_out = [
        (Path(r["source_uri"]).name, r["page_index"])
        for r in rows
        if r["status"] == "render_error" and "timed out" in (r["error"] or "")
    ]
    # the planted hang (page 1 of the only two-page request) times out; on a loaded machine page 0
    # of that request can run out of the same call's budget too, but no other document's page may
    assert ("code-and-formula-01.pdf", 1) in timed_out
    assert {name for name, _ in timed_out} == {"code-and-formula-01.pdf"}, timed_out
    timeouts = len(timed_out)
    fallbacks = sum(1 for r in pages if r["attempts"] == 2)
    reps = sum(1 for r in pages if r["finish_reason"] == "repetition") + sum(
        1 for r in pages if r["attempts"] == 2 and (r["fallback"] or "").startswith("ngram:repetition")
    )
    want = {
        "ray_pagemill_output_tokens_total": sum(r["num_output_tokens"] for r in pages),
        "ray_pagemill_fallback_passes_total": fallbacks,
        "ray_pagemill_repetition_stops_total": reps,
        "ray_pagemill_render_timeouts_total": timeouts,
        "ray_pagemill_quarantined_documents_total": s["documents_quarantined"],
    }
    assert s["documents_quarantined"] == 1 and fallbacks >= 1
    # Ray exports each process's metrics every metrics_report_interval_ms (10 s); the OCR and render
    # actors have exited by now, their last values stay in the agent. Poll until they are in.
    deadline, got = time.time() + 60, {}
    while time.time() < deadline:
        samples = _scrape(job["port"])
        by_status = {st: _total(samples, "ray_pagemill_pages_total", status=st) for st in s["rows_by_status"]}
        got = {k: _total(samples, k) for k in want}
        if got == want and {k: v for k, v in by_status.items() if v} == s["rows_written_by_status"]:
            break
        time.sleep(2)
    assert got == want
    assert {k: int(v) for k, v in by_status.items() if v} == s["rows_written_by_status"]
    assert sum(by_status.values()) == s["rows_written"]
    # every metric the shipped Grafana dashboard queries is exported
    dashboard = (REPO / "jobs" / "grafana" / "pagemill.json").read_text()
    queried = {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"ray_pagemill_\w+", dashboard)}
    exported = {re.sub(r"_(bucket|count|sum)$", "", m) for m in samples}
    assert len(queried) >= 8 and queried <= exported, queried - exported
    # engine numbers, recorded in the OCR stage: KV rows of the engine, decode step time
    assert _total(samples, "ray_pagemill_kv_rows") >= 1
    assert "ray_pagemill_kv_rows_in_use" in samples
    assert _total(samples, "ray_pagemill_decode_step_seconds_count") >= 1
    assert _total(samples, "ray_pagemill_decode_step_seconds_sum") > 0


@pytest.mark.slow
def test_status_lines_in_the_job_log(job: Any) -> None:
    lines = [parse_status(x) for x in job["lines"]]
    assert len(lines) >= 2, job["lines"]
    todo = job["summary"]["rows_expected"] - job["summary"]["rows_already_final"]
    assert all(x["total"] == todo for x in lines)
    assert [x["done"] for x in lines] == sorted(x["done"] for x in lines)  # never goes back
    for x in lines:
        assert sum(x["counts"].values()) == x["done"] <= x["total"]
        assert set(x["counts"]) <= set(job["summary"]["rows_by_status"])


@pytest.mark.slow
def test_run_record_versions_gpus_and_cost_on_cpu(job: Any) -> None:
    import ray
    import torch

    s = job["summary"]
    record = json.loads((job["out"] / "_runs" / f"{s['run_id']}-{s['config_hash']}.json").read_text())
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["ray"] == ray.__version__
    assert record["versions"]["pymupdf"] and record["versions"]["pagemill"]
    assert record["ocr_actors"] >= 1  # the OCR actors registered, on CPU
    assert record["gpus"] == {} and record["gpu_hours"] == 0
    assert record["pages_per_gpu_hour"] is None and record["usd_per_million_pages"] is None
    assert record["gpu_hour_usd"] == 2.5


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
    }


@pytest.mark.slow
def test_dry_run_reports_and_changes_nothing(job: Any, corpus_dir: Path, tmp_path: Path) -> None:
    src, out, cfg = job["src"], job["out"], job["cfg"]
    # an earlier GPU run of this configuration, as its _runs/ record reads: 3,600 rows per GPU-hour
    earlier = {"config_hash": cfg.config_hash(), "rows_written": 7200, "gpu_hours": 2.0}
    (out / "_runs" / "20260101T000000Z-earlier.json").write_text(json.dumps(earlier))
    # changes since the run: one path gets other bytes, one file is new
    shutil.copy(corpus_dir / "scan-book-page-01.pdf", src / "code-and-formula-01.pdf")
    shutil.copy(corpus_dir / "cjk-ja-vertical-01.pdf", src / "new-01.pdf")
    before = _tree(out)
    marker = tmp_path / "ocr-actor-started"
    env = dict(
        os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), PAGEMILL_TEST_OCR_FAULT=f"ocr:{marker}"
    )
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            *SETTINGS,
            f"input.uri={src}",
            f"output.uri={out}",
            "dry_run=true",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tree(out) == before  # nothing written, moved or removed
    assert not marker.exists()  # no OCR actor was started (the fault hook would have marked it)
    assert "pagemill run summary" not in proc.stdout
    text = proc.stdout
    assert "pagemill dry run" in text, text
    assert re.search(r"documents\s+new 1\s+changed 1\s+partial 0\s+done 3", text), text
    assert re.search(r"pages\s+new 1\s+changed 1\s+partial 0\s+done 2", text), text
    assert re.search(r"rows to do\s+2 of 5 \(3 already final\)", text), text
    assert re.search(r"estimate\s+0\.0006 GPU-hours at 3600\.0 pages per GPU-hour \(1 earlier run", text), (
        text
    )
    # the same dry run (in this process, on the fixture's Ray) on an output root that does not
    # exist yet creates nothing
    from pipeline.run import compose, run

    fresh = tmp_path / "never"
    r = run(compose([*SETTINGS, f"input.uri={src}", f"output.uri={fresh}", "dry_run=true"]))
    assert not fresh.exists()
    cats = {k: v["documents"] for k, v in r["by_category"].items()}
    assert cats == {"new": 5, "changed": 0, "partial": 0, "done": 0}
    assert r["rows_to_do"] == 5 and r["estimate"]["gpu_hours"] is None
