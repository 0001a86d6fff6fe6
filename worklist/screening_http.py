"""``/api/screening``: screening mammography second reading over HTTP.

The handlers are thin: what may be done, by whom and in which state is the
domain's (:class:`worklist.screening.Screening`); here the input is read and
checked, the domain's refusals become problem details (RFC 9457), and the
security middleware's one audit entry per request is named and enriched.

* ``GET /exams`` -- the exams the caller may see, oldest exam first:
  ``{"total", "exams"}``.  The coordination centre sees every exam; a site's
  users their site's exams, *without* the second reader's identity; an
  accredited second reader the exams of the L2 queue (and those they read).
  Filters ``state``, ``site``; ``limit`` (1-500) and ``offset``.
* ``GET /exams/{study}`` -- one exam, with the woman's other studies
  (``priors``) found through her regional identity: for a site's users only
  those of their own sites, for second readers and the centre every site.
  Second readers also get ``viewer``, the mammography layout's page (the
  client appends ``#token=...``).  Another site's exam is 404, audited denied.
* ``POST /exams/{study}/first-reading`` (screening.first-read) -- the L1
  reading -> 201 with the exam; negative at L1, it enters the L2 queue.
* ``GET /queue`` (screening.read) -- the L2 queue of an accredited reader:
  ``{"total", "exams"}``, each with its reading ``request``.
* ``POST /exams/{study}/claim`` (screening.write) -> the exam, its reading
  ``request``, the ``transaction_uid`` and ``lease_until``;
  ``.../heartbeat``, ``.../release`` and ``.../verdict`` present that
  Transaction UID (``X-Transaction-UID`` or ``transaction_uid`` in the body,
  as on ``/api/worklist``).  The claims are the worklist's: a taken exam is
  409 ``ups_status`` C302, a missing or wrong Transaction UID C301.
* ``GET /readers``, ``PUT /readers/{name}`` ``{"accredited_from",
  "accredited_until"?, "reference"}``, ``DELETE /readers/{name}``
  (screening.coordinate) -- second readers' accreditations.

The routes are described in the worklist's OpenAPI document
(``/api/worklist/openapi.json``) by :data:`SCREENING_API`.  The programme's
letters and indicators (``/api/screening/stats``) are another module's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import date
from typing import Any
from urllib.parse import quote

from aiohttp import web

from archive.security.http import AUTHENTICATED, audit_of, principal_of, require
from archive.security.roles import Principal
from archive.web import ARCHIVE
from worklist import service
from worklist.http import (
    MAX_PAGE,
    MAX_UID,
    _body,
    _guarded,
    _query_int,
    _Refused,
    _shown,
    problem,
    transaction_uid_of,
)
from worklist.openapi import (
    TRANSACTION_PARAMETER,
    Fragment,
    contribute,
    json_body,
    problems,
    ref,
)
from worklist.requests import NotAllowed, ReadRequest, RequestInvalid
from worklist.screening import (
    COORDINATE,
    FIRST_READ,
    SECOND_READ,
    SEE_QUEUE,
    STATES,
    Exam,
    Screening,
    ScreeningError,
)
from worklist.screening_readings import (
    BREASTS,
    DENSITIES,
    MAX_TEXT,
    OLD_DENSITY,
    OUTCOMES,
    RECIPIENTS,
    VERDICTS,
    VIEWS,
    ReadingInvalid,
)
from worklist.screening_service import screening_of
from worklist.ups import UpsWarning

BASE = "/api/screening"
EXAM = BASE + "/exams/{study}"
#: the mammography layout of the viewer (viewer_api); the client appends #token=
VIEWER_PAGE = "/share/view?layout=mammography&study="
MAX_NAME = 128  # an account name (archive.security.principals)
MAX_REFERENCE = 200
HOLDER_KEYS = {"transaction_uid"}
ACCREDITATION_KEYS = {"accredited_from", "accredited_until", "reference"}


# -- the domain's refusals ---------------------------------------------------------------------


def _screening_errors(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The screening domain's refusals as problem details (the worklist's
    claims' own are :func:`worklist.http._guarded`'s, which wraps this).  An
    exam hidden from the caller is 404 like a missing one, but its audit
    entry says denied."""

    async def run(request: web.Request) -> web.Response:
        audit = audit_of(request)
        try:
            return await handler(request)
        except ReadingInvalid as exc:
            raise RequestInvalid(exc.problems) from None
        except _Refused as exc:
            if exc.status != 400:
                raise
            # not JSON, or not an object: said in invalid-params like any other fault
            raise RequestInvalid({"body": exc.detail}) from None
        except ScreeningError as exc:
            audit.detail["error"] = str(exc)
            if exc.status == 404:
                await _audit_hidden(request)
                return problem(404, "Not Found", str(exc))
            return problem(exc.status, "Conflict", str(exc))

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    for mark in ("imag_permission", "imag_action"):
        setattr(run, mark, getattr(handler, mark))
    return run


