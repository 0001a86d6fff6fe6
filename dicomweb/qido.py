"""QIDO-RS (PS3.18 10.6): searches for studies, series and instances.

Query parameters become a :class:`archive.query.Query`, the same model
C-FIND uses, so both services match the same way.  Results are written in
the DICOM JSON model straight from the index rows (:mod:`dicomweb.qido_json`).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from aiohttp import web
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.tag import Tag

from archive.index.extra import ExtraAttributes
from archive.query import (
    ATTRIBUTES,
    LEVELS,
    Query,
    QueryError,
    attribute,
    attributes_for,
    extra_attributes,
    search,
)
from archive.retrieve import may_hide
from archive.runtime import Archive
from archive.security.http import (
    PendingAudit,
    audit_of,
    mark_if_hidden,
    pending_audit,
    require,
    scope_of,
)
from archive.web import ARCHIVE, problem, public_base
from dicomweb import PREFIX_KEY
from dicomweb.qido_json import AnswerBuilder

MAX_LIMIT = 1000
DEFAULT_LIMIT = 1000

# What each level returns by default (PS3.18 Table 10.6.3-3, limited to what
# the index holds; the rest is answered when asked for with includefield).
DEFAULT_FIELDS = {
    "STUDY": [
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "BodyPartExamined",
        "StudyInstanceUID",
    ],
    "IMAGE": [
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "NumberOfFrames",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    ],
}
CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
#: the issuer qualifier's OID (an INS OID), as QIDO-RS names a sequence's attribute
PATIENT_OID = (
    "IssuerOfPatientIDQualifiersSequence.UniversalEntityID",
    "00100024.00400032",
)
# Values that carry lists: commas in QIDO become DICOM's backslash.
_LIST_VRS = {"UI", "CS"}


class BadRequest(ValueError):
    """A QIDO parameter the archive cannot accept."""


def _keyword(name: str) -> str:
    """An attribute given by keyword (PatientName) or tag (00100010)."""
    name = name.strip()
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(Tag(int(name, 16)))
        if keyword:
            return keyword
        raise BadRequest(f"attribute {name} is not a known DICOM tag")
    if tag_for_keyword(name) is None:
        raise BadRequest(f"{name!r} is neither a DICOM keyword nor a tag (ggggeeee)")
    return name


#: the largest value an integer query parameter may have: a 32-bit signed
#: integer, what every SQL engine's integer column and parameter holds (a
#: bigger one overflowed in the index and was a 500)
MAX_INT = 2**31 - 1


def _int_param(params: Any, name: str, default: int, maximum: int | None = None) -> int:
    """A non-negative integer parameter (0..MAX_INT, else 400); values above
    ``maximum`` are lowered to it (PS3.18: the server may return fewer)."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip()) if len(raw) <= 20 else None
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_INT:
        raise BadRequest(f"{name} must be an integer from 0 to {MAX_INT}, not {raw[:40]!r}")
    return min(value, maximum) if maximum is not None else value


def _check_integer_value(keyword: str, value: str) -> None:
    """An IS matching value must be an integer a DICOM IS can hold
    (PS3.5 6.2: -2^31 to 2^31-1), else 400: a bigger one overflowed in SQL."""
    for part in value.split("\\"):
        text = part.strip()
        try:
            number = int(text) if len(text) <= 12 else None
        except ValueError:
            continue  # not a number at all: the query model says so
        if number is None or not -(2**31) <= number <= MAX_INT:
            raise BadRequest(
                f"{keyword} must be an integer from {-(2**31)} to {MAX_INT}, not {text[:40]!r}"
            )


#: the most names one "not supported" warning lists (the rest are counted)
MAX_IGNORED = 20


def _printable(name: str) -> str:
    """A parameter name as it can appear in a header: printable ASCII, short."""
    text = "".join(c if " " <= c <= "~" else "?" for c in name)
    return text if len(text) <= 64 else text[:61] + "..."


def not_supported_warnings(ignored: list[str]) -> list[str]:
    """The PS3.18 8.3.4 warnings of what the search ignored, as warn-text
    (the caller prefixes ``299 <service>:``).  ``fuzzymatching`` is supported
    (person names, case- and accent-insensitive), so it needs none."""
    out = []
    if ignored:
        names = list(dict.fromkeys(_printable(n) for n in ignored))
        shown = ", ".join(names[:MAX_IGNORED])
        if len(names) > MAX_IGNORED:
            shown += f" and {len(names) - MAX_IGNORED} more"
        out.append(f"The following query parameters are not supported and were ignored: {shown}")
    return out


