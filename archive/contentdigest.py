"""A digest of what a data set says, not of how its bytes were laid out.

The same instance reaches the archive re-encoded by whoever relayed it: dcmtk's
storescu drops the Dataset Trailing Padding (FFFC,FFFC), writes undefined-length
sequences and items with explicit lengths, recomputes group lengths, sends an
Implicit VR file as Explicit VR (whatever the receiver accepted), inflates a
deflated one.  The bytes after the file meta then differ although every
attribute has the same value, and an administrator who sends a folder by
storescu and then runs ``imag import`` on it expects "already stored", not a
conflict per file.

:func:`content_digest` hashes the data set element by element: each element's
tag and value bytes, sequences by their items' content (never by their length
encoding), group lengths and trailing padding left out, Implicit / Explicit /
Deflated VR Little Endian read alike (their values are the same bytes), an
encapsulated Pixel Data by its fragments.  Anything else is kept as sent: a
different value, another byte order or another pixel encoding (a lossless
re-compression is other pixel bytes) is another digest, so still a conflict.

The parse streams (values are hashed a bounded chunk at a time) and never
decodes pixel data.  A data set it cannot walk gives None: the caller then
falls back on comparing bytes.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

__all__ = ["content_digest"]

#: versions the canonical form: a digest made by another form never matches
_DOMAIN = b"imag-content-v1\x00"
#: explicit VRs with a 2-byte reserved field and a 4-byte length
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PADDING = 0xFFFCFFFC
_PIXEL_DATA = 0x7FE00010
_CHUNK = 1 << 20
#: nesting beyond this is not walked (the ingest limits refuse it before)
_MAX_DEPTH = 64


class _Unwalkable(Exception):
    """The data set does not parse as its transfer syntax says."""


class _Reader:
    """Exact reads from a stream, counting the bytes consumed."""

    def __init__(self, fp: BinaryIO) -> None:
        self.fp = fp
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self.fp.read(n)
        if len(data) != n:
            raise _Unwalkable("truncated")
        self.pos += n
        return data

    def read_or_end(self, n: int) -> bytes | None:
        """The next ``n`` bytes, or None at the end of the stream."""
        data = self.fp.read(n)
        if not data:
            return None
        if len(data) != n:
            raise _Unwalkable("truncated")
        self.pos += n
        return data

    def hash_value(self, n: int, into: hashlib._Hash | None) -> None:
        """Feed the next ``n`` bytes to ``into`` (or skip them when None)."""
        while n:
            chunk = self.read(min(n, _CHUNK))
            if into is not None:
                into.update(chunk)
            n -= len(chunk)


class _Inflating:
    """The raw-deflate stream of a Deflated Explicit VR Little Endian data set, inflated."""

    def __init__(self, fp: BinaryIO) -> None:
        self.fp = fp
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.buffer = b""

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            raw = self.fp.read(_CHUNK)
            if not raw:
                self.buffer += self.inflater.flush()
                break
            self.buffer += self.inflater.decompress(raw)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


def content_digest(fp: BinaryIO, start: int, transfer_syntax: str) -> bytes | None:
    """The content digest of the data set that starts at byte ``start`` of
    ``fp``, encoded in ``transfer_syntax``; None when it cannot be walked."""
    fp.seek(start)
    stream: BinaryIO = _Inflating(fp) if transfer_syntax == DeflatedExplicitVRLittleEndian else fp
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    digest = hashlib.sha256(_DOMAIN + (b"<" if little else b">"))
    try:
        _walk(_Reader(stream), digest, implicit, "<" if little else ">", None, 0)
    except (_Unwalkable, struct.error, zlib.error, OSError):
        return None
    return digest.digest()


def _walk(
    reader: _Reader,
    digest: hashlib._Hash,
    implicit: bool,
    order: str,
    length: int | None,
    depth: int,
) -> None:
    """Hash the elements of one data set (or item): ``length`` bytes of them,
    up to an item delimiter when None inside an item, to the end at the top
    level (depth 0)."""
    if depth > _MAX_DEPTH:
        raise _Unwalkable("nested too deep")
    end = None if length is None else reader.pos + length
    while True:
        if end is not None and reader.pos >= end:
            return
        head = reader.read_or_end(4) if end is None and depth == 0 else reader.read(4)
        if head is None:
            return
        group, element = struct.unpack(order + "HH", head)
        tag = group << 16 | element
        if tag == _ITEM_END:  # the end of an undefined-length item
            reader.read(4)
            return
        if implicit:
            (size,) = struct.unpack(order + "L", reader.read(4))
            vr = b"SQ" if size == _UNDEFINED else _dictionary_vr(tag)
        else:
            vr = reader.read(2)
            if vr in _LONG_VRS:
                reader.read(2)
                (size,) = struct.unpack(order + "L", reader.read(4))
            else:
                (size,) = struct.unpack(order + "H", reader.read(2))
        skip = element == 0 or tag == _PADDING  # group lengths, trailing padding
        if tag == _PIXEL_DATA and size == _UNDEFINED:
            digest.update(struct.pack("<LB", tag, 1))
            _fragments(reader, digest, order)
        elif vr == b"SQ" or (vr == b"UN" and size == _UNDEFINED):
            # an undefined-length UN is a sequence in Implicit VR Little Endian
            inner_implicit = implicit or vr == b"UN"
            digest.update(struct.pack("<LB", tag, 2))
            _items(reader, digest, inner_implicit, order, size, depth)
            digest.update(b"\x03")
        else:
            if size == _UNDEFINED:
                raise _Unwalkable(f"undefined length for ({group:04X},{element:04X})")
            if not skip:
                digest.update(struct.pack("<LBQ", tag, 0, size))
            reader.hash_value(size, None if skip else digest)


def _items(
    reader: _Reader,
    digest: hashlib._Hash,
    implicit: bool,
    order: str,
    size: int,
    depth: int,
) -> None:
    """Hash the items of a sequence of ``size`` bytes (undefined: up to its delimiter)."""
    end = None if size == _UNDEFINED else reader.pos + size
    while end is None or reader.pos < end:
        group, element = struct.unpack(order + "HH", reader.read(4))
        (item_size,) = struct.unpack(order + "L", reader.read(4))
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise _Unwalkable(f"({group:04X},{element:04X}) in a sequence")
        digest.update(b"\x04")
        _walk(
            reader,
            digest,
            implicit,
            order,
            None if item_size == _UNDEFINED else item_size,
            depth + 1,
        )
        digest.update(b"\x05")


def _fragments(reader: _Reader, digest: hashlib._Hash, order: str) -> None:
    """Hash the items of an encapsulated Pixel Data, each by its length and bytes."""
    while True:
        group, element = struct.unpack(order + "HH", reader.read(4))
        (size,) = struct.unpack(order + "L", reader.read(4))
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM or size == _UNDEFINED:
            raise _Unwalkable("bad encapsulated pixel data")
        digest.update(struct.pack("<Q", size))
        reader.hash_value(size, digest)


def _dictionary_vr(tag: int) -> bytes:
    """The VR an Implicit VR element has by the data dictionary (private or
    unknown elements: UN, their bytes hashed as they are)."""
    try:
        return dictionary_VR(tag).split(" or ")[0].encode("ascii")
    except KeyError:
        return b"UN"