async def _audit_hidden(request: web.Request) -> None:
    """The exam asked for exists but not for this caller: audited denied,
    naming its study (the answer is the 404 of a missing exam)."""
    study = request.match_info.get("study", "")
    if not study or len(study) > MAX_UID:
        return
    db = request.config_dict[ARCHIVE].db
    found = await asyncio.to_thread(
        db.scalar, "SELECT 1 FROM screening_exams WHERE study_uid = ?", (study,)
    )
    if found:
        audit = audit_of(request)
        audit.outcome = "denied"
        audit.study_uid = study


# -- helpers -----------------------------------------------------------------------------------


def _screening(request: web.Request) -> Screening:
    return screening_of(request.config_dict[ARCHIVE])


def _study(request: web.Request) -> str:
    """The exam's study UID from the path (a UID too long to be one names no exam)."""
    study = request.match_info["study"]
    if len(study) > MAX_UID:
        audit_of(request).study_uid = None
        raise ScreeningError("no screening exam with such a study UID", 404)
    return study


def _holder_body(request: web.Request, body: dict[str, Any]) -> str | None:
    """The Transaction UID of a holder's call without a reading in its body."""
    unknown = sorted(set(body) - HOLDER_KEYS)
    if unknown:
        raise RequestInvalid(dict.fromkeys(unknown, "unknown member (expected: transaction_uid)"))
    return transaction_uid_of(request, body)


def _shown_exam(exam: Exam, as_site: bool) -> dict[str, Any]:
    return exam.as_dict(for_site=as_site)


def _with_request(request: web.Request, exam: Exam, item: ReadRequest) -> dict[str, Any]:
    """The exam as its second reader sees it, with its reading request; the
    Transaction UID (to the holder only, as on /api/worklist) and the lease
    at the top."""
    shown = _shown(request, item)
    body = _shown_exam(exam, False)
    body["request"] = shown
    body["transaction_uid"] = shown.get("transaction_uid")
    body["lease_until"] = shown["lease_until"]
    return body


def _note(request: web.Request, exam: Exam, **detail: Any) -> None:
    """The request's audit entry names the exam's study and what became of it."""
    audit = audit_of(request)
    audit.study_uid = exam.study_uid
    audit.detail.update({"site": exam.site, "state": exam.state, **detail})


def _priors(archive: Any, exam: Exam, principal: Principal, as_site: bool) -> list[dict[str, Any]]:
    """The woman's other studies through her regional identity, each with its
    screening round if it is one.  A site's users get those of their own
    sites only: the other sites' studies are not theirs to know of."""
    found = service.priors(archive, exam.study_uid)
    if as_site:
        found = [p for p in found if p["site"] in principal.sites]
    rounds: dict[str, dict[str, Any]] = {}
    if found:
        uids = [p["study_uid"] for p in found]
        rows = archive.db.query(
            "SELECT study_uid, exam_date, state, outcome FROM screening_exams "
            f"WHERE study_uid IN ({', '.join('?' * len(uids))})",
            uids,
        )
        rounds = {r[0]: {"exam_date": r[1], "state": r[2], "outcome": r[3]} for r in rows}
    return [{**p, "screening": rounds.get(p["study_uid"])} for p in found]


def _may_list(screening: Screening, principal: Principal) -> None:
    """403 unless the caller sees exams in some capacity (the centre, a
    site's user, an accredited second reader: the refusal says what is
    missing)."""
    if principal.role == "admin" or principal.can(COORDINATE):
        return
    if principal.sites and principal.can("studies.read"):
        return
    if principal.can(SEE_QUEUE):
        screening.second_reader(principal)  # NotAllowed says: the role, or the accreditation
        return
    raise NotAllowed(
        f"role {principal.role!r} sees no screening exams: a site's users, accredited second "
        "readers and the screening coordination centre do"
    )


# -- exams -------------------------------------------------------------------------------------


