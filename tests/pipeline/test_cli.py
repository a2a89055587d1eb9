"""`pagemill` (pipeline.cli): the entry point is declared, --help lists every subcommand, and each
subcommand reaches its module (the python -m forms are the same functions). Runs through
`python -m pipeline.cli` because the project is not pip-installed on CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

from pipeline.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_entry_point_declared() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["pagemill"] == "pipeline.cli:main"


def test_help_lists_every_subcommand() -> None:
    proc = _cli("--help")
    assert proc.returncode == 0
    for name in ("run", "report", "inspect", "documents", *COMMANDS):
        assert f"\n    {name}" in proc.stdout, name
    assert _cli("bogus").returncode == 2


def test_subcommands_reach_their_modules(tmp_path: Path) -> None:
    for name in COMMANDS:
        if name != "run":
            proc = _cli(name, "--help")
            assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr[-500:])
    # run takes the same Hydra overrides as python -m pipeline.run
    job = _cli("run", "--cfg", "job", "model=tiny_random", "render.dpi=200")
    assert job.returncode == 0 and "dpi: 200" in job.stdout and "name: tiny_random" in job.stdout
    bad = _cli("run", "render.dpi=5", f"output.uri={tmp_path}")
    assert bad.returncode == 2 and "render.dpi" in bad.stderr
