"""A validated report is an instance like any other: a workstation that
retrieves the study by C-GET receives the structured report and the PDF
beside the images, and finds their series by C-FIND.

A real ``imag serve`` (its own job workers store the report), a pynetdicom
SCU as the regional workstation, and the report made over ``/api/worklist``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests.dicomfiles import make_instance
from tests.httpserver import HttpImag, running_imag
from tests.processes import HOST, eventually

FIELDS = {
    "requesting_physician": "Dr Anne Lefèvre",
    "clinical_context": "Céphalées brutales",
    "question": "Hémorragie méningée ?",
    "anatomical_region": "Crâne",
    "contraindications": "aucune",
    "exam_type": "Scanner cérébral sans injection",
    "patient_consent": True,
}
REPORT = {
    "indications": "Céphalées brutales depuis 2 heures.",
    "technique": "Acquisition hélicoïdale sans injection.",
    "results": "Pas d'hyperdensité des espaces sous-arachnoïdiens.",
    "conclusion": "Pas d'hémorragie méningée visible.",
    "reader_name": "Dr Étienne Martin",
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HttpImag]:
    peers = [{"aet": "WORKSTATION", "host": HOST, "port": 1, "regional": True}]
    settings = {"IMAG_DICOM_PEERS": json.dumps(peers), "IMAG_DICOM_ACCEPT_UNKNOWN": "false"}
    with running_imag(tmp_path / "imag", dicom=True, settings=settings) as imag:
        yield imag


def api(server: HttpImag, method: str, path: str, **kwargs: object) -> requests.Response:
    headers = {"Authorization": f"Bearer {server.token}", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    return requests.request(method, server.url + path, headers=headers, timeout=60, **kwargs)


def c_get(server: HttpImag, study: str) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of what a C-GET of the study delivers."""
    received: dict[str, str] = {}

    def on_store(event: evt.Event) -> int:
        received[str(event.dataset.SOPInstanceUID)] = str(event.dataset.SOPClassUID)
        return 0x0000

    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    storage = (CTImageStorage, ComprehensiveSRStorage, EncapsulatedPDFStorage)
    for sop_class in storage:
        ae.add_requested_context(sop_class)
    assoc = ae.associate(
        HOST,
        server.dicom_port,
        ae_title=server.aet,
        ext_neg=[build_role(c, scp_role=True) for c in storage],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        statuses = [
            s.Status
            for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            if s
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    return received


def series_modalities(server: HttpImag, study: str) -> set[str]:
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, server.dicom_port, ae_title=server.aet)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study
    query.Modality = ""
    try:
        found = {
            str(ds.Modality)
            for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status in (0xFF00, 0xFF01) and ds is not None
        }
    finally:
        assoc.release()
    return found


def test_a_validated_report_comes_with_the_study_by_c_get_and_c_find(server: HttpImag) -> None:
    study = generate_uid()
    images = [make_instance(study=study) for _ in range(2)]
    for data in images:
        stored = api(
            server,
            "POST",
            "/dicom-web/studies",
            data=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n",
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
        assert stored.status_code == 200, stored.text
    created = api(
        server,
        "POST",
        "/api/worklist/requests",
        json={"study_uid": study, "site": "", "fields": FIELDS, "priority": "STAT"},
    )
    assert created.status_code == 201, created.text
    uid = created.json()["uid"]
    claimed = api(server, "POST", f"/api/worklist/requests/{uid}/claim")
    assert claimed.status_code == 200, claimed.text
    tx = {"X-Transaction-UID": claimed.json()["transaction_uid"]}
    report = f"/api/worklist/requests/{uid}/report"
    assert api(server, "PUT", report, json=REPORT, headers=tx).status_code == 200
    validated = api(server, "POST", report + "/validate", headers=tx)
    assert validated.status_code == 200, validated.text

    def stored() -> dict | None:
        (version,) = api(server, "GET", report).json()["versions"]
        return version if version["stored"] else None

    version = eventually(stored, timeout=60, what="the report stored by the server's jobs")
    received = c_get(server, study)
    assert received[version["sr"]["sop_instance_uid"]] == ComprehensiveSRStorage
    assert received[version["pdf"]["sop_instance_uid"]] == EncapsulatedPDFStorage
    assert len(received) == len(images) + 2
    assert {"SR", "DOC"} <= series_modalities(server, study)
