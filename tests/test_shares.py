"""Share links as capabilities: a link opens one study (or some of its
series) and nothing else, through the browser session it is exchanged for or
as a bearer on DICOMweb; its second factor locks it after N wrong answers;
requests per address are limited for every process on the index; revocation
takes effect at once; everything is audited and the creator reads the log.

The application is the one ``imag serve`` runs, served in this process with a
FakeClock (tests/inprocess.py); users are real accounts; mail goes through the
messaging plugin's outbox transport (read from the .eml files).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from archive.clock import FakeClock
from archive.events import EventRow, record
from archive.identity import Source
from archive.jobs import JobQueue, Worker
from archive.security.principals import Principals
from tests.bodies import send_in_two_pieces
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag, serving_in_process

X, Y = "MQ-CHU", "GP-CHU"
SITES = [
    {"name": X, "time_zone": "America/Martinique", "region": "martinique"},
    {"name": Y, "time_zone": "America/Guadeloupe", "region": "guadeloupe"},
]
SETTINGS = {
    "IMAG_SITES": json.dumps(SITES),
    "IMAG_LOG_LEVEL": "WARNING",
    "IMAG_SHARING_RATE_PER_MINUTE": "1000",
}
NOW = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)
BIRTH = "19610307"
SECRET_FORM = re.compile(r"/share/([A-Za-z0-9_-]{43})$")


@dataclass
class Study:
    uid: str
    series: list[str]
    instances: dict[str, str]  # series -> one instance


class Portal:
    """Calls as users, as a share's bearer or as a browser session."""

    def __init__(self, server: InProcessImag) -> None:
        assert server.archive is not None
        self.server = server
        self.archive = server.archive
        self.db = server.archive.db
        principals = Principals(self.db)
        self.tokens = {"admin": server.token}
        for user, role, sites in (
            ("manip.x", "technician", [X]),
            ("manip.x2", "technician", [X]),
            ("manip.y", "technician", [Y]),
            ("monitor", "monitor", []),
        ):
            principals.add(user, role, sites=sites)
            self.tokens[user] = principals.create_token(user)[1]

    def store(self, site: str, series: int = 1) -> Study:
        study = generate_uid()
        patient = generate_uid()[-12:]
        made = Study(study, [], {})
        for _ in range(series):
            uid = generate_uid()

            def edit(ds: object, patient: str = patient) -> None:
                ds.PatientID = patient  # type: ignore[attr-defined]
                ds.PatientBirthDate = BIRTH  # type: ignore[attr-defined]

            data = make_instance(edit, study=study, series=uid)
            result = self.archive.pipeline.ingest(data, Source("import", site=site))
            assert result.ok
            made.series.append(uid)
            made.instances[uid] = str(
                self.db.scalar(
                    "SELECT i.sop_instance_uid FROM instances i JOIN series se "
                    "ON se.id = i.series_ref WHERE se.series_uid = ?",
                    (uid,),
                )
            )
        return made

    def call(self, user: str, method: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
        return requests.request(
            method, self.server.url + path, headers=headers, timeout=30, **kwargs
        )

    def share(self, user: str = "manip.x", **body: object) -> requests.Response:
        return self.call(user, "POST", "/api/shares", json=body)

    def made(self, user: str = "manip.x", **body: object) -> tuple[int, str]:
        """A share made as ``user``: its id and secret."""
        answer = self.share(user, **body)
        assert answer.status_code == 201, answer.text
        found = SECRET_FORM.search(answer.json()["url"])
        assert found
        return answer.json()["id"], found.group(1)

    def open(self, secret: str, **kwargs: object) -> requests.Response:
        return requests.get(
            f"{self.server.url}/share/{secret}", allow_redirects=False, timeout=30, **kwargs
        )

    def session(self, secret: str) -> str:
        answer = self.open(secret)
        assert answer.status_code == 303, answer.text
        return answer.cookies["imag_share"]

    def as_session(self, session: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Cookie": f"imag_share={session}"}
        headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
        return requests.get(
            self.server.url + path, headers=headers, timeout=30, allow_redirects=False, **kwargs
        )

    def as_bearer(self, secret: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {secret}"}
        headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
        return requests.get(self.server.url + path, headers=headers, timeout=30, **kwargs)

    def verify(self, session: str, answer: str) -> requests.Response:
        return requests.post(
            self.server.url + "/share/verify",
            data={"answer": answer},
            headers={"Cookie": f"imag_share={session}"},
            allow_redirects=False,
            timeout=30,
        )

    def last_audit(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[dict]:
        rows = self.db.query(
            "SELECT actor, action, outcome, status, study_uid, detail FROM audit "
            "WHERE id > ? ORDER BY id",
            (last,),
        )
        keys = ("actor", "action", "outcome", "status", "study_uid", "detail")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def run_jobs(self) -> None:
        worker = Worker(self.archive, "test", queue=JobQueue(self.db), poll_interval=0.05)
        with worker:
            assert worker.wait_idle(timeout=60)

    def mails(self) -> list:
        outbox = self.archive.config.data_dir / "outbox"
        return [
            message_from_bytes(p.read_bytes(), policy=policy.default)
            for p in sorted(outbox.glob("*.eml"))
        ]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def portal(tmp_path: Path, clock: FakeClock, index_url: str) -> Iterator[Portal]:
    with serving_in_process(
        tmp_path / "imag", settings=SETTINGS, clock=clock, index_url=index_url
    ) as server:
        yield Portal(server)


def _uids(answer: requests.Response, tag: str) -> set[str]:
    if answer.status_code == 204 or not answer.content:
        return set()
    return {item[tag]["Value"][0] for item in answer.json()}


STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


# -- the secret -------------------------------------------------------------------------------


def test_a_link_secret_has_256_bits_only_its_hash_is_stored_and_is_shown_once(
    portal: Portal,
) -> None:
    a = portal.store(X)
    answer = portal.share(study_uid=a.uid)
    assert answer.status_code == 201, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    made = answer.json()
    secret = SECRET_FORM.search(made["url"]).group(1)  # type: ignore[union-attr]
    assert len(secret) == 43  # token_urlsafe(32): 256 bits
    assert made["expires_at"] == (NOW + timedelta(days=30)).isoformat()  # a GP's default
    rows = portal.db.query("SELECT * FROM shares")
    assert len(rows) == 1
    stored = " ".join(str(v) for v in rows[0])
    assert secret not in stored
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    # never again: not in the listing, not in the share, not in the audit trail
    again = portal.call("manip.x", "GET", f"/api/shares/{made['id']}").text
    listed = portal.call("manip.x", "GET", "/api/shares").text
    trail = json.dumps(portal.audit_since(0), default=str)
    assert secret not in again and secret not in listed and secret not in trail
    assert "url" not in json.loads(again)


def test_a_share_request_arriving_in_two_pieces_is_read_whole(
    portal: Portal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A share asked over a slow link (the body in two pieces) is made, not
    refused as "not JSON" for its first piece."""
    a = portal.store(X)
    answer = send_in_two_pieces(
        monkeypatch,
        "POST",
        portal.server.url + "/api/shares",
        json.dumps({"study_uid": a.uid}).encode(),
        {"Authorization": f"Bearer {portal.tokens['manip.x']}", "Content-Type": "application/json"},
    )
    assert answer.status_code == 201, answer.text
    assert SECRET_FORM.search(answer.json()["url"])


def test_malformed_or_oversized_share_requests_are_problems_and_store_nothing(
    portal: Portal,
) -> None:
    a = portal.store(X)
    bad = [
        {"study_uid": "not a uid"},
        {"study_uid": a.uid, "permissions": ["view", "delete"]},
        {"study_uid": a.uid, "audience": "everyone"},
        {"study_uid": a.uid, "second_factor": "code"},  # no recipient to mail it to
        {"study_uid": a.uid, "days": -1},
        {"study_uid": a.uid, "expires_at": "2020-01-01T00:00:00+00:00"},
        {"study_uid": a.uid, "series": "1.2.3"},
        {"study_uid": a.uid, "colour": "red"},
    ]
    for body in bad:
        answer = portal.share(**body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.headers["Content-Type"].startswith("application/problem+json")
    huge = portal.call(
        "manip.x",
        "POST",
        "/api/shares",
        data=b"{" + b" " * 70_000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert huge.status_code == 413
    assert portal.db.scalar("SELECT COUNT(*) FROM shares") == 0
    # a role without shares.create
    assert portal.share("monitor", study_uid=a.uid).status_code == 403


def test_a_study_outside_the_creators_scope_cannot_be_shared_and_the_attempt_is_audited(
    portal: Portal,
) -> None:
    a = portal.store(X)
    last = portal.last_audit()
    answer = portal.share("manip.y", study_uid=a.uid)
    assert answer.status_code == 404
    [entry] = portal.audit_since(last)
    assert (entry["actor"], entry["action"], entry["outcome"], entry["study_uid"]) == (
        "manip.y",
        "share.create",
        "denied",
        a.uid,
    )
    assert portal.db.scalar("SELECT COUNT(*) FROM shares") == 0


# -- the session ------------------------------------------------------------------------------


def test_the_secret_is_exchanged_for_a_strict_cookie_and_the_session_sees_only_the_share(
    portal: Portal,
) -> None:
    a, b = portal.store(X, series=2), portal.store(X)
    _, secret = portal.made(study_uid=a.uid, series=[a.series[0]])
    opened = portal.open(secret)
    assert opened.status_code == 303
    assert opened.headers["Location"] == "/share/view" and secret not in opened.headers["Location"]
    cookie = opened.headers["Set-Cookie"]
    for attribute in ("imag_share=", "HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
        assert attribute in cookie, cookie
    assert secret not in cookie
    assert opened.headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in opened.headers["Content-Security-Policy"]
    assert opened.headers["X-Content-Type-Options"] == "nosniff"
    assert opened.headers["Cache-Control"] == "no-store"
    session = opened.cookies["imag_share"]
    # only its hash is stored
    stored = " ".join(str(v) for r in portal.db.query("SELECT * FROM share_sessions") for v in r)
    assert session not in stored

    studies = portal.as_session(session, "/dicom-web/studies")
    assert studies.status_code == 200 and _uids(studies, STUDY_UID) == {a.uid}
    [study] = studies.json()
    assert study["00201206"]["Value"] == [1]  # NumberOfStudyRelatedSeries: the shared one
    assert study["00201208"]["Value"] == [1]  # NumberOfStudyRelatedInstances
    series = portal.as_session(session, f"/dicom-web/studies/{a.uid}/series")
    assert _uids(series, SERIES_UID) == {a.series[0]}
    metadata = portal.as_session(session, f"/dicom-web/studies/{a.uid}/metadata")
    assert metadata.status_code == 200
    assert {m[SERIES_UID]["Value"][0] for m in metadata.json()} == {a.series[0]}
    hidden = portal.as_session(session, f"/dicom-web/studies/{a.uid}/series/{a.series[1]}/metadata")
    assert hidden.status_code == 404
    other = portal.as_session(session, f"/dicom-web/studies/{b.uid}/metadata")
    assert other.status_code == 404
    # nothing else of the API either
    assert portal.as_session(session, "/api/shares").status_code == 403


# -- the bearer -------------------------------------------------------------------------------


def test_the_secret_as_a_bearer_reads_only_the_share_and_is_refused_when_not_usable(
    portal: Portal, clock: FakeClock
) -> None:
    a, b = portal.store(X), portal.store(X)
    _, plain = portal.made(study_uid=a.uid)
    listed = portal.as_bearer(plain, "/dicom-web/studies")
    assert listed.status_code == 200 and _uids(listed, STUDY_UID) == {a.uid}
    assert portal.as_bearer(plain, f"/dicom-web/studies/{b.uid}/metadata").status_code == 404

    later = (NOW + timedelta(days=2)).isoformat()
    _, early = portal.made(study_uid=a.uid, not_before=later, days=5)
    _, soon = portal.made(study_uid=a.uid, days=1)
    revoked_id, revoked = portal.made(study_uid=a.uid)
    assert portal.call("manip.x", "DELETE", f"/api/shares/{revoked_id}").status_code == 200
    _, factor = portal.made(study_uid=a.uid, second_factor="birth_date")
    _, locked = portal.made(study_uid=a.uid, second_factor="birth_date")
    session = portal.session(locked)
    for _ in range(5):
        portal.verify(session, "01/01/1900")
    clock.advance(86401)
    cases = [
        (early, "opens on"),
        (soon, "expired"),
        (revoked, "revoked"),
        (factor, "second factor"),
        (locked, "locked after 5 wrong answers"),
        ("x" * 43, "unknown share link"),
    ]
    for secret, reason in cases:
        last = portal.last_audit()
        answer = portal.as_bearer(secret, f"/dicom-web/studies/{a.uid}/metadata")
        assert answer.status_code == 401, (reason, answer.text)
        assert reason in answer.json()["detail"]
        [entry] = portal.audit_since(last)
        assert (entry["outcome"], entry["status"]) == ("denied", 401)
    # an API token is still an API token
    assert portal.call("manip.x", "GET", "/dicom-web/studies").status_code == 200


# -- the second factor ------------------------------------------------------------------------


def test_the_right_birth_date_opens_and_wrong_ones_lock_the_link_with_a_clear_page(
    portal: Portal,
) -> None:
    a = portal.store(X)
    _, secret = portal.made(study_uid=a.uid, second_factor="birth_date")
    opened = portal.open(secret)
    assert opened.status_code == 303 and opened.headers["Location"] == "/share/verify"
    session = opened.cookies["imag_share"]
    # pending: nothing readable yet
    assert portal.as_session(session, "/dicom-web/studies").status_code == 401
    form = portal.as_session(session, "/share/verify")
    assert form.status_code == 200 and 'name="answer"' in form.text and "<script" not in form.text
    wrong = portal.verify(session, "08/03/1961")
    assert wrong.status_code == 403 and "4" in wrong.text
    right = portal.verify(session, "07/03/1961")
    assert right.status_code == 303 and right.headers["Location"] == "/share/view"
    assert portal.as_session(session, "/dicom-web/studies").status_code == 200

    _, other = portal.made(study_uid=a.uid, second_factor="birth_date")
    session = portal.session(other)
    answers = [portal.verify(session, f"0{i}/01/1950") for i in range(1, 6)]
    assert [r.status_code for r in answers] == [403, 403, 403, 403, 423]
    assert "locked after 5 wrong answers" in answers[-1].text
    assert "manip.x (MQ-CHU)" in answers[-1].text  # whom to ask
    # locked for good: even the right answer, even a new session
    assert portal.verify(session, "07/03/1961").status_code == 423
    assert portal.open(other).status_code == 423


def test_a_one_time_code_is_mailed_and_accepted_once(portal: Portal) -> None:
    a = portal.store(X)
    _, secret = portal.made(
        study_uid=a.uid, second_factor="code", recipient="patient@example.org", audience="patient"
    )
    portal.run_jobs()
    [link_mail] = portal.mails()
    assert secret in link_mail.get_body(("plain",)).get_content()
    session = portal.session(secret)
    portal.run_jobs()
    [code_mail] = [m for m in portal.mails() if "code" in m["Subject"]]
    assert [a.addr_spec for a in code_mail["To"].addresses] == ["patient@example.org"]
    code = re.search(r"\b(\d{8})\b", code_mail.get_body(("plain",)).get_content()).group(1)  # type: ignore[union-attr]
    assert code not in " ".join(str(v) for r in portal.db.query("SELECT * FROM shares") for v in r)
    assert portal.verify(session, code).status_code == 303
    assert portal.as_session(session, "/dicom-web/studies").status_code == 200
    # a second session cannot use it again
    again = portal.session(secret)
    assert portal.verify(again, code).status_code == 403


# -- rate limits ------------------------------------------------------------------------------


def test_requests_per_address_are_limited_across_two_archives_on_one_index(
    tmp_path: Path, clock: FakeClock, index_url: str
) -> None:
    settings = {**SETTINGS, "IMAG_SHARING_RATE_PER_MINUTE": "4"}
    with (
        serving_in_process(
            tmp_path / "one", settings=settings, clock=clock, index_url=index_url
        ) as one,
        serving_in_process(
            tmp_path / "two", settings=settings, clock=clock, index_url=index_url
        ) as two,
    ):
        unknown = "y" * 43
        statuses = [
            requests.get(f"{s.url}/share/{unknown}", allow_redirects=False, timeout=30).status_code
            for s in (one, two, one, two)
        ]
        assert statuses == [404, 404, 404, 404]
        refused = requests.get(f"{two.url}/share/{unknown}", allow_redirects=False, timeout=30)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        clock.advance(61)
        fresh = requests.get(f"{one.url}/share/{unknown}", allow_redirects=False, timeout=30)
        assert fresh.status_code == 404


# -- revocation, audit, access log --------------------------------------------------------------


def test_revocation_takes_effect_at_once_for_sessions_and_bearers(portal: Portal) -> None:
    a = portal.store(X)
    share_id, secret = portal.made(study_uid=a.uid)
    session = portal.session(secret)
    assert portal.as_session(session, "/dicom-web/studies").status_code == 200
    assert portal.as_bearer(secret, "/dicom-web/studies").status_code == 200
    # another user of the same site cannot revoke it (nor see it)
    assert portal.call("manip.x2", "DELETE", f"/api/shares/{share_id}").status_code == 404
    assert portal.call("manip.x", "DELETE", f"/api/shares/{share_id}").status_code == 200
    assert portal.as_session(session, "/dicom-web/studies").status_code == 401
    assert portal.as_bearer(secret, "/dicom-web/studies").status_code == 401
    page = portal.open(secret)
    assert page.status_code == 410 and "revoked" in page.text and "manip.x" in page.text
    assert page.headers["Referrer-Policy"] == "no-referrer"


def test_create_use_fail_and_revoke_are_audited_and_the_creator_reads_the_access_log(
    portal: Portal,
) -> None:
    a = portal.store(X)
    last = portal.last_audit()
    share_id, secret = portal.made(study_uid=a.uid, second_factor="birth_date")
    session = portal.session(secret)
    portal.verify(session, "01/01/2000")
    portal.verify(session, "1961-03-07")
    portal.call("manip.x", "DELETE", f"/api/shares/{share_id}")
    actions = [
        (e["action"], e["outcome"])
        for e in portal.audit_since(last)
        if e["action"].startswith("share.")
    ]
    assert actions == [
        ("share.create", "allowed"),
        ("share.open", "allowed"),
        ("share.verify", "denied"),
        ("share.verify", "allowed"),
        ("share.revoke", "allowed"),
    ]
    log = portal.call("manip.x", "GET", f"/api/shares/{share_id}/accesses")
    assert log.status_code == 200
    assert [(e["what"], e["outcome"]) for e in reversed(log.json())] == [
        ("open", "pending"),
        ("verify", "wrong"),
        ("verify", "allowed"),
    ]
    assert all(e["address"] for e in log.json())
    last = portal.last_audit()
    assert portal.call("manip.x2", "GET", f"/api/shares/{share_id}/accesses").status_code == 404
    [entry] = portal.audit_since(last)
    assert (entry["actor"], entry["outcome"]) == ("manip.x2", "denied")
    assert portal.call("admin", "GET", f"/api/shares/{share_id}/accesses").status_code == 200
    listed = portal.call("manip.x2", "GET", "/api/shares").json()
    assert listed == []


# -- isolation: every DICOMweb route --------------------------------------------------------------


def _routes(study: str, series: str, instance: str) -> list[tuple[str, dict[str, str]]]:
    s = f"/dicom-web/studies/{study}"
    se = f"{s}/series/{series}"
    i = f"{se}/instances/{instance}"
    dicom = {"Accept": 'multipart/related; type="application/dicom"'}
    octets = {"Accept": 'multipart/related; type="application/octet-stream"'}
    jpeg = {"Accept": "image/jpeg"}
    return [
        (f"/dicom-web/studies?StudyInstanceUID={study}", {}),
        (f"/dicom-web/series?StudyInstanceUID={study}&SeriesInstanceUID={series}", {}),
        (f"/dicom-web/instances?SeriesInstanceUID={series}", {}),
        (f"{s}/series?SeriesInstanceUID={series}", {}),
        (f"{s}/instances?SeriesInstanceUID={series}", {}),
        (f"{se}/instances", {}),
        (s, dicom),
        (f"{s}/metadata", {}),
        (se, dicom),
        (f"{se}/metadata", {}),
        (i, dicom),
        (f"{i}/metadata", {}),
        (f"{i}/frames/1", octets),
        (f"{i}/bulk/7FE00010", octets),
        (f"{s}/rendered", jpeg),
        (f"{se}/rendered", jpeg),
        (f"{i}/rendered", jpeg),
        (f"{i}/frames/1/rendered", jpeg),
        (f"{s}/thumbnail", jpeg),
        (f"{se}/thumbnail", jpeg),
        (f"{i}/thumbnail", jpeg),
        (
            f"/dicom-web/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
            f"&objectUID={instance}",
            {},
        ),
        # the sharing portal's own viewer API
        (f"/api/view/studies/{study}/series/{series}", {}),
        (f"/api/view/studies/{study}/instances/{instance}/frames/1/image?viewport=64,64", {}),
    ]


def _seen(answer: requests.Response) -> bool:
    """Whether an answer gave anything (a QIDO-RS empty list is nothing)."""
    if answer.status_code in (204, 404):
        return False
    assert answer.status_code == 200, answer.text[:300]
    if answer.headers.get("Content-Type", "").startswith("application/dicom+json"):
        return bool(answer.json())
    return bool(answer.content)


@pytest.mark.parametrize("via", ["session", "bearer"])
def test_a_share_reaches_nothing_outside_it_through_any_dicomweb_route(
    portal: Portal, via: str
) -> None:
    a, b, c = portal.store(X), portal.store(X), portal.store(X, series=2)
    _, secret_a = portal.made(study_uid=a.uid)
    _, secret_c = portal.made(study_uid=c.uid, series=[c.series[0]])
    for secret, allowed, refused in (
        (secret_a, (a, a.series[0]), (b, b.series[0])),
        (secret_c, (c, c.series[0]), (c, c.series[1])),
    ):
        credential = portal.session(secret) if via == "session" else secret
        get = portal.as_session if via == "session" else portal.as_bearer
        study, series = allowed
        for path, headers in _routes(study.uid, series, study.instances[series]):
            assert _seen(get(credential, path, headers=headers)), path  # the table works
        study, series = refused
        for path, headers in _routes(study.uid, series, study.instances[series]):
            if study is c and series not in path:
                continue  # a study-level route of C: its shared series is there, rightly
            last = portal.last_audit()
            answer = get(credential, path, headers=headers)
            assert not _seen(answer), path
            entries = portal.audit_since(last)
            assert [(e["outcome"], e["study_uid"]) for e in entries] == [("denied", study.uid)], (
                path,
                entries,
            )
        # and listings without a UID list only the share
        assert _uids(get(credential, "/dicom-web/studies"), STUDY_UID) == {allowed[0].uid}
        assert _uids(get(credential, "/dicom-web/series"), SERIES_UID) == (
            {allowed[1]} if study is c else set(allowed[0].series)
        )


@pytest.mark.parametrize("via", ["session", "bearer"])
def test_the_viewer_and_the_zip_of_a_share_never_hold_another_study(
    portal: Portal, via: str
) -> None:
    a, b = portal.store(X), portal.store(X)
    _, secret = portal.made(study_uid=a.uid, permissions=["view", "download"])
    credential = portal.session(secret) if via == "session" else secret
    get = portal.as_session if via == "session" else portal.as_bearer
    shown = get(credential, "/api/view/study")
    assert shown.status_code == 200 and a.uid in shown.text, shown.text
    other = get(credential, f"/api/view/study?study={b.uid}")  # the URL names another study
    assert other.status_code in (400, 404) and "PatientName" not in other.text, other.text
    for path in ("/api/view/download", f"/api/view/download?study={b.uid}"):
        answer = get(credential, path)
        if answer.status_code != 200:
            assert answer.status_code in (400, 403, 404), path
            continue
        archive = zipfile.ZipFile(io.BytesIO(answer.content))
        uids = set()
        for name in archive.namelist():
            if name.upper().endswith("DICOMDIR") or name.lower().endswith(".jpg"):
                continue
            uids.add(str(pydicom.dcmread(io.BytesIO(archive.read(name))).StudyInstanceUID))
        assert uids == {a.uid}, path
    # a view-only share has no ZIP at all
    _, view_only = portal.made(study_uid=a.uid)
    viewer = portal.session(view_only) if via == "session" else view_only
    assert get(viewer, "/api/view/download").status_code == 403


# -- report.validated ----------------------------------------------------------------------------


def test_a_validated_report_mails_the_gp_a_view_only_link_exactly_once(portal: Portal) -> None:
    a = portal.store(X)
    with portal.db.transaction():
        record(
            portal.db,
            [
                EventRow(
                    "report.validated",
                    site=X,
                    study_uid=a.uid,
                    detail={"share_with": ["dr.gp@example.org"]},
                )
            ],
        )
    portal.run_jobs()
    # a re-run of the delivery changes nothing (transactional subscriber)
    job = portal.db.query_one("SELECT id FROM jobs WHERE kind = 'event:sharing-gp-links'")
    assert job is not None
    portal.run_jobs()
    [share] = portal.call("admin", "GET", "/api/shares").json()
    assert (share["audience"], share["permissions"], share["created_site"]) == ("gp", ["view"], X)
    assert share["expires_at"] == (NOW + timedelta(days=30)).isoformat()
    [mail] = portal.mails()
    assert [t.addr_spec for t in mail["To"].addresses] == ["dr.gp@example.org"]
    words = mail.get_body(("plain",)).get_content().split()
    [url] = {w for w in words if "/share/" in w}
    secret = SECRET_FORM.search(url).group(1)  # type: ignore[union-attr]
    assert portal.as_bearer(secret, "/dicom-web/studies").status_code == 200
