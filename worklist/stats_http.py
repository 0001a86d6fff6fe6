"""``GET /api/worklist/stats``: turnaround figures for a period, and the
worklist's queue gauges in ``/metrics`` (see :mod:`worklist.stats`).

``start`` and ``end`` are ISO date-times with their offset; the default
period is the last 24 hours.  They are compared in UTC, as the index stores
its times (SQLite compares the stored text: a ``+01:00`` bound compared as
written would move the period by an hour), and the answer's ``period`` is
in UTC.  A reader sees the figures of their groups' requests, an admin
everyone's: the same visibility as the worklist itself.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from archive.security.http import principal_of, require
from archive.web import ARCHIVE, problem
from worklist.openapi import Fragment, contribute, json_body, problems, ref
from worklist.service import viewer_of
from worklist.stats import COLLECTOR, stats
from worklist.ups import IN_PROGRESS, PRIORITIES, SCHEDULED, STATES

READ = "worklist.read"
PATH = "/api/worklist/stats"
DEFAULT_PERIOD = timedelta(days=1)
MAX_PERIOD = timedelta(days=366)


def _instant(request: web.Request, name: str) -> datetime | None:
    """The query's ``name`` as an instant in UTC (None when absent)."""
    text = request.query.get(name)
    if text is None:
        return None
    example = "2026-12-05T00:00:00+01:00"
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name}: an ISO 8601 date-time ({example})") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: give the offset (Z or +01:00): {text!r} names no instant")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first representable UTC
        raise ValueError(f"{name}: out of the range of dates ({example})") from None


def _period(request: web.Request, now: datetime) -> tuple[datetime, datetime]:
    """``[start, end)`` in UTC; ValueError says what is wrong with it."""
    end = _instant(request, "end") or now
    try:
        start = _instant(request, "start") or end - DEFAULT_PERIOD
    except OverflowError:  # end on the first day there is
        raise ValueError("start: give it (end is too early for the default period)") from None
    if not start < end or end - start > MAX_PERIOD:
        raise ValueError("start must come before end, at most 366 days apart")
    return start, end


@require(READ, "worklist.stats")
async def get_stats(request: web.Request) -> web.Response:
    """Counts, time to claim, time to report (by priority, group and reader)
    of the requests created in the period, and the queue now."""
    archive = request.config_dict[ARCHIVE]
    now = archive.clock.now()
    try:
        start, end = _period(request, now)
    except ValueError as exc:
        return problem(400, "Bad Request", str(exc))
    viewer = viewer_of(principal_of(request))
    figures = await asyncio.to_thread(stats, archive.db, viewer, now, start, end)
    return web.json_response(figures)


# -- the OpenAPI description (worklist.openapi) ------------------------------------------------

_TIME = {"type": "string", "format": "date-time"}
_SECONDS = {"type": ["number", "null"], "description": "seconds; null when count is 0"}
_COUNT = {"type": "integer", "minimum": 0}


def _by_priority(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": list(PRIORITIES),
        "additionalProperties": False,
        "properties": dict.fromkeys(PRIORITIES, schema),
    }


SCHEMAS: dict[str, Any] = {
    "Turnaround": {
        "type": "object",
        "description": "durations from the request's creation (nearest-rank percentiles)",
        "required": ["count", "mean", "median", "p90", "max"],
        "properties": {
            "count": _COUNT,
            "mean": _SECONDS,
            "median": _SECONDS,
            "p90": _SECONDS,
            "max": _SECONDS,
        },
    },
    "QueueDepth": {
        "type": "object",
        "description": "the open requests now, of one reading group, priority and state",
        "required": ["group", "priority", "state", "count", "overdue"],
        "properties": {
            "group": {"type": ["string", "null"], "description": "null: not assigned"},
            "priority": {"type": "string", "enum": list(PRIORITIES)},
            "state": {"type": "string", "enum": [SCHEDULED, IN_PROGRESS]},
            "count": {"type": "integer", "minimum": 1},
            "overdue": _COUNT,
        },
    },
    "WorklistStats": {
        "type": "object",
        "description": "the requests the caller may see created in [start, end), and the queue now",
        "required": [
            "period",
            "created",
            "states",
            "time_to_claim",
            "time_to_report",
            "reported_late",
            "by_group",
            "by_reader",
            "queue",
        ],
        "properties": {
            "period": {
                "type": "object",
                "description": "in UTC",
                "required": ["start", "end"],
                "properties": {"start": _TIME, "end": _TIME},
            },
            "created": _COUNT,
            "states": {
                "type": "object",
                "description": "how many of them are in each state now",
                "propertyNames": {"enum": list(STATES)},
                "additionalProperties": _COUNT,
            },
            "time_to_claim": _by_priority(ref("Turnaround"), "until first claimed"),
            "time_to_report": _by_priority(ref("Turnaround"), "until completed"),
            "reported_late": _by_priority(_COUNT, "completed after their due time"),
            "by_group": {
                "type": "object",
                "description": 'time to report by reading group ("": not assigned)',
                "additionalProperties": ref("Turnaround"),
            },
            "by_reader": {
                "type": "object",
                "description": "time to report by the reader who completed",
                "additionalProperties": ref("Turnaround"),
            },
            "queue": {"type": "array", "items": ref("QueueDepth")},
        },
    },
}

_INSTANT = "an ISO 8601 date-time with its offset (Z or +01:00)"
STATS_API = Fragment(
    paths={
        PATH: {
            "get": {
                "operationId": "worklistStats",
                "summary": "turnaround figures of a period and the queue now (worklist.read): "
                "a reader's groups, an admin's everyone",
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "start",
                        "in": "query",
                        "description": f"{_INSTANT}; default: 24 hours before end",
                        "schema": _TIME,
                    },
                    {
                        "name": "end",
                        "in": "query",
                        "description": f"{_INSTANT}, excluded; default: now. At most 366 "
                        "days after start",
                        "schema": _TIME,
                    },
                ],
                "responses": {
                    "200": json_body(ref("WorklistStats"), "the figures"),
                    **problems(400, 403),
                },
            }
        }
    },
    schemas=SCHEMAS,
)


async def _watch(app: web.Application) -> None:
    archive = app[ARCHIVE]
    COLLECTOR.watch(archive.db, archive.clock)


async def _unwatch(app: web.Application) -> None:
    COLLECTOR.watch(None)


def add_routes(app: web.Application) -> None:
    """Mount the stats route and describe it in the worklist's OpenAPI
    document; report the queue gauges while the app runs."""
    app.router.add_get(PATH, get_stats)
    contribute(app, STATS_API)
    app.on_startup.append(_watch)
    app.on_cleanup.append(_unwatch)
