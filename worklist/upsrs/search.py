"""Search Workitems (PS3.18 11.9): the query parameters of ``GET
/dicom-web/workitems`` as conditions on the requests, and which attributes
each answer carries.

Matching follows QIDO-RS (PS3.18 8.3.4): a key is a keyword or a tag
(``ProcedureStepState`` or ``00741000``; a sequence's item attribute as
``InputInformationSequence.StudyInstanceUID``); an empty value is universal
matching (the attribute is returned, nothing is filtered); ``*`` and ``?``
are wildcards in text keys; a UID key takes a list (``,`` or ``\\``); a
date-time key takes a range ``from-to`` (either end open), each end a DT of
any precision (``20261205`` is the whole day), in UTC unless it carries its
offset.  The keys the worklist can match:

* ``ProcedureStepState`` (0074,1000), ``ScheduledProcedureStepPriority``
  (0074,1200) -- a value or a list;
* ``WorklistLabel`` (0074,1202) -- the reading group;
* ``PatientID``, ``IssuerOfPatientID`` -- the study's patient in the index;
* ``PatientName`` -- as QIDO-RS matches it: case-insensitive (``martin*``
  finds MARTIN^PAUL), trailing empty components ignored, and with
  ``fuzzymatching=true`` accent-insensitive too (``*cote*`` finds CÔTÉ);
* ``ScheduledProcedureStepStartDateTime`` (created),
  ``ExpectedCompletionDateTime`` (due),
  ``ScheduledProcedureStepModificationDateTime`` (last change) -- ranges;
* ``SOPInstanceUID``, ``InputInformationSequence.StudyInstanceUID`` /
  ``ReferencedRequestSequence.StudyInstanceUID``, and
  ``ReferencedRequestSequence.AccessionNumber``.

Any other attribute is ignored, as PS3.18 wants, and named in the answer's
``Warning`` header; a key that is no DICOM attribute at all, or a value a
supported key cannot take, is a 400.  ``includefield`` adds attributes to
the default set (``all``: everything); ``limit`` (1-500, default 100) and
``offset`` page; ``fuzzymatching`` (``true`` / ``false``) applies to
``PatientName``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from pydicom.datadict import dictionary_keyword, keyword_for_tag, tag_for_keyword

from archive.index.catalog import normalise_pn
from archive.index.names import fold
from worklist.ups import STATES, UPS_PRIORITY_TO_NAME

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
#: what every answer carries (the matching keys and ``includefield`` add to it)
DEFAULT_ATTRIBUTES = frozenset(
    {
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "ProcedureStepState",
        "ScheduledProcedureStepPriority",
        "WorklistLabel",
        "ProcedureStepLabel",
        "InputReadinessState",
        "ScheduledProcedureStepStartDateTime",
        "ExpectedCompletionDateTime",
        "ScheduledProcedureStepModificationDateTime",
        "ScheduledWorkitemCodeSequence",
        "InputInformationSequence",
    }
)
CONTROL = frozenset({"includefield", "limit", "offset", "fuzzymatching"})


class SearchInvalid(ValueError):
    """Query parameters that cannot be matched (HTTP 400): ``problems``,
    parameter -> what it takes."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.problems.items()))


@dataclass
class Search:
    """A search as the worklist runs it: SQL conditions over ``r`` (the
    request), ``st`` (its study) and ``p`` (its patient), a page, the
    top-level attributes to return (None: all) and the keys ignored."""

    conditions: list[tuple[str, list[Any]]] = field(default_factory=list)
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    attributes: frozenset[str] | None = DEFAULT_ATTRIBUTES
    ignored: list[str] = field(default_factory=list)


