"""Checks, at ingest, of what every later read of an object needs, and the
limits that keep one object from exhausting the server.

An object that passes the header parse is read again and again: WADO-RS
metadata walks its sequences, frames and renderings decode its pixel data,
C-GET / C-MOVE may convert it, and every reader of a deflated object inflates
it whole.  What would fail (or exhaust memory) on every one of those reads is
refused once, here, with a reason naming the limit and its setting:

* :func:`inflate`: a Deflated Explicit VR Little Endian data set is inflated
  here (never by pydicom, which inflates whole into memory) and refused once
  its inflated size passes ``ingest.max_inflated_bytes``;
* :func:`check_nesting`: sequences nested deeper than
  ``ingest.max_sequence_depth``, found by an iterative walk of the bytes
  *before* pydicom parses them (pydicom recurses once per level and fails
  near 200 levels; a hostile object nests thousands);
* :func:`check_pixel_data`: the declared decoded size against
  ``ingest.max_frame_bytes`` / ``ingest.max_decoded_bytes`` before anything
  decodes, native pixel data of exactly the length the image attributes
  declare, encapsulated pixel data with a fragment for every frame and a
  Basic / Extended Offset Table that points at fragments.

Every check reads through a :class:`Source` (bytes in memory or a file read
by windows) and never loads pixel data, so it works on the streamed path of
objects of several GB as on small objects.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any, BinaryIO

from pydicom.datadict import _dictionary_vr_fast
from pydicom.dataset import Dataset
from pydicom.filereader import ENCODED_VR
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from archive.config import SETTINGS
from archive.rejected import Rejected

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: Pixel Data, Float Pixel Data, Double Float Pixel Data
PIXEL_TAGS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(ENCODED_VR - _LONG_VRS)
_PLAIN_LONG_VRS = _LONG_VRS - {b"SQ", b"UN"}  # never read as a sequence
_INFLATE_CHUNK = 1 << 20
#: bytes allowed after the end of a deflate stream: a byte of padding to even
#: length, or the 8-byte trailer (CRC-32, size) of a gzip tool, as found in
#: real files; pydicom and zlib readers ignore them
_DEFLATE_TRAILER = 8


def _default(path: str) -> Any:
    return next(s.default for s in SETTINGS if s.path == path)


@dataclass(frozen=True)
class Limits:
    """The ingest limits of :mod:`archive.validate`; defaults are those of the
    settings table (``imag config show``)."""

    max_inflated_bytes: int = _default("ingest.max_inflated_bytes")
    max_frame_bytes: int = _default("ingest.max_frame_bytes")
    max_decoded_bytes: int = _default("ingest.max_decoded_bytes")
    max_sequence_depth: int = _default("ingest.max_sequence_depth")

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        """The limits of a :class:`~archive.config.Config` (``ingest.<name>``)."""
        return cls(**{f.name: config[f"ingest.{f.name}"] for f in fields(cls)})


# --------------------------------------------------------------------------- reading


class Source:
    """Random access to an object's bytes: a bytes object, or a file read
    through a window (element headers are read; values are skipped unread)."""

    WINDOW = 1 << 16

    def __init__(self, data: bytes | None = None, fp: BinaryIO | None = None, size: int = 0):
        self._fp = fp
        self.size = len(data) if data is not None else size
        self._base = 0
        self._window = data if data is not None else b""
        self._whole = data is not None

    def window(self, at: int, count: int) -> tuple[bytes, int]:
        """A buffer holding the bytes from ``at`` (``count`` of them unless the
        object ends first) and the offset of its first byte in the object."""
        offset = at - self._base
        if self._whole or (offset >= 0 and offset + count <= len(self._window)):
            return self._window, self._base
        assert self._fp is not None
        self._fp.seek(at)
        self._window = self._fp.read(max(count, self.WINDOW))
        self._base = at
        return self._window, at

    def read(self, at: int, count: int) -> bytes:
        """Up to ``count`` bytes at ``at`` (fewer at the end of the object)."""
        buffer, base = self.window(at, count)
        return buffer[at - base : at - base + count]

    def find(self, pattern: bytes, start: int, end: int) -> int:
        """Offset of ``pattern`` in [start, end), or -1."""
        if self._whole:
            return self._window.find(pattern, start, end)
        at = start
        while at < end:
            chunk = self.read(at, min(_INFLATE_CHUNK, end - at))
            if not chunk:
                return -1
            found = chunk.find(pattern)
            if found >= 0:
                return at + found
            if at + len(chunk) >= end:
                return -1
            at += len(chunk) - len(pattern) + 1
        return -1

    def exact(self, at: int, count: int) -> bytes:
        """Exactly ``count`` bytes at ``at``, or Rejected (truncated)."""
        chunk = self.read(at, count)
        if len(chunk) < count:
            raise Rejected("truncated", f"the object is truncated at byte {at} of {self.size}")
        return chunk


# --------------------------------------------------------------------------- deflate


def inflate(chunks: Iterable[bytes], limit: int) -> bytes:
    """The data set of a Deflated Explicit VR Little Endian object (raw deflate,
    PS3.5 A.5), inflated a chunk at a time and refused past ``limit`` bytes.

    ``chunks`` is consumed twice over (pass a re-iterable, e.g. a list of
    memoryviews or a :class:`FileChunks`): the first pass only counts, so a
    bomb costs one output chunk of memory however far it would inflate; the
    second keeps the bytes of an object known to fit.
    """
    size = _inflated_size(chunks, limit)
    out: list[bytes] = []
    total = 0
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    for chunk in chunks:
        pending = chunk
        while not inflater.eof and total <= size:  # as _inflated_size: the same output
            out.append(inflater.decompress(pending, _INFLATE_CHUNK))
            total += len(out[-1])
            pending = inflater.unconsumed_tail
            if not pending and len(out[-1]) < _INFLATE_CHUNK:
                break
        if inflater.eof or total > size:
            break
    if total != size:  # the input changed between the passes: still bounded
        raise Rejected("malformed", "the deflated data set changed while it was read")
    return b"".join(out)


def _inflated_size(chunks: Iterable[bytes], limit: int) -> int:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    trailing = 0
    try:
        for chunk in chunks:
            if inflater.eof:
                trailing += len(chunk)
                continue
            pending = chunk
            while True:
                out = inflater.decompress(pending, _INFLATE_CHUNK)
                total += len(out)
                if total > limit:
                    raise Rejected(
                        "inflated-too-large",
                        f"the data set inflates past ingest.max_inflated_bytes ({limit} bytes); "
                        "send it uncompressed (Explicit VR Little Endian) or with compressed "
                        "pixel data",
                    )
                pending = inflater.unconsumed_tail
                if inflater.eof or (not pending and len(out) < _INFLATE_CHUNK):
                    break
            if inflater.eof:
                trailing += len(inflater.unused_data)
    except zlib.error as exc:
        raise Rejected("malformed", f"the deflated data set does not inflate: {exc}") from None
    if not inflater.eof:
        raise Rejected(
            "truncated", "the deflated data set is truncated: its deflate stream does not end"
        )
    if trailing > _DEFLATE_TRAILER:
        raise Rejected(
            "malformed", f"{trailing} bytes follow the end of the deflated data set's stream"
        )
    return total


class FileChunks:
    """The bytes of a file from ``start`` on, as a re-iterable of chunks."""

    def __init__(self, fp: BinaryIO, start: int) -> None:
        self.fp = fp
        self.start = start

    def __iter__(self) -> Iterator[bytes]:
        self.fp.seek(self.start)
        while chunk := self.fp.read(_INFLATE_CHUNK):
            yield chunk


def memory_chunks(data: bytes, start: int) -> list[memoryview]:
    """The bytes of ``data`` from ``start`` on, as a re-iterable of chunks."""
    view = memoryview(data)
    return [view[at : at + _INFLATE_CHUNK] for at in range(start, len(data), _INFLATE_CHUNK)]


# --------------------------------------------------------------------------- nesting

_DATASET, _SEQUENCE = 0, 1


def check_nesting(
    src: Source,
    start: int,
    end: int,
    *,
    little: bool,
    implicit: bool,
    max_depth: int,
    stop_at_pixels: bool = False,
) -> int:
    """Refuse sequences nested deeper than ``max_depth``; return where the
    top-level walk ended (the pixel data element with ``stop_at_pixels``).

    The walk is iterative and follows pydicom's reading rules (sequences are
    SQ, undefined-length UN, implicit elements the dictionary calls SQ or
    whose value starts with an item; any tag in a sequence is an item;
    defined-length sequences are read as their own stream) so that whatever
    nesting pydicom would build is counted.  Where a private or UN element
    *might* be a sequence it is counted as one (erring on refusal only for
    deeper-than-limit nesting).  It refuses nothing else: structural damage
    is left to the parse and completeness checks.
    """
    order = "<" if little else ">"
    tag_length = struct.Struct(order + "HHI")
    explicit = struct.Struct(order + "HH2sH")
    u32 = struct.Struct(order + "I")
    item_tag = struct.pack(order + "HH", 0xFFFE, 0xE000)
    sequence_end_tag = struct.pack(order + "HH", 0xFFFE, 0xE0DD)
    read, window = src.read, src.window
    buffer, base = window(start, 12)
    pos = start
    # frames: (kind, end of a defined length or None, end of the stream it reads)
    stack: list[tuple[int, int | None, int]] = [(_DATASET, end, end)]
    depth = 0

    def unwind_to_stream_owner() -> int | None:
        """End of the stream: resume after the defined-length sequence that
        owns it, or None at the end of the top-level stream."""
        nonlocal depth
        while len(stack) > 1:
            kind, defined_end, _ = stack.pop()
            if kind == _SEQUENCE:
                depth -= 1
                if defined_end is not None:
                    return defined_end
        return None

    while True:
        kind, defined_end, stream_end = stack[-1]
        if kind == _DATASET and not implicit:
            # the common case, in a tight loop: explicit VR elements that cannot be
            # sequences (anything else goes through the general steps below)
            limit = stream_end if defined_end is None else min(defined_end, stream_end)
            top = stop_at_pixels and len(stack) == 1
            while pos + 12 <= limit:
                offset = pos - base
                if offset < 0 or offset + 12 > len(buffer):
                    buffer, base = window(pos, 12)
                    offset = pos - base
                    if offset + 12 > len(buffer):
                        break
                group, element, vr_bytes, short_length = explicit.unpack_from(buffer, offset)
                if vr_bytes in _SHORT_VRS:
                    pos += 8 + short_length
                elif vr_bytes in _PLAIN_LONG_VRS:
                    (length,) = u32.unpack_from(buffer, offset + 8)
                    if length == UNDEFINED_LENGTH or (top and group == 0x7FE0):
                        break
                    pos += 12 + length
                else:
                    break
        if defined_end is not None and pos >= defined_end:
            stack.pop()
            if not stack:
                return pos
            if kind == _SEQUENCE:
                depth -= 1
                pos = defined_end  # its own stream: the parent resumes after its value
            continue
        offset = pos - base
        if offset < 0 or offset + 12 > len(buffer):
            buffer, base = window(pos, 12)
            offset = pos - base
        if pos + 8 > stream_end or offset + 8 > len(buffer):
            resume = unwind_to_stream_owner()
            if resume is None:
                return pos
            pos = resume
            continue
        group, element, length = tag_length.unpack_from(buffer, offset)
        tag = group << 16 | element
        if kind == _SEQUENCE:
            pos += 8
            if tag == SEQUENCE_END:
                stack.pop()
                depth -= 1
                if defined_end is not None:
                    pos = defined_end
                continue
            # pydicom takes any other tag for an item
            stack.append(
                (_DATASET, None if length == UNDEFINED_LENGTH else pos + length, stream_end)
            )
            continue
        if tag == ITEM_END:  # ends the data set being read, wherever it is
            pos += 8
            stack.pop()
            if not stack:
                return pos
            continue
        if stop_at_pixels and len(stack) == 1 and tag in PIXEL_TAGS:
            return pos
        vr: bytes | None = None
        value_at = pos + 8
        if not implicit:
            _, _, vr_bytes, short_length = explicit.unpack_from(buffer, offset)
            if vr_bytes in ENCODED_VR:
                vr = vr_bytes
                if vr in _LONG_VRS:
                    if pos + 12 > stream_end or offset + 12 > len(buffer):
                        resume = unwind_to_stream_owner()
                        if resume is None:
                            return pos
                        pos = resume
                        continue
                    (length,) = u32.unpack_from(buffer, offset + 8)
                    value_at = pos + 12
                else:
                    length = short_length
            elif b"AA" <= vr_bytes <= b"ZZ":  # an unknown VR: pydicom reads a 2-byte length
                vr, length = vr_bytes, short_length
            # else: implicit VR inside an explicit data set, as pydicom assumes
        if length == UNDEFINED_LENGTH:
            if vr in (b"SQ", b"UN"):
                is_sequence = True
            elif vr is None:
                try:
                    is_sequence = _dictionary_vr_fast(tag) == "SQ"
                except KeyError:
                    is_sequence = read(value_at, 4) == item_tag
            else:
                is_sequence = False
            if not is_sequence:  # read up to the sequence delimiter
                found = src.find(sequence_end_tag, value_at, stream_end)
                pos = stream_end if found < 0 else found + 8
                continue
            depth += 1
            _refuse_depth(depth, max_depth, tag)
            stack.append((_SEQUENCE, None, stream_end))
            pos = value_at
            continue
        value_end = value_at + length
        if _may_be_sequence(vr, tag, length, read, value_at, item_tag):
            depth += 1
            _refuse_depth(depth, max_depth, tag)
            stack.append((_SEQUENCE, value_end, min(value_end, stream_end)))
            pos = value_at
            continue
        pos = value_end


def _may_be_sequence(
    vr: bytes | None, tag: int, length: int, read: Any, value_at: int, item_tag: bytes
) -> bool:
    """Whether pydicom may read this defined-length value as a sequence."""
    if vr == b"SQ":
        return True
    if (vr is not None and vr != b"UN") or length < 8 or tag >> 16 == 0x7FE0:
        return False
    if (tag >> 16) % 2:  # private: pydicom's private dictionary may call it SQ
        return True
    try:
        if _dictionary_vr_fast(tag) == "SQ":
            return True
    except KeyError:
        pass
    return read(value_at, 4) == item_tag


def _refuse_depth(depth: int, max_depth: int, tag: int) -> None:
    if depth > max_depth:
        raise Rejected(
            "too-deep",
            f"sequences nest past ingest.max_sequence_depth ({max_depth} levels) at "
            f"({tag >> 16:04X},{tag & 0xFFFF:04X})",
        )


# --------------------------------------------------------------------------- pixel data


@dataclass(frozen=True)
class Image:
    """What the Image Pixel module declares about the pixel data."""

    keyword: str
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int
    photometric: str

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame (decoders give 1-bit data a byte per pixel)."""
        return self.rows * self.columns * self.samples * max(self.bits_allocated, 8) // 8

    @property
    def decoded_bytes(self) -> int:
        return self.frame_bytes * self.frames

    @property
    def native_bytes(self) -> int:
        """Length of the native pixel data (without padding): frames are
        contiguous bits; uncompressed YBR_FULL_422 holds 2 samples per pixel
        on average (PS3.3 C.7.6.3.1.2).

        The value may be longer by less than one frame (at least the byte
        that pads it to even length, PS3.5 7.1.1): some modalities pad pixel
        data to a block size and every reader ignores the excess (pydicom
        trims it).  Shorter fails every read; a frame or more too long means
        the frame count or the image size is wrong."""
        return math.ceil(self._native_frame_bits * self.frames / 8)

    @property
    def native_frame_bytes(self) -> int:
        return math.ceil(self._native_frame_bits / 8)

    @property
    def _native_frame_bits(self) -> int:
        samples = 2 if self.samples == 3 and self.photometric == "YBR_FULL_422" else self.samples
        return self.rows * self.columns * samples * self.bits_allocated


