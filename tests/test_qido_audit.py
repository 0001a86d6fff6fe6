"""A QIDO-RS search and its audit entry: the search, the answer and the entry
cost one thread hop, and on PostgreSQL, where the entry does not depend on
what the search finds, one statement (the search carries the entry, as a
C-FIND's does).  These tests hold that path to what the request's entry
must be whichever way it is written: one entry, the count of matches
answered (not of the one row read past the limit), the study and patient
of a look-up by a path's study, the denied entry of another site's study,
and a 503 with no data when the trail cannot be written."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import FileDataset

from archive.identity import Source
from archive.index.db import Database
from archive.security.audit import AuditEntry
from archive.security.http import AuditContext, PendingAudit
from archive.security.principals import Principals
from tests.audittrail import AuditCursor
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag, serving_in_process
from tests.statements import statements_run
from tests.test_audit_failclosed import audit_unwritable

#: (site, patient, name) of each study stored
STUDIES = [
    ("A", "PAT-1", "MARTIN^PAUL"),
    ("A", "PAT-1", "MARTIN^PAUL"),
    ("A", "PAT-2", "MARCHAND^ANNE"),
    ("B", "PAT-3", "MAREC^JEAN"),
]


@dataclass
class Archive:
    server: InProcessImag
    studies: list[str]
    site_a: str  # a radiologist of site A's token

    @property
    def db(self) -> Database:
        assert self.server.archive is not None
        return self.server.archive.db

    def get(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.server.http.get(self.server.dicomweb + path, headers=headers, timeout=30)


@pytest.fixture
def archive(tmp_path: Path, index_url: str) -> Iterator[Archive]:
    with serving_in_process(tmp_path / "imag", index_url=index_url) as server:
        assert server.archive is not None
        uids = []
        for site, patient, name in STUDIES:

            def edit(ds: FileDataset, patient: str = patient, name: str = name) -> None:
                ds.PatientID, ds.PatientName = patient, name

            data = make_instance(edit)
            assert server.archive.pipeline.ingest(data, Source(kind="import", site=site)).ok
            uids.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).StudyInstanceUID)
        principals = Principals(server.archive.db)
        principals.add("rad-a", "radiologist", sites=["A"])
        _, token = principals.create_token("rad-a", "test")
        yield Archive(server, uids, token)


def test_a_search_is_audited_once_with_the_matches_it_answers(archive: Archive) -> None:
    trail = AuditCursor(archive.db)
    with statements_run(archive.db) as statements:
        answer = archive.get("/studies?PatientName=MAR*")
    assert answer.status_code == 200
    assert len(answer.json()) == 4
    [entry] = trail.new_rows()
    assert (entry["actor"], entry["action"], entry["outcome"], entry["status"]) == (
        "admin",
        "qido.search",
        "allowed",
        200,
    )
    assert json.loads(entry["detail"])["results"] == 4
    # PostgreSQL: the token read, then the search carrying its entry; SQLite
    # (a local file, no round trip to save): the search, then the entry
    searched = [s for s in statements if "audit" in s or "FROM studies" in s]
    assert len(searched) == (1 if archive.db.dialect == "postgresql" else 2), statements


def test_a_cut_answer_counts_the_matches_answered_not_the_row_read_past_the_limit(
    archive: Archive,
) -> None:
    trail = AuditCursor(archive.db)
    answer = archive.get("/studies?limit=2")
    assert len(answer.json()) == 2
    assert "exceeded the limit" in answer.headers["Warning"]
    [entry] = trail.new_rows()
    assert json.loads(entry["detail"])["results"] == 2


def test_the_ignored_parameters_are_in_the_entry_the_search_writes(archive: Archive) -> None:
    trail = AuditCursor(archive.db)
    answer = archive.get("/studies?PatientID=PAT-1&NotAKeyword=1")
    assert answer.status_code == 200 and len(answer.json()) == 2
    [entry] = trail.new_rows()
    detail = json.loads(entry["detail"])
    assert detail["ignored"] == ["NotAKeyword"]
    assert detail["results"] == 2
    assert detail["path"] == "/dicom-web/studies?PatientID=PAT-1&NotAKeyword=1"


def test_a_search_under_a_study_names_the_study_and_its_patient(archive: Archive) -> None:
    """A viewer opening a study asks its series: on PostgreSQL the search
    carries its entry, whose INSERT reads the study's patient."""
    trail = AuditCursor(archive.db)
    with statements_run(archive.db) as statements:
        answer = archive.get(f"/studies/{archive.studies[2]}/series")
    assert answer.status_code == 200 and len(answer.json()) == 1
    [entry] = trail.new_rows()
    assert (entry["study_uid"], entry["patient_id"]) == (archive.studies[2], "PAT-2")
    assert json.loads(entry["detail"])["results"] == 1
    searched = [s for s in statements if "audit" in s or "FROM series" in s]
    assert len(searched) == (1 if archive.db.dialect == "postgresql" else 2), statements


