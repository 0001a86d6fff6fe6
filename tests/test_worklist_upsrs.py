"""UPS-RS (``/dicom-web/workitems``) is the same worklist as ``/api/worklist``:
a reporting tool that speaks only UPS searches, claims under its own
Transaction UID and completes, and the REST API sees each step; each change
the state refuses is its UPS status as HTTP status and ``Warning`` header;
another group's reader finds nothing; a malformed dataset stores nothing.

The application is the one ``imag serve`` runs, in process (tests/inprocess.py),
on SQLite and PostgreSQL, with a FakeClock, real accounts and tokens, a rota
that puts ``garde-nord`` on call for site-a, and a study of site-a stored
through STOW-RS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import Dataset
from pydicom.uid import generate_uid

from archive.clock import FakeClock
from archive.security.principals import Principals
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag, serving_in_process
from worklist.requests import Duplicate, RequestInvalid, Viewer, Worklist
from worklist.ups import IN_PROGRESS

START = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
SITES = [
    {"name": "site-a", "time_zone": "Europe/Paris", "region": "nord"},
    {"name": "site-b", "time_zone": "Europe/Paris", "region": "nord"},
]
SETTINGS = {"IMAG_SITES": json.dumps(SITES), "IMAG_LOG_LEVEL": "WARNING"}
WORKITEMS = "/dicom-web/workitems"
DICOM_JSON = {"Content-Type": "application/dicom+json", "Accept": "application/dicom+json"}
#: the users: role, sites, reading groups
USERS = {
    "manip.a": ("technician", ["site-a"], []),
    "manip.b": ("technician", ["site-b"], []),
    "dr.martin": ("radiologist", [], ["garde-nord"]),
    "dr.durand": ("radiologist", [], ["garde-nord"]),
    "dr.sud": ("radiologist", [], ["garde-sud"]),
}
FIELDS = {
    "requesting_physician": "Dr Anne Lefèvre",
    "clinical_context": "Chute, douleur de hanche droite",
    "question": "Fracture du col ?",
    "anatomical_region": "Hanche droite",
    "contraindications": "aucune",
    "exam_type": "Radiographie du bassin",
    "patient_consent": True,
}


def code(value: str, scheme: str, meaning: str) -> dict:
    return {
        "00080100": {"vr": "SH", "Value": [value]},
        "00080102": {"vr": "SH", "Value": [scheme]},
        "00080104": {"vr": "LO", "Value": [meaning]},
    }


def ups_dataset(study_uid: str, **change: Any) -> dict:
    """A Create Workitem dataset as a reporting site's system sends it."""
    f = {**FIELDS, **change.pop("fields", {})}
    request = {
        "0020000D": {"vr": "UI", "Value": [study_uid]},
        "00321032": {"vr": "PN", "Value": [{"Alphabetic": f["requesting_physician"]}]},
        "00401002": {"vr": "LO", "Value": [f["question"]]},
        "00321060": {"vr": "LO", "Value": [f["exam_type"]]},
    }
    parameters = [
        {
            "0040A040": {"vr": "CS", "Value": ["TEXT"]},
            "0040A043": {"vr": "SQ", "Value": [code("123014", "DCM", "Target Region")]},
            "0040A160": {"vr": "UT", "Value": [f["anatomical_region"]]},
        }
    ]
    if f["patient_consent"]:
        parameters.append(
            {
                "0040A040": {"vr": "CS", "Value": ["CODE"]},
                "0040A043": {
                    "vr": "SQ",
                    "Value": [code("122004", "DCM", "Patient informed consent given")],
                },
                "0040A168": {"vr": "SQ", "Value": [code("373066001", "SCT", "Yes")]},
            }
        )
    ds = {
        "00741000": {"vr": "CS", "Value": ["SCHEDULED"]},
        "00741200": {"vr": "CS", "Value": [change.pop("priority", "HIGH")]},
        "001021B0": {"vr": "LT", "Value": [f["clinical_context"]]},
        "00102000": {"vr": "LO", "Value": [f["contraindications"]]},
        "00404021": {"vr": "SQ", "Value": [{"0020000D": {"vr": "UI", "Value": [study_uid]}}]},
        "0040A370": {"vr": "SQ", "Value": [request]},
        "00741210": {"vr": "SQ", "Value": parameters},
    }
    ds.update(change.pop("extra", {}))
    for tag in change.pop("drop", ()):
        ds.pop(tag, None)
    assert not change, change
    return ds


