"""End to end: `python -m pipeline.run` on real PDFs with the tiny random-weight model on embedded
local Ray, and the same job through `ray job submit` on a real local cluster. Output is read back
with pyarrow and checked against the corpus MANIFEST (one row per page, one doc_error row per
unreadable document, with its reason code).

The model is real code with random weights (its text is gibberish and rarely ends with EOS, so
pages end `truncated` at the small token cap used here); every other part is the production path.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.schema import COLUMNS, DOC_ERROR_CODES, STATUSES
from tests.pipeline.e2e.helpers import REPO, job_env, read_pages, run_job

PAGE_STATUSES = {"ok", "truncated", "repetition", "render_error", "ocr_error"}
ERROR_CODE = {
    "error:empty-file": "empty_file",
    "error:not-a-pdf": "not_a_pdf",
    "error:no-pages": "zero_pages",
    "error:password-required": "needs_password",
}

# the cheap error-path runs stay in the default suite (`make test`); the full runs are `slow`
# (`make test-slow`, CI's second test step)


def manifest(corpus: Path) -> list[dict[str, str]]:
    with open(corpus / "MANIFEST.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.mark.slow
def test_corpus_dev_end_to_end(corpus_dir: Path, tmp_path: Path) -> None:
    """All 68 dev PDFs: rows match MANIFEST page counts and expected behaviours; a password given in
    a passwords file opens its document; the summary accounts for every page."""
    pw = tmp_path / "passwords.tsv"
    pw.write_text("# name or sha256 <TAB> password\nencrypted-needs-password-01.pdf\topenpassword\n")
    out = tmp_path / "out"
    proc = run_job(
        f"input.uri={corpus_dir}",
        f"output.uri={out}",
        "mode=tiny",
        "generation.max_new_tokens=8",
        f"input.passwords_file={pw}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "pagemill run summary" in proc.stdout

    rows = read_pages(out)
    assert set(rows[0]) == set(COLUMNS)
    by_doc: dict[str, list[dict]] = {}
    for r in rows:
        by_doc.setdefault(r["doc_id"], []).append(r)
    keys = [(r["doc_id"], r["page_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"

    expected_rows = 0
    for m in manifest(corpus_dir):
        got = sorted(by_doc.pop(m["sha256"]), key=lambda r: r["page_index"])
        assert {r["source_uri"].rsplit("/", 1)[-1] for r in got} == {m["file"]}
        if m["file"] == "encrypted-needs-password-01.pdf":  # opened with the password from the file
            assert [r["page_index"] for r in got] == [0] and got[0]["status"] in PAGE_STATUSES
            expected_rows += 1
        elif m["expected_rows"] == "doc_error":
            assert len(got) == 1, m["file"]
            (r,) = got
            assert (r["page_index"], r["status"]) == (-1, "doc_error")
            assert r["error_code"] == ERROR_CODE[m["expected_behavior"]], (m["file"], r["error"])
            assert r["error"]
            expected_rows += 1
        else:
            n = int(m["expected_rows"].split(":")[1])
            assert [r["page_index"] for r in got] == list(range(n)), m["file"]
            for r in got:
                assert r["status"] in PAGE_STATUSES, (m["file"], r["page_index"], r["status"], r["error"])
                assert r["page_count"] == n and r["mode"] == "tiny" and r["dpi"] > 0
                if r["status"] != "render_error":
                    assert r["num_vision_tokens"] == 73  # tiny mode: 8 x 9 + separator
                    assert 1 <= r["num_output_tokens"] <= 8 and r["raw_output"] is not None
                    assert r["width_px"] > 0 and r["height_px"] > 0 and r["width_pt"] > 0
            expected_rows += n
    assert not by_doc, f"rows for documents not in the manifest: {list(by_doc)}"
    assert len(rows) == expected_rows

    summary = json.loads((out / "_summary.json").read_text())
    assert summary["accounting_ok"] is True and summary["missing_rows"] == 0
    assert summary["rows_out"] == len(rows) == summary["rows_expected"]
    assert summary["documents_in"] == 68
    assert sum(summary["rows_by_status"].values()) == len(rows)
    assert set(summary["rows_by_status"]) == set(STATUSES)
    assert summary["config"]["mode"]["name"] == "tiny"
    # vertical tall page: rendered with a lowered dpi so it fits the pixel bounds, not dropped
    (tall,) = [
        r for r in rows if r["source_uri"].endswith("odd-page-very-tall-01.pdf") and r["page_index"] == 1
    ]
    assert tall["status"] != "render_error" and tall["dpi"] < 144
    assert max(tall["width_px"], tall["height_px"]) <= 8192
    assert all(
        code in DOC_ERROR_CODES for code in {r["error_code"] for r in rows if r["status"] == "doc_error"}
    )


@pytest.mark.slow
def test_default_gundam_overrides_and_images(tmp_path: Path) -> None:
    """Default mode (gundam) on the bundled samples, with dpi and include_images overridden: the
    overrides reach the rows, the config hash and the summary; page images decode to their size."""
    import io

    from PIL import Image

    from pipeline.run import compose

    out = tmp_path / "out"
    overrides = [
        f"output.uri={out}",
        "render.dpi=100",
        "output.include_images=true",
        "generation.max_new_tokens=6",
    ]
    proc = run_job(*overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_pages(out)
    cfg = compose(["model=tiny_random", *overrides])
    assert {r["config_hash"] for r in rows} == {cfg.config_hash()}
    assert cfg.config_hash() != compose(["model=tiny_random", f"output.uri={out}"]).config_hash()
    pages = [r for r in rows if r["page_index"] >= 0]
    assert len(pages) == 3 and len(rows) == 5  # tests/data: 3 one-page PDFs + 2 doc_error files
    for r in pages:
        assert r["mode"] == "gundam" and r["dpi"] == pytest.approx(100, abs=0.01)
        assert r["num_vision_tokens"] in (903, 893, 693, 583, 273)  # 2x3 or 3x2 tiles for these pages
        img = Image.open(io.BytesIO(r["page_image"]["bytes"]))
        assert img.size == (r["width_px"], r["height_px"])
        assert r["width_px"] == pytest.approx(r["width_pt"] * 100 / 72, abs=1)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["config"]["render"]["dpi"] == 100 and summary["config_hash"] == cfg.config_hash()
    assert summary["accounting_ok"]


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_job(f"input.uri={tmp_path / 'nope'}", f"output.uri={tmp_path / 'out'}", timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "input error" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "out" / "pages").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_on_local_cluster(tmp_path: Path) -> None:
    """`ray start --head`, then the README's `ray job submit ... -- python -m pipeline.run` from the
    repo root (working dir uploaded with jobs/runtime_env.yaml); wait for success; check output."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = job_env()
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway loopback cluster; real clusters keep their auth
    temp = Path("/tmp") / f"pm-ray-{os.getpid()}"  # short: unix socket paths are length-limited
    dash = _free_port()
    start = subprocess.run(
        [
            str(ray_bin),
            "start",
            "--head",
            f"--temp-dir={temp}",
            f"--port={_free_port()}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        out = tmp_path / "out"
        address = f"http://127.0.0.1:{dash}"
        for _ in range(60):  # the job server comes up a little after `ray start` returns
            if (
                subprocess.run(
                    [str(ray_bin), "job", "list", "--address", address],
                    env=env,
                    capture_output=True,
                    timeout=60,
                ).returncode
                == 0
            ):
                break
            time.sleep(1)
        sub = subprocess.run(
            [
                str(ray_bin),
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                ".",
                "--runtime-env",
                "jobs/runtime_env.yaml",
                "--",
                "python",
                "-m",
                "pipeline.run",  # a bare submit: the driver joins through RAY_ADDRESS, no ray.address=auto
                "model=tiny_random",
                "model.device=cpu",  # this cluster has no GPUs: on a cluster the model runs on CPU only when said
                "input.uri=tests/data",
                f"output.uri={out}",
                "generation.max_new_tokens=4",
                "mode=base",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert sub.returncode == 0, sub.stdout[-6000:] + sub.stderr[-3000:]
        assert "succeeded" in (sub.stdout + sub.stderr).lower()
        rows = read_pages(out)
        assert len(rows) == 5 and {r["mode"] for r in rows} == {"base"}
        assert json.loads((out / "_summary.json").read_text())["accounting_ok"]
        # jobs/nightly.sh on the cluster: one submission id per output root and night, so a second
        # submission of the same night (a cron double-fire) is refused by Ray itself
        nightly_env = {
            **env,
            "RAY_ADDRESS": address,
            "NIGHTLY_DATE": "2026-01-02",
            "SUBMIT_FLAGS": "--no-wait",
        }
        nightly = [
            "bash",
            "jobs/nightly.sh",
            f"output.uri={tmp_path / 'nightly'}",
            "model=tiny_random",
            "model.device=cpu",
            "input.uri=tests/data",
            "generation.max_new_tokens=4",
        ]
        first = subprocess.run(
            nightly, cwd=REPO, env=nightly_env, capture_output=True, text=True, timeout=300
        )
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        sid = next(
            line.split("submission id ", 1)[1].strip()
            for line in first.stderr.splitlines()
            if "submission id " in line
        )
        assert sid.endswith("-2026-01-02") and "nightly" in sid
        second = subprocess.run(
            nightly, cwd=REPO, env=nightly_env, capture_output=True, text=True, timeout=300
        )
        assert second.returncode != 0
        assert sid in second.stdout + second.stderr and "already exists" in (second.stdout + second.stderr)
    finally:
        _stop_cluster(temp)  # this cluster only: `ray stop` would end every Ray on the machine
        shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: Path) -> None:
    """End the processes of the `ray start` cluster whose temp dir is `temp` (each names it on its
    command line), and their children (the job drivers), but no other Ray on this host."""
    import signal

    def procs() -> dict[int, tuple[int, bytes]]:
        out = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    out[int(d.name)] = (ppid, (d / "cmdline").read_bytes())
                except (OSError, ValueError, IndexError):
                    pass
        return out

    table = procs()
    mine = {pid for pid, (_, cmd) in table.items() if str(temp).encode() in cmd}
    while True:  # add descendants
        more = {pid for pid, (ppid, _) in table.items() if ppid in mine} - mine
        if not more:
            break
        mine |= more
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(pid) for pid in mine):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_unreachable_weights_name_the_offline_option(tmp_path: Path) -> None:
    """The default model with no weights in reach: one clear message naming model=tiny_random,
    exit code 3, before any Ray work or output."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline.run",
        f"model.source={tmp_path / 'no-weights'}",
        f"output.uri={tmp_path / 'o'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3
    assert "model=tiny_random" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "o" / "pages").exists()
