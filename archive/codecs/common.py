"""Dataset plumbing every conversion step shares: Part 10 bytes in and out,
the Image Pixel module facts, and the pixel data attributes that belong to
encapsulated data only."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from archive.codecs.errors import TranscodeError

EXTENDED_OFFSETS = ("ExtendedOffsetTable", "ExtendedOffsetTableLengths")
_ENCAPSULATED_TOTAL_LENGTH = 0x7FE00003  # Encapsulated Pixel Data Value Total Length

#: the Image Pixel attributes an encoder needs, copied to its scratch dataset
IMAGE_PIXEL = (
    "SamplesPerPixel",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def read_part10(data: bytes) -> Dataset:
    """``data`` parsed; any parse failure becomes a :class:`TranscodeError`."""
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types for malformed input
        raise TranscodeError(f"not a readable DICOM Part 10 object: {exc}") from exc


def write_part10(ds: Dataset, target: UID) -> bytes:
    """``ds`` written as Part 10 bytes in ``target`` (little endian)."""
    ds.file_meta.TransferSyntaxUID = target
    buffer = io.BytesIO()
    ds.save_as(
        buffer, implicit_vr=target.is_implicit_VR, little_endian=True, enforce_file_format=True
    )
    return buffer.getvalue()


def frame_count(ds: Dataset) -> int:
    """*Number of Frames*, 1 when absent or empty."""
    value = ds.get("NumberOfFrames")
    try:
        return max(int(value), 1) if value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise TranscodeError(f"invalid Number of Frames {value!r}") from exc


def image_pixel(ds: Dataset) -> tuple[int, int, int, int, int, int]:
    """rows, columns, samples, bits allocated, bits stored, pixel representation."""
    try:
        return (
            int(ds.Rows),
            int(ds.Columns),
            int(ds.get("SamplesPerPixel") or 1),
            int(ds.BitsAllocated),
            int(ds.get("BitsStored") or ds.BitsAllocated),
            int(ds.get("PixelRepresentation") or 0),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise TranscodeError(f"incomplete Image Pixel module: {exc}") from exc


def container_dtype(bits_allocated: int, signed: int) -> np.dtype:
    """The numpy dtype pixel values are held in (what pydicom returns)."""
    if bits_allocated not in (8, 16, 32, 64):
        raise TranscodeError(f"cannot handle Bits Allocated {bits_allocated} here")
    return np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")


def drop_encapsulation_attributes(ds: Dataset) -> None:
    """Remove the attributes that only make sense next to encapsulated (or
    differently encapsulated) pixel data."""
    for keyword in EXTENDED_OFFSETS:
        if keyword in ds:
            delattr(ds, keyword)
    if _ENCAPSULATED_TOTAL_LENGTH in ds:
        del ds[_ENCAPSULATED_TOTAL_LENGTH]
