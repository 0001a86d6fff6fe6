"""The audit trail is never silently lost, and says who looked for what.

One ``imag serve`` (SQLite and PostgreSQL) with a study of site A and one of
site B; a site-A radiologist over HTTP and a site-A DICOM peer (pynetdicom).

* A look-up by UID of site B's study (QIDO-RS at each level, WADO-RS, WADO-URI,
  C-FIND at each level, C-GET, C-MOVE) is answered as if nothing were there
  and leaves exactly one audit row: denied, with site B's study and patient,
  found by ``imag audit --study``.
* With the audit table made unwritable in the real index (a trigger the test
  adds), no service answers with data: HTTP 503 with a problem body (a
  streamed WADO-RS retrieve included), C-FIND 0xA700, C-GET / C-MOVE 0xA702;
  strangers are still rejected; the failure is logged and counted.  Once the
  table is writable again everything is served and audited as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from archive.index import open_database
from archive.index.db import Database
from tests.dicomfiles import make_instance
from tests.httpserver import HttpImag, running_imag
from tests.processes import HOST, free_port
from tests.s3server import StoreUnderTest, index_for_store
from tests.test_access import imag_cli, new_token, stow_body

#: the shared server runs on a folder and on an S3 bucket (S3 on the SQLite index)
pytestmark = pytest.mark.s3_on_sqlite

AUDIT_REFUSAL = "audit trail cannot be written: access refused"


@pytest.fixture(scope="module")
def index_url(module_index_url: str, module_store: StoreUnderTest) -> str:
    """One index per backend and object store (S3 on the SQLite index)."""
    return index_for_store(module_index_url, module_store)


@dataclass
class Sites:
    server: HttpImag
    db: Database
    token: str  # radiologist of site A
    study: dict[str, str]  # site → Study Instance UID
    series: dict[str, str]
    sop: dict[str, str]
    patient: dict[str, str]  # site → Patient ID
    scp_port: int  # the site-A peer's storage SCP (C-MOVE destination)

    def last_audit_id(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[dict]:
        rows = self.db.query(
            "SELECT id, actor, action, outcome, status, study_uid, patient_id, detail "
            "FROM audit WHERE id > ? ORDER BY id",
            (last,),
        )
        keys = ["id", "actor", "action", "outcome", "status", "study", "patient", "detail"]
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def get(self, path: str, session: requests.Session | None = None) -> requests.Response:
        return (session or requests).get(
            self.server.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )


@pytest.fixture(scope="module")
def sites(
    index_url: str, module_store: StoreUnderTest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sites]:
    scp_port = free_port()
    peers = [{"aet": "SITE_A", "host": HOST, "port": scp_port, "site": "A"}]
    settings = {
        "IMAG_DICOM_PEERS": json.dumps(peers),
        "IMAG_DICOM_ACCEPT_UNKNOWN": "false",
        "IMAG_AUTH_MAX_FAILURES": "100000",
        **module_store.settings(),
        **module_store.env,
    }
    with running_imag(
        tmp_path_factory.mktemp("imag"), index_url=index_url, dicom=True, settings=settings
    ) as server:
        done = imag_cli(server, "user", "add", "rad-a", "--role", "radiologist", "--site", "A")
        assert done.returncode == 0, done.stderr
        token = new_token(server, "rad-a")
        study, series, sop, patient = {}, {}, {}, {}
        for site in "AB":
            study[site], series[site] = generate_uid(), generate_uid()
            data = make_instance(study=study[site], series=series[site])
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
            sop[site], patient[site] = str(ds.SOPInstanceUID), str(ds.PatientID)
            body, headers = stow_body(data)
            answer = server.http.post(
                server.dicomweb + "/studies",
                data=body,
                headers=headers | {"X-IMAG-Site": site},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
        db = open_database(index_url)
        try:
            yield Sites(server, db, token, study, series, sop, patient, scp_port)
        finally:
            db.close()


# -- DICOM peers (pynetdicom) -----------------------------------------------------------------


def c_find(sites: Sites, level: str, **keys: str) -> list[tuple[int, Dataset | None]]:
    """(status, identifier) of every response to one C-FIND."""
    ae = AE(ae_title="SITE_A")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, sites.server.dicom_port, ae_title=sites.server.aet)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = level
    query.StudyInstanceUID = ""
    query.PatientName = ""
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    try:
        return [
            (int(status.Status), identifier)
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
        ]
    finally:
        assoc.release()
        ae.shutdown()


def c_get(sites: Sites, study: str) -> tuple[Dataset, list[str]]:
    """The final C-GET response and the instances received."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="SITE_A")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        HOST,
        sites.server.dicom_port,
        ae_title=sites.server.aet,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        responses = [
            s for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
        ]
    finally:
        assoc.release()
        ae.shutdown()
    return responses[-1], received


