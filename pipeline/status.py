"""The periodic status line in the job log (`status_interval_s`, default 30 s), for runs watched
through `ray job logs`: rows done of this run's total, pages/s over the last 5 minutes, counts by
status and an ETA. One line, `key=value` fields, so log tools can parse it:

    pagemill status: done=120/584 pct=20.5 pages_per_s_5m=1.23 ok=100 truncated=20 eta=6m10s

A thread of the driver prints it, so a line appears on time even while no batch arrives (models
loading, a long document); the receipts loop only calls `update`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

log = logging.getLogger("pagemill")

WINDOW_S = 300.0  # the rate is measured over the last 5 minutes


def format_duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class StatusLine:
    def __init__(
        self,
        total: int,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.total, self.interval_s, self.clock = total, interval_s, clock
        self.emit = emit or (lambda line: log.info("%s", line))
        self.counts: Counter[str] = Counter()
        self.done = 0
        self._samples: deque[tuple[float, int]] = deque([(clock(), 0)])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, statuses: Iterable[str]) -> None:
        with self._lock:
            for s in statuses:
                self.counts[s] += 1
                self.done += 1
            self._samples.append((self.clock(), self.done))

    def rate(self) -> float:
        """Rows per second over the last WINDOW_S (since the start, if shorter)."""
        now = self.clock()
        with self._lock:
            while len(self._samples) > 1 and self._samples[1][0] <= now - WINDOW_S:
                self._samples.popleft()
            t0, d0 = self._samples[0]
            if t0 < now - WINDOW_S:  # the oldest sample is before the window: count from its edge
                t0 = now - WINDOW_S
            done = self.done
        return (done - d0) / (now - t0) if now > t0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        with self._lock:
            done, counts = self.done, dict(sorted(self.counts.items()))
        pct = 100.0 * done / self.total if self.total else 100.0
        left = max(0, self.total - done)
        eta = 0.0 if not left else (left / rate if rate > 0 else None)
        by_status = " ".join(f"{k}={v}" for k, v in counts.items())
        return (
            f"pagemill status: done={done}/{self.total} pct={pct:.1f} pages_per_s_5m={rate:.3f}"
            + (f" {by_status}" if by_status else "")
            + f" eta={format_duration(eta)}"
        )

    def start(self) -> StatusLine:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="pagemill-status", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.emit(self.line())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
