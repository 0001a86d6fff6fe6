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
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, MediaStorageDirectoryStorage

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


def _check_complete(data: bytes | memoryview, ds: Dataset) -> None:
    """Refuse truncated objects, which pydicom reads without complaint: the last
    top-level element must end exactly where the bytes end."""
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
    if end != len(data):
        raise Rejected(
            "truncated",
            f"the object is truncated or has {len(data) - end} unparseable trailing bytes "
            f"(the last complete element ends at byte {end} of {len(data)})",
        )


def parse_header(data: bytes) -> Header:
    """Parse and validate an incoming DICOM Part 10 object (no pixel decoding)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise Rejected(
            "not-dicom", "not a DICOM Part 10 object: no 'DICM' prefix after the 128-byte preamble"
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise Rejected("not-dicom", f"not a valid DICOM Part 10 object: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None

    meta = ds.file_meta
    if str(meta.get("MediaStorageSOPClassUID", "")) == MediaStorageDirectoryStorage:
        raise Rejected(
            "dicomdir",
            "a DICOMDIR (media directory index), not an instance: import the files it lists",
        )
    ts = _uid(meta, "TransferSyntaxUID")
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
            _check_complete(data, ds)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None

    header = Header(
        dataset=ds,
        transfer_syntax=ts,
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"),
    )
    meta_sop = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
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
