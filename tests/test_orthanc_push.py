"""Orthanc pushing to IMAG through its own REST API (issue 17's acceptance).

A real Orthanc (Debian ``orthanc``) declares IMAG as its DICOM modality
``imag`` and IMAG declares Orthanc's AE title as a peer; a mixed set
(implicit, explicit, big endian, deflated, RLE and JPEG 2000 lossless) is
uploaded to Orthanc and pushed with ``POST /modalities/imag/store``, once
synchronously and once as an asynchronous job.  Every object must arrive
with the data set Orthanc holds, byte for byte after the file meta (which
each receiver writes itself), in the transfer syntax Orthanc sent it in,
through the lean receive path (its association log lines say
``path=lean``).  The adversary is an Orthanc calling with an AE title IMAG
does not know: its push fails in Orthanc's answer, nothing is stored, and
the refusal is audited once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from archive.index import open_database
from archive.synthetic import StudySpec, generate_mixed_set, modality_preset, write_study
from benchmarks import orthanc as orthanc_process
from tests.audittrail import AuditCursor
from tests.dicomnet import HOST, SERVER_AET, ImagServer, split_part10
from tests.processes import eventually
from tests.test_dimse_lean import (
    assert_stored_as_sent,
    detail,
    field,
    index_rows,
    lean_lines,
    pynetdicom_lines,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

ORTHANC_AET = "ORTHANC_PUSH"
#: what the mixed set must cover for the push to prove anything
SYNTAXES = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
}


@dataclass
class Push:
    server: ImagServer
    audit: AuditCursor
    orthanc: str  #: Orthanc's REST API URL
    ids: dict[str, str]  #: Orthanc's instance id by SOP Instance UID
    studies: list[list[str]]  #: the set's SOP Instance UIDs, study by study

    def rest(self, method: str, path: str, body: object = None) -> requests.Response:
        return requests.request(
            method,
            self.orthanc + path,
            data=body if body is None or isinstance(body, bytes) else json.dumps(body),
            timeout=120,
        )

    def orthanc_files(self, uids: list[str], folder: Path) -> dict[str, Path]:
        """The objects as Orthanc holds them (GET /instances/{id}/file), saved."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for uid in uids:
            answer = self.rest("GET", f"/instances/{self.ids[uid]}/file")
            answer.raise_for_status()
            files[uid] = folder / f"{uid}.dcm"
            files[uid].write_bytes(answer.content)
        return files

    def stored_uids(self) -> set[str]:
        return {row[0] for row in index_rows(self.server, "SELECT sop_instance_uid FROM instances")}


@pytest.fixture(scope="module")
def push(module_index_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Push]:
    """IMAG with Orthanc's AE as a peer, Orthanc with IMAG as modality
    ``imag`` (and ``imag-as-stranger``, the same IMAG called by an AE title
    IMAG does not know), the mixed set uploaded to Orthanc."""
    if not orthanc_process.available():
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    folder = tmp_path_factory.mktemp("orthanc-push")
    generate_mixed_set(folder / "set", studies=6, seed=29)
    server = ImagServer(
        folder / "imag",
        module_index_url,
        [{"aet": ORTHANC_AET, "host": HOST, "site": "ORTHANC"}],
        settings={"dicom": {"lean_store": True}},
    ).start()
    db = open_database(module_index_url)
    modality = [SERVER_AET, HOST, server.dicom_port]
    config = {
        "DicomAet": ORTHANC_AET,
        "StorageCompression": False,
        "DicomModalities": {
            "imag": modality,
            "imag-as-stranger": {
                "AET": SERVER_AET,
                "Host": HOST,
                "Port": server.dicom_port,
                "LocalAet": "STRANGER",
            },
        },
    }
    try:
        with orthanc_process.running_orthanc(config) as orthanc:
            ids: dict[str, str] = {}
            studies: dict[str, list[str]] = {}
            for path in sorted((folder / "set").iterdir()):
                answer = requests.post(
                    orthanc.http_url + "/instances", data=path.read_bytes(), timeout=60
                )
                answer.raise_for_status()
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                uid = str(ds.SOPInstanceUID)
                ids[uid] = answer.json()["ID"]
                studies.setdefault(str(ds.StudyInstanceUID), []).append(uid)
            yield Push(server, AuditCursor(db), orthanc.http_url, ids, list(studies.values()))
    finally:
        db.close()
        code = server.stop()
        assert code == 0, f"imag serve exited {code} on SIGTERM:\n{server.log()}"