@require(AUTHENTICATED, "screening.list")
async def list_exams(request: web.Request) -> web.Response:
    """The exams the caller may see, oldest exam first."""
    principal = principal_of(request)
    screening = _screening(request)
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise RequestInvalid({"state": f"one of {', '.join(STATES)}"})
    site = request.query.get("site")
    if site is not None and len(site) > MAX_NAME:
        raise RequestInvalid({"site": f"a site name of at most {MAX_NAME} characters"})
    limit = _query_int(request, "limit", 100, 1, MAX_PAGE)
    offset = _query_int(request, "offset", 0, 0, 2**31 - 1)

    def find() -> tuple[list[Exam], int, bool]:
        _may_list(screening, principal)
        return screening.listing(principal, state=state, site=site, limit=limit, offset=offset)

    exams, total, as_site = await asyncio.to_thread(find)
    audit_of(request).detail.update({"total": total, "shown": len(exams)})
    return web.json_response({"total": total, "exams": [_shown_exam(e, as_site) for e in exams]})


@require(AUTHENTICATED, "screening.show")
async def show_exam(request: web.Request) -> web.Response:
    """One exam with the woman's priors (and, for a second reader, the viewer's page)."""
    principal = principal_of(request)
    archive = request.config_dict[ARCHIVE]
    study = _study(request)

    def find() -> dict[str, Any]:
        exam, as_site = screening_of(archive).get(study, principal)
        body = _shown_exam(exam, as_site)
        body["priors"] = _priors(archive, exam, principal, as_site)
        if not as_site and principal.can(SEE_QUEUE):
            body["viewer"] = VIEWER_PAGE + quote(exam.study_uid, safe="")
        return body

    body = await asyncio.to_thread(find)
    audit_of(request).detail.update({"site": body["site"], "state": body["state"]})
    return web.json_response(body)


@require(FIRST_READ, "screening.first-reading")
async def record_first_reading(request: web.Request) -> web.Response:
    """The producing site's radiologist records the L1 reading."""
    study = _study(request)
    payload = await _body(request)
    exam = await asyncio.to_thread(
        _screening(request).record_l1, study, principal_of(request), payload
    )
    _note(request, exam, l1_outcome=exam.l1_outcome)
    response = web.json_response(_shown_exam(exam, True), status=201)
    response.headers["Location"] = f"{BASE}/exams/{quote(exam.study_uid, safe='')}"
    return response


# -- the second reading ------------------------------------------------------------------------


@require(SEE_QUEUE, "screening.queue")
async def show_queue(request: web.Request) -> web.Response:
    """The L2 queue of an accredited reader, oldest exam first."""
    limit = _query_int(request, "limit", 100, 1, MAX_PAGE)
    offset = _query_int(request, "offset", 0, 0, 2**31 - 1)
    found, total = await asyncio.to_thread(
        _screening(request).queue, principal_of(request), limit=limit, offset=offset
    )
    audit_of(request).detail.update({"total": total, "shown": len(found)})
    exams = [_with_request(request, exam, item) for exam, item in found]
    return web.json_response({"total": total, "exams": exams})


@require(SECOND_READ, "screening.claim")
async def claim_exam(request: web.Request) -> web.Response:
    """Take the exam's second reading: the Transaction UID every later call presents."""
    study = _study(request)
    exam, item = await asyncio.to_thread(_screening(request).claim, study, principal_of(request))
    body = _with_request(request, exam, item)
    _note(request, exam, request_uid=item.uid, lease_until=body["lease_until"])
    return web.json_response(body)


