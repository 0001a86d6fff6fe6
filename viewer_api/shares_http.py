"""``/api/shares``: create a share link (its URL shown once), list one's
links, read one, revoke it, read its access log.

Creating needs ``shares.create`` and a study the caller can see: a study
outside its scope is answered 404, as if absent, and audited as denied.  A
link is seen (and revoked) by its creator and by admins; to anyone else it
does not exist (404).  Each request leaves one audit entry (the middleware's),
naming the share.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

from aiohttp import web

from archive.messaging import InvalidMessage, Message, send
from archive.messaging.message import Actor
from archive.security.http import audit_of, principal_of, require
from archive.security.roles import Principal
from archive.web import ARCHIVE, problem, public_base, read_capped
from viewer_api import shares

API = "/api/shares"
_MAX_BODY = 64 * 1024
_FIELDS = {
    "study_uid",
    "series",
    "permissions",
    "audience",
    "expires_at",
    "days",
    "not_before",
    "second_factor",
    "recipient",
}


def _time(value: Any, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise shares.InvalidShare(f"{name} must be an ISO 8601 date-time with an offset")
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise shares.InvalidShare(f"{name}: {value!r} is not an ISO 8601 date-time") from exc


def parse(body: Any) -> shares.Request:
    """The request a JSON body asks for (InvalidShare: what is wrong)."""
    if not isinstance(body, dict):
        raise shares.InvalidShare("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise shares.InvalidShare(f"unknown field {unknown[0]!r}; known: {sorted(_FIELDS)}")
    series = body.get("series")
    if series is not None and not (
        isinstance(series, list) and all(isinstance(s, str) for s in series)
    ):
        raise shares.InvalidShare("series must be a list of series UIDs")
    permissions = body.get("permissions", ["view"])
    if not (isinstance(permissions, list) and all(isinstance(p, str) for p in permissions)):
        raise shares.InvalidShare("permissions must be a list: ['view'] or ['view', 'download']")
    days = body.get("days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, int | float)):
        raise shares.InvalidShare("days must be a number")
    for name in ("study_uid", "audience", "second_factor", "recipient"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise shares.InvalidShare(f"{name} must be a string")
    return shares.Request(
        study_uid=body.get("study_uid") or "",
        series=tuple(series) if series is not None else None,
        permissions=tuple(permissions),
        audience=body.get("audience") or "gp",
        expires_at=_time(body.get("expires_at"), "expires_at"),
        days=days,
        not_before=_time(body.get("not_before"), "not_before"),
        second_factor=body.get("second_factor"),
        recipient=body.get("recipient"),
    )


def link_message(share: shares.Share, url: str) -> Message:
    """The mail that carries a link to its recipient."""
    assert share.recipient
    until = f"{share.expires_at:%d/%m/%Y}"
    factor = {
        "birth_date": (
            "La date de naissance du patient vous sera demandée.",
            "You will be asked for the patient's birth date.",
        ),
        "code": (
            "Un code vous sera envoyé par message à l'ouverture.",
            "A code will be mailed to you when you open it.",
        ),
    }.get(share.second_factor or "", ("", ""))
    return Message(
        to=[share.recipient],
        subject="Images médicales partagées / Shared medical images",
        text=(
            f"Bonjour,\n\n{share.ask} partage avec vous des images médicales, jusqu'au {until} :\n"
            f"{url}\n{factor[0]}\n\n"
            f"Hello,\n\n{share.ask} shares medical images with you, until {until}:\n"
            f"{url}\n{factor[1]}\n"
        ),
        purpose="share-link",
        study_uid=share.study_uid,
    )


def mail_link(archive: Any, share: shares.Share, url: str, by: Principal | str) -> int:
    """Mail ``url`` to the share's recipient through the messaging plugin."""
    actor = (
        Actor(by, "system", site=share.created_site)
        if isinstance(by, str)
        else Actor(by.name, by.kind, role=by.role, site=share.created_site)
    )
    return send(archive, link_message(share, url), by=actor)


def _id(request: web.Request) -> int:
    try:
        value = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound() from None
    audit_of(request).detail["share"] = value
    return value


def _json(data: Any, status: int = 200) -> web.Response:
    response = web.json_response(data, status=status)
    response.headers["Cache-Control"] = "no-store"
    return response


@require(shares.CREATE, "share.create")
async def create(request: web.Request) -> web.Response:
    archive = request.config_dict[ARCHIVE]
    principal = principal_of(request)
    context = audit_of(request)
    try:
        raw = await read_capped(request, _MAX_BODY)
        if raw is None:
            return problem(413, "Payload Too Large", f"the body must be under {_MAX_BODY} bytes")
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            raise shares.InvalidShare(f"the body is not JSON: {exc}") from exc
        asked = parse(body)
        if isinstance(body, dict) and isinstance(body.get("study_uid"), str):
            context.study_uid = body["study_uid"][:64]
        share, secret = await asyncio.to_thread(shares.create, archive, principal, asked)
    except shares.ShareNotFound as exc:
        context.outcome = "denied"
        return problem(404, "Not Found", exc.detail)
    except shares.InvalidShare as exc:
        return problem(400, "Bad Request", exc.detail)
    context.detail["share"] = share.id
    url = f"{public_base(request)}/share/{secret}"
    answer = {**share.as_json(), "url": url}
    if share.recipient:
        try:
            answer["message"] = await asyncio.to_thread(mail_link, archive, share, url, principal)
        except InvalidMessage as exc:  # checked before: a configuration problem
            answer["message_error"] = str(exc)
    response = _json(answer, 201)
    response.headers["Location"] = f"{API}/{share.id}"
    return response


@require(shares.CREATE, "share.list")
async def listing(request: web.Request) -> web.Response:
    archive = request.config_dict[ARCHIVE]
    found = await asyncio.to_thread(shares.listing, archive.db, principal_of(request))
    return _json([s.as_json() for s in found])


async def _one(request: web.Request) -> shares.Share | web.Response:
    archive = request.config_dict[ARCHIVE]
    share_id = _id(request)
    try:
        share = await asyncio.to_thread(shares.of, archive.db, principal_of(request), share_id)
    except shares.ShareNotFound as exc:
        audit_of(request).outcome = "denied"
        return problem(404, "Not Found", exc.detail)
    audit_of(request).study_uid = share.study_uid
    return share


@require(shares.CREATE, "share.read")
async def show(request: web.Request) -> web.Response:
    found = await _one(request)
    return found if isinstance(found, web.Response) else _json(found.as_json())


@require(shares.CREATE, "share.revoke")
async def revoke(request: web.Request) -> web.Response:
    archive = request.config_dict[ARCHIVE]
    found = await _one(request)
    if isinstance(found, web.Response):
        return found
    revoked = await asyncio.to_thread(shares.revoke, archive.db, principal_of(request), found.id)
    return _json(revoked.as_json())


@require(shares.CREATE, "share.accesses")
async def accesses(request: web.Request) -> web.Response:
    archive = request.config_dict[ARCHIVE]
    found = await _one(request)
    if isinstance(found, web.Response):
        return found
    return _json(await asyncio.to_thread(shares.accesses, archive.db, found))


def add_routes(app: web.Application) -> None:
    app.router.add_post(API, create)
    app.router.add_get(API, listing)
    app.router.add_get(API + "/{id}", show)
    app.router.add_delete(API + "/{id}", revoke)
    app.router.add_get(API + "/{id}/accesses", accesses)
