"""Workers: threads that claim due jobs and run their handlers (see :mod:`archive.jobs`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from archive import metrics
from archive.clock import Clock
from archive.jobs.queue import Job, JobQueue
from archive.jobs.registry import HANDLERS, PermanentJobError, _current, load_handlers

if TYPE_CHECKING:
    from archive.runtime import Archive

log = logging.getLogger("archive.jobs")

# -- running jobs ----------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


_HEARTBEAT = "heartbeat"  # the heartbeat thread's key among a worker's wake events


class Worker:
    """Threads that claim due jobs and run their handlers until :meth:`stop`.

    ``concurrency`` threads each claim one job at a time (as ``name/1``,
    ``name/2``, ...); a heartbeat thread extends the leases of running jobs, so
    a handler may run longer than ``lease_seconds`` while its process lives,
    and a job of a dead process is reclaimed ``lease_seconds`` after its last
    heartbeat.  ``kinds`` limits the kinds claimed (default: every kind with a
    registered handler, looked up at each claim).

    Time is the queue's clock (``clock`` when given): idle threads wait on it
    between polls and the heartbeat renews leases on it, so with a
    :class:`~archive.clock.FakeClock` a test advances time and then calls
    :meth:`wait_idle` or :meth:`wait_renewed` to know the threads have acted.
    """

    def __init__(
        self,
        archive: Archive,
        name: str,
        *,
        kinds: Sequence[str] | None = None,
        poll_interval: float = 0.5,
        lease_seconds: float = 60,
        concurrency: int = 1,
        queue: JobQueue | None = None,
        clock: Clock | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.archive = archive
        self.name = name
        self.kinds = list(kinds) if kinds is not None else None
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.concurrency = concurrency
        self.queue = queue or JobQueue(archive.db, clock=clock)
        self.clock: Clock = clock or self.queue.clock
        self._stop = threading.Event()
        self._hb_stop = threading.Event()
        self._hb: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._running: dict[int, Job] = {}
        # guards _running, _checked and _renewed; notified when they change
        self._lock = threading.Condition()
        #: per thread (claimants and the heartbeat): set to cut its wait short
        self._wake: dict[str, threading.Event] = {}
        #: per claimant: the clock time as of which its last claim found
        #: nothing due (None while it has work)
        self._checked: dict[str, datetime | None] = {}
        #: the clock time as of which the heartbeat last renewed the leases
        self._renewed: datetime | None = None

    def start(self) -> Worker:
        if self._threads:
            raise RuntimeError("worker already started")
        load_handlers()  # the plugins' job kinds, whoever built this worker
        self._stop.clear()
        self._wake = {_HEARTBEAT: threading.Event()}
        self._checked = {}
        self._renewed = None
        for i in range(1, self.concurrency + 1):
            claimant = self.name if self.concurrency == 1 else f"{self.name}/{i}"
            self._wake[claimant] = threading.Event()
            self._checked[claimant] = None
            t = threading.Thread(
                target=self._loop, args=(claimant,), name=f"imag-job-{claimant}", daemon=True
            )
            t.start()
            self._threads.append(t)
        self._hb_stop.clear()
        self._hb = threading.Thread(
            target=self._heartbeat, name=f"imag-job-lease-{self.name}", daemon=True
        )
        self._hb.start()
        return self

    def stop(self, timeout: float | None = 30) -> None:
        """Stop claiming; wait up to ``timeout`` for running handlers to finish
        (a job still running after that is reclaimed once its lease expires)."""
        self._stop.set()
        self._poke(*self._checked)
        # joining threads is a real wait, whatever the clock
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._hb_stop.set()
        self._poke(_HEARTBEAT)
        if self._hb is not None:
            self._hb.join()
            self._hb = None
        self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 10) -> bool:
        """Wait until every thread of this started worker has looked for due
        jobs since this call and found none, with no job running; False after
        ``timeout`` real seconds.  Idle threads are woken to look at once."""
        if not self._checked:
            raise RuntimeError("worker not started")
        since = self.clock.now()
        self._poke(*self._checked)

        def idle() -> bool:
            return not self._running and all(
                checked is not None and checked >= since for checked in self._checked.values()
            )

        with self._lock:
            return self._lock.wait_for(idle, timeout)

    def wait_renewed(self, timeout: float = 10) -> bool:
        """Wait until the heartbeat has renewed the leases of the running jobs
        since this call (it is woken to do so at once); False after ``timeout``
        real seconds."""
        if self._hb is None:
            raise RuntimeError("worker not started")
        since = self.clock.now()
        self._poke(_HEARTBEAT)
        with self._lock:
            return self._lock.wait_for(
                lambda: self._renewed is not None and self._renewed >= since, timeout
            )

    def _poke(self, *threads: str) -> None:
        for name in threads:
            self._wake[name].set()

    def _loop(self, claimant: str) -> None:
        wake = self._wake[claimant]
        while True:
            # cleared before the stop check: a stop() after it still cuts the wait short
            wake.clear()
            if self._stop.is_set():
                return
            kinds = self.kinds if self.kinds is not None else sorted(HANDLERS)
            checked = self.clock.now()
            try:
                jobs = self.queue.claim(
                    claimant, kinds=kinds, limit=1, lease_seconds=self.lease_seconds
                )
            except Exception as exc:  # noqa: BLE001 - the index may be down for a while
                log.warning("job claim failed", extra={"worker": claimant, "error": _describe(exc)})
                with self._lock:
                    self._checked[claimant] = None
                self.clock.wait(wake, max(self.poll_interval, 1.0))
                continue
            with self._lock:
                self._checked[claimant] = None if jobs else checked
                self._lock.notify_all()
            if not jobs:
                self.clock.wait(wake, self.poll_interval)
                continue
            for job in jobs:
                self.run(job)

    def run(self, job: Job) -> str:
        """Run one claimed job's handler and record the outcome: 'done',
        'retry', 'dead' or 'lost' (the lease was lost meanwhile)."""
        fn = HANDLERS.get(job.kind)
        with self._lock:
            self._running[job.id] = job
        started = self.clock.monotonic()
        error: str | None = None
        permanent = False
        _current.job = job
        try:
            if fn is None:
                raise LookupError(
                    f"no handler for job kind {job.kind!r} in this process (known: "
                    f"{', '.join(sorted(HANDLERS)) or 'none'}); register one with "
                    "a plugin's imag_job_kinds, or @archive.jobs.handler in a module named "
                    "by IMAG_WORKER_IMPORT"
                )
            fn(self.archive, job.payload)
        except Exception as exc:  # noqa: BLE001 - a handler's failure is the job's failure
            error = _describe(exc)
            permanent = isinstance(exc, PermanentJobError)
        finally:
            _current.job = None
            with self._lock:
                self._running.pop(job.id, None)
        seconds = self.clock.monotonic() - started
        metrics.JOB_SECONDS.labels(job.kind).observe(seconds)
        info = {
            "job_id": job.id,
            "kind": job.kind,
            "attempt": job.attempts,
            "worker": job.worker,
            "seconds": round(seconds, 4),
        }
        try:
            if error is None:
                outcome = "done" if self.queue.complete(job) else "lost"
            else:
                state = self.queue.fail(job, error, permanent=permanent)
                outcome = {"pending": "retry", "dead": "dead", None: "lost"}[state]
        except Exception as exc:  # noqa: BLE001 - the lease expires; the job is re-run
            log.error("job outcome not recorded", extra=info | {"error": _describe(exc)})
            return "lost"
        metrics.JOB_RUNS.labels(job.kind, outcome).inc()
        if outcome == "done":
            log.info("job done", extra=info)
        elif outcome == "lost":
            log.warning("job lease lost before the outcome was recorded", extra=info)
        else:
            level = logging.ERROR if outcome == "dead" else logging.WARNING
            log.log(level, f"job failed ({outcome})", extra=info | {"error": error})
        return outcome

    def _heartbeat(self) -> None:
        interval = max(0.05, self.lease_seconds / 3)
        wake = self._wake[_HEARTBEAT]
        while True:
            self.clock.wait(wake, interval)
            wake.clear()
            if self._hb_stop.is_set():
                return
            self._renew_leases()

    def _renew_leases(self) -> None:
        renewed = self.clock.now()
        with self._lock:
            running = list(self._running.values())
        for job in running:
            try:
                if not self.queue.extend_lease(job, self.lease_seconds):
                    log.warning(
                        "job lease lost while running",
                        extra={"job_id": job.id, "kind": job.kind, "worker": job.worker},
                    )
            except Exception as exc:  # noqa: BLE001
                log.warning(
                    "job lease not extended", extra={"job_id": job.id, "error": _describe(exc)}
                )
        with self._lock:
            self._renewed = renewed
            self._lock.notify_all()