def _holder_action(method: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def act(request: web.Request) -> web.Response:
        study = _study(request)
        transaction = _holder_body(request, await _body(request, required=False))
        change = getattr(_screening(request), method)
        exam, item = await asyncio.to_thread(change, study, principal_of(request), transaction)
        _note(request, exam, request_uid=item.uid, request_state=item.state)
        return web.json_response(_with_request(request, exam, item))

    act.__name__ = f"{method}_exam"
    act.__doc__ = f"The holder's {method} of the exam's second reading."
    return act


heartbeat_exam = require(SECOND_READ, "screening.heartbeat")(_holder_action("holding"))
release_exam = require(SECOND_READ, "screening.release")(_holder_action("release"))


@require(SECOND_READ, "screening.verdict")
async def record_verdict(request: web.Request) -> web.Response:
    """The holder's verdict closes the exam (there is no third reading)."""
    study = _study(request)
    body = await _body(request)
    transaction = transaction_uid_of(request, body)
    payload = {k: v for k, v in body.items() if k != "transaction_uid"}
    screening = _screening(request)

    def decide() -> Exam:
        try:
            return screening.verdict(study, principal_of(request), transaction, payload)
        except UpsWarning:
            # the worklist's "already completed" (B306) answers 200 with the request; here
            # a second verdict changes nothing and shows nothing: refused
            raise ScreeningError(
                "the second reading of this exam is done: there is no third reading"
            ) from None

    exam = await asyncio.to_thread(decide)
    _note(request, exam, verdict=exam.l2_verdict, outcome=exam.outcome)
    return web.json_response(_shown_exam(exam, False))


# -- accreditations ----------------------------------------------------------------------------


def _reader_name(request: web.Request) -> str:
    name = request.match_info["name"]
    audit_of(request).detail["reader"] = name[:MAX_NAME]
    if not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise RequestInvalid({"name": f"an account name: 1 to {MAX_NAME} printable characters"})
    return name


def _date(body: Mapping[str, Any], key: str, faults: dict[str, str]) -> date | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, str) and len(value) == 10:
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    faults[key] = "a date, YYYY-MM-DD"
    return None


def _accreditation(body: Mapping[str, Any]) -> tuple[date, date | None, str]:
    """The accreditation sent, every fault at once."""
    problems: dict[str, str] = {}
    for key in sorted(set(body) - ACCREDITATION_KEYS):
        problems[key] = f"unknown member (expected: {', '.join(sorted(ACCREDITATION_KEYS))})"
    since = _date(body, "accredited_from", problems)
    if since is None and "accredited_from" not in problems:
        problems["accredited_from"] = "mandatory: the first day of the accreditation (YYYY-MM-DD)"
    until = _date(body, "accredited_until", problems)
    reference = body.get("reference")
    if not isinstance(reference, str) or not reference.strip():
        problems["reference"] = "mandatory: the accreditation's reference (decision, register)"
    elif len(reference) > MAX_REFERENCE or not reference.isprintable():
        problems["reference"] = f"at most {MAX_REFERENCE} printable characters"
    if since is not None and until is not None and until < since:
        problems["accredited_until"] = "on or after accredited_from"
    if problems or since is None:
        raise RequestInvalid(problems)
    return since, until, str(reference).strip()


@require(COORDINATE, "screening.readers.list")
async def list_readers(request: web.Request) -> web.Response:
    """Every second reader's accreditation, with whether it is current today."""
    readers = await asyncio.to_thread(_screening(request).readers)
    audit_of(request).detail["total"] = len(readers)
    return web.json_response({"readers": readers})


@require(COORDINATE, "screening.readers.accredit")
async def accredit_reader(request: web.Request) -> web.Response:
    """Record or renew a second reader's accreditation (201 when new)."""
    name = _reader_name(request)
    since, until, reference = _accreditation(await _body(request))
    screening = _screening(request)
    principal = principal_of(request)

    def accredit() -> tuple[dict[str, Any], bool]:
        new = screening.reader(name) is None
        try:
            return screening.accredit(
                name,
                accredited_from=since,
                accredited_until=until,
                reference=reference,
                by=principal,
            ), new
        except ValueError as exc:
            key, _, reason = str(exc).partition(": ")
            raise RequestInvalid({key: reason or str(exc)}) from None

    reader, new = await asyncio.to_thread(accredit)
    audit_of(request).detail.update(
        {
            "accredited_from": reader["accredited_from"],
            "accredited_until": reader["accredited_until"],
            "reference": reference,
        }
    )
    return web.json_response(reader, status=201 if new else 200)


@require(COORDINATE, "screening.readers.revoke")
async def revoke_reader(request: web.Request) -> web.Response:
    """End a second reader's accreditation now."""
    name = _reader_name(request)
    reader = await asyncio.to_thread(_screening(request).revoke, name, principal_of(request))
    if reader is None:
        raise ScreeningError(f"no accreditation of {name}", 404)
    audit_of(request).detail["revoked_at"] = reader["revoked_at"]
    return web.json_response(reader)


# -- the OpenAPI description (worklist.openapi) ------------------------------------------------

_TIME = {"type": "string", "format": "date-time"}
_DATE = {"type": "string", "format": "date"}


def _nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"anyOf": [dict(schema), {"type": "null"}]}