def pushed_syntaxes(files: dict[str, Path]) -> set[str]:
    return {split_part10(path.read_bytes())[0] for path in files.values()}


def assert_served_lean(push: Push, before: int, count: int) -> None:
    """Orthanc's associations of the push (it opens another one when the next
    objects need other presentation contexts) were served by the lean path,
    and stored ``count`` objects between them; none went to pynetdicom."""

    def lines() -> list[str]:
        new = lean_lines(push.server)[before:]
        return new if sum(int(field(ln, "stored")) for ln in new) >= count else []

    new = eventually(lines, what="the push's association log lines (path=lean)")
    assert sum(int(field(ln, "stored")) for ln in new) == count
    assert {(field(ln, "calling_aet"), field(ln, "outcome")) for ln in new} == {
        (ORTHANC_AET, "released")
    }
    assert not pynetdicom_lines(push.server)


def test_orthanc_store_synchronous_arrives_bit_identical_through_the_lean_path(
    push: Push, tmp_path: Path
) -> None:
    uids = [uid for study in push.studies[:3] for uid in study]
    before = len(lean_lines(push.server))
    push.audit.new_rows()
    answer = push.rest(
        "POST",
        "/modalities/imag/store",
        {"Resources": [push.ids[uid] for uid in uids], "Synchronous": True},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["InstancesCount"], body["FailedInstancesCount"]) == (len(uids), 0), body
    files = push.orthanc_files(uids, tmp_path / "orthanc")
    assert_stored_as_sent(push.server, files)
    assert_served_lean(push, before, len(uids))
    stores = [r for r in push.audit.new_rows() if r["action"] == "dicom.c-store"]
    assert sorted(detail(r)["instances"][0] for r in stores) == sorted(uids)
    assert {(r["actor"], r["outcome"]) for r in stores} == {(ORTHANC_AET, "allowed")}


def test_orthanc_store_as_an_asynchronous_job_arrives_bit_identical_through_the_lean_path(
    push: Push, tmp_path: Path
) -> None:
    uids = [uid for study in push.studies[3:] for uid in study]
    before = len(lean_lines(push.server))
    answer = push.rest(
        "POST",
        "/modalities/imag/store",
        {"Resources": [push.ids[uid] for uid in uids], "Asynchronous": True},
    )
    assert answer.status_code == 200, answer.text
    job = answer.json()["ID"]

    def finished() -> dict | None:
        state = push.rest("GET", f"/jobs/{job}").json()
        return state if state["State"] in ("Success", "Failure") else None

    state = eventually(finished, timeout=120, what=f"Orthanc's job {job}", interval=0.2)
    assert state["State"] == "Success", state
    files = push.orthanc_files(uids, tmp_path / "orthanc")
    assert_stored_as_sent(push.server, files)
    assert_served_lean(push, before, len(uids))


def test_the_pushed_set_covers_every_kind_of_transfer_syntax(push: Push, tmp_path: Path) -> None:
    """What the two pushes above prove holds for each of these syntaxes."""
    every = [uid for study in push.studies for uid in study]
    assert pushed_syntaxes(push.orthanc_files(every, tmp_path)) >= SYNTAXES


def test_an_orthanc_calling_with_an_unknown_ae_title_is_refused_and_nothing_is_stored(
    push: Push, tmp_path: Path
) -> None:
    spec = StudySpec(
        patient_id="STRANGER01",
        patient_name="STRANGER^Push",
        series=[modality_preset("CT", rows=16, columns=16, instances=1)],
    )
    (path,) = write_study(spec, tmp_path, seed=31)
    uploaded = push.rest("POST", "/instances", path.read_bytes())
    uploaded.raise_for_status()
    stored = push.stored_uids()
    push.audit.new_rows()
    answer = push.rest(
        "POST",
        "/modalities/imag-as-stranger/store",
        {"Resources": [uploaded.json()["ID"]], "Synchronous": True},
    )
    assert answer.status_code >= 400, answer.text
    assert push.stored_uids() == stored
    assert (
        "association rejected: calling AE title 'STRANGER' is not a configured peer"
        in push.server.log()
    )
    denied = [r for r in push.audit.new_rows() if r["action"] == "dicom.associate"]
    assert [(r["actor"], r["outcome"]) for r in denied] == [("STRANGER", "denied")]
