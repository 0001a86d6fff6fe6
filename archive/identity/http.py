"""``/api/identity/...``: the regional patient index over HTTP.

Reads need ``identity.read`` and show only what the caller's scope holds (a
regional identity is listed when one of its local identities has a study in
scope, with those studies' UIDs only); decisions need ``identity.resolve``
(the ``identity-vigilance`` role, and admins).  Each request gets its audit
entry from the security middleware; each change also writes its own entry
(``identity.merged``, ``identity.unmerged``, ``identity.proposal.accepted``...)
in the transaction that makes it.  Errors are RFC 9457 problem details that
say what to do.

| method | path | permission |
| --- | --- | --- |
| GET | /api/identity/identities[?ins=&limit=&offset=] | identity.read |
| GET | /api/identity/identities/{regional_id} | identity.read |
| GET | /api/identity/queue[?state=open|accepted|rejected|resolved|all] | identity.read |
| GET | /api/identity/merges | identity.read |
| POST | /api/identity/queue/{item}/accept  {"note"} | identity.resolve |
| POST | /api/identity/queue/{item}/reject  {"note"} | identity.resolve |
| POST | /api/identity/queue/{item}/resolve {"action": "merge"|"dismiss", "note"} | (same) |
| POST | /api/identity/merge {"survivor", "merged", "note"} | identity.resolve |
| POST | /api/identity/merges/{merge}/unmerge {"note"} | identity.resolve |
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from archive.identity.regional import Actor, IdentityError, RegionalIdentity, RegionalIndex
from archive.security.http import audit_of, principal_of, require, scope_of
from archive.security.scope import Scope
from archive.web import ARCHIVE, problem, read_capped

#: the largest request body accepted (a note and two identifiers)
MAX_BODY = 16 * 1024
STATES = ("open", "accepted", "rejected", "resolved")
_TITLES = {400: "Bad Request", 404: "Not Found", 409: "Conflict", 413: "Payload Too Large"}


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def _index(request: web.Request) -> RegionalIndex:
    archive = request.app[ARCHIVE]
    provider = archive.identity
    if not isinstance(provider, RegionalIdentity):
        raise _Refused(
            404,
            "the regional patient index is not the identity provider here "
            f"(plugins.identity = {archive.config['plugins.identity']!r})",
        )
    return provider.index(archive.db, archive.audit)


def _scope(request: web.Request) -> Scope | None:
    """What identities a caller sees: everything for whoever may resolve the
    queue (identity vigilance is regional: a merge decision needs every site's
    side), the caller's own scope for a reader granted ``identity.read`` only."""
    if principal_of(request).can("identity.resolve"):
        return None
    return scope_of(request)