_BREAST_L1 = {
    "type": "object",
    "required": ["acr", "density"],
    "properties": {
        "acr": {"type": "integer", "minimum": 0, "maximum": 5, "description": "ACR assessment"},
        "density": {
            "type": ["string", "integer"],
            "description": "A-D, or the older 1-4 (mapped to A-D)",
            "enum": [*DENSITIES, *OLD_DENSITY, *(int(k) for k in OLD_DENSITY)],
        },
    },
}
_FINDING = {
    "type": "object",
    "required": ["acr", "location", "further_exams"],
    "properties": {
        "acr": {"type": "integer", "minimum": 3, "maximum": 5},
        "location": {"type": "string", "maxLength": MAX_TEXT},
        "further_exams": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", "maxLength": 200},
            "description": "e.g. ultrasound, magnified views, spot compression, MRI, biopsy",
        },
    },
}

SCHEMAS: dict[str, Any] = {
    "FirstReading": {
        "type": "object",
        "description": "the L1 reading: negative (both breasts ACR 1-2, or a negative "
        "immediate work-up) enters the L2 queue; otherwise the exam is closed at L1",
        "required": list(BREASTS),
        "additionalProperties": False,
        "properties": {
            **dict.fromkeys(BREASTS, _BREAST_L1),
            "bdi": {
                "type": "object",
                "description": "the immediate diagnostic work-up: result when done",
                "properties": {
                    "done": {"type": "boolean"},
                    "result": {"type": "string", "enum": ["NEGATIVE", "POSITIVE"]},
                },
            },
            "recipients": {
                "type": "object",
                "description": "where the result letters go",
                "additionalProperties": False,
                "properties": dict.fromkeys(RECIPIENTS, {"type": "string", "format": "email"}),
            },
        },
    },
    "SecondReading": {
        "type": "object",
        "description": "the L2 verdict, by the holder of the claim: NEGATIVE; POSITIVE "
        "(recalled, findings per breast); INADEQUATE (reason and views to redo)",
        "required": ["verdict"],
        "additionalProperties": False,
        "properties": {
            "verdict": {"type": "string", "enum": list(VERDICTS)},
            "findings": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "properties": dict.fromkeys(BREASTS, _FINDING),
            },
            "reason": {"type": "string", "maxLength": MAX_TEXT},
            "views": {
                "type": "array",
                "minItems": 1,
                "uniqueItems": True,
                "items": {"type": "string", "enum": list(VIEWS)},
            },
            "comment": {"type": "string", "maxLength": MAX_TEXT},
            "transaction_uid": {"type": "string"},
        },
    },
    "ScreeningPrior": {
        "type": "object",
        "description": "another study of the woman (regional identity), with its screening "
        "round if it is one",
        "required": ["study_uid", "site", "screening"],
        "properties": {
            "study_uid": {"type": "string"},
            "study_date": {"type": ["string", "null"]},
            "study_description": {"type": ["string", "null"]},
            "modalities": {"type": "array", "items": {"type": "string"}},
            "site": {"type": ["string", "null"]},
            "instances": {"type": ["integer", "null"]},
            "screening": _nullable(
                {
                    "type": "object",
                    "properties": {
                        "exam_date": {"type": "string"},
                        "state": {"type": "string", "enum": list(STATES)},
                        "outcome": {"type": ["string", "null"]},
                    },
                }
            ),
        },
    },
    "ScreeningExam": {
        "type": "object",
        "description": "a screening exam; to the producing site without the L2 reader",
        "required": ["study_uid", "site", "rule", "exam_date", "state", "l1", "l2", "outcome"],
        "properties": {
            "study_uid": {"type": "string"},
            "site": {"type": "string"},
            "rule": {"type": "string", "description": "the [[screening.rules]] rule matched"},
            "exam_date": _DATE,
            "recognised_at": _TIME,
            "state": {"type": "string", "enum": list(STATES)},
            "l1": _nullable(
                {
                    "type": "object",
                    "properties": {
                        "reader": {"type": ["string", "null"]},
                        "at": _nullable(_TIME),
                        "outcome": {"type": ["string", "null"], "enum": ["NEGATIVE", "POSITIVE"]},
                        **dict.fromkeys(BREASTS, {"type": "object"}),
                        "bdi": {"type": "object"},
                    },
                }
            ),
            "l2": _nullable(
                {
                    "type": "object",
                    "description": "the verdict; reader: not to the producing site",
                    "properties": {
                        "at": _nullable(_TIME),
                        "verdict": {"type": "string", "enum": list(VERDICTS)},
                        "reader": {"type": ["string", "null"]},
                    },
                }
            ),
            "outcome": {
                "type": ["string", "null"],
                "description": "; ".join(f"{k}: {v}" for k, v in OUTCOMES.items()),
            },
            "closed_at": _nullable(_TIME),
            "letters_at": _nullable(_TIME),
            "late_alerted_at": _nullable(_TIME),
            "request_uid": {
                "type": ["string", "null"],
                "description": "the L2 reading request (not to the producing site)",
            },
            "priors": {"type": "array", "items": ref("ScreeningPrior")},
            "viewer": {
                "type": "string",
                "description": "the viewer's mammography layout (second readers); "
                "append #token=<token>",
            },
        },
    },
    "ScreeningExamList": {
        "type": "object",
        "required": ["total", "exams"],
        "properties": {
            "total": {"type": "integer", "minimum": 0},
            "exams": {"type": "array", "items": ref("ScreeningExam")},
        },
    },
    "ScreeningHeld": {
        "description": "the exam with its L2 reading request; transaction_uid and lease_until "
        "to the holder",
        "allOf": [
            ref("ScreeningExam"),
            {
                "type": "object",
                "required": ["request", "transaction_uid", "lease_until"],
                "properties": {
                    "request": ref("ReadRequest"),
                    "transaction_uid": {"type": ["string", "null"]},
                    "lease_until": _nullable(_TIME),
                },
            },
        ],
    },
    "ScreeningQueue": {
        "type": "object",
        "required": ["total", "exams"],
        "properties": {
            "total": {"type": "integer", "minimum": 0},
            "exams": {"type": "array", "items": ref("ScreeningHeld")},
        },
    },
    "Accreditation": {
        "type": "object",
        "required": ["name", "accredited_from", "accredited_until", "reference", "current"],
        "properties": {
            "name": {"type": "string"},
            "accredited_from": _DATE,
            "accredited_until": _nullable(_DATE),
            "reference": {"type": "string"},
            "revoked_at": {"type": ["string", "null"]},
            "updated_by": {"type": "string"},
            "updated_at": {"type": ["string", "null"]},
            "current": {"type": "boolean", "description": "accredited today"},
        },
    },
    "AccreditationList": {
        "type": "object",
        "required": ["readers"],
        "properties": {"readers": {"type": "array", "items": ref("Accreditation")}},
    },
    "AccreditationChange": {
        "type": "object",
        "required": ["accredited_from", "reference"],
        "additionalProperties": False,
        "properties": {
            "accredited_from": _DATE,
            "accredited_until": _nullable(_DATE),
            "reference": {"type": "string", "minLength": 1, "maxLength": MAX_REFERENCE},
        },
    },
}

