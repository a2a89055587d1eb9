"""Checkpoint source resolution (model.hub) against a real Hugging Face cache on disk, offline: a
hub id resolves to its snapshot at the requested revision, an unknown revision or id is a
CheckpointUnavailable naming the offline option. Runs in a child interpreter because
huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE once, at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import json, sys
from model.hub import CheckpointUnavailable, resolve_config_json, resolve_source
out = {}
for rev in (None, "main", sys.argv[1], "0" * 40):
    try:
        out[str(rev)] = str(resolve_source("acme/ocr", revision=rev))
    except CheckpointUnavailable as e:
        out[str(rev)] = "unavailable: " + str(e)
try:
    resolve_config_json("acme/missing")
except CheckpointUnavailable as e:
    out["missing"] = "unavailable: " + str(e)
print(json.dumps(out))
"""


def test_hub_id_resolves_to_the_snapshot_of_its_revision(tmp_path: Path) -> None:
    old, new = "a" * 40, "b" * 40
    repo = tmp_path / "models--acme--ocr"
    for sha in (old, new):
        (repo / "snapshots" / sha).mkdir(parents=True)
        (repo / "snapshots" / sha / "config.json").write_text(json.dumps({"sha": sha}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, old], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["None"] == got["main"] == str(repo / "snapshots" / new)  # default: the main branch
    assert got[old] == str(repo / "snapshots" / old)  # a pinned commit, not the newest
    for key in ("0" * 40, "missing"):
        assert got[key].startswith("unavailable: could not fetch 'acme/") and "model=tiny_random" in got[key]
