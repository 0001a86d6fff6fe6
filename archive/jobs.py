"""The durable job queue: everything deferred is a row of the ``jobs`` table.

Study stability, forwarding, message delivery and re-transcoding are jobs: a
``kind`` (which handler runs it), a JSON ``payload``, a due time, attempts and
a lease.  The queue lives in the index, so a job enqueued in the same
transaction as the rows that caused it exists exactly when they do.

**Enqueue in your own transaction.**  :meth:`Database.transaction` binds a
connection to the calling thread and every statement issued on that thread
inside it uses that connection, so ``JobQueue(db).enqueue(...)`` called inside
``with db.transaction():`` is part of that transaction (rolled back with it).
No separate variant is needed.

**Claiming** (:meth:`JobQueue.claim`) atomically takes due jobs -- pending with
``due_at <= now``, or running whose lease has expired (its worker died) -- and
leases them to one worker: PostgreSQL locks the chosen rows with
``FOR UPDATE SKIP LOCKED`` so concurrent workers take different jobs without
waiting on each other; SQLite serialises writers (``BEGIN IMMEDIATE``).

**A lease is (id, worker, attempt).**  :meth:`~JobQueue.complete`,
:meth:`~JobQueue.fail` and :meth:`~JobQueue.extend_lease` act only while the
job is still leased to that claim, so a worker that stalled past its lease and
lost the job to another cannot complete it a second time.  Jobs run *at least
once*: a worker killed after its handler's effects committed but before
``complete`` gets its job re-run; handlers must be idempotent.

**Dedupe keys** make "at most one *pending* job per key" a constraint (the
partial unique index ``jobs_pending_dedupe``): enqueueing with the key of a
pending job moves that job's due time and payload instead of adding one, which
is what study stability needs (each arrival pushes the check later).  Running
jobs are not covered: work that arrives while a job with the key runs gets a
pending job of its own rather than being merged into one about to finish.  So
a job with a key may run while its successor waits; if the running one then
fails, the successor already carries the newer request and the failed one is
``cancelled`` ("superseded") instead of being retried beside it.

**Failures** go back to pending with exponential back-off (2 s, 4 s, 8 s, ...
capped at 1 h, +0-20 % jitter) and keep ``last_error``; after ``max_attempts``
the job is ``dead`` until ``imag jobs retry``.  A handler raising
:class:`PermanentJobError` makes its job dead at once.

**Handlers** register with ``@handler("kind")`` (a function ``(archive,
payload) -> None``; :func:`current_job` gives the running :class:`Job`).  A
worker process finds them by importing, before it starts, every module named
by the ``imag.jobs`` entry point group and by the ``IMAG_WORKER_IMPORT``
environment variable (comma-separated module names) -- see
:func:`load_handlers`.  A :class:`Worker` without an explicit ``kinds`` list
claims only kinds that have a handler in its process; a claimed job whose kind
has none fails with an error naming it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import psycopg

from archive import metrics
from archive.index.db import Database, utcnow

if TYPE_CHECKING:
    from archive.config import Config
    from archive.runtime import Archive

log = logging.getLogger(__name__)

STATES = ("pending", "running", "done", "dead", "cancelled")
LIVE = ("pending", "running")

Handler = Callable[["Archive", dict], None]
HANDLERS: dict[str, Handler] = {}


class JobError(Exception):
    """A queue operation cannot be done (unknown job, wrong state, ...)."""


class PermanentJobError(Exception):
    """Raised by a handler when retrying cannot help: the job becomes dead at once."""


def handler(kind: str, *, replace: bool = False) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of jobs of ``kind``."""

    def register(fn: Handler) -> Handler:
        current = HANDLERS.get(kind)
        if current is not None and current is not fn and not replace:
            raise ValueError(f"job kind {kind!r} already has a handler ({current.__qualname__})")
        HANDLERS[kind] = fn
        return fn

    return register


def load_handlers() -> list[str]:
    """Import the modules that register handlers: the ``imag.jobs`` entry points
    and the comma-separated module names in ``IMAG_WORKER_IMPORT``.  Returns
    what was imported."""
    loaded = []
    for ep in entry_points(group="imag.jobs"):
        ep.load()
        loaded.append(ep.value)
    for name in os.environ.get("IMAG_WORKER_IMPORT", "").split(","):
        if name.strip():
            importlib.import_module(name.strip())
            loaded.append(name.strip())
    return loaded


_current = threading.local()


