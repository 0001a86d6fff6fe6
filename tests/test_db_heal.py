"""Index connections that heal: after PostgreSQL's backends are terminated
(pg_terminate_backend, as a fail-over or an administrator does), the next
requests succeed on fresh connections; a transaction whose connection dies
under it fails whole, and a COMMIT is never repeated.

Real PostgreSQL throughout (tests/pgserver.py); backends are terminated from
an admin connection, waiting until they are gone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from archive.index.db import Database
from tests.dicomfiles import make_instance
from tests.dicomnet import CLIENT_HANDLERS
from tests.httpserver import running_imag
from tests.processes import HOST
from tests.test_access import stow_body

pytestmark = pytest.mark.postgres


def terminate_all(admin_url: str, database_url: str, wait: bool = True) -> int:
    """Terminate every backend connected to the database of ``database_url``;
    with ``wait``, return once they are gone.  How many there were."""
    name = database_url.rsplit("/", 1)[1]
    timeout = ", 5000" if wait else ""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        rows = admin.execute(
            f"SELECT pg_terminate_backend(pid{timeout}) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return len(rows)


def replaced() -> float:
    return sum(
        REGISTRY.get_sample_value("imag_index_connections_replaced_total", {"when": when}) or 0
        for when in ("checkout", "in use")
    )


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    database.execute("CREATE TABLE heal_probe (x INTEGER NOT NULL)")
    yield database
    database.close()


def fill_pool(db: Database, n: int = 4) -> None:
    """Leave ``n`` idle connections in the pool, as a busy server does."""
    with ExitStack() as stack:
        for _ in range(n):
            stack.enter_context(db.connection()).execute("SELECT 1")


# -- the index layer ---------------------------------------------------------------------------


def test_every_pooled_connection_terminated_the_next_read_write_and_transaction_succeed(
    db: Database, pg_admin_url: str, pg_url: str
) -> None:
    fill_pool(db)
    before = replaced()
    assert terminate_all(pg_admin_url, pg_url) >= 4
    assert db.scalar("SELECT COUNT(*) FROM heal_probe") == 0
    # one dead connection found: the other idle ones are dropped with it, not
    # each found dead by a later request in turn
    assert replaced() == before + 1
    fill_pool(db)
    terminate_all(pg_admin_url, pg_url)
    db.execute("INSERT INTO heal_probe VALUES (1)")
    fill_pool(db)
    terminate_all(pg_admin_url, pg_url)
    with db.transaction():
        db.execute("INSERT INTO heal_probe VALUES (2)")
    assert db.query("SELECT x FROM heal_probe ORDER BY x") == [(1,), (2,)]


def test_a_read_racing_the_termination_of_its_connection_is_run_again(
    db: Database, pg_admin_url: str, pg_url: str
) -> None:
    """Terminated without waiting: the backend may die before or after the
    read is sent; either way the read succeeds (found dead, or run again)."""
    for _ in range(30):
        db.scalar("SELECT 1")
        terminate_all(pg_admin_url, pg_url, wait=False)
        assert db.scalar("SELECT COUNT(*) FROM heal_probe") == 0


@pytest.mark.parametrize("pipeline", [False, True], ids=["statement by statement", "pipelined"])
def test_a_connection_terminated_inside_a_transaction_fails_it_whole(
    db: Database, pg_admin_url: str, pg_url: str, pipeline: bool
) -> None:
    runs = 0
    with pytest.raises(psycopg.OperationalError), db.transaction(pipeline=pipeline):
        runs += 1
        db.execute("INSERT INTO heal_probe VALUES (1)")
        terminate_all(pg_admin_url, pg_url)
        db.execute("INSERT INTO heal_probe VALUES (2)")
    assert runs == 1
    assert db.scalar("SELECT COUNT(*) FROM heal_probe") == 0  # no half-commit
    with db.transaction():
        db.execute("INSERT INTO heal_probe VALUES (3)")
    assert db.query("SELECT x FROM heal_probe") == [(3,)]


@pytest.mark.parametrize("pipeline", [False, True], ids=["statement by statement", "pipelined"])
def test_a_commit_whose_connection_died_is_reported_and_never_repeated(
    db: Database, pg_admin_url: str, pg_url: str, pipeline: bool
) -> None:
    runs = 0
    with pytest.raises(psycopg.OperationalError), db.transaction(pipeline=pipeline):
        runs += 1
        db.execute("INSERT INTO heal_probe VALUES (1)")
        terminate_all(pg_admin_url, pg_url)  # the COMMIT that follows meets a dead backend
    assert runs == 1
    assert db.scalar("SELECT COUNT(*) FROM heal_probe") == 0


def test_a_pipelined_write_that_fails_fails_its_transaction_whole_and_nothing_after_it_runs(
    db: Database,
) -> None:
    """A pipelined transaction sends writes without waiting for each: the
    failure of one is raised (here by :meth:`Database.settle`), what came
    before it is rolled back, what came after it never ran, and the
    connection goes on serving."""
    db.execute("CREATE UNIQUE INDEX heal_probe_x ON heal_probe (x)")
    db.execute("INSERT INTO heal_probe VALUES (1)")
    reached = False
    with pytest.raises(psycopg.errors.UniqueViolation), db.transaction(pipeline=True):
        db.execute("INSERT INTO heal_probe VALUES (2)")
        db.execute("INSERT INTO heal_probe VALUES (1)")  # refused by the server
        db.execute("INSERT INTO heal_probe VALUES (3)")
        db.settle()
        reached = True
    assert not reached
    assert db.query("SELECT x FROM heal_probe ORDER BY x") == [(1,)]
    # a read waits for the writes before it; the connection is reused
    with db.transaction(pipeline=True):
        db.execute("INSERT INTO heal_probe VALUES (4)")
        assert db.scalar("SELECT COUNT(*) FROM heal_probe") == 2
        db.execute("INSERT INTO heal_probe VALUES (5)")
    assert db.query("SELECT x FROM heal_probe ORDER BY x") == [(1,), (4,), (5,)]


def test_concurrent_requests_after_termination_all_succeed(
    db: Database, pg_admin_url: str, pg_url: str
) -> None:
    fill_pool(db, 8)
    terminate_all(pg_admin_url, pg_url)
    barrier = threading.Barrier(8)

    def work(n: int) -> int:
        barrier.wait()
        with db.transaction():
            db.execute("INSERT INTO heal_probe VALUES (?)", (n,))
        return int(db.scalar("SELECT COUNT(*) FROM heal_probe WHERE x = ?", (n,)))

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(work, range(8))) == [1] * 8


# -- a real imag serve -------------------------------------------------------------------------


def c_store(port: int, data: bytes) -> int:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate(HOST, port, ae_title="IMAG", evt_handlers=CLIENT_HANDLERS)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()
        ae.shutdown()


def c_find_count(port: int, study: str) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, port, ae_title="IMAG")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        return sum(
            1
            for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status == 0xFF00
        )
    finally:
        assoc.release()
        ae.shutdown()


def test_imag_serve_answers_qido_stow_c_store_and_c_find_after_its_backends_are_terminated(
    pg_url: str, pg_admin_url: str, tmp_path: Path
) -> None:
    settings = {"IMAG_INGEST_DEFAULT_SITE": "A"}
    with running_imag(tmp_path, index_url=pg_url, dicom=True, settings=settings) as server:
        study = pydicom.uid.generate_uid()

        def stow() -> int:
            body, headers = stow_body(make_instance(study=study))
            return server.http.post(
                server.dicomweb + "/studies",
                data=body,
                headers=headers | {"X-IMAG-Site": "A"},
                timeout=30,
            ).status_code

        def qido() -> list:
            answer = server.http.get(
                server.dicomweb + f"/studies?StudyInstanceUID={study}", timeout=30
            )
            assert answer.status_code == 200, answer.text
            return answer.json()

        assert stow() == 200
        # a busy server: several pooled connections
        with ThreadPoolExecutor(6) as pool:
            assert all(len(r) == 1 for r in pool.map(lambda _: qido(), range(12)))

        assert terminate_all(pg_admin_url, pg_url) >= 1
        assert len(qido()) == 1
        terminate_all(pg_admin_url, pg_url)
        assert stow() == 200
        terminate_all(pg_admin_url, pg_url)
        assert c_store(server.dicom_port, make_instance(study=study)) == 0x0000
        terminate_all(pg_admin_url, pg_url)
        assert c_find_count(server.dicom_port, study) == 1
        terminate_all(pg_admin_url, pg_url)
        with ThreadPoolExecutor(6) as pool:  # requests arriving together after it
            assert all(len(r) == 1 for r in pool.map(lambda _: qido(), range(12)))
        instances = server.http.get(
            server.dicomweb + f"/studies/{study}/instances", timeout=30
        ).json()
        assert len(instances) == 3
        assert server.http.get(server.url + "/health", timeout=10).json()["status"] == "ok"
        assert "index connection found dead; replaced by a new one" in server.log()
        assert "request failed" not in server.log()  # no 500 on the way
