"""``imag serve``: the HTTP side of the archive.

The core serves ``/health`` and ``/metrics``; every other route comes from a
service package (DICOMweb, worklists, viewer API) that registers a setup
function in the ``imag.routes`` entry point group.  That keeps imports
pointing inward: the archive never imports the services around it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Histogram,
    generate_latest,
)

from archive import plugins
from archive.events import event_types
from archive.metrics import node_metrics
from archive.runtime import Archive
from archive.security.http import (
    AUTHENTICATED,
    SECURITY,
    HttpSecurity,
    audit_on_prepare,
    principal_of,
    public,
    require,
    security_middleware,
)
from archive.security.roles import role_permissions
from archive.web import ARCHIVE, problem

log = logging.getLogger(__name__)
#: the largest value of a {bigint} / BIGINT column (sequence numbers, ids)
MAX_BIGINT = 2**63 - 1

HTTP_REQUESTS = Counter("imag_http_requests_total", "HTTP requests", ["method", "status"])
HTTP_SECONDS = Histogram("imag_http_request_seconds", "HTTP request duration", ["method"])


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
        if "Allow" in exc.headers:  # RFC 9110 15.5.6: a 405 names the methods allowed
            response.headers["Allow"] = exc.headers["Allow"]
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


#: more readiness checks of this node (name -> a callable raising when the
#: node is not ready, returning a line to report in place of "ok" or None),
#: e.g. the DICOM listener, set by ``imag serve``
READY_CHECKS = web.AppKey("ready_checks", dict)
_HEALTH_KEY = "health/probe"


def _store_reachable(archive: Archive) -> None:
    archive.store.exists(_HEALTH_KEY)  # a missing key is an answer; an outage raises


@public
async def live(request: web.Request) -> web.Response:
    """Liveness: this process answers (a balancer or systemd restarts it if not)."""
    return web.json_response({"status": "ok", "node": request.config_dict[ARCHIVE].config.node})


@public
async def ready(request: web.Request) -> web.Response:
    """Readiness: this node can do its work -- the index answers a query, the
    object store answers a request, and its DICOM listener (when enabled) is
    accepting -- so a balancer sends it HTTP requests and DICOM associations
    only while it can serve them (503 naming what fails otherwise).  With
    ``dicom.processes`` above 1, ``dicom_processes`` says how many of them
    accept now (one starting again leaves the node ready: the others take
    its connections)."""
    archive = request.config_dict[ARCHIVE]
    checks = {
        "index": lambda: archive.db.scalar("SELECT 1"),
        "storage": lambda: _store_reachable(archive),
        **request.config_dict.get(READY_CHECKS, {}),
    }
    answer: dict[str, str] = {"node": archive.config.node}
    failed = False
    for name, check in checks.items():
        try:
            said = await asyncio.wait_for(asyncio.to_thread(check), timeout=5)
            answer[name] = said if isinstance(said, str) else "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            failed = True
            answer[name] = f"{type(exc).__name__}: {exc}"
    answer["status"] = "error" if failed else "ok"
    return web.json_response(answer, status=503 if failed else 200)


@require("changes.read", "changes.read")
async def changes_feed(request: web.Request) -> web.Response:
    """The change feed: ``GET /changes?since=<seq>&limit=<n>[&type=study.stable]``.

    Entries are oldest first; follow the feed by passing the last ``seq`` seen
    as ``since``.  ``last`` is the highest sequence number returned (or
    ``since`` when nothing new)."""
    from archive import changes

    archive = request.config_dict[ARCHIVE]
    try:
        since = int(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "100"))
        if not 0 <= since <= MAX_BIGINT or not 1 <= limit <= 1000:
            raise ValueError
    except ValueError:
        return problem(
            400, "Bad Request", "since must be an integer from 0 to 2^63-1 and limit 1-1000"
        )
    types = request.query.getall("type", [])
    known = event_types()
    unknown = [t for t in types if t not in known]
    if unknown:
        return problem(
            400,
            "Bad Request",
            f"unknown change type(s) {', '.join(unknown)}: one of {', '.join(known)}",
        )
    rows = await asyncio.to_thread(changes.read, archive.db, since, limit, types)
    return web.json_response(
        {"changes": [c.as_dict() for c in rows], "last": rows[-1].seq if rows else since}
    )


@require("metrics.read", "metrics.scrape")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics; with several processes (dicom.processes), the sum of all."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        body = await asyncio.to_thread(node_metrics, folder)
    else:
        body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@require(AUTHENTICATED, "auth.whoami")
async def whoami(request: web.Request) -> web.Response:
    """Who the credential stands for: name, kind, role, permissions, sites, groups."""
    who = principal_of(request)
    return web.json_response(
        {
            "name": who.name,
            "kind": who.kind,
            "role": who.role,
            "permissions": sorted(role_permissions(who.role)),
            "sites": list(who.sites),
            "groups": list(who.groups),
            "via": who.via,
        }
    )


@require("audit.read", "audit.read")
async def audit_export(request: web.Request) -> web.StreamResponse:
    """The audit trail as JSON lines: ``GET /admin/audit?since=&until=&actor=&action=
    &outcome=&study=&patient=&after=&limit=``."""
    from archive.security.audit import parse_time

    archive = request.config_dict[ARCHIVE]
    q = request.query
    try:
        filters = {
            "since": parse_time(q["since"]) if q.get("since") else None,
            "until": parse_time(q["until"]) if q.get("until") else None,
            "actor": q.get("actor"),
            "action": q.get("action"),
            "outcome": q.get("outcome"),
            "study_uid": q.get("study"),
            "patient_id": q.get("patient"),
            "after_id": int(q.get("after", "0")),
            "limit": int(q.get("limit", "1000")),
        }
        if not 1 <= filters["limit"] <= 100000 or not 0 <= filters["after_id"] <= MAX_BIGINT:
            raise ValueError("limit must be 1-100000 and after an integer from 0 to 2^63-1")
    except ValueError as exc:
        return problem(400, "Bad Request", f"bad audit query: {exc}")
    rows = await asyncio.to_thread(archive.audit.query, **filters)
    body = "".join(json.dumps(r.as_dict(), sort_keys=True) + "\n" for r in rows)
    return web.Response(text=body, content_type="application/x-ndjson")


def make_app(archive: Archive) -> web.Application:
    """The aiohttp application: core routes plus every registered service."""
    app = web.Application(
        middlewares=[errors_and_metrics, security_middleware],
        client_max_size=archive.config["http.max_body_bytes"],
    )
    app[ARCHIVE] = archive
    app[SECURITY] = HttpSecurity(archive)
    app.on_response_prepare.append(audit_on_prepare)
    app[READY_CHECKS] = {}
    app.router.add_get("/health", ready)  # what it always meant: ready to serve
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/health/live", live)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/changes", changes_feed)
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/admin/audit", audit_export)
    plugins.hook().imag_routes(app=app, archive=archive)
    return app


async def serve_http(archive: Archive, host: str, port: int) -> web.AppRunner:
    """Start the HTTP server (HTTPS when http.tls_cert is set); return the
    runner (call ``cleanup`` to stop)."""
    from archive.security.tls import server_context

    config = archive.config
    runner = web.AppRunner(make_app(archive), access_log=None)
    await runner.setup()
    ssl_context = (
        server_context(config["http.tls_cert"], config["http.tls_key"])
        if config["http.tls_cert"]
        else None
    )
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise OSError(
            exc.errno,
            f"port {port} on {host} is already in use by another process: stop it, or "
            "choose another port (http.port in the config file, or IMAG_HTTP_PORT)",
        ) from None
    return runner
