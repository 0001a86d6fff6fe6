"""``/api/worklist``: the reading worklist over HTTP.

* ``GET /api/worklist/requests`` -- the requests the caller may see, in
  reading order (priority, due time, arrival): ``{"total", "requests"}``.
  Filters ``state`` (repeatable or comma-separated), ``group``, ``site``,
  ``study_uid``, ``overdue=true|false``, ``limit`` (1-500, default 100),
  ``offset``.
* ``POST /api/worklist/requests`` (worklist.request) -- a site user asks for
  a reading: ``{"study_uid", "priority"?, "due_at"?, "reply_to"?, "site"?,
  "fields": {...}}`` -> 201 and ``Location``.
* ``GET /api/worklist/requests/{uid}`` -- one request; readers also get the
  patient's ``priors`` (every site, through the regional identity).
* ``PATCH /api/worklist/requests/{uid}`` (worklist.request) --
  ``{"fields": {...}}``: the requesting site completes or corrects its request
  while it is SCHEDULED.
* ``POST .../{uid}/claim`` (worklist.write) -> the request with its
  ``transaction_uid``; ``.../heartbeat``, ``.../release``, ``.../cancel``
  (worklist.write, the holder) present it.
* ``POST .../{uid}/cancel-request`` (worklist.request) -- ``{"reason"}``: the
  requester withdraws; a request being read keeps its reader, who is told.

**Who may list and read.**  Readers hold ``worklist.read``, site users
``worklist.request`` (radiologists have both).  A handler declares one
permission, so the two reads declare "authenticated" and refuse (403,
audited) a caller with neither; what each caller then sees is the
worklist's own SQL visibility (its sites as requester, its reading groups as
reader).

**The Transaction UID** of a claim is presented in the ``X-Transaction-UID``
header or as ``{"transaction_uid": ...}`` in the JSON body (the header wins
when both are sent and agree; two different ones are a 400).

**Refusals.**  UPS refusals are problem details (RFC 9457) with the HTTP
status PS3.18 gives them and a member ``ups_status`` (``C302``...); a change
that had already happened answers 200 with the request and a
``Warning: 299 - "B306 ..."`` header, as UPS-RS does.  Invalid input is a
400 whose ``invalid-params`` lists every field at fault.  A request of
another site or group is 404 (C307), indistinguishable from none, and its
audit entry is marked denied.  Every request leaves the security
middleware's one audit entry; the handlers add what they did or why not.

Dates are ISO 8601 with an offset; a due time without one is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from aiohttp import web

from archive.messaging import InvalidMessage
from archive.messaging.message import check_address
from archive.security.http import AUTHENTICATED, audit_of, principal_of, require
from archive.security.roles import Principal
from archive.security.scope import Scope, study_clause
from archive.web import ARCHIVE, read_capped
from worklist import service
from worklist.openapi import REQUESTS_API, contribute
from worklist.openapi import serve as serve_openapi
from worklist.requests import (
    NotAllowed,
    ReadRequest,
    RequestInvalid,
    Viewer,
    check_fields,
    check_priority,
)
from worklist.ups import IN_PROGRESS, STATES, UpsError, UpsWarning

log = logging.getLogger(__name__)

BASE = "/api/worklist"
#: the permissions (the core's worklist.read / .write, worklist.plugin's
#: worklist.request: named here, as importing the plugin would be a cycle)
READ = "worklist.read"
WRITE = "worklist.write"
REQUEST = "worklist.request"
MAX_PAGE = 500
MAX_BODY = 256 * 1024
MAX_UID = 64
TRANSACTION_HEADER = "X-Transaction-UID"
BODY_KEYS = {"study_uid", "priority", "due_at", "reply_to", "site", "fields"}


class _Refused(Exception):
    """Input refused before the domain is asked (answered as problem details)."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    """RFC 9457 problem details, with extension members (``ups_status``,
    ``invalid-params``)."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return web.Response(
        status=status, content_type="application/problem+json", text=json.dumps(body)
    )


