"""The one retrieval path: C-GET, C-MOVE and WADO-RS.

:func:`locate` turns a retrieve request (a level and the unique keys of that
level, within the caller's scope) into the list of stored instances, in
series and instance order; :func:`read` reads one back from the object
store.  Converting it for a receiver that does not accept the stored
transfer syntax is :func:`archive.transcode.convert_for`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pydicom
from pydicom.dataset import FileDataset

from archive.index.db import Database
from archive.query import QueryError
from archive.security.scope import Scope, study_clause
from archive.uids import is_valid_uid
from storage import ObjectStore


@dataclass(frozen=True)
class StoredObject:
    """One instance to send: where it is and what it is."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    object_key: str
    size: int


_LEVEL_KEY = {
    "STUDY": ("StudyInstanceUID", "st.study_uid"),
    "SERIES": ("SeriesInstanceUID", "se.series_uid"),
    "IMAGE": ("SOPInstanceUID", "i.sop_instance_uid"),
}
_FROM = (
    "FROM instances i JOIN series se ON se.id = i.series_ref "
    "JOIN studies st ON st.id = se.study_ref JOIN patients p ON p.id = st.patient_ref "
    "WHERE i.integrity = 'ok'"
)
_SELECT = (
    "SELECT st.study_uid, se.series_uid, i.sop_instance_uid, i.sop_class_uid, i.stored_ts, "
    f"i.object_key, i.size {_FROM}"
)


def _uid_list(keyword: str, value: str) -> list[str]:
    uids = [u.strip() for u in (value or "").split("\\") if u.strip()]
    if not uids:
        raise QueryError(f"{keyword} is required to retrieve at this level")
    for uid in uids:
        if not is_valid_uid(uid):
            raise QueryError(f"{keyword}: {uid!r} is not a valid UID")
    return uids


def locate(
    db: Database, level: str, keys: dict[str, str], scope: Scope | None = None
) -> list[StoredObject]:
    """The stored instances a retrieve request names.

    ``keys`` holds the unique keys of ``level`` and, optionally, of the levels
    above it (hierarchical retrieve, PS3.4 C.4.2.2): PatientID at PATIENT
    level, StudyInstanceUID at STUDY level, and so on; lists of UIDs are
    allowed.  ``scope`` restricts the answer to the studies the caller may see.
    """
    where, params = _where(level, keys, scope)
    sql = f"{_SELECT}{where} ORDER BY st.id, se.series_number, se.id, i.instance_number, i.id"
    return [StoredObject(*row[:6], int(row[6])) for row in db.query(sql, params)]


def outside_scope(db: Database, level: str, keys: dict[str, str], scope: Scope | None) -> bool:
    """Whether what ``keys`` name exists, but only outside ``scope``: such a
    request is answered as if nothing were there, and audited as denied."""
    if scope is None:
        return False

    def exists(within: Scope | None) -> bool:
        where, params = _where(level, keys, within)
        return bool(db.scalar(f"SELECT 1 {_FROM}{where} LIMIT 1", params))

    return not exists(scope) and exists(None)


def _where(level: str, keys: dict[str, str], scope: Scope | None) -> tuple[str, list[object]]:
    """The conditions (appended to ``_FROM``'s WHERE) selecting what ``keys`` name."""
    clauses: list[str] = []
    params: list[object] = []
    if level == "PATIENT":
        pid = (keys.get("PatientID") or "").strip()
        if not pid:
            raise QueryError("PatientID is required to retrieve at PATIENT level")
        clauses.append("p.patient_id = ?")
        params.append(pid)
        if keys.get("IssuerOfPatientID"):
            clauses.append("p.issuer = ?")
            params.append(keys["IssuerOfPatientID"].strip())
    elif level in _LEVEL_KEY:
        for upper in ("STUDY", "SERIES", "IMAGE"):
            keyword, column = _LEVEL_KEY[upper]
            value = keys.get(keyword)
            if upper == level or value:
                uids = _uid_list(keyword, value or "")
                clauses.append(f"{column} IN ({', '.join('?' * len(uids))})")
                params.extend(uids)
            if upper == level:
                break
    else:
        raise QueryError(f"unknown retrieve level {level!r}: use PATIENT, STUDY, SERIES or IMAGE")
    if scope is not None:
        clause, scope_params = study_clause(scope, "st")
        clauses.append(clause)
        params.extend(scope_params)
    return "".join(f" AND {c}" for c in clauses), params


def read(store: ObjectStore, item: StoredObject) -> FileDataset:
    """The stored instance as a dataset (pixel data not decoded)."""
    return pydicom.dcmread(io.BytesIO(store.get(item.object_key)))
