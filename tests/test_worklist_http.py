"""The worklist over HTTP (``/api/worklist``): a site asks for a reading, the
group on call for that site sees it, exactly one reader takes it, and every
refusal is a problem-details answer with its UPS status and one audit entry.

The application is the one ``imag serve`` runs, served in this process with a
FakeClock (tests/inprocess.py); users and tokens are real accounts; the rota
is built through the orientation API, as a coordinator would.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from pydicom.uid import generate_uid

from archive.clock import FakeClock
from archive.identity import Source
from archive.jobs import JobQueue, Worker
from archive.security.principals import Principals
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag, serving_in_process

X, Y = "MQ-CHU", "GP-CHU"
SITES = [
    {"name": X, "time_zone": "America/Martinique", "region": "martinique"},
    {"name": Y, "time_zone": "America/Guadeloupe", "region": "guadeloupe"},
]
SETTINGS = {"IMAG_SITES": json.dumps(SITES), "IMAG_LOG_LEVEL": "WARNING"}
API = "/api/worklist"
FIELDS = {
    "requesting_physician": "Dr Anne Lefèvre",
    "clinical_context": "Chute, douleur de hanche droite",
    "question": "Fracture du col ?",
    "anatomical_region": "Hanche droite",
    "contraindications": "aucune",
    "exam_type": "Radiographie du bassin",
    "patient_consent": True,
}
THURSDAY_10H = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)  # 10:00 in Martinique (UTC-4)
SATURDAY_03H = datetime(2026, 12, 5, 7, 0, tzinfo=UTC)  # 03:00 in Martinique


class Api:
    """Calls as one user or another, the audit rows they leave, studies stored."""

    def __init__(self, server: InProcessImag) -> None:
        self.server = server
        assert server.archive is not None
        self.archive = server.archive
        self.db = server.archive.db
        principals = Principals(self.db)
        self.tokens = {"admin": server.token}
        accounts = (
            ("coord", "coordinator", []),
            ("manip.x", "technician", [X]),
            ("manip.y", "technician", [Y]),
            ("dr.a", "radiologist", []),
            ("dr.b", "radiologist", []),
            ("dr.b2", "radiologist", []),
        )
        for user, role, sites in accounts:
            principals.add(user, role, sites=sites)
            self.tokens[user] = principals.create_token(user)[1]

    def call(self, user: str, method: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
        return requests.request(
            method, self.server.url + path, headers=headers, timeout=30, **kwargs
        )

    def worklist(self, user: str, method: str, path: str, **kwargs: object) -> requests.Response:
        return self.call(user, method, API + path, **kwargs)

    def last_audit(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[dict]:
        rows = self.db.query(
            "SELECT actor, action, outcome, status, study_uid, detail FROM audit "
            "WHERE id > ? ORDER BY id",
            (last,),
        )
        return [
            {
                "actor": a,
                "action": b,
                "outcome": c,
                "status": d,
                "study": e,
                "detail": json.loads(f),
            }
            for a, b, c, d, e, f in rows
        ]

    def audited(self, user: str, method: str, path: str, **kwargs: object) -> tuple:
        """A worklist call and the one audit entry it left."""
        last = self.last_audit()
        answer = self.worklist(user, method, path, **kwargs)
        entries = [e for e in self.audit_since(last) if e["actor"] == user]
        assert len(entries) == 1, entries
        return answer, entries[0]

    def store(self, site: str) -> str:
        """A study stored at ``site``; its UID."""
        study = generate_uid()
        result = self.archive.pipeline.ingest(
            make_instance(study=study), Source("import", site=site)
        )
        assert result.ok
        return study

    def build_rota(self) -> None:
        """Group A reads for the sites on weekdays, B on Saturday night; B has
        an address (told of cancel requests)."""
        for name, address in (("A", ""), ("B", "garde-b@chu.example.org")):
            body = {"name": name, "address": address}
            assert self.call("coord", "POST", "/api/orientation/groups", json=body).ok
        for group, members in (("A", ["dr.a"]), ("B", ["dr.b", "dr.b2"])):
            path = f"/api/orientation/groups/{group}/members"
            assert self.call("coord", "POST", path, json={"members": members}).ok
        rules = [("A", day, "08:00", "18:30") for day in ("mon", "tue", "wed", "thu", "fri")]
        rules.append(("B", "sat", "00:00", "08:00"))
        for group, day, start, end in rules:
            body = {"group": group, "day": day, "start": start, "end": end}
            answer = self.call("coord", "POST", "/api/orientation/rota/weekly", json=body)
            assert answer.status_code == 201, answer.text

    def ask(self, user: str = "manip.x", study: str | None = None, **body: object) -> dict:
        """A reading request created by ``user``; the answer's JSON."""
        payload = {"study_uid": study or self.store(X), "fields": FIELDS, **body}
        answer = self.worklist(user, "POST", "/requests", json=payload)
        assert answer.status_code == 201, answer.text
        assert answer.headers["Location"] == f"{API}/requests/{answer.json()['uid']}"
        return answer.json()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(THURSDAY_10H)


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock, index_url: str) -> Iterator[Api]:
    """The API on SQLite and on PostgreSQL, with the rota built."""
    with serving_in_process(
        tmp_path / "imag", settings=SETTINGS, clock=clock, index_url=index_url
    ) as server:
        api = Api(server)
        api.build_rota()
        yield api


