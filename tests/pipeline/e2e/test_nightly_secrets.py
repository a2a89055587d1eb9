"""No secret reaches an output file or a log line; exit codes tell config errors from data loss.

Real job subprocesses on embedded Ray with the tiny random-weight model (one 1-page PDF)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.run import EXIT_CONFIG, EXIT_ROWS_MISSING
from tests.pipeline.e2e.helpers import run_job as _run_job


def run_job(*overrides: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    # embedded Ray even when another `ray start` cluster runs on this machine (shared CI hosts)
    return _run_job(*overrides, env={"RAY_ADDRESS": "local", **(env or {})})


FAST = ["mode=tiny", "generation.max_new_tokens=8", "render.pages_per_task=4", "ray.ocr_batch_size=4"]
SECRETS = {
    "opt_in": "S3CRET-input-storage-key",
    "opt_out": "S3CRET-output-token-9f",
    "pw": "S3CRET-pdf-password-77",
    "pw_file": "S3CRET-password-in-file-42",
    "env": "S3CRET-from-env-xyz",
}


def _grep_tree(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return hits


def test_planted_secrets_reach_no_output_file_and_no_log_line(corpus_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(corpus_dir / "form-libreoffice-01.pdf", src / "form.pdf")
    pw_file = tmp_path / "passwords.tsv"
    pw_file.write_text(f"form.pdf\t{SECRETS['pw_file']}\n")
    out = tmp_path / "out"
    proc = run_job(
        f"input.uri={src}",
        f"output.uri={out}",
        *FAST,
        f"+input.storage_options.key={SECRETS['opt_in']}",
        f"+output.storage_options.token={SECRETS['opt_out']}",
        f"+input.passwords.otherdoc={SECRETS['pw']}",
        f"input.passwords_file={pw_file}",
        "+output.storage_options.password=${oc.env:PAGEMILL_TEST_SECRET}",
        env={"PAGEMILL_TEST_SECRET": SECRETS["env"]},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "_summary.json").exists() and list((out / "_runs").glob("*.json"))
    needles = list(SECRETS.values())
    assert _grep_tree(out, needles) == []
    log = proc.stdout + proc.stderr
    assert [n for n in needles if n in log] == []
    # the record still says which options were set (values masked)
    summary = (out / "_summary.json").read_text()
    assert '"token": "<redacted>"' in summary and '"password": "<redacted>"' in summary


def test_exit_codes_config_error_vs_rows_missing(tmp_path: Path) -> None:
    """A bad value is a configuration error (exit 2); rows missing after a run is exit 4, which
    test_nightly.py's quarantine test gets from real runs (the same poisoned document, with
    ray.ocr_max_retries=0) and checks against EXIT_ROWS_MISSING."""
    bad = run_job(f"output.uri={tmp_path / 'bad'}", *FAST, "render.dpi=-5")
    assert bad.returncode == EXIT_CONFIG == 2, bad.stderr[-2000:]
    assert "configuration error" in bad.stderr
    assert EXIT_ROWS_MISSING == 4 and EXIT_ROWS_MISSING != EXIT_CONFIG


@pytest.mark.parametrize("unused", [None])
def test_exit_code_constants_are_distinct(unused: None) -> None:
    from pipeline import run

    codes = [run.EXIT_OK, run.EXIT_HYDRA_OR_CRASH, run.EXIT_CONFIG, run.EXIT_MODEL, run.EXIT_ROWS_MISSING]
    assert len(set(codes)) == len(codes)
