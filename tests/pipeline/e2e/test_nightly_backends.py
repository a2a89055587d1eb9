"""The nightly guarantees on both backends, input and output: local `file://` and a real S3 server
(moto server mode on 127.0.0.1, reached through s3fs `storage_options` by the driver and by every
Ray worker). A run whose driver is SIGKILLed mid-run resumes to exactly the rows of one
uninterrupted build (so the backends agree), and an incremental rerun on S3 writes nothing.

The tiny random-weight model is deterministic on CPU, so an interrupted-then-resumed build must
end with exactly the rows (and statuses, and text) of an uninterrupted one."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from tests.pipeline.e2e.helpers import REPO, job_env

pytestmark = pytest.mark.slow
FAST = [
    "mode=tiny",
    "generation.max_new_tokens=4",
    "render.pages_per_task=4",
    "ray.ocr_batch_size=4",
    "ray.write_batch_size=8",
]
DOCS = ("slides-deck-26p-01.pdf", "form-libreoffice-01.pdf", "not-a-pdf-01.pdf")
COLUMNS = ["doc_id", "page_index", "status", "config_hash", "markdown", "error_code"]


def _opts(side: str, so: dict[str, Any]) -> list[str]:
    return [f"+{side}.storage_options.{k}='{v}'" for k, v in so.items()]


@pytest.fixture(params=["file", "s3"])
def backend(request, tmp_path: Path, corpus_dir: Path):
    """(input uri, output uri, extra overrides, fsspec filesystem, output path) of one backend."""
    import fsspec

    if request.param == "file":
        src = tmp_path / "in"
        src.mkdir()
        for n in DOCS:
            (src / n).write_bytes((corpus_dir / n).read_bytes())
        return (
            f"file://{src}",
            f"file://{tmp_path / 'out'}",
            [],
            fsspec.filesystem("file"),
            str(tmp_path / "out"),
        )
    bucket, fs, so = request.getfixturevalue("s3_bucket")
    for n in DOCS:
        fs.pipe(f"{bucket}/in/{n}", (corpus_dir / n).read_bytes())
    return (
        f"s3://{bucket}/in",
        f"s3://{bucket}/out",
        [*_opts("input", so), *_opts("output", so)],
        fs,
        f"{bucket}/out",
    )


def _cmd(src: str, out: str, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.run",
        "model=tiny_random",
        "progress=false",
        f"input.uri={src}",
        f"output.uri={out}",
        *FAST,
        *extra,
    ]


def _env_local() -> dict[str, str]:
    return {**job_env(), "RAY_ADDRESS": "local"}  # embedded Ray even if another cluster runs here


def _run(
    src: str, out: str, extra: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cmd(src, out, extra),
        check=False,
        cwd=REPO,
        env={**_env_local(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _rows(fs: Any, path: str) -> list[tuple]:
    fs.invalidate_cache()
    t = ds.dataset(f"{path}/pages", filesystem=fs, format="parquet").to_table(columns=COLUMNS)
    return sorted(tuple(r.values()) for r in t.to_pylist())


def _summary(fs: Any, path: str) -> dict:
    import json

    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{path}/_summary.json"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> list[tuple]:
    """The rows of one uninterrupted build of DOCS (local files): what every interrupted-then-resumed
    build must end with, on either backend."""
    import fsspec

    root = tmp_path_factory.mktemp("reference")
    src = root / "in"
    src.mkdir()
    for n in DOCS:
        (src / n).write_bytes((corpus_dir / n).read_bytes())
    full = _run(str(src), str(root / "out"), [])
    assert full.returncode == 0, full.stderr[-3000:]
    return _rows(fsspec.filesystem("file"), str(root / "out"))


_REFERENCE: dict[str, Any] = {}  # the file run's results, compared with the s3 run's


def _kill_mid_run(proc: subprocess.Popen, log: Any, fs: Any, path: str, driver_only: bool) -> None:
    """SIGKILL the run once it has committed two ledger parts: on file:// its driver alone (its
    embedded Ray must go down with it), on s3:// its whole process group."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(
                f"the run ended (exit {proc.returncode}) before it could be killed:\n{log.read()[-4000:]}"
            )
        fs.invalidate_cache()
        if len([p for p in (fs.glob(f"{path}/_ledger/part-*.parquet") or [])]) >= 2:
            break
        time.sleep(0.2)
    if not driver_only:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # wait for the driver's embedded Ray to go down with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)