def _actor(request: web.Request) -> Actor:
    principal = principal_of(request)
    return Actor(principal.name, principal.kind, principal.role, request.remote)


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await read_capped(request, MAX_BODY)
    if raw is None:
        raise _Refused(413, f"the request body is over {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _Refused(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise _Refused(400, "the request body must be a JSON object")
    return body


def _text(body: dict[str, Any], name: str, *, required: bool = False) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or len(value) > 2000:
        raise _Refused(400, f"{name!r} must be a text of at most 2000 characters")
    if required and not value.strip():
        raise _Refused(400, f"{name!r} is required")
    return value.strip()


def _int(text: str, what: str, status: int = 404) -> int:
    """A number from the path (404 when it is none: no such thing) or the
    query (400)."""
    if not text.isdigit() or len(text) > 12:
        if status == 404:
            raise _Refused(404, f"no {what} {text[:40]!r}")
        raise _Refused(400, f"{what} must be a non-negative integer, not {text[:40]!r}")
    return int(text)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _answering(fn: Callable[[web.Request], Awaitable[Any]]) -> Handler:
    """Run ``fn``; its result as JSON, its refusals as problem details."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            result = await fn(request)
        except (_Refused, IdentityError) as exc:
            audit_of(request).detail["error"] = str(exc)
            return problem(exc.status, _TITLES.get(exc.status, "Error"), str(exc))
        return web.json_response(result)

    handle.__name__ = fn.__name__
    return handle


def _route(permission: str, action: str) -> Callable[[Callable], Handler]:
    def wrap(fn: Callable[[web.Request], Awaitable[Any]]) -> Handler:
        return require(permission, action)(_answering(fn))

    return wrap


@_route("identity.read", "identity.list")
async def list_identities(request: web.Request) -> dict[str, Any]:
    index = _index(request)
    limit = min(_int(request.query.get("limit", "100"), "limit", 400), 1000)
    offset = _int(request.query.get("offset", "0"), "offset", 400)
    ins = request.query.get("ins", "").strip()[:20]
    found = await asyncio.to_thread(
        index.identities, _scope(request), ins=ins, limit=limit, offset=offset
    )
    audit_of(request).detail["results"] = len(found)
    return {"identities": found}


@_route("identity.read", "identity.show")
async def show_identity(request: web.Request) -> dict[str, Any]:
    index = _index(request)
    regional_id = request.match_info["regional_id"]
    audit_of(request).detail["regional_id"] = regional_id[:64]
    found = await asyncio.to_thread(index.show, regional_id, _scope(request))
    if found is None:  # unknown, or nothing of it in the caller's scope: the same answer
        raise _Refused(404, f"no regional identity {regional_id[:64]!r}")
    return found


@_route("identity.read", "identity.queue")
async def show_queue(request: web.Request) -> dict[str, Any]:
    index = _index(request)
    state = request.query.get("state", "open")
    if state not in (*STATES, "all"):
        raise _Refused(400, f"state must be one of {', '.join(STATES)} or all, not {state[:20]!r}")
    items = await asyncio.to_thread(index.queue, None if state == "all" else state, 1000)
    return {"items": items}


@_route("identity.read", "identity.merges")
async def list_merges(request: web.Request) -> dict[str, Any]:
    return {"merges": await asyncio.to_thread(_index(request).merges)}


def _decision(kind: str) -> Callable[[web.Request], Awaitable[Any]]:
    async def decide(request: web.Request) -> dict[str, Any]:
        index = _index(request)
        item = _int(request.match_info["item"], "item")
        body = await _body(request)
        note = _text(body, "note")
        audit_of(request).detail["item"] = item
        actor = _actor(request)
        if kind == "accept":
            return {"merge": await asyncio.to_thread(index.accept, item, actor, note)}
        if kind == "reject":
            return await asyncio.to_thread(index.reject, item, actor, note)
        action = _text(body, "action", required=True)
        audit_of(request).detail["resolution"] = action[:20]
        return await asyncio.to_thread(index.resolve, item, actor, action, note)

    decide.__name__ = f"{kind}_item"
    return decide


accept_item = _route("identity.resolve", "identity.accept")(_decision("accept"))
reject_item = _route("identity.resolve", "identity.reject")(_decision("reject"))
resolve_item = _route("identity.resolve", "identity.resolve")(_decision("resolve"))


@_route("identity.resolve", "identity.merge")
async def merge(request: web.Request) -> dict[str, Any]:
    index = _index(request)
    body = await _body(request)
    survivor = _text(body, "survivor", required=True)
    merged = _text(body, "merged", required=True)
    audit_of(request).detail.update({"survivor": survivor[:64], "merged": merged[:64]})
    return await asyncio.to_thread(
        index.merge, survivor, merged, _actor(request), _text(body, "note")
    )


@_route("identity.resolve", "identity.unmerge")
async def unmerge(request: web.Request) -> dict[str, Any]:
    index = _index(request)
    merge_id = _int(request.match_info["merge"], "merge")
    body = await _body(request)
    audit_of(request).detail["merge"] = merge_id
    return await asyncio.to_thread(index.unmerge, merge_id, _actor(request), _text(body, "note"))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/identity/identities", list_identities)
    app.router.add_get("/api/identity/identities/{regional_id}", show_identity)
    app.router.add_get("/api/identity/queue", show_queue)
    app.router.add_get("/api/identity/merges", list_merges)
    app.router.add_post("/api/identity/queue/{item}/accept", accept_item)
    app.router.add_post("/api/identity/queue/{item}/reject", reject_item)
    app.router.add_post("/api/identity/queue/{item}/resolve", resolve_item)
    app.router.add_post("/api/identity/merge", merge)
    app.router.add_post("/api/identity/merges/{merge}/unmerge", unmerge)
