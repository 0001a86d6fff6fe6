"""Screening mammography over HTTP (``/api/screening``): the site's
radiologist records the first reading, an accredited second reader claims
the exam from the L2 queue and gives the verdict, and every adversary -- the
other site, the unaccredited or expired reader, the first reader, the late
or forged holder, the malformed body -- gets a clear problem-details answer,
nothing stored changes, and each request leaves one audit entry naming the
action and the study.

The application is the one ``imag serve`` runs, served in this process with
a FakeClock (tests/inprocess.py), on SQLite and PostgreSQL; the users and
tokens are real accounts; accreditations are recorded through the API, as
the coordination centre does.  The answers of the full path are checked
against the served OpenAPI document.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import schemathesis
from pydicom.dataset import Dataset

from archive.clock import FakeClock
from archive.identity import Source
from archive.identity.ins import INS_ISSUER, OID_NIR
from archive.jobs import JobQueue, Worker
from archive.security.principals import Principals
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag, serving_in_process
from worklist.screening_service import screening_of

X, Y = "CHU-X", "CLINIQUE-Y"
L2 = "screening-l2"  # screening.l2_group's default
RULES = [{"name": "depistage", "study_description": "re:(?i)d[ée]pistage"}]
SETTINGS = {
    "IMAG_SITES": json.dumps([{"name": X}, {"name": Y}]),
    "IMAG_LOG_LEVEL": "WARNING",
    "IMAG_SCREENING_RULES": json.dumps(RULES),
}
API = "/api/screening"
START = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
APRIL_FIRST = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
INS = "279035121518989"  # the ANS test INS (a valid NIR), as in tests/test_identity_index.py
NEGATIVE = {
    "right": {"acr": 1, "density": "B"},
    "left": {"acr": 2, "density": "2"},
    "bdi": {"done": False},
    "recipients": {"woman": "ruth.devinci@example.org"},
}
POSITIVE = {"right": {"acr": 4, "density": "C"}, "left": {"acr": 1, "density": "C"}}
ACCREDITED = {"accredited_from": "2025-01-01", "accredited_until": "2027-12-31"}
_patients = itertools.count(1)


class Screening:
    """Calls as one user or another, the audit entries they leave, exams made."""

    def __init__(self, server: InProcessImag) -> None:
        self.server = server
        assert server.archive is not None
        self.archive = server.archive
        self.db = server.archive.db
        principals = Principals(self.db)
        self.tokens = {"admin": server.token}
        accounts = (
            ("coord", "screening_coordinator", [], []),
            ("dr.x", "radiologist", [X], []),
            ("dr.y", "radiologist", [Y], []),
            ("manip.x", "technician", [X], []),
            ("l2.a", "screening_reader", [], [L2]),
            ("l2.b", "screening_reader", [], [L2]),
            ("l2.new", "screening_reader", [], [L2]),
            ("l2.short", "screening_reader", [], [L2]),
        )
        for user, role, sites, groups in accounts:
            principals.add(user, role, sites=sites, groups=groups)
            self.tokens[user] = principals.create_token(user)[1]

    def call(self, user: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        headers.update(kwargs.pop("headers", {}))
        return requests.request(
            method, self.server.url + path, headers=headers, timeout=30, **kwargs
        )

    def api(self, user: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.call(user, method, API + path, **kwargs)

    def last_audit(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT actor, action, outcome, status, study_uid, detail FROM audit "
            "WHERE id > ? ORDER BY id",
            (last,),
        )
        keys = ("actor", "action", "outcome", "status", "study", "detail")
        found = [dict(zip(keys, row, strict=True)) for row in rows]
        for entry in found:
            entry["detail"] = json.loads(entry["detail"] or "{}")
        return found

    def audited(
        self, user: str, method: str, path: str, **kwargs: Any
    ) -> tuple[requests.Response, dict[str, Any]]:
        """A screening call and the one audit entry it left."""
        last = self.last_audit()
        answer = self.api(user, method, path, **kwargs)
        entries = [e for e in self.audit_since(last) if e["actor"] == user]
        assert len(entries) == 1, entries
        return answer, entries[0]

    def accredit(self, user: str, **dates: str) -> None:
        body = {**ACCREDITED, **dates, "reference": f"ARS-2025-{user}"}
        answer = self.api("coord", "PUT", f"/readers/{user}", json=body)
        assert answer.status_code == 201, answer.text

    def store(
        self,
        site: str,
        *,
        study: str | None = None,
        patient: tuple[str, str] | None = None,
        ins: bool = False,
        study_date: str = "20260310",
        description: str = "MAMMOGRAPHIE DE DEPISTAGE",
        modality: str = "MG",
        codes: tuple[str, ...] = (),
    ) -> str:
        """A mammogram stored at ``site`` (a woman of her own unless
        ``patient`` = (PatientID, issuer) says who); its study UID."""
        patient_id, issuer = patient or (f"IPP-{next(_patients)}", site)

        def edit(ds: pydicom.FileDataset) -> None:
            ds.PatientID, ds.IssuerOfPatientID = patient_id, issuer
            ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "DE VINCI^RUTH", "19790315", "F"
            ds.StudyDate, ds.StudyDescription, ds.Modality = study_date, description, modality
            if ins:
                item = Dataset()
                item.PatientID, item.IssuerOfPatientID = INS, INS_ISSUER
                item.TypeOfPatientID = "TEXT"
                qualifier = Dataset()
                qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = OID_NIR, "ISO"
                item.IssuerOfPatientIDQualifiersSequence = [qualifier]
                ds.OtherPatientIDsSequence = [item]
            if codes:
                sequence = []
                for value in codes:
                    code = Dataset()
                    code.CodeValue, code.CodingSchemeDesignator = value, "CCAM"
                    code.CodeMeaning = "Mammographie bilatérale de dépistage"
                    sequence.append(code)
                ds.ProcedureCodeSequence = sequence

        result = self.archive.pipeline.ingest(
            make_instance(edit, study=study), Source("import", site=site)
        )
        assert result.ok, result.reason
        return result.study_uid

    def exam(self, site: str = X, **stored: Any) -> str:
        """A stored mammogram recognised as a screening exam, as the
        ``study.stable`` subscriber does (that path: its own test below)."""
        study = self.store(site, **stored)
        screening = screening_of(self.archive)
        patient_ref, study_date = self.db.query_one(
            "SELECT patient_ref, study_date FROM studies WHERE study_uid = ?", (study,)
        )
        screening.recognise(
            study_uid=study,
            site=site,
            patient_ref=patient_ref,
            study_date=study_date,
            rule=screening.settings.rules[0],
        )
        return study

    def negative_at_l1(self, site: str = X, reader: str = "dr.x") -> str:
        study = self.exam(site)
        answer = self.api(reader, "POST", f"/exams/{study}/first-reading", json=NEGATIVE)
        assert answer.status_code == 201, answer.text
        return study

    def claimed(self, study: str, reader: str = "l2.a") -> str:
        answer = self.api(reader, "POST", f"/exams/{study}/claim")
        assert answer.status_code == 200, answer.text
        return answer.json()["transaction_uid"]

    def state(self, study: str) -> tuple:
        """The exam's and its reading request's stored state."""
        return self.db.query_one(
            "SELECT e.state, e.l1_reader, e.l2_reader, e.l2, e.outcome, r.state, r.performer, "
            "r.transaction_uid FROM screening_exams e LEFT JOIN read_requests r "
            "ON r.uid = e.request_uid WHERE e.study_uid = ?",
            (study,),
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def world(tmp_path: Path, clock: FakeClock, index_url: str) -> Iterator[Screening]:
    """The API on SQLite and on PostgreSQL; l2.a, l2.b and l2.short accredited
    (l2.short until 31 March 2026), l2.new not."""
    with serving_in_process(
        tmp_path / "imag", settings=SETTINGS, clock=clock, index_url=index_url
    ) as server:
        world = Screening(server)
        for user in ("l2.a", "l2.b"):
            world.accredit(user)
        world.accredit("l2.short", accredited_until="2026-03-31")
        yield world


class Documented:
    """The served OpenAPI document: each answer checked against it."""

    def __init__(self, server: InProcessImag) -> None:
        self.schema = schemathesis.openapi.from_url(
            server.url + "/api/worklist/openapi.json", timeout=30
        )

    def check(self, operation_id: str, answer: requests.Response) -> requests.Response:
        operation = self.schema.find_operation_by_id(operation_id)
        assert str(answer.status_code) in operation.definition.raw["responses"], answer.text
        operation.validate_response(answer)
        return answer


# -- the path ----------------------------------------------------------------------------------


def test_a_negative_first_reading_goes_to_a_second_reader_who_claims_and_closes_the_exam(
    world: Screening, clock: FakeClock
) -> None:
    doc = Documented(world.server)
    study = world.exam()

    answer, entry = world.audited("dr.x", "GET", f"/exams/{study}")
    shown = doc.check("getScreeningExam", answer).json()
    assert (entry["action"], entry["outcome"], entry["study"]) == (
        "screening.show",
        "allowed",
        study,
    )
    answer, entry = world.audited("dr.x", "GET", "/exams")
    assert doc.check("listScreeningExams", answer).json()["total"] == 1
    assert entry["action"] == "screening.list" and entry["detail"]["total"] == 1
    assert (shown["state"], shown["site"], shown["rule"]) == ("AWAITING L1", X, "depistage")
    assert shown["exam_date"] == "2026-03-10" and "viewer" not in shown
    assert world.api("l2.a", "GET", "/queue").json() == {"total": 0, "exams": []}

    answer, entry = world.audited("dr.x", "POST", f"/exams/{study}/first-reading", json=NEGATIVE)
    doc.check("recordFirstReading", answer)
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"] == f"{API}/exams/{study}"
    read = answer.json()
    assert read["state"] == "AWAITING L2"
    assert read["l1"]["reader"] == "dr.x" and read["l1"]["outcome"] == "NEGATIVE"
    assert read["l1"]["left"] == {"acr": 2, "density": "B"}  # the older 2 is B
    assert (entry["action"], entry["outcome"], entry["study"]) == (
        "screening.first-reading",
        "allowed",
        study,
    )

    answer, entry = world.audited("l2.a", "GET", "/queue")
    queue = doc.check("screeningQueue", answer).json()
    assert [e["study_uid"] for e in queue["exams"]] == [study] and queue["total"] == 1
    assert queue["exams"][0]["request"]["state"] == "SCHEDULED"
    assert entry["action"] == "screening.queue"
    seen = doc.check("getScreeningExam", world.api("l2.a", "GET", f"/exams/{study}")).json()
    assert seen["viewer"] == f"/share/view?layout=mammography&study={study}"

    answer, entry = world.audited("l2.a", "POST", f"/exams/{study}/claim")
    claim = doc.check("claimScreeningExam", answer).json()
    assert answer.status_code == 200, answer.text
    transaction = claim["transaction_uid"]
    assert transaction and claim["request"]["performer"] == "l2.a"
    assert claim["lease_until"] == "2026-03-10T09:15:00+00:00"  # the worklist's 15 min lease
    assert (entry["action"], entry["study"], entry["detail"]["lease_until"]) == (
        "screening.claim",
        study,
        claim["lease_until"],
    )

    clock.advance(600)
    answer, entry = world.audited(
        "l2.a", "POST", f"/exams/{study}/heartbeat", headers={"X-Transaction-UID": transaction}
    )
    beat = doc.check("screeningHeartbeat", answer).json()
    assert beat["lease_until"] == "2026-03-10T09:25:00+00:00" and beat["transaction_uid"]
    assert entry["action"] == "screening.heartbeat" and entry["outcome"] == "allowed"

    verdict = {"verdict": "NEGATIVE", "comment": "RAS", "transaction_uid": transaction}
    answer, entry = world.audited("l2.a", "POST", f"/exams/{study}/verdict", json=verdict)
    closed = doc.check("recordVerdict", answer).json()
    assert answer.status_code == 200, answer.text
    assert (closed["state"], closed["outcome"]) == ("CLOSED", "NEGATIVE")
    assert closed["l2"]["reader"] == "l2.a" and closed["l2"]["comment"] == "RAS"
    assert (entry["action"], entry["study"], entry["detail"]["outcome"]) == (
        "screening.verdict",
        study,
        "NEGATIVE",
    )
    assert world.state(study)[5] == "COMPLETED"  # the worklist's request, completed with it
    results = world.db.scalar(
        "SELECT count(*) FROM changes WHERE type = 'screening.result' AND study_uid = ?", (study,)
    )
    assert results == 1
    assert world.api("l2.a", "GET", "/queue").json()["total"] == 0
    assert (
        doc.check("getScreeningExam", world.api("coord", "GET", f"/exams/{study}")).json()["l2"][
            "reader"
        ]
        == "l2.a"
    )


def test_a_positive_first_reading_is_closed_at_l1_and_never_reaches_the_queue(
    world: Screening,
) -> None:
    study = world.exam()
    answer = world.api("dr.x", "POST", f"/exams/{study}/first-reading", json=POSITIVE)
    assert answer.status_code == 201, answer.text
    assert (answer.json()["state"], answer.json()["outcome"]) == ("CLOSED", "POSITIVE_L1")
    assert world.api("l2.a", "GET", "/queue").json()["total"] == 0
    refused = world.api("l2.a", "POST", f"/exams/{study}/claim")
    assert refused.status_code == 409 and world.state(study)[5] is None
    answer, entry = world.audited("dr.x", "POST", f"/exams/{study}/first-reading", json=NEGATIVE)
    assert answer.status_code == 409 and "already" in answer.json()["detail"]
    assert entry["outcome"] == "failed" and world.state(study)[0] == "CLOSED"


# -- who sees what -----------------------------------------------------------------------------


def test_another_sites_user_gets_404_audited_denied_and_changes_nothing(world: Screening) -> None:
    study = world.exam(X)
    for method, path, body in (
        ("GET", f"/exams/{study}", None),
        ("POST", f"/exams/{study}/first-reading", NEGATIVE),
    ):
        answer, entry = world.audited("dr.y", method, path, json=body)
        assert answer.status_code == 404, answer.text
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert (entry["outcome"], entry["study"]) == ("denied", study)
    assert world.api("dr.y", "GET", "/exams").json() == {"total": 0, "exams": []}
    # the site's technician sees the exam but does not read it
    assert world.api("manip.x", "GET", f"/exams/{study}").status_code == 200
    answer, entry = world.audited("manip.x", "POST", f"/exams/{study}/first-reading", json=NEGATIVE)
    assert answer.status_code == 403 and "screening.first-read" in entry["detail"]["reason"]
    assert world.state(study)[:2] == ("AWAITING L1", None)

    nowhere, entry = world.audited("dr.y", "GET", "/exams/1.2.3.404")
    assert nowhere.status_code == 404 and entry["outcome"] == "failed"  # none: not a denial
    assert world.api("dr.y", "GET", "/exams/" + "1" * 65).status_code == 404


def test_the_site_never_sees_the_second_reader_in_any_answer(world: Screening) -> None:
    study = world.negative_at_l1()
    transaction = world.claimed(study, "l2.b")
    body = {"verdict": "INADEQUATE", "reason": "pli cutané", "views": ["LMLO"]}
    done = world.api(
        "l2.b",
        "POST",
        f"/exams/{study}/verdict",
        json=body,
        headers={"X-Transaction-UID": transaction},
    )
    assert done.status_code == 200, done.text

    for user in ("dr.x", "manip.x"):
        answers = [
            world.api(user, "GET", f"/exams/{study}"),
            world.api(user, "GET", "/exams"),
            world.api(user, "GET", "/exams", params={"state": "CLOSED", "site": X}),
            world.call(user, "GET", "/api/worklist/requests"),
        ]
        shown = answers[0].json()
        assert shown["outcome"] == "INADEQUATE" and shown["l2"]["views"] == ["LMLO"]
        assert answers[1].json()["total"] == answers[2].json()["total"] == 1
        for answer in answers:
            assert answer.status_code in (200, 403), answer.text  # a technician has no worklist
            assert "l2.b" not in answer.text, (user, answer.request.url)
            assert "request_uid" not in answer.text
    assert world.api("coord", "GET", f"/exams/{study}").json()["l2"]["reader"] == "l2.b"


def test_listing_filters_by_state_and_site_and_pages_with_the_total(world: Screening) -> None:
    studies = [world.exam(X, study_date=f"202603{day:02d}") for day in (9, 1, 5)]
    world.exam(Y)
    world.api("dr.x", "POST", f"/exams/{studies[1]}/first-reading", json=NEGATIVE)

    page = world.api("coord", "GET", "/exams", params={"site": X, "limit": 2}).json()
    assert page["total"] == 3
    assert [e["study_uid"] for e in page["exams"]] == [studies[1], studies[2]]  # oldest first
    rest = world.api("coord", "GET", "/exams", params={"site": X, "limit": 2, "offset": 2})
    assert [e["study_uid"] for e in rest.json()["exams"]] == [studies[0]]
    assert world.api("coord", "GET", "/exams").json()["total"] == 4
    awaiting = world.api("dr.x", "GET", "/exams", params={"state": "AWAITING L1"}).json()
    assert awaiting["total"] == 2
    assert world.api("l2.a", "GET", "/exams").json()["total"] == 1  # the L2 queue's exam

    for params, name in (
        ({"state": "DONE"}, "state"),
        ({"limit": "501"}, "limit"),
        ({"offset": "-1"}, "offset"),
    ):
        bad = world.api("coord", "GET", "/exams", params=params)
        assert bad.status_code == 400 and bad.json()["invalid-params"][0]["name"] == name
    assert world.api("l2.a", "GET", "/queue", params={"limit": "0"}).status_code == 400


# -- second readers ----------------------------------------------------------------------------


def test_a_reader_without_accreditation_gets_403_saying_so(world: Screening) -> None:
    study = world.negative_at_l1()
    for method, path in (("GET", "/queue"), ("POST", f"/exams/{study}/claim"), ("GET", "/exams")):
        answer, entry = world.audited("l2.new", method, path)
        assert answer.status_code == 403, answer.text
        assert "accreditation" in answer.json()["detail"]
        assert entry["outcome"] == "denied"
    assert world.state(study)[5] == "SCHEDULED"


def test_an_expired_accreditation_is_refused_once_its_last_day_has_passed(
    world: Screening, clock: FakeClock
) -> None:
    study = world.negative_at_l1()
    assert world.api("l2.short", "GET", "/queue").json()["total"] == 1
    clock.set(APRIL_FIRST)
    for method, path in (("GET", "/queue"), ("POST", f"/exams/{study}/claim")):
        answer, entry = world.audited("l2.short", method, path)
        assert answer.status_code == 403 and "accreditation" in answer.json()["detail"]
        assert entry["outcome"] == "denied"
    readers = {r["name"]: r for r in world.api("coord", "GET", "/readers").json()["readers"]}
    assert readers["l2.short"]["current"] is False and readers["l2.a"]["current"] is True
    assert world.state(study)[5:7] == ("SCHEDULED", None)


def test_the_first_reader_is_refused_at_the_second_reading(world: Screening) -> None:
    study = world.negative_at_l1(reader="dr.x")
    answer, entry = world.audited("dr.x", "POST", f"/exams/{study}/claim")
    assert answer.status_code == 403 and "accreditation" in answer.json()["detail"]
    # a radiologist accredited for L2 reads other sites' exams, never their own L1s
    world.accredit("dr.x")
    answer, entry = world.audited("dr.x", "POST", f"/exams/{study}/claim")
    assert answer.status_code == 403 and "first reader" in answer.json()["detail"]
    assert study not in [e["study_uid"] for e in world.api("dr.x", "GET", "/queue").json()["exams"]]

    # an account that may do both (an admin, accredited) reads L1: never L2 of it
    world.accredit("admin")
    own = world.exam()
    assert world.api("admin", "POST", f"/exams/{own}/first-reading", json=NEGATIVE).ok
    answer, entry = world.audited("admin", "POST", f"/exams/{own}/claim")
    assert answer.status_code == 403 and "first reader" in answer.json()["detail"]
    assert (entry["outcome"], entry["study"], entry["action"]) == ("denied", own, "screening.claim")
    queue = [e["study_uid"] for e in world.api("admin", "GET", "/queue").json()["exams"]]
    assert study in queue and own not in queue
    assert world.state(own)[5:7] == ("SCHEDULED", None)


def test_a_second_claimant_gets_409_c302_and_the_first_keeps_the_exam(world: Screening) -> None:
    study = world.negative_at_l1()
    transaction = world.claimed(study, "l2.a")
    answer, entry = world.audited("l2.b", "POST", f"/exams/{study}/claim")
    assert answer.status_code == 409 and answer.json()["ups_status"] == "C302"
    assert entry["detail"]["ups_status"] == "C302" and entry["action"] == "screening.claim"
    assert world.state(study)[5:] == ("IN PROGRESS", "l2.a", transaction)
    assert [e["study_uid"] for e in world.api("l2.b", "GET", "/queue").json()["exams"]] == []


def test_a_missing_or_forged_transaction_uid_is_409_c301_and_changes_nothing(
    world: Screening,
) -> None:
    study = world.negative_at_l1()
    transaction = world.claimed(study, "l2.a")
    before = world.state(study)
    attempts = [
        ("l2.a", "heartbeat", {}, {}),
        ("l2.a", "release", {"transaction_uid": "1.2.3.4"}, {}),
        ("l2.a", "verdict", {"verdict": "NEGATIVE"}, {}),
        ("l2.a", "verdict", {"verdict": "NEGATIVE"}, {"X-Transaction-UID": "1.2.3.4"}),
        ("l2.b", "verdict", {"verdict": "NEGATIVE", "transaction_uid": "1.2.3.4"}, {}),
        ("l2.b", "release", {}, {"X-Transaction-UID": transaction + "9"}),
    ]
    for user, action, body, headers in attempts:
        answer, entry = world.audited(
            user, "POST", f"/exams/{study}/{action}", json=body, headers=headers
        )
        assert answer.status_code == 409, (action, answer.text)
        assert answer.json()["ups_status"] == "C301", action
        assert entry["action"] == f"screening.{action}" and entry["study"] == study
    assert world.state(study) == before
    two = world.api(
        "l2.a",
        "POST",
        f"/exams/{study}/release",
        json={"transaction_uid": transaction},
        headers={"X-Transaction-UID": "1.2.3.4"},
    )
    assert two.status_code == 400 and two.json()["invalid-params"][0]["name"] == "transaction_uid"
    released = world.api(
        "l2.a", "POST", f"/exams/{study}/release", json={"transaction_uid": transaction}
    )
    assert released.status_code == 200 and released.json()["request"]["state"] == "SCHEDULED"
    assert released.json()["transaction_uid"] is None
    assert world.api("l2.b", "GET", "/queue").json()["total"] == 1


def test_a_second_verdict_is_refused_there_is_no_third_reading(world: Screening) -> None:
    study = world.negative_at_l1()
    transaction = world.claimed(study)
    first = {"verdict": "NEGATIVE", "transaction_uid": transaction}
    assert world.api("l2.a", "POST", f"/exams/{study}/verdict", json=first).status_code == 200
    before = world.state(study)
    recall = {
        "verdict": "POSITIVE",
        "findings": {"left": {"acr": 4, "location": "QSE", "further_exams": ["biopsy"]}},
        "transaction_uid": transaction,
    }
    for user in ("l2.a", "l2.b"):
        answer = world.api(user, "POST", f"/exams/{study}/verdict", json=recall)
        assert answer.status_code == 409, answer.text
        assert "l2.a" not in answer.text or user == "l2.a"
    assert world.api("l2.b", "POST", f"/exams/{study}/claim").status_code == 409
    assert world.state(study) == before


# -- malformed input ---------------------------------------------------------------------------


def test_malformed_bodies_are_400_with_invalid_params_and_change_nothing(world: Screening) -> None:
    study = world.exam()
    path = f"/exams/{study}/first-reading"
    cases = [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, {"body"}),
        ({"json": [NEGATIVE]}, {"body"}),
        ({"json": {}}, {"right", "left"}),
        (
            {
                "json": {
                    "right": {"acr": "one", "density": "E"},
                    "left": {"acr": True, "density": "A"},
                    "bdi": "no",
                    "recipients": {"woman": 12},
                    "colour": "pink",
                }
            },
            {"right.acr", "right.density", "left.acr", "bdi", "recipients.woman", "colour"},
        ),
    ]
    for kwargs, names in cases:
        answer, entry = world.audited("dr.x", "POST", path, **kwargs)
        assert answer.status_code == 400, answer.text
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert {p["name"] for p in answer.json()["invalid-params"]} == names
        assert (entry["outcome"], entry["status"], entry["study"]) == ("failed", 400, study)
    oversized, entry = world.audited("dr.x", "POST", path, data=b"[" + b" " * 300_000 + b"]")
    assert oversized.status_code == 413 and entry["status"] == 413
    assert world.state(study)[:2] == ("AWAITING L1", None)

    assert world.api("dr.x", "POST", path, json=NEGATIVE).status_code == 201
    transaction = world.claimed(study)
    held = world.state(study)
    verdicts = [
        ({"verdict": "NEGATIVE", "comment": "x" * 2001}, {"comment"}),
        ({"verdict": "MAYBE"}, {"verdict"}),
        ({"verdict": "INADEQUATE", "views": "RCC"}, {"reason", "views"}),
        (
            {"verdict": "POSITIVE", "findings": {"left": {"acr": 2, "location": 3}}},
            {"findings.left.acr", "findings.left.location", "findings.left.further_exams"},
        ),
        ({"verdict": "NEGATIVE", "transaction_uid": 7}, {"transaction_uid"}),
    ]
    for body, names in verdicts:
        answer, entry = world.audited(
            "l2.a",
            "POST",
            f"/exams/{study}/verdict",
            json={"transaction_uid": transaction, **body},
        )
        assert answer.status_code == 400, answer.text
        assert {p["name"] for p in answer.json()["invalid-params"]} == names
        assert entry["outcome"] == "failed" and entry["action"] == "screening.verdict"
    beat = world.api(
        "l2.a", "POST", f"/exams/{study}/heartbeat", json={"transaction_uid": transaction, "x": 1}
    )
    assert beat.status_code == 400 and beat.json()["invalid-params"][0]["name"] == "x"
    assert world.state(study) == held


# -- accreditations ----------------------------------------------------------------------------


def test_accreditations_are_the_coordination_centres_and_a_revoked_reader_is_refused(
    world: Screening,
) -> None:
    body = {"accredited_from": "2026-01-01", "reference": "ARS-2026-17"}
    answer, entry = world.audited("coord", "PUT", "/readers/dr.new", json=body)
    assert answer.status_code == 201, answer.text
    made = answer.json()
    assert (made["accredited_until"], made["current"], made["updated_by"]) == (None, True, "coord")
    assert (entry["action"], entry["detail"]["reader"]) == ("screening.readers.accredit", "dr.new")
    renewed = world.api(
        "coord", "PUT", "/readers/dr.new", json={**body, "accredited_until": "2028-12-31"}
    )
    assert renewed.status_code == 200 and renewed.json()["accredited_until"] == "2028-12-31"

    for user, method, path in (
        ("l2.a", "PUT", "/readers/l2.a"),
        ("dr.x", "GET", "/readers"),
        ("l2.a", "DELETE", "/readers/l2.b"),
    ):
        refused, entry = world.audited(user, method, path, json=body)
        assert refused.status_code == 403 and entry["outcome"] == "denied"

    study = world.negative_at_l1()
    answer, entry = world.audited("coord", "DELETE", "/readers/l2.b")
    assert answer.status_code == 200 and answer.json()["current"] is False
    assert entry["action"] == "screening.readers.revoke" and answer.json()["revoked_at"]
    claim = world.api("l2.b", "POST", f"/exams/{study}/claim")
    assert claim.status_code == 403 and "accreditation" in claim.json()["detail"]
    assert world.api("coord", "DELETE", "/readers/nobody").status_code == 404

    malformed = [
        ({"accredited_from": "01/01/2026", "reference": "x"}, {"accredited_from"}),
        ({"reference": "x"}, {"accredited_from"}),
        ({**body, "accredited_until": "2025-12-31"}, {"accredited_until"}),
        ({**body, "reference": ""}, {"reference"}),
        ({**body, "reference": "r" * 201, "level": "L2"}, {"reference", "level"}),
    ]
    for sent, names in malformed:
        answer, entry = world.audited("coord", "PUT", "/readers/dr.other", json=sent)
        assert answer.status_code == 400, answer.text
        assert {p["name"] for p in answer.json()["invalid-params"]} == names
        assert entry["outcome"] == "failed"
    too_long = world.api("coord", "PUT", "/readers/" + "n" * 129, json=body)
    assert too_long.status_code == 400 and too_long.json()["invalid-params"][0]["name"] == "name"
    names = [r["name"] for r in world.api("coord", "GET", "/readers").json()["readers"]]
    assert "dr.other" not in names and "n" * 129 not in names


# -- priors through the regional identity ------------------------------------------------------


def _settle(world: Screening) -> None:
    """Run every job due now (the identity subscriber's) to the end."""
    worker = Worker(world.archive, "screening-test", poll_interval=0.02).start()
    try:
        assert worker.wait_idle(60)
    finally:
        worker.stop()


def test_a_woman_screened_at_two_sites_under_two_local_ids_shows_both_rounds_to_l2(
    world: Screening,
) -> None:
    earlier = world.store(
        Y,
        patient=("Y-77", "CLINIQUE-Y"),
        ins=True,
        study_date="20240305",
        description="DEPISTAGE ORGANISE",
    )
    current = world.store(X, patient=("IPP-X-1", "CHU-X"), ins=True)
    ct = world.store(
        X,
        patient=("IPP-X-1", "CHU-X"),
        ins=True,
        modality="CT",
        description="SCANNER THORACIQUE",
        study_date="20250101",
    )
    stranger = world.store(Y, patient=("Y-78", "CLINIQUE-Y"), study_date="20240305")
    _settle(world)
    linked = world.db.query(
        "SELECT DISTINCT l.regional_ref FROM identity_links l JOIN patients p "
        "ON p.id = l.patient_ref WHERE p.patient_id IN ('IPP-X-1', 'Y-77')"
    )
    assert len(linked) == 1, "two local identities, one regional identity"

    screening = screening_of(world.archive)
    for study, site in ((earlier, Y), (current, X)):
        ref, date = world.db.query_one(
            "SELECT patient_ref, study_date FROM studies WHERE study_uid = ?", (study,)
        )
        screening.recognise(
            study_uid=study,
            site=site,
            patient_ref=ref,
            study_date=date,
            rule=screening.settings.rules[0],
        )
    assert world.api("dr.y", "POST", f"/exams/{earlier}/first-reading", json=POSITIVE).ok

    # before the first reading the prior round is not the L2 readers' to open
    assert world.call("l2.a", "GET", f"/dicom-web/studies/{earlier}/metadata").status_code == 404
    assert world.api("dr.x", "POST", f"/exams/{current}/first-reading", json=NEGATIVE).ok

    shown = world.api("l2.a", "GET", f"/exams/{current}").json()
    priors = {p["study_uid"]: p for p in shown["priors"]}
    assert set(priors) == {earlier, ct}  # never the other woman's mammogram
    assert priors[earlier]["site"] == Y and priors[earlier]["study_date"] == "20240305"
    assert priors[earlier]["screening"] == {
        "exam_date": "2024-03-05",
        "state": "CLOSED",
        "outcome": "POSITIVE_L1",
    }
    assert priors[ct]["screening"] is None
    assert shown["viewer"] == f"/share/view?layout=mammography&study={current}"

    # the L2 group was granted the prior round with the exam: the reader opens its images
    found = world.call("l2.a", "GET", "/dicom-web/studies", params={"StudyInstanceUID": earlier})
    assert found.status_code == 200 and len(found.json()) == 1
    metadata = world.call("l2.a", "GET", f"/dicom-web/studies/{earlier}/metadata")
    assert metadata.status_code == 200 and metadata.json()[0]["00080060"]["Value"] == ["MG"]
    assert world.call("l2.a", "GET", f"/dicom-web/studies/{stranger}/metadata").status_code == 404

    # the site sees its own rounds only: the other site's study is not named to it
    for user in ("dr.x", "manip.x"):
        site_view = world.api(user, "GET", f"/exams/{current}")
        assert [p["study_uid"] for p in site_view.json()["priors"]] == [ct]
        assert earlier not in site_view.text and "viewer" not in site_view.json()
    assert {
        p["study_uid"] for p in world.api("coord", "GET", f"/exams/{current}").json()["priors"]
    } == {earlier, ct}


# -- recognition on study.stable ---------------------------------------------------------------


def test_a_stable_mammogram_matching_a_rule_becomes_one_exam_whatever_its_bursts(
    tmp_path: Path, clock: FakeClock, index_url: str
) -> None:
    rules = [{"name": "ccam-depistage", "site": "CHU-*", "procedure_code": "QEQK004"}]
    settings = {
        **SETTINGS,
        "IMAG_SCREENING_RULES": json.dumps(rules),
        "IMAG_STABLE_AFTER_SECONDS": "1",
    }
    with serving_in_process(
        tmp_path / "imag", settings=settings, clock=clock, index_url=index_url
    ) as server:
        world = Screening(server)
        worker = Worker(world.archive, "test", queue=JobQueue(world.db), poll_interval=0.05)
        worker.start()

        def settle() -> None:
            clock.advance(1.5)
            assert worker.wait_idle()
            clock.advance(0.1)
            assert worker.wait_idle()

        try:
            study = world.store(X, codes=("QEQK004",), description="MAMMOGRAPHIE")
            other_code = world.store(X, codes=("QEQK001",))
            no_code = world.store(X)  # a screening description, but the rule names a code
            ct = world.store(X, codes=("QEQK004",), modality="CT")
            elsewhere = world.store(Y, codes=("QEQK004",))
            settle()
            world.store(X, study=study, codes=("QEQK004",), description="MAMMOGRAPHIE")
            settle()
        finally:
            worker.stop()

        bursts = world.db.scalar(
            "SELECT count(*) FROM changes WHERE type = 'study.stable' AND study_uid = ?", (study,)
        )
        assert bursts == 2
        listed = world.api("coord", "GET", "/exams").json()
        assert [(e["study_uid"], e["rule"], e["site"]) for e in listed["exams"]] == [
            (study, "ccam-depistage", X)
        ]
        assert listed["exams"][0]["state"] == "AWAITING L1"
        for left_alone in (other_code, no_code, ct, elsewhere):
            assert world.api("coord", "GET", f"/exams/{left_alone}").status_code == 404
        recognised = world.db.scalar(
            "SELECT count(*) FROM audit WHERE action = 'screening.recognised' AND study_uid = ?",
            (study,),
        )
        assert recognised == 1
        assert world.api("dr.x", "GET", "/exams").json()["total"] == 1
