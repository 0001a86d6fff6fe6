"""The mammography layout: the four standard views of a screening round, and
the woman's prior rounds to compare with.

**Which image is which view** is read from each image's own attributes,
never from its place in the study, its InstanceNumber or a description:
the breast from ImageLaterality (0020,0062), else the series' Laterality
(0020,0060); the projection from ViewPosition (0018,5101), else the code of
the View Code Sequence (0054,0220: SNOMED CT 399162004 cranio-caudal,
399368009 medio-lateral oblique, or their SNOMED RT forms).  R + CC is RCC,
L + MLO is LMLO, and so on; any other view (ML, LM, XCCL, spot views without
a CC/MLO position, B or U laterality) has no cell in the layout.  When a view
has several candidates (a repeat, a FOR PROCESSING twin), the one shown is a
FOR PRESENTATION image (PresentationIntentType 0008,0068) if there is one,
then the latest acquired (AcquisitionDateTime, else AcquisitionDate/Time,
else ContentDate/Time), then the highest InstanceNumber.  A view with no
candidate is None.

**Orientation.**  The standard hanging puts the breasts back to back: the
right breast on the viewer's left with its chest wall on the right edge of
its image, the left breast on the viewer's right with its chest wall on the
left edge, so that the chest walls face each other (RCC | LCC, RMLO |
LMLO).  Patient Orientation (0020,0020) says where the image's rows and
columns point (PS3.3 C.7.6.1.1.1): its first value is the direction from
the first to the last pixel of a row, i.e. what lies toward the image's
right edge; for a mammogram it is A (toward the nipple) or P (toward the
chest wall).  A right breast shows as it should when its rows point P (the
right column edge is posterior: "P\\L" for an RCC, "P\\FL" for an RMLO); a
left breast when they point A ("A\\R", "A\\FR").  Otherwise the image is
mirrored left-right for display (``flip``).  Without an A or P in the row
direction nothing is known and nothing is flipped (``orientation`` shows
what the image said).  The column direction (top to bottom) is not changed.

Every read goes through the archive's scoped look-ups with the caller's
scope: the study (:func:`archive.query.search`), its MG series, their
headers (:func:`archive.metadata.series_metadata`, the per-series cache of
the image headers, no pixel data).  Prior rounds come from
:func:`archive.priors.same_person_studies` (the regional identity) and each
is read again with the caller's scope: a prior the caller may not see is not
listed, a share link (scoped to one study) gets none.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from archive.index.db import Database
from archive.metadata import series_metadata
from archive.priors import same_person_studies
from archive.query import Query, search
from archive.security.scope import Scope
from storage import ObjectStore
from viewer_api.study_view import document_kind

VIEWS = ("RCC", "LCC", "RMLO", "LMLO")
MODALITY = "MG"
FOR_PRESENTATION = "FOR PRESENTATION"
#: View Code Sequence codes (SNOMED CT, and the SNOMED RT codes older devices send)
VIEW_CODES = {
    "399162004": "CC",
    "R-10242": "CC",
    "399368009": "MLO",
    "R-10226": "MLO",
}
#: the row direction that puts the chest wall toward the middle of the layout
ROWS_TOWARD = {"R": "P", "L": "A"}
_TAGS = {
    "sop": "00080018",
    "sop_class": "00080016",
    "number": "00200013",
    "rows": "00280010",
    "columns": "00280011",
    "frames": "00280008",
    "image_laterality": "00200062",
    "laterality": "00200060",
    "view_position": "00185101",
    "view_codes": "00540220",
    "code_value": "00080100",
    "intent": "00080068",
    "orientation": "00200020",
    "acquisition_datetime": "0008002A",
    "acquisition_date": "00080022",
    "acquisition_time": "00080032",
    "content_date": "00080023",
    "content_time": "00080033",
    "center": "00281050",
    "width": "00281051",
}


def _values(instance: dict[str, Any], name: str) -> list[Any]:
    element = instance.get(_TAGS[name]) or {}
    values = element.get("Value") or []
    return values if isinstance(values, list) else [values]


def _text(instance: dict[str, Any], name: str) -> str:
    values = _values(instance, name)
    return str(values[0]).strip().upper() if values and values[0] is not None else ""


def _int(instance: dict[str, Any], name: str) -> int | None:
    try:
        return int(_values(instance, name)[0])
    except (IndexError, TypeError, ValueError):
        return None


def _float(instance: dict[str, Any], name: str) -> float | None:
    try:
        return float(_values(instance, name)[0])
    except (IndexError, TypeError, ValueError):
        return None


def laterality_of(instance: dict[str, Any]) -> str:
    """R or L from ImageLaterality, else the series' Laterality; "" otherwise."""
    side = _text(instance, "image_laterality") or _text(instance, "laterality")
    return side if side in ROWS_TOWARD else ""


def projection_of(instance: dict[str, Any]) -> str:
    """CC or MLO from ViewPosition, else from the View Code Sequence; "" otherwise."""
    position = _text(instance, "view_position")
    if position in ("CC", "MLO"):
        return position
    if position:
        return ""  # another view (ML, LM, XCCL...): what the image says wins
    for item in _values(instance, "view_codes"):
        if isinstance(item, dict):
            code = _text(item, "code_value")
            if code in VIEW_CODES:
                return VIEW_CODES[code]
    return ""


def view_of(instance: dict[str, Any]) -> str | None:
    """RCC, LCC, RMLO, LMLO, or None (not one of the four standard views)."""
    side, projection = laterality_of(instance), projection_of(instance)
    return side + projection if side and projection else None


def orientation_of(instance: dict[str, Any]) -> list[str]:
    return [str(v).strip().upper() for v in _values(instance, "orientation") if v is not None]