@dataclass
class World:
    server: InProcessImag
    clock: FakeClock
    tokens: dict[str, str]
    study: str

    @property
    def db(self) -> Any:
        assert self.server.archive is not None
        return self.server.archive.db

    def call(self, user: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}", **kwargs.pop("headers", {})}
        return requests.request(
            method, self.server.url + path, headers=headers, timeout=30, **kwargs
        )

    def ups(
        self, user: str, method: str, path: str, body: Any = None, **kw: Any
    ) -> requests.Response:
        data = (
            None if body is None else (body if isinstance(body, str | bytes) else json.dumps(body))
        )
        return self.call(user, method, WORKITEMS + path, data=data, headers=DICOM_JSON, **kw)

    def create(self, user: str = "manip.a", **change: Any) -> str:
        answer = self.ups(user, "POST", "", ups_dataset(self.study, **change))
        assert answer.status_code == 201, answer.text
        return answer.headers["Location"].rsplit("/", 1)[1]

    def state(self, user: str, uid: str, state: str, tx: str | None) -> requests.Response:
        body: dict = {"00741000": {"vr": "CS", "Value": [state]}}
        if tx:
            body["00081195"] = {"vr": "UI", "Value": [tx]}
        return self.ups(user, "PUT", f"/{uid}/state", body)

    def rest(self, user: str, uid: str) -> dict:
        answer = self.call(user, "GET", f"/api/worklist/requests/{uid}")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def last_audit(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[dict]:
        rows = self.db.query(
            "SELECT actor, action, outcome, status, study_uid, detail FROM audit WHERE id > ? "
            "ORDER BY id",
            (last,),
        )
        keys = ("actor", "action", "outcome", "status", "study", "detail")
        return [
            dict(zip(keys, (*row[:5], json.loads(row[5] or "{}")), strict=True)) for row in rows
        ]

    def stored(self) -> list[tuple]:
        return self.db.query("SELECT uid, state, fields, transaction_uid FROM read_requests")


def stow(server: InProcessImag, site: str, **patient: str) -> str:
    study = generate_uid()

    def edit(ds: Dataset) -> None:
        for keyword, value in patient.items():
            setattr(ds, keyword, value)

    data = make_instance(edit, study=study)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    headers = {
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
        "X-IMAG-Site": site,
    }
    answer = server.http.post(server.dicomweb + "/studies", data=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return study


@pytest.fixture
def world(tmp_path: Path, index_url: str) -> Iterator[World]:
    clock = FakeClock(START)
    with serving_in_process(
        tmp_path / "imag", index_url=index_url, settings=SETTINGS, clock=clock
    ) as server:
        assert server.archive is not None
        principals = Principals(server.archive.db)
        tokens = {"admin": server.token}
        for user, (role, sites, groups) in USERS.items():
            principals.add(user, role, sites=sites, groups=groups)
            tokens[user] = principals.create_token(user)[1]
        world = World(server, clock, tokens, "")
        orientation = "/api/orientation"
        for name in ("garde-nord", "garde-sud"):
            answer = world.call("admin", "POST", f"{orientation}/groups", json={"name": name})
            assert answer.status_code == 201, answer.text
        for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun"):
            for start, end in (("08:00", "18:30"), ("18:30", "08:00")):
                shift = {"group": "garde-nord", "day": day, "start": start, "end": end}
                answer = world.call("admin", "POST", f"{orientation}/rota/weekly", json=shift)
                assert answer.status_code == 201, answer.text
        world.study = stow(
            server,
            "site-a",
            PatientName="Dupont^Marie",
            PatientID="IPP-0042",
            PatientBirthDate="19480312",
            PatientSex="F",
        )
        yield world


def dataset(answer: requests.Response) -> list[Dataset]:
    assert answer.headers["Content-Type"].startswith("application/dicom+json")
    return [Dataset.from_json(item) for item in answer.json()]


# -- the reporting tool's flow -----------------------------------------------------------------


def test_a_reporting_tool_reads_entirely_in_ups_rs_and_the_rest_api_sees_each_step(
    world: World,
) -> None:
    uid = world.create()
    found = world.ups("dr.martin", "GET", "", params={"ProcedureStepState": "SCHEDULED"})
    assert found.status_code == 200, found.text
    [item] = dataset(found)
    assert item.SOPInstanceUID == uid and item.WorklistLabel == "garde-nord"
    assert item.ScheduledProcedureStepPriority == "HIGH" and item.PatientID == "IPP-0042"
    assert world.rest("dr.martin", uid)["state"] == "SCHEDULED"

    tx = generate_uid()
    last = world.last_audit()
    claimed = world.state("dr.martin", uid, "IN PROGRESS", tx)
    assert claimed.status_code == 200, claimed.text
    [entry] = world.audit_since(last)
    assert (entry["actor"], entry["action"], entry["outcome"]) == (
        "dr.martin",
        "workitems.state",
        "allowed",
    )
    assert entry["study"] == world.study and entry["detail"]["state"] == IN_PROGRESS
    seen = world.rest("dr.martin", uid)
    assert seen["state"] == IN_PROGRESS and seen["performer"] == "dr.martin"
    assert seen["transaction_uid"] == tx  # the client's own UID is the claim's
    [held] = dataset(world.ups("dr.martin", "GET", f"/{uid}"))
    assert held.ProcedureStepState == IN_PROGRESS
    assert held.ScheduledHumanPerformersSequence[0].HumanPerformerName == "dr.martin"
    assert "TransactionUID" not in held
    assert (
        world.ups("dr.martin", "GET", "", params={"ProcedureStepState": "SCHEDULED"}).status_code
        == 204
    )

    world.clock.advance(600)  # the holder's update is activity: the lease runs from now
    progress = {"00741002": {"vr": "SQ", "Value": [{"00741004": {"vr": "DS", "Value": [50]}}]}}
    beat = world.ups("dr.martin", "POST", f"/{uid}", progress, params={"transaction": tx})
    assert beat.status_code == 200, beat.text  # progress: activity, though not kept
    assert "ProcedureStepProgressInformationSequence" in beat.headers["Warning"]
    lease = datetime.fromisoformat(world.rest("dr.martin", uid)["lease_until"])
    assert lease == START + timedelta(seconds=600 + 15 * 60)

    done = world.state("dr.martin", uid, "COMPLETED", tx)
    assert done.status_code == 200, done.text
    seen = world.rest("dr.martin", uid)
    assert seen["state"] == "COMPLETED" and seen["completed_by"] == "dr.martin"
    site_view = world.rest("manip.a", uid)
    assert site_view["state"] == "COMPLETED" and "transaction_uid" not in site_view


def test_a_request_made_on_the_rest_api_is_a_workitem_and_one_made_in_ups_is_a_request(
    world: World,
) -> None:
    body = {"study_uid": world.study, "priority": "URGENT", "fields": FIELDS}
    made = world.call("manip.a", "POST", "/api/worklist/requests", json=body)
    assert made.status_code == 201, made.text
    rest_uid = made.json()["uid"]
    ups_uid = world.create(priority="LOW")
    found = dataset(world.ups("dr.martin", "GET", ""))
    assert [d.SOPInstanceUID for d in found] == [rest_uid, ups_uid]  # URGENT before ROUTINE
    assert [d.ScheduledProcedureStepPriority for d in found] == ["MEDIUM", "LOW"]
    shown = world.rest("dr.martin", ups_uid)
    assert shown["fields"] == FIELDS and shown["group"] == "garde-nord"
    assert shown["site"] == "site-a" and shown["priority"] == "ROUTINE"


# -- refusals ----------------------------------------------------------------------------------


def refused(answer: requests.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert (
        answer.headers["Warning"].startswith("299 ") and f'"{code}: ' in answer.headers["Warning"]
    )
    assert answer.json()["ups_status"] == code


def test_each_change_the_state_refuses_is_its_ups_status_with_a_warning_header(
    world: World,
) -> None:
    uid = world.create()
    mine, theirs = generate_uid(), generate_uid()
    assert world.state("dr.martin", uid, "IN PROGRESS", mine).status_code == 200
    refused(world.state("dr.durand", uid, "IN PROGRESS", theirs), 409, "C302")
    refused(world.state("dr.martin", uid, "COMPLETED", theirs), 409, "C301")
    refused(world.state("dr.martin", uid, "COMPLETED", None), 409, "C301")
    refused(world.state("dr.martin", uid, "SCHEDULED", mine), 409, "C303")
    assert world.state("dr.martin", uid, "COMPLETED", mine).status_code == 200
    again = world.state("dr.martin", uid, "COMPLETED", mine)
    assert again.status_code == 200 and '"B306: ' in again.headers["Warning"]
    refused(world.state("dr.durand", uid, "IN PROGRESS", theirs), 409, "C300")
    refused(world.ups("dr.martin", "GET", f"/{generate_uid()}"), 404, "C307")
    refused(world.state("dr.martin", generate_uid(), "IN PROGRESS", mine), 404, "C307")


def test_another_groups_reader_gets_404_and_an_empty_search_and_the_denial_is_audited(
    world: World,
) -> None:
    uid = world.create()
    last = world.last_audit()
    refused(world.ups("dr.sud", "GET", f"/{uid}"), 404, "C307")
    [entry] = world.audit_since(last)
    assert entry["outcome"] == "denied" and entry["study"] == world.study
    assert world.ups("dr.sud", "GET", "").status_code == 204
    assert world.ups("manip.b", "GET", "").status_code == 204  # another site's user too
    before = world.stored()
    refused(world.state("dr.sud", uid, "IN PROGRESS", generate_uid()), 404, "C307")
    refused(world.ups("manip.b", "POST", f"/{uid}/cancelrequest"), 404, "C307")
    assert world.stored() == before


def test_a_site_user_may_not_claim_and_a_reader_without_the_site_may_not_withdraw(
    world: World,
) -> None:
    uid = world.create()
    before = world.stored()
    assert world.state("manip.a", uid, "IN PROGRESS", generate_uid()).status_code == 403
    assert world.ups("dr.martin", "POST", f"/{uid}/cancelrequest").status_code == 403
    assert world.stored() == before


MALFORMED = {
    "not JSON": "{not json",
    "two datasets": [{}, {}],
    "a PN that is no name": {"00100010": {"vr": "PN", "Value": 7}},
    "an unknown VR": {"00100020": {"vr": "XX", "Value": ["1"]}},
    "a bulk data URI": {"7FE00010": {"vr": "OB", "BulkDataURI": "http://elsewhere/x"}},
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_dicom_json_body_is_400_and_nothing_is_stored(world: World, body: Any) -> None:
    uid = world.create()
    before = world.stored()
    last = world.last_audit()
    answer = world.ups("manip.a", "POST", "", body)
    assert answer.status_code == 400, answer.text
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert world.ups("manip.a", "POST", f"/{uid}", body).status_code == 400
    assert world.ups("dr.martin", "PUT", f"/{uid}/state", body).status_code == 400
    assert world.stored() == before
    assert len(world.audit_since(last)) == 3


def test_a_create_without_the_mandatory_attributes_lists_each_one_and_stores_nothing(
    world: World,
) -> None:
    body = ups_dataset(world.study, fields={"patient_consent": False}, drop=["001021B0"])
    del body["0040A370"]["Value"][0]["00401002"]
    answer = world.ups("manip.a", "POST", "", body)
    assert answer.status_code == 400, answer.text
    names = {p["name"] for p in answer.json()["invalid-params"]}
    assert names == {
        "AdditionalPatientHistory (0010,21B0)",
        "ReferencedRequestSequence>ReasonForTheRequestedProcedure (0040,1002)",
        "ScheduledProcessingParametersSequence>(122004, DCM, Patient informed consent given) "
        "= (373066001, SCT, Yes)",
    }
    wrong = ups_dataset(
        world.study,
        extra={
            "00741000": {"vr": "CS", "Value": ["COMPLETED"]},
            "00081195": {"vr": "UI", "Value": ["1.2.3"]},
            "00404011": {"vr": "DT", "Value": ["20261208120000"]},  # no offset: ambiguous
        },
        priority="SOON",
    )
    answer = world.ups("manip.a", "POST", "", wrong)
    names = {p["name"] for p in answer.json()["invalid-params"]}
    assert names == {
        "ProcedureStepState",
        "TransactionUID",
        "ExpectedCompletionDateTime",
        "ScheduledProcedureStepPriority (0074,1200)",
    }
    assert world.stored() == []


def test_a_client_may_name_its_workitem_once_and_set_its_due_time(world: World) -> None:
    chosen = generate_uid()
    body = ups_dataset(
        world.study, extra={"00404011": {"vr": "DT", "Value": ["20261207180000+0100"]}}
    )
    answer = world.ups("manip.a", "POST", "", body, params={"workitem": chosen})
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"].endswith(f"{WORKITEMS}/{chosen}")
    due = datetime.fromisoformat(world.rest("manip.a", chosen)["due_at"])
    assert due == datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
    again = world.ups("manip.a", "POST", "", body, params={"workitem": chosen})
    assert again.status_code == 409
    assert len(world.stored()) == 1


def test_the_site_corrects_its_scheduled_request_and_not_once_it_is_being_read(
    world: World,
) -> None:
    uid = world.create()
    change = {"00102000": {"vr": "LO", "Value": ["Allergie à l'iode"]}}
    assert world.ups("manip.a", "POST", f"/{uid}", change).status_code == 200
    assert world.rest("manip.a", uid)["fields"]["contraindications"] == "Allergie à l'iode"
    tx = generate_uid()
    assert world.state("dr.martin", uid, "IN PROGRESS", tx).status_code == 200
    refused(world.ups("manip.a", "POST", f"/{uid}", change), 409, "C302")
    assert (
        world.ups("dr.martin", "POST", f"/{uid}", change, params={"transaction": tx}).status_code
        == 409
    )


def test_cancellation_requests_cancel_a_waiting_item_and_mark_one_being_read(
    world: World,
) -> None:
    waiting = world.create()
    assert world.ups("manip.a", "POST", f"/{waiting}/cancelrequest").status_code == 202
    assert world.rest("manip.a", waiting)["state"] == "CANCELED"
    again = world.ups("manip.a", "POST", f"/{waiting}/cancelrequest")
    assert again.status_code == 200 and '"B304: ' in again.headers["Warning"]

    read = world.create()
    assert world.state("dr.martin", read, "IN PROGRESS", generate_uid()).status_code == 200
    reason = {"00741238": {"vr": "LT", "Value": ["Examen refait"]}}
    assert world.ups("manip.a", "POST", f"/{read}/cancelrequest", reason).status_code == 202
    [item] = dataset(world.ups("dr.martin", "GET", f"/{read}"))
    assert item.ProcedureStepState == IN_PROGRESS  # the reader decides
    progress = item.ProcedureStepProgressInformationSequence[0]
    assert progress.ReasonForCancellation == "Examen refait"


# -- the workitem ------------------------------------------------------------------------------


def test_a_workitem_is_dicom_json_pydicom_reads_with_every_field_where_documented(
    world: World,
) -> None:
    uid = world.create()
    [ds] = dataset(world.ups("dr.martin", "GET", f"/{uid}"))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.34.6.1" and ds.SOPInstanceUID == uid
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == (
        "Dupont^Marie",
        "IPP-0042",
        "19480312",
        "F",
    )
    assert ds.ProcedureStepState == "SCHEDULED" and ds.InputReadinessState == "READY"
    assert ds.ScheduledProcedureStepStartDateTime == "20261207100000.000000+0000"
    assert ds.ExpectedCompletionDateTime == "20261207110000.000000+0000"  # STAT: one hour
    task = ds.ScheduledWorkitemCodeSequence[0]
    assert (task.CodeValue, task.CodingSchemeDesignator) == ("110005", "DCM")
    source = ds.InputInformationSequence[0]
    assert source.StudyInstanceUID == world.study
    assert source.RetrieveURL == f"{world.server.url}/dicom-web/studies/{world.study}"
    request = ds.ReferencedRequestSequence[0]
    assert str(request.RequestingPhysician) == FIELDS["requesting_physician"]
    assert request.ReasonForTheRequestedProcedure == FIELDS["question"]
    assert request.RequestedProcedureDescription == FIELDS["exam_type"]
    assert request.RequestingService == "site-a"
    assert ds.AdditionalPatientHistory == FIELDS["clinical_context"]
    assert ds.MedicalAlerts == FIELDS["contraindications"]
    region, consent = ds.ScheduledProcessingParametersSequence
    assert region.TextValue == FIELDS["anatomical_region"]
    assert consent.ConceptCodeSequence[0].CodeValue == "373066001"
    assert "TransactionUID" not in ds


def test_search_matches_patient_priority_and_dates_and_pages_in_reading_order(
    world: World,
) -> None:
    other = stow(world.server, "site-a", PatientID="IPP-0099", PatientName="Martin^Paul")
    routine = world.create(priority="LOW")
    world.clock.advance(3600)
    stat = world.create(priority="HIGH")
    urgent = world.create(priority="MEDIUM")
    world.study, keep = other, world.study
    elsewhere = world.create(priority="LOW")
    world.study = keep

    def uids(**params: str) -> list[str]:
        answer = world.ups("dr.martin", "GET", "", params=params)
        if answer.status_code == 204:
            return []
        assert answer.status_code == 200, answer.text
        return [d.SOPInstanceUID for d in dataset(answer)]

    assert uids() == [stat, urgent, routine, elsewhere]
    assert uids(PatientID="IPP-0099") == [elsewhere]
    assert uids(**{"00100020": "IPP-00*"}) == [stat, urgent, routine, elsewhere]
    assert uids(ScheduledProcedureStepPriority="HIGH,MEDIUM") == [stat, urgent]
    assert uids(ScheduledProcedureStepStartDateTime="20261207105959-") == [stat, urgent, elsewhere]
    assert uids(ScheduledProcedureStepStartDateTime="-202612071000") == [routine]
    assert uids(ExpectedCompletionDateTime="20261207") == [stat, urgent]  # due today
    assert uids(WorklistLabel="garde-sud") == []
    assert uids(limit="2", offset="1") == [urgent, routine]
    assert uids(**{"InputInformationSequence.StudyInstanceUID": other}) == [elsewhere]

    short = world.ups("dr.martin", "GET", "", params={"limit": "1"}).json()[0]
    assert "0040A370" not in short  # the request's details come when asked for
    asked = world.ups(
        "dr.martin", "GET", "", params={"limit": "1", "includefield": "ReferencedRequestSequence"}
    ).json()[0]
    assert "0040A370" in asked and "00741210" not in asked
    assert "00741210" in world.ups("dr.martin", "GET", "", params={"includefield": "all"}).json()[0]

    ignored = world.ups("dr.martin", "GET", "", params={"StudyDescription": "x"})
    assert ignored.status_code == 200 and "StudyDescription" in ignored.headers["Warning"]
    for bad in (
        {"NoSuchKeyword": "1"},
        {"limit": "0"},
        {"ProcedureStepState": "DONE"},
        {"ExpectedCompletionDateTime": "yesterday"},
    ):
        answer = world.ups("dr.martin", "GET", "", params=bad)
        assert answer.status_code == 400, (bad, answer.text)
        assert {p["name"] for p in answer.json()["invalid-params"]} == set(bad)


def test_search_matches_patient_names_without_case_and_with_fuzzymatching_without_accents(
    world: World,
) -> None:
    """A radiologist looks a workitem up by the patient's name as typed:
    case does not matter, and ``fuzzymatching=true`` finds CÔTÉ from
    ``cote`` (French names).  Another group's reader finds nothing by it."""
    accented = stow(
        world.server,
        "site-a",
        SpecificCharacterSet="ISO_IR 192",
        PatientID="IPP-0100",
        PatientName="Côté^Élise",
    )
    plain = world.create()  # Dupont^Marie
    world.study, keep = accented, world.study
    cote = world.create()
    world.study = keep

    def uids(user: str = "dr.martin", **params: str) -> list[str]:
        answer = world.ups(user, "GET", "", params=params)
        if answer.status_code == 204:
            return []
        assert answer.status_code == 200, answer.text
        return [d.SOPInstanceUID for d in dataset(answer)]

    assert uids(PatientName="dupont*") == [plain]
    assert uids(PatientName="Dupont^Marie^^") == [plain]  # empty components ignored
    assert uids(PatientName="*cote*") == []  # accents count without fuzzymatching
    assert uids(PatientName="côté*") == [cote]
    assert uids(PatientName="*cote*", fuzzymatching="true") == [cote]
    assert uids(PatientName="c?te^elise", fuzzymatching="true") == [cote]
    assert uids(PatientName="*cote*", fuzzymatching="false") == []
    [found] = dataset(world.ups("dr.martin", "GET", "", params={"PatientName": "côté*"}))
    assert found.PatientName == "Côté^Élise"
    assert uids("dr.sud", PatientName="*", fuzzymatching="true") == []
    answer = world.ups("dr.martin", "GET", "", params={"PatientName": "x", "fuzzymatching": "1"})
    assert answer.status_code == 400
    assert {p["name"] for p in answer.json()["invalid-params"]} == {"fuzzymatching"}


# -- the domain's additions --------------------------------------------------------------------


def test_a_claim_keeps_the_transaction_uid_the_client_made_and_refuses_one_that_is_no_uid(
    world: World,
) -> None:
    assert world.server.archive is not None
    worklist = Worklist(world.db, world.clock)
    reader = Viewer("dr.martin", groups=frozenset({"garde-nord"}))
    made = worklist.create(
        study_uid=world.study,
        site="site-a",
        group="garde-nord",
        fields=FIELDS,
        created_by="manip.a",
        uid="1.2.826.0.1.3680043.99.1",
    )
    assert made.uid == "1.2.826.0.1.3680043.99.1"
    with pytest.raises(Duplicate):
        worklist.create(
            study_uid=world.study,
            site="site-a",
            group="garde-nord",
            fields=FIELDS,
            created_by="manip.a",
            uid=made.uid,
        )
    with pytest.raises(RequestInvalid):
        worklist.claim(made.uid, reader, "not-a-uid")
    assert worklist.get(made.uid, reader).state == "SCHEDULED"
    assert worklist.claim(made.uid, reader, "1.2.3.4.5").transaction_uid == "1.2.3.4.5"
