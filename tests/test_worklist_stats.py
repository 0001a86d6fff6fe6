"""A scripted day of the regional worklist gives the turnaround figures its
timestamps imply.

200 requests arrive over 24 hours from three sites (two covered by one
on-call group, the third by another), with STAT, URGENT and ROUTINE
priorities; readers claim them after a scripted wait, some release and the
request is claimed again (the wait counts to the *first* claim), most are
reported after a scripted reading time, some are withdrawn, some are still
open at the end of the day.  The script keeps its own timestamps; the
figures of ``GET /api/worklist/stats`` (:func:`worklist.stats.stats`) and
the queue gauges of ``/metrics`` must equal those computed from them.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from archive.clock import FakeClock
from archive.index import open_database, upgrade
from archive.index.db import Database
from worklist.requests import Timings, Viewer, Worklist
from worklist.stats import WorklistCollector, stats, summary

DAY = datetime(2026, 12, 7, 0, 0, tzinfo=UTC)
SITES = {"site-a": "garde-nord", "site-b": "garde-nord", "site-c": "garde-sud"}
READERS = {"garde-nord": ["dr.martin", "dr.durand"], "garde-sud": ["dr.sud"]}
DUE = {"STAT": 3600, "URGENT": 12 * 3600, "ROUTINE": 4 * 86400}
FIELDS = {
    "requesting_physician": "Dr Urgences",
    "clinical_context": "contexte",
    "question": "question",
    "anatomical_region": "thorax",
    "contraindications": "aucune",
    "exam_type": "CT",
    "patient_consent": True,
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(DAY)


@pytest.fixture
def db(index_url: str, clock: FakeClock) -> Iterator[Database]:
    database = open_database(index_url, clock=clock)
    upgrade(database)
    yield database
    database.close()


def script(seed: int = 14) -> list[dict]:
    """The day: what happens to each request, and when (seconds after midnight)."""
    rng = random.Random(seed)
    plan = []
    for n in range(200):
        site = rng.choice(sorted(SITES))
        group = SITES[site]
        arrives = rng.randrange(0, 20 * 3600)
        priority = rng.choices(["STAT", "URGENT", "ROUTINE"], weights=[2, 3, 5])[0]
        fate = rng.choices(["reported", "released", "withdrawn", "open"], weights=[14, 3, 1, 2])[0]
        wait = rng.randrange(30, 3 * 3600)
        reading = rng.randrange(300, 2 * 3600)
        plan.append(
            {
                "n": n,
                "site": site,
                "group": group,
                "priority": priority,
                "fate": fate,
                "created": arrives,
                "claimed": arrives + wait,
                # a released request is claimed again 20 minutes later by another reader
                "reclaimed": arrives + wait + 600 + 1200 if fate == "released" else None,
                "completed": arrives + wait + reading + (1800 if fate == "released" else 0),
                "reader": rng.choice(READERS[group]),
            }
        )
    return plan


def play(plan: list[dict], worklist: Worklist, clock: FakeClock) -> dict[int, str]:
    """Run the script in time order on the worklist; the requests' UIDs."""
    events: list[tuple[int, int, str, dict]] = []
    for step in plan:
        events.append((step["created"], 0, "create", step))
        if step["fate"] == "withdrawn":
            events.append((step["created"] + 60, 1, "withdraw", step))
            continue
        if step["fate"] == "open":
            continue
        events.append((step["claimed"], 1, "claim", step))
        if step["fate"] == "released":
            events.append((step["claimed"] + 600, 2, "release", step))
            events.append((step["reclaimed"], 3, "reclaim", step))
        events.append((step["completed"], 4, "complete", step))
    uids: dict[int, str] = {}
    held: dict[int, tuple[Viewer, str]] = {}
    for at, _order, action, step in sorted(events, key=lambda e: (e[0], e[1], e[3]["n"])):
        clock.set(DAY + timedelta(seconds=at))
        group = step["group"]
        reader = Viewer(step["reader"], groups=frozenset({group}))
        if action == "create":
            uids[step["n"]] = worklist.create(
                study_uid=f"1.2.826.0.1.{step['n']}",
                site=step["site"],
                group=group,
                fields=FIELDS,
                created_by=f"manip.{step['site']}",
                priority=step["priority"],
            ).uid
        elif action == "withdraw":
            site_user = Viewer(f"manip.{step['site']}", sites=frozenset({step["site"]}))
            worklist.request_cancel(uids[step["n"]], site_user, "doublon")
        elif action == "claim":
            first = Viewer("dr.first", groups=frozenset({group}))
            who = first if step["fate"] == "released" else reader
            held[step["n"]] = (who, worklist.claim(uids[step["n"]], who).transaction_uid)
        elif action == "release":
            who, tx = held.pop(step["n"])
            worklist.release(uids[step["n"]], who, tx)
        elif action == "reclaim":
            held[step["n"]] = (reader, worklist.claim(uids[step["n"]], reader).transaction_uid)
        elif action == "complete":
            who, tx = held.pop(step["n"])
            worklist.complete(uids[step["n"]], who, tx)
    return uids


