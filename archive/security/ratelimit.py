"""Failed-authentication limits: after too many failures from one address, or
with one token, further attempts get 429 with Retry-After until the window
has passed.  Counts are per process (each process behind a load balancer
limits on its own, so the effective limit is at most N times the setting).

Windows are measured on the limiter's clock (monotonic: a wall-clock step
neither lifts nor extends a block); tests give a FakeClock and advance it."""

from __future__ import annotations

import math
import threading
from collections import deque

from archive.clock import Clock, SystemClock


class FailureLimiter:
    """Sliding-window counts of failures per key (an address, a token digest)."""

    def __init__(
        self, max_failures: int, window_seconds: float, *, clock: Clock | None = None
    ) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self.clock: Clock = clock or SystemClock()
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, *keys: str) -> int:
        """Seconds until ``keys`` may try again; 0 when none is over the limit."""
        now = self.clock.monotonic()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._prune(key, now)
                if times is not None and len(times) >= self.max_failures:
                    wait = max(wait, times[0] + self.window - now)
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, *keys: str) -> None:
        now = self.clock.monotonic()
        with self._lock:
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)
            if len(self._failures) > 100_000:  # bound memory under a spray of keys
                for key in list(self._failures):
                    self._prune(key, now)

    def _prune(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times
