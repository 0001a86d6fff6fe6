"""Reading an incoming object's header: parse without decoding pixels, check
that it is a complete DICOM Part 10 object with valid UIDs, and extract the
attributes the index keeps.

This is the first step of the one ingest pipeline, so it runs for every
instance: it touches only the elements it needs (pydicom converts element
values lazily) and never builds a DICOM JSON or decodes pixel data.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, MediaStorageDirectoryStorage

from archive.uids import is_valid_uid

log = logging.getLogger(__name__)
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAGS = (Tag(0x7FE00010), Tag(0x7FE00008), Tag(0x7FE00009))


class Rejected(Exception):
    """An incoming object that is refused, with a reason a sender can act on.

    ``code`` is a stable short name for the kind of problem (also the metrics
    label and the basis of the DICOM / HTTP status the network services send).
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Header:
    """The parsed header of an incoming object."""

    dataset: FileDataset
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
    except (ValueError, TypeError):
        return None
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str, *, required: bool = True) -> str:
    try:
        value = ds.get(keyword)
    except (ValueError, TypeError):
        value = None
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    if not text:
        if required:
            raise Rejected("missing-attribute", f"{keyword} is missing or empty")
        return ""
    if not is_valid_uid(text):
        raise Rejected(
            "invalid-uid",
            f"{keyword} {text[:80]!r} is not a valid UID (digits and dots, at most 64 characters)",
        )
    return text


def _check_complete(total: int, ds: Dataset) -> None:
    """Refuse truncated objects, which pydicom reads without complaint: the last
    top-level element must end exactly at byte ``total``."""
    tags = list(ds.keys())
    if not tags:
        raise Rejected("not-dicom", "the object holds no data elements after its file meta")
    raw = ds.get_item(tags[-1])
    value = raw.value if raw is not None else None
    tell = getattr(raw, "value_tell", None)
    if tell is None:  # already converted: cannot check, nothing was truncated by us
        return
    if raw.length == UNDEFINED_LENGTH:
        end = tell + (len(value) if value is not None else 0) + 8  # + delimitation item
    else:
        if value is not None and len(value) != raw.length:
            raise Rejected(
                "truncated",
                f"the object is truncated: element {raw.tag} declares {raw.length} bytes, "
                f"{len(value)} are present",
            )
        end = tell + raw.length
    if end != total:
        raise Rejected(
            "truncated",
            f"the object is truncated or has {total - end} unparseable trailing bytes "
            f"(the last complete element ends at byte {end} of {total})",
        )


