"""The hostile-input corpus: DICOM objects built to exhaust or break a reader,
generated at test time (deterministic, nothing binary committed).

One case per class of issue 11 that ingest must refuse, each with the
rejection code and the words of the reason the sender must get:

* ``deflate-bomb``: ~1 MB of Deflated Explicit VR Little Endian that inflates
  to 1 GiB (2048 frames of 512 x 512 x 16 bits, all consistent: only the
  inflated size is wrong);
* ``deflate-truncated``: a deflate stream cut short;
* ``declared-huge-frame`` / ``declared-huge-frames``: image attributes that
  declare a frame (native) or a multi-frame (RLE, one small fragment per
  frame) larger than the decoded-size limits, with a few bytes of pixel data;
* ``native-length-mismatch``, ``fragments-short-of-frames``,
  ``offset-table-mismatch``, ``missing-rows``: pixel data that does not agree
  with the image attributes (every later frame read or rendering would fail);
* ``deep-nesting-undefined`` / ``deep-nesting-defined``: sequences nested
  10,000 deep, of undefined and of defined lengths;
* ``unreadable-uid``: a crash the fuzzer found (a VR pydicom cannot convert).

``python -m tests.hostile FOLDER`` writes the corpus as .dcm files.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

BOMB_INFLATED = 2**30  # the pixel data of the deflate bomb: 2048 x 512 x 512 x 2 bytes
MiB = 2**20


def uid(*parts: str) -> UID:
    """A UID derived from ``parts`` (the same on every run)."""
    return generate_uid(entropy_srcs=["imag-hostile", *parts])


@dataclass(frozen=True)
class Case:
    """One hostile object and the refusal it must get."""

    name: str
    code: str  # the pipeline's rejection code
    reason: str  # words the refusal reason contains (the setting, for a limit)
    build: Callable[[], bytes]

    @property
    def study_uid(self) -> str:
        return str(uid(self.name, "study"))

    @property
    def sop_instance_uid(self) -> str:
        return str(uid(self.name, "instance"))

    def data(self) -> bytes:
        return _built(self.name)


def _dataset(name: str, sop_class: str = CTImageStorage, **image: object) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(name, "instance")
    ds.StudyDate = "20260101"
    ds.Modality = "CT" if sop_class == CTImageStorage else "OT"
    ds.PatientName = "HOSTILE^" + name.upper().replace("-", "_")[:40]
    ds.PatientID = "HOSTILE-1"
    ds.StudyInstanceUID = uid(name, "study")
    ds.SeriesInstanceUID = uid(name, "series")
    for keyword, value in image.items():
        setattr(ds, keyword, value)
    return ds


def _image(rows: int, columns: int, bits: int = 16, frames: int | None = None) -> dict:
    attrs: dict[str, object] = {
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": rows,
        "Columns": columns,
        "BitsAllocated": bits,
        "BitsStored": bits,
        "HighBit": bits - 1,
        "PixelRepresentation": 0,
    }
    if frames is not None:
        attrs["NumberOfFrames"] = frames
    return attrs


def _prefix(ds: Dataset, syntax: str) -> bytes:
    """Preamble and file meta for ``ds`` in ``syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _body(ds: Dataset) -> bytes:
    """The data set, Explicit VR Little Endian (as deflate compresses it too)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _native_pixels_header(length: int) -> bytes:
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)


def _item(value: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(value)) + value


def _encapsulated(fragments: list[bytes], table: list[int] | None = None) -> bytes:
    offsets = b"".join(struct.pack("<I", o) for o in table or [])
    return (
        struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
        + _item(offsets)
        + b"".join(_item(f) for f in fragments)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )


def _rle_fragment() -> bytes:
    """A tiny RLE frame (header with one segment; its content is never read)."""
    return struct.pack("<16I", 1, 64, *[0] * 14) + b"\x00\x00"


# -- the cases -----------------------------------------------------------------------------


def deflate_bomb() -> bytes:
    """1 GiB of pixel data deflated to ~1 MB.  Each MiB of zeros is deflated
    after a full flush, so every block compresses to the same bytes: the
    stream is built without ever holding the inflated gigabyte."""
    ds = _dataset("deflate-bomb", **_image(512, 512, 16, BOMB_INFLATED // (512 * 512 * 2)))
    head = _body(ds) + _native_pixels_header(BOMB_INFLATED)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(head) + deflater.flush(zlib.Z_FULL_FLUSH)
    block = deflater.compress(b"\0" * MiB) + deflater.flush(zlib.Z_FULL_FLUSH)
    again = deflater.compress(b"\0" * MiB) + deflater.flush(zlib.Z_FULL_FLUSH)
    assert again == block, "zlib does not repeat itself after a full flush"
    end = deflater.flush(zlib.Z_FINISH)
    stream = start + block * (BOMB_INFLATED // MiB) + end
    return _prefix(ds, DeflatedExplicitVRLittleEndian) + stream


def deflate_truncated() -> bytes:
    ds = _dataset("deflate-truncated", **_image(64, 64))
    body = _body(ds) + _native_pixels_header(64 * 64 * 2) + bytes(range(256)) * 32
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = deflater.compress(body) + deflater.flush()
    return _prefix(ds, DeflatedExplicitVRLittleEndian) + stream[: len(stream) // 2]


def declared_huge_frame() -> bytes:
    """65535 x 65535 x 16 bits (8 GiB a frame) x 1000 frames, in 16 bytes."""
    ds = _dataset("declared-huge-frame", **_image(65535, 65535, 16, 1000))
    return _prefix(ds, ExplicitVRLittleEndian) + _body(ds) + _native_pixels_header(16) + bytes(16)


def declared_huge_frames() -> bytes:
    """RLE: 200 frames of 4096 x 4096 x 16 bits (6.4 GiB decoded), one tiny
    fragment each: a frame is acceptable, all of them are not."""
    ds = _dataset(
        "declared-huge-frames", SecondaryCaptureImageStorage, **_image(4096, 4096, 16, 200)
    )
    return _prefix(ds, RLELossless) + _body(ds) + _encapsulated([_rle_fragment()] * 200)


def native_length_mismatch() -> bytes:
    ds = _dataset("native-length-mismatch", **_image(512, 512, 16))
    return (
        _prefix(ds, ExplicitVRLittleEndian) + _body(ds) + _native_pixels_header(1000) + bytes(1000)
    )


def fragments_short_of_frames() -> bytes:
    ds = _dataset(
        "fragments-short-of-frames", SecondaryCaptureImageStorage, **_image(64, 64, 16, 10)
    )
    return _prefix(ds, RLELossless) + _body(ds) + _encapsulated([_rle_fragment()] * 3)


def offset_table_mismatch() -> bytes:
    """Three frames, three fragments, a Basic Offset Table of two entries."""
    ds = _dataset("offset-table-mismatch", SecondaryCaptureImageStorage, **_image(64, 64, 16, 3))
    fragment = _rle_fragment()
    return (
        _prefix(ds, RLELossless)
        + _body(ds)
        + _encapsulated([fragment] * 3, table=[0, 8 + len(fragment)])
    )


def missing_rows() -> bytes:
    image = _image(64, 64, 16)
    del image["Rows"]
    ds = _dataset("missing-rows", **image)
    return (
        _prefix(ds, ExplicitVRLittleEndian)
        + _body(ds)
        + _native_pixels_header(64 * 64 * 2)
        + bytes(64 * 64 * 2)
    )


def unreadable_uid() -> bytes:
    """Found by tests/test_fuzz.py: SOP Class UID with the VR bytes "TI", which
    pydicom reads but cannot convert (NotImplementedError, once a 500)."""
    ds = _dataset("unreadable-uid", **_image(8, 8))
    body = _body(ds)
    tag = struct.pack("<HH", 0x0008, 0x0016) + b"UI"
    assert body.count(tag) == 1
    body = body.replace(tag, tag[:4] + b"TI")
    return _prefix(ds, ExplicitVRLittleEndian) + body + _native_pixels_header(128) + bytes(128)


DEPTH = 10_000
_SQ_UNDEFINED = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)  # ContentSequence
_ITEM_UNDEFINED = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_LEAF = struct.pack("<HH2sH", 0x0040, 0xA040, b"CS", 4) + b"TEXT"  # ValueType


def _deep(name: str, defined: bool) -> bytes:
    ds = _dataset(name, "1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    ds.Modality = "SR"
    if defined:  # each level: SQ header (12) + item header (8) + what is inside
        levels = [
            struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 20 * (DEPTH - i) - 12 + len(_LEAF))
            + struct.pack("<HHI", 0xFFFE, 0xE000, 20 * (DEPTH - i) - 20 + len(_LEAF))
            for i in range(DEPTH)
        ]
        nested = b"".join(levels) + _LEAF
    else:
        nested = (_SQ_UNDEFINED + _ITEM_UNDEFINED) * DEPTH + _LEAF
        nested += (_ITEM_END + _SEQUENCE_END) * DEPTH
    # (0040,A730) sorts after every element of the base data set
    return _prefix(ds, ExplicitVRLittleEndian) + _body(ds) + nested


CASES: tuple[Case, ...] = (
    Case("deflate-bomb", "inflated-too-large", "ingest.max_inflated_bytes", deflate_bomb),
    Case("deflate-truncated", "truncated", "deflate stream does not end", deflate_truncated),
    Case("declared-huge-frame", "decoded-too-large", "ingest.max_frame_bytes", declared_huge_frame),
    Case(
        "declared-huge-frames",
        "decoded-too-large",
        "ingest.max_decoded_bytes",
        declared_huge_frames,
    ),
    Case(
        "native-length-mismatch",
        "inconsistent-pixel-data",
        "PixelData holds 1000 bytes",
        native_length_mismatch,
    ),
    Case(
        "fragments-short-of-frames",
        "inconsistent-pixel-data",
        "3 fragment(s) for 10 frame(s)",
        fragments_short_of_frames,
    ),
    Case(
        "offset-table-mismatch",
        "inconsistent-pixel-data",
        "Basic Offset Table has 2 entries for 3 frame(s)",
        offset_table_mismatch,
    ),
    Case("missing-rows", "inconsistent-pixel-data", "no Rows", missing_rows),
    Case("unreadable-uid", "malformed", "SOPClassUID cannot be read", unreadable_uid),
    Case(
        "deep-nesting-undefined",
        "too-deep",
        "ingest.max_sequence_depth",
        lambda: _deep("deep-nesting-undefined", defined=False),
    ),
    Case(
        "deep-nesting-defined",
        "too-deep",
        "ingest.max_sequence_depth",
        lambda: _deep("deep-nesting-defined", defined=True),
    ),
)
BY_NAME = {case.name: case for case in CASES}


# -- valid objects: the controls beside the cases, and the fuzzers' seeds --------------------


def _written(ds: Dataset, syntax: str) -> bytes:
    """``ds`` as pydicom writes it in ``syntax`` (pydicom deflates, encodes
    big endian and implicit VR itself)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    fp = DicomBytesIO()
    ds.save_as(
        fp,
        enforce_file_format=True,
        little_endian=syntax != ExplicitVRBigEndian,
        implicit_vr=syntax == ImplicitVRLittleEndian,
    )
    return fp.getvalue()


