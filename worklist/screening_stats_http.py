"""``GET /api/screening/stats`` (JSON) and ``GET /api/screening/stats.csv``:
the screening programme's indicators for a year (:mod:`worklist.screening_stats`),
for the coordination centre only (``screening.coordinate``; an admin too).

``year`` (optional, default: this year by the archive's clock) is four
digits from 2000 to this year; anything else is a 400 problem whose
``invalid-params`` names it.  A site user or a second reader gets 403 from
the security middleware, which writes the request's one audit entry.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from archive.security.http import audit_of, require
from archive.web import ARCHIVE
from worklist.http import problem
from worklist.openapi import Fragment, contribute, json_body, problems, ref
from worklist.screening import COORDINATE
from worklist.screening_stats import (
    BUCKETS,
    CSV_COLUMNS,
    FIRST_YEAR,
    Thresholds,
    check_year,
    indicators,
    to_csv,
)

PATH = "/api/screening/stats"
CSV_PATH = "/api/screening/stats.csv"
CSV_TYPE = "text/csv"


def _year(request: web.Request) -> int | web.Response:
    archive = request.config_dict[ARCHIVE]
    given = request.query.getall("year", [])
    try:
        if len(given) > 1:
            raise ValueError("give one year")
        return check_year(given[0] if given else None, archive.clock.now().date())
    except ValueError as exc:
        audit_of(request).detail["error"] = f"year: {exc}"
        return problem(
            400,
            "Bad Request",
            f"year: {exc}",
            **{"invalid-params": [{"name": "year", "reason": str(exc)}]},
        )


async def _figures(request: web.Request) -> dict[str, Any] | web.Response:
    year = _year(request)
    if isinstance(year, web.Response):
        return year
    audit_of(request).detail["year"] = year
    archive = request.config_dict[ARCHIVE]
    config = archive.config
    return await asyncio.to_thread(
        indicators,
        archive.db,
        year,
        now=archive.clock.now(),
        target_days=config["screening.letter_target_days"],
        thresholds=Thresholds.from_config(config),
    )


@require(COORDINATE, "screening.stats")
async def get_stats(request: web.Request) -> web.Response:
    """The year's indicators, per centre and per reader, as JSON."""
    figures = await _figures(request)
    if isinstance(figures, web.Response):
        return figures
    return web.json_response(figures)


@require(COORDINATE, "screening.stats-export")
async def get_csv(request: web.Request) -> web.Response:
    """The same indicators as the coordination centre's CSV (one row for the
    programme, one per centre, one per reader)."""
    figures = await _figures(request)
    if isinstance(figures, web.Response):
        return figures
    return web.Response(
        body=to_csv(figures),
        content_type=CSV_TYPE,
        charset="utf-8",
        headers={
            "Content-Disposition": (
                f'attachment; filename="depistage-indicateurs-{figures["year"]}.csv"'
            )
        },
    )


# -- the OpenAPI description (worklist.openapi) ------------------------------------------------

_COUNT = {"type": "integer", "minimum": 0}
_RATE = {"type": ["number", "null"], "minimum": 0, "maximum": 1, "description": "null: no reads"}
_DAYS = {"type": ["integer", "null"], "description": "days; null when count is 0"}
_FLAG = {"type": ["boolean", "null"], "description": "null: the reader does not read at it"}
_COUNTS = (
    "exams",
    "l1_reads",
    "l1_positive",
    "l2_reads",
    "l2_negative",
    "l2_positive",
    "l2_inadequate",
    "letters",
    "letters_late",
    "late_alerts",
)
_RATES = ("l1_positive_rate", "l2_recall_rate", "l2_inadequate_rate")

