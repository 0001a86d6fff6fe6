"""The embedded SQLite index keeps its planner's statistics as it grows.

* Without them SQLite's planner takes any indexed equality as selective: a
  site-bound caller's look-up by PatientID or AccessionNumber walked the
  site's part of ``studies_by_site`` (250 and 94 ms at 10^7 instances, where
  the key's own index answers in 0.7).  An archive's index writer gathers
  them when it is made, so the look-ups use the key's index.
* They are gathered again each time the studies double (and at most
  100,000 studies apart), never below 200 studies (statistics of a first
  large study misled SQLite about every table), never on PostgreSQL
  (autovacuum).
"""

from __future__ import annotations

import sqlite3
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


def test_statistics_are_gathered_again_each_time_the_studies_double(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'index.db'}")
    stats = index_statistics.Statistics(db)
    held = [0]
    gathered: list[int] = []
    monkeypatch.setattr(stats, "studies", lambda: held[0])
    monkeypatch.setattr(index_statistics, "analyse", lambda _db: gathered.append(held[0]))
    stats.start()  # an empty index: nothing to learn from
    for studies in (50, 199, 200, 300, 399, 400, 700, 800, 1_600, 3_000):
        held[0] = studies
        stats.count(index_statistics.CHECK_EVERY)
    assert gathered == [200, 400, 800, 1_600]
    db.close()


def test_no_statistics_while_the_index_holds_few_studies(tmp_path: Path) -> None:
    """Adversary: the first push of an archive, one large study.  Statistics
    taken then said every table had one row, and SQLite read studies and
    patients whole for every search from then on (a C-FIND by PatientID
    2.7 -> 5.0 ms after a 1,000-slice push); without them a small index is
    planned well."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    scale_data.load(url, 1_000, SEED, report=lambda text: None)  # 100 studies
    db = open_database(url)
    try:
        stats = index_statistics.Statistics(db)
        stats.start()
        stats.count(index_statistics.CHECK_EVERY)
        assert db.scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_stat1'") == 0
    finally:
        db.close()


def test_a_failed_analysis_is_logged_not_raised_into_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer's commit has been answered already: stale statistics cost
    time, never an instance."""
    db = open_database(f"sqlite:///{tmp_path / 'index.db'}")
    stats = index_statistics.Statistics(db)
    monkeypatch.setattr(stats, "studies", lambda: 500)

    def locked(_db: object) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(index_statistics, "analyse", locked)
    stats.count(index_statistics.CHECK_EVERY)
    assert "index statistics not gathered" in caplog.text
    db.close()


@pytest.mark.timeout(30)
def test_a_long_write_elsewhere_is_not_waited_for_and_the_connection_keeps_its_patience(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adversary: another process holding the write lock for long (a bulk
    import).  Waited for with the index's 60 s patience, the analysis would
    hold up the opening of an archive (its index writer is made then) for a
    minute; it gives up after :data:`BUSY_WAIT_MS` (the next look tries
    again), and the pooled connection it used waits as long as before for
    the writes it serves."""
    path = tmp_path / "index.db"
    db = open_database(f"sqlite:///{path}")
    db.execute("CREATE TABLE t (x INTEGER)")
    monkeypatch.setattr(index_statistics, "BUSY_WAIT_MS", 50)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the other process's long write
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            index_statistics.analyse(db)
    finally:
        other.execute("ROLLBACK")
        other.close()
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