def expected(plan: list[dict], end: int) -> dict:
    """The figures computed from the script alone."""
    claim, report = defaultdict(list), defaultdict(list)
    by_reader, by_group = defaultdict(list), defaultdict(list)
    late: dict[str, int] = defaultdict(int)
    states: dict[str, int] = defaultdict(int)
    queue: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for step in plan:
        created, priority = step["created"], step["priority"]
        due = created + DUE[priority]
        claimed = step["claimed"] if step["fate"] in ("reported", "released") else None
        done = step["completed"] if claimed is not None else None
        if claimed is not None and claimed < end:
            claim[priority].append(claimed - created)
        if done is not None and done < end:
            states["COMPLETED"] += 1
            report[priority].append(done - created)
            by_reader[step["reader"]].append(done - created)
            by_group[step["group"]].append(done - created)
            late[priority] += done > due
            continue
        if step["fate"] == "withdrawn":
            states["CANCELED"] += 1
            continue
        state = "SCHEDULED"
        if claimed is not None and claimed < end:
            in_gap = step["fate"] == "released" and claimed + 600 <= end < step["reclaimed"]
            state = "SCHEDULED" if in_gap else "IN PROGRESS"
        states[state] += 1
        cell = queue[(step["group"], priority, state)]
        cell[0] += 1
        cell[1] += due < end
    return {
        "states": dict(states),
        "time_to_claim": {p: claim[p] for p in DUE},
        "time_to_report": {p: report[p] for p in DUE},
        "late": dict(late),
        "by_reader": by_reader,
        "by_group": by_group,
        "queue": queue,
    }


def test_a_scripted_day_gives_the_turnaround_figures_of_its_timestamps(
    db: Database, clock: FakeClock
) -> None:
    plan = script()
    worklist = Worklist(db, clock, Timings(lease=timedelta(hours=8)))
    play(plan, worklist, clock)
    end = max(max(s["completed"] for s in plan), 20 * 3600) + 1
    clock.set(DAY + timedelta(seconds=end))
    want = expected(plan, end)
    got = stats(db, Viewer.system(), clock.now(), DAY, DAY + timedelta(days=2))

    assert got["created"] == 200
    assert got["states"] == dict(sorted(want["states"].items()))
    for priority in DUE:
        for figure in ("time_to_claim", "time_to_report"):
            values = sorted(want[figure][priority])
            shown = got[figure][priority]
            assert shown["count"] == len(values), (figure, priority)
            assert shown["mean"] == pytest.approx(sum(values) / len(values))
            assert shown["median"] == values[math.ceil(0.5 * len(values)) - 1]
            assert shown["p90"] == values[math.ceil(0.9 * len(values)) - 1]
            assert shown["max"] == values[-1]
        assert got["reported_late"][priority] == want["late"].get(priority, 0)
    assert got["by_reader"] == {r: summary(v) for r, v in sorted(want["by_reader"].items())}
    assert got["by_group"] == {g: summary(v) for g, v in sorted(want["by_group"].items())}
    queue = {
        (q["group"], q["priority"], q["state"]): [q["count"], q["overdue"]] for q in got["queue"]
    }
    assert queue == dict(want["queue"])

    collector = WorklistCollector(ttl=0)
    collector.watch(db, clock)
    try:
        gauges = {m.name: m for m in collector.collect()}
    finally:
        collector.watch(None)
    depth = {tuple(s.labels.values()): s.value for s in gauges["imag_worklist_queue"].samples}
    assert depth == {k: v[0] for k, v in want["queue"].items()}
    overdue: dict[tuple[str, str], int] = defaultdict(int)
    for (group, priority, _state), (_n, late) in want["queue"].items():
        overdue[(group, priority)] += late
    shown = {tuple(s.labels.values()): s.value for s in gauges["imag_worklist_overdue"].samples}
    assert shown == dict(overdue)


def test_a_reader_sees_the_figures_of_their_groups_only(db: Database, clock: FakeClock) -> None:
    worklist = Worklist(db, clock)
    for n, site in enumerate(["site-a", "site-c", "site-c"]):
        worklist.create(
            study_uid=f"1.2.{n}",
            site=site,
            group=SITES[site],
            fields=FIELDS,
            created_by="manip",
        )
    north = Viewer("dr.martin", groups=frozenset({"garde-nord"}))
    figures = stats(db, north, clock.now(), DAY - timedelta(days=1), DAY + timedelta(days=1))
    assert figures["created"] == 1
    assert [q["group"] for q in figures["queue"]] == ["garde-nord"]
