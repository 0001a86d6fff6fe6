"""``/api/messages``: send messages, follow them, retry the failed ones.

* ``GET /api/messages?state=queued|sent|failed&limit=&offset=`` (messaging.read):
  newest first, ``{"messages": [...], "total": n}``;
* ``GET /api/messages/{id}`` (messaging.read): one message, without its body;
* ``POST /api/messages`` (messaging.send): JSON
  ``{"to": [...], "subject", "text", "html"?, "purpose"?, "study_uid"?, "site"?,
  "headers"?, "attachments": [{"filename", "content_type", "data": base64}],
  "xdm"?: {"patient": {"ins" | "local_id", "local_issuer"?, ...},
  "title"?, "author"?: {...}}}`` -> 202 ``{"id", "message_id", "state"}``;
  with ``xdm`` the attachments are also packaged as ``IHE_XDM.ZIP``;
* ``POST /api/messages/{id}/retry`` (messaging.send): a failed message queued again.

A site's users see and retry their site's messages (and their own); admins
see everyone's.  A message of another site is answered 404, audited denied.
Malformed input is a 400 problem, an oversized message 413, and nothing is
queued.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

from aiohttp import web

from archive.messaging import message as messages
from archive.messaging import xdm
from archive.security.http import audit_of, principal_of, require
from archive.security.roles import Principal
from archive.web import ARCHIVE, problem

MAX_PAGE = 1000


def _visibility(principal: Principal) -> messages.Visibility:
    if principal.role == "admin":
        return messages.EVERYONE
    return messages.Visibility(frozenset(s for s in principal.sites if s), principal.name)


def _int(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > high:
        raise web.HTTPBadRequest(text=f"{name} must be an integer from 0 to {high}")
    return int(raw)


@require("messaging.read", "message.list")
async def list_messages(request: web.Request) -> web.Response:
    archive = request.app[ARCHIVE]
    state = request.query.get("state")
    if state is not None and state not in messages.STATES:
        return problem(400, "Bad Request", f"state must be one of {', '.join(messages.STATES)}")
    limit = _int(request, "limit", 100, MAX_PAGE)
    offset = _int(request, "offset", 0, 2**31 - 1)
    found, total = await asyncio.to_thread(
        messages.listing,
        archive.db,
        state=state,
        visible=_visibility(principal_of(request)),
        limit=limit,
        offset=offset,
    )
    return web.json_response({"messages": [m.as_dict() for m in found], "total": total})


async def _visible(request: web.Request) -> messages.MessageRecord:
    """The message of the path, or 404 (audited denied when it exists but
    belongs to another site)."""
    archive = request.app[ARCHIVE]
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise web.HTTPNotFound(text=f"no message {raw}")
    ident = int(raw)
    audit_of(request).detail["message"] = ident
    record = await asyncio.to_thread(
        messages.get, archive.db, ident, _visibility(principal_of(request))
    )
    if record is None:
        if await asyncio.to_thread(messages.exists, archive.db, ident):
            audit_of(request).outcome = "denied"
        raise web.HTTPNotFound(text=f"no message {ident}")
    audit_of(request).study_uid = record.study_uid
    return record


@require("messaging.read", "message.show")
async def show_message(request: web.Request) -> web.Response:
    record = await _visible(request)
    return web.json_response(record.as_dict())


@require("messaging.send", "message.retry")
async def retry_message(request: web.Request) -> web.Response:
    archive = request.app[ARCHIVE]
    record = await _visible(request)
    principal = principal_of(request)
    try:
        await asyncio.to_thread(
            messages.retry, archive, record.id, by=_actor(request, principal, record.site)
        )
    except messages.MessageStateError as exc:
        return problem(409, "Conflict", str(exc))
    updated = await asyncio.to_thread(messages.get, archive.db, record.id)
    return web.json_response(updated.as_dict() if updated else {}, status=202)


def _actor(request: web.Request, principal: Principal, site: str) -> messages.Actor:
    return messages.Actor(
        principal.name,
        kind=principal.kind,
        role=principal.role,
        site=site,
        source=request.remote,
    )


async def _body(request: web.Request, limit: int) -> Any:
    """The JSON body, read up to ``limit`` bytes (413 beyond)."""
    if request.content_length is not None and request.content_length > limit:
        raise _TooLarge(f"the request body is {request.content_length} bytes: at most {limit}")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise messages.InvalidMessage(f"the body is not JSON: {exc}") from None


class _TooLarge(Exception):
    pass


def _list_of_text(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise messages.InvalidMessage(f"{what} must be a list of text")
    return value


def _attachments(value: Any) -> list[messages.Attachment]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise messages.InvalidMessage("attachments must be a list")
    found = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("data"), str):
            raise messages.InvalidMessage(
                "each attachment is {filename, content_type, data (base64)}"
            )
        try:
            data = base64.b64decode(item["data"], validate=True)
        except (binascii.Error, ValueError):
            raise messages.InvalidMessage(
                f"attachment {item.get('filename')!r}: data is not base64"
            ) from None
        found.append(
            messages.Attachment(
                item.get("filename", ""),
                item.get("content_type", "application/octet-stream"),
                data,
            )
        )
    return found


def _text_field(body: dict, name: str, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is not None and not isinstance(value, str):
        raise messages.InvalidMessage(f"{name} must be text")
    return value


def _package(spec: Any, attachments: list[messages.Attachment], body: dict, archive: Any):
    """The IHE_XDM.ZIP of the attachments, as ``spec`` describes the patient."""
    if not isinstance(spec, dict) or not isinstance(spec.get("patient"), dict):
        raise messages.InvalidMessage("xdm needs {patient: {ins | local_id, ...}}")
    if not attachments:
        raise messages.InvalidMessage("xdm needs at least one attachment to package")
    patient_fields = {f for f in xdm.Patient.__dataclass_fields__}
    author_fields = {f for f in xdm.Author.__dataclass_fields__}
    patient_spec, author_spec = spec["patient"], spec.get("author") or {}
    if not isinstance(author_spec, dict):
        raise messages.InvalidMessage("xdm.author must be an object")
    for given, known, what in (
        (patient_spec, patient_fields, "xdm.patient"),
        (author_spec, author_fields, "xdm.author"),
    ):
        unknown = sorted(set(given) - known)
        if unknown or not all(isinstance(v, str) for v in given.values()):
            raise messages.InvalidMessage(
                f"{what}: text fields among {', '.join(sorted(known))}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
    try:
        return xdm.package(
            xdm.Submission(
                xdm.Patient(**patient_spec),
                [
                    xdm.Document(a.data, a.content_type, a.filename, original_name=a.filename)
                    for a in attachments
                ],
                author=xdm.Author(**author_spec),
                title=_text_field(spec, "title", "") or body.get("subject", ""),
                recipients=body.get("to", []),
                source_id=archive.config["messaging.xdm.source_oid"],
                sender=archive.config.node,
            ),
            now=archive.clock.now(),
        )
    except xdm.XdmError as exc:
        raise messages.InvalidMessage(f"xdm: {exc}") from None


@require("messaging.send", "message.send")
async def send_message(request: web.Request) -> web.Response:
    archive = request.app[ARCHIVE]
    principal = principal_of(request)
    limit = archive.config["messaging.max_message_bytes"]
    try:
        # base64 is 4/3 of the bytes; the rest of the JSON is small
        body = await _body(request, limit * 4 // 3 + 256 * 1024)
        if not isinstance(body, dict):
            raise messages.InvalidMessage("the body is a JSON object")
        site = principal.write_site(_text_field(body, "site", "") or "")
        if site is None:
            return problem(
                403 if body.get("site") else 400,
                "Forbidden" if body.get("site") else "Bad Request",
                "name one of your sites in 'site'"
                if not body.get("site")
                else f"{body.get('site')!r} is not one of your sites",
            )
        headers = body.get("headers") or {}
        if not isinstance(headers, dict):
            raise messages.InvalidMessage("headers must be an object")
        attachments = _attachments(body.get("attachments"))
        if body.get("xdm") is not None:
            attachments = [_package(body["xdm"], attachments, body, archive), *attachments]
        message = messages.Message(
            to=_list_of_text(body.get("to"), "to"),
            subject=_text_field(body, "subject", "") or "",
            text=_text_field(body, "text", "") or "",
            html=_text_field(body, "html"),
            attachments=attachments,
            headers=headers,
            purpose=_text_field(body, "purpose", "") or "",
            study_uid=_text_field(body, "study_uid"),
        )
        if message.study_uid:
            audit_of(request).study_uid = message.study_uid
        ref = await asyncio.to_thread(
            messages.send, archive, message, by=_actor(request, principal, site)
        )
    except _TooLarge as exc:
        return problem(413, "Payload Too Large", f"{exc} (messaging.max_message_bytes)")
    except messages.MessageTooLarge as exc:
        return problem(413, "Payload Too Large", str(exc))
    except messages.InvalidMessage as exc:
        return problem(400, "Bad Request", str(exc))
    audit_of(request).detail["message"] = ref
    record = await asyncio.to_thread(messages.get, archive.db, ref)
    assert record is not None
    return web.json_response(
        {"id": ref, "message_id": record.message_id, "state": record.state}, status=202
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/api/messages", list_messages)
    app.router.add_post("/api/messages", send_message)
    app.router.add_get("/api/messages/{id}", show_message)
    app.router.add_post("/api/messages/{id}/retry", retry_message)
