"""``imag serve``: the HTTP side of the archive.

The core serves ``/health`` and ``/metrics``; every other route comes from a
service package (DICOMweb, worklists, viewer API) that registers a setup
function in the ``imag.routes`` entry point group.  That keeps imports
pointing inward: the archive never imports the services around it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from archive.runtime import Archive

log = logging.getLogger(__name__)
ARCHIVE = web.AppKey("archive", Archive)

HTTP_REQUESTS = Counter("imag_http_requests_total", "HTTP requests", ["method", "status"])
HTTP_SECONDS = Histogram("imag_http_request_seconds", "HTTP request duration", ["method"])


def problem(status: int, title: str, detail: str) -> web.Response:
    """An RFC 9457 problem details response."""
    return web.Response(
        status=status,
        content_type="application/problem+json",
        text=json.dumps(
            {"type": "about:blank", "title": title, "status": status, "detail": detail}
        ),
    )


@web.middleware
async def errors_and_metrics(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count and time every request; turn errors into problem details."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = problem(exc.status, exc.reason, exc.text or exc.reason)
    except Exception:  # noqa: BLE001 - the client gets a 500, the log the traceback
        log.exception("request failed", extra={"path": request.path, "method": request.method})
        response = problem(
            500,
            "Internal Server Error",
            "the server failed on this request; the error is in its log",
        )
    HTTP_REQUESTS.labels(request.method, str(response.status)).inc()
    HTTP_SECONDS.labels(request.method).observe(time.perf_counter() - started)
    return response


def public_base(request: web.Request) -> str:
    """The scheme://host[:port] clients use to reach us, for links in answers.

    ``http.public_url`` wins; behind a proxy X-Forwarded-Proto / -Host tell;
    otherwise the Host header, with our port added when a client (such as
    dicomweb-client) leaves it out.
    """
    configured = request.app[ARCHIVE].config["http.public_url"] if ARCHIVE in request.app else ""
    if configured:
        return configured.rstrip("/")
    proto = request.headers.get("X-Forwarded-Proto", request.scheme)
    host = request.headers.get("X-Forwarded-Host")
    if not host:
        host = request.host
        has_port = host.rsplit("]", 1)[-1].count(":") == 1
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not has_port and sockname and sockname[1] not in (80, 443):
            host = f"{host}:{sockname[1]}"
    return f"{proto}://{host}"


async def health(request: web.Request) -> web.Response:
    """Liveness and readiness: the index answers a query."""
    archive = request.app[ARCHIVE]
    try:
        await asyncio.to_thread(archive.db.scalar, "SELECT 1")
    except Exception as exc:  # noqa: BLE001
        return web.json_response({"status": "error", "index": str(exc)}, status=503)
    return web.json_response({"status": "ok"})


async def changes_feed(request: web.Request) -> web.Response:
    """The change feed: ``GET /changes?since=<seq>&limit=<n>[&type=study.stable]``.

    Entries are oldest first; follow the feed by passing the last ``seq`` seen
    as ``since``.  ``last`` is the highest sequence number returned (or
    ``since`` when nothing new)."""
    from archive import changes

    archive = request.app[ARCHIVE]
    try:
        since = int(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "100"))
        if since < 0 or not 1 <= limit <= 1000:
            raise ValueError
    except ValueError:
        return problem(400, "Bad Request", "since must be a non-negative integer and limit 1-1000")
    types = request.query.getall("type", [])
    unknown = [t for t in types if t not in changes.TYPES]
    if unknown:
        return problem(
            400,
            "Bad Request",
            f"unknown change type(s) {', '.join(unknown)}: one of {', '.join(changes.TYPES)}",
        )
    rows = await asyncio.to_thread(changes.read, archive.db, since, limit, types)
    return web.json_response(
        {"changes": [c.as_dict() for c in rows], "last": rows[-1].seq if rows else since}
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics; with several processes (dicom.processes), the sum of all."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from archive.metrics import JOB_QUEUE

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(JOB_QUEUE)  # computed at scrape, not shared through files
        body = generate_latest(registry)
    else:
        body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(archive: Archive) -> web.Application:
    """The aiohttp application: core routes plus every registered service."""
    app = web.Application(middlewares=[errors_and_metrics])
    app[ARCHIVE] = archive
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/changes", changes_feed)
    for ep in entry_points(group="imag.routes"):
        ep.load()(app, archive)
        log.info("routes mounted", extra={"service": ep.name})
    return app


async def serve_http(archive: Archive, host: str, port: int) -> web.AppRunner:
    """Start the HTTP server; return the runner (call ``cleanup`` to stop)."""
    runner = web.AppRunner(make_app(archive), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