def current_job() -> Job | None:
    """The job the calling handler is running (None outside a handler)."""
    return getattr(_current, "job", None)


# -- rows ------------------------------------------------------------------------------------


def _dt(value: Any) -> datetime | None:
    """A timestamp column as an aware datetime (SQLite stores ISO text)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("job times must be timezone-aware (use archive.index.db.utcnow())")
    # One offset for every stored value: SQLite compares them as text.
    return value.astimezone(UTC)


@dataclass
class Job:
    """A job leased to a worker by :meth:`JobQueue.claim`."""

    id: int
    kind: str
    payload: dict
    attempts: int  # this run is attempt number ``attempts`` (1 for the first)
    max_attempts: int
    dedupe_key: str | None
    due_at: datetime
    worker: str


@dataclass
class JobRecord:
    """One row of the queue, for listing."""

    id: int
    kind: str
    state: str
    payload: dict
    dedupe_key: str | None
    due_at: datetime
    attempts: int
    max_attempts: int
    lease_until: datetime | None
    worker: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict:
        out = dict(vars(self))
        for k, v in out.items():
            if isinstance(v, datetime):
                out[k] = v.isoformat()
        return out


_RECORD_COLUMNS = (
    "id, kind, state, payload, dedupe_key, due_at, attempts, max_attempts, lease_until, "
    "worker, last_error, created_at, updated_at"
)


def _record(row: tuple) -> JobRecord:
    r = list(row)
    r[3] = json.loads(r[3])
    for i in (5, 8, 11, 12):
        r[i] = _dt(r[i])
    return JobRecord(*r)


# -- the queue -------------------------------------------------------------------------------


class JobQueue:
    """The ``jobs`` table of one index."""

    def __init__(
        self, db: Database, *, backoff_base: float = 2.0, backoff_max: float = 3600.0
    ) -> None:
        self.db = db
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    # -- producing -------------------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        payload: dict,
        *,
        due_at: datetime | None = None,
        delay: float | None = None,
        dedupe_key: str | None = None,
        max_attempts: int = 10,
    ) -> int:
        """Add a job due at ``due_at`` (or ``delay`` seconds from now, or now);
        return its id.

        With ``dedupe_key``, a pending job with that key is updated instead --
        its due time and payload replaced -- and its id returned.  Inside
        ``db.transaction()`` this is part of that transaction.
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        now = utcnow()
        if due_at is None:
            due_at = now + timedelta(seconds=delay or 0)
        elif delay is not None:
            raise ValueError("give due_at or delay, not both")
        sql = (
            "INSERT INTO jobs (kind, payload, dedupe_key, state, due_at, attempts, max_attempts, "
            "created_at, updated_at) VALUES (?, ?, ?, 'pending', ?, 0, ?, ?, ?)"
        )
        if dedupe_key is not None:
            # The conflict target repeats the partial index's predicate exactly:
            # SQLite accepts no other form (PostgreSQL would accept an implying one).
            sql += (
                " ON CONFLICT (dedupe_key) WHERE state = 'pending' DO UPDATE SET "
                "due_at = excluded.due_at, payload = excluded.payload, "
                "updated_at = excluded.updated_at"
            )
        row = self.db.query_one(
            sql + " RETURNING id",
            (kind, json.dumps(payload), dedupe_key, _utc(due_at), max_attempts, now, now),
        )
        assert row is not None
        return int(row[0])

    # -- consuming -------------------------------------------------------------------------

    def claim(
        self,
        worker: str,
        *,
        kinds: Sequence[str] | None = None,
        limit: int = 1,
        lease_seconds: float = 60,
    ) -> list[Job]:
        """Lease up to ``limit`` due jobs (oldest due first) to ``worker``.

        Due: pending with ``due_at <= now``, or running with an expired lease
        (the worker holding it died; ``last_error`` says so).  A job whose lease
        expired on its last allowed attempt becomes dead instead.
        """
        if kinds is not None and not kinds:
            return []
        now = utcnow()
        kind_sql, kind_params = "", []
        if kinds is not None:
            kind_sql = f" AND kind IN ({', '.join('?' * len(kinds))})"
            kind_params = list(kinds)
        due = (
            "((state = 'pending' AND due_at <= ?) OR "
            "(state = 'running' AND lease_until < ? AND attempts < max_attempts))" + kind_sql
        )
        due_params = [now, now, *kind_params]
        # Cheap read first: idle workers poll without taking SQLite's write lock.
        if not self.db.query_one(f"SELECT 1 FROM jobs WHERE {due} LIMIT 1", due_params):
            self._bury_expired(now, kind_sql, kind_params)
            return []
        lease_until = now + timedelta(seconds=lease_seconds)
        set_sql = (
            "state = 'running', worker = ?, lease_until = ?, attempts = attempts + 1, "
            "updated_at = ?, last_error = CASE WHEN state = 'running' THEN "
            "'lease expired (worker ' || COALESCE(worker, 'unknown') || ')' ELSE last_error END"
        )
        returning = "id, kind, payload, attempts, max_attempts, dedupe_key, due_at"
        set_params = [worker, lease_until, now]
        with self.db.transaction():
            if self.db.dialect == "postgresql":
                rows = self.db.query(
                    f"WITH picked AS MATERIALIZED (SELECT id FROM jobs WHERE {due} "
                    "ORDER BY due_at LIMIT ? FOR UPDATE SKIP LOCKED) "
                    f"UPDATE jobs SET {set_sql} FROM picked WHERE jobs.id = picked.id "
                    f"RETURNING {', '.join('jobs.' + c for c in returning.split(', '))}",
                    [*due_params, limit, *set_params],
                )
            else:
                rows = self.db.query(
                    f"UPDATE jobs SET {set_sql} WHERE id IN "
                    f"(SELECT id FROM jobs WHERE {due} ORDER BY due_at LIMIT ?) "
                    f"RETURNING {returning}",
                    [*set_params, *due_params, limit],
                )
        self._bury_expired(now, kind_sql, kind_params)
        jobs = []
        for id_, kind, payload, attempts, max_attempts, dedupe_key, due_raw in rows:
            due_at = _dt(due_raw)
            assert due_at is not None
            metrics.JOB_LATENCY.labels(kind).observe(max(0.0, (now - due_at).total_seconds()))
            jobs.append(
                Job(
                    id_,
                    kind,
                    json.loads(payload),
                    attempts,
                    max_attempts,
                    dedupe_key,
                    due_at,
                    worker,
                )
            )
        jobs.sort(key=lambda j: (j.due_at, j.id))
        return jobs

    def _bury_expired(self, now: datetime, kind_sql: str, kind_params: list) -> None:
        """Jobs whose lease expired on their last attempt: dead, not retried
        forever (a job that kills its worker every time must stop somewhere)."""
        where = "state = 'running' AND lease_until < ? AND attempts >= max_attempts" + kind_sql
        if self.db.query_one(f"SELECT 1 FROM jobs WHERE {where} LIMIT 1", [now, *kind_params]):
            self.db.execute(
                "UPDATE jobs SET state = 'dead', lease_until = NULL, updated_at = ?, "
                "last_error = 'lease expired on the last attempt (worker ' || "
                f"COALESCE(worker, 'unknown') || ')' WHERE {where}",
                [now, now, *kind_params],
            )

    # The lease of a claim: the job is still running under this worker and attempt.
    _LEASED = "id = ? AND worker = ? AND state = 'running' AND attempts = ?"

    def _lease(self, job: Job) -> list:
        return [job.id, job.worker, job.attempts]

    def complete(self, job: Job) -> bool:
        """Mark a leased job done.  False when the lease was lost: nothing changes."""
        row = self.db.query_one(
            f"UPDATE jobs SET state = 'done', lease_until = NULL, updated_at = ? "
            f"WHERE {self._LEASED} RETURNING id",
            [utcnow(), *self._lease(job)],
        )
        return row is not None

    def backoff(self, attempts: int) -> float:
        """Seconds before retrying after failed attempt number ``attempts``."""
        base = self.backoff_base * 2 ** min(max(attempts - 1, 0), 40)
        return min(self.backoff_max, base * random.uniform(1.0, 1.2))

    def fail(self, job: Job, error: str, *, permanent: bool = False) -> str | None:
        """Record a failed run: back to pending after a back-off, or dead once
        ``max_attempts`` runs failed (or at once if ``permanent``); cancelled if
        a pending job with its dedupe key was enqueued meanwhile (that one
        carries the newer request).  Returns the new state, None when the lease
        was lost (nothing changes)."""
        now = utcnow()
        retry_at = now + timedelta(seconds=self.backoff(job.attempts))
        error = error[:4000]
        try:
            row = self.db.query_one(
                "UPDATE jobs SET state = CASE WHEN attempts >= max_attempts OR ? THEN 'dead' "
                "ELSE 'pending' END, due_at = ?, last_error = ?, lease_until = NULL, "
                f"updated_at = ? WHERE {self._LEASED} RETURNING state",
                [permanent, retry_at, error, now, *self._lease(job)],
            )
        except (sqlite3.IntegrityError, psycopg.errors.UniqueViolation):
            # back to pending would make two pending jobs with one dedupe key
            row = self.db.query_one(
                "UPDATE jobs SET state = 'cancelled', last_error = ?, lease_until = NULL, "
                f"updated_at = ? WHERE {self._LEASED} RETURNING state",
                [f"{error} (superseded by a pending job with the same dedupe key)", now]
                + self._lease(job),
            )
        return None if row is None else row[0]

    def extend_lease(self, job: Job, seconds: float) -> bool:
        """Keep a long job leased for ``seconds`` more; False if it was lost."""
        row = self.db.query_one(
            f"UPDATE jobs SET lease_until = ? WHERE {self._LEASED} RETURNING id",
            [utcnow() + timedelta(seconds=seconds), *self._lease(job)],
        )
        return row is not None

    # -- administration --------------------------------------------------------------------

    def get(self, job_id: int) -> JobRecord | None:
        row = self.db.query_one(f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else _record(row)

    def retry(self, job_id: int) -> None:
        """A dead or cancelled job: pending again, due now, attempts reset."""
        job = self.get(job_id)
        if job is None:
            raise JobError(f"no job {job_id}")
        if job.state not in ("dead", "cancelled"):
            raise JobError(f"job {job_id} is {job.state}: only dead or cancelled jobs are retried")
        now = utcnow()
        row = self.db.query_one(
            "UPDATE jobs SET state = 'pending', due_at = ?, attempts = 0, lease_until = NULL, "
            "updated_at = ? WHERE id = ? AND state IN ('dead', 'cancelled') AND NOT EXISTS "
            "(SELECT 1 FROM jobs AS live WHERE live.dedupe_key = jobs.dedupe_key "
            "AND live.state = 'pending') RETURNING id",
            (now, now, job_id),
        )
        if row is None:
            raise JobError(
                f"job {job_id} was not retried: a pending job with its dedupe key "
                f"{job.dedupe_key!r} exists (or its state just changed)"
            )

    def cancel(self, job_id: int) -> None:
        """A pending job: cancelled (a running one finishes its run)."""
        row = self.db.query_one(
            "UPDATE jobs SET state = 'cancelled', updated_at = ? "
            "WHERE id = ? AND state = 'pending' RETURNING id",
            (utcnow(), job_id),
        )
        if row is None:
            job = self.get(job_id)
            if job is None:
                raise JobError(f"no job {job_id}")
            raise JobError(f"job {job_id} is {job.state}: only pending jobs can be cancelled")

    def depth(self, *, include_done: bool = False) -> dict[str, int]:
        """Jobs by state (every state present, 0 when none).  'done' jobs pile
        up; they are counted only on request (see :meth:`purge`)."""
        states = STATES if include_done else tuple(s for s in STATES if s != "done")
        rows = self.db.query(
            "SELECT state, COUNT(*) FROM jobs WHERE state IN "
            f"({', '.join('?' * len(states))}) GROUP BY state",
            states,
        )
        counts = dict.fromkeys(states, 0)
        counts.update({state: int(n) for state, n in rows})
        return counts

    def oldest_due_seconds(self) -> float:
        """How long the longest-waiting due pending job has waited (0 if none)."""
        now = utcnow()
        oldest = _dt(
            self.db.scalar(
                "SELECT MIN(due_at) FROM jobs WHERE state = 'pending' AND due_at <= ?", (now,)
            )
        )
        return 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())

    def purge(self, older_than: timedelta, states: Sequence[str] = ("done",)) -> int:
        """Delete jobs in ``states`` (finished ones) last updated before now -
        ``older_than``; return how many."""
        if set(states) & set(LIVE):
            raise ValueError("live jobs are never purged")
        rows = self.db.query(
            f"DELETE FROM jobs WHERE state IN ({', '.join('?' * len(states))}) "
            "AND updated_at < ? RETURNING id",
            [*states, utcnow() - older_than],
        )
        return len(rows)

    def list(
        self, state: str | None = None, kind: str | None = None, limit: int = 100
    ) -> list[JobRecord]:
        """Jobs, newest first, optionally of one state and kind."""
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        sql = f"SELECT {_RECORD_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.db.query(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])
        return [_record(r) for r in rows]


