"""The embedded SQLite index keeps its planner's statistics as it grows.

* Without them SQLite's planner takes any indexed equality as selective: a
  site-bound caller's look-up by PatientID or AccessionNumber walked the
  site's part of ``studies_by_site`` (250 and 94 ms at 10^7 instances, where
  the key's own index answers in 0.7).  An archive's index writer gathers
  them when it is made, so the look-ups use the key's index.
* They are gathered again as the instances committed reach 1,000, 2,000,
  4,000 ... (and at most a million apart), never on PostgreSQL (autovacuum).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from multidict import MultiDict

from archive.config import Config
from archive.index import open_database
from archive.index import statistics as index_statistics
from archive.index.db import Database
from archive.query import search
from archive.runtime import Archive
from archive.security.scope import Scope
from benchmarks import scale_data
from benchmarks.bench_scale import SEED, SITE, _Recorder, plan_of, samples
from dicomweb.qido import build_query


def test_a_site_bound_look_up_by_key_uses_the_keys_index_once_the_writer_is_made(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    shape = scale_data.load(url, 3_000, SEED, report=lambda text: None)
    sample = samples(shape, 1, SITE)[0]
    site = Scope.of([SITE])
    by_patient = {"PatientID": sample.patient.patient_id}
    by_accession = {"AccessionNumber": sample.study.accession}

    db = open_database(url)
    try:
        before = plan_of(db, "/studies", by_patient, site)
    finally:
        db.close()
    assert "studies_by_site (site=?)" in before  # the walk this fixes, as loaded
    # the archive's own connections, the one its migrations used included
    with Archive(make_config(index_url=url)) as archive:
        after_patient = plan_of(archive.db, "/studies", by_patient, site)
        after_accession = plan_of(archive.db, "/studies", by_accession, site)
    assert "patients_by_patient_id (patient_id=?)" in after_patient
    assert "studies_by_site (site=?)" not in after_patient
    assert "studies_by_accession (accession_number=?)" in after_accession
    assert "studies_by_site (site=?)" not in after_accession


def test_connections_open_before_an_analysis_plan_with_its_statistics_after(
    tmp_path: Path,
) -> None:
    """SQLite reads the statistics when a connection loads the schema: the
    pool's connections opened before an analysis would go on planning
    without them, the readers of a running ``imag serve`` for ever."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    shape = scale_data.load(url, 3_000, SEED, report=lambda text: None)
    sample = samples(shape, 1, SITE)[0]
    db = open_database(url)
    sql, args = _search_sql(db, {"PatientID": sample.patient.patient_id}, Scope.of([SITE]))
    try:
        with db.connection() as first, db.connection() as second:
            for conn in (first, second):  # both pooled, their schema loaded
                assert "studies_by_site (site=?)" in _plan(conn, sql, args)
        index_statistics.analyse(db)
        with db.connection() as first, db.connection() as second:
            for conn in (first, second):
                assert "patients_by_patient_id (patient_id=?)" in _plan(conn, sql, args)
    finally:
        db.close()


def _search_sql(db: Database, params: dict[str, str], scope: Scope) -> tuple[str, list]:
    query, fields = build_query("STUDY", MultiDict({**params, "limit": "100"}), {})
    query.return_keys, query.scope = fields, scope
    recorder = _Recorder(db)
    search(recorder, query)  # type: ignore[arg-type]
    return recorder.seen[0]


def _plan(conn: object, sql: str, args: list) -> str:
    return "; ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args))  # type: ignore[attr-defined]


def test_statistics_are_gathered_again_as_the_index_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gathered: list[int] = []
    db = open_database(f"sqlite:///{tmp_path / 'index.db'}")
    stats = index_statistics.Statistics(db)
    monkeypatch.setattr(index_statistics, "analyse", lambda _db: gathered.append(stats.committed))
    monkeypatch.setattr(index_statistics, "LONGEST", 5_000)
    stats.start()
    for _ in range(200):
        stats.count(100)  # batches of 100 instances, 20,000 in all
    assert gathered == [0, 1_000, 2_000, 4_000, 8_000, 13_000, 18_000]
    db.close()


def test_a_failed_analysis_is_logged_not_raised_into_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer's commit has been answered already: stale statistics cost
    time, never an instance."""
    db = open_database(f"sqlite:///{tmp_path / 'index.db'}")
    stats = index_statistics.Statistics(db)

    def locked(_db: object) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(index_statistics, "analyse", locked)
    stats.count(1_000)
    assert "index statistics not gathered" in caplog.text
    db.close()


@pytest.mark.timeout(30)
def test_a_long_write_elsewhere_is_not_waited_for_and_the_connection_keeps_its_patience(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Adversary: another process holding the write lock for long (a bulk
    import).  Waited for with the index's 60 s patience, the analysis would
    hold up the opening of an archive (its index writer is made then) for a
    minute; it gives up after :data:`BUSY_WAIT_MS`, and the pooled
    connection it used waits as long as before for the writes it serves."""
    import sqlite3

    path = tmp_path / "index.db"
    db = open_database(f"sqlite:///{path}")
    db.execute("CREATE TABLE t (x INTEGER)")
    monkeypatch.setattr(index_statistics, "BUSY_WAIT_MS", 50)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the other process's long write
    try:
        index_statistics.Statistics(db).start()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "index statistics not gathered" in caplog.text
    with db.connection() as conn:
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 60_000
    db.close()


@pytest.mark.postgres
def test_postgresql_is_left_to_its_autovacuum(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = open_database(pg_url)
    stats = index_statistics.Statistics(db)
    called: list[object] = []
    monkeypatch.setattr(index_statistics, "analyse", called.append)
    stats.start()
    stats.count(10**7)
    assert called == []
    db.close()
