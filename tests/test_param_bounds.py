"""Integers a client sends past any SQL integer are refused as bad requests,
never a 500 (issue 11, class 9): the change feed's ``since``, the audit
export's ``after``, and C-FIND integer matching keys (the one query model
checks IS values, so QIDO and C-FIND answer alike).  One real ``imag serve``
on SQLite; each refusal leaves exactly one audit row and a server that still
answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive.index import open_database
from tests.audittrail import AuditCursor
from tests.httpserver import HttpImag, running_imag
from tests.processes import HOST

HUGE = "99999999999999999999999"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpImag]:
    with running_imag(tmp_path_factory.mktemp("bounds"), dicom=True) as imag:
        yield imag


@pytest.fixture
def audit(server: HttpImag) -> Iterator[AuditCursor]:
    db = open_database(f"sqlite:///{Path(server.workdir) / 'data' / 'index.db'}")
    try:
        yield AuditCursor(db)
    finally:
        db.close()


@pytest.mark.parametrize(
    "path",
    [
        f"/changes?since={HUGE}",
        "/changes?since=-1",
        f"/admin/audit?after={HUGE}",
        f"/admin/audit?limit={HUGE}",
    ],
)
def test_an_integer_past_any_sql_integer_is_a_bad_request(
    server: HttpImag, audit: AuditCursor, path: str
) -> None:
    answer = server.http.get(server.url + path, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert "integer" in answer.json()["detail"]
    [row] = audit.new_rows()
    assert (row["outcome"], row["status"]) == ("failed", 400)
    assert server.http.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    assert server.http.get(server.url + "/changes?since=0", timeout=10).status_code == 200


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of the hostile IS value
def test_a_c_find_on_an_integer_key_past_the_is_range_fails_cleanly(
    server: HttpImag, audit: AuditCursor
) -> None:
    ae = AE(ae_title="ANY_SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, server.dicom_port, ae_title=server.aet)
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = "1.2.3"
        query.SeriesNumber = HUGE
        statuses = [
            status.Status
            for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        ]
        assert statuses == [0xA900]
        [row] = audit.new_rows()
        assert (row["action"], row["outcome"]) == ("dicom.c-find", "failed")
        query.SeriesNumber = "1"
        statuses = [
            status.Status
            for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        ]
        assert statuses == [0x0000]
    finally:
        assoc.release()
