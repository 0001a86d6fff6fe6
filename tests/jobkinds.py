"""Job kinds for the tests that run real ``imag worker`` processes.

The processes import this module through ``IMAG_WORKER_IMPORT=tests.jobkinds``
(the documented way to load handlers into a worker without an entry point).
Every run leaves a row in ``test_runs``, committed in the handler's own
transaction, so a test can see which process ran which job, when, and how
often.
"""

from __future__ import annotations

import os
import time

from archive.index.db import Database
from archive.jobs import current_job, handler

TABLES = (
    "CREATE TABLE test_runs (job_id INTEGER NOT NULL, pid INTEGER NOT NULL, "
    "attempt INTEGER NOT NULL, started DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION)",
    "CREATE TABLE test_counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    "INSERT INTO test_counter (id, n) VALUES (1, 0)",
)


def create_tables(db: Database) -> None:
    with db.transaction():
        for statement in TABLES:
            db.execute(statement)


@handler("test.record")
def record(archive, payload: dict) -> None:  # noqa: ANN001 - Archive
    """Count one run and record its interval, in one transaction."""
    job = current_job()
    assert job is not None
    started = time.time()
    time.sleep(payload.get("sleep", 0))
    with archive.db.transaction():
        archive.db.execute("UPDATE test_counter SET n = n + 1 WHERE id = 1")
        archive.db.execute(
            "INSERT INTO test_runs (job_id, pid, attempt, started, ended) VALUES (?, ?, ?, ?, ?)",
            (job.id, os.getpid(), job.attempts, started, time.time()),
        )


@handler("test.sleepy")
def sleepy(archive, payload: dict) -> None:  # noqa: ANN001 - Archive
    """Record the start at once; on the first attempt sleep ``first_sleep``
    seconds (long enough to be killed in), then record the end."""
    job = current_job()
    assert job is not None
    started = time.time()
    archive.db.execute(
        "INSERT INTO test_runs (job_id, pid, attempt, started, ended) VALUES (?, ?, ?, ?, NULL)",
        (job.id, os.getpid(), job.attempts, started),
    )
    if job.attempts == 1:
        time.sleep(payload["first_sleep"])
    archive.db.execute(
        "UPDATE test_runs SET ended = ? WHERE job_id = ? AND pid = ? AND attempt = ?",
        (time.time(), job.id, os.getpid(), job.attempts),
    )
