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

Every binary value larger than :data:`BULK_THRESHOLD` gets its own bulk data
URI, at any depth: a value inside sequence items is addressed by its path,
``.../bulk/54000100/0/54001010`` (sequence tag, item index, tag, ...), item
indexes 0-based as in pydicom and Orthanc's content paths, so that two items
of one sequence never share a URI (:func:`bulk_path`).  Binary values given
inline (InlineBinary) are little endian whatever the stored object's byte
order (PS3.18 F.2.7: the DICOM JSON model's binary values are little endian),
like the bulk data resource itself.

The cache object is one line of JSON (format, version, warnings) followed
by the JSON array of the instances, so that it is served without being
parsed again.  Bulk data URIs are cached with a placeholder for the public
base URL, which depends on how the client reached us, and filled in when
served.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement

from archive.index.db import Database
from archive.pixels import to_little_endian
from archive.retrieve import DEFAULT_MAX_DEPTH, StoredObject, UnreadableObject, locate, open_header
from archive.security.scope import Scope
from storage import ObjectNotFound, ObjectStore

BASE = "{{BASE}}"
BULK_THRESHOLD = 1024
PREFIX = "metadata/"
#: 3: bulk data URIs of nested values carry their sequence path; inline
#: binary values are little endian (older caches are rebuilt)
FORMAT = 3
#: bytes of a value's word, by VR: what is swapped from big endian
WORD = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
#: the JSON model's binary VRs (PS3.18 F.2.7), ambiguous ones resolved by pydicom
_BINARY = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW", "US or SS or OW"}
#: the longest value whose JSON a series' conversion keeps for its other instances
MEMO_MAX_BYTES = 4096


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


def bulk_path(*steps: int) -> str:
    """The path of a value under ``/bulk/``: tags (8 hex digits) and item
    indexes (0-based) alternating, ``54000100/0/54001010``."""
    return "/".join(f"{step:08X}" if i % 2 == 0 else str(step) for i, step in enumerate(steps))


def word_size(vr: str) -> int:
    """Bytes per word of a binary VR (0: bytes, never swapped)."""
    if vr in WORD:
        return WORD[vr]
    return 2 if vr.endswith("OW") else 0


def little_endian_bytes(value: bytes, vr: str, little_endian: bool) -> bytes:
    """A binary value in little endian byte order, whatever the object's."""
    width = word_size(vr)
    return value if little_endian or width < 2 else to_little_endian(value, width)


#: a top-level element's JSON by what determines it (see :func:`_memo_key`)
Memo = dict[tuple[Any, ...], dict[str, Any]]


def _memo_key(raw: RawDataElement, charset: Any) -> tuple[Any, ...] | None:
    """What pydicom's conversion of an unconverted element depends on: its
    tag, VR, bytes, encoding and the data set's character set.  None when it
    depends on more -- an implicit VR that only the data set's other values
    resolve (``US or SS`` by PixelRepresentation), an unknown tag -- or when
    the value is too long to be worth keeping."""
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    if " or " in vr or vr in _BINARY or vr == "SQ" or raw.length > MEMO_MAX_BYTES:
        return None
    return (raw.tag, vr, raw.value, raw.is_little_endian, raw.is_implicit_VR, charset)


def to_json(
    ds: pydicom.Dataset,
    bulk_uri: Callable[[str], str],
    *,
    little_endian: bool = True,
    threshold: int = BULK_THRESHOLD,
    memo: Memo | None = None,
    _path: tuple[int, ...] = (),
) -> dict[str, Any]:
    """``ds`` in the DICOM JSON model (PS3.18 F.2).  pydicom's own
    ``to_json_dict`` gives every nested value the same handler without its
    position, so two items of a sequence would share one bulk data URI, and
    it copies binary values in the file's byte order; here each binary value
    over ``threshold`` bytes gets ``bulk_uri(path)`` with its sequence path
    (:func:`bulk_path`) and smaller ones are inline, little endian.

    ``memo``: the JSON of top-level elements already converted for other
    instances of a series, keyed by their bytes (:func:`_memo_key`).  Most
    of a series' header is the same in every instance (patient, study,
    series, geometry); pydicom's conversion of each value was most of a
    series' cold metadata time (profiled, issue 17), and is now done once
    per distinct value.  The JSON is shared, never modified."""
    out: dict[str, Any] = {}
    charset = None
    if memo is not None:
        found = ds.get_item(0x00080005)
        charset = found.value if found is not None else None
    for elem in ds.elements():
        key = f"{elem.tag:08X}"
        mkey = None
        if memo is not None and isinstance(elem, RawDataElement):
            mkey = _memo_key(elem, charset)
            if mkey is not None and (node := memo.get(mkey)) is not None:
                out[key] = node
                continue
        elem = ds[elem.tag]  # converted (and kept converted in ds)
        path = (*_path, int(elem.tag))
        if elem.VR == "SQ":
            out[key] = {
                "vr": "SQ",
                "Value": [
                    to_json(
                        item,
                        bulk_uri,
                        little_endian=little_endian,
                        threshold=threshold,
                        _path=(*path, index),
                    )
                    for index, item in enumerate(elem.value)
                ],
            }
        elif elem.VR in _BINARY and isinstance(elem.value, bytes):
            vr = elem.VR if elem.VR in WORD or elem.VR in ("OB", "UN") else "OW"
            node: dict[str, Any] = {"vr": vr}
            if elem.value:
                if len(elem.value) > threshold:
                    node["BulkDataURI"] = bulk_uri(bulk_path(*path))
                else:
                    value = little_endian_bytes(elem.value, vr, little_endian)
                    node["InlineBinary"] = base64.b64encode(value).decode("ascii")
            out[key] = node
        else:
            out[key] = elem.to_json_dict(None, threshold)
            if mkey is not None and elem.VR not in _BINARY and elem.VR != "SQ":
                memo[mkey] = out[key]  # type: ignore[index]
    return out


def instance_metadata(
    store: ObjectStore,
    item: StoredObject,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_inflated: int | None = None,
    memo: Memo | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The instance's header as DICOM JSON, large binary values as bulk data
    URIs, and the warnings about what was left out.  Raises
    :class:`archive.retrieve.UnreadableObject` when the header cannot be read.
    ``memo``: shared by the instances of one series (:func:`to_json`)."""
    with open_header(store, item, max_depth=max_depth, max_inflated=max_inflated) as header:
        ds = header.dataset
        dropped = header.dropped
        has_pixels = "Rows" in ds

    little = getattr(ds, "original_encoding", (None, True))[1] is not False
    url = f"{instance_url(item)}/bulk/"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    try:
        body = to_json(ds, lambda path: url + path, little_endian=little, memo=memo)
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
    memo: Memo = {}
    for item in items:
        try:
            body, notes = instance_metadata(
                store, item, max_depth=max_depth, max_inflated=max_inflated, memo=memo
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
        try:  # json.dumps was 5% of a series' cold time
            parts.append(orjson.dumps(body).decode())
        except TypeError:  # what orjson cannot write (an integer over 64 bits)
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
