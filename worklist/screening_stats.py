"""Programme indicators of screening mammography, per centre and per reader,
for one year: what the coordination centre follows and reports.

**The year.**  The exams of year Y are those whose exam date is in Y (the
programme's cohorts), whatever when they were read or their letters sent:
an exam of 28 December read in January counts in its own year.  Volumes,
rates and turnaround are all over that one cohort.

**Per centre** (the producing site) and for the whole programme:

* ``exams``; ``l1_reads`` and ``l1_positive`` (closed at L1), with
  ``l1_positive_rate`` = l1_positive / l1_reads;
* ``l2_reads`` with their verdicts (``l2_negative``, ``l2_positive``,
  ``l2_inadequate``), ``l2_recall_rate`` = l2_positive / l2_reads (recalled
  for a deferred work-up) and ``l2_inadequate_rate`` = l2_inadequate /
  l2_reads (technically inadequate is an L2 verdict only);
* ``turnaround``: exam-to-letter in calendar days (the letters' day in UTC
  minus the exam date) of the exams whose letters are out: ``count``,
  ``median``, ``p90`` (nearest rank: a value actually observed), ``max``,
  and ``buckets`` 0-7, 8-15, 16-30, >30 days;
* ``letters``, ``letters_late`` (out after the due time: a turnaround of
  more than ``screening.letter_target_days``), ``late_alerts`` (exams the
  deadline alert fired for);
* ``waiting``: exams still without their letters, by where they wait
  (``l1``, ``l2``, ``letter``: closed, letters not queued yet) and how many
  of them are past their due time now (``overdue``).

**Per reader** (the account name): ``l1_reads``, ``l1_positive`` and its
rate; ``l2_reads``, its verdicts and rates; ``accredited`` (a second-reader
accreditation valid for part of the year at least);
``under_l1_minimum`` / ``under_l2_minimum``: fewer reads than
``screening.min_l1_per_year`` / ``screening.min_l2_per_year`` (null when the
reader does not read at that level that year: no L1 read; no L2 read and
no accreditation).

Rates are fractions (0-1), null without a denominator.  Everything is
counted in SQL (GROUP BY over ``screening_exams``, on its exam-date index);
the turnaround's percentiles come from a histogram of days per centre (a
few hundred rows at most), never from one row per exam.

**CSV** (:func:`to_csv`, ``GET /api/screening/stats.csv``), for the
coordination centre's spreadsheet: UTF-8 with a byte order mark (without it
Excel reads UTF-8 as Windows-1252 and mangles accents), ``;`` between
fields and a decimal comma (what a French Excel opens as numbers), CRLF line
ends, one header row then one row for the programme, one per centre and one
per reader (column ``level``: programme, centre, reader).  Rates are
percentages with two decimals (``l2_recall_rate_pct`` 4,17); flags are
``oui`` / ``non``; a cell that does not apply is empty.  A name starting with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return is prefixed with ``'``
so that a spreadsheet never runs it as a formula.  Columns: see
:data:`CSV_COLUMNS`.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from archive.index.db import Database
from worklist.screening import AWAITING_L1, AWAITING_L2, CLOSED

#: exam-to-letter buckets, in days (inclusive bounds; None: no upper bound)
BUCKETS = (("0-7", 0, 7), ("8-15", 8, 15), ("16-30", 16, 30), (">30", 31, None))
FIRST_YEAR = 2000

#: the counts of a centre, in the order the per-centre query gives them
_COUNTS = (
    "exams",
    "l1_reads",
    "l1_positive",
    "l2_reads",
    "l2_negative",
    "l2_positive",
    "l2_inadequate",
    "letters",
    "late_alerts",
    "waiting_l1",
    "waiting_l2",
    "waiting_letter",
    "waiting_overdue",
)


@dataclass(frozen=True)
class Thresholds:
    """Reads a year under which a reader is flagged."""

    l1: int = 500
    l2: int = 1500

    @classmethod
    def from_config(cls, config: Any) -> Thresholds:
        return cls(config["screening.min_l1_per_year"], config["screening.min_l2_per_year"])


def check_year(text: str | None, today: date) -> int:
    """The ``year`` query parameter: ``today``'s year when absent; ValueError
    saying what is expected when it is not a year from 2000 to this one."""
    if text is None:
        return today.year
    expected = f"a year from {FIRST_YEAR} to {today.year} (four digits)"
    if not (len(text) == 4 and text.isascii() and text.isdigit()):
        raise ValueError(expected)
    year = int(text)
    if not FIRST_YEAR <= year <= today.year:
        raise ValueError(expected)
    return year


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _days(db: Database) -> str:
    """SQL: the exam-to-letter days of ``e`` (letters day in UTC - exam date)."""
    if db.dialect == "postgresql":
        return "(CAST((e.letters_at AT TIME ZONE 'UTC') AS DATE) - CAST(e.exam_date AS DATE))"
    return "CAST(julianday(date(e.letters_at)) - julianday(e.exam_date) AS INTEGER)"


def turnaround(histogram: dict[int, int]) -> dict[str, Any]:
    """count, median, p90 (nearest rank), max and buckets of a histogram
    days -> exams."""
    count = sum(histogram.values())
    buckets = {
        name: sum(n for d, n in histogram.items() if d >= lo and (hi is None or d <= hi))
        for name, lo, hi in BUCKETS
    }
    if not count:
        return {"count": 0, "median": None, "p90": None, "max": None, "buckets": buckets}
    ordered = sorted(histogram.items())

    def rank(p: float) -> int:
        wanted = max(1, math.ceil(p * count))
        seen = 0
        for days, n in ordered:
            seen += n
            if seen >= wanted:
                return days
        return ordered[-1][0]

    return {
        "count": count,
        "median": rank(0.5),
        "p90": rank(0.9),
        "max": ordered[-1][0],
        "buckets": buckets,
    }


def _figures(counts: dict[str, int], histogram: dict[int, int], target: int) -> dict[str, Any]:
    """A centre's (or the programme's) indicators from its counts and histogram."""
    return {
        "exams": counts["exams"],
        "l1_reads": counts["l1_reads"],
        "l1_positive": counts["l1_positive"],
        "l1_positive_rate": _rate(counts["l1_positive"], counts["l1_reads"]),
        "l2_reads": counts["l2_reads"],
        "l2_negative": counts["l2_negative"],
        "l2_positive": counts["l2_positive"],
        "l2_inadequate": counts["l2_inadequate"],
        "l2_recall_rate": _rate(counts["l2_positive"], counts["l2_reads"]),
        "l2_inadequate_rate": _rate(counts["l2_inadequate"], counts["l2_reads"]),
        "letters": counts["letters"],
        "letters_late": sum(n for d, n in histogram.items() if d > target),
        "late_alerts": counts["late_alerts"],
        "turnaround": turnaround(histogram),
        "waiting": {
            "l1": counts["waiting_l1"],
            "l2": counts["waiting_l2"],
            "letter": counts["waiting_letter"],
            "overdue": counts["waiting_overdue"],
        },
    }


def indicators(
    db: Database, year: int, *, now: datetime, target_days: int, thresholds: Thresholds
) -> dict[str, Any]:
    """The programme's indicators for the exams of ``year`` (see the module
    docstring), with the waiting exams as they stand at ``now``."""
    first, last = date(year, 1, 1).isoformat(), date(year, 12, 31).isoformat()
    in_year = "e.exam_date >= ? AND e.exam_date <= ?"
    # an exam is past its due time once exam day + target has ended
    overdue_from = (now - timedelta(days=target_days + 1)).date().isoformat()
    rows = db.query(
        "SELECT e.site, count(*), "
        "sum(CASE WHEN e.l1_at IS NOT NULL THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.l1_outcome = 'POSITIVE' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.l2_verdict IS NOT NULL THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.l2_verdict = 'NEGATIVE' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.l2_verdict = 'POSITIVE' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.l2_verdict = 'INADEQUATE' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.letters_at IS NOT NULL THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.late_alerted_at IS NOT NULL THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.state = ? THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.state = ? THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.state = ? AND e.letters_at IS NULL THEN 1 ELSE 0 END), "
        "sum(CASE WHEN e.letters_at IS NULL AND e.exam_date <= ? THEN 1 ELSE 0 END) "
        f"FROM screening_exams e WHERE {in_year} GROUP BY e.site",
        (AWAITING_L1, AWAITING_L2, CLOSED, overdue_from, first, last),
    )
    counts = {
        row[0]: dict(zip(_COUNTS, (int(v or 0) for v in row[1:]), strict=True)) for row in rows
    }
    histograms: dict[str, dict[int, int]] = defaultdict(dict)
    days = _days(db)
    for site, d, n in db.query(
        f"SELECT e.site, {days}, count(*) FROM screening_exams e "
        f"WHERE {in_year} AND e.letters_at IS NOT NULL GROUP BY e.site, {days}",
        (first, last),
    ):
        histograms[site][int(d)] = int(n)
    programme_counts = {key: sum(c[key] for c in counts.values()) for key in _COUNTS}
    programme_histogram: dict[int, int] = defaultdict(int)
    for histogram in histograms.values():
        for d, n in histogram.items():
            programme_histogram[d] += n
    return {
        "year": year,
        "target_days": target_days,
        "thresholds": {"l1_per_year": thresholds.l1, "l2_per_year": thresholds.l2},
        "at": now.isoformat(),
        "programme": _figures(programme_counts, dict(programme_histogram), target_days),
        "centres": [
            {"site": site, **_figures(c, histograms.get(site, {}), target_days)}
            for site, c in sorted(counts.items())  # Python's order: not the collation's
        ],
        "readers": _readers(db, year, first, last, thresholds),
    }


def _readers(
    db: Database, year: int, first: str, last: str, thresholds: Thresholds
) -> list[dict[str, Any]]:
    in_year = "e.exam_date >= ? AND e.exam_date <= ?"
    l1 = {
        name: (int(n), int(p or 0))
        for name, n, p in db.query(
            "SELECT e.l1_reader, count(*), "
            "sum(CASE WHEN e.l1_outcome = 'POSITIVE' THEN 1 ELSE 0 END) "
            f"FROM screening_exams e WHERE {in_year} AND e.l1_reader IS NOT NULL "
            "GROUP BY e.l1_reader",
            (first, last),
        )
    }
    l2 = {
        name: (int(n), int(neg or 0), int(pos or 0), int(bad or 0))
        for name, n, neg, pos, bad in db.query(
            "SELECT e.l2_reader, count(*), "
            "sum(CASE WHEN e.l2_verdict = 'NEGATIVE' THEN 1 ELSE 0 END), "
            "sum(CASE WHEN e.l2_verdict = 'POSITIVE' THEN 1 ELSE 0 END), "
            "sum(CASE WHEN e.l2_verdict = 'INADEQUATE' THEN 1 ELSE 0 END) "
            f"FROM screening_exams e WHERE {in_year} AND e.l2_reader IS NOT NULL "
            "AND e.l2_verdict IS NOT NULL GROUP BY e.l2_reader",
            (first, last),
        )
    }
    year_start = datetime.fromisoformat(first + "T00:00:00+00:00")
    accredited = {
        r[0]
        for r in db.query(
            "SELECT name FROM screening_readers WHERE accredited_from <= ? "
            "AND (accredited_until IS NULL OR accredited_until >= ?) "
            "AND (revoked_at IS NULL OR revoked_at >= ?)",
            (last, first, year_start),
        )
    }
    found = []
    for name in sorted({*l1, *l2, *accredited}):
        l1_reads, l1_positive = l1.get(name, (0, 0))
        l2_reads, l2_negative, l2_positive, l2_inadequate = l2.get(name, (0, 0, 0, 0))
        reads_l2 = bool(l2_reads) or name in accredited
        found.append(
            {
                "reader": name,
                "accredited": name in accredited,
                "l1_reads": l1_reads,
                "l1_positive": l1_positive,
                "l1_positive_rate": _rate(l1_positive, l1_reads),
                "l2_reads": l2_reads,
                "l2_negative": l2_negative,
                "l2_positive": l2_positive,
                "l2_inadequate": l2_inadequate,
                "l2_recall_rate": _rate(l2_positive, l2_reads),
                "l2_inadequate_rate": _rate(l2_inadequate, l2_reads),
                "under_l1_minimum": l1_reads < thresholds.l1 if l1_reads else None,
                "under_l2_minimum": l2_reads < thresholds.l2 if reads_l2 else None,
            }
        )
    return found


# -- CSV -------------------------------------------------------------------------------------

#: the export's columns, in order (see the module docstring for the format)
CSV_COLUMNS = (
    "level",  # programme | centre | reader
    "name",  # the centre (site) or the reader (account); empty for the programme
    "year",
    "exams",
    "l1_reads",
    "l1_positive",
    "l1_positive_rate_pct",
    "l2_reads",
    "l2_negative",
    "l2_positive",
    "l2_recall_rate_pct",
    "l2_inadequate",
    "l2_inadequate_rate_pct",
    "accredited",
    "under_l1_minimum",
    "under_l2_minimum",
    "letters",
    "letters_late",
    "late_alerts",
    "turnaround_median_days",
    "turnaround_p90_days",
    "turnaround_max_days",
    "days_0_7",
    "days_8_15",
    "days_16_30",
    "days_over_30",
    "waiting_l1",
    "waiting_l2",
    "waiting_letter",
    "waiting_overdue",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "oui" if value else "non"
    return str(value)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}".replace(".", ",")


def _name(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value


def _row(level: str, name: str, year: int, f: dict[str, Any]) -> list[str]:
    turn = f.get("turnaround") or {}
    buckets = turn.get("buckets") or {}
    waiting = f.get("waiting") or {}
    values: dict[str, Any] = {
        "level": level,
        "name": _name(name),
        "year": year,
        **{k: f.get(k) for k in CSV_COLUMNS if k in f and k != "turnaround"},
        "l1_positive_rate_pct": _pct(f.get("l1_positive_rate")),
        "l2_recall_rate_pct": _pct(f.get("l2_recall_rate")),
        "l2_inadequate_rate_pct": _pct(f.get("l2_inadequate_rate")),
        "turnaround_median_days": turn.get("median"),
        "turnaround_p90_days": turn.get("p90"),
        "turnaround_max_days": turn.get("max"),
        "days_0_7": buckets.get("0-7"),
        "days_8_15": buckets.get("8-15"),
        "days_16_30": buckets.get("16-30"),
        "days_over_30": buckets.get(">30"),
        "waiting_l1": waiting.get("l1"),
        "waiting_l2": waiting.get("l2"),
        "waiting_letter": waiting.get("letter"),
        "waiting_overdue": waiting.get("overdue"),
    }
    return [_cell(values.get(column)) for column in CSV_COLUMNS]


def to_csv(figures: dict[str, Any]) -> bytes:
    """The indicators of :func:`indicators` as the coordination centre's CSV."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";", lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    year = figures["year"]
    writer.writerow(_row("programme", "", year, figures["programme"]))
    for centre in figures["centres"]:
        writer.writerow(_row("centre", centre["site"], year, centre))
    for reader in figures["readers"]:
        writer.writerow(_row("reader", reader["reader"], year, reader))
    return ("\ufeff" + out.getvalue()).encode("utf-8")