# -- running jobs ----------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Worker:
    """Threads that claim due jobs and run their handlers until :meth:`stop`.

    ``concurrency`` threads each claim one job at a time (as ``name/1``,
    ``name/2``, ...); a heartbeat thread extends the leases of running jobs, so
    a handler may run longer than ``lease_seconds`` while its process lives,
    and a job of a dead process is reclaimed ``lease_seconds`` after its last
    heartbeat.  ``kinds`` limits the kinds claimed (default: every kind with a
    registered handler, looked up at each claim).
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
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.archive = archive
        self.name = name
        self.kinds = list(kinds) if kinds is not None else None
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.concurrency = concurrency
        self.queue = queue or JobQueue(archive.db)
        self._stop = threading.Event()
        self._hb_stop = threading.Event()
        self._hb: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._running: dict[int, Job] = {}
        self._lock = threading.Lock()

    def start(self) -> Worker:
        if self._threads:
            raise RuntimeError("worker already started")
        self._stop.clear()
        for i in range(1, self.concurrency + 1):
            claimant = self.name if self.concurrency == 1 else f"{self.name}/{i}"
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
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._hb_stop.set()
        if self._hb is not None:
            self._hb.join()
            self._hb = None
        self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self, claimant: str) -> None:
        while not self._stop.is_set():
            kinds = self.kinds if self.kinds is not None else sorted(HANDLERS)
            try:
                jobs = self.queue.claim(
                    claimant, kinds=kinds, limit=1, lease_seconds=self.lease_seconds
                )
            except Exception as exc:  # noqa: BLE001 - the index may be down for a while
                log.warning("job claim failed", extra={"worker": claimant, "error": _describe(exc)})
                self._stop.wait(max(self.poll_interval, 1.0))
                continue
            if not jobs:
                self._stop.wait(self.poll_interval)
                continue
            for job in jobs:
                self.run(job)

    def run(self, job: Job) -> str:
        """Run one claimed job's handler and record the outcome: 'done',
        'retry', 'dead' or 'lost' (the lease was lost meanwhile)."""
        fn = HANDLERS.get(job.kind)
        with self._lock:
            self._running[job.id] = job
        started = time.monotonic()
        error: str | None = None
        permanent = False
        _current.job = job
        try:
            if fn is None:
                raise LookupError(
                    f"no handler for job kind {job.kind!r} in this process (known: "
                    f"{', '.join(sorted(HANDLERS)) or 'none'}); register one with "
                    "@archive.jobs.handler or load its module via IMAG_WORKER_IMPORT"
                )
            fn(self.archive, job.payload)
        except Exception as exc:  # noqa: BLE001 - a handler's failure is the job's failure
            error = _describe(exc)
            permanent = isinstance(exc, PermanentJobError)
        finally:
            _current.job = None
            with self._lock:
                self._running.pop(job.id, None)
        seconds = time.monotonic() - started
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
        while not self._hb_stop.wait(interval):
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


def run_worker_process(
    config: Config,
    *,
    kinds: Sequence[str] | None = None,
    concurrency: int = 1,
    poll_interval: float = 0.5,
    lease_seconds: float = 60,
    name: str | None = None,
    stop: threading.Event | None = None,
) -> int:
    """``imag worker``: run jobs until SIGTERM or SIGINT (or ``stop`` is set);
    return the exit status (0)."""
    from archive.runtime import Archive

    loaded = load_handlers()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    name = name or f"{socket.gethostname()}:{os.getpid()}"
    archive = Archive(config, writer=True)
    queue = JobQueue(archive.db)
    metrics.watch_job_queue(queue)
    worker = Worker(
        archive,
        name,
        kinds=kinds,
        poll_interval=poll_interval,
        lease_seconds=lease_seconds,
        concurrency=concurrency,
        queue=queue,
    )
    worker.start()
    log.info(
        "imag worker started",
        extra={
            "worker": name,
            "pid": os.getpid(),
            "kinds": ",".join(kinds) if kinds is not None else "*",
            "handlers": ",".join(sorted(HANDLERS)),
            "imported": ",".join(loaded),
            "concurrency": concurrency,
        },
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("imag worker stopping", extra={"worker": name})
        worker.stop(timeout=lease_seconds)
        archive.close()
    log.info("imag worker stopped", extra={"worker": name})
    return 0
