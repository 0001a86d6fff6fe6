"""The UPS-RS handlers (PS3.18 chapter 11) over the worklist's requests.

Every handler goes through :class:`~worklist.requests.Worklist`, as the
REST API does, so the UPS rules (one claim, leases, who sees what) hold
whatever the door.  Answers and refusals:

* a UPS refusal (``C301`` wrong Transaction UID, ``C302`` already claimed,
  ``C300`` final, ``C307`` none that you may see...) is the HTTP status
  PS3.18 gives it, a ``Warning: 299 <host> "<code>: <text>"`` header and a
  problem details body (member ``ups_status``);
* a change that had already happened (``B304`` already canceled, ``B306``
  already completed) is a success with that ``Warning`` header;
* a body that is no DICOM JSON dataset, or one the worklist cannot take, is
  a 400 whose ``invalid-params`` names every attribute at fault; nothing is
  stored;
* a workitem of another site or reading group is 404 (C307), as if there
  were none; its audit entry is marked denied.

Permissions: searching and retrieving need ``worklist.read`` (readers) or
``worklist.request`` (site users, their sites' requests); creating,
updating a SCHEDULED workitem's request and asking for cancellation need
``worklist.request``; claiming, completing, canceling and the holder's
updates need ``worklist.write``.  Each request leaves the security
middleware's one audit entry, enriched here with the workitem and outcome.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from pydicom import Dataset

from archive.security.http import AUTHENTICATED, audit_of, principal_of, require
from archive.security.roles import Principal
from archive.security.scope import study_clause
from archive.uids import is_valid_uid
from archive.web import ARCHIVE, public_base, read_capped
from worklist import service
from worklist.http import audit_hidden
from worklist.requests import (
    Duplicate,
    NotAllowed,
    ReadRequest,
    RequestInvalid,
    Viewer,
    check_fields,
)
from worklist.ups import CANCELED, COMPLETED, IN_PROGRESS, SCHEDULED, UpsError, UpsWarning
from worklist.upsrs.dataset import (
    ATTRIBUTE_OF,
    FIELD_KEYWORDS,
    DatasetInvalid,
    Patient,
    asked_by,
    parse_json,
    problems_as_attributes,
    workitem,
)
from worklist.upsrs.search import SearchInvalid, keyword_of, parse

BASE = "/dicom-web/workitems"
#: the permissions (worklist.plugin's, named here: the plugin mounts these routes)
READ, WRITE, REQUEST = "worklist.read", "worklist.write", "worklist.request"
DICOM_JSON = "application/dicom+json"
ACCEPTED_TYPES = (DICOM_JSON, "application/json")
MAX_BODY = 256 * 1024
#: attributes an update may carry besides the request's fields (its envelope)
_ENVELOPE = {"SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "TransactionUID"}


class _Refused(Exception):
    """Refused before the worklist is asked (answered as problem details)."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def _problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return web.Response(
        status=status, content_type="application/problem+json", text=json.dumps(body)
    )


def _invalid(problems: dict[str, str]) -> web.Response:
    params = [{"name": name, "reason": reason} for name, reason in problems.items()]
    return _problem(
        400,
        "Bad Request",
        f"invalid or missing: {', '.join(problems)}",
        **{"invalid-params": params},
    )


def _warning(request: web.Request, text: str) -> str:
    """An HTTP Warning header value as PS3.18 uses it (warn-code 299)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 {request.host} "{text}"'


def _guarded(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The refusals of the worklist as UPS-RS answers, each noted in the
    request's one audit entry."""

    async def run(request: web.Request) -> web.StreamResponse:
        audit = audit_of(request)
        uid = request.match_info.get("uid")
        if uid:
            audit.detail.setdefault("workitem", uid[:64])
        try:
            return await handler(request)
        except _Refused as exc:
            audit.detail["error"] = exc.detail
            return _problem(exc.status, exc.title, exc.detail, **exc.extra)
        except (DatasetInvalid, SearchInvalid) as exc:
            audit.detail["error"] = "invalid: " + ", ".join(exc.problems)
            return _invalid(exc.problems)
        except RequestInvalid as exc:
            problems = problems_as_attributes(exc.problems)
            audit.detail["error"] = "invalid: " + ", ".join(problems)
            return _invalid(problems)
        except NotAllowed as exc:
            audit.detail["error"] = str(exc)
            return _problem(403, "Forbidden", str(exc))
        except Duplicate as exc:
            audit.detail["error"] = str(exc)
            return _problem(409, "Conflict", str(exc))
        except UpsError as exc:
            audit.detail.update({"error": str(exc), "ups_status": exc.code})
            if exc.code == "C307" and uid:
                await audit_hidden(request, uid)
            title = "Not Found" if exc.http == 404 else "Conflict"
            response = _problem(exc.http, title, str(exc), ups_status=exc.code)
            response.headers["Warning"] = _warning(request, f"{exc.code}: {exc}")
            return response
        except UpsWarning as exc:
            audit.detail["warning"] = exc.code
            return web.Response(
                status=200, headers={"Warning": _warning(request, f"{exc.code}: {exc}")}
            )

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    for mark in ("imag_permission", "imag_action"):
        setattr(run, mark, getattr(handler, mark))
    return run


