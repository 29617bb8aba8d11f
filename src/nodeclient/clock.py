"""Injected clocks. Logic never calls time.time() directly, so tests can cross the 7-day
unstake cooldown without waiting.

``OffsetFileClock`` is a testing aid for whole processes (``--clock-file``): the clock is
the system time plus a float offset read from a file, re-read at most once a second, so
an end-to-end test can move a running daemon and coordinator forward by days.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class OffsetFileClock:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0.0
        self._read_at = -1.0

    def now(self) -> float:
        mono = time.monotonic()
        if mono - self._read_at >= 1.0:
            self._read_at = mono
            try:
                self._offset = float(self._path.read_text().strip() or 0)
            except (OSError, ValueError):
                self._offset = 0.0
        return time.time() + self._offset


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, start: float = 1_765_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_clock(clock_file: str | None) -> Clock:
    return OffsetFileClock(Path(clock_file)) if clock_file else SystemClock()