SCHEMAS: dict[str, Any] = {
    "ScreeningTurnaround": {
        "type": "object",
        "description": "exam-to-letter, in calendar days, of the exams whose letters are out "
        "(nearest-rank percentiles)",
        "required": ["count", "median", "p90", "max", "buckets"],
        "properties": {
            "count": _COUNT,
            "median": _DAYS,
            "p90": _DAYS,
            "max": _DAYS,
            "buckets": {
                "type": "object",
                "required": [name for name, _lo, _hi in BUCKETS],
                "properties": {name: _COUNT for name, _lo, _hi in BUCKETS},
            },
        },
    },
    "ScreeningFigures": {
        "type": "object",
        "description": "the indicators of the year's exams of a centre (or of the programme)",
        "required": [*_COUNTS, *_RATES, "turnaround", "waiting"],
        "properties": {
            "site": {"type": "string"},
            **dict.fromkeys(_COUNTS, _COUNT),
            **dict.fromkeys(_RATES, _RATE),
            "turnaround": ref("ScreeningTurnaround"),
            "waiting": {
                "type": "object",
                "description": "exams without their letters yet: waiting for L1, L2, the "
                "letters; overdue: past their due time now",
                "required": ["l1", "l2", "letter", "overdue"],
                "properties": dict.fromkeys(("l1", "l2", "letter", "overdue"), _COUNT),
            },
        },
    },
    "ScreeningReader": {
        "type": "object",
        "description": "a reader's reads of the year's exams",
        "required": [
            "reader",
            "accredited",
            "l1_reads",
            "l1_positive",
            "l1_positive_rate",
            "l2_reads",
            "l2_negative",
            "l2_positive",
            "l2_inadequate",
            "l2_recall_rate",
            "l2_inadequate_rate",
            "under_l1_minimum",
            "under_l2_minimum",
        ],
        "properties": {
            "reader": {"type": "string"},
            "accredited": {"type": "boolean"},
            **dict.fromkeys(
                ("l1_reads", "l1_positive", "l2_reads", "l2_negative", "l2_positive"), _COUNT
            ),
            "l2_inadequate": _COUNT,
            **dict.fromkeys(_RATES, _RATE),
            "under_l1_minimum": _FLAG,
            "under_l2_minimum": _FLAG,
        },
    },
    "ScreeningStats": {
        "type": "object",
        "description": "the programme's indicators over the exams of a year (by exam date)",
        "required": ["year", "target_days", "thresholds", "at", "programme", "centres", "readers"],
        "properties": {
            "year": {"type": "integer"},
            "target_days": {"type": "integer", "minimum": 1},
            "thresholds": {
                "type": "object",
                "required": ["l1_per_year", "l2_per_year"],
                "properties": {"l1_per_year": _COUNT, "l2_per_year": _COUNT},
            },
            "at": {"type": "string", "format": "date-time"},
            "programme": ref("ScreeningFigures"),
            "centres": {"type": "array", "items": ref("ScreeningFigures")},
            "readers": {"type": "array", "items": ref("ScreeningReader")},
        },
    },
}

_YEAR = {
    "name": "year",
    "in": "query",
    "description": f"the exams' year, {FIRST_YEAR} to this year; default: this year",
    "schema": {"type": "integer"},
}
STATS_API = Fragment(
    paths={
        PATH: {
            "get": {
                "operationId": "screeningStats",
                "summary": "the screening programme's indicators per centre and per reader "
                "(screening.coordinate)",
                "security": [{"bearer": []}],
                "parameters": [_YEAR],
                "responses": {
                    "200": json_body(ref("ScreeningStats"), "the indicators"),
                    **problems(400, 403),
                },
            }
        },
        CSV_PATH: {
            "get": {
                "operationId": "screeningStatsCsv",
                "summary": "the same as CSV for the coordination centre (screening.coordinate): "
                "UTF-8 with BOM, ';' separated, decimal comma; columns: " + ", ".join(CSV_COLUMNS),
                "security": [{"bearer": []}],
                "parameters": [_YEAR],
                "responses": {
                    "200": {
                        "description": "one row for the programme, one per centre, one per reader",
                        "content": {CSV_TYPE: {"schema": {"type": "string"}}},
                    },
                    **problems(400, 403),
                },
            }
        },
    },
    schemas=SCHEMAS,
)


def add_routes(app: web.Application) -> None:
    """Mount the indicator routes and describe them in the OpenAPI document."""
    app.router.add_get(PATH, get_stats)
    app.router.add_get(CSV_PATH, get_csv)
    contribute(app, STATS_API)
