"""The durable job queue: claiming, leases, retries, dedupe keys, workers
(threads and real ``imag worker`` processes), on SQLite and PostgreSQL.

Time is a FakeClock that the tests advance: nothing here sleeps for a due
time, a lease or a back-off to pass.  Worker threads are waited for with
:meth:`Worker.wait_idle` / :meth:`Worker.wait_renewed` (conditions, bounded);
only the tests of real ``imag worker`` processes poll the index for what
another process did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from archive import metrics
from archive.cli import main as imag_main
from archive.clock import Clock, FakeClock, SystemClock
from archive.index import open_database, upgrade
from archive.index.db import Database, utcnow
from archive.jobs import HANDLERS, JobError, JobQueue, PermanentJobError, Worker, current_job
from archive.runtime import Archive
from tests import jobkinds
from tests.processes import eventually

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(index_url: str, clock: FakeClock) -> Iterator[Database]:
    database = open_database(index_url, clock=clock)
    upgrade(database)
    yield database
    database.close()


@pytest.fixture
def queue(db: Database) -> JobQueue:
    return JobQueue(db, backoff_base=0.05)


# -- the queue --------------------------------------------------------------------------------


def test_enqueue_claim_complete(queue: JobQueue, clock: FakeClock) -> None:
    now_id = queue.enqueue("demo", {"n": 1})
    later_id = queue.enqueue("demo", {"n": 2}, delay=0.3)

    [job] = queue.claim("w1", limit=10)
    assert (job.id, job.kind, job.payload, job.attempts) == (now_id, "demo", {"n": 1}, 1)
    assert queue.claim("w1", limit=10) == []  # the other one is not due yet

    assert queue.complete(job)
    assert queue.get(now_id).state == "done"
    assert queue.get(now_id).worker == "w1"

    clock.advance(0.29)
    assert queue.claim("w1") == []  # still not due
    clock.advance(0.06)
    [later] = queue.claim("w1")
    assert later.id == later_id and later.payload == {"n": 2}


def test_claim_takes_only_the_given_kinds_oldest_due_first(
    queue: JobQueue, clock: FakeClock
) -> None:
    past = clock.now() - timedelta(seconds=10)
    a = queue.enqueue("a", {}, due_at=past + timedelta(seconds=2))
    b = queue.enqueue("b", {}, due_at=past)
    a2 = queue.enqueue("a", {}, due_at=past + timedelta(seconds=1))
    assert [j.id for j in queue.claim("w", kinds=["a"], limit=5)] == [a2, a]
    assert [j.id for j in queue.claim("w", kinds=["a", "b"], limit=5)] == [b]
    assert queue.claim("w", kinds=[]) == []


def test_a_leased_job_is_reclaimed_only_after_its_lease_and_the_stale_worker_cannot_finish_it(
    queue: JobQueue, clock: FakeClock
) -> None:
    job_id = queue.enqueue("demo", {})
    [first] = queue.claim("old", lease_seconds=0.3)
    assert queue.claim("new", lease_seconds=0.3) == []  # leased: nobody else gets it

    clock.advance(0.25)
    assert queue.claim("new", lease_seconds=0.3) == []  # still within the lease
    clock.advance(0.15)  # "old" stalled past its lease
    [second] = queue.claim("new", lease_seconds=30)
    assert second.id == job_id and second.attempts == 2
    assert "lease expired (worker old)" in queue.get(job_id).last_error

    # the stale worker wakes up: its outcome and lease renewals are ignored
    assert not queue.complete(first)
    assert queue.fail(first, "late") is None
    assert not queue.extend_lease(first, 60)
    assert queue.get(job_id).state == "running"

    assert queue.complete(second)
    record = queue.get(job_id)
    assert (record.state, record.worker, record.attempts) == ("done", "new", 2)


def test_extend_lease_keeps_a_long_job(queue: JobQueue, clock: FakeClock) -> None:
    queue.enqueue("demo", {})
    [job] = queue.claim("w", lease_seconds=0.3)
    for _ in range(3):
        clock.advance(0.15)
        assert queue.extend_lease(job, 0.3)
    assert queue.claim("other") == []
    assert queue.complete(job)


def test_failures_back_off_exponentially_then_the_job_is_dead_keeping_its_last_error(
    queue: JobQueue, clock: FakeClock
) -> None:
    job_id = queue.enqueue("demo", {}, max_attempts=3)
    delays = []
    for attempt in (1, 2, 3):
        clock.advance(max(0.0, (queue.get(job_id).due_at - clock.now()).total_seconds()))
        [job] = queue.claim("w")
        assert job.attempts == attempt
        failed_at = clock.now()
        state = queue.fail(job, f"RuntimeError: failure {attempt}")
        record = queue.get(job_id)
        assert record.last_error == f"RuntimeError: failure {attempt}"
        if attempt < 3:
            assert state == record.state == "pending"
            delays.append((record.due_at - failed_at).total_seconds())
        else:
            assert state == record.state == "dead"
    assert 0.04 <= delays[0] < delays[1] <= 0.13  # 0.05 s, then 0.1 s, +0-20 % jitter
    clock.advance(0.15)
    assert queue.claim("w") == []  # dead jobs are not run again
    assert queue.depth()["dead"] == 1


def test_backoff_grows_and_is_capped() -> None:
    q = JobQueue(None, backoff_base=2, backoff_max=3600)  # type: ignore[arg-type]
    assert 2 <= q.backoff(1) <= 2.4
    assert 4 <= q.backoff(2) <= 4.8
    assert 512 <= q.backoff(9) <= 615
    assert q.backoff(30) == q.backoff(1000) == 3600


def test_permanent_failure_is_dead_at_once(queue: JobQueue) -> None:
    job_id = queue.enqueue("demo", {}, max_attempts=10)
    [job] = queue.claim("w")
    assert queue.fail(job, "PermanentJobError: rejected", permanent=True) == "dead"
    assert queue.get(job_id).attempts == 1


def test_a_job_whose_lease_expires_on_its_last_attempt_is_dead_not_retried_forever(
    queue: JobQueue, clock: FakeClock
) -> None:
    job_id = queue.enqueue("demo", {}, max_attempts=1)
    queue.claim("crashes", lease_seconds=0.1)
    clock.advance(0.15)
    assert queue.claim("next") == []
    record = queue.get(job_id)
    assert record.state == "dead"
    assert "lease expired on the last attempt (worker crashes)" in record.last_error


def test_a_dedupe_key_keeps_one_live_job_and_pushes_its_due_time(
    queue: JobQueue, clock: FakeClock
) -> None:
    first = queue.enqueue("stable", {"n": 1}, delay=0.2, dedupe_key="study:1")
    due_first = queue.get(first).due_at
    again = queue.enqueue("stable", {"n": 2}, delay=0.5, dedupe_key="study:1")
    other = queue.enqueue("stable", {"n": 3}, delay=0.2, dedupe_key="study:2")
    assert again == first and other != first
    record = queue.get(first)
    assert record.payload == {"n": 2} and record.due_at > due_first
    assert len(queue.list(kind="stable")) == 2

    clock.advance(0.3)
    assert [j.id for j in queue.claim("w", limit=5)] == [other]  # study:1 was pushed
    clock.advance(0.25)
    [job] = queue.claim("w")
    assert job.id == first and job.payload == {"n": 2}
    assert queue.complete(job)

    # once the job is finished the key is free again: a new burst, a new job
    assert queue.enqueue("stable", {"n": 4}, dedupe_key="study:1") not in (first, other)


def test_a_push_inside_a_pipelined_transaction_adds_or_pushes_the_one_pending_job(
    queue: JobQueue, clock: FakeClock
) -> None:
    """What the index writer does with every instance: push the study's
    stability job without reading back its id, inside its transaction."""
    db = queue.db
    with db.transaction(pipeline=True):
        queue.push("stable", {"n": 1}, due_at=clock.now() + timedelta(seconds=0.2), dedupe_key="s")
    [first] = queue.list(kind="stable")
    with db.transaction(pipeline=True):
        queue.push("stable", {"n": 2}, due_at=clock.now() + timedelta(seconds=0.5), dedupe_key="s")
        queue.push("stable", {"n": 3}, due_at=clock.now() + timedelta(seconds=0.2), dedupe_key="t")
    assert len(queue.list(kind="stable")) == 2
    pushed = queue.get(first.id)
    assert pushed.payload == {"n": 2} and pushed.due_at > first.due_at
    clock.advance(0.3)
    assert [j.payload for j in queue.claim("w", limit=5)] == [{"n": 3}]


def test_a_dedupe_enqueue_while_the_job_runs_makes_a_new_pending_job(
    queue: JobQueue, clock: FakeClock
) -> None:
    running_id = queue.enqueue("stable", {"n": 1}, dedupe_key="study:1")
    [job] = queue.claim("w")
    # an arrival during the run (or the handler rescheduling itself) is not
    # merged into the job about to finish
    successor = queue.enqueue("stable", {"n": 2}, delay=0.2, dedupe_key="study:1")
    assert successor != running_id
    assert queue.enqueue("stable", {"n": 3}, delay=0.2, dedupe_key="study:1") == successor
    assert queue.complete(job)
    assert queue.get(running_id).state == "done"
    clock.advance(0.25)
    [rerun] = queue.claim("w")
    assert rerun.id == successor and rerun.payload == {"n": 3}

    # the running one fails: its successor carries the newer request, so the
    # failed run is superseded, not retried beside it
    assert queue.enqueue("stable", {"n": 4}, dedupe_key="study:1") != successor
    assert queue.fail(rerun, "OSError: disk full") == "cancelled"
    record = queue.get(successor)
    assert record.state == "cancelled"
    assert record.last_error.startswith("OSError: disk full (superseded")
    assert queue.depth()["pending"] == 1


def test_enqueue_inside_a_transaction_belongs_to_it(db: Database, queue: JobQueue) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        queue.enqueue("demo", {"rolled": "back"})
        raise RuntimeError("abort")
    assert queue.list() == []
    with db.transaction():
        job_id = queue.enqueue("demo", {"kept": True})
        # visible inside the transaction that made it ...
        assert db.scalar("SELECT COUNT(*) FROM jobs") == 1
    assert queue.get(job_id).payload == {"kept": True}  # ... and committed with it


def test_retry_and_cancel(queue: JobQueue, clock: FakeClock) -> None:
    pending = queue.enqueue("demo", {}, delay=60)
    queue.cancel(pending)
    assert queue.get(pending).state == "cancelled"
    with pytest.raises(JobError, match="only pending jobs"):
        queue.cancel(pending)
    queue.retry(pending)
    record = queue.get(pending)
    assert record.state == "pending" and record.due_at <= clock.now()

    [job] = queue.claim("w")
    with pytest.raises(JobError, match="is running"):
        queue.cancel(job.id)
    with pytest.raises(JobError, match="only dead or cancelled"):
        queue.retry(job.id)
    queue.fail(job, "x", permanent=True)
    queue.retry(job.id)
    record = queue.get(job.id)
    assert (record.state, record.attempts, record.last_error) == ("pending", 0, "x")

    with pytest.raises(JobError, match="no job 999"):
        queue.retry(999)
    with pytest.raises(JobError, match="no job 999"):
        queue.cancel(999)

    # a dead job is not revived beside a live one with its dedupe key
    dead = queue.enqueue("k", {}, dedupe_key="same", max_attempts=1)
    [job] = queue.claim("w", kinds=["k"])
    queue.fail(job, "x")
    queue.enqueue("k", {}, dedupe_key="same", delay=60)
    with pytest.raises(JobError, match="pending job with its dedupe key"):
        queue.retry(dead)


def test_depth_and_list(queue: JobQueue, clock: FakeClock) -> None:
    for i in range(3):
        queue.enqueue("a", {"i": i})
    queue.enqueue("b", {}, delay=60)
    [job] = queue.claim("w", kinds=["a"])
    queue.complete(job)
    queue.claim("w", kinds=["a"])
    assert queue.depth() == {"pending": 2, "running": 1, "dead": 0, "cancelled": 0}
    assert queue.depth(include_done=True)["done"] == 1
    assert [j.payload for j in queue.list(kind="a")] == [{"i": 2}, {"i": 1}, {"i": 0}]
    assert [j.id for j in queue.list(state="done")] == [job.id]
    assert len(queue.list(limit=2)) == 2
    clock.advance(1)
    assert queue.oldest_due_seconds() > 0
    assert queue.purge(timedelta(0)) == 1
    assert queue.get(job.id) is None


# -- workers (threads) ------------------------------------------------------------------------


@pytest.fixture
def worker_archive(make_config: Callable, index_url: str, clock: FakeClock) -> Iterator[Archive]:
    with Archive(make_config(index_url=index_url), clock=clock) as arch:
        yield arch


def run_until(
    worker: Worker, clock: FakeClock, done: Callable[[], bool], step: float = 1.0, rounds: int = 10
) -> None:
    """Let ``worker`` run every due job, then ``step`` seconds pass, until ``done()``."""
    for _ in range(rounds):
        assert worker.wait_idle(), "the worker did not finish the due jobs"
        if done():
            return
        clock.advance(step)
    raise AssertionError(f"not done after {rounds} rounds of {step} s")


def test_worker_runs_handlers_retries_failures_and_records_dead_jobs(
    worker_archive: Archive, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[dict, int]] = []
    flaky_runs: list[int] = []

    def ok(archive: Archive, payload: dict) -> None:
        assert archive is worker_archive
        seen.append((payload, current_job().attempts))

    def flaky(archive: Archive, payload: dict) -> None:
        flaky_runs.append(1)
        if len(flaky_runs) < 3:
            raise ConnectionError("peer down")

    def broken(archive: Archive, payload: dict) -> None:
        raise ValueError("bad payload")

    def refused(archive: Archive, payload: dict) -> None:
        raise PermanentJobError("peer refuses this SOP class")

    for kind, fn in {
        "t.ok": ok,
        "t.flaky": flaky,
        "t.broken": broken,
        "t.refused": refused,
    }.items():
        monkeypatch.setitem(HANDLERS, kind, fn)
    queue = JobQueue(worker_archive.db, backoff_base=0.05)
    ids = {
        "ok": queue.enqueue("t.ok", {"x": 1}),
        "flaky": queue.enqueue("t.flaky", {}),
        "broken": queue.enqueue("t.broken", {}, max_attempts=2),
        "refused": queue.enqueue("t.refused", {}),
    }
    dead_runs = {"kind": "t.broken", "outcome": "dead"}
    runs_before = REGISTRY.get_sample_value("imag_job_runs_total", dead_runs) or 0

    with Worker(worker_archive, "tw", poll_interval=0.02, concurrency=2, queue=queue) as w:
        run_until(
            w, clock, lambda: all(queue.get(i).state in ("done", "dead") for i in ids.values())
        )
    assert seen == [({"x": 1}, 1)]
    flaky_job = queue.get(ids["flaky"])
    assert (flaky_job.state, flaky_job.attempts) == ("done", 3)
    assert flaky_job.last_error == "ConnectionError: peer down"
    broken_job = queue.get(ids["broken"])
    assert (broken_job.state, broken_job.attempts) == ("dead", 2)
    assert broken_job.last_error == "ValueError: bad payload"
    refused_job = queue.get(ids["refused"])
    assert (refused_job.state, refused_job.attempts) == ("dead", 1)
    assert REGISTRY.get_sample_value("imag_job_runs_total", dead_runs) == runs_before + 1
    assert queue.get(ids["ok"]).worker in ("tw/1", "tw/2")


def test_a_claimed_kind_without_handler_fails_with_a_clear_error(worker_archive: Archive) -> None:
    queue = JobQueue(worker_archive.db)
    job_id = queue.enqueue("nobody.handles", {}, max_attempts=1)
    # without kinds a worker claims only kinds it can run: the job stays pending
    with Worker(worker_archive, "w", poll_interval=0.02, queue=queue) as w:
        assert w.wait_idle()  # it looked, and left the job alone
        assert queue.get(job_id).state == "pending"
        w.stop()
    with Worker(
        worker_archive, "w", kinds=["nobody.handles"], poll_interval=0.02, queue=queue
    ) as w:
        assert w.wait_idle()
        assert queue.get(job_id).state == "dead"
    assert queue.get(job_id).last_error.startswith(
        "LookupError: no handler for job kind 'nobody.handles' in this process"
    )


def test_worker_keeps_the_lease_of_a_handler_longer_than_the_lease(
    worker_archive: Archive, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, finish = threading.Event(), threading.Event()

    def slow(archive: Archive, payload: dict) -> None:
        running.set()
        assert finish.wait(30), "the test never let the handler finish"

    monkeypatch.setitem(HANDLERS, "t.slow", slow)
    queue = JobQueue(worker_archive.db)
    job_id = queue.enqueue("t.slow", {})
    with Worker(worker_archive, "w", poll_interval=0.02, lease_seconds=0.3, queue=queue) as w:
        assert running.wait(10)
        for _ in range(3):  # 0.6 s in all, twice the lease: renewed, so nobody else may take it
            clock.advance(0.2)
            assert w.wait_renewed()
            assert queue.claim("thief", lease_seconds=5) == []
        finish.set()
        assert w.wait_idle()
        assert queue.get(job_id).state == "done"
    assert queue.get(job_id).attempts == 1


@pytest.mark.parametrize("idle_clock", [SystemClock(), FakeClock()], ids=["system", "fake"])
def test_worker_stops_promptly_when_idle(worker_archive: Archive, idle_clock: Clock) -> None:
    w = Worker(worker_archive, "w", poll_interval=5, lease_seconds=60, clock=idle_clock).start()
    assert w.wait_idle()  # between polls, in its 5 s wait
    started = time.monotonic()
    w.stop()
    assert time.monotonic() - started < 1


def test_queue_depth_is_in_metrics(worker_archive: Archive) -> None:
    queue = JobQueue(worker_archive.db)
    queue.enqueue("m", {}, delay=-5)
    queue.enqueue("m", {}, delay=60)
    metrics.watch_job_queue(queue)
    try:
        text = generate_latest().decode()
    finally:
        metrics.watch_job_queue(None)
    assert 'imag_jobs{state="pending"} 2.0' in text
    assert 'imag_jobs{state="dead"} 0.0' in text
    oldest = next(
        line for line in text.splitlines() if line.startswith("imag_jobs_oldest_due_seconds ")
    )
    assert float(oldest.split()[1]) >= 4.5


# -- the command line -------------------------------------------------------------------------


def test_imag_jobs_lists_retries_and_cancels(
    queue: JobQueue, index_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("IMAG_INDEX_URL", index_url)
    monkeypatch.setenv("IMAG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAG_LOG_LEVEL", "WARNING")
    dead = queue.enqueue("route.dicom", {"peer": "PACS"}, max_attempts=1)
    [job] = queue.claim("w")
    queue.fail(job, "ConnectionRefusedError: [Errno 111]")
    pending = queue.enqueue("study.stability", {"study_uid": "1.2.3"}, delay=60)

    assert imag_main(["jobs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [j["id"] for j in listed["jobs"]] == [pending, dead]
    assert listed["depth"]["dead"] == 1

    assert imag_main(["jobs", "list", "--state", "dead"]) == 0
    out = capsys.readouterr().out
    assert "route.dicom" in out and "ConnectionRefusedError" in out
    assert "study.stability" not in out

    assert imag_main(["jobs", "retry", str(dead)]) == 0
    assert queue.get(dead).state == "pending"
    assert imag_main(["jobs", "cancel", str(pending)]) == 0
    assert queue.get(pending).state == "cancelled"
    capsys.readouterr()
    assert imag_main(["jobs", "cancel", str(pending)]) == 1
    assert "only pending jobs can be cancelled" in capsys.readouterr().err


# -- worker processes -------------------------------------------------------------------------


def start_worker(
    index_url: str, tmp_path: Path, name: str, *args: str
) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "IMAG_DATA_DIR": str(tmp_path / "data"),
        "IMAG_INDEX_URL": index_url,
        "IMAG_LOG_FORMAT": "json",
        "IMAG_LOG_LEVEL": "INFO",
        "IMAG_WORKER_IMPORT": "tests.jobkinds",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "archive.cli", "worker", "--poll-interval", "0.05", *args],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def wait_started(proc: subprocess.Popen, log: Path) -> None:
    def started() -> bool:
        assert proc.poll() is None, f"worker exited {proc.returncode}:\n{log.read_text()}"
        return "imag worker started" in log.read_text()

    eventually(started, timeout=30, what=f"worker {proc.pid} to start")


def stop_worker(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, log.read_text()


@pytest.mark.postgres
def test_two_worker_processes_on_postgresql_never_run_the_same_job_twice(
    pg_url: str, tmp_path: Path
) -> None:
    db = open_database(pg_url)
    upgrade(db)
    jobkinds.create_tables(db)
    workers = [start_worker(pg_url, tmp_path, f"w{i}", "--concurrency", "2") for i in (1, 2)]
    try:
        for proc, log in workers:
            wait_started(proc, log)
        queue = JobQueue(db)
        ids = {queue.enqueue("test.record", {"sleep": 0.005}) for _ in range(300)}
        eventually(
            lambda: db.scalar("SELECT COUNT(*) FROM jobs WHERE state <> 'done'") == 0,
            timeout=60,
            what="all jobs done",
        )
    finally:
        for proc, log in workers:
            stop_worker(proc, log)
    assert db.scalar("SELECT n FROM test_counter WHERE id = 1") == 300
    runs = db.query("SELECT job_id, pid, started, ended FROM test_runs ORDER BY job_id, started")
    assert len(runs) == 300 and {r[0] for r in runs} == ids  # once each, none lost
    for a, b in zip(runs, runs[1:], strict=False):  # (vacuous with one run per job)
        assert a[0] != b[0] or a[3] <= b[2], f"job {a[0]} ran twice at the same time"
    by_pid = {pid: n for pid, n in db.query("SELECT pid, COUNT(*) FROM test_runs GROUP BY pid")}
    assert set(by_pid) == {proc.pid for proc, _ in workers}, by_pid  # both took some
    assert db.scalar("SELECT MAX(attempts) FROM jobs") == 1
    db.close()


def test_a_worker_killed_mid_job_loses_it_to_another_after_the_lease(
    index_url: str, tmp_path: Path
) -> None:
    db = open_database(index_url)
    upgrade(db)
    jobkinds.create_tables(db)
    first, first_log = start_worker(index_url, tmp_path, "first")
    second = None
    try:
        wait_started(first, first_log)
        job_id = JobQueue(db).enqueue("test.sleepy", {"first_sleep": 60})
        eventually(
            lambda: db.scalar("SELECT COUNT(*) FROM test_runs WHERE pid = ?", (first.pid,)),
            what="the first worker to start the job",
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = time.time()
        assert JobQueue(db).get(job_id).state == "running"  # leased to the dead worker
        # The lease runs out, as its 60 s without a heartbeat would (the
        # processes' clocks cannot be advanced from here).
        db.execute(
            "UPDATE jobs SET lease_until = ? WHERE id = ?",
            (utcnow() - timedelta(seconds=1), job_id),
        )
        second, second_log = start_worker(index_url, tmp_path, "second")
        wait_started(second, second_log)
        eventually(
            lambda: JobQueue(db).get(job_id).state == "done", timeout=20, what="job reclaimed"
        )
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        if second is not None:
            stop_worker(second, second_log)
    record = JobQueue(db).get(job_id)
    assert record.attempts == 2
    assert record.worker.endswith(f"/worker-{second.pid}")  # <node>/worker-<pid>
    assert "lease expired" in record.last_error
    runs = db.query("SELECT pid, attempt, started, ended FROM test_runs ORDER BY attempt")
    assert [(r[0], r[1], r[3] is not None) for r in runs] == [
        (first.pid, 1, False),
        (second.pid, 2, True),
    ]
    assert runs[1][2] >= killed_at
    db.close()