def test_a_request_goes_from_creation_to_claim_heartbeat_and_release(
    api: Api, clock: FakeClock
) -> None:
    made = api.ask(priority="URGENT", reply_to="dr.lefevre@chu.example.org")
    assert made["state"] == "SCHEDULED" and made["group"] == "A" and made["site"] == X
    assert made["due_at"] == "2026-12-04T02:00:00+00:00"  # urgent: 12 h
    assert "transaction_uid" not in made
    uid = made["uid"]

    listed = api.worklist("dr.a", "GET", "/requests").json()
    assert listed["total"] == 1 and [r["uid"] for r in listed["requests"]] == [uid]
    assert api.worklist("manip.x", "GET", "/requests").json()["total"] == 1  # the requester

    answer, entry = api.audited("dr.a", "POST", f"/requests/{uid}/claim")
    assert answer.status_code == 200, answer.text
    claim = answer.json()
    assert claim["state"] == "IN PROGRESS" and claim["performer"] == "dr.a"
    transaction = claim["transaction_uid"]
    assert transaction and entry["action"] == "worklist.claim" and entry["outcome"] == "allowed"
    assert entry["study"] == made["study_uid"]

    clock.advance(600)
    beat = api.worklist(
        "dr.a", "POST", f"/requests/{uid}/heartbeat", headers={"X-Transaction-UID": transaction}
    )
    assert beat.status_code == 200, beat.text
    assert beat.json()["lease_until"] == "2026-12-03T14:25:00+00:00"  # 10 min + 15 min lease

    released = api.worklist(
        "dr.a", "POST", f"/requests/{uid}/release", json={"transaction_uid": transaction}
    )
    assert released.status_code == 200 and released.json()["state"] == "SCHEDULED"
    assert released.json()["performer"] is None


def test_a_holder_change_without_the_transaction_uid_is_refused_c301(api: Api) -> None:
    uid = api.ask()["uid"]
    transaction = api.worklist("dr.a", "POST", f"/requests/{uid}/claim").json()["transaction_uid"]
    answer, entry = api.audited("dr.a", "POST", f"/requests/{uid}/release")
    assert answer.status_code == 409
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert answer.json()["ups_status"] == "C301"
    assert entry["detail"]["ups_status"] == "C301" and entry["outcome"] == "failed"
    two = api.worklist(
        "dr.a",
        "POST",
        f"/requests/{uid}/release",
        json={"transaction_uid": transaction},
        headers={"X-Transaction-UID": "1.2.3"},
    )
    assert two.status_code == 400 and two.json()["invalid-params"][0]["name"] == "transaction_uid"
    shown = api.worklist("dr.a", "GET", f"/requests/{uid}").json()
    assert shown["state"] == "IN PROGRESS" and shown["transaction_uid"] == transaction


def test_fifty_clients_claiming_one_request_at_once_one_wins_the_others_get_c302(
    api: Api, clock: FakeClock
) -> None:
    clock.set(SATURDAY_03H)
    uid = api.ask()["uid"]
    start = threading.Barrier(50)

    def claim(n: int) -> requests.Response:
        start.wait()  # fifty connections, each sending its claim at the same moment
        return api.worklist(("dr.b", "dr.b2")[n % 2], "POST", f"/requests/{uid}/claim")

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(claim, range(50)))
    assert sorted(a.status_code for a in answers) == [200] + [409] * 49
    for loser in (a for a in answers if a.status_code == 409):
        assert loser.json()["ups_status"] == "C302" and loser.json()["status"] == 409
    winner = next(a for a in answers if a.status_code == 200).json()
    shown = api.worklist("admin", "GET", f"/requests/{uid}").json()
    assert shown["performer"] == winner["performer"] and shown["claims"] == 1


