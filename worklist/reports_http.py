"""``/api/worklist/requests/{uid}/report``: a request's report over HTTP.

* ``GET .../report`` -- the report with its addenda and its versions (the
  UIDs of each version's SR and PDF, stored or not, delivered or why not).
  Readers of the request's group and admins see drafts; the requesting site's
  users (``worklist.request``) the validated texts only; anyone else 404.
* ``PUT .../report`` (worklist.write, the holder) -- ``{"indications",
  "technique", "results", "conclusion", "reader_name"?, "transaction_uid"?}``:
  the draft; the chapters sent replace those stored.  The lease is extended.
* ``POST .../report/validate`` (worklist.write, the holder) -- the report is
  signed: immutable, the request COMPLETED, ``report.validated`` recorded,
  the SR and PDF stored and the PDF delivered by a job.
* ``POST .../report/addenda`` (worklist.write, a reader of the group) --
  ``{"text", "author_name"?}`` -> 201 an addendum draft;
  ``POST .../report/addenda/{n}/validate`` (its author) -> a new version.

The Transaction UID is presented as for the worklist's other holder
actions: ``X-Transaction-UID`` or ``transaction_uid`` in the body.

Refusals are problem details, as in :mod:`worklist.http`: a change to a
validated report, an addendum before validation: 409; a late holder: 409
with ``ups_status`` C301 and nothing stored; an oversized chapter or a
member the route does not take: 400 with ``invalid-params``; a request the
caller does not see: 404.  Every call leaves the security middleware's one
audit entry, with the request, the version and the outcome in its detail.

The routes are described in the worklist's OpenAPI document
(:data:`REPORTS_API`, contributed from :func:`add_routes`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from archive.security.http import AUTHENTICATED, audit_of, principal_of, require
from archive.web import ARCHIVE
from worklist import service
from worklist.documents import MAX_ADDENDA, MAX_NAME_CHARS, MAX_REPORT_CHARS, MAX_TEXT_CHARS
from worklist.http import (
    MAX_BODY,
    TRANSACTION_HEADER,
    _body,
    _guarded,
    _may_see,
    _uid,
    _viewer,
    problem,
    transaction_uid_of,
)
from worklist.openapi import (
    TRANSACTION_PARAMETER,
    UID_PARAMETER,
    Fragment,
    contribute,
    json_body,
    ref,
)
from worklist.openapi import problems as problem_responses
from worklist.reports import (
    CHAPTERS,
    DRAFT,
    VALIDATED,
    NoReport,
    Report,
    ReportConflict,
    Reports,
    check_chapters,
)
from worklist.requests import RequestInvalid

BASE = "/api/worklist/requests/{uid}/report"
WRITE = "worklist.write"  # the core's permission (archive/security/roles.py): readers write
DRAFT_KEYS = {*CHAPTERS, "reader_name", "transaction_uid"}
VALIDATE_KEYS = {"reader_name", "transaction_uid"}
ADDENDUM_KEYS = {"text", "author_name"}


def _reports(request: web.Request) -> Reports:
    return Reports(service.worklist_of(request.config_dict[ARCHIVE]))


def _report_errors(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The report's own refusals as problem details (the worklist's are
    :func:`worklist.http._guarded`'s)."""

    async def run(request: web.Request) -> web.Response:
        audit = audit_of(request)
        try:
            return await handler(request)
        except ReportConflict as exc:
            audit.detail["error"] = str(exc)
            return problem(409, "Conflict", str(exc))
        except NoReport as exc:
            audit.detail["error"] = str(exc)
            return problem(404, "Not Found", str(exc))

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    for mark in ("imag_permission", "imag_action"):
        setattr(run, mark, getattr(handler, mark))
    return run


def _known(body: dict[str, Any], keys: set[str]) -> None:
    """400 for members the route does not take: a misspelt ``reader_name``
    must not be signed with the account name unnoticed."""
    unknown = sorted(set(body) - keys)
    if unknown:
        expected = f"unknown member (expected: {', '.join(sorted(keys))})"
        raise RequestInvalid(dict.fromkeys(unknown, expected))


