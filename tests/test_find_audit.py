"""A C-FIND and its audit entry: on PostgreSQL the search's own statement
writes the entry (a data-modifying WITH), so a query costs one round trip
and one commit instead of two, and the entry is still durable before any
match leaves.  These tests hold that shortcut to what the two-step path
(search, then ``AuditLog.write``) answers and writes: the same matches in
the same order, the same audit row, the same refusal when the trail cannot
be written, and the two-step path wherever the entry depends on what the
search finds (a site peer's look-up by UID of another site's study)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator

import psycopg
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset

from archive.config import Config
from archive.dimse.handlers import AUDIT_REFUSAL, peer_entry, plan_find
from archive.identity import Source
from archive.index.db import Database
from archive.query import Query, search
from archive.runtime import Archive
from archive.security.audit import AUDIT_WRITE_FAILURES
from archive.topology import Peer
from tests.dicomfiles import make_instance
from tests.statements import statements_run
from tests.test_audit_failclosed import audit_unwritable

REGIONAL = Peer("REGION_SCU", regional=True)
SITE_B = Peer("B_SCU", site="B")
#: (site, patient, name, study date) of each study stored
STUDIES = [
    ("A", "PAT-1", "MARTIN^PAUL", "20240105"),
    ("A", "PAT-1", "MARTIN^PAUL", "20230611"),
    ("A", "PAT-2", "MARCHAND^ANNE", "20240102"),
    ("B", "PAT-3", "MAREC^JEAN", "20240103"),
    ("A", "PAT-4", "DURAND^LEA", "20240104"),
]


@pytest.fixture
def studies(archive: Archive) -> Iterator[list[str]]:
    """The Study Instance UIDs of :data:`STUDIES`, stored (one CT slice each)."""
    uids = []
    for site, patient, name, date in STUDIES:

        def edit(
            ds: FileDataset, patient: str = patient, name: str = name, day: str = date
        ) -> None:
            ds.PatientID, ds.PatientName, ds.StudyDate = patient, name, day

        data = make_instance(edit)
        assert archive.pipeline.ingest(data, Source(kind="import", site=site)).ok
        uids.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).StudyInstanceUID)
    yield uids


def identifier(level: str = "STUDY", **keys: str) -> Callable[[], Dataset]:
    def make() -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate"):
            setattr(ds, keyword, "")
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        return ds

    return make


def audit_rows(db: Database, after: int) -> list[tuple]:
    return db.query(
        "SELECT actor, actor_kind, role, action, outcome, status, study_uid, patient_id, "
        "source, detail, node FROM audit WHERE id > ? ORDER BY id",
        (after,),
    )


def regional_entry(study: str | None, patient: str | None) -> tuple:
    """The first nine columns of :func:`audit_rows` for a C-FIND of
    :data:`REGIONAL` from host "h", allowed."""
    return (
        "REGION_SCU",
        "peer",
        "regional-peer",
        "dicom.c-find",
        "allowed",
        None,
        study,
        patient,
        "REGION_SCU@h",
    )


def last_audit_id(db: Database) -> int:
    return int(db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))


def test_a_c_find_by_patient_is_searched_and_audited_in_one_statement_on_postgresql(
    archive: Archive, studies: list[str]
) -> None:
    before = last_audit_id(archive.db)
    with statements_run(archive.db) as statements:
        plan = plan_find(archive, identifier(PatientID="PAT-1"), REGIONAL, "REGION_SCU", "h")
    assert plan.status == 0xFF00
    assert sorted(row["StudyInstanceUID"] for row in plan.rows) == sorted(studies[:2])
    # SQLite: the search, then the entry (a local file: no round trip to save)
    assert len(statements) == (1 if archive.db.dialect == "postgresql" else 2), statements
    [row] = audit_rows(archive.db, before)
    assert row[:9] == regional_entry(study=None, patient=None)
    assert json.loads(row[9]) == {
        "site": "",  # a regional peer speaks for no one site
        "level": "STUDY",
        "keys": {"PatientID": "PAT-1"},
        "results": 2,
    }


@pytest.mark.parametrize("level", ["STUDY", "SERIES"])
def test_a_c_find_by_study_uid_is_searched_and_audited_in_one_statement_on_postgresql(
    archive: Archive, studies: list[str], level: str
) -> None:
    """A regional peer's look-up by Study Instance UID (a viewer opening a
    study asks its series so): one statement on PostgreSQL, whose INSERT
    reads the study's patient for the entry, as the two-step path's does."""
    before = last_audit_id(archive.db)
    with statements_run(archive.db) as statements:
        plan = plan_find(
            archive, identifier(level, StudyInstanceUID=studies[0]), REGIONAL, "REGION_SCU", "h"
        )
    assert plan.status == 0xFF00
    assert len(plan.rows) == 1
    assert len(statements) == (1 if archive.db.dialect == "postgresql" else 2), statements
    [row] = audit_rows(archive.db, before)
    assert row[:9] == regional_entry(study=studies[0], patient="PAT-1")  # read by the INSERT
    assert json.loads(row[9]) == {
        "site": "",
        "level": level,
        "keys": {"StudyInstanceUID": studies[0]},
        "results": 1,
    }


@pytest.mark.postgres
@pytest.mark.parametrize("index_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("known", [True, False])
def test_an_entry_naming_a_study_a_search_writes_is_the_row_audit_write_appends(
    archive: Archive, studies: list[str], known: bool
) -> None:
    """With the study's patient read by the INSERT: a study the index has
    (its patient) and one it has not (none), as :meth:`AuditLog.write` writes."""
    uid = studies[2] if known else "1.2.3.4.5.6.7.8.9"
    query = Query(level="SERIES", keys={"StudyInstanceUID": uid})
    detail = {"level": "SERIES", "keys": {"StudyInstanceUID": uid}}
    before = last_audit_id(archive.db)
    entry = peer_entry("REGION_SCU", "h", REGIONAL, "dicom.c-find", "allowed", uid, detail)
    rows = search(archive.db, query, counted=archive.audit.counted(entry, "results"))
    assert len(rows) == (1 if known else 0)
    twin = peer_entry(
        "REGION_SCU",
        "h",
        REGIONAL,
        "dicom.c-find",
        "allowed",
        uid,
        {**detail, "results": len(rows)},
    )
    archive.audit.write(twin)
    carried, written = audit_rows(archive.db, before)
    assert carried == written
    assert carried[7] == ("PAT-2" if known else None)


@pytest.mark.postgres
@pytest.mark.parametrize("index_url", ["postgresql"], indirect=True)
def test_the_copy_of_a_carried_entry_forwarded_to_syslog_names_the_studys_patient(
    make_config: Callable[..., Config], index_url: str
) -> None:
    """The SIEM gets what the trail holds: the patient the INSERT read."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(10)
    syslog = f"udp://127.0.0.1:{receiver.getsockname()[1]}"
    try:
        with Archive(make_config(index_url=index_url, settings={"audit.syslog": syslog})) as arch:
            data = make_instance(lambda ds: setattr(ds, "PatientID", "PAT-9"))
            assert arch.pipeline.ingest(data, Source(kind="import", site="A")).ok
            uid = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).StudyInstanceUID
            plan = plan_find(
                arch, identifier("SERIES", StudyInstanceUID=uid), REGIONAL, "REGION_SCU", "h"
            )
            assert plan.status == 0xFF00
            message, _ = receiver.recvfrom(65536)
    finally:
        receiver.close()
    forwarded = json.loads(message.decode("utf-8").split("\ufeff", 1)[1])
    assert (forwarded["action"], forwarded["study_uid"], forwarded["patient_id"]) == (
        "dicom.c-find",
        uid,
        "PAT-9",
    )


