"""Transfer syntax conversion for retrieval.

Today: anything pydicom can decode → Explicit VR Little Endian, and the
uncompressed syntaxes among themselves.  Lossless re-encoding into compressed
syntaxes (HTJ2K, JPEG 2000, JPEG-LS, RLE) per producer policy is the
transcoding issue's work and will extend this module.
"""

from __future__ import annotations

import io

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from archive.retrieve import convert_for

#: syntaxes we can produce from any stored instance whose pixel data decodes
PRODUCIBLE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})


def producible(stored: str) -> set[str]:
    """Transfer syntaxes an instance stored in ``stored`` can be sent in."""
    return set(PRODUCIBLE) | {stored}


def encode_as(data: bytes, target: str) -> bytes:
    """The Part 10 object ``data`` re-encoded in ``target`` (returned as is
    when already there).  Raises ValueError when it cannot be done."""
    ds = pydicom.dcmread(io.BytesIO(data))
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if stored == target:
        return data
    if UID(target) not in PRODUCIBLE:
        raise ValueError(f"cannot convert {stored.name} to {UID(target).name}")
    ds = convert_for(ds, {ExplicitVRLittleEndian})
    ds.file_meta.TransferSyntaxUID = UID(target)
    buffer = io.BytesIO()
    ds.save_as(
        buffer, implicit_vr=UID(target).is_implicit_VR, little_endian=True, enforce_file_format=True
    )
    return buffer.getvalue()
