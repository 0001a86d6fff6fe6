"""The queue: job rows, enqueue, atomic claim, leases, retries (see :mod:`archive.jobs`)."""

from __future__ import annotations

import json
import logging
import random
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from archive import metrics
from archive.clock import Clock, SystemClock
from archive.index.db import Database
from archive.jobs.registry import JobError

log = logging.getLogger("archive.jobs")

STATES = ("pending", "running", "done", "dead", "cancelled")
LIVE = ("pending", "running")

# -- rows ------------------------------------------------------------------------------------


def _dt(value: Any) -> datetime | None:
    """A timestamp column as an aware datetime (SQLite stores ISO text)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("job times must be timezone-aware (use JobQueue.clock.now())")
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
        self,
        db: Database,
        *,
        backoff_base: float = 2.0,
        backoff_max: float = 3600.0,
        clock: Clock | None = None,
    ) -> None:
        self.db = db
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        #: the "now" of due times and leases, passed to SQL as a parameter
        #: (never CURRENT_TIMESTAMP): by default the index's own clock, so jobs
        #: compare with the times the catalog and the change feed write
        self.clock: Clock = clock or getattr(db, "clock", None) or SystemClock()

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
        sql, params = self._insert(kind, payload, due_at, delay, dedupe_key, max_attempts)
        row = self.db.query_one(sql + " RETURNING id", params)
        assert row is not None
        return int(row[0])

    def push(
        self,
        kind: str,
        payload: dict,
        *,
        due_at: datetime,
        dedupe_key: str,
        max_attempts: int = 10,
    ) -> None:
        """:meth:`enqueue` a job that replaces its pending namesake, without
        reading back its id: in a pipelined transaction (the index writer's,
        rescheduling a study's stability job with every instance) it is sent
        without waiting for the server."""
        sql, params = self._insert(kind, payload, due_at, None, dedupe_key, max_attempts)
        self.db.execute(sql, params)

    def _insert(
        self,
        kind: str,
        payload: dict,
        due_at: datetime | None,
        delay: float | None,
        dedupe_key: str | None,
        max_attempts: int,
    ) -> tuple[str, tuple]:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        now = self.clock.now()
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
        return sql, (kind, json.dumps(payload), dedupe_key, _utc(due_at), max_attempts, now, now)

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
        now = self.clock.now()
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
            [self.clock.now(), *self._lease(job)],
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
        now = self.clock.now()
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
            [self.clock.now() + timedelta(seconds=seconds), *self._lease(job)],
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
        now = self.clock.now()
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
            (self.clock.now(), job_id),
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
        now = self.clock.now()
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
            [*states, self.clock.now() - older_than],
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