def _invalid(problems: Mapping[str, str]) -> web.Response:
    params = [{"name": name, "reason": reason} for name, reason in problems.items()]
    names = ", ".join(problems)
    return problem(400, "Bad Request", f"invalid or missing: {names}", **{"invalid-params": params})


def _guarded(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The domain's refusals as problem details, each noted in the request's
    one audit entry."""

    async def run(request: web.Request) -> web.Response:
        audit = audit_of(request)
        uid = request.match_info.get("uid")
        if uid:
            audit.detail.setdefault("request", uid[:MAX_UID])
        try:
            return await handler(request)
        except _Refused as exc:
            audit.detail["error"] = exc.detail
            return problem(exc.status, exc.title, exc.detail, **exc.extra)
        except RequestInvalid as exc:
            audit.detail["error"] = "invalid: " + ", ".join(exc.problems)
            return _invalid(exc.problems)
        except NotAllowed as exc:
            audit.detail["error"] = str(exc)
            return problem(403, "Forbidden", str(exc))
        except UpsError as exc:
            audit.detail.update({"error": str(exc), "ups_status": exc.code})
            if exc.code == "C307" and uid:
                await audit_hidden(request, uid)
            title = "Not Found" if exc.http == 404 else "Conflict"
            return problem(exc.http, title, str(exc), ups_status=exc.code)
        except UpsWarning as exc:
            audit.detail["warning"] = exc.code
            item = exc.item if isinstance(exc.item, ReadRequest) else None
            body = _shown(request, item) if item is not None else {}
            response = web.json_response(body)
            response.headers["Warning"] = f'299 - "{exc.code} {exc}"'
            return response

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    for mark in ("imag_permission", "imag_action"):
        setattr(run, mark, getattr(handler, mark))
    return run


async def audit_hidden(request: web.Request, uid: str) -> None:
    """A request (workitem) the caller may not see was asked for: if it exists, the
    audit entry says denied and names its study (answered 404 all the same)."""
    archive = request.config_dict[ARCHIVE]
    row = await asyncio.to_thread(
        archive.db.query_one, "SELECT study_uid FROM read_requests WHERE uid = ?", (uid,)
    )
    if row is not None:
        audit = audit_of(request)
        audit.outcome = "denied"
        audit.study_uid = row[0]


# -- helpers -----------------------------------------------------------------------------------


def _viewer(request: web.Request) -> Viewer:
    return service.viewer_of(principal_of(request))


def _may_see(principal: Principal) -> None:
    if not (principal.can(READ) or principal.can(REQUEST)):
        raise _Refused(
            403,
            "Forbidden",
            f"role {principal.role!r} has neither {READ!r} nor {REQUEST!r}",
        )


def _now(request: web.Request) -> datetime:
    return request.config_dict[ARCHIVE].clock.now()


def _shown(request: web.Request, item: ReadRequest) -> dict[str, Any]:
    """The request as this caller sees it: the Transaction UID to its holder only."""
    holder = item.performer is not None and item.performer == principal_of(request).name
    return item.as_dict(_now(request), with_transaction=holder and item.state == IN_PROGRESS)


def _uid(request: web.Request) -> str:
    uid = request.match_info["uid"]
    if len(uid) > MAX_UID:
        raise UpsError("C307", "no such reading request")
    return uid


async def _body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The JSON object of the body ({} when absent and not required)."""
    raw = await read_capped(request, MAX_BODY)
    if raw is None:
        raise _Refused(413, "Content Too Large", f"the body is limited to {MAX_BODY} bytes")
    if not raw.strip():
        if required:
            raise _Refused(400, "Bad Request", "the body must be a JSON object")
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _Refused(400, "Bad Request", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _Refused(400, "Bad Request", "the body must be a JSON object")
    return body


def _text(body: Mapping[str, Any], key: str, problems: dict[str, str]) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        problems[key] = "must be text"
        return ""
    return value.strip()


def _due(value: Any, problems: dict[str, str]) -> datetime | None:
    """An ISO 8601 date-time with its offset (a naive one is ambiguous across
    the sites' time zones: refused)."""
    if value is None:
        return None
    if not isinstance(value, str):
        problems["due_at"] = "an ISO 8601 date-time with its offset (Z or +01:00)"
        return None
    try:
        due = datetime.fromisoformat(value)
    except ValueError:
        problems["due_at"] = "an ISO 8601 date-time with its offset (Z or +01:00)"
        return None
    if due.tzinfo is None or due.utcoffset() is None:
        problems["due_at"] = "a date-time with its offset (Z or +01:00), not a local time"
        return None
    return due


async def _transaction_uid(request: web.Request) -> str | None:
    """The claim's Transaction UID: ``X-Transaction-UID`` or the body's
    ``transaction_uid`` (both sent must agree)."""
    return transaction_uid_of(request, await _body(request, required=False))


def transaction_uid_of(request: web.Request, body: dict[str, Any]) -> str | None:
    """The Transaction UID of ``X-Transaction-UID`` or of the parsed ``body``
    (400 when both are sent and differ): every holder's route reads it so."""
    header = request.headers.get(TRANSACTION_HEADER, "").strip() or None
    sent = body.get("transaction_uid")
    if sent is not None and not isinstance(sent, str):
        raise RequestInvalid({"transaction_uid": "must be text"})
    sent = (sent or "").strip() or None
    if header and sent and header != sent:
        raise RequestInvalid(
            {"transaction_uid": f"differs from the {TRANSACTION_HEADER} header: send one"}
        )
    return header or sent


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise RequestInvalid({name: f"an integer from {low} to {high}"})
    return int(raw)


def _query_flag(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw.lower() not in ("true", "false", "1", "0"):
        raise RequestInvalid({name: "true or false"})
    return raw.lower() in ("true", "1")


def _states(request: web.Request) -> list[str]:
    states = [
        s.strip().upper() for raw in request.query.getall("state", []) for s in raw.split(",")
    ]
    states = [s for s in states if s]
    wrong = [s for s in states if s not in STATES]
    if wrong:
        raise RequestInvalid({"state": f"one or more of {', '.join(STATES)}"})
    return states


# -- reads -------------------------------------------------------------------------------------


@require(AUTHENTICATED, "worklist.list")
async def list_requests(request: web.Request) -> web.Response:
    """The caller's worklist, in reading order."""
    _may_see(principal_of(request))
    archive = request.config_dict[ARCHIVE]
    filters: dict[str, Any] = {
        "states": _states(request),
        "overdue": _query_flag(request, "overdue"),
        "limit": _query_int(request, "limit", 100, 1, MAX_PAGE),
        "offset": _query_int(request, "offset", 0, 0, 2**31 - 1),
    }
    for name in ("group", "site", "study_uid"):
        filters[name] = request.query.get(name) or None
    found, total = await asyncio.to_thread(
        service.worklist_of(archive).listing, _viewer(request), **filters
    )
    audit_of(request).detail.update({"total": total, "shown": len(found)})
    return web.json_response({"total": total, "requests": [_shown(request, r) for r in found]})


@require(AUTHENTICATED, "worklist.show")
async def show_request(request: web.Request) -> web.Response:
    """One request; readers also get the patient's prior studies."""
    principal = principal_of(request)
    _may_see(principal)
    archive = request.config_dict[ARCHIVE]
    item = await asyncio.to_thread(
        service.worklist_of(archive).get, _uid(request), _viewer(request)
    )
    audit_of(request).study_uid = item.study_uid
    body = _shown(request, item)
    if principal.can(READ):
        body["priors"] = await asyncio.to_thread(service.priors, archive, item.study_uid)
    return web.json_response(body)


# -- requesting --------------------------------------------------------------------------------


def _site(principal: Principal, asked: str) -> str:
    site = principal.write_site(asked)
    if site is None:
        if asked:
            raise _Refused(403, "Forbidden", f"you do not act for the site {asked!r}")
        raise RequestInvalid(
            {"site": "you act for several sites (or none): name the one that asks"}
        )
    return site


def _study_exists(db: Any, study_uid: str, scope: Scope | None) -> bool:
    """Whether the study is stored (and, with ``scope``, within it)."""
    where, params = study_clause(scope, "st") if scope is not None else ("1 = 1", [])
    return bool(
        db.scalar(
            f"SELECT 1 FROM studies st WHERE st.study_uid = ? AND {where} LIMIT 1",
            (study_uid, *params),
        )
    )


async def _study_in_scope(request: web.Request, study_uid: str) -> None:
    """404 unless the study exists and the caller may see it (audited denied
    when it exists outside the caller's scope)."""
    archive = request.config_dict[ARCHIVE]
    principal = principal_of(request)
    found = await asyncio.to_thread(_study_exists, archive.db, study_uid, principal.scope)
    if not found:
        exists = await asyncio.to_thread(_study_exists, archive.db, study_uid, None)
        if exists:
            audit_of(request).outcome = "denied"
        raise _Refused(404, "Not Found", f"no study {study_uid} that you may see")


@require(REQUEST, "worklist.create")
async def create_request(request: web.Request) -> web.Response:
    """A site user asks for a reading (tele-expertise)."""
    archive = request.config_dict[ARCHIVE]
    principal = principal_of(request)
    body = await _body(request)
    problems: dict[str, str] = {}
    for key in sorted(set(body) - BODY_KEYS):
        problems[key] = f"unknown member (expected: {', '.join(sorted(BODY_KEYS))})"
    study_uid = _text(body, "study_uid", problems)
    if not study_uid and "study_uid" not in problems:
        problems["study_uid"] = "mandatory: the study to read"
    elif len(study_uid) > MAX_UID:
        problems["study_uid"] = f"a DICOM UID of at most {MAX_UID} characters"
    due = _due(body.get("due_at"), problems)
    reply_to = _text(body, "reply_to", problems)
    if reply_to:
        try:
            check_address(reply_to)
        except InvalidMessage as exc:
            problems["reply_to"] = str(exc)
    asked_site = _text(body, "site", problems)
    priority = body.get("priority", "ROUTINE")
    if not isinstance(priority, str):
        problems["priority"] = "one of STAT, URGENT, ROUTINE"
    fields = body.get("fields", {})
    if not isinstance(fields, dict):
        problems["fields"] = "an object of the clinical fields"
        fields = {}
    # every fault at once (the fields' too), before anything is looked up
    for check, value in ((check_fields, fields), (check_priority, priority)):
        try:
            check(value)
        except RequestInvalid as exc:
            problems.update({k: v for k, v in exc.problems.items() if k not in problems})
    if problems:
        raise RequestInvalid(problems)
    site = _site(principal, asked_site)
    audit_of(request).study_uid = study_uid
    await _study_in_scope(request, study_uid)
    now = _now(request)

    def create() -> ReadRequest:
        worklist = service.worklist_of(archive)
        made = worklist.create(
            study_uid=study_uid,
            site=site,
            group=service.group_on_call(archive, site, now),
            fields=fields,
            created_by=principal.name,
            kind="expertise",
            priority=priority,
            due_at=due,
            reply_to=reply_to,
        )
        service.assign(archive, made)
        return made

    made = await asyncio.to_thread(create)
    audit_of(request).detail.update(
        {"request": made.uid, "site": made.site, "group": made.group, "priority": made.priority}
    )
    response = web.json_response(_shown(request, made), status=201)
    response.headers["Location"] = f"{BASE}/requests/{made.uid}"
    return response


@require(REQUEST, "worklist.complete-fields")
async def patch_request(request: web.Request) -> web.Response:
    """The requesting site fills in what its request lacks."""
    archive = request.config_dict[ARCHIVE]
    body = await _body(request)
    unknown = sorted(set(body) - {"fields"})
    fields = body.get("fields")
    if unknown or not isinstance(fields, dict):
        problems = {k: "unknown member (expected: fields)" for k in unknown}
        if not isinstance(fields, dict):
            problems["fields"] = "an object of the clinical fields to set"
        raise RequestInvalid(problems)
    item = await asyncio.to_thread(
        service.worklist_of(archive).complete_fields, _uid(request), _viewer(request), fields
    )
    audit_of(request).study_uid = item.study_uid
    audit_of(request).detail.update({"changed": sorted(fields), "missing": item.missing})
    return web.json_response(_shown(request, item))


@require(REQUEST, "worklist.cancel-request")
async def cancel_request(request: web.Request) -> web.Response:
    """The requester withdraws: SCHEDULED is canceled at once, IN PROGRESS is
    marked and its reading group told."""
    archive = request.config_dict[ARCHIVE]
    body = await _body(request, required=False)
    unknown = sorted(set(body) - {"reason"})
    reason = body.get("reason", "")
    if unknown or not isinstance(reason, str):
        problems = {k: "unknown member (expected: reason)" for k in unknown}
        if not isinstance(reason, str):
            problems["reason"] = "must be text"
        raise RequestInvalid(problems)

    def withdraw() -> tuple[ReadRequest, int | None]:
        return service.withdraw(archive, _uid(request), _viewer(request), reason.strip())

    item, notified = await asyncio.to_thread(withdraw)
    audit = audit_of(request)
    audit.study_uid = item.study_uid
    audit.detail.update({"state": item.state, "reason": reason.strip()[:200]})
    if notified is not None:
        audit.detail["message"] = notified
    return web.json_response(_shown(request, item))


# -- claims ------------------------------------------------------------------------------------


@require(WRITE, "worklist.claim")
async def claim_request(request: web.Request) -> web.Response:
    """Take the request: 200 with the ``transaction_uid`` every later change presents."""
    archive = request.config_dict[ARCHIVE]
    item = await asyncio.to_thread(
        service.worklist_of(archive).claim, _uid(request), _viewer(request)
    )
    audit_of(request).study_uid = item.study_uid
    audit_of(request).detail["lease_until"] = item.as_dict(_now(request))["lease_until"]
    return web.json_response(item.as_dict(_now(request), with_transaction=True))


def _holder_action(method: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def act(request: web.Request) -> web.Response:
        archive = request.config_dict[ARCHIVE]
        transaction = await _transaction_uid(request)
        worklist = service.worklist_of(archive)
        change = getattr(worklist, method)
        item = await asyncio.to_thread(change, _uid(request), _viewer(request), transaction)
        audit_of(request).study_uid = item.study_uid
        audit_of(request).detail["state"] = item.state
        return web.json_response(_shown(request, item))

    act.__name__ = f"{method}_request"
    return act


heartbeat_request = require(WRITE, "worklist.heartbeat")(_holder_action("holding"))
release_request = require(WRITE, "worklist.release")(_holder_action("release"))
cancel_claimed = require(WRITE, "worklist.cancel")(_holder_action("cancel"))


def add_routes(app: web.Application) -> None:
    """Mount the worklist's routes on the archive's application, and its
    OpenAPI document (``GET /api/worklist/openapi.json``)."""
    routes = [
        ("GET", "/requests", list_requests),
        ("POST", "/requests", create_request),
        ("GET", "/requests/{uid}", show_request),
        ("PATCH", "/requests/{uid}", patch_request),
        ("POST", "/requests/{uid}/claim", claim_request),
        ("POST", "/requests/{uid}/heartbeat", heartbeat_request),
        ("POST", "/requests/{uid}/release", release_request),
        ("POST", "/requests/{uid}/cancel", cancel_claimed),
        ("POST", "/requests/{uid}/cancel-request", cancel_request),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, BASE + path, _guarded(handler))
    contribute(app, REQUESTS_API)
    app.router.add_get(BASE + "/openapi.json", serve_openapi)