def test_missing_mandatory_fields_are_each_listed_and_nothing_is_stored(api: Api) -> None:
    study = api.store(X)
    body = {
        "study_uid": study,
        "due_at": "2026-12-04T10:00",  # no offset
        "fields": {"question": "Fracture ?", "patient_consent": False},
    }
    answer, entry = api.audited("manip.x", "POST", "/requests", json=body)
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    listed = {p["name"] for p in answer.json()["invalid-params"]}
    assert listed == {
        "due_at",
        "patient_consent",
        "requesting_physician",
        "clinical_context",
        "anatomical_region",
        "contraindications",
        "exam_type",
    }
    assert entry["outcome"] == "failed" and entry["status"] == 400
    assert "requesting_physician" in entry["detail"]["error"]
    assert api.db.scalar("SELECT count(*) FROM read_requests") == 0


def test_the_rota_decides_the_group_and_another_groups_reader_gets_404_audited_denied(
    api: Api, clock: FakeClock
) -> None:
    weekday = api.ask()
    assert weekday["group"] == "A"
    clock.set(SATURDAY_03H)  # Saturday 03:00 in Martinique: group B's night
    night = api.ask()
    assert night["group"] == "B"
    uid = night["uid"]

    for path in (f"/requests/{uid}", f"/requests/{uid}/claim"):
        method = "GET" if path.endswith(uid) else "POST"
        answer, entry = api.audited("dr.a", method, path)
        assert answer.status_code == 404 and answer.json()["ups_status"] == "C307"
        assert entry["outcome"] == "denied" and entry["study"] == night["study_uid"]
    assert [r["uid"] for r in api.worklist("dr.a", "GET", "/requests").json()["requests"]] == [
        weekday["uid"]
    ]
    seen = api.worklist("dr.b", "GET", "/requests").json()
    assert [r["uid"] for r in seen["requests"]] == [uid]
    shown = api.worklist("dr.b", "GET", f"/requests/{uid}")
    assert shown.status_code == 200  # the same patient's weekday study is a prior
    assert [p["study_uid"] for p in shown.json()["priors"]] == [weekday["study_uid"]]
    assert api.worklist("dr.b", "POST", f"/requests/{uid}/claim").status_code == 200
    # the group now sees the study's images (the request routes them to it)
    study = api.call("dr.b", "GET", f"/dicom-web/studies/{night['study_uid']}/metadata")
    assert study.status_code == 200


def test_another_sites_user_gets_404_and_cannot_withdraw(api: Api) -> None:
    uid = api.ask()["uid"]
    answer, entry = api.audited("manip.y", "GET", f"/requests/{uid}")
    assert answer.status_code == 404 and entry["outcome"] == "denied"
    answer, entry = api.audited("manip.y", "POST", f"/requests/{uid}/cancel-request", json={})
    assert answer.status_code == 404 and entry["outcome"] == "denied"
    assert api.worklist("manip.y", "GET", "/requests").json() == {"total": 0, "requests": []}
    assert api.worklist("admin", "GET", f"/requests/{uid}").json()["state"] == "SCHEDULED"


def test_a_site_user_cannot_claim(api: Api) -> None:
    uid = api.ask()["uid"]
    answer, entry = api.audited("manip.x", "POST", f"/requests/{uid}/claim")
    assert answer.status_code == 403
    assert entry["outcome"] == "denied" and "worklist.write" in entry["detail"]["reason"]
    assert api.worklist("admin", "GET", f"/requests/{uid}").json()["state"] == "SCHEDULED"


def test_a_study_outside_the_callers_scope_cannot_be_asked_about(api: Api) -> None:
    elsewhere = api.store(Y)
    body = {"study_uid": elsewhere, "fields": FIELDS}
    answer, entry = api.audited("manip.x", "POST", "/requests", json=body)
    assert answer.status_code == 404
    assert entry["outcome"] == "denied" and entry["study"] == elsewhere
    nowhere = api.worklist("manip.x", "POST", "/requests", json={**body, "study_uid": "1.2.3.99"})
    assert nowhere.status_code == 404
    other_site = api.worklist("manip.x", "POST", "/requests", json={**body, "site": Y})
    assert other_site.status_code == 403
    assert api.db.scalar("SELECT count(*) FROM read_requests") == 0