# -- helpers -----------------------------------------------------------------------------------


def _viewer(request: web.Request) -> Viewer:
    return service.viewer_of(principal_of(request))


def _needs(principal: Principal, *permissions: str) -> None:
    if not any(principal.can(p) for p in permissions):
        raise _Refused(
            403, "Forbidden", f"role {principal.role!r} lacks {' or '.join(map(repr, permissions))}"
        )


def _uid(request: web.Request) -> str:
    uid = request.match_info["uid"]
    if not is_valid_uid(uid):
        raise UpsError("C307", "no such workitem")
    return uid


def _accepts_json(request: web.Request) -> None:
    accept = request.headers.get("Accept", "")
    if not accept:
        return
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if types & {*ACCEPTED_TYPES, "*/*", "application/*"}:
        return
    raise _Refused(406, "Not Acceptable", f"workitems are answered as {DICOM_JSON}")


async def _dataset(request: web.Request, *, required: bool = True) -> Dataset | None:
    """The body's DICOM JSON dataset (None when absent and not required)."""
    raw = await read_capped(request, MAX_BODY)
    if raw is None:
        raise _Refused(413, "Content Too Large", f"the body is limited to {MAX_BODY} bytes")
    if not raw.strip():
        if required:
            raise DatasetInvalid({"body": f"a dataset in {DICOM_JSON}"})
        return None
    if request.content_type not in ACCEPTED_TYPES:
        raise _Refused(415, "Unsupported Media Type", f"the body must be {DICOM_JSON}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DatasetInvalid({"body": "not JSON"}) from None
    return parse_json(body)


def _patients(db: Any, study_uids: Iterable[str]) -> dict[str, Patient]:
    """The patient of each study (and its accession number), from the index."""
    uids = sorted(set(study_uids))
    if not uids:
        return {}
    rows = db.query(
        "SELECT st.study_uid, p.patient_name, p.patient_id, p.issuer, p.birth_date, p.sex, "
        "st.accession_number FROM studies st JOIN patients p ON p.id = st.patient_ref "
        f"WHERE st.study_uid IN ({', '.join('?' * len(uids))})",
        uids,
    )
    return {row[0]: Patient(*(str(v or "") for v in row[1:])) for row in rows}


def _as_json(
    request: web.Request,
    items: list[ReadRequest],
    patients: dict[str, Patient],
    attributes: frozenset[str] | None = None,
) -> list[dict[str, Any]]:
    base = public_base(request)
    answers = []
    for item in items:
        url = f"{base}/dicom-web/studies/{item.study_uid}"
        data = workitem(item, patients.get(item.study_uid), url).to_json_dict()
        if attributes is not None:
            data = {tag: v for tag, v in data.items() if keyword_of(tag) in attributes}
        answers.append(data)
    return answers


def _dicom_json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type=DICOM_JSON)


# -- search and retrieve -----------------------------------------------------------------------


@require(AUTHENTICATED, "workitems.search")
async def search_workitems(request: web.Request) -> web.Response:
    """Search Workitems: the caller's requests that match, in reading order."""
    _needs(principal_of(request), READ, REQUEST)
    _accepts_json(request)
    search = parse(request.query)
    archive = request.config_dict[ARCHIVE]

    def run() -> tuple[list[ReadRequest], int, dict[str, Patient]]:
        found, total = service.worklist_of(archive).search(
            _viewer(request), search.conditions, limit=search.limit, offset=search.offset
        )
        return found, total, _patients(archive.db, (f.study_uid for f in found))

    found, total, patients = await asyncio.to_thread(run)
    audit_of(request).detail.update({"total": total, "shown": len(found)})
    response = (
        _dicom_json(_as_json(request, found, patients, search.attributes))
        if found
        else web.Response(status=204)
    )
    if search.ignored:
        text = f"the following attributes are not supported: {', '.join(search.ignored)}"
        response.headers["Warning"] = _warning(request, text)
    return response