def c_move(sites: Sites, study: str) -> tuple[Dataset, list[str]]:
    """The final C-MOVE response and the instances the destination received."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="SITE_A")
    scp.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    scp.add_supported_context("1.2.840.10008.1.1")
    listener = scp.start_server(
        (HOST, sites.scp_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        ae = AE(ae_title="SITE_A")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate(HOST, sites.server.dicom_port, ae_title=sites.server.aet)
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        try:
            responses = [
                s
                for s, _ in assoc.send_c_move(
                    query, "SITE_A", StudyRootQueryRetrieveInformationModelMove
                )
            ]
        finally:
            assoc.release()
            ae.shutdown()
    finally:
        listener.shutdown()
    return responses[-1], received


# -- a look-up by UID of another site's study -------------------------------------------------


def _http_lookup(path: str, absent: int) -> object:
    """A GET of ``path`` naming site B's UIDs, answered as if nothing were
    there: ``absent`` 200 (a search: no match) or 404."""

    def run(sites: Sites) -> None:
        answer = sites.get(
            path.format(study=sites.study["B"], series=sites.series["B"], sop=sites.sop["B"])
        )
        assert answer.status_code == absent, answer.text
        if absent == 200:
            assert answer.json() == []  # no match, no hint
        else:
            assert "application/dicom" not in answer.headers.get("Content-Type", "")

    return run


def _c_find_lookup(level: str, keyword: str, which: str) -> object:
    def run(sites: Sites) -> None:
        uid = {"study": sites.study, "series": sites.series, "sop": sites.sop}[which]["B"]
        responses = c_find(sites, level, **{keyword: uid})
        assert responses == [(0x0000, None)]  # no match, no hint

    return run


def _c_get_lookup(sites: Sites) -> None:
    final, received = c_get(sites, sites.study["B"])
    assert final.Status == 0x0000 and received == []


def _c_move_lookup(sites: Sites) -> None:
    final, received = c_move(sites, sites.study["B"])
    assert final.Status == 0x0000 and received == []


LOOKUPS = {
    "qido-study": ("qido.search", _http_lookup("/dicom-web/studies?StudyInstanceUID={study}", 200)),
    "qido-series": (
        "qido.search",
        _http_lookup("/dicom-web/series?SeriesInstanceUID={series}", 200),
    ),
    "qido-instance": (
        "qido.search",
        _http_lookup("/dicom-web/instances?SOPInstanceUID={sop}", 200),
    ),
    "qido-study-path": ("qido.search", _http_lookup("/dicom-web/studies/{study}/series", 200)),
    "wado-rs-retrieve": ("wado.retrieve", _http_lookup("/dicom-web/studies/{study}", 404)),
    "wado-rs-series-metadata": (
        "wado.metadata",
        _http_lookup("/dicom-web/studies/{study}/series/{series}/metadata", 404),
    ),
    "wado-uri": (
        "wado-uri.retrieve",
        _http_lookup(
            "/dicom-web/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
            "&objectUID={sop}&contentType=application/dicom",
            404,
        ),
    ),
    "c-find-study": ("dicom.c-find", _c_find_lookup("STUDY", "StudyInstanceUID", "study")),
    "c-find-series": ("dicom.c-find", _c_find_lookup("SERIES", "SeriesInstanceUID", "series")),
    "c-find-image": ("dicom.c-find", _c_find_lookup("IMAGE", "SOPInstanceUID", "sop")),
    "c-get": ("dicom.c-get", _c_get_lookup),
    "c-move": ("dicom.c-move", _c_move_lookup),
}


@pytest.mark.parametrize("lookup", list(LOOKUPS))
def test_a_look_up_by_uid_of_another_sites_study_is_audited_denied_with_that_study(
    sites: Sites, lookup: str
) -> None:
    action, run = LOOKUPS[lookup]
    last = sites.last_audit_id()
    run(sites)  # type: ignore[operator]
    [entry] = sites.audit_since(last)
    assert (entry["action"], entry["outcome"]) == (action, "denied"), entry
    assert entry["actor"] == ("SITE_A" if action.startswith("dicom.") else "rad-a")
    assert entry["study"] == sites.study["B"]
    assert entry["patient"] == sites.patient["B"]
    # the attempt is found by study, as an auditor looks for it
    done = imag_cli(sites.server, "audit", "--json", "--study", sites.study["B"])
    assert done.returncode == 0, done.stderr
    found = [json.loads(line) for line in done.stdout.splitlines()]
    assert entry["id"] in {e["id"] for e in found}
    # and the caller's own study is still there for it
    own = sites.get(f"/dicom-web/studies?StudyInstanceUID={sites.study['A']}")
    assert len(own.json()) == 1
    assert requests.get(sites.server.url + "/health", timeout=10).status_code == 200


def test_a_look_up_of_a_uid_that_is_nowhere_is_not_denied(sites: Sites) -> None:
    last = sites.last_audit_id()
    answer = sites.get(f"/dicom-web/studies?StudyInstanceUID={generate_uid()}")
    assert answer.json() == []
    [entry] = sites.audit_since(last)
    assert (entry["outcome"], entry["study"]) == ("allowed", None)
    final, _ = c_get(sites, generate_uid())
    [entry] = sites.audit_since(last + 1)
    assert (entry["outcome"], entry["study"]) == ("failed", None)


# -- the audit trail unwritable ---------------------------------------------------------------

_TRIGGER = "imag_test_audit_unwritable"


@contextmanager
def audit_unwritable(db: Database) -> Iterator[None]:
    """Every INSERT into the audit table fails, in the real index, until the block ends."""
    if db.dialect == "sqlite":
        db.execute(
            f"CREATE TRIGGER {_TRIGGER} BEFORE INSERT ON audit "
            "BEGIN SELECT RAISE(ABORT, 'audit table unwritable (test)'); END"
        )
        drop = [f"DROP TRIGGER {_TRIGGER}"]
    else:
        db.execute(
            f"CREATE FUNCTION {_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'audit table unwritable (test)'; END $$"
        )
        db.execute(
            f"CREATE TRIGGER {_TRIGGER} BEFORE INSERT ON audit "
            f"FOR EACH ROW EXECUTE FUNCTION {_TRIGGER}()"
        )
        drop = [f"DROP TRIGGER {_TRIGGER} ON audit", f"DROP FUNCTION {_TRIGGER}()"]
    try:
        yield
    finally:
        for statement in drop:
            db.execute(statement)


def metric(sites: Sites, name: str) -> float:
    text = sites.server.http.get(sites.server.url + "/metrics", timeout=10).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


HTTP_ROUTES = {
    "qido": "/dicom-web/studies?StudyInstanceUID={study}",
    "wado-rs-retrieve (streamed)": "/dicom-web/studies/{study}",
    "wado-rs-metadata": "/dicom-web/studies/{study}/metadata",
    "wado-uri": (
        "/dicom-web/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
        "&objectUID={sop}&contentType=application/dicom"
    ),
    "whoami": "/whoami",
}


def test_with_the_audit_trail_unwritable_http_answers_503_and_no_data(sites: Sites) -> None:
    failures = metric(sites, "imag_audit_write_failures_total")
    rows = sites.last_audit_id()
    session = requests.Session()  # one kept-alive connection: every answer framed right
    with audit_unwritable(sites.db):
        for name, path in HTTP_ROUTES.items():
            answer = sites.get(
                path.format(study=sites.study["A"], series=sites.series["A"], sop=sites.sop["A"]),
                session,
            )
            assert answer.status_code == 503, (name, answer.status_code, answer.content[:200])
            assert answer.headers["Content-Type"].startswith("application/problem+json"), name
            assert "audit trail cannot be written" in answer.json()["detail"], name
            assert sites.patient["A"].encode() not in answer.content
        # unauthenticated requests are refused too (their audit row cannot be written)
        anonymous = requests.get(sites.server.url + "/whoami", timeout=10)
        assert anonymous.status_code == 503
        assert requests.get(sites.server.url + "/health", timeout=10).status_code == 200
    assert sites.last_audit_id() == rows  # nothing was written, nothing was served
    assert "audit entry could not be written; the access is refused" in sites.server.log()
    # writable again: served and audited as before, on the same connection
    answer = sites.get(f"/dicom-web/studies/{sites.study['A']}", session)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("multipart/related")
    [entry] = sites.audit_since(rows)
    assert (entry["action"], entry["outcome"], entry["status"]) == ("wado.retrieve", "allowed", 200)
    assert metric(sites, "imag_audit_write_failures_total") >= failures + len(HTTP_ROUTES) + 1


def test_with_the_audit_trail_unwritable_dicom_refuses_find_get_and_move(sites: Sites) -> None:
    rows = sites.last_audit_id()
    with audit_unwritable(sites.db):
        found = c_find(sites, "STUDY", StudyInstanceUID=sites.study["A"])
        assert len(found) == 1, found  # the refusal only, no match
        status, identifier = found[0]
        assert status == 0xA700 and identifier is None
        final, received = c_get(sites, sites.study["A"])
        assert final.Status == 0xA702
        assert final.ErrorComment == AUDIT_REFUSAL
        assert received == []
        final, received = c_move(sites, sites.study["A"])
        assert final.Status == 0xA702
        assert final.ErrorComment == AUDIT_REFUSAL
        assert received == []
        # strangers are still turned away: the server answers A-ASSOCIATE-RJ
        # (permanent, service user, calling AE title not recognised).  Read
        # from the PDUs the client received, not from assoc.is_rejected: on a
        # loaded machine pynetdicom's requestor thread can check its socket
        # after the whole exchange is over and the transport closed, take
        # that for "failed to connect" and abort (acse.py,
        # _negotiate_as_requestor: `if not socket._is_connected`), as it did
        # in three runs, its log showing the A-ASSOCIATE-RJ received
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        received_pdus: list = []
        assoc = ae.associate(
            HOST,
            sites.server.dicom_port,
            ae_title=sites.server.aet,
            evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received_pdus.append(event.pdu))],
        )
        assert not assoc.is_established
        [rejection] = received_pdus
        assert isinstance(rejection, A_ASSOCIATE_RJ), rejection
        assert (rejection.result, rejection.source, rejection.reason_diagnostic) == (1, 1, 3)
        ae.shutdown()
    assert sites.last_audit_id() == rows
    # writable again: found, retrieved and audited
    found = c_find(sites, "STUDY", StudyInstanceUID=sites.study["A"])
    assert [s for s, _ in found] == [0xFF00, 0x0000]
    final, received = c_get(sites, sites.study["A"])
    assert final.Status == 0x0000 and received == [sites.sop["A"]]
    assert [e["action"] for e in sites.audit_since(rows)] == ["dicom.c-find", "dicom.c-get"]


def test_c_find_refusal_carries_the_reason(sites: Sites, tmp_path: Path) -> None:
    """dcmtk's findscu shows the refusal and its comment to the operator."""
    from tests.dicomnet import run_tool

    with audit_unwritable(sites.db):
        run = run_tool(
            "findscu",
            "-S",
            "-d",
            "-aec",
            sites.server.aet,
            "-aet",
            "SITE_A",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={sites.study['A']}",
            HOST,
            str(sites.server.dicom_port),
        )
    assert "0xa700: Refused: Out of resources" in run.stdout, run.stdout
    assert "audit trail cannot be written" in run.stdout
    assert sites.patient["A"] not in run.stdout
