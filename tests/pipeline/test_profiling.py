"""The opt-in stack sampler (pipeline/profiling.py): it writes one JSON line per window, naming
each thread and where it spent that window, and nothing without PAGEMILL_PROFILE_DIR."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipeline.profiling import PROFILE_DIR_ENV, StackSampler


def _spin_in_named_function(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(200))


def test_windows_name_each_thread_and_where_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path / "prof"))
    sampler = StackSampler.from_env("ocr")
    assert sampler is not None
    sampler.window_s = 0.5
    busy = threading.Thread(target=_spin_in_named_function, args=(1.6,), name="busy-worker")
    busy.start()
    busy.join()
    time.sleep(0.1)
    sampler.stop()
    (out,) = (tmp_path / "prof").glob("ocr-*.jsonl")
    windows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(windows) >= 2 and all(w["samples"] > 0 and w["t1"] >= w["t0"] for w in windows)
    stacks = windows[0]["threads"]["busy-worker"]
    top, share = stacks[0]
    assert "_spin_in_named_function" in top.split(" < ")[0] and share > 0.5
    assert "pagemill-profiler" not in windows[0]["threads"]  # not itself


def test_off_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    assert StackSampler.from_env("ocr") is None