def assert_denied_empty(
    answer: requests.Response, trail: AuditCursor, study: str, patient: str
) -> None:
    """Site A's radiologist got no match, and one entry: denied, naming the study."""
    assert answer.status_code == 200 and answer.json() == []
    [entry] = trail.new_rows()
    assert (entry["actor"], entry["outcome"], entry["status"]) == ("rad-a", "denied", 200)
    assert (entry["study_uid"], entry["patient_id"]) == (study, patient)


def test_another_sites_study_looked_up_by_uid_is_answered_empty_and_audited_denied(
    archive: Archive,
) -> None:
    """The adversary: a site-A radiologist asks for site B's study by UID."""
    other = archive.studies[3]
    trail = AuditCursor(archive.db)
    answer = archive.get(f"/studies?StudyInstanceUID={other}", archive.site_a)
    assert_denied_empty(answer, trail, other, "PAT-3")
    # and a search by name finds only site A's studies
    found = archive.get("/studies?PatientName=MAR*", archive.site_a).json()
    assert {s["0020000D"]["Value"][0] for s in found} == set(archive.studies[:3])


def test_another_sites_study_opened_by_its_path_is_answered_empty_and_audited_denied(
    archive: Archive,
) -> None:
    """The adversary again, asking the series of site B's study the way a
    viewer opens a study: what a site-bound caller may be denied keeps the
    two steps (search, then the entry that says denied)."""
    other = archive.studies[3]
    trail = AuditCursor(archive.db)
    answer = archive.get(f"/studies/{other}/series", archive.site_a)
    assert_denied_empty(answer, trail, other, "PAT-3")


def test_with_the_trail_unwritable_a_search_answers_503_without_data_and_then_recovers(
    archive: Archive,
) -> None:
    trail = AuditCursor(archive.db)
    with audit_unwritable(archive.db):
        answer = archive.get("/studies?PatientID=PAT-1")
        assert answer.status_code == 503
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert b"PAT-1" not in answer.content and b"MARTIN" not in answer.content
    assert trail.new_rows() == []  # nothing was written
    answer = archive.get("/studies?PatientID=PAT-1")
    assert answer.status_code == 200 and len(answer.json()) == 2
    [entry] = trail.new_rows()
    assert json.loads(entry["detail"])["results"] == 2


def test_a_malformed_search_is_refused_400_and_audited_once(archive: Archive) -> None:
    trail = AuditCursor(archive.db)
    answer = archive.get("/studies?limit=-1")
    assert answer.status_code == 400
    [entry] = trail.new_rows()
    assert (entry["outcome"], entry["status"]) == ("failed", 400)


def test_an_entry_written_before_the_answer_failed_is_followed_by_one_with_its_status(
    archive: Archive,
) -> None:
    """The contract of :class:`PendingAudit`: a handler that wrote its
    entry with 200 and then failed leaves a second entry, with the status the
    client got and the one written first -- the trail never says less."""
    assert archive.server.archive is not None
    pending = PendingAudit(
        lambda outcome, status: AuditEntry("u", "user", "qido.search", outcome, status=status),
        archive.server.archive.audit,
        AuditContext("qido.search"),
    )
    trail = AuditCursor(archive.db)
    pending.write(200)
    asyncio.run(pending.flush(200))  # the status written: nothing more
    asyncio.run(pending.flush(500))
    entries = trail.new_rows()
    assert [(e["outcome"], e["status"]) for e in entries] == [("allowed", 200), ("failed", 500)]
    assert json.loads(entries[1]["detail"]) == {"written_as": 200}
