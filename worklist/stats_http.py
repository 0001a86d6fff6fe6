"""``GET /api/worklist/stats``: turnaround figures for a period, and the
worklist's queue gauges in ``/metrics`` (see :mod:`worklist.stats`).

``start`` and ``end`` are ISO date-times with their offset; the default
period is the last 24 hours.  A reader sees the figures of their groups'
requests, an admin everyone's: the same visibility as the worklist itself.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from aiohttp import web

from archive.security.http import principal_of, require
from archive.web import ARCHIVE, problem
from worklist.service import viewer_of
from worklist.stats import COLLECTOR, stats

READ = "worklist.read"
PATH = "/api/worklist/stats"
MAX_PERIOD = timedelta(days=366)


def _instant(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name}: an ISO 8601 date-time (2026-12-05T00:00:00+01:00)") from None
    if value.tzinfo is None:
        raise ValueError(f"{name}: give the offset (Z or +01:00): {text!r} names no instant")
    return value


@require(READ, "worklist.stats")
async def get_stats(request: web.Request) -> web.Response:
    """Counts, time to claim, time to report (by priority, group and reader)
    of the requests created in the period, and the queue now."""
    archive = request.config_dict[ARCHIVE]
    now = archive.clock.now()
    try:
        end = _instant(request, "end") or now
        start = _instant(request, "start") or end - timedelta(days=1)
    except ValueError as exc:
        return problem(400, "Bad Request", str(exc))
    if not start < end or end - start > MAX_PERIOD:
        return problem(400, "Bad Request", "start must come before end, at most 366 days apart")
    viewer = viewer_of(principal_of(request))
    figures = await asyncio.to_thread(stats, archive.db, viewer, now, start, end)
    return web.json_response(figures)


async def _watch(app: web.Application) -> None:
    archive = app[ARCHIVE]
    COLLECTOR.watch(archive.db, archive.clock)


async def _unwatch(app: web.Application) -> None:
    COLLECTOR.watch(None)


def add_routes(app: web.Application) -> None:
    """Mount the stats route; report the queue gauges while the app runs."""
    app.router.add_get(PATH, get_stats)
    app.on_startup.append(_watch)
    app.on_cleanup.append(_unwatch)