_STUDY = {
    "name": "study",
    "in": "path",
    "required": True,
    "description": "the exam's Study Instance UID",
    "schema": {"type": "string", "maxLength": MAX_UID},
}
_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "the second reader's account name",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
}
_PAGE = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
]
_HELD = json_body(ref("ScreeningHeld"), "the exam and its reading request")
_EXAM = json_body(ref("ScreeningExam"), "the exam")


def _post(
    operation: str,
    summary: str,
    body: str | None,
    ok: dict[str, Any],
    *refused: int,
    holder: bool = True,
) -> dict[str, Any]:
    """A POST on an exam; ``holder``: the claim's holder presents its Transaction UID."""
    described: dict[str, Any] = {
        "operationId": operation,
        "summary": summary,
        "security": [{"bearer": []}],
        "parameters": [_STUDY, TRANSACTION_PARAMETER] if holder else [_STUDY],
        "responses": {**ok, **problems(*refused)},
    }
    if body is not None:
        described["requestBody"] = {
            "required": body != "Transaction",
            "content": {"application/json": {"schema": ref(body)}},
        }
    return {"post": described}


SCREENING_API = Fragment(
    paths={
        f"{BASE}/exams": {
            "get": {
                "operationId": "listScreeningExams",
                "summary": "the exams the caller may see, oldest first (the centre: all; a "
                "site: its own, without the L2 reader; accredited L2 readers: the L2 queue's)",
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(STATES)},
                    },
                    {
                        "name": "site",
                        "in": "query",
                        "schema": {"type": "string", "maxLength": MAX_NAME},
                    },
                    *_PAGE,
                ],
                "responses": {
                    "200": json_body(ref("ScreeningExamList"), "the exams and their total"),
                    **problems(400, 403),
                },
            }
        },
        EXAM: {
            "get": {
                "operationId": "getScreeningExam",
                "summary": "one exam with the woman's priors (regional identity); second readers "
                "also get the viewer's page",
                "security": [{"bearer": []}],
                "parameters": [_STUDY],
                "responses": {"200": _EXAM, **problems(403, 404)},
            }
        },
        EXAM + "/first-reading": _post(
            "recordFirstReading",
            "the L1 reading, by a radiologist of the exam's site (screening.first-read)",
            "FirstReading",
            {
                "201": {
                    **json_body(ref("ScreeningExam"), "recorded"),
                    "headers": {"Location": {"schema": {"type": "string"}}},
                }
            },
            400,
            403,
            404,
            409,
            413,
            holder=False,
        ),
        f"{BASE}/queue": {
            "get": {
                "operationId": "screeningQueue",
                "summary": "the L2 queue of an accredited second reader, oldest exam first "
                "(screening.read)",
                "security": [{"bearer": []}],
                "parameters": _PAGE,
                "responses": {
                    "200": json_body(ref("ScreeningQueue"), "the exams to read and their total"),
                    **problems(400, 403),
                },
            }
        },
        EXAM + "/claim": _post(
            "claimScreeningExam",
            "take the second reading (screening.write, accredited, not the L1 reader): its "
            "transaction_uid and lease_until",
            None,
            {"200": _HELD},
            403,
            404,
            409,
            holder=False,
        ),
        EXAM + "/heartbeat": _post(
            "screeningHeartbeat",
            "the holder is still reading: the lease is extended",
            "Transaction",
            {"200": _HELD},
            400,
            403,
            404,
            409,
            413,
        ),
        EXAM + "/release": _post(
            "releaseScreeningExam",
            "the holder gives the exam back to the queue",
            "Transaction",
            {"200": _HELD},
            400,
            403,
            404,
            409,
            413,
        ),
        EXAM + "/verdict": _post(
            "recordVerdict",
            "the holder's L2 verdict closes the exam (no third reading)",
            "SecondReading",
            {"200": _EXAM},
            400,
            403,
            404,
            409,
            413,
        ),
        f"{BASE}/readers": {
            "get": {
                "operationId": "listAccreditations",
                "summary": "second readers' accreditations (screening.coordinate)",
                "security": [{"bearer": []}],
                "responses": {
                    "200": json_body(ref("AccreditationList"), "the accreditations"),
                    **problems(403),
                },
            }
        },
        f"{BASE}/readers/{{name}}": {
            "put": {
                "operationId": "accreditReader",
                "summary": "record or renew an accreditation (screening.coordinate)",
                "security": [{"bearer": []}],
                "parameters": [_NAME],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("AccreditationChange")}},
                },
                "responses": {
                    "200": json_body(ref("Accreditation"), "renewed"),
                    "201": json_body(ref("Accreditation"), "recorded"),
                    **problems(400, 403, 413),
                },
            },
            "delete": {
                "operationId": "revokeAccreditation",
                "summary": "end an accreditation now (screening.coordinate)",
                "security": [{"bearer": []}],
                "parameters": [_NAME],
                "responses": {
                    "200": json_body(ref("Accreditation"), "revoked"),
                    **problems(400, 403, 404),
                },
            },
        },
    },
    schemas=SCHEMAS,
)


def add_routes(app: web.Application) -> None:
    """Mount ``/api/screening`` and describe it in the worklist's OpenAPI document."""
    routes = [
        ("GET", BASE + "/exams", list_exams),
        ("GET", EXAM, show_exam),
        ("POST", EXAM + "/first-reading", record_first_reading),
        ("GET", BASE + "/queue", show_queue),
        ("POST", EXAM + "/claim", claim_exam),
        ("POST", EXAM + "/heartbeat", heartbeat_exam),
        ("POST", EXAM + "/release", release_exam),
        ("POST", EXAM + "/verdict", record_verdict),
        ("GET", BASE + "/readers", list_readers),
        ("PUT", BASE + "/readers/{name}", accredit_reader),
        ("DELETE", BASE + "/readers/{name}", revoke_reader),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _guarded(_screening_errors(handler)))
    contribute(app, SCREENING_API)
