"""The SQL index: one schema and one behaviour on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import replace

import pytest

from archive.index import Catalog, InstanceRecord, StoreOutcome, current_version, open_database
from archive.index import upgrade as upgrade_index
from archive.index.migrate import available


def record(
    sop: str,
    *,
    study: str = "1.2.3",
    series: str = "1.2.3.1",
    pid: str = "P1",
    issuer: str = "SITE-A",
    modality: str = "CT",
    size: int = 100,
    content: bytes | None = None,
    site: str = "A",
) -> InstanceRecord:
    digest = hashlib.sha256(content if content is not None else sop.encode()).digest()
    return InstanceRecord(
        issuer=issuer,
        patient_id=pid,
        patient_name="MÜLLER^Hans",
        birth_date="19700101",
        sex="M",
        study_uid=study,
        study_date="20260101",
        study_time="101010",
        accession_number="ACC1",
        study_id="1",
        study_description="CT head",
        referring_physician_name="Côté^Zoé",
        institution_name="Hôpital",
        site=site,
        series_uid=series,
        modality=modality,
        series_number=1,
        series_description="axial",
        body_part_examined="HEAD",
        pps_start_date=None,
        pps_start_time=None,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=1,
        number_of_frames=None,
        stored_ts="1.2.840.10008.1.2.1",
        original_ts="1.2.840.10008.1.2.1",
        object_key=f"{study}/{series}/{sop}.{digest.hex()[:16]}.dcm",
        size=size,
        sha256=digest,
    )


@pytest.fixture
def catalog(index_url: str) -> Catalog:
    db = open_database(index_url)
    upgrade_index(db)
    yield Catalog(db)
    db.close()


def test_migrations_bring_an_empty_database_to_the_latest_version(index_url: str) -> None:
    db = open_database(index_url)
    assert current_version(db) == 0
    applied = upgrade_index(db)
    core = [name for _, name, _ in available()]
    assert applied[: len(core)] == core  # the core's first, then each plugin component's
    assert all("/" in name for name in applied[len(core) :])
    assert current_version(db) == available()[-1][0]
    assert upgrade_index(db) == []  # idempotent
    db.close()


def test_new_instances_create_patient_study_series_and_counts(catalog: Catalog) -> None:
    results = catalog.commit(
        [
            record("1.2.3.1.1"),
            record("1.2.3.1.2", size=50),
            record("1.2.3.2.1", series="1.2.3.2", modality="SR", size=7),
        ]
    )
    assert [r.outcome for r in results] == [StoreOutcome.STORED] * 3
    db = catalog.db
    assert db.query("SELECT num_series, num_instances, total_bytes, modalities FROM studies") == [
        (2, 3, 157, "CT\\SR")
    ]
    assert sorted(db.query("SELECT series_uid, num_instances, total_bytes FROM series")) == [
        ("1.2.3.1", 2, 150),
        ("1.2.3.2", 1, 7),
    ]
    name, norm = db.query_one("SELECT patient_name, patient_name_norm FROM patients")
    assert (name, norm) == ("MÜLLER^Hans", "MÜLLER^HANS")
    assert catalog.counts() == {
        "patients": 1,
        "studies": 1,
        "series": 2,
        "instances": 3,
        "bytes": 157,
    }


def test_same_patient_id_from_two_issuers_stays_two_patients(catalog: Catalog) -> None:
    catalog.commit(
        [
            record("1.1", study="1.10", series="1.10.1", issuer="SITE-A"),
            record("1.2", study="1.20", series="1.20.1", issuer="SITE-B"),
        ]
    )
    assert catalog.db.scalar("SELECT COUNT(*) FROM patients WHERE patient_id = 'P1'") == 2
    assert catalog.counts()["patients"] == 2


def test_identical_resend_is_a_duplicate_and_changes_no_count(catalog: Catalog) -> None:
    catalog.commit([record("1.2.3.1.1")])
    before = catalog.counts()
    [result] = catalog.commit([record("1.2.3.1.1")])
    assert result.outcome is StoreOutcome.DUPLICATE
    assert result.obsolete_key is None
    assert catalog.counts() == before


def test_conflicting_object_is_kept_by_default_and_the_new_object_is_obsolete(
    catalog: Catalog,
) -> None:
    first = record("1.2.3.1.1", content=b"first")
    catalog.commit([first])
    other = record("1.2.3.1.1", content=b"second", size=999)
    [result] = catalog.commit([other], on_conflict="keep")
    assert result.outcome is StoreOutcome.KEPT
    assert result.obsolete_key == other.object_key
    assert result.object_key == first.object_key
    assert catalog.find_instance("1.2.3.1.1").sha256 == first.sha256
    assert catalog.counts()["bytes"] == 100


def test_conflicting_object_replaces_under_replace_policy_and_counts_follow(
    catalog: Catalog,
) -> None:
    first = record("1.2.3.1.1", content=b"first")
    catalog.commit([first, record("1.2.3.1.2")])
    moved = record("1.2.3.1.1", content=b"second", size=999, series="1.2.3.9", modality="MR")
    [result] = catalog.commit([moved], on_conflict="replace")
    assert result.outcome is StoreOutcome.REPLACED
    assert result.obsolete_key == first.object_key
    stored = catalog.find_instance("1.2.3.1.1")
    assert (stored.sha256, stored.object_key, stored.series_uid) == (
        moved.sha256,
        moved.object_key,
        "1.2.3.9",
    )
    assert sorted(
        catalog.db.query("SELECT series_uid, num_instances, total_bytes FROM series")
    ) == [("1.2.3.1", 1, 100), ("1.2.3.9", 1, 999)]
    assert catalog.db.query("SELECT num_instances, total_bytes FROM studies") == [(2, 1099)]


def test_a_batch_may_hold_the_same_instance_twice(catalog: Catalog) -> None:
    results = catalog.commit([record("1.5"), record("1.5")])
    assert [r.outcome for r in results] == [StoreOutcome.STORED, StoreOutcome.DUPLICATE]
    assert catalog.counts()["instances"] == 1


def test_a_failing_batch_leaves_nothing_behind(catalog: Catalog) -> None:
    bad = replace(record("1.7"), sop_class_uid=None)  # NOT NULL violation
    with pytest.raises(Exception):  # noqa: B017 - sqlite3 and psycopg raise their own kinds
        catalog.commit([record("1.6"), bad])
    assert catalog.counts() == {
        "patients": 0,
        "studies": 0,
        "series": 0,
        "instances": 0,
        "bytes": 0,
    }


def test_concurrent_writers_keep_counts_exact(index_url: str) -> None:
    """Several connections committing into the same study at once (as several
    associations or processes do) never lose a count or duplicate a parent."""
    db = open_database(index_url)
    upgrade_index(db)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        mine = open_database(index_url)
        try:
            cat = Catalog(mine)
            for i in range(20):
                cat.commit([record(f"1.9.{n}.{i}", series=f"1.2.3.{i % 3 + 1}")])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            mine.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cat = Catalog(db)
    assert cat.counts() == {
        "patients": 1,
        "studies": 1,
        "series": 3,
        "instances": 80,
        "bytes": 8000,
    }
    assert db.scalar("SELECT num_series FROM studies") == 3
    assert db.scalar("SELECT SUM(num_instances) FROM series") == 80
    db.close()


def test_stats_break_down_by_site_and_modality(catalog: Catalog) -> None:
    catalog.commit(
        [
            record("1.1", study="1.10", series="1.10.1", site="A", modality="CT"),
            record("1.2", study="1.20", series="1.20.1", site="B", modality="MR", pid="P2"),
        ]
    )
    stats = catalog.stats()
    assert stats["by_site"] == {
        "A": {"studies": 1, "instances": 1, "bytes": 100},
        "B": {"studies": 1, "instances": 1, "bytes": 100},
    }
    assert set(stats["by_modality"]) == {"CT", "MR"}


def test_iterating_instances_walks_every_row_in_batches(catalog: Catalog) -> None:
    catalog.commit([record(f"1.8.{i}") for i in range(25)])
    seen = [i.sop_instance_uid for i in catalog.iter_instances(batch=7)]
    assert sorted(seen) == sorted(f"1.8.{i}" for i in range(25))


def test_short_lived_threads_share_pooled_connections(index_url: str) -> None:
    """Every DICOM association runs in its own thread: connections must go
    back to a pool, not stay open once per thread that ever queried."""
    db = open_database(index_url)
    upgrade_index(db)
    opened: list[object] = []
    connect = db._connect

    def counting_connect():  # noqa: ANN202 - wraps the real connect, counts calls
        conn = connect()
        opened.append(conn)
        return conn

    db._connect = counting_connect
    for _ in range(30):  # one association after another
        t = threading.Thread(target=Catalog(db).counts)
        t.start()
        t.join()
    assert len(opened) <= 1  # (per-thread connections opened 30)
    threads = [threading.Thread(target=Catalog(db).counts) for _ in range(20)]  # at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(db._idle) <= db.max_idle
    if db.dialect == "postgresql":
        # closed connections leave pg_stat_activity when their backend exits,
        # asynchronously: the count settles within moments
        name = index_url.rsplit("/", 1)[1]
        deadline = time.monotonic() + 5
        while True:
            open_now = db.scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = ?", (name,))
            if open_now <= db.max_idle + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert open_now <= db.max_idle + 1
    db.close()