def _keyword(part: str) -> str | None:
    """A key component as a keyword (it may be a tag, ``00741000``)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", part):
        try:
            return keyword_for_tag(int(part, 16)) or None
        except (KeyError, ValueError):
            return None
    return part if tag_for_keyword(part) is not None else None


def _path(key: str) -> str | None:
    """A query key as a dotted path of keywords; None if any part is no attribute."""
    parts = [_keyword(p) for p in key.split(".")]
    return ".".join(parts) if all(parts) else None  # type: ignore[arg-type]


def _like(value: str) -> str:
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped.replace("*", "%").replace("?", "_")


def _values(raw: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", raw) if v.strip()]


def _text(column: str) -> Callable[[str], tuple[str, list[Any]]]:
    def match(raw: str) -> tuple[str, list[Any]]:
        if "*" in raw or "?" in raw:
            return f"{column} LIKE ? ESCAPE '!'", [_like(raw)]
        return f"{column} = ?", [raw]

    return match


def _name(fuzzy: bool) -> Callable[[str], tuple[str, list[Any]]]:
    """PatientName on the patient row's upper-cased name, or its folded one
    (the index's columns, so the archive's name indexes serve both)."""

    def match(raw: str) -> tuple[str, list[Any]]:
        value = normalise_pn(raw) or ""
        column = "p.patient_name_norm"
        if fuzzy:
            value, column = fold(value) or "", "p.patient_name_fold"
        if "*" in value or "?" in value:
            return f"{column} LIKE ? ESCAPE '!'", [_like(value)]
        return f"{column} = ?", [value]

    return match


_NAME = {False: _name(False), True: _name(True)}


def _listed(column: str, allowed: Mapping[str, str] | None, what: str) -> Any:
    def match(raw: str) -> tuple[str, list[Any]]:
        values = [v.upper() for v in _values(raw)] if allowed is not None else _values(raw)
        if allowed is not None:
            if not values or any(v not in allowed for v in values):
                raise ValueError(what)
            values = [allowed[v] for v in values]
        elif not values or any(not re.fullmatch(r"[0-9.]{1,64}", v) for v in values):
            raise ValueError(what)
        return f"{column} IN ({', '.join('?' * len(values))})", values

    return match


_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?")


def _bound(text: str, upper: bool) -> datetime:
    """One end of a date-time range: the start of the period a partial DT
    names, or (``upper``) the start of the next one (an exclusive bound)."""
    found = _DT.fullmatch(text)
    if found is None:
        raise ValueError("a DICOM date-time range: YYYYMMDDHHMMSS-YYYYMMDDHHMMSS, either end open")
    year, month, day, hour, minute, second, fraction, offset = found.groups()
    zone = UTC
    if offset:
        sign = 1 if offset[0] == "+" else -1
        zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
    start = datetime(
        int(year),
        int(month or 1),
        int(day or 1),
        int(hour or 0),
        int(minute or 0),
        int(second or 0),
        int((fraction or ".0")[1:].ljust(6, "0")),
        tzinfo=zone,
    )
    if not upper:
        return start
    if fraction:
        return start + timedelta(microseconds=1)
    if second or minute or hour:
        unit = {"s": timedelta(seconds=1), "m": timedelta(minutes=1), "h": timedelta(hours=1)}
        return start + unit["s" if second else "m" if minute else "h"]
    if day:
        return start + timedelta(days=1)
    if month:
        return start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    return start.replace(year=start.year + 1)


def _range(column: str) -> Callable[[str], tuple[str, list[Any]]]:
    def match(raw: str) -> tuple[str, list[Any]]:
        low, dash, high = raw.partition("-") if not raw.startswith("-") else ("", "-", raw[1:])
        if not dash:
            low = high = raw
        clauses, params = [], []
        if low:
            clauses.append(f"{column} >= ?")
            params.append(_bound(low, upper=False))
        if high:
            clauses.append(f"{column} < ?")
            params.append(_bound(high, upper=True))
        if not clauses:
            raise ValueError("a range with at least one end")
        return " AND ".join(clauses), params

    return match


_STATE_VALUES = {s: s for s in STATES}
_UID_LIST = "one or more UIDs (separated by , or \\)"
#: the matching keys: path -> (value -> SQL condition)
MATCHERS: dict[str, Callable[[str], tuple[str, list[Any]]]] = {
    "ProcedureStepState": _listed("r.state", _STATE_VALUES, f"one or more of {', '.join(STATES)}"),
    "ScheduledProcedureStepPriority": _listed(
        "r.priority", UPS_PRIORITY_TO_NAME, "one or more of HIGH, MEDIUM, LOW"
    ),
    "WorklistLabel": _text("r.group_name"),
    "PatientID": _text("p.patient_id"),
    "IssuerOfPatientID": _text("p.issuer"),
    "ScheduledProcedureStepStartDateTime": _range("r.created_at"),
    "ExpectedCompletionDateTime": _range("r.due_at"),
    "ScheduledProcedureStepModificationDateTime": _range("r.updated_at"),
    "SOPInstanceUID": _listed("r.uid", None, _UID_LIST),
    "InputInformationSequence.StudyInstanceUID": _listed("r.study_uid", None, _UID_LIST),
    "ReferencedRequestSequence.StudyInstanceUID": _listed("r.study_uid", None, _UID_LIST),
    "ReferencedRequestSequence.AccessionNumber": _text("st.accession_number"),
}


def _page(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise SearchInvalid({name: f"an integer from {low} to {high}"})
    return int(raw)


def parse(query: Any) -> Search:
    """The search a query string asks for (``query``: a multidict, as
    aiohttp's ``request.query``), every fault at once."""
    problems: dict[str, str] = {}
    search = Search()
    try:
        search.limit = _page(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    except SearchInvalid as exc:
        problems.update(exc.problems)
    try:
        search.offset = _page(query, "offset", 0, 0, 2**31 - 1)
    except SearchInvalid as exc:
        problems.update(exc.problems)
    included: set[str] = set()
    everything = False
    for raw in query.getall("includefield", []):
        for name in _values(raw):
            if name.lower() == "all":
                everything = True
                continue
            path = _path(name)
            if path is None:
                problems.setdefault("includefield", f"{name!r} is no DICOM attribute")
            else:
                included.add(path.split(".")[0])
    fuzzy = query.get("fuzzymatching", "").strip().lower()
    if fuzzy not in ("", "true", "false"):
        problems["fuzzymatching"] = "true or false"
    matched: set[str] = set()
    for key in query:
        if key in CONTROL:
            continue
        path = _path(key)
        if path is None:
            problems[key] = "no DICOM attribute of that keyword or tag"
            continue
        matched.add(path.split(".")[0])
        for raw in query.getall(key):
            raw = raw.strip()
            matcher = _NAME[fuzzy == "true"] if path == "PatientName" else MATCHERS.get(path)
            if matcher is None:
                if key not in search.ignored:
                    search.ignored.append(key)
                continue
            if not raw:  # universal matching: returned, not filtered
                continue
            try:
                search.conditions.append(matcher(raw))
            except ValueError as exc:
                problems[key] = str(exc)
    if problems:
        raise SearchInvalid(problems)
    search.attributes = None if everything else DEFAULT_ATTRIBUTES | included | matched
    return search


def keyword_of(tag: str) -> str:
    """The keyword of a DICOM JSON tag key (``"00741000"``)."""
    return dictionary_keyword(int(tag, 16))