def test_withdrawing_a_request_being_read_tells_the_reader_and_keeps_the_claim(
    api: Api, clock: FakeClock
) -> None:
    clock.set(SATURDAY_03H)
    scheduled = api.ask()["uid"]
    direct = api.worklist("manip.x", "POST", f"/requests/{scheduled}/cancel-request", json={})
    assert direct.status_code == 200 and direct.json()["state"] == "CANCELED"
    again = api.worklist("manip.x", "POST", f"/requests/{scheduled}/cancel-request")
    assert again.status_code == 200 and again.headers["Warning"].startswith('299 - "B304 ')

    uid = api.ask()["uid"]
    assert api.worklist("dr.b", "POST", f"/requests/{uid}/claim").status_code == 200
    body = {"reason": "patient transferred"}
    answer, entry = api.audited("manip.x", "POST", f"/requests/{uid}/cancel-request", json=body)
    assert answer.status_code == 200, answer.text
    shown = answer.json()
    assert shown["state"] == "IN PROGRESS" and shown["cancel_requested_by"] == "manip.x"
    assert shown["cancel_reason"] == "patient transferred"
    recipients, purpose = api.db.query_one(
        "SELECT recipients, purpose FROM messages WHERE id = ?", (entry["detail"]["message"],)
    )
    assert json.loads(recipients) == ["garde-b@chu.example.org"]
    assert purpose == "worklist.cancel-request"
    seen = api.worklist("dr.b", "GET", f"/requests/{uid}").json()
    assert seen["cancel_requested_at"] == "2026-12-05T07:00:00+00:00"


def test_the_requesting_site_completes_its_request_others_cannot(api: Api) -> None:
    uid = api.ask(fields={**FIELDS, "previous_results": None})["uid"]
    body = {"fields": {"previous_results": "Scanner 2025: normal"}}
    answer = api.worklist("manip.x", "PATCH", f"/requests/{uid}", json=body)
    assert answer.status_code == 200
    assert answer.json()["fields"]["previous_results"] == "Scanner 2025: normal"
    answer, entry = api.audited("dr.a", "PATCH", f"/requests/{uid}", json=body)
    assert answer.status_code == 403 and entry["outcome"] == "denied"
    wrong = api.worklist("manip.x", "PATCH", f"/requests/{uid}", json={"fields": {"x": "y"}})
    assert wrong.status_code == 400 and wrong.json()["invalid-params"][0]["name"] == "x"


def test_list_filters_are_checked_and_bounded(api: Api) -> None:
    api.ask()
    assert api.worklist("dr.a", "GET", "/requests", params={"limit": "501"}).status_code == 400
    bad = api.worklist("dr.a", "GET", "/requests", params={"state": "DONE"})
    assert bad.status_code == 400 and bad.json()["invalid-params"][0]["name"] == "state"
    scheduled = api.worklist("dr.a", "GET", "/requests", params={"state": "SCHEDULED,IN PROGRESS"})
    assert scheduled.json()["total"] == 1
    assert api.worklist("dr.a", "GET", "/requests", params={"overdue": "true"}).json()["total"] == 0
    monitor = Principals(api.db)
    monitor.add("prom", "monitor", kind="service")
    api.tokens["prom"] = monitor.create_token("prom")[1]
    assert api.worklist("prom", "GET", "/requests").status_code == 403


def test_a_read_route_turns_a_stable_study_into_a_request_for_the_group_on_call(
    tmp_path: Path, clock: FakeClock, index_url: str
) -> None:
    route = {"name": "tele-mq", "kind": "read", "site": X, "priority": "STAT"}
    settings = {**SETTINGS, "IMAG_ROUTES": json.dumps([route]), "IMAG_STABLE_AFTER_SECONDS": "1"}
    clock.set(SATURDAY_03H)
    with serving_in_process(
        tmp_path / "imag", settings=settings, clock=clock, index_url=index_url
    ) as server:
        api = Api(server)
        api.build_rota()
        archive = server.archive
        assert archive is not None
        worker = Worker(archive, "test", queue=JobQueue(archive.db), poll_interval=0.05).start()
        try:
            study = api.store(X)
            api.store(Y)  # not a teleradiology site: no request
            clock.advance(1.5)
            assert worker.wait_idle()
            clock.advance(0.1)
            assert worker.wait_idle()
        finally:
            worker.stop()
        seen = api.worklist("dr.b", "GET", "/requests").json()
        assert seen["total"] == 1
        made = seen["requests"][0]
        assert made["study_uid"] == study and made["group"] == "B" and made["kind"] == "read"
        assert made["priority"] == "STAT" and made["origin"] == "route:tele-mq"
        assert made["fields"]["exam_type"]  # known from the images
        assert "clinical_context" in made["missing"] and "patient_consent" in made["missing"]
        assert api.worklist("dr.a", "GET", "/requests").json()["total"] == 0