def build_query(
    level: str,
    params: Any,
    path_keys: dict[str, str],
    ignored: list[str] | None = None,
    extra: ExtraAttributes | None = None,
) -> tuple[Query, list[str]]:
    """The query a QIDO request asks; also the fields to return.

    What the archive does not support is ignored, as PS3.18 8.3.4 has the
    origin server do, and named in ``ignored`` (for a ``Warning`` header): a
    parameter that is neither a control parameter nor a DICOM keyword or
    tag (``PATIENTID``, ``InvalidParam``), an attribute this archive cannot
    match on, an unknown includefield.  A key given more than once
    (``ModalitiesInStudy=CT&ModalitiesInStudy=MR``) is a list, as if its
    values were comma-separated, for the attributes that take lists (UIDs,
    code strings); a repeated key of another attribute must repeat one value.
    Malformed values of supported parameters are still refused (BadRequest).

    ``extra``: the attributes indexed beyond the columns (setting
    ``index.extra_attributes``): matched, listed (any value may be a comma
    list) and returned like the others; an attribute neither a column nor
    configured is ignored with the warning above."""
    ignored = [] if ignored is None else ignored
    keys: dict[str, str] = dict(path_keys)
    includes: list[str] = []
    include_all = False
    patient_oid = ""
    fuzzy = False
    for name in dict.fromkeys(params.keys()):
        values: list[str] = params.getall(name)
        if name in PATIENT_OID:  # the INS OID sent with PatientID: a search by INS
            patient_oid = values[0].strip()
            continue
        if name in CONTROL:
            if name == "includefield":
                for field in (f.strip() for v in values for f in v.split(",")):
                    if field == "all":
                        include_all = True
                    elif field:
                        try:
                            includes.append(_keyword(field))
                        except BadRequest:
                            ignored.append(f"includefield={field}")
            elif name == "fuzzymatching":
                for value in values:
                    if value.lower() not in ("true", "false"):
                        raise BadRequest(f"fuzzymatching must be true or false, not {value!r}")
                    fuzzy = fuzzy or value.lower() == "true"
            continue
        try:
            keyword = _keyword(name)
        except BadRequest:
            ignored.append(name)
            continue
        attr = attribute(keyword, extra)
        if attr is None or not attr.match:
            ignored.append(keyword)
            continue
        if LEVELS.index(attr.level) > LEVELS.index(level):
            raise BadRequest(
                f"{keyword} is a {attr.level.lower()}-level attribute; it cannot "
                f"be searched at the {level.lower()} level"
            )
        distinct = list(dict.fromkeys(values))
        lists = attr.vr in _LIST_VRS or attr.extra is not None
        if len(distinct) > 1 and not lists:
            raise BadRequest(
                f"{keyword} is given {len(values)} times with different values; only UID "
                "and code string attributes take a list of values"
            )
        value = ",".join(distinct)
        if attr.vr == "IS":
            _check_integer_value(keyword, value)
        if lists:
            value = value.replace(",", "\\")
        if keyword in keys and keys[keyword] != value:
            raise BadRequest(f"{keyword} is given twice with different values")
        keys[keyword] = value
    fields = list(DEFAULT_FIELDS[level])
    if include_all:
        fields += attributes_for(level, extra)
    fields += includes
    fields += keys  # matching keys are returned too (PS3.18 10.6.3.3), as C-FIND does
    limit = _int_param(params, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    offset = _int_param(params, "offset", 0)
    # one more than asked, to know whether the answer was cut
    query = Query(
        level,
        keys,
        fields,
        limit=limit + 1,
        offset=offset,
        patient_oid=patient_oid,
        extra=extra,
        fuzzy=fuzzy,
    )
    return query, fields


def answer_body(rows: list[dict[str, Any]], fields: list[str], base_url: str, level: str) -> bytes:
    """The DICOM JSON answer of a search, as the body's bytes: each row's
    fields (a field the index does not hold, present and empty), its
    InstanceAvailability and RetrieveURL; written straight from the row
    values (:mod:`dicomweb.qido_json`)."""
    own = []
    for row in rows:
        url = f"{base_url}/studies/{row.get('StudyInstanceUID')}"
        if level in ("SERIES", "IMAGE") and row.get("SeriesInstanceUID"):
            url += f"/series/{row['SeriesInstanceUID']}"
        if level == "IMAGE":
            url += f"/instances/{row['SOPInstanceUID']}"
        own.append({"InstanceAvailability": "ONLINE", "RetrieveURL": url})
    return _builder(tuple(fields)).write(rows, own)


@functools.lru_cache(maxsize=256)
def _builder(fields: tuple[str, ...]) -> AnswerBuilder:
    """The answer builder of a set of fields, made once: its tag, VR and
    encoder look-ups cost 73 µs, per request before (a viewer asks the same
    fields each time; the cache is bounded for clients that vary them)."""
    return AnswerBuilder(fields, ATTRIBUTES.__contains__)


def _answer(
    archive: Archive,
    query: Query,
    fields: list[str],
    base_url: str,
    audit: PendingAudit,
) -> tuple[bytes, bool]:
    """The body of a search's answer, and whether it was cut at the limit,
    with the request's audit entry written: all in one worker thread.

    On PostgreSQL, when the entry does not depend on what the search finds
    (no look-up by UID that a site-bound caller may be denied), the
    search's own statement writes it, as C-FIND's does: one round trip and
    one commit (a study named in the path: its INSERT reads the study's
    patient for the entry).  Otherwise, or when that statement fails without
    writing the entry, the entry is written after the answer is built, which
    tells a failed search from an unwritable trail (:class:`AuditUnavailable`:
    503)."""
    limit = query.limit - 1
    context = audit.context
    rows = None
    if archive.db.dialect == "postgresql" and not may_hide(query.keys, query.scope):
        entry = audit.entry(200)
        rows = archive.audit.carried(
            lambda counted: search(archive.db, query, counted=counted), entry, "results", limit
        )
        if rows is not None:
            audit.written(200)
            context.detail["results"] = entry.detail["results"]
    if rows is None:
        rows = search(archive.db, query)
    cut = len(rows) > limit
    rows = rows[:limit]
    body = answer_body(rows, fields, base_url, query.level)
    if audit.status is None:
        context.detail["results"] = len(rows)
        if not rows:  # a look-up by UID of a study outside the scope is audited as denied
            mark_if_hidden(context, archive.db, None, query.keys, query.scope)
        audit.write(200)
    return body, cut


def _handler(level: str, path_params: tuple[str, ...]):  # noqa: ANN202 - aiohttp handler
    @require("studies.read", "qido.search")
    async def handle(request: web.Request) -> web.Response:
        archive = request.app[ARCHIVE]
        path_keys = {
            {"study": "StudyInstanceUID", "series": "SeriesInstanceUID"}[p]: request.match_info[p]
            for p in path_params
        }
        ignored: list[str] = []
        try:
            query, fields = build_query(
                level, request.query, path_keys, ignored, extra_attributes(archive.config)
            )
        except (BadRequest, QueryError) as exc:
            return problem(400, "Bad Request", str(exc))
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if keyword not in fields and (level != "STUDY" or keyword == "StudyInstanceUID"):
                fields.append(keyword)
        query.return_keys = fields
        query.scope = scope_of(request)
        query.identity = archive.identity  # PatientID may be an INS or a regional ID
        if ignored:
            audit_of(request).detail["ignored"] = [_printable(n) for n in ignored[:MAX_IGNORED]]
        base = public_base(request) + request.app[PREFIX_KEY]
        try:
            body, cut = await asyncio.to_thread(
                _answer, archive, query, fields, base, pending_audit(request)
            )
        except QueryError as exc:
            return problem(400, "Bad Request", str(exc))
        response = web.Response(body=body, content_type="application/dicom+json")
        if cut:
            response.headers.add(
                "Warning",
                '299 IMAG "The number of results exceeded the limit; request more with offset."',
            )
        for text in not_supported_warnings(ignored):
            response.headers.add("Warning", f"299 {base}: {text}")
        return response

    return handle


def add_routes(app: web.Application) -> None:
    app.router.add_get("/studies", _handler("STUDY", ()))
    app.router.add_get("/series", _handler("SERIES", ()))
    app.router.add_get("/instances", _handler("IMAGE", ()))
    app.router.add_get("/studies/{study}/series", _handler("SERIES", ("study",)))
    app.router.add_get("/studies/{study}/instances", _handler("IMAGE", ("study",)))
    app.router.add_get(
        "/studies/{study}/series/{series}/instances", _handler("IMAGE", ("study", "series"))
    )
