"""Time as a dependency: the job queue, study stability and the failed-auth
limiter read it through a :class:`Clock` given to their constructors.

Production code uses :class:`SystemClock` (the default everywhere).  Tests --
the core's and plugins' -- give a :class:`FakeClock` instead and *advance* it,
so that "the lease has expired", "the study is stable" or "the window has
passed" happens at once and deterministically, without sleeping.

One clock per archive: :class:`archive.runtime.Archive` holds it and hands it
to what it builds (catalog, ingest pipeline, workers, HTTP security), so the
timestamps written to the index and the ``now`` they are compared with come
from the same source.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """What time-dependent code needs to know about time."""

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware, in UTC (stored in the index)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for durations and windows)."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait until ``event`` is set (True) or ``timeout`` seconds of this
        clock have passed (False): how a thread idles between polls."""
        ...

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of this clock pass."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(timeout)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock that moves only when told to (:meth:`advance`, :meth:`set`).

    It starts at ``start`` (default: the real current time, so rows stamped by
    code that was not given this clock are not far from it).  Threads waiting
    on it (:meth:`wait`, :meth:`sleep`) wake when an advance reaches their
    deadline; a waiter whose event is set wakes within a few milliseconds.
    """

    # How often a waiter looks at its event: threading has no wait for "this
    # event or that condition", so the condition wait is cut into slices.
    _SLICE = 0.005

    def __init__(self, start: datetime | None = None, *, monotonic: float = 1000.0) -> None:
        start = datetime.now(UTC) if start is None else start
        if start.tzinfo is None:
            raise ValueError("a FakeClock starts at a timezone-aware time")
        self._now = start.astimezone(UTC)
        self._monotonic = monotonic
        self._changed = threading.Condition()

    def now(self) -> datetime:
        with self._changed:
            return self._now

    def monotonic(self) -> float:
        with self._changed:
            return self._monotonic

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, at once: both clocks move, waiters wake."""
        if seconds < 0:
            raise ValueError("time does not go back (use set() for a wall-clock step)")
        with self._changed:
            self._now += timedelta(seconds=seconds)
            self._monotonic += seconds
            self._changed.notify_all()

    def set(self, when: datetime) -> None:
        """Step the wall clock to ``when`` (back or forth, as NTP may); the
        monotonic clock, and so every waiter, is not affected."""
        if when.tzinfo is None:
            raise ValueError("set() takes a timezone-aware time")
        with self._changed:
            self._now = when.astimezone(UTC)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        with self._changed:
            deadline = self._monotonic + timeout
            while not event.is_set():
                if self._monotonic >= deadline:
                    return False
                self._changed.wait(self._SLICE)
        return True

    def sleep(self, seconds: float) -> None:
        """Block until other threads have advanced the clock by ``seconds``."""
        self.wait(threading.Event(), seconds)

    def __repr__(self) -> str:
        return f"FakeClock({self._now.isoformat()}, monotonic={self._monotonic})"
