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

**Handlers** are functions ``(archive, payload) -> None`` (:func:`current_job`
gives the running :class:`Job`), registered by plugins through the
``imag_job_kinds`` hook, or with ``@handler("kind")`` in a module named by the
``IMAG_WORKER_IMPORT`` environment variable (comma-separated module names); a
worker process loads them before it starts -- see :func:`load_handlers`.  A
:class:`Worker` without an explicit ``kinds`` list claims only kinds that have
a handler in its process; a claimed job whose kind has none fails with an error
naming it.
"""

from archive.jobs.queue import LIVE, STATES, Job, JobQueue, JobRecord
from archive.jobs.registry import (
    HANDLERS,
    Handler,
    JobError,
    PermanentJobError,
    current_job,
    handler,
    load_handlers,
)
from archive.jobs.worker import Worker

__all__ = [
    "HANDLERS",
    "LIVE",
    "STATES",
    "Handler",
    "Job",
    "JobError",
    "JobQueue",
    "JobRecord",
    "PermanentJobError",
    "Worker",
    "current_job",
    "handler",
    "load_handlers",
]