def _inconsistent(reason: str) -> Rejected:
    return Rejected("inconsistent-pixel-data", reason)


def image_of(ds: Dataset, keyword: str) -> Image:
    """The image attributes of ``ds``, refused when missing, zero or not numbers
    (every reader of the pixel data needs them)."""

    def number(name: str, default: int | None = None) -> int:
        try:
            value = ds.get(name)
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert
            value = "?"
        if value is None or value == "":
            if default is not None:
                return default
            raise _inconsistent(f"the image has {keyword} but no {name}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _inconsistent(f"{name} {str(value)[:40]!r} is not a number") from None

    rows, columns = number("Rows"), number("Columns")
    if keyword == "PixelData":
        bits = number("BitsAllocated")
    else:  # Float / Double Float Pixel Data: 32 / 64 bits whatever Bits Allocated says
        bits = 32 if keyword == "FloatPixelData" else 64
    samples = number("SamplesPerPixel", 1)
    frames = number("NumberOfFrames", 1)
    for name, value in (("Rows", rows), ("Columns", columns), ("SamplesPerPixel", samples)):
        if value < 1:
            raise _inconsistent(f"{name} is {value}: an image with {keyword} needs at least 1")
    if bits != 1 and (bits < 8 or bits % 8):
        raise _inconsistent(f"BitsAllocated is {bits}: it must be 1 or a multiple of 8")
    try:
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert
        raise _inconsistent("PhotometricInterpretation cannot be read") from None
    # readers count Number of Frames below 1 as one frame (pixels.frame_count)
    return Image(keyword, rows, columns, samples, bits, max(frames, 1), photometric)


def check_decoded_size(image: Image, limits: Limits) -> None:
    """Refuse an image whose declared decoded size passes the limits, before
    anything decodes it."""
    if image.frame_bytes > limits.max_frame_bytes:
        raise Rejected(
            "decoded-too-large",
            f"a frame decodes past ingest.max_frame_bytes ({limits.max_frame_bytes} bytes): "
            f"{image.rows} x {image.columns} x {image.samples} samples x "
            f"{image.bits_allocated} bits = {image.frame_bytes} bytes",
        )
    if image.decoded_bytes > limits.max_decoded_bytes:
        raise Rejected(
            "decoded-too-large",
            f"the frames decode past ingest.max_decoded_bytes ({limits.max_decoded_bytes} "
            f"bytes): {image.frames} frames of {image.frame_bytes} bytes = "
            f"{image.decoded_bytes} bytes",
        )


@dataclass(frozen=True)
class PixelElement:
    """Where the pixel data element's value is."""

    tag: int
    value_at: int
    length: int  # UNDEFINED_LENGTH: encapsulated


def pixel_element_at(src: Source, pos: int, little: bool) -> PixelElement:
    """The pixel data element whose header starts at ``pos``."""
    order = "<" if little else ">"
    head = src.exact(pos, 8)
    group, element = struct.unpack(order + "HH", head[:4])
    # Some producers label explicit VR but write implicit (pydicom adapts too):
    # trust the bytes, a VR is two letters.
    if head[4:6].isalpha():
        (length,) = struct.unpack(order + "I", src.exact(pos + 8, 4))
        return PixelElement(group << 16 | element, pos + 12, length)
    (length,) = struct.unpack(order + "I", head[4:8])
    return PixelElement(group << 16 | element, pos + 8, length)


def check_pixel_data(
    ds: Dataset,
    src: Source,
    element: PixelElement,
    *,
    encapsulated: bool | None,
    little: bool,
    limits: Limits,
) -> tuple[Image, int]:
    """Check the pixel data element against the image attributes; return the
    image and where the element ends (after the sequence delimiter when
    encapsulated).  ``encapsulated`` None: a transfer syntax pydicom does not
    know, judged by the element's length."""
    keyword = PIXEL_TAGS.get(element.tag, "PixelData")
    image = image_of(ds, keyword)
    check_decoded_size(image, limits)
    undefined = element.length == UNDEFINED_LENGTH
    if encapsulated is None:
        encapsulated = undefined
    if keyword != "PixelData" and encapsulated:
        raise _inconsistent(f"{keyword} is never encapsulated; the transfer syntax is compressed")
    if not encapsulated:
        if undefined:
            raise _inconsistent(
                "the transfer syntax is uncompressed but the pixel data is encapsulated "
                "(undefined length)"
            )
        expected = image.native_bytes
        if not expected <= element.length < expected + max(image.native_frame_bytes, 2):
            raise _inconsistent(
                f"{keyword} holds {element.length} bytes; {image.rows} x {image.columns} x "
                f"{image.samples} samples x {image.bits_allocated} bits x {image.frames} "
                f"frame(s) need {expected}"
            )
        return image, element.value_at + element.length
    if not undefined:
        raise _inconsistent(
            "the transfer syntax is compressed but the pixel data is not encapsulated "
            f"(a defined length of {element.length} bytes)"
        )
    end = _check_fragments(ds, src, element.value_at, image.frames, little)
    return image, end


def _offsets(value: bytes, width: int, little: bool) -> list[int]:
    order = "<" if little else ">"
    code = "I" if width == 4 else "Q"
    return list(struct.unpack(f"{order}{len(value) // width}{code}", value))


def _check_fragments(ds: Dataset, src: Source, at: int, frames: int, little: bool) -> int:
    """Walk the Basic Offset Table and the fragments from ``at``; check there
    are at least ``frames`` fragments and that a non-empty Basic (or an
    Extended) Offset Table has one entry per frame, increasing, each at the
    start of a fragment.  Returns the end of the element (after its
    sequence delimiter)."""
    order = "<" if little else ">"
    head = struct.Struct(order + "HHI")
    group, element, table_length = head.unpack(src.exact(at, 8))
    if (group, element) != (0xFFFE, 0xE000):
        raise _inconsistent(
            "encapsulated pixel data must start with the Basic Offset Table item, found "
            f"({group:04X},{element:04X})"
        )
    extended = _extended_table(ds, little)
    if table_length and extended is not None:
        raise _inconsistent("an Extended Offset Table requires an empty Basic Offset Table")
    if table_length and table_length != 4 * frames:
        raise _inconsistent(
            f"the Basic Offset Table has {table_length // 4} entries for {frames} frame(s)"
        )
    offsets: list[int] = []
    lengths: list[int] | None = None
    if table_length:
        offsets = _offsets(src.exact(at + 8, table_length), 4, little)
    elif extended is not None:
        offsets, lengths = extended
        if len(offsets) != frames or len(lengths) != frames:
            raise _inconsistent(
                f"the Extended Offset Table has {len(offsets)} offsets and {len(lengths)} "
                f"lengths for {frames} frame(s)"
            )
    if offsets and offsets[0] != 0:
        raise _inconsistent(f"the offset of the first frame is {offsets[0]}, not 0")
    if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise _inconsistent("the offsets of the frames do not increase")
    first = at + 8 + table_length
    pos, fragments, next_offset = first, 0, 0
    while True:
        if pos + 8 > src.size:
            raise Rejected(
                "truncated",
                "the object is truncated: its encapsulated pixel data ends at byte "
                f"{min(pos, src.size)} without a sequence delimiter",
            )
        group, element, length = head.unpack(src.read(pos, 8))
        if (group, element) == (0xFFFE, 0xE0DD):
            pos += 8
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise Rejected(
                "malformed",
                f"unexpected element ({group:04X},{element:04X}) inside encapsulated pixel data",
            )
        if length == UNDEFINED_LENGTH:
            raise _inconsistent(f"fragment {fragments + 1} has an undefined length")
        relative = pos - first
        if next_offset < len(offsets) and offsets[next_offset] < relative:
            raise _inconsistent(
                f"the offset of frame {next_offset + 1} ({offsets[next_offset]}) is not the "
                "start of a fragment"
            )
        if next_offset < len(offsets) and offsets[next_offset] == relative:
            if lengths is not None and lengths[next_offset] > length:
                raise _inconsistent(
                    f"frame {next_offset + 1} is {lengths[next_offset]} bytes long per the "
                    f"Extended Offset Table; its fragment holds {length}"
                )
            next_offset += 1
        fragments += 1
        pos += 8 + length
    if next_offset < len(offsets):
        raise _inconsistent(
            f"the offset of frame {next_offset + 1} ({offsets[next_offset]}) points past the "
            "last fragment"
        )
    if fragments < frames:
        raise _inconsistent(
            f"the encapsulated pixel data holds {fragments} fragment(s) for {frames} frame(s)"
        )
    return pos


def _extended_table(ds: Dataset, little: bool) -> tuple[list[int], list[int]] | None:
    if "ExtendedOffsetTable" not in ds:
        return None
    try:
        table = bytes(ds.ExtendedOffsetTable or b"")
        table_lengths = bytes(ds.get("ExtendedOffsetTableLengths") or b"")
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert
        raise _inconsistent("the Extended Offset Table cannot be read") from None
    if len(table) % 8 or len(table_lengths) % 8:
        raise _inconsistent("the Extended Offset Table's entries are 8 bytes each")
    return _offsets(table, 8, little), _offsets(table_lengths, 8, little)