def _name(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestInvalid({key: "must be text"})
    return value


def _answer(request: web.Request, report: Report, status: int = 200) -> web.Response:
    audit = audit_of(request)
    audit.study_uid = report.study_uid
    audit.detail["report_state"] = report.state
    if report.versions:
        audit.detail["version"] = report.versions[-1].version
    return web.json_response(report.as_dict(), status=status)


@require(AUTHENTICATED, "worklist.report.show")
async def show_report(request: web.Request) -> web.Response:
    """The report as the caller may see it."""
    _may_see(principal_of(request))
    report = await asyncio.to_thread(_reports(request).get, _uid(request), _viewer(request))
    return _answer(request, report)


@require(WRITE, "worklist.report.draft")
async def save_draft(request: web.Request) -> web.Response:
    """The holder saves the draft."""
    body = await _body(request)
    expected = f"unknown key (expected: {', '.join(sorted(DRAFT_KEYS))})"
    problems = dict.fromkeys(sorted(set(body) - DRAFT_KEYS), expected)
    chapters = {k: v for k, v in body.items() if k in CHAPTERS}
    try:
        check_chapters(chapters)
    except RequestInvalid as exc:
        problems.update(exc.problems)
    if problems:  # every fault at once
        raise RequestInvalid(problems)
    report = await asyncio.to_thread(
        _reports(request).save_draft,
        _uid(request),
        _viewer(request),
        transaction_uid_of(request, body),
        chapters,
        _name(body, "reader_name"),
    )
    return _answer(request, report)


@require(WRITE, "worklist.report.validate")
async def validate_report(request: web.Request) -> web.Response:
    """The holder signs the report."""
    body = await _body(request, required=False)
    _known(body, VALIDATE_KEYS)
    report = await asyncio.to_thread(
        _reports(request).validate,
        _uid(request),
        _viewer(request),
        transaction_uid_of(request, body),
        _name(body, "reader_name"),
    )
    return _answer(request, report)


@require(WRITE, "worklist.report.addendum")
async def add_addendum(request: web.Request) -> web.Response:
    """A reader of the group adds an addendum draft."""
    body = await _body(request)
    _known(body, ADDENDUM_KEYS)
    reports = _reports(request)
    uid = _uid(request)
    added = await asyncio.to_thread(
        reports.add_addendum, uid, _viewer(request), body.get("text"), _name(body, "author_name")
    )
    audit_of(request).detail["addendum"] = added.number
    report = await asyncio.to_thread(reports.get, uid, _viewer(request))
    return _answer(request, report, status=201)


@require(WRITE, "worklist.report.addendum.validate")
async def validate_addendum(request: web.Request) -> web.Response:
    """The addendum's author signs it: a new version."""
    raw = request.match_info["number"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 4:  # "²".isdigit() too
        raise NoReport(f"no addendum {raw[:8]}")
    audit_of(request).detail["addendum"] = int(raw)
    report = await asyncio.to_thread(
        _reports(request).validate_addendum, _uid(request), int(raw), _viewer(request)
    )
    return _answer(request, report)


# -- the OpenAPI description (worklist.openapi) ------------------------------------------------

_TIME = {"type": "string", "format": "date-time"}
_WHEN = {"type": ["string", "null"], "format": "date-time"}
_TEXT = {"type": "string", "maxLength": MAX_TEXT_CHARS}
_SIGNER = {
    "type": ["string", "null"],
    "minLength": 1,
    "maxLength": MAX_NAME_CHARS,
    "pattern": r"\S",
    "description": f"the name signed with, 1 to {MAX_NAME_CHARS} characters once trimmed "
    "(default: the account name)",
}
_TRANSACTION_UID = {
    "type": ["string", "null"],
    "description": f"the claim's Transaction UID (or the {TRANSACTION_HEADER} header; "
    "both sent must agree)",
}
_INSTANCE = {
    "type": "object",
    "required": ["series_uid", "sop_instance_uid"],
    "properties": {
        "series_uid": {"type": "string", "maxLength": 64},
        "sop_instance_uid": {"type": "string", "maxLength": 64},
    },
}
_CHAPTERS = {
    "indications": "Indications",
    "technique": "Technique",
    "results": "Résultats: the findings",
    "conclusion": "Synthèse / conclusion",
}

SCHEMAS: dict[str, Any] = {
    "Report": {
        "type": "object",
        "description": "a request's report; to the requesting site, validated texts only",
        "required": [
            "request",
            "study_uid",
            "site",
            "reader",
            "reader_name",
            *CHAPTERS,
            "state",
            "created_at",
            "updated_at",
            "validated_at",
            "addenda",
            "versions",
        ],
        "properties": {
            "request": {"type": "string", "description": "the request's UID"},
            "study_uid": {"type": "string"},
            "site": {"type": "string", "description": "the requesting site"},
            "reader": {"type": "string", "description": "the account that wrote or signed"},
            "reader_name": {"type": "string", "description": "the name signed with"},
            **{c: {**_TEXT, "description": meaning} for c, meaning in _CHAPTERS.items()},
            "state": {"type": "string", "enum": [DRAFT, VALIDATED]},
            "created_at": _TIME,
            "updated_at": _TIME,
            "validated_at": _WHEN,
            "addenda": {
                "type": "array",
                "maxItems": MAX_ADDENDA,
                "items": ref("ReportAddendum"),
            },
            "versions": {
                "type": "array",
                "description": "what each validation stored and sent (0: the report)",
                "items": ref("ReportVersion"),
            },
        },
    },
    "ReportAddendum": {
        "type": "object",
        "required": [
            "number",
            "text",
            "author",
            "author_name",
            "state",
            "created_at",
            "validated_at",
        ],
        "properties": {
            "number": {"type": "integer", "minimum": 1, "maximum": MAX_ADDENDA},
            "text": _TEXT,
            "author": {"type": "string"},
            "author_name": {"type": "string"},
            "state": {"type": "string", "enum": [DRAFT, VALIDATED]},
            "created_at": _TIME,
            "validated_at": _WHEN,
        },
    },
    "ReportVersion": {
        "type": "object",
        "description": "version n: the report with its addenda 1..n, as a DICOM SR and an "
        "Encapsulated PDF in new series of the study",
        "required": [
            "version",
            "sr",
            "pdf",
            "created_at",
            "stored",
            "stored_at",
            "message",
            "delivery",
        ],
        "properties": {
            "version": {"type": "integer", "minimum": 0, "maximum": MAX_ADDENDA},
            "sr": _INSTANCE,
            "pdf": _INSTANCE,
            "created_at": _TIME,
            "stored": {"type": "boolean"},
            "stored_at": _WHEN,
            "message": {
                "type": ["integer", "null"],
                "description": "the message that mails the PDF to the requester",
            },
            "delivery": {
                "type": "string",
                "enum": ["pending", "queued", "no address"],
                "description": "no address: the request has no reply_to",
            },
        },
    },
    "ReportDraft": {
        "type": "object",
        "description": "the chapters sent replace those stored (null: emptied); together "
        f"at most {MAX_REPORT_CHARS} characters, the body at most {MAX_BODY} bytes (413)",
        "additionalProperties": False,
        "properties": {
            **{
                c: {"type": ["string", "null"], "maxLength": MAX_TEXT_CHARS, "description": m}
                for c, m in _CHAPTERS.items()
            },
            "reader_name": _SIGNER,
            "transaction_uid": _TRANSACTION_UID,
        },
    },
    "ReportValidation": {
        "type": "object",
        "description": "every chapter must be written to validate",
        "additionalProperties": False,
        "properties": {"reader_name": _SIGNER, "transaction_uid": _TRANSACTION_UID},
    },
    "NewAddendum": {
        "type": "object",
        "description": f"the report with its addenda is at most {MAX_REPORT_CHARS} characters",
        "required": ["text"],
        "additionalProperties": False,
        "properties": {
            "text": {**_TEXT, "minLength": 1, "pattern": r"\S"},
            "author_name": _SIGNER,
        },
    },
}


def _refusals(*statuses: int) -> dict[str, Any]:
    """:func:`worklist.openapi.problems`, with what 404 and 409 mean for a report."""
    responses = problem_responses(*statuses)
    meaning = {
        "404": "no such request that the caller may see (UPS C307), no report (yet: the "
        "requesting site sees validated reports only) or no such addendum",
        "409": "the report or the request refuses the change: validated already, not "
        "validated yet, an addendum draft pending, at most "
        f"{MAX_ADDENDA} addenda; a lease that passed (ups_status C301), a request not "
        "in progress (C310) or final (C300)",
    }
    for status, description in meaning.items():
        if status in responses:
            responses[status] = {**responses[status], "description": description}
    return responses


def _body_of(schema: str, required: bool) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": ref(schema)}}}


_REPORT = json_body(ref("Report"), "the report with its addenda and versions")
_HOLDER = [UID_PARAMETER, TRANSACTION_PARAMETER]
_ADDENDUM_NUMBER = {
    "name": "number",
    "in": "path",
    "required": True,
    "description": "the addendum's number, from 1",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ADDENDA},
}

REPORTS_API = Fragment(
    paths={
        BASE: {
            "get": {
                "operationId": "showReport",
                "summary": "the report (readers of the group and admins also see drafts; "
                "the requesting site the validated texts only)",
                "security": [{"bearer": []}],
                "parameters": [UID_PARAMETER],
                "responses": {"200": _REPORT, **_refusals(403, 404)},
            },
            "put": {
                "operationId": "saveReportDraft",
                "summary": "the holder saves the draft (worklist.write); the lease is extended",
                "security": [{"bearer": []}],
                "parameters": _HOLDER,
                "requestBody": _body_of("ReportDraft", True),
                "responses": {"200": _REPORT, **_refusals(400, 403, 404, 409, 413)},
            },
        },
        BASE + "/validate": {
            "post": {
                "operationId": "validateReport",
                "summary": "the holder signs the report (worklist.write): immutable, the "
                "request COMPLETED, its SR and PDF stored and delivered",
                "security": [{"bearer": []}],
                "parameters": _HOLDER,
                "requestBody": _body_of("ReportValidation", False),
                "responses": {"200": _REPORT, **_refusals(400, 403, 404, 409, 413)},
            },
        },
        BASE + "/addenda": {
            "post": {
                "operationId": "addAddendum",
                "summary": "a reader of the request's group adds an addendum draft to the "
                "validated report (worklist.write)",
                "security": [{"bearer": []}],
                "parameters": [UID_PARAMETER],
                "requestBody": _body_of("NewAddendum", True),
                "responses": {
                    "201": json_body(ref("Report"), "the report with the new addendum draft"),
                    **_refusals(400, 403, 404, 409, 413),
                },
            },
        },
        BASE + "/addenda/{number}/validate": {
            "post": {
                "operationId": "validateAddendum",
                "summary": "the addendum's author signs it (worklist.write): a new version",
                "security": [{"bearer": []}],
                "parameters": [UID_PARAMETER, _ADDENDUM_NUMBER],
                "responses": {"200": _REPORT, **_refusals(403, 404, 409)},
            },
        },
    },
    schemas=SCHEMAS,
)


def add_routes(app: web.Application) -> None:
    """Mount the report's routes beside the worklist's, and describe them in
    its OpenAPI document."""
    routes = [
        ("GET", "", show_report),
        ("PUT", "", save_draft),
        ("POST", "/validate", validate_report),
        ("POST", "/addenda", add_addendum),
        ("POST", "/addenda/{number}/validate", validate_addendum),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, BASE + path, _guarded(_report_errors(handler)))
    contribute(app, REPORTS_API)