@require(AUTHENTICATED, "workitems.retrieve")
async def retrieve_workitem(request: web.Request) -> web.Response:
    """Retrieve Workitem: one request as a workitem (never its Transaction UID)."""
    _needs(principal_of(request), READ, REQUEST)
    _accepts_json(request)
    archive = request.config_dict[ARCHIVE]

    def run() -> tuple[ReadRequest, dict[str, Patient]]:
        item = service.worklist_of(archive).get(_uid(request), _viewer(request))
        return item, _patients(archive.db, [item.study_uid])

    item, patients = await asyncio.to_thread(run)
    audit_of(request).study_uid = item.study_uid
    return _dicom_json(_as_json(request, [item], patients))


# -- create and update -------------------------------------------------------------------------


def _query_uid(request: web.Request, name: str) -> str | None:
    """A UID in the query string, as ``?name=uid`` or the older bare ``?uid``."""
    if name in request.query:
        value = request.query[name].strip()
    else:
        bare = [k for k, v in request.query.items() if not v and re.fullmatch(r"[0-9.]+", k)]
        value = bare[0] if len(bare) == 1 else ""
    if value and not is_valid_uid(value):
        raise DatasetInvalid({name: "a DICOM UID: digits and dots, at most 64 characters"})
    return value or None


def _study_site(db: Any, study_uid: str, principal: Principal) -> str | None:
    """The site of the study if the caller may see it, else None."""
    where, params = study_clause(principal.scope, "st") if principal.scope else ("1 = 1", [])
    row = db.query_one(
        f"SELECT st.site FROM studies st WHERE st.study_uid = ? AND {where}", (study_uid, *params)
    )
    return None if row is None else str(row[0] or "")


@require(REQUEST, "workitems.create")
async def create_workitem(request: web.Request) -> web.Response:
    """Create Workitem: a site asks for its study to be read."""
    archive = request.config_dict[ARCHIVE]
    principal = principal_of(request)
    ds = await _dataset(request)
    assert ds is not None
    asked = asked_by(ds, creating=True)
    problems: dict[str, str] = {}
    uid = _query_uid(request, "workitem")
    if uid and asked.uid and uid != asked.uid:
        problems[ATTRIBUTE_OF["uid"]] = "differs from the UID in the query"
    uid = uid or asked.uid
    if not asked.study_uid:
        problems[ATTRIBUTE_OF["study_uid"]] = "mandatory: the study to read"
    try:
        check_fields(asked.fields)
    except RequestInvalid as exc:
        problems.update(problems_as_attributes(exc.problems))
    if problems:
        raise DatasetInvalid(problems)
    study_uid = str(asked.study_uid)
    audit_of(request).study_uid = study_uid
    site = await asyncio.to_thread(_study_site, archive.db, study_uid, principal)
    if site is None:
        raise _Refused(404, "Not Found", f"no study {study_uid} that you may see")
    if not (principal.role == "admin" or site in principal.sites):
        raise _Refused(403, "Forbidden", f"you do not act for the study's site {site!r}")
    now = archive.clock.now()

    def create() -> ReadRequest:
        made = service.worklist_of(archive).create(
            study_uid=study_uid,
            site=site,
            group=service.group_on_call(archive, site, now),
            fields=asked.fields,
            created_by=principal.name,
            kind="expertise",
            origin=f"ups:{principal.name}",
            priority=asked.priority or "ROUTINE",
            due_at=asked.due_at,
            uid=uid,
        )
        service.assign(archive, made)
        return made

    made = await asyncio.to_thread(create)
    audit_of(request).detail.update(
        {"workitem": made.uid, "site": made.site, "group": made.group, "priority": made.priority}
    )
    location = f"{public_base(request)}{BASE}/{made.uid}"
    response = web.Response(
        status=201, headers={"Location": location, "Content-Location": location}
    )
    if asked.ignored:
        text = "the Workitem was created with modifications: the archive sets " + ", ".join(
            asked.ignored
        )
        response.headers["Warning"] = _warning(request, text)
    return response