def test_sigkill_then_resume_equals_uninterrupted(backend, reference: list[tuple]) -> None:
    src, out, extra, fs, path = backend
    # 1. a run whose driver is SIGKILLed after its first commits (its log kept for a failure message)
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        _cmd(src, out, extra),
        cwd=REPO,
        # each page's render slowed (output unchanged): the commits spread out over seconds, so the
        # kill lands between the second one and the last even on a loaded machine
        env={**_env_local(), "PAGEMILL_TEST_RENDER_FAULT": "sleep:0.75"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _kill_mid_run(proc, log, fs, path, driver_only=src.startswith("file://"))
    partial = len(_rows(fs, path))
    assert 0 < partial < len(reference), "kill came too late to test a resume"

    # 2. the resume completes the build, with exactly the rows of the uninterrupted one (the tiny
    # model is deterministic on CPU), so also equal across backends
    resumed = _run(src, out, extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = _summary(fs, path)
    assert s["accounting_ok"] and s["rows_already_final"] >= partial and s["rows_written"] > 0
    final = _rows(fs, path)
    assert len(final) == len(set(final)) == s["rows_expected"]
    assert final == reference

    # 3. on S3, an incremental rerun over unchanged inputs writes nothing (on local files
    # test_nightly.py's incremental test checks that, down to every data file's bytes and mtime)
    if src.startswith("s3://"):
        again = _run(src, out, extra)
        assert again.returncode == 0, again.stderr[-3000:]
        s2 = _summary(fs, path)
        assert s2["rows_written"] == 0 and s2["accounting_ok"] and _rows(fs, path) == final


# ----------------------------------------------------------------------------- faults, force, tools

SMALL = ("form-libreoffice-01.pdf", "rtl-arabic-rotated-4p-01.pdf", "not-a-pdf-01.pdf")
POISON = ("cjk-ja-vertical-01.pdf", "poison-cjk.pdf")  # (corpus file, its name in the input)
INSPECTED = ("rtl-arabic-rotated-4p-01.pdf", 1)


@pytest.fixture(params=["file", "s3"])
def small_backend(request, tmp_path: Path, corpus_dir: Path) -> dict[str, Any]:
    """One backend holding the SMALL documents: input and output uris, the job's extra overrides,
    the fsspec filesystem with the input and output paths on it, and the tools' --storage-options."""
    import json

    import fsspec

    if request.param == "file":
        fs, so, root = fsspec.filesystem("file"), {}, str(tmp_path)
        uri = f"file://{root}"
    else:
        bucket, fs, so = request.getfixturevalue("s3_bucket")
        root, uri = bucket, f"s3://{bucket}"
    b = {
        "name": request.param,
        "src": f"{uri}/in",
        "out": f"{uri}/out",
        "extra": [*_opts("input", so), *_opts("output", so)],
        "fs": fs,
        "in_path": f"{root}/in",
        "path": f"{root}/out",
        "so": json.dumps(so),
    }
    fs.makedirs(b["in_path"], exist_ok=True)
    for n in SMALL:
        fs.pipe(f"{b['in_path']}/{n}", (corpus_dir / n).read_bytes())
    return b


def _keys_once(rows: list[tuple]) -> set[tuple[str, int]]:
    keys = [(r[0], r[1]) for r in rows]
    assert len(keys) == len(set(keys)), "a row written twice"
    return set(keys)


def _documents(fs: Any, path: str) -> list[dict]:
    """documents/ rows, the source uri cut to its file name (the rest names the backend)."""
    fs.invalidate_cache()
    t = ds.dataset(f"{path}/documents", filesystem=fs, format="parquet").to_table().to_pylist()
    for d in t:
        d["source_uri"] = d["source_uri"].rsplit("/", 1)[-1]
    return sorted(t, key=lambda d: d["id"])


def _report_facts(page: str, root: str) -> dict[str, Any]:
    """What a report says that does not depend on the backend or the clock: its fact rows but the
    output and the timings, its rows by status, its worst-pages table (the output root replaced)."""
    import re

    facts = dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", page))
    for k in (
        "output",
        "last run: wall time (s)",
        "last run: pages/s",
        "median render ms/page",
        "median OCR ms/page",
    ):
        assert facts.pop(k, None) is not None, f"report lost its {k!r} fact"
    statuses = re.search(r"<h2>Rows by status</h2>(.*?)<h2>", page, re.S)
    worst = re.search(r"<h2>Worst pages by text-layer agreement</h2>(.*)</table>", page, re.S)
    assert statuses and worst
    return {"facts": facts, "statuses": statuses.group(1), "worst": worst.group(1).replace(root, "OUTPUT")}


def test_backends_actor_kill_quarantine_force_and_tools(
    small_backend, tmp_path: Path, corpus_dir: Path, capsys
) -> None:
    """On each backend, in three job runs: an OCR actor killed mid-run (its batch rerun on a new
    actor), an incremental run whose new document kills the OCR worker every time (exit 4, noted
    in _failures/), then a force run that redoes every row and quarantines that document; then
    documents/ (as built, rebuilt and exported), the report and inspect tools with
    --storage-options. Rows, documents and the tools' results are equal across backends."""
    import json

    from pipeline import documents, inspect, report
    from pipeline.documents import assemble_documents
    from pipeline.outputs import OutputStore

    b = small_backend
    fs, path = b["fs"], b["path"]
    # quarantine_after=1: one failed run; ray.ocr_max_retries (not hashed) is 3 for the actor
    # kill, 0 for the poisoned runs (one actor death per run instead of four)
    base = [*b["extra"], "quarantine_after=1"]
    once = [*base, "ray.ocr_max_retries=0"]

    # 1. the OCR actor process dies in its first batch: replaced, every row exactly once
    marker = tmp_path / "ocr-died"
    first = _run(b["src"], b["out"], base, {"PAGEMILL_TEST_OCR_FAULT": f"ocr_call:{marker}"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert marker.exists(), "the fault never fired"
    s1 = _summary(fs, path)
    assert s1["accounting_ok"] and s1["rows_written"] == s1["rows_expected"] == 6  # 1 + 4 pages + doc_error
    rows1 = _rows(fs, path)
    assert _keys_once(rows1) and len(rows1) == 6

    # 2. incremental: a new document whose batch kills the OCR worker on every attempt; only it
    #    is tried, its row is reported missing (exit 4) and the failure noted
    fs.pipe(f"{b['in_path']}/{POISON[1]}", (corpus_dir / POISON[0]).read_bytes())
    poison = _run(b["src"], b["out"], once, {"PAGEMILL_TEST_OCR_POISON": "poison-"})
    assert poison.returncode == 4, poison.stderr[-3000:]  # EXIT_ROWS_MISSING
    s2 = _summary(fs, path)
    assert not s2["accounting_ok"] and s2["rows_written"] == 0 and s2["rows_already_final"] == 6
    assert s2["missing_rows"] == 1 and len(s2["missing_documents"]) == 1
    fs.invalidate_cache()
    assert len(fs.glob(f"{path}/_failures/*.parquet")) == 1
    assert _rows(fs, path) == rows1

    # 3. force: every row redone once (the same rows: the model is deterministic), and the failed
    #    document gets its quarantined row instead of another attempt
    forced = _run(b["src"], b["out"], [*once, "force=true"], {"PAGEMILL_TEST_OCR_POISON": "poison-"})
    assert forced.returncode == 0, forced.stderr[-3000:]
    s3 = _summary(fs, path)
    assert s3["accounting_ok"] and s3["rows_written"] == s3["rows_expected"] == 7
    assert s3["documents_quarantined"] == 1 and s3["missing_rows"] == 0
    rows3 = _rows(fs, path)
    assert _keys_once(rows3) and len(rows3) == 7
    (q,) = [r for r in rows3 if r not in rows1]
    assert q[0] == s2["missing_documents"][0] and q[2] == "ocr_error" and q[5] == "quarantined"

    # 4. documents/: one per document, equal to a full rebuild from pages/ (here, and by the
    #    documents tool on the backend itself), and exported as markdown
    docs = _documents(fs, path)
    assert sorted(d["id"] for d in docs) == sorted({r[0] for r in rows3})
    local = tmp_path / "rebuilt"
    fs.invalidate_cache()
    fs.get(f"{path}/pages", str(local / "pages"), recursive=True)
    assemble_documents(OutputStore(str(local)), s3["config_hash"])
    assert _documents(OutputStore(str(local)).fs, str(local)) == docs
    so = ["--storage-options", b["so"]]
    assert documents.main([b["out"], *so]) == 0
    assert _documents(fs, path) == docs
    export = tmp_path / "md"
    assert documents.main([b["out"], *so, "--export", str(export)]) == 0
    exported = {p.name: p.read_text() for p in export.glob("*.md")}
    assert len(exported) == len(docs)

    # 5. report and inspect read the backend (and inspect renders the page again from its source)
    capsys.readouterr()
    assert report.main([b["out"], *so]) == 0
    fs.invalidate_cache()
    page = fs.cat_file(f"{path}/_report/index.html").decode()
    assert all(fs.exists(f"{path}/_report/{p}.png") for p in report.PLOTS)
    facts = _report_facts(page, OutputStore(b["out"], json.loads(b["so"]), create=False).root)
    png = tmp_path / "inspect.png"
    doc, n = INSPECTED
    args = [
        b["out"],
        *so,
        "--input-storage-options",
        b["so"],
        "--doc",
        doc,
        "--page",
        str(n),
        "--out",
        str(png),
    ]
    capsys.readouterr()
    assert inspect.main(args) == 0
    shown = capsys.readouterr()
    from PIL import Image

    with Image.open(png) as img:
        pixels = hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()
    signals = shown.err.strip().splitlines()[-1]

    # 6. equal across backends (the file run is parametrized first)
    got = {
        "rows": (rows1, rows3),
        "documents": docs,
        "exported": exported,
        "report": facts,
        "inspect": (shown.out, signals, pixels),
    }
    assert got == _REFERENCE.setdefault("tools", got)
