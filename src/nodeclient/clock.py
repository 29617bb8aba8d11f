"""Injected clocks. Logic never calls time.time() directly, so tests move time by
assignment and end-to-end tests cross the 7-day unstake cooldown without waiting.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Protocol


class Clock(Protocol):
    """Seconds since the Unix epoch, as a float; and a monotonic clock for intervals."""

    def now(self) -> float: ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (an NTP step, the test hook's offset):
        what liveness is measured by, so a wall clock set forward marks nobody silent."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that only moves when told to: the tests' clock."""

    def __init__(self, start: float = 1_765_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def monotonic(self) -> float:  # moved by the tests, with the wall clock
        return self.now()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def set(self, value: float) -> None:
        with self._lock:
            self._now = value


class PeerClock:
    """Another machine's wall clock as this one reads it: the offset between the two last
    seen (:meth:`saw`, with a time that machine just sent). A node reads the lease ends of
    a coordinator that sends no dispatch ``sent_at`` with it, from its heartbeat
    acknowledgements' ``server_time``, rather than with its own clock."""

    def __init__(self, local: Clock) -> None:
        self._local = local
        self.offset = 0.0  # the peer's clock minus ours (0 until the peer sent its time)

    def saw(self, peer_now: float) -> None:
        """The peer's clock read *peer_now* just now."""
        self.offset = peer_now - self._local.now()


class OffsetFileClock:
    """``time.time()`` plus a float offset read from a file: a test hook, not for production.

    The end-to-end tests write e.g. ``604900`` into the file to jump a running
    coordinator past the 7-day unstake cooldown. The file is re-read at most once a
    second; a missing or unparsable file counts as offset 0.
    """

    def __init__(self, path: Path, *, wall: Clock | None = None) -> None:
        self._path = path
        self._wall = wall or SystemClock()
        self._offset = 0.0
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def now(self) -> float:
        wall = self._wall.now()
        with self._lock:
            if wall - self._read_at >= 1.0:
                self._read_at = wall
                try:
                    self._offset = float(self._path.read_text(encoding="utf-8").strip() or 0)
                except (OSError, ValueError):
                    self._offset = 0.0
            return wall + self._offset

    def monotonic(self) -> float:  # the offset is a jump of the wall clock only
        return self._wall.monotonic()


def make_clock(clock_file: str | Path | None) -> Clock:
    """The system clock, or the --clock-file test hook when a file is named."""
    return OffsetFileClock(Path(clock_file)) if clock_file else SystemClock()


__all__ = ["Clock", "ManualClock", "OffsetFileClock", "SystemClock", "make_clock"]
