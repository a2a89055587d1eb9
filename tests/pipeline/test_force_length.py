"""Forced output lengths (`generation.force_length=text_layer`, benchmarks): the rule
(`pipeline.forced`), its validation, and one real pipeline run with the tiny random
model - through the end-to-end benchmark `jobs/bench_pipeline.py --allow-cpu` - where every page
generates exactly its forced length with no fallback pass and the report adds up.

Small, fast inputs: pages whose forced lengths are short (tens to a few hundred tokens), `mode=tiny`
and `generation.max_model_len=1024`, since the tiny model decodes ~25 ms/token on this CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pymupdf
import pytest

from model.tokenizer import PROMPTS, OcrTokenizer
from pipeline.config import ConfigValueError, GenerationConfig
from pipeline.forced import MIN_TEXT_CHARS, cap_forced_length, forced_from_text, forced_length
from pipeline.render import PageImage, RenderOptions, render_pages
from pipeline.run import compose
from tests.pipeline.e2e.helpers import REPO, job_env, read_pages

# (file, forced lengths at max_model_len 1024 in tiny mode): short, different, with a text layer
SMALL = ("slides-odp-table-01.pdf", "form-libreoffice-01.pdf")  # 3 pages (359, 71, 176) + 1 (196)
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def tok() -> OcrTokenizer:
    return OcrTokenizer.default()


def _rule(page: pymupdf.Page, tok: OcrTokenizer, prompt_len: int, max_model_len: int) -> int:
    """The rule as jobs/benchmark.py first wrote it inline, kept here to pin the shared function."""
    # pymupdf types get_text()'s result as a union over all output kinds
    text = cast(str, page.get_text("text"))
    blocks = [b for b in cast(list[tuple[Any, ...]], page.get_text("blocks")) if b[6] == 0 and b[4].strip()]
    has_text = len("".join(text.split())) >= 20
    target = len(tok.encode(text)) + 20 * len(blocks) if has_text else 1000
    return max(1, min(target, max_model_len - prompt_len))


def test_forced_length_rule(corpus_dir: Path, tok: OcrTokenizer) -> None:
    names = [*SMALL, "scan-book-page-01.pdf", "paper-arxiv-math-01.pdf"]  # + no text layer, + long text
    for name in names:
        with pymupdf.open(corpus_dir / name) as doc:
            for page in doc:
                for prompt_len, max_len in ((0, 8192), (83, 1024), (900, 1024), (8191, 8192), (9000, 8192)):
                    assert forced_length(page, tok, prompt_len, max_len) == _rule(
                        page, tok, prompt_len, max_len
                    )
    with pymupdf.open(corpus_dir / "scan-book-page-01.pdf") as doc:  # a scan: no text layer -> 1,000
        assert len("".join(cast(str, doc[0].get_text("text")).split())) < MIN_TEXT_CHARS
        assert forced_length(doc[0], tok, 10, 8192) == 1000 and forced_length(doc[0], tok, 8000, 8192) == 192
        assert forced_length(doc[0], tok, 9000, 8192) == 1  # at least 1
    # the pipeline caps in two steps (renderer: prompt 0; OCR stage: the real prompt); same value
    assert all(
        cap_forced_length(cap_forced_length(t, 0, 1024), p, 1024) == cap_forced_length(t, p, 1024)
        for t in (1, 50, 1000, 5000)
        for p in (0, 83, 1000, 1023, 2000)
    )
    # the renderer counts the text blocks only when asked (no tokenizer there); the OCR stage's
    # length from that count and the text layer (prompt length 0) is the rule's
    data = (corpus_dir / SMALL[1]).read_bytes()
    (plain,) = render_pages(data, None, [0], RenderOptions(dpi=72))
    (forced,) = render_pages(data, None, [0], RenderOptions(dpi=72), count_blocks=True)
    assert isinstance(plain, PageImage) and isinstance(forced, PageImage)
    assert plain.text_blocks == -1 and forced.text_blocks > 0 and forced.text == plain.text
    assert forced_from_text(forced.text, forced.text_blocks, tok, 0, MAX_MODEL_LEN) == 196


def test_bad_force_length_names_the_key(tmp_path: Path) -> None:
    assert GenerationConfig().force_length == "none"
    with pytest.raises(ConfigValueError, match=r"generation\.force_length='bogus'.*\[none, text_layer\]"):
        compose(["model=tiny_random", "generation.force_length=bogus"])
    # the job stops before any work, with the key in its message
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "model=tiny_random",
            f"output.uri={out}",
            "generation.force_length=bogus",
        ],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "generation.force_length" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_force_length_is_in_the_config_hash() -> None:
    base = compose(["model=tiny_random"])
    forced = compose(["model=tiny_random", "generation.force_length=text_layer"])
    assert base.output_affecting()["generation.force_length"] == "none"  # hashed like any setting
    assert forced.output_affecting()["generation.force_length"] == "text_layer"
    assert forced.config_hash() != base.config_hash()
    full = compose(["model=full_random"])
    assert (full.model.name, full.model.dtype, full.model.source) == ("full_random", "bfloat16", "")
    assert full.config_hash() != base.config_hash()


@pytest.mark.slow
def test_pipeline_forced_lengths_and_bench_smoke(tmp_path: Path, tok: OcrTokenizer, corpus_copy) -> None:
    """One pipeline run serves both checks (it costs ~30 s of a tight CI budget): `jobs/bench_pipeline.py
    --allow-cpu` runs the job in-process (`pipeline.run.run`, embedded Ray) with model=tiny_random and
    generation.force_length=text_layer; every page row then has exactly its forced length and one
    attempt, and the report JSON adds up. Without --allow-cpu it refuses at once."""
    src = corpus_copy(*SMALL)
    out, report = tmp_path / "out", tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "jobs.bench_pipeline",
        "--corpus",
        str(src),
        "--out",
        str(out),
        "--json-out",
        str(report),
        "--no-engine-alone",
        "mode=tiny",
        f"generation.max_model_len={MAX_MODEL_LEN}",
        # model=tiny_random caps generation at 64 tokens (the demo); forced lengths need room
        f"generation.max_new_tokens={MAX_MODEL_LEN}",
    ]
    env = {**job_env(), "CUDA_VISIBLE_DEVICES": ""}
    refused = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "CUDA" in refused.stderr and not out.exists()
    proc = subprocess.run(
        [*cmd, "--allow-cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    rows = read_pages(out)
    assert len(rows) == 4
    for r in rows:
        with pymupdf.open(src / r["source_uri"].rsplit("/", 1)[-1]) as doc:
            prompt_len = len(tok.build_prompt_ids(PROMPTS["document"], r["num_vision_tokens"]))
            expected = forced_length(doc[r["page_index"]], tok, prompt_len, MAX_MODEL_LEN)
        where = (r["source_uri"], r["page_index"])
        assert r["num_output_tokens"] == expected, where
        # forced pages end without EOS by design and get no fallback pass
        got = (r["finish_reason"], r["status"], r["attempts"], r["fallback"])
        assert got == ("length", "truncated", 1, None), where
    assert len({r["num_output_tokens"] for r in rows}) == 4  # four different targets, each met
    assert {r["model_id"] for r in rows} == {"tiny_random:seed=0"}

    rep = json.loads(report.read_text())
    assert rep["model"] == "tiny_random" and rep["device"] == "cpu" and rep["accounting_ok"]
    assert rep["pages_written"] == rep["pages_ocr_ok"] == 4 and rep["rows_by_status"] == {"truncated": 4}
    assert rep["output_tokens"] == sum(r["num_output_tokens"] for r in rows)
    assert rep["mean_forced_tokens"] == pytest.approx(rep["output_tokens"] / 4, abs=0.1)
    assert rep["pages_per_s"] > 0 and rep["pages_per_day"] > 0 and rep["wall_s"] >= rep["pipeline_wall_s"]
    assert 0 < rep["ocr_window_s"] < rep["wall_s"] and rep["pages_per_s_ocr_window"] > rep["pages_per_s"]
    assert "generation.force_length=text_layer" in rep["overrides"] and rep["command"].startswith("python -m")
    assert "OcrStage" in rep["ray_data_stats"] and "OcrStage" in proc.stdout
