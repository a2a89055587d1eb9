"""Opt-in wall-clock stack sampling of a stage actor (diagnostics, no Ray here).

With `PAGEMILL_PROFILE_DIR` set (a local directory on the actor's node), an OCR actor starts a
`StackSampler`: a daemon thread that every `PAGEMILL_PROFILE_EVERY_S` (default 0.01 s) reads the
innermost frames of every thread of its process and, once per `window_s`, appends one JSON line
per window to `<dir>/<stage>-<pid>.jsonl`: for each thread, its most frequent stacks (innermost
last) with their share of the window's samples. Where the engine's host thread spends its wall
time (a CUDA sync, building requests, waiting for the interpreter lock after a C call) shows
there, by time, beside the benchmark's GPU-utilisation windows.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

PROFILE_DIR_ENV = "PAGEMILL_PROFILE_DIR"
PROFILE_EVERY_ENV = "PAGEMILL_PROFILE_EVERY_S"


def _stack(frame: Any, depth: int) -> str:
    parts: list[str] = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{Path(code.co_filename).name}:{frame.f_lineno}:{code.co_name}")
        frame = frame.f_back
    return " < ".join(parts)


class StackSampler:
    def __init__(self, out: Path, every_s: float = 0.01, window_s: float = 10.0, depth: int = 6) -> None:
        self.out, self.every_s, self.window_s, self.depth = out, every_s, window_s, depth
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pagemill-profiler", daemon=True)

    @classmethod
    def from_env(cls, stage: str) -> StackSampler | None:
        where = os.environ.get(PROFILE_DIR_ENV)
        if not where:
            return None
        Path(where).mkdir(parents=True, exist_ok=True)
        every = float(os.environ.get(PROFILE_EVERY_ENV) or 0.01)
        return cls(Path(where) / f"{stage}-{os.getpid()}.jsonl", every_s=every).start()

    def start(self) -> StackSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        me = threading.get_ident()
        counts: dict[str, Counter[str]] = {}
        n = 0
        t_window = time.time()
        while not self._stop.wait(self.every_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():  # pyright: ignore[reportPrivateUsage]
                if ident == me:
                    continue
                name = names.get(ident, str(ident))
                counts.setdefault(name, Counter())[_stack(frame, self.depth)] += 1
            n += 1
            if time.time() - t_window >= self.window_s:
                self._write(t_window, n, counts)
                counts, n, t_window = {}, 0, time.time()

    def _write(self, t0: float, n: int, counts: dict[str, Counter[str]]) -> None:
        rec = {
            "t0": round(t0, 3),
            "t1": round(time.time(), 3),
            "samples": n,
            "threads": {
                name: [[stack, round(k / n, 3)] for stack, k in c.most_common(4)]
                for name, c in counts.items()
            },
        }
        with open(self.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
