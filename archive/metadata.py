"""Instance metadata in the DICOM JSON model, and its per-series cache.

WADO-RS series metadata of a 500-slice CT would read 500 objects on every
request.  Instead the series' metadata is computed once, stored as one JSON
object in the object store (``metadata/<study>/<series>.json``), and served
from there until the series changes: the cache records the series' instance
count and last-change time from the index and is rebuilt when they differ.
Only headers are read (``stop_before_pixels``), streamed from the store, so
the pixel data of large objects is never fetched.

Bulk data URIs are cached with a placeholder for the public base URL, which
depends on how the client reached us, and filled in when served.
"""

from __future__ import annotations

import json
from typing import Any

import pydicom
from pydicom.dataelem import DataElement

from archive.index.db import Database
from archive.retrieve import StoredObject, locate
from archive.security.scope import Scope
from storage import ObjectNotFound, ObjectStore

BASE = "{{BASE}}"
BULK_THRESHOLD = 1024
PREFIX = "metadata/"
_BINARY = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def cache_key(study_uid: str, series_uid: str) -> str:
    return f"{PREFIX}{study_uid}/{series_uid}.json"


def instance_url(item: StoredObject) -> str:
    return (
        f"{BASE}/studies/{item.study_uid}/series/{item.series_uid}"
        f"/instances/{item.sop_instance_uid}"
    )


def instance_metadata(store: ObjectStore, item: StoredObject) -> dict[str, Any]:
    """The instance's header as DICOM JSON, large binary values as bulk data URIs."""
    with store.open(item.object_key) as stream:
        ds = pydicom.dcmread(stream, stop_before_pixels=True)
        has_pixels = "Rows" in ds

    def bulk(elem: DataElement) -> str:
        return f"{instance_url(item)}/bulk/{elem.tag:08X}"

    ds.file_meta = pydicom.dataset.FileMetaDataset()
    body = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk)
    # keep small binary values inline, large ones by reference (done by pydicom);
    # pixel data was not read: reference it
    if has_pixels:
        vr = "OB" if pydicom.uid.UID(item.transfer_syntax).is_encapsulated else "OW"
        body["7FE00010"] = {"vr": vr, "BulkDataURI": f"{instance_url(item)}/bulk/7FE00010"}
    body.setdefault("00020010", {"vr": "UI", "Value": [item.transfer_syntax]})
    return body


def _version(db: Database, series_uid: str) -> str | None:
    row = db.query_one(
        "SELECT num_instances, updated_at FROM series WHERE series_uid = ?", (series_uid,)
    )
    return None if row is None else f"{row[0]}|{row[1]}"


def series_metadata(
    db: Database,
    store: ObjectStore,
    study_uid: str,
    series_uid: str,
    scope: Scope | None = None,
) -> list[dict[str, Any]] | None:
    """Metadata of every instance of a series, from the cache when it is current.
    None when the series does not exist (or is outside ``scope``)."""
    items = locate(
        db, "SERIES", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}, scope
    )
    if not items:
        return None
    version = _version(db, series_uid)
    key = cache_key(study_uid, series_uid)
    try:
        cached = json.loads(store.get(key))
        if cached.get("version") == version:
            return cached["instances"]
    except (ObjectNotFound, ValueError, KeyError):
        pass
    instances = [instance_metadata(store, item) for item in items]
    store.put(key, json.dumps({"version": version, "instances": instances}).encode())
    return instances


def with_base(metadata: Any, base: str) -> str:
    """Serialised metadata with the placeholder replaced by the public base URL."""
    return json.dumps(metadata).replace(BASE, base)
