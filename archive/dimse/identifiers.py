"""C-FIND / C-GET / C-MOVE identifiers to and from the query model."""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from archive.index.extra import ExtraAttributes
from archive.query import LEVELS, Query, QueryError, attribute
from archive.security.scope import Scope

# Keys a C-FIND identifier may carry that are not matched in the index.
_CONTROL = {
    "QueryRetrieveLevel",
    "SpecificCharacterSet",
    "RetrieveAETitle",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def level_of(identifier: Dataset) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel {level!r} is not one of {', '.join(LEVELS)}")
    return level


def query_from_identifier(
    identifier: Dataset, scope: Scope | None, extra: ExtraAttributes | None = None
) -> tuple[Query, list]:
    """The query an identifier asks, and the identifier's element tags in
    order (every one of them is answered, empty when the index lacks it).

    ``extra``: the attributes indexed beyond the columns (setting
    ``index.extra_attributes``), matched and returned like the others; a key
    the archive neither holds nor has configured is answered empty, never
    matched (PS3.4 C.4.1.1.3.1: an SCP need not support every optional key)."""
    level = level_of(identifier)
    depth = LEVELS.index(level)
    keys: dict[str, str] = {}
    returns: list[str] = []
    tags = []
    patient_oid = ""
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002) or elem.tag.is_private:
            continue
        tags.append(elem.tag)
        keyword = elem.keyword or keyword_for_tag(elem.tag)
        if keyword in _CONTROL:
            continue
        if keyword == "IssuerOfPatientIDQualifiersSequence" and elem.VR == "SQ":
            # the INS OID sent with PatientID: a search by INS (archive.query)
            for item in elem.value or ():
                patient_oid = patient_oid or _text(item.get("UniversalEntityID")).strip()
            continue
        attr = attribute(keyword, extra)
        if attr is None or LEVELS.index(attr.level) > depth:
            continue  # answered empty
        if elem.VR == "SQ":
            continue
        value = _text(elem.value).strip()
        if attr.match and value:
            keys[keyword] = value
        else:
            returns.append(keyword)
    query = Query(level, keys, returns, scope=scope, patient_oid=patient_oid, extra=extra)
    return query, tags


def answer(row: dict[str, Any], tags: list, level: str, aet: str) -> Dataset:
    """A pending C-FIND response identifier for one matching row."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for tag in tags:
        keyword = keyword_for_tag(tag)
        if keyword == "SpecificCharacterSet":
            continue
        if keyword == "QueryRetrieveLevel":
            value: Any = level
        elif keyword == "RetrieveAETitle":
            value = aet
        elif keyword == "InstanceAvailability":
            value = "ONLINE"
        else:
            value = row.get(keyword)
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr == "SQ":
            ds.add_new(tag, vr, [])
            continue
        if value is not None and keyword == "ModalitiesInStudy":
            value = [m for m in str(value).split("\\") if m]
        ds.add_new(tag, vr, "" if value is None else value)
    ds.QueryRetrieveLevel = level
    for keyword in _unique_keys(level):
        if keyword not in ds and keyword in row:
            setattr(ds, keyword, row[keyword] or "")
    return ds


def _unique_keys(level: str) -> tuple[str, ...]:
    return {
        "PATIENT": ("PatientID",),
        "STUDY": ("StudyInstanceUID",),
        "SERIES": ("SeriesInstanceUID",),
        "IMAGE": ("SOPInstanceUID",),
    }[level]


def retrieve_keys(identifier: Dataset) -> tuple[str, dict[str, str]]:
    """Level and unique keys of a C-GET / C-MOVE identifier."""
    level = level_of(identifier)
    keys = {}
    for keyword in (
        "PatientID",
        "IssuerOfPatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    ):
        if keyword in identifier:
            keys[keyword] = _text(identifier.get(keyword)).strip()
    return level, keys