def _read(fp: BinaryIO, **kwargs: Any) -> FileDataset:
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise Rejected(
            "not-dicom", "not a DICOM Part 10 object: no 'DICM' prefix after the 128-byte preamble"
        )
    fp.seek(0)
    try:
        return pydicom.dcmread(fp, **kwargs)
    except InvalidDicomError as exc:
        raise Rejected("not-dicom", f"not a valid DICOM Part 10 object: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None


def parse_header(data: bytes) -> Header:
    """Parse and validate an incoming DICOM Part 10 object (no pixel decoding)."""
    ds = _read(io.BytesIO(data))
    ts = _meta_checks(ds)
    if (
        "PixelData" not in ds
        and ("Rows" in ds and "Columns" in ds)
        and not any(t in ds for t in PIXEL_DATA_TAGS)
    ):
        raise Rejected(
            "truncated", "the image has Rows and Columns but no Pixel Data (truncated object?)"
        )
    try:
        if ts != DeflatedExplicitVRLittleEndian:  # offsets refer to the inflated stream
            _check_complete(len(data), ds)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None
    return _header(ds, ts)


def parse_header_file(fp: BinaryIO, size: int) -> Header:
    """Like :func:`parse_header` for an object in a file, read without its pixel
    data (objects of several GB: whole-slide images, long multi-frames).

    The header is parsed by pydicom; the pixel data element is checked for
    completeness from its framing alone (its length, or its fragment items).
    """
    ds = _read(fp, stop_before_pixels=True)
    ts = _meta_checks(ds)
    if ts == DeflatedExplicitVRLittleEndian:
        # offsets refer to the inflated stream; deflated objects are small: check fully
        fp.seek(0)
        return parse_header(fp.read())
    start = fp.tell()
    try:
        _check_complete(start, ds)  # the header ends where the pixel data (or file) starts
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None
    if start < size:
        _check_pixel_framing(fp, start, size, UID(ts).is_little_endian)
    elif "Rows" in ds and "Columns" in ds:
        raise Rejected(
            "truncated", "the image has Rows and Columns but no Pixel Data (truncated object?)"
        )
    return _header(ds, ts)


def _check_pixel_framing(fp: BinaryIO, start: int, size: int, little: bool) -> None:
    order = "<" if little else ">"

    def read(at: int, count: int) -> bytes:
        fp.seek(at)
        chunk = fp.read(count)
        if len(chunk) < count:
            raise Rejected("truncated", f"the object is truncated at byte {at} of {size}")
        return chunk

    head = read(start, 8)
    group, element = struct.unpack(order + "HH", head[:4])
    # Some producers label explicit VR but write implicit (pydicom adapts too):
    # trust the bytes, a VR is two letters.
    implicit = not head[4:6].isalpha()
    if implicit:
        (length,) = struct.unpack(order + "I", head[4:8])
        value = start + 8
    else:
        (length,) = struct.unpack(order + "I", read(start + 8, 4))
        value = start + 12
    if length != UNDEFINED_LENGTH:
        end = value + length
    else:  # encapsulated: Basic Offset Table and fragment items, then the delimiter
        end = value
        while True:
            tag_group, tag_element, item_length = struct.unpack(order + "HHI", read(end, 8))
            if (tag_group, tag_element) == (0xFFFE, 0xE0DD):
                end += 8
                break
            if (tag_group, tag_element) != (0xFFFE, 0xE000):
                raise Rejected(
                    "malformed",
                    f"unexpected element ({tag_group:04X},"
                    f"{tag_element:04X}) inside encapsulated pixel data",
                )
            end += 8 + item_length
    # elements after the pixel data (trailing padding, signatures) must fit exactly
    long_vrs = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UR", b"UT", b"UN"}
    while end < size:
        entry = read(end, 8)
        if entry[4:6].isalpha():
            if entry[4:6] in long_vrs:
                (item_length,) = struct.unpack(order + "I", read(end + 8, 4))
                value_at = end + 12
            else:
                (item_length,) = struct.unpack(order + "H", entry[6:8])
                value_at = end + 8
        else:
            (item_length,) = struct.unpack(order + "I", entry[4:8])
            value_at = end + 8
        if item_length == UNDEFINED_LENGTH:
            return  # a trailing sequence of undefined length: not walked
        end = value_at + item_length
    if end != size:
        raise Rejected(
            "truncated",
            f"the object is truncated: pixel data ({group:04X},{element:04X}) or what "
            f"follows it ends at byte {end}, the object has {size}",
        )


def _meta_checks(ds: FileDataset) -> str:
    meta = ds.file_meta
    if str(meta.get("MediaStorageSOPClassUID", "")) == MediaStorageDirectoryStorage:
        raise Rejected(
            "dicomdir",
            "a DICOMDIR (media directory index), not an instance: import the files it lists",
        )
    return _uid(meta, "TransferSyntaxUID")


def _header(ds: FileDataset, ts: str) -> Header:
    header = Header(
        dataset=ds,
        transfer_syntax=ts,
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"),
    )
    meta_sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
    if meta_sop and meta_sop != header.sop_instance_uid:
        # The dataset is authoritative; the object is stored as received.
        log.warning(
            "file meta MediaStorageSOPInstanceUID differs from the dataset's SOPInstanceUID",
            extra={"sop_instance_uid": header.sop_instance_uid, "meta_sop_instance_uid": meta_sop},
        )
    return header


def index_fields(ds: Dataset) -> dict:
    """The patient, study, series and instance attributes the index keeps."""
    return {
        "patient_name": _text(ds, "PatientName"),
        "birth_date": _text(ds, "PatientBirthDate"),
        "sex": _text(ds, "PatientSex"),
        "study_date": _text(ds, "StudyDate"),
        "study_time": _text(ds, "StudyTime"),
        "accession_number": _text(ds, "AccessionNumber"),
        "study_id": _text(ds, "StudyID"),
        "study_description": _text(ds, "StudyDescription"),
        "referring_physician_name": _text(ds, "ReferringPhysicianName"),
        "institution_name": _text(ds, "InstitutionName"),
        "modality": _text(ds, "Modality"),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription"),
        "body_part_examined": _text(ds, "BodyPartExamined"),
        "pps_start_date": _text(ds, "PerformedProcedureStepStartDate"),
        "pps_start_time": _text(ds, "PerformedProcedureStepStartTime"),
        "instance_number": _int(ds, "InstanceNumber"),
        "number_of_frames": _int(ds, "NumberOfFrames"),
    }