@pytest.mark.postgres
@pytest.mark.parametrize("index_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("found", [0, 1, 4])
def test_the_entry_a_search_writes_is_the_row_audit_write_appends(
    archive: Archive, studies: list[str], found: int
) -> None:
    """Byte for byte, whatever the count's width: readers of the trail
    (exports, syslog forwarding, tamper checks) see one format."""
    pattern = {0: "NOBODY*", 1: "DURAND*", 4: "MAR*"}[found]
    query = Query(level="STUDY", keys={"PatientName": pattern})
    detail = {"site": "A", "level": "STUDY", "keys": {"PatientName": pattern}}
    before = last_audit_id(archive.db)
    entry = peer_entry(
        "A_SCU", "h", Peer("A_SCU", site="A"), "dicom.c-find", "allowed", None, detail
    )
    rows = search(archive.db, query, counted=archive.audit.counted(entry, "results"))
    assert len(rows) == found
    twin = peer_entry(
        "A_SCU",
        "h",
        Peer("A_SCU", site="A"),
        "dicom.c-find",
        "allowed",
        None,
        {**detail, "results": found},
    )
    archive.audit.write(twin)
    carried, written = audit_rows(archive.db, before)
    assert carried == written
    assert json.loads(carried[9])["results"] == found


@pytest.mark.postgres
@pytest.mark.parametrize("index_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    "keys, limit, offset",
    [
        ({}, None, 0),
        ({"StudyDate": "20240101-20241231"}, None, 0),  # by date, then id
        ({"PatientName": "MAR*"}, None, 0),  # by name, then id
        ({"PatientName": "*AR*"}, None, 0),  # contains: by id
        ({"StudyDate": "20240101-20241231"}, 3, 1),  # a page of a date range
        ({}, 2, 2),
    ],
)
def test_matches_come_in_the_search_order_when_it_writes_its_audit_entry(
    archive: Archive,
    studies: list[str],
    keys: dict[str, str],
    limit: int | None,
    offset: int,
) -> None:
    def query() -> Query:
        return Query(
            level="STUDY",
            keys=dict(keys),
            return_keys=["PatientName", "StudyDate"],
            limit=limit,
            offset=offset,
        )

    entry = peer_entry("REGION_SCU", "h", REGIONAL, "dicom.c-find", "allowed", None, {})
    carried = search(archive.db, query(), counted=archive.audit.counted(entry, "results"))
    plain = search(archive.db, query())
    assert carried == plain
    assert len(plain) > 1  # an order to keep


def test_a_site_peers_look_up_of_another_sites_study_is_answered_empty_and_audited_denied(
    archive: Archive, studies: list[str]
) -> None:
    """The adversary: site B's peer asks for a study of site A by its UID.
    Its entry depends on finding nothing (denied, naming the study), so the
    search runs first and the entry after, on both backends."""
    other = studies[0]
    before = last_audit_id(archive.db)
    plan = plan_find(archive, identifier(StudyInstanceUID=other), SITE_B, "B_SCU", "h")
    assert plan.status == 0xFF00 and plan.rows == []
    [row] = audit_rows(archive.db, before)
    assert row[3:8] == ("dicom.c-find", "denied", None, other, "PAT-1")
    # its own site's study by the same route: found, allowed
    plan = plan_find(archive, identifier(StudyInstanceUID=studies[3]), SITE_B, "B_SCU", "h")
    assert [r["StudyInstanceUID"] for r in plan.rows] == [studies[3]]
    # and by patient: its site's studies only, never site A's
    plan = plan_find(archive, identifier(PatientName="MAR*"), SITE_B, "B_SCU", "h")
    assert [r["StudyInstanceUID"] for r in plan.rows] == [studies[3]]
    assert json.loads(audit_rows(archive.db, before)[-1][9])["results"] == 1


def test_with_the_audit_trail_unwritable_a_c_find_by_patient_answers_nothing_but_a700(
    archive: Archive, studies: list[str]
) -> None:
    """The statement that would carry the entry fails whole (no match
    leaves it), the two-step path then reports the trail unwritable: the
    failure is counted once, nothing is written."""
    failures = AUDIT_WRITE_FAILURES.labels("dicom.c-find")._value.get()  # noqa: SLF001
    before = last_audit_id(archive.db)
    with audit_unwritable(archive.db):
        plan = plan_find(archive, identifier(PatientID="PAT-1"), REGIONAL, "REGION_SCU", "h")
    assert (plan.status, plan.comment, plan.rows, plan.query) == (0xA700, AUDIT_REFUSAL, [], None)
    assert last_audit_id(archive.db) == before
    assert AUDIT_WRITE_FAILURES.labels("dicom.c-find")._value.get() == failures + 1  # noqa: SLF001
    plan = plan_find(archive, identifier(PatientID="PAT-1"), REGIONAL, "REGION_SCU", "h")
    assert len(plan.rows) == 2 and len(audit_rows(archive.db, before)) == 1


def test_a_search_carries_a_write_on_postgresql_only(archive: Archive) -> None:
    entry = peer_entry("REGION_SCU", "h", REGIONAL, "dicom.c-find", "allowed", None, {})
    if archive.db.dialect == "postgresql":
        assert (
            search(archive.db, Query(level="STUDY"), counted=archive.audit.counted(entry, "n"))
            == []
        )
    else:
        with pytest.raises(ValueError, match="PostgreSQL only"):
            search(archive.db, Query(level="STUDY"), counted=archive.audit.counted(entry, "n"))


def _losing_the_connection(after_commit: bool) -> Callable[..., list]:
    """``search`` whose statement carrying a write fails as a connection
    lost between the server and IMAG does: after the statement committed
    (``after_commit``), or before it reached the server.  Injected, because
    a real connection cannot be cut from outside at exactly that moment;
    the statement itself is the real one, on the real index."""

    def lossy(db: Database, query: Query, *, counted=None) -> list:  # noqa: ANN001
        if counted is None:
            return search(db, query)
        if after_commit:
            search(db, query, counted=counted)
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    return lossy


def test_a_c_find_whose_statement_wrote_its_entry_and_then_lost_its_connection_is_audited_once(
    archive: Archive, studies: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adversary: the index connection lost after the COMMIT of the search
    that wrote the entry, before its rows came back.  The entry is in the
    trail: it is not written a second time; the matches come from the
    search run again."""
    if archive.db.dialect != "postgresql":
        pytest.skip("only PostgreSQL carries the entry in the search's statement")
    monkeypatch.setattr("archive.dimse.handlers.search", _losing_the_connection(True))
    before = last_audit_id(archive.db)
    plan = plan_find(archive, identifier(PatientID="PAT-1"), REGIONAL, "REGION_SCU", "h")
    assert plan.status == 0xFF00
    assert sorted(row["StudyInstanceUID"] for row in plan.rows) == sorted(studies[:2])
    [row] = audit_rows(archive.db, before)
    assert row[:9] == regional_entry(study=None, patient=None)
    assert json.loads(row[9])["results"] == 2


def test_a_c_find_whose_statement_failed_before_writing_is_audited_by_the_two_step_path(
    archive: Archive, studies: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if archive.db.dialect != "postgresql":
        pytest.skip("only PostgreSQL carries the entry in the search's statement")
    monkeypatch.setattr("archive.dimse.handlers.search", _losing_the_connection(False))
    before = last_audit_id(archive.db)
    plan = plan_find(archive, identifier(PatientID="PAT-1"), REGIONAL, "REGION_SCU", "h")
    assert sorted(row["StudyInstanceUID"] for row in plan.rows) == sorted(studies[:2])
    [row] = audit_rows(archive.db, before)
    assert row[:9] == regional_entry(study=None, patient=None)
    assert json.loads(row[9])["results"] == 2