def _code(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", value
    return item


def nested_sr(name: str, depth: int) -> Dataset:
    """A Basic Text SR whose content tree nests ``depth`` sequences deep."""
    ds = _dataset(name, "1.2.840.10008.5.1.4.1.1.88.11")
    ds.Modality = "SR"
    inner = Dataset()
    inner.ValueType, inner.TextValue = "TEXT", "leaf"
    for _ in range(depth - 1):
        outer = Dataset()
        outer.ValueType = "CONTAINER"
        outer.ContentSequence = [inner]
        inner = outer
    ds.ContentSequence = [inner]
    return ds


def valid_objects() -> dict[str, bytes]:
    """Small valid objects of each framing ingest handles: native in the three
    uncompressed syntaxes, deflated, RLE multi-frame with a Basic Offset
    Table, native pixel data padded by less than a frame, and sequences
    nested exactly as deep as the default limit allows.  Every one is
    accepted; the fuzzers mutate them."""
    pixels = bytes(range(256)) * 32  # 64 x 64 x 16 bits
    out = {}
    for label, syntax in (
        ("explicit", ExplicitVRLittleEndian),
        ("implicit", ImplicitVRLittleEndian),
        ("big-endian", ExplicitVRBigEndian),
        ("deflated", DeflatedExplicitVRLittleEndian),
    ):
        ds = _dataset(f"valid-{label}", **_image(64, 64))
        ds.AnatomicRegionSequence = [_code("T-D3000")]
        ds.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [_code("G-A101")]
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        out[label] = _written(ds, syntax)
    ds = _dataset("valid-rle", SecondaryCaptureImageStorage, **_image(64, 64, 16, 3))
    fragment = _rle_fragment()
    out["rle-frames"] = (
        _prefix(ds, RLELossless)
        + _body(ds)
        + _encapsulated([fragment] * 3, table=[0, 8 + len(fragment), 16 + 2 * len(fragment)])
    )
    ds = _dataset("valid-padded", **_image(64, 64))
    out["padded"] = (
        _prefix(ds, ExplicitVRLittleEndian)
        + _body(ds)
        + _native_pixels_header(len(pixels) + 128)
        + pixels
        + bytes(128)
    )
    out["nested-32"] = _written(nested_sr("valid-nested", 32), ExplicitVRLittleEndian)
    return out


@cache
def _built(name: str) -> bytes:
    return BY_NAME[name].build()


def write_corpus(folder: Path) -> dict[str, Path]:
    """Every case as ``<name>.dcm`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in CASES:
        paths[case.name] = folder / f"{case.name}.dcm"
        paths[case.name].write_bytes(case.data())
    return paths


if __name__ == "__main__":
    for name, path in write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "hostile")).items():
        print(f"{path}  {path.stat().st_size} bytes  ({BY_NAME[name].code})")
