"""What the web viewer shows of one study, read through the archive's scoped look-ups.

The viewer page learns everything from the JSON built here, never from its
own URL: the patient, the study, its image series (with how many instances
and frames each has), the report documents (an Encapsulated PDF, a
structured report) and whether the caller may download the study.

Every read goes through :func:`archive.query.search` or
:func:`archive.retrieve.locate` with the caller's scope, so that whatever
narrows the scope (a site, a share link's study and series) narrows what is
shown; nothing here runs SQL of its own.  ``None`` means "not here" (absent,
or outside the scope: the caller cannot tell which).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset

from archive.index.db import Database
from archive.metadata import series_metadata
from archive.query import Query, search
from archive.retrieve import StoredObject, locate
from archive.security.scope import Scope
from storage import ObjectStore

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
#: Structured Report storage SOP classes share this root (PS3.4 B.5)
SR_ROOT = "1.2.840.10008.5.1.4.1.1.88."
#: DICOM JSON tags the viewer needs of each instance
_TAGS = {
    "sop": "00080018",
    "sop_class": "00080016",
    "number": "00200013",
    "rows": "00280010",
    "columns": "00280011",
    "frames": "00280008",
    "center": "00281050",
    "width": "00281051",
    "frame_time": "00181063",
    "photometric": "00280004",
}


def document_kind(sop_class_uid: str | None) -> str | None:
    """``"pdf"``, ``"sr"`` or None (an image or anything else)."""
    uid = sop_class_uid or ""
    if uid == ENCAPSULATED_PDF:
        return "pdf"
    if uid.startswith(SR_ROOT):
        return "sr"
    return None


def shared_study(scope: Scope | None, asked: str) -> str | None:
    """The study the caller means: a capability narrowed to exactly one study
    names it (what the URL says does not matter); anyone else names it with
    ``?study=``."""
    studies = getattr(scope, "studies", None) or ()
    if len(studies) == 1:
        (only,) = studies
        return only if not asked or asked == only else None
    return asked.strip() or None


def _first(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value


def _name(value: Any) -> str:
    """A person name for display: "FAMILY^Given" -> "FAMILY Given"."""
    if not value:
        return ""
    text = value.get("Alphabetic", "") if isinstance(value, dict) else str(value)
    return " ".join(part for part in text.split("^") if part).strip()


def study_summary(db: Database, study_uid: str, scope: Scope | None) -> dict[str, Any] | None:
    """The patient, the study, its image series and its report documents."""
    found = search(
        db,
        Query(
            "STUDY",
            keys={"StudyInstanceUID": study_uid},
            return_keys=[
                "PatientName",
                "PatientID",
                "PatientBirthDate",
                "PatientSex",
                "StudyDate",
                "StudyTime",
                "StudyDescription",
                "AccessionNumber",
                "ModalitiesInStudy",
            ],
            scope=scope,
        ),
    )
    if not found:
        return None
    study = found[0]
    instances = search(
        db,
        Query(
            "IMAGE",
            keys={"StudyInstanceUID": study_uid},
            return_keys=[
                "SeriesInstanceUID",
                "Modality",
                "SeriesDescription",
                "SeriesNumber",
                "SOPClassUID",
                "InstanceNumber",
                "NumberOfFrames",
            ],
            scope=scope,
        ),
    )
    series: dict[str, dict[str, Any]] = {}
    reports: list[dict[str, Any]] = []
    for row in instances:
        kind = document_kind(row.get("SOPClassUID"))
        if kind is not None:
            reports.append(
                {
                    "uid": row["SOPInstanceUID"],
                    "series_uid": row["SeriesInstanceUID"],
                    "kind": kind,
                    "title": row.get("SeriesDescription") or "",
                }
            )
            continue
        entry = series.setdefault(
            row["SeriesInstanceUID"],
            {
                "uid": row["SeriesInstanceUID"],
                "modality": row.get("Modality") or "",
                "description": row.get("SeriesDescription") or "",
                "number": _int(row.get("SeriesNumber")),
                "instances": 0,
                "frames": 1,
                "middle": [],
            },
        )
        entry["instances"] += 1
        frames = _int(row.get("NumberOfFrames")) or 1
        entry["frames"] = max(entry["frames"], frames)
        entry["middle"].append((row["SOPInstanceUID"], frames))
    ordered = sorted(series.values(), key=lambda s: (s["number"] is None, s["number"] or 0))
    for entry in ordered:
        items = entry.pop("middle")
        uid, frames = items[len(items) // 2]
        entry["thumbnail"] = {"instance": uid, "frame": (frames + 1) // 2}
    return {
        "patient": {
            "name": _name(study.get("PatientName")),
            "id": study.get("PatientID") or "",
            "birth_date": study.get("PatientBirthDate") or "",
            "sex": study.get("PatientSex") or "",
        },
        "study": {
            "uid": study_uid,
            "date": study.get("StudyDate") or "",
            "time": study.get("StudyTime") or "",
            "description": study.get("StudyDescription") or "",
            "accession": study.get("AccessionNumber") or "",
            "modalities": _list(study.get("ModalitiesInStudy")),
        },
        "series": ordered,
        "reports": reports,
    }


def _int(value: Any) -> int | None:
    try:
        return int(_first(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(_first(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _list(value: Any) -> list[str]:
    if value in (None, ""):
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [v for v in str(value).split("\\") if v]


def _value(instance: dict[str, Any], name: str) -> Any:
    element = instance.get(_TAGS[name]) or {}
    values = element.get("Value") or []
    return values[0] if values else None


def series_instances(
    db: Database,
    store: ObjectStore,
    study_uid: str,
    series_uid: str,
    scope: Scope | None,
    *,
    max_depth: int,
    max_inflated: int | None,
) -> list[dict[str, Any]] | None:
    """The image instances of a series in order, with what drawing them
    needs: frames, size, the stored default window, the frame time of a
    cine loop.  Read from the per-series metadata cache (headers only)."""
    cached = series_metadata(
        db,
        store,
        study_uid,
        series_uid,
        scope,
        max_depth=max_depth,
        max_inflated=max_inflated,
    )
    if cached is None:
        return None
    out: list[dict[str, Any]] = []
    for instance in json.loads(cached.text):
        if document_kind(_value(instance, "sop_class")) is not None:
            continue
        center, width = _float(_value(instance, "center")), _float(_value(instance, "width"))
        out.append(
            {
                "uid": _value(instance, "sop"),
                "number": _int(_value(instance, "number")),
                "frames": _int(_value(instance, "frames")) or 1,
                "rows": _int(_value(instance, "rows")),
                "columns": _int(_value(instance, "columns")),
                "window": (
                    {"center": center, "width": width}
                    if center is not None and width is not None and width >= 1
                    else None
                ),
                "frame_time_ms": _float(_value(instance, "frame_time")),
                "color": str(_value(instance, "photometric") or "").upper()
                not in ("MONOCHROME1", "MONOCHROME2", ""),
            }
        )
    return out


def locate_instance(
    db: Database, study_uid: str, sop_uid: str, scope: Scope | None
) -> StoredObject | None:
    """One stored instance of the study, in scope."""
    items = locate(db, "IMAGE", {"StudyInstanceUID": study_uid, "SOPInstanceUID": sop_uid}, scope)
    return items[0] if items else None


def sr_sections(ds: Dataset) -> list[dict[str, str]]:
    """The text of a structured report: one section per container or text
    item, each ``{"heading", "text"}``, in document order."""
    sections: list[dict[str, str]] = []
    title = _meaning(ds)
    if title:
        sections.append({"heading": title, "text": ""})
    _walk(ds.get("ContentSequence") or [], sections, depth=0)
    return [s for s in sections if s["heading"] or s["text"]]


def _meaning(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence") or []
    return str(names[0].get("CodeMeaning", "")) if names else ""


def _walk(items: Iterable[Dataset], sections: list[dict[str, str]], depth: int) -> None:
    if depth > 32:
        return
    for item in items:
        kind = str(item.get("ValueType", ""))
        name = _meaning(item)
        if kind == "CONTAINER":
            sections.append({"heading": name, "text": ""})
        elif kind in ("TEXT", "PNAME", "DATE", "DATETIME", "TIME", "UIDREF", "CODE", "NUM"):
            text = _item_text(item, kind)
            if text:
                sections.append({"heading": name, "text": text})
        _walk(item.get("ContentSequence") or [], sections, depth + 1)


def _item_text(item: Dataset, kind: str) -> str:
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "PNAME":
        return _name(str(item.get("PersonName", "")))
    if kind == "CODE":
        codes = item.get("ConceptCodeSequence") or []
        return str(codes[0].get("CodeMeaning", "")) if codes else ""
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence") or []
        if not measured:
            return ""
        units = measured[0].get("MeasurementUnitsCodeSequence") or []
        unit = str(units[0].get("CodeValue", "")) if units else ""
        return f"{measured[0].get('NumericValue', '')} {unit}".strip()
    keyword = {"DATE": "Date", "DATETIME": "DateTime", "TIME": "Time", "UIDREF": "UID"}[kind]
    return str(item.get(keyword, ""))