def flip_for(laterality: str, orientation: Iterable[str]) -> bool:
    """Whether the image must be mirrored left-right so that its chest wall
    faces the middle of the layout (see the module's docstring)."""
    directions = list(orientation)
    if laterality not in ROWS_TOWARD or not directions:
        return False
    rows = directions[0]
    toward = ROWS_TOWARD[laterality]
    away = "A" if toward == "P" else "P"
    return away in rows and toward not in rows


def _moment(instance: dict[str, Any]) -> str:
    """When the image was acquired, as comparable text (YYYYMMDDHHMMSSffffff)."""

    def time(value: str) -> str:
        whole, _, fraction = value.partition(".")
        return whole.ljust(6, "0")[:6] + fraction.ljust(6, "0")[:6]

    stamp = _text(instance, "acquisition_datetime")
    if len(stamp) >= 8:
        return stamp[:8] + time(stamp[8:].split("+")[0].split("-")[0])
    for date, clock in (("acquisition_date", "acquisition_time"), ("content_date", "content_time")):
        day = _text(instance, date)
        if len(day) == 8:
            return day + time(_text(instance, clock))
    return ""


def _preference(instance: dict[str, Any]) -> tuple[bool, str, int, str]:
    return (
        _text(instance, "intent") == FOR_PRESENTATION,
        _moment(instance),
        _int(instance, "number") or 0,
        _text(instance, "sop"),
    )


def _cell(study_uid: str, series_uid: str, instance: dict[str, Any]) -> dict[str, Any]:
    laterality = laterality_of(instance)
    orientation = orientation_of(instance)
    center, width = _float(instance, "center"), _float(instance, "width")
    return {
        "study": study_uid,
        "series": series_uid,
        "instance": _text(instance, "sop"),
        "frames": _int(instance, "frames") or 1,
        "rows": _int(instance, "rows"),
        "columns": _int(instance, "columns"),
        "laterality": laterality,
        "orientation": orientation,
        "flip": flip_for(laterality, orientation),
        "presentation_intent": _text(instance, "intent"),
        "window": (
            {"center": center, "width": width}
            if center is not None and width is not None and width >= 1
            else None
        ),
    }


def round_views(
    db: Database,
    store: ObjectStore,
    study_uid: str,
    scope: Scope | None,
    *,
    max_depth: int,
    max_inflated: int | None,
) -> dict[str, dict[str, Any] | None]:
    """The four views of one study (each None when absent), from the headers
    of its MG images in the caller's scope."""
    series = search(
        db,
        Query(
            "SERIES",
            keys={"StudyInstanceUID": study_uid, "Modality": MODALITY},
            return_keys=["SeriesInstanceUID"],
            scope=scope,
        ),
    )
    candidates: dict[str, list[tuple[tuple, dict[str, Any]]]] = {view: [] for view in VIEWS}
    for row in series:
        series_uid = row["SeriesInstanceUID"]
        cached = series_metadata(
            db, store, study_uid, series_uid, scope, max_depth=max_depth, max_inflated=max_inflated
        )
        if cached is None:
            continue
        for instance in json.loads(cached.text):
            if document_kind(_text(instance, "sop_class")) is not None:
                continue
            view = view_of(instance)
            if view is not None:
                cell = _cell(study_uid, series_uid, instance)
                candidates[view].append((_preference(instance), cell))
    return {
        view: max(found, key=lambda pair: pair[0])[1] if found else None
        for view, found in candidates.items()
    }


def _study(db: Database, study_uid: str, scope: Scope | None) -> dict[str, Any] | None:
    found = search(
        db,
        Query(
            "STUDY",
            keys={"StudyInstanceUID": study_uid},
            return_keys=["StudyDate", "StudyDescription", "PatientName", "PatientBirthDate"],
            scope=scope,
        ),
    )
    return found[0] if found else None


def _round(row: dict[str, Any], site: str, views: dict[str, Any]) -> dict[str, Any]:
    return {
        "study_uid": row["StudyInstanceUID"],
        "date": row.get("StudyDate") or "",
        "site": site,
        "description": row.get("StudyDescription") or "",
        "views": views,
    }


def _name(value: Any) -> str:
    text = value.get("Alphabetic", "") if isinstance(value, dict) else str(value or "")
    return " ".join(part for part in text.split("^") if part).strip()


def mammography_layout(
    db: Database,
    store: ObjectStore,
    identity: Any,
    study_uid: str,
    scope: Scope | None,
    *,
    max_depth: int,
    max_inflated: int | None,
) -> dict[str, Any] | None:
    """The study's round and the prior rounds the caller may see (newest
    first: the same woman's other studies with MG images, at any site, each
    read with ``scope``).  None when the study is not in scope."""
    current = _study(db, study_uid, scope)
    if current is None:
        return None
    limits = {"max_depth": max_depth, "max_inflated": max_inflated}
    person = same_person_studies(db, identity, study_uid, include_self=True)
    sites = {row["study_uid"]: row["site"] for row in person}
    priors = []
    for other in person:
        if other["study_uid"] == study_uid or MODALITY not in other["modalities"]:
            continue
        seen = _study(db, other["study_uid"], scope)
        if seen is None:
            continue  # outside the caller's scope: not even its existence is said
        views = round_views(db, store, other["study_uid"], scope, **limits)
        priors.append(_round(seen, other["site"], views))
    return {
        "patient": {
            "name": _name(current.get("PatientName")),
            "birth_date": current.get("PatientBirthDate") or "",
        },
        "current": _round(
            current,
            sites.get(study_uid, ""),
            round_views(db, store, study_uid, scope, **limits),
        ),
        "priors": priors,
    }
