"""Screening exams keep the programme's rules whatever the door: only exams
negative at L1 reach the second reading, the second reader is accredited and
never the first, claims are the worklist's own, and the site never learns who
read at L2.

The domain runs on the real index (SQLite and PostgreSQL) with a test clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import pytest

from archive.clock import FakeClock
from archive.index import open_database, upgrade
from archive.index.db import Database
from archive.security.audit import AuditLog
from archive.security.roles import Principal
from worklist.requests import NotAllowed, Timings, Viewer, Worklist
from worklist.screening import (
    AWAITING_L1,
    AWAITING_L2,
    CLOSED,
    Rule,
    Screening,
    ScreeningError,
    Settings,
    parse_rules,
)
from worklist.screening_readings import ReadingInvalid, check_l1, density, l1_outcome
from worklist.ups import COMPLETED, IN_PROGRESS, SCHEDULED, UpsError

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
RULE = Rule("depistage", site="site-*", procedure_code="QEQK004")
L1_DR = Principal("dr.l1", "radiologist", sites=("site-a",))
OTHER_SITE_DR = Principal("dr.b", "radiologist", sites=("site-b",))
SITE_TECH = Principal("manip.a", "technician", sites=("site-a",))
L2_DR = Principal("dr.l2", "screening_reader")
L2_OTHER = Principal("dr.l2bis", "screening_reader")
UNACCREDITED = Principal("dr.new", "screening_reader")
COORDINATOR = Principal("crcdc", "admin")
NEGATIVE = {"right": {"acr": 1, "density": "B"}, "left": {"acr": 2, "density": "2"}}


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
def screening(db: Database, clock: FakeClock) -> Screening:
    worklist = Worklist(db, clock, Timings(lease=timedelta(minutes=10)), AuditLog(db))
    found = Screening(db, clock, worklist, AuditLog(db), Settings(rules=(RULE,)))
    for reader in (L2_DR, L2_OTHER):
        found.accredit(
            reader.name,
            accredited_from=date(2025, 1, 1),
            accredited_until=date(2027, 12, 31),
            reference="ARS-2025-" + reader.name,
            by=COORDINATOR,
        )
    return found


_n = itertools.count(1)


def exam(screening: Screening, site: str = "site-a", study_date: str = "20260302") -> str:
    uid = f"1.2.250.1.999.{next(_n)}"
    screening.recognise(
        study_uid=uid, site=site, patient_ref=None, study_date=study_date, rule=RULE
    )
    return uid


def test_every_acr_combination_at_3_or_more_without_a_negative_work_up_is_closed_at_l1(
    screening: Screening,
) -> None:
    for right, left in itertools.product(range(6), repeat=2):
        for bdi in ({"done": False}, {"done": True, "result": "POSITIVE"}):
            reading = {
                "right": {"acr": right, "density": "A"},
                "left": {"acr": left, "density": "C"},
                "bdi": bdi,
            }
            uid = exam(screening)
            done = screening.record_l1(uid, L1_DR, reading)
            negative = right in (1, 2) and left in (1, 2) and not bdi["done"]
            assert done.state == (AWAITING_L2 if negative else CLOSED), reading
            assert (done.request_uid is not None) == negative
            if not negative:
                assert done.outcome == "POSITIVE_L1"
    queued, _ = screening.queue(L2_DR, limit=1000)
    for queued_exam, _request in queued:
        assert all(queued_exam.l1[b]["acr"] in (1, 2) for b in ("right", "left"))


def test_an_abnormal_exam_negative_after_the_immediate_work_up_goes_to_the_second_reading(
    screening: Screening,
) -> None:
    uid = exam(screening)
    reading = {
        "right": {"acr": 4, "density": "B"},
        "left": {"acr": 1, "density": "B"},
        "bdi": {"done": True, "result": "NEGATIVE"},
    }
    assert screening.record_l1(uid, L1_DR, reading).state == AWAITING_L2


def test_density_is_a_letter_and_the_older_numbering_maps_to_it() -> None:
    assert [density(v) for v in ("1", "2", "3", "4", 4, "a", "D")] == list("ABCDDAD")
    with pytest.raises(ValueError):
        density("E")


def test_a_malformed_first_reading_lists_every_fault_and_changes_nothing(
    screening: Screening,
) -> None:
    uid = exam(screening)
    with pytest.raises(ReadingInvalid) as invalid:
        screening.record_l1(
            uid,
            L1_DR,
            {
                "right": {"acr": 7, "density": "Z"},
                "bdi": {"done": True},
                "recipients": {"woman": "not an address"},
                "extra": 1,
            },
        )
    assert set(invalid.value.problems) == {
        "right.acr",
        "right.density",
        "left",
        "bdi.result",
        "recipients.woman",
        "extra",
    }
    assert screening.get(uid, COORDINATOR)[0].state == AWAITING_L1


def test_only_a_radiologist_of_the_exams_site_records_its_first_reading(
    screening: Screening,
) -> None:
    uid = exam(screening)
    with pytest.raises(ScreeningError) as hidden:  # another site's exam: as if absent
        screening.record_l1(uid, OTHER_SITE_DR, NEGATIVE)
    assert hidden.value.status == 404
    with pytest.raises(NotAllowed):  # the site's technician sees it, does not read it
        screening.record_l1(uid, SITE_TECH, NEGATIVE)
    screening.record_l1(uid, L1_DR, NEGATIVE)
    with pytest.raises(ScreeningError) as twice:
        screening.record_l1(uid, L1_DR, NEGATIVE)
    assert twice.value.status == 409


def test_the_first_reader_can_never_claim_their_own_exam_at_l2(screening: Screening) -> None:
    both = Principal("dr.both", "screening_reader", sites=("site-a",))
    screening.accredit(
        both.name,
        accredited_from=date(2025, 1, 1),
        accredited_until=None,
        reference="",
        by=COORDINATOR,
    )
    uid = exam(screening)
    # dr.both reads L1 as an admin would record it for them: the L1 reader is the name
    screening.record_l1(uid, Principal("dr.both", "admin"), NEGATIVE)
    with pytest.raises(NotAllowed, match="first reader"):
        screening.claim(uid, both)
    assert uid not in [e.study_uid for e, _ in screening.queue(both)[0]]
    assert screening.claim(uid, L2_DR)[1].state == IN_PROGRESS


def test_non_accredited_expired_and_revoked_readers_are_refused(
    screening: Screening, clock: FakeClock
) -> None:
    uid = exam(screening)
    screening.record_l1(uid, L1_DR, NEGATIVE)
    with pytest.raises(NotAllowed, match="accreditation"):
        screening.claim(uid, UNACCREDITED)
    with pytest.raises(NotAllowed, match="role"):  # a technician is no reader at all
        screening.queue(SITE_TECH)
    with pytest.raises(NotAllowed, match="accreditation"):  # a radiologist, not accredited
        screening.queue(L1_DR)
    screening.accredit(
        "dr.short",
        accredited_from=date(2025, 1, 1),
        accredited_until=date(2026, 3, 31),
        reference="",
        by=COORDINATOR,
    )
    short = Principal("dr.short", "screening_reader")
    assert screening.queue(short)[1] == 1
    clock.advance(timedelta(days=30).total_seconds())  # 1 April: expired
    with pytest.raises(NotAllowed):
        screening.claim(uid, short)
    screening.revoke(L2_OTHER.name, COORDINATOR)
    with pytest.raises(NotAllowed):
        screening.claim(uid, L2_OTHER)


def test_one_claim_wins_the_lease_returns_the_exam_and_the_late_verdict_is_refused(
    screening: Screening, clock: FakeClock
) -> None:
    uid = exam(screening)
    screening.record_l1(uid, L1_DR, NEGATIVE)
    _, held = screening.claim(uid, L2_DR)
    with pytest.raises(UpsError) as taken:
        screening.claim(uid, L2_OTHER)
    assert taken.value.code == "C302"
    assert uid not in [e.study_uid for e, _ in screening.queue(L2_OTHER)[0]]
    clock.advance(11 * 60)  # the lease passes
    _, again = screening.claim(uid, L2_OTHER)
    with pytest.raises(UpsError) as late:
        screening.verdict(uid, L2_DR, held.transaction_uid, {"verdict": "NEGATIVE"})
    assert late.value.code == "C301"
    done = screening.verdict(uid, L2_OTHER, again.transaction_uid, {"verdict": "NEGATIVE"})
    assert (done.state, done.outcome, done.l2_reader) == (CLOSED, "NEGATIVE", "dr.l2bis")
    assert screening.worklist.get(done.request_uid, Viewer.system()).state == COMPLETED
    with pytest.raises(UpsError):  # no third reading
        screening.claim(uid, L2_DR)


def test_a_released_exam_goes_back_to_the_queue_oldest_exam_first(screening: Screening) -> None:
    newer = exam(screening, study_date="20260301")
    older = exam(screening, study_date="20260215")
    for uid in (newer, older):
        screening.record_l1(uid, L1_DR, NEGATIVE)
    assert [e.study_uid for e, _ in screening.queue(L2_DR)[0]] == [older, newer]
    _, held = screening.claim(older, L2_DR)
    assert [e.study_uid for e, _ in screening.queue(L2_OTHER)[0]] == [newer]
    _, back = screening.release(older, L2_DR, held.transaction_uid)
    assert back.state == SCHEDULED
    assert [e.study_uid for e, _ in screening.queue(L2_OTHER)[0]] == [older, newer]


@pytest.mark.parametrize(
    ("verdict", "outcome"),
    [
        ({"verdict": "NEGATIVE"}, "NEGATIVE"),
        (
            {
                "verdict": "POSITIVE",
                "findings": {
                    "left": {"acr": 4, "location": "QSE", "further_exams": ["ultrasound"]}
                },
            },
            "POSITIVE_L2",
        ),
        ({"verdict": "INADEQUATE", "reason": "pli cutané", "views": ["LMLO"]}, "INADEQUATE"),
    ],
)
def test_each_verdict_closes_the_exam_with_its_outcome_and_the_site_never_sees_the_reader(
    screening: Screening, verdict: dict, outcome: str
) -> None:
    uid = exam(screening)
    screening.record_l1(uid, L1_DR, NEGATIVE)
    _, held = screening.claim(uid, L2_DR)
    screening.verdict(uid, L2_DR, held.transaction_uid, verdict)
    seen, as_site = screening.get(uid, L1_DR)
    shown = seen.as_dict(for_site=as_site)
    assert as_site and shown["outcome"] == outcome
    assert "dr.l2" not in repr(shown)
    assert shown["l2"]["verdict"] == verdict["verdict"]
    coordinator_view, as_site = screening.get(uid, COORDINATOR)
    assert coordinator_view.as_dict(for_site=as_site)["l2"]["reader"] == "dr.l2"
    # nor through the teleradiology worklist: the site does not see the L2 request
    site_viewer = Viewer("dr.l1", sites=frozenset({"site-a"}))
    assert screening.worklist.listing(site_viewer, states=())[1] == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"verdict": "MAYBE"},
        {"verdict": "POSITIVE"},
        {
            "verdict": "POSITIVE",
            "findings": {"left": {"acr": 2, "location": "x", "further_exams": ["MRI"]}},
        },
        {"verdict": "INADEQUATE", "views": ["RCC"]},
        {"verdict": "INADEQUATE", "reason": "flou", "views": ["XCC"]},
        {"verdict": "NEGATIVE", "views": ["RCC"]},
    ],
)
def test_a_malformed_verdict_is_refused_and_the_exam_stays_held(
    screening: Screening, payload: dict
) -> None:
    uid = exam(screening)
    screening.record_l1(uid, L1_DR, NEGATIVE)
    _, held = screening.claim(uid, L2_DR)
    with pytest.raises(ReadingInvalid):
        screening.verdict(uid, L2_DR, held.transaction_uid, payload)
    current, _ = screening.get(uid, COORDINATOR)
    assert current.state == AWAITING_L2 and current.l2 is None
    assert screening.worklist.get(held.uid, Viewer.system()).state == IN_PROGRESS


def test_rules_come_from_the_configuration_and_match_site_code_and_description() -> None:
    rules = parse_rules(
        '[{"name": "dep", "site": "site-*", "procedure_code": "QEQK004"},'
        ' {"name": "desc", "study_description": "re:(?i)d[ée]pistage"}]'
    )
    attrs = {"site": "site-a", "modality": ["MG"], "study_description": "Mammographie"}
    assert rules[0].matches(attrs, ["QEQK004"])
    assert not rules[0].matches(attrs, ["QEQK001"])
    assert rules[1].matches(attrs | {"study_description": "Mammo de dépistage"}, [])
    assert not rules[1].matches({**attrs, "modality": ["CT"], "study_description": "Dépistage"}, [])
    with pytest.raises(TypeError, match="unknown keys"):
        parse_rules([{"name": "x", "sitee": "a"}])


def test_the_l1_outcome_follows_the_programme() -> None:
    def reading(right: int, left: int, **bdi: object) -> dict:
        return check_l1(
            {
                "right": {"acr": right, "density": "A"},
                "left": {"acr": left, "density": "A"},
                "bdi": {"done": bool(bdi), **bdi},
            }
        )

    assert l1_outcome(reading(1, 2)) == "NEGATIVE"
    assert l1_outcome(reading(0, 1)) == "POSITIVE"  # ACR 0: more imaging needed
    assert l1_outcome(reading(3, 1)) == "POSITIVE"
    assert l1_outcome(reading(5, 5, result="NEGATIVE")) == "NEGATIVE"
    assert l1_outcome(reading(1, 1, result="POSITIVE")) == "POSITIVE"


def test_the_teleradiology_worklist_cannot_claim_a_screening_second_read(
    screening: Screening,
) -> None:
    """A member of the L2 group coming through /api/worklist or UPS-RS was
    not checked for accreditation nor against the first reader: the request
    is not theirs to see; an admin sees it but claims it only through the
    screening API."""
    uid = exam(screening)
    request_uid = screening.record_l1(uid, L1_DR, NEGATIVE).request_uid
    member = Viewer("dr.l1", groups=frozenset({"screening-l2"}))
    with pytest.raises(UpsError) as hidden:
        screening.worklist.claim(request_uid, member)
    assert hidden.value.code == "C307"
    assert screening.worklist.listing(member, states=())[1] == 0
    admin = Viewer("root", everything=True)
    with pytest.raises(NotAllowed, match="/api/screening"):
        screening.worklist.claim(request_uid, admin)
    assert screening.worklist.get(request_uid, admin).state == SCHEDULED
