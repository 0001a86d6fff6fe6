"""Reading requests keep the UPS rules whatever the door: exactly one claim
wins, a passed lease gives the request back and locks the late holder out,
and each change the state does not allow gets its UPS status.

The worklist runs on the real index (SQLite and PostgreSQL) with a test clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from archive.clock import FakeClock
from archive.index import open_database, upgrade
from archive.index.db import Database
from archive.security.audit import AuditLog
from worklist.requests import (
    MANDATORY,
    Duplicate,
    NotAllowed,
    RequestInvalid,
    Timings,
    Viewer,
    Worklist,
)
from worklist.ups import CANCELED, COMPLETED, IN_PROGRESS, SCHEDULED, UpsError, UpsWarning

START = datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
FIELDS = {
    "requesting_physician": "Dr Anne Lefèvre",
    "clinical_context": "Chute, douleur de hanche droite",
    "question": "Fracture du col ?",
    "anatomical_region": "Hanche droite",
    "contraindications": "aucune",
    "exam_type": "Radiographie du bassin",
    "patient_consent": True,
}
READER = Viewer("dr.martin", groups=frozenset({"garde-nord"}))
OTHER_READER = Viewer("dr.durand", groups=frozenset({"garde-nord"}))
OUTSIDER = Viewer("dr.sud", groups=frozenset({"garde-sud"}))
SITE_USER = Viewer("manip.a", sites=frozenset({"site-a"}))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def db(index_url: str, clock: FakeClock) -> Iterator[Database]:
    database = open_database(index_url, clock=clock)
    upgrade(database)
    yield database
    database.close()


@pytest.fixture
def worklist(db: Database, clock: FakeClock) -> Worklist:
    return Worklist(db, clock, Timings(lease=timedelta(minutes=10)), AuditLog(db))


def new_request(worklist: Worklist, **kw: object) -> str:
    args: dict = {
        "study_uid": "1.2.3.4",
        "site": "site-a",
        "group": "garde-nord",
        "fields": FIELDS,
        "created_by": "manip.a",
    }
    args.update(kw)
    return worklist.create(**args).uid


def test_fifty_concurrent_claims_of_one_request_let_exactly_one_through(
    worklist: Worklist,
) -> None:
    uid = new_request(worklist)
    start = threading.Barrier(50)

    def claim(n: int) -> str:
        start.wait()
        try:
            return worklist.claim(uid, Viewer(f"dr.{n}", groups=frozenset({"garde-nord"}))).uid
        except UpsError as exc:
            return exc.code

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(claim, range(50)))
    assert outcomes.count(uid) == 1
    assert outcomes.count("C302") == 49
    held = worklist.get(uid, Viewer.system())
    assert held.state == IN_PROGRESS and held.claims == 1


def test_a_passed_lease_returns_the_request_and_the_late_holder_is_refused_with_c301(
    worklist: Worklist, clock: FakeClock, db: Database
) -> None:
    uid = new_request(worklist)
    late = worklist.claim(uid, READER)
    clock.advance(9 * 60)
    worklist.holding(uid, READER, late.transaction_uid)  # activity extends the lease
    clock.advance(9 * 60)
    assert worklist.get(uid, READER).state == IN_PROGRESS
    clock.advance(2 * 60)  # ten minutes without activity

    assert worklist.get(uid, OTHER_READER).state == SCHEDULED
    taken = worklist.claim(uid, OTHER_READER)
    with pytest.raises(UpsError) as refused:
        worklist.complete(uid, READER, late.transaction_uid)
    assert refused.value.code == "C301"
    assert worklist.complete(uid, OTHER_READER, taken.transaction_uid).state == COMPLETED
    expired = AuditLog(db).query(action="worklist.lease-expired")
    assert [(e.detail["request"], e.detail["holder"]) for e in expired] == [(uid, "dr.martin")]


@pytest.mark.parametrize(
    ("setup", "change", "code"),
    [
        ("scheduled", "complete", "C310"),
        ("claimed", "complete-without-uid", "C301"),
        ("claimed", "claim", "C302"),
        ("completed", "claim", "C300"),
        ("canceled", "claim", "C300"),
        ("completed", "request-cancel", "C311"),
        ("unknown", "claim", "C307"),
    ],
)
def test_a_change_the_state_does_not_allow_gets_its_ups_status(
    worklist: Worklist, setup: str, change: str, code: str
) -> None:
    uid = new_request(worklist)
    if setup != "scheduled":
        tx = worklist.claim(uid, READER).transaction_uid
        if setup == "completed":
            worklist.complete(uid, READER, tx)
        elif setup == "canceled":
            worklist.cancel(uid, READER, tx)
    if setup == "unknown":
        uid = "1.2.999"
    with pytest.raises(UpsError) as refused:
        if change == "complete":
            worklist.complete(uid, READER, "1.2.3")
        elif change == "complete-without-uid":
            worklist.complete(uid, READER, None)
        elif change == "claim":
            worklist.claim(uid, OTHER_READER)
        elif change == "request-cancel":
            worklist.request_cancel(uid, SITE_USER)
    assert refused.value.code == code


def test_completing_twice_and_canceling_twice_are_warnings_not_errors(worklist: Worklist) -> None:
    done, gone = new_request(worklist), new_request(worklist, study_uid="1.2.3.5")
    tx = worklist.claim(done, READER).transaction_uid
    worklist.complete(done, READER, tx)
    with pytest.raises(UpsWarning) as again:
        worklist.complete(done, READER, tx)
    assert again.value.code == "B306"
    worklist.request_cancel(gone, SITE_USER, "patient transferred")
    with pytest.raises(UpsWarning) as twice:
        worklist.request_cancel(gone, SITE_USER)
    assert twice.value.code == "B304"


def test_the_requester_cancels_a_waiting_request_at_once_and_only_asks_the_reader_otherwise(
    worklist: Worklist,
) -> None:
    waiting, read = new_request(worklist), new_request(worklist, study_uid="1.2.3.5")
    assert worklist.request_cancel(waiting, SITE_USER, "doublon").state == CANCELED
    worklist.claim(read, READER)
    asked = worklist.request_cancel(read, SITE_USER, "patient parti")
    assert asked.state == IN_PROGRESS and asked.performer == "dr.martin"
    assert (asked.cancel_requested_by, asked.cancel_reason) == ("manip.a", "patient parti")


def test_release_gives_the_request_back_to_the_group(worklist: Worklist) -> None:
    uid = new_request(worklist)
    tx = worklist.claim(uid, READER).transaction_uid
    released = worklist.release(uid, READER, tx)
    assert (released.state, released.performer, released.transaction_uid) == (
        SCHEDULED,
        None,
        None,
    )
    assert worklist.claim(uid, OTHER_READER).performer == "dr.durand"


def test_another_groups_reader_neither_sees_nor_claims_and_the_site_cannot_claim(
    worklist: Worklist,
) -> None:
    uid = new_request(worklist)
    with pytest.raises(UpsError) as unseen:
        worklist.claim(uid, OUTSIDER)
    assert unseen.value.code == "C307"
    assert worklist.listing(OUTSIDER) == ([], 0)
    assert worklist.get(uid, SITE_USER).uid == uid  # the requester follows its request
    with pytest.raises(NotAllowed):
        worklist.claim(uid, SITE_USER)
    assert worklist.get(uid, READER).state == SCHEDULED


def test_the_worklist_is_in_priority_then_due_time_then_arrival_order(
    worklist: Worklist, clock: FakeClock
) -> None:
    made = {}
    for name, priority, due in [
        ("routine-early", "ROUTINE", None),
        ("urgent", "URGENT", None),
        ("stat-late", "STAT", START + timedelta(hours=2)),
        ("stat", "STAT", None),
        ("routine-late", "ROUTINE", None),
    ]:
        made[new_request(worklist, study_uid=f"1.2.{len(made)}", priority=priority, due_at=due)] = (
            name
        )
        clock.advance(60)
    requests, total = worklist.listing(READER)
    assert total == 5
    assert [made[r.uid] for r in requests] == [
        "stat",
        "stat-late",
        "urgent",
        "routine-early",
        "routine-late",
    ]
    stat = requests[0]
    assert stat.due_at == START + timedelta(minutes=3, hours=1)  # the STAT default: one hour
    clock.advance(2 * 3600)
    overdue, count = worklist.listing(READER, overdue=True)
    assert [made[r.uid] for r in overdue] == ["stat", "stat-late"] and count == 2
    assert overdue[0].overdue(clock.now())


def test_a_request_missing_mandatory_fields_is_refused_listing_each_one(
    worklist: Worklist,
) -> None:
    with pytest.raises(RequestInvalid) as refused:
        new_request(worklist, fields={"question": "?", "patient_consent": False})
    problems = refused.value.problems
    assert set(problems) == set(MANDATORY) - {"question"}
    assert "consent" in problems["patient_consent"]
    assert worklist.listing(Viewer.system()) == ([], 0)


def test_a_hostile_request_is_refused_field_by_field(worklist: Worklist) -> None:
    with pytest.raises(RequestInvalid) as refused:
        new_request(
            worklist,
            fields={**FIELDS, "question": "x" * 9000, "exam_type": ["CT"], "sql": "'; DROP"},
            priority="IMMEDIATELY",
        )
    assert set(refused.value.problems) == {"priority", "question", "exam_type", "sql"}
    with pytest.raises(RequestInvalid) as mailbox:
        new_request(worklist, fields={**FIELDS, "gp_address": "Dr X <x@y.fr>\r\nBcc: z@evil"})
    assert set(mailbox.value.problems) == {"gp_address"}
    assert worklist.listing(Viewer.system()) == ([], 0)


def test_one_stable_burst_makes_one_request(worklist: Worklist) -> None:
    first = worklist.create(
        study_uid="1.2.3",
        site="site-a",
        group="garde-nord",
        fields={},
        created_by="imag",
        kind="read",
        burst=41,
        complete=False,
    )
    again = worklist.create(
        study_uid="1.2.3",
        site="site-a",
        group="garde-nord",
        fields={},
        created_by="imag",
        kind="read",
        burst=41,
        complete=False,
    )
    assert again.uid == first.uid
    assert set(first.missing) == set(MANDATORY)


def test_two_clients_naming_the_same_request_uid_at_once_get_one_request_and_one_duplicate(
    worklist: Worklist,
) -> None:
    """UPS-RS lets the client name its workitem: of two creations racing with
    one UID, one makes it and the other is told it exists (409), never a 500."""
    uid = "1.2.826.0.1.3680043.99.77"
    start = threading.Barrier(8)

    def create(n: int) -> str:
        start.wait()
        try:
            return new_request(worklist, uid=uid, study_uid=f"1.2.3.{n}")
        except Duplicate:
            return "duplicate"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(create, range(8)))
    assert sorted(outcomes) == sorted(["duplicate"] * 7 + [uid])
    assert worklist.listing(Viewer.system(), states=())[1] == 1