@require(AUTHENTICATED, "workitems.update")
async def update_workitem(request: web.Request) -> web.Response:
    """Update Workitem: the requesting site corrects a SCHEDULED request's
    fields; the holder (with its Transaction UID) shows activity, which
    extends its lease.  The state changes only by ``PUT .../state``."""
    archive = request.config_dict[ARCHIVE]
    principal = principal_of(request)
    ds = await _dataset(request)
    assert ds is not None
    asked = asked_by(ds, creating=False)
    uid = _uid(request)
    if asked.uid and asked.uid != uid:
        raise DatasetInvalid({"SOPInstanceUID": "not the workitem of the URL"})
    query_tx = _query_uid(request, "transaction")
    if query_tx and asked.transaction_uid and query_tx != asked.transaction_uid:
        raise DatasetInvalid({"TransactionUID": "differs from the transaction in the query"})
    transaction = query_tx or asked.transaction_uid
    unused = sorted(k for k in ds.dir() if k not in FIELD_KEYWORDS | _ENVELOPE)
    worklist = service.worklist_of(archive)
    if transaction:
        _needs(principal, WRITE)
        if asked.fields:
            raise _Refused(
                409,
                "Conflict",
                "the request's clinical content changes only while SCHEDULED, by its site",
            )
        item = await asyncio.to_thread(worklist.holding, uid, _viewer(request), transaction)
    else:
        _needs(principal, REQUEST)
        if not asked.fields:
            raise DatasetInvalid(
                {"body": "nothing the worklist keeps: see the attributes of the request fields"}
            )
        item = await asyncio.to_thread(
            worklist.complete_fields, uid, _viewer(request), asked.fields
        )
    audit = audit_of(request)
    audit.study_uid = item.study_uid
    audit.detail.update({"changed": sorted(asked.fields), "state": item.state})
    response = web.Response(status=200)
    if unused:
        text = "the Workitem was updated with modifications: not kept: " + ", ".join(unused)
        response.headers["Warning"] = _warning(request, text)
    return response


# -- state and cancellation --------------------------------------------------------------------


@require(WRITE, "workitems.state")
async def change_state(request: web.Request) -> web.Response:
    """Change Workitem State: IN PROGRESS claims it under the client's
    Transaction UID; COMPLETED and CANCELED end the holder's claim."""
    archive = request.config_dict[ARCHIVE]
    ds = await _dataset(request)
    assert ds is not None
    state = str(ds.get("ProcedureStepState") or "").strip().upper()
    raw_tx = str(ds.get("TransactionUID") or "").strip()
    problems: dict[str, str] = {}
    if state not in (IN_PROGRESS, COMPLETED, CANCELED, SCHEDULED):
        problems["ProcedureStepState"] = "IN PROGRESS, COMPLETED or CANCELED"
    if raw_tx and not is_valid_uid(raw_tx):
        problems["TransactionUID"] = "a DICOM UID: digits and dots, at most 64 characters"
    elif not raw_tx and state == IN_PROGRESS:
        problems["TransactionUID"] = "mandatory: the UID you make for your claim"
    if problems:
        raise DatasetInvalid(problems)
    uid = _uid(request)
    worklist = service.worklist_of(archive)
    viewer = _viewer(request)
    audit_of(request).detail["asked"] = state
    if state == SCHEDULED:
        raise UpsError("C303")
    change = {IN_PROGRESS: worklist.claim, COMPLETED: worklist.complete, CANCELED: worklist.cancel}
    item = await asyncio.to_thread(change[state], uid, viewer, raw_tx or None)
    audit = audit_of(request)
    audit.study_uid = item.study_uid
    audit.detail["state"] = item.state
    return web.Response(status=200)


@require(REQUEST, "workitems.cancelrequest")
async def request_cancellation(request: web.Request) -> web.Response:
    """Request Cancellation: the requesting site withdraws; a SCHEDULED
    request is canceled at once, one being read is marked for its reader
    (who sees it in the workitem's progress information, and whose group's
    mailbox is told) and decides."""
    archive = request.config_dict[ARCHIVE]
    ds = await _dataset(request, required=False)
    reason = str(ds.get("ReasonForCancellation") or "").strip() if ds is not None else ""
    item, notified = await asyncio.to_thread(
        service.withdraw, archive, _uid(request), _viewer(request), reason
    )
    audit = audit_of(request)
    audit.study_uid = item.study_uid
    audit.detail.update({"state": item.state, "reason": reason[:200]})
    if notified is not None:
        audit.detail["message"] = notified
    return web.Response(status=202)


def add_routes(app: web.Application) -> None:
    """Mount UPS-RS under ``/dicom-web/workitems``."""
    routes = [
        ("GET", "", search_workitems),
        ("POST", "", create_workitem),
        ("GET", "/{uid}", retrieve_workitem),
        ("POST", "/{uid}", update_workitem),
        ("PUT", "/{uid}/state", change_state),
        ("POST", "/{uid}/cancelrequest", request_cancellation),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, BASE + path, _guarded(handler))
