"""Instance metadata in the DICOM JSON model, and its per-series cache.

WADO-RS series metadata of a 500-slice CT would read 500 objects on every
request.  Instead the series' metadata is computed once, stored in the
object store (``metadata/<study>/<series>.json``), and served from there
until the series changes: the cache records the series' instance count and
last-change time from the index and is rebuilt when they differ.  Only
headers are read (:func:`archive.retrieve.open_header`: the pixel data of
large objects is never fetched, and any store works, S3 included).

One instance never fails the others: an instance whose header cannot be read
is left out of its series' metadata, and a top-level element whose sequences
nest deeper than ``max_depth`` is left out of its instance's metadata (no
DICOM JSON consumer could parse it, and PS3.18 gives sequences no bulk data
URI); both are reported as warnings, cached with the series, which the
HTTP layer sends as ``Warning`` headers.

The cache object is one line of JSON (format, version, warnings) followed
by the JSON array of the instances, so that it is served without being
parsed again.  Bulk data URIs are cached with a placeholder for the public
base URL, which depends on how the client reached us, and filled in when
served.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import pydicom
from pydicom.dataelem import DataElement

from archive.index.db import Database
from archive.retrieve import DEFAULT_MAX_DEPTH, StoredObject, UnreadableObject, locate, open_header
from archive.security.scope import Scope
from storage import ObjectNotFound, ObjectStore

BASE = "{{BASE}}"
BULK_THRESHOLD = 1024
PREFIX = "metadata/"
FORMAT = 2
_BINARY = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}


class SeriesMetadata(NamedTuple):
    """A series' metadata: the JSON array (with :data:`BASE` placeholders)
    and the warnings about instances left out or shortened."""

    text: str
    warnings: list[str]


def cache_key(study_uid: str, series_uid: str) -> str:
    return f"{PREFIX}{study_uid}/{series_uid}.json"


def instance_url(item: StoredObject) -> str:
    return (
        f"{BASE}/studies/{item.study_uid}/series/{item.series_uid}"
        f"/instances/{item.sop_instance_uid}"
    )


def instance_metadata(
    store: ObjectStore,
    item: StoredObject,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_inflated: int | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The instance's header as DICOM JSON, large binary values as bulk data
    URIs, and the warnings about what was left out.  Raises
    :class:`archive.retrieve.UnreadableObject` when the header cannot be read."""
    with open_header(store, item, max_depth=max_depth, max_inflated=max_inflated) as header:
        ds = header.dataset
        dropped = header.dropped
        has_pixels = "Rows" in ds

    def bulk(elem: DataElement) -> str:
        return f"{instance_url(item)}/bulk/{elem.tag:08X}"

    ds.file_meta = pydicom.dataset.FileMetaDataset()
    try:
        body = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk)
    except RecursionError:  # cannot happen within max_depth; never a 500 if it does
        raise UnreadableObject("its header nests too deeply to be described") from None
    except Exception as exc:  # noqa: BLE001 - pydicom converts values lazily, here
        raise UnreadableObject(f"its header has values that cannot be read: {exc}") from None
    # keep small binary values inline, large ones by reference (done by pydicom);
    # pixel data was not read: reference it
    if has_pixels:
        vr = "OB" if pydicom.uid.UID(item.transfer_syntax).is_encapsulated else "OW"
        body["7FE00010"] = {"vr": vr, "BulkDataURI": f"{instance_url(item)}/bulk/7FE00010"}
    body.setdefault("00020010", {"vr": "UI", "Value": [item.transfer_syntax]})
    warnings = []
    if dropped:
        warnings.append(
            f"instance {item.sop_instance_uid}: element(s) {', '.join(dropped)} nest "
            f"sequences deeper than {max_depth} levels (dicomweb.max_metadata_depth) and "
            "are left out of its metadata; retrieve the instance for them"
        )
    return body, warnings


def _version(db: Database, series_uid: str, max_depth: int) -> str | None:
    row = db.query_one(
        "SELECT num_instances, updated_at FROM series WHERE series_uid = ?", (series_uid,)
    )
    return None if row is None else f"{row[0]}|{row[1]}|{max_depth}"


def _cached(store: ObjectStore, key: str, version: str | None) -> SeriesMetadata | None:
    try:
        head, _, text = store.get(key).decode().partition("\n")
        info = json.loads(head)
        if info.get("format") == FORMAT and info.get("version") == version:
            return SeriesMetadata(text, list(info.get("warnings", [])))
    except (ObjectNotFound, ValueError, AttributeError):
        pass
    return None


def series_metadata(
    db: Database,
    store: ObjectStore,
    study_uid: str,
    series_uid: str,
    scope: Scope | None = None,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_inflated: int | None = None,
) -> SeriesMetadata | None:
    """Metadata of every instance of a series, from the cache when it is current.
    None when the series does not exist (or is outside ``scope``).

    An instance whose header cannot be read is left out with a warning; one
    whose object is missing from the store too, but then nothing is cached
    (the object may come back).  Other storage errors propagate: a series is
    never cached without instances that a retry would have read."""
    items = locate(
        db, "SERIES", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}, scope
    )
    if not items:
        return None
    version = _version(db, series_uid, max_depth)
    key = cache_key(study_uid, series_uid)
    cached = _cached(store, key, version)
    if cached is not None:
        return cached
    parts: list[str] = []
    warnings: list[str] = []
    cacheable = True
    for item in items:
        try:
            body, notes = instance_metadata(
                store, item, max_depth=max_depth, max_inflated=max_inflated
            )
        except UnreadableObject as exc:
            warnings.append(
                f"instance {item.sop_instance_uid} is left out: its header cannot be read ({exc})"
            )
            continue
        except ObjectNotFound:
            warnings.append(
                f"instance {item.sop_instance_uid} is left out: its object is missing "
                "from the store (imag verify)"
            )
            cacheable = False
            continue
        parts.append(json.dumps(body))
        warnings += notes
    text = "[" + ",".join(parts) + "]"
    if cacheable:
        head = json.dumps({"format": FORMAT, "version": version, "warnings": warnings})
        store.put(key, (head + "\n" + text).encode())
    return SeriesMetadata(text, warnings)


def with_base(metadata: Any, base: str) -> str:
    """Serialised metadata with the placeholder replaced by the public base URL."""
    return json.dumps(metadata).replace(BASE, base)
