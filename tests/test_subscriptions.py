"""Durable subscriptions hold across processes and crashes: exactly once, none missed.

Two ``imag serve`` nodes and one ``imag worker`` share one PostgreSQL index and
one object store, with the example plugin (tests/plugins/imag_example)
installed: its ``study.stable`` subscriber counts its runs per event in its own
table.  200 studies arrive through both nodes and become stable while one node
is killed with SIGKILL and started again.  Every study.stable event must have
been delivered, each exactly once.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import requests
from pydicom.uid import generate_uid

from tests.dicomfiles import make_instance
from tests.httpserver import HttpImag
from tests.plugins import EXAMPLE, install
from tests.processes import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.serial]

STUDIES = 200
DICOM = "application/dicom"


@pytest.fixture
def cluster(
    tmp_path: Path, pg_admin_url: str
) -> Iterator[tuple[HttpImag, HttpImag, subprocess.Popen, str]]:
    from tests.pgserver import fresh_database

    site = install(EXAMPLE, tmp_path / "plugin")
    with fresh_database(pg_admin_url, "imag_subs") as url:
        shared = {
            "PYTHONPATH": str(site),
            "IMAG_STORAGE_URL": (tmp_path / "objects").as_uri(),
            "IMAG_STABLE_AFTER_SECONDS": "1",
            "IMAG_AUTH_MAX_FAILURES": "100000",
            # the killed node's jobs are taken by the others this long after it
            "IMAG_JOBS_LEASE_SECONDS": "6",
        }
        one = HttpImag(tmp_path / "one", index_url=url, settings=shared).start()
        two = HttpImag(tmp_path / "two", index_url=url, settings=shared)
        worker = None
        try:
            two.start()
            two.token = one.token
            two.http.headers["Authorization"] = f"Bearer {one.token}"
            worker = subprocess.Popen(
                [sys.executable, "-m", "archive.cli", "worker", "--concurrency", "2"],
                env=one.env,
                stdout=open(tmp_path / "worker.log", "ab"),  # noqa: SIM115 - closed with the process
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            yield one, two, worker, url
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=30)
            for node in (one, two):
                if node.proc is not None and node.proc.poll() is None:
                    node.stop()


def stow(node: HttpImag, study: str) -> int:
    boundary = "subs-b0undary"
    body = (
        f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode()
        + make_instance(study=study)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    try:
        answer = requests.post(
            node.dicomweb + "/studies",
            data=body,
            headers={
                "Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}',
                "Authorization": f"Bearer {node.token}",
            },
            timeout=60,
        )
    except requests.ConnectionError:
        return 0  # the node was killed under this request: not acknowledged
    return answer.status_code


def test_every_stable_study_reaches_the_subscriber_exactly_once_across_a_kill_9(
    cluster: tuple[HttpImag, HttpImag, subprocess.Popen, str],
) -> None:
    one, two, worker, url = cluster
    studies = [generate_uid() for _ in range(STUDIES)]
    acknowledged: list[str] = []
    with ThreadPoolExecutor(4) as pool:
        first = list(
            pool.map(lambda i: (studies[i], stow((one, two)[i % 2], studies[i])), range(100))
        )
        two.kill()  # SIGKILL while its job workers deliver the first events
        rest = list(pool.map(lambda s: (s, stow(one, s)), studies[100:150]))
        two.start()
        two.http.headers["Authorization"] = f"Bearer {one.token}"
        last = list(pool.map(lambda s: (s, stow(two, s)), studies[150:]))
    acknowledged = [s for s, status in first + rest + last if status == 200]
    assert len(acknowledged) >= STUDIES - 10, "most pushes must succeed"

    def settled() -> tuple[dict[str, int], set[str]] | None:
        # one snapshot: a delivery committed between two reads would look missed
        with psycopg.connect(url) as db:
            db.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            stable = {
                r[0]: r[1]
                for r in db.execute(
                    "SELECT seq, study_uid FROM changes WHERE type = 'study.stable'"
                ).fetchall()
            }
            runs = dict(db.execute("SELECT seq, runs FROM example_deliveries").fetchall())
            live = db.execute(
                "SELECT count(*) FROM jobs WHERE kind IN ('event:example-counter', "
                "'study.stability') AND state IN ('pending', 'running')"
            ).fetchone()[0]
        if live or not set(acknowledged) <= set(stable.values()):
            return None
        return runs, {str(k) for k in stable}

    def settled_while_the_worker_lives() -> tuple[dict[str, int], set[str]] | None:
        assert worker.poll() is None, "imag worker died"
        return settled()

    runs, stable_seqs = eventually(
        settled_while_the_worker_lives, timeout=240, what="every subscription job done"
    )
    assert {str(seq) for seq in runs} == stable_seqs  # none missed, none invented
    assert set(runs.values()) == {1}, {k: v for k, v in runs.items() if v != 1}
    with psycopg.connect(url) as db:
        dead = db.execute(
            "SELECT count(*) FROM jobs WHERE kind = 'event:example-counter' AND state <> 'done'"
        ).fetchone()[0]
        by_worker = db.execute(
            "SELECT count(DISTINCT split_part(worker, '/', 1)) FROM jobs "
            "WHERE kind = 'event:example-counter'"
        ).fetchone()[0]
    assert dead == 0
    print(
        f"\n{len(stable_seqs)} study.stable events, each delivered once; "
        f"delivery jobs ran in {by_worker} processes"
    )
