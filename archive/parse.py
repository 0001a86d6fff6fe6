"""Reading an incoming object's header: parse without decoding pixels, check
that it is a complete DICOM Part 10 object with valid UIDs, and extract the
attributes the index keeps.

This is the first step of the one ingest pipeline, so it runs for every
instance: it touches only the elements it needs (pydicom converts element
values lazily) and never builds a DICOM JSON or decodes pixel data.

It also refuses what would exhaust the server or fail on every later read
(:mod:`archive.validate`, bounded by :class:`~archive.validate.Limits`): a
deflated data set is inflated here, a bounded chunk at a time, never by
pydicom; sequence nesting is measured on the bytes before pydicom parses them
(pydicom recurses once per level); the pixel data must agree with the image
attributes, and its declared decoded size with the limits.

pydicom's own check of each value as it converts it (its
``reading_validation_mode``, which by default only warns) is turned off in
the processes that import this module: what the archive needs valid it
checks here and in :mod:`archive.validate`, and the regular expressions of
that check were ~8% of the ingest's CPU per instance.
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from archive.rejected import Rejected
from archive.uids import is_valid_uid
from archive.validate import (
    PIXEL_TAGS,
    FileChunks,
    Limits,
    PixelElement,
    Source,
    check_nesting,
    check_pixel_data,
    inflate,
    memory_chunks,
    pixel_element_at,
)

if TYPE_CHECKING:
    from archive.index.extra import ExtraAttributes

__all__ = [
    "Header",
    "Limits",
    "Rejected",
    "dataset_offset",
    "index_fields",
    "parse_header",
    "parse_header_file",
]

log = logging.getLogger(__name__)

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAGS = (Tag(0x7FE00010), Tag(0x7FE00008), Tag(0x7FE00009))
DEFAULT_LIMITS = Limits()


@dataclass
class Header:
    """The parsed header of an incoming object."""

    dataset: FileDataset
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    #: declared decoded size of all frames (0: no pixel data), for callers that decode
    decoded_bytes: int = 0
    #: where the data set starts in the object (after the File Meta Information
    #: group, as :func:`dataset_offset` says), read by the parse so that the
    #: ingest pipeline need not read the file meta again; None when the file
    #: meta could not be read before pydicom's own parse
    dataset_start: int | None = None


@functools.cache
def _tag(keyword: str) -> BaseTag:
    """The tag of a keyword, looked up once (pydicom looks it up on every
    attribute access, a measurable share of the ingest's CPU)."""
    return Tag(keyword)


def _value(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)`` by tag: the value, or None when absent."""
    element = ds.get(_tag(keyword))
    return None if element is None else element.value


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = _value(ds, keyword)
    except Exception:  # noqa: BLE001 - unreadable: refused by _header before this is asked
        return None
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = _value(ds, keyword)
    except Exception:  # noqa: BLE001 - unreadable: refused by _header before this is asked
        return None
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    # an IS holds -2^31..2^31-1 (PS3.5 6.2), what the index's integer columns
    # hold; a broken sender's longer number stays in the object, unindexed
    # (it failed the index write, "retry later", for ever)
    return number if -(2**31) <= number < 2**31 else None


def _uid(ds: Dataset, keyword: str, *, required: bool = True) -> str:
    try:
        value = _value(ds, keyword)
    except (ValueError, TypeError):
        value = None
    except Exception as exc:  # noqa: BLE001 - e.g. an unknown VR: pydicom cannot convert it
        raise Rejected("malformed", f"{keyword} cannot be read: {exc}") from None
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


_NOT_DICOM = "not a DICOM Part 10 object: no 'DICM' prefix after the 128-byte preamble"


def _read(fp: BinaryIO, **kwargs: Any) -> FileDataset:
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise Rejected("not-dicom", _NOT_DICOM)
    fp.seek(0)
    try:
        return pydicom.dcmread(fp, **kwargs)
    except InvalidDicomError as exc:
        raise Rejected("not-dicom", f"not a valid DICOM Part 10 object: {exc}") from None
    except RecursionError:
        raise _too_deep() from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None


def _too_deep() -> Rejected:
    return Rejected(
        "too-deep",
        "sequences nest too deep to parse (past ingest.max_sequence_depth)",
    )


@dataclass
class _Prefix:
    """The transfer syntax and where the data set starts, read before pydicom
    reads the data set."""

    start: int  # where the data set starts
    syntax: str  # "" when the file meta names none
    meta: FileMetaDataset  # the file meta as pydicom read it
    preamble: bytes


def _prefix(fp: BinaryIO) -> _Prefix | None:
    """The file meta's transfer syntax and end; None when pydicom cannot read
    the file meta (dcmread, called next, says why in its own words).

    Read by pydicom's own file meta reader, so that what is decided here
    (inflate it ourselves, the encoding of the nesting walk) is what dcmread
    would decide: a deflated object must never reach dcmread, which would
    inflate it whole."""
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise Rejected("not-dicom", _NOT_DICOM)
    try:
        meta = _read_file_meta_info(fp)
        syntax = meta.get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - reported by dcmread
        return None
    return _Prefix(fp.tell(), syntax or "", meta, head[:128])


def dataset_offset(fp: BinaryIO) -> int:
    """Where the data set of a Part 10 object starts: after its preamble, its
    'DICM' prefix and its File Meta Information group (0002,xxxx).

    The bytes from there on are the data set as encoded in its transfer syntax
    (still deflated for a deflated object): the same whoever wrote the file
    meta, which a C-STORE receiver builds anew.  The ingest pipeline hashes
    them to recognise one data set arriving by another path
    (:mod:`archive.ingest`)."""
    fp.seek(0)
    prefix = _prefix(fp)
    if prefix is None:
        raise Rejected("malformed", "the file meta cannot be parsed")
    return prefix.start


def _encoding(syntax: str) -> dict[str, bool]:
    """How pydicom reads a data set in ``syntax``: anything but the two
    uncompressed exceptions is explicit VR little endian."""
    if syntax == ImplicitVRLittleEndian:
        return {"little": True, "implicit": True}
    if syntax == ExplicitVRBigEndian:
        return {"little": False, "implicit": False}
    return {"little": True, "implicit": False}


def parse_header(data: bytes, limits: Limits | None = None) -> Header:
    """Parse and validate an incoming DICOM Part 10 object (no pixel decoding)
    within ``limits`` (default: the settings' defaults)."""
    limits = limits or DEFAULT_LIMITS
    prefix = _prefix(io.BytesIO(data))
    if prefix is not None and prefix.syntax == DeflatedExplicitVRLittleEndian:
        body = inflate(memory_chunks(data, prefix.start), limits.max_inflated_bytes)
        return _starting(_parse_inflated(prefix, body, limits), prefix)
    if prefix is not None and prefix.syntax:
        check_nesting(
            Source(data),
            prefix.start,
            len(data),
            max_depth=limits.max_sequence_depth,
            **_encoding(prefix.syntax),
        )
    ds = _dataset_after(prefix, data) if prefix is not None else None
    return _starting(_parse_whole(ds or _read(io.BytesIO(data)), data, limits), prefix)


def _dataset_after(prefix: _Prefix, data: bytes) -> FileDataset | None:
    """The data set of an object held whole in memory, read from where its
    file meta ended (what ``dcmread`` reads after reading the file meta a
    second time: about a sixth of the ingest's parse); None where
    ``dcmread``'s own reading differs (no transfer syntax, group 0000
    elements before the data set, no data set) and must decide."""
    syntax = prefix.syntax
    start = prefix.start
    if not syntax or len(data) - start < 8 or data[start : start + 2] == b"\x00\x00":
        return None
    encoding = _encoding(syntax)
    buffer = io.BytesIO(data)
    buffer.seek(start)
    try:
        dataset = read_dataset(
            buffer, is_implicit_VR=encoding["implicit"], is_little_endian=encoding["little"]
        )
    except RecursionError:
        raise _too_deep() from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None
    return _file_dataset(buffer, dataset, prefix, **encoding)


def _file_dataset(
    buffer: BinaryIO, dataset: Dataset, prefix: _Prefix, *, implicit: bool, little: bool
) -> FileDataset:
    """The data set read after ``prefix``'s file meta, as ``dcmread`` returns it."""
    ds = FileDataset(buffer, dataset, prefix.preamble, prefix.meta, implicit, little)
    ds.set_original_encoding(implicit, little, dataset._character_set)
    return ds


def _starting(header: Header, prefix: _Prefix | None) -> Header:
    """``header`` with the data set offset its file meta gave."""
    header.dataset_start = prefix.start if prefix is not None else None
    return header


def _parse_inflated(prefix: _Prefix, body: bytes, limits: Limits) -> Header:
    """A deflated object, from its inflated data set (offsets refer to it)."""
    check_nesting(
        Source(body), 0, len(body), little=True, implicit=False, max_depth=limits.max_sequence_depth
    )
    buffer = DicomBytesIO(body)
    try:
        dataset = read_dataset(buffer, is_implicit_VR=False, is_little_endian=True)
    except RecursionError:
        raise _too_deep() from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None
    ds = _file_dataset(buffer, dataset, prefix, implicit=False, little=True)
    return _parse_whole(ds, body, limits)


def _parse_whole(ds: FileDataset, data: bytes, limits: Limits) -> Header:
    """The checks of an object whose data set is whole in memory (``data``:
    the bytes pydicom read it from)."""
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
        _check_complete(len(data), ds)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None
    header = _header(ds, ts)
    for tag in PIXEL_TAGS:
        raw = ds.get_item(tag) if tag in ds else None
        value_at = getattr(raw, "value_tell", None)
        if raw is not None and value_at is not None:
            image, _ = check_pixel_data(
                ds,
                Source(data),
                PixelElement(tag, value_at, raw.length),
                encapsulated=_encapsulated(ts),
                little=_encoding(ts)["little"],
                limits=limits,
            )
            header.decoded_bytes = image.decoded_bytes
            break
    return header


def _encapsulated(ts: str) -> bool | None:
    """Whether pixel data in ``ts`` is encapsulated; None for a transfer
    syntax pydicom does not know (private ones)."""
    uid = UID(ts)
    return uid.is_encapsulated if uid.is_transfer_syntax else None


def parse_header_file(fp: BinaryIO, size: int, limits: Limits | None = None) -> Header:
    """Like :func:`parse_header` for an object in a file, read without its pixel
    data (objects of several GB: whole-slide images, long multi-frames).

    The header is parsed by pydicom; the pixel data element is checked from
    its framing alone (its length, or its fragment items), and the elements
    after it are walked.
    """
    limits = limits or DEFAULT_LIMITS
    prefix = _prefix(fp)
    if prefix is not None and prefix.syntax == DeflatedExplicitVRLittleEndian:
        body = inflate(FileChunks(fp, prefix.start), limits.max_inflated_bytes)
        return _starting(_parse_inflated(prefix, body, limits), prefix)
    src = Source(fp=fp, size=size)
    if prefix is not None and prefix.syntax:
        check_nesting(
            src,
            prefix.start,
            size,
            max_depth=limits.max_sequence_depth,
            stop_at_pixels=True,
            **_encoding(prefix.syntax),
        )
    fp.seek(0)
    ds = _read(fp, stop_before_pixels=True)
    ts = _meta_checks(ds)
    start = fp.tell()
    try:
        _check_complete(start, ds)  # the header ends where the pixel data (or file) starts
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Rejected("malformed", f"the DICOM object cannot be parsed: {exc}") from None
    if start >= size:
        if "Rows" in ds and "Columns" in ds:
            raise Rejected(
                "truncated", "the image has Rows and Columns but no Pixel Data (truncated object?)"
            )
        return _starting(_header(ds, ts), prefix)
    little = UID(ts).is_little_endian if UID(ts).is_transfer_syntax else True
    element = pixel_element_at(src, start, little)
    if element.tag not in PIXEL_TAGS:
        raise Rejected("malformed", f"unparseable bytes at byte {start} of {size}")
    header = _header(ds, ts)
    image, end = check_pixel_data(
        ds, src, element, encapsulated=_encapsulated(ts), little=little, limits=limits
    )
    header.decoded_bytes = image.decoded_bytes
    if end < size:  # elements after the pixel data (trailing padding, signatures)
        end = check_nesting(src, end, size, max_depth=limits.max_sequence_depth, **_encoding(ts))
    if end != size:
        raise Rejected(
            "truncated",
            f"the object is truncated: pixel data ({element.tag >> 16:04X},"
            f"{element.tag & 0xFFFF:04X}) or what follows it ends at byte {end}, "
            f"the object has {size}",
        )
    return _starting(header, prefix)


def _meta_checks(ds: FileDataset) -> str:
    meta = ds.file_meta
    try:
        media_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    except Exception:  # noqa: BLE001 - only the DICOMDIR class matters here
        media_class = ""
    if media_class == MediaStorageDirectoryStorage:
        raise Rejected(
            "dicomdir",
            "a DICOMDIR (media directory index), not an instance: import the files it lists",
        )
    return _uid(meta, "TransferSyntaxUID")


def _header(ds: FileDataset, ts: str) -> Header:
    _convert(ds, _READ_AT_PARSE)
    header = Header(
        dataset=ds,
        transfer_syntax=ts,
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"),
    )
    for keyword in _PIPELINE_READS:  # converted now, so that no later step trips on them
        try:
            _value(ds, keyword)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad values
            raise Rejected("malformed", f"{keyword} cannot be read: {exc}") from None
    try:
        meta_sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
    except Exception:  # noqa: BLE001 - the dataset's SOPInstanceUID is authoritative
        meta_sop = ""
    if meta_sop and meta_sop != header.sop_instance_uid:
        # The dataset is authoritative; the object is stored as received.
        log.warning(
            "file meta MediaStorageSOPInstanceUID differs from the dataset's SOPInstanceUID",
            extra={"sop_instance_uid": header.sop_instance_uid, "meta_sop_instance_uid": meta_sop},
        )
    return header


#: attributes the pipeline reads after the parse: the identity plugin's and the index's
_PIPELINE_READS = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "InstitutionName",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "InstanceNumber",
    "NumberOfFrames",
)


#: every element the parse and the pipeline read from a header, converted in one pass
_READ_AT_PARSE = tuple(
    Tag(keyword)
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        *_PIPELINE_READS,
        "Rows",
        "Columns",
        "BitsAllocated",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    )
)


def _convert(ds: Dataset, tags: tuple[BaseTag, ...]) -> None:
    """Convert the raw elements ``tags`` of ``ds`` as pydicom converts each on
    its first access (``convert_raw_data_element`` with the character set
    ``Dataset.__getitem__`` uses), in one pass: pydicom's access path looks
    the character set up again for every element, a third of each
    conversion's cost.  An element that does not convert stays raw, for its
    reader to report as before."""
    encoding = ds.original_character_set or ds._character_set
    for tag in tags:
        raw = ds.get_item(tag) if tag in ds else None
        if not isinstance(raw, RawDataElement) or (raw.value is None and raw.length != 0):
            continue  # absent, converted, or deferred (pydicom reads those itself)
        try:
            ds[tag] = convert_raw_data_element(raw, encoding=encoding, ds=ds)
        except Exception:  # noqa: BLE001, S112 - left raw: its reader raises as before
            continue


def index_fields(ds: Dataset, extra: ExtraAttributes | None = None) -> dict:
    """The patient, study, series and instance attributes the index keeps,
    and under ``extra`` the values of the configured extra attributes
    (setting ``index.extra_attributes``, :mod:`archive.index.extra`): read
    here, with the rest, so the commit writes them in the instance's
    transaction.  An unreadable or invalid extra value is not indexed; the
    object is not refused for it."""
    return {
        "extra": extra.extract(ds) if extra else (),
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
