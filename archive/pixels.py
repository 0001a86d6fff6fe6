"""The pixel side of the one retrieval path: frames, decoded pixels, rendered images.

DICOMweb WADO-RS (``/frames/1,3,5``, ``/rendered``, ``/thumbnail``), WADO-URI
(``contentType=image/jpeg``) and the web viewer all go through these pure
functions over :class:`pydicom.dataset.Dataset` objects; nothing here knows
about HTTP, the index or the object store, so each caller maps the errors
below to its own status codes.

* :func:`frame_count`, :func:`iter_frames_raw`, :func:`get_frame_bytes`: the
  stored frames without decoding. Compressed frames are returned byte for byte
  as stored (a viewer that asked for the stored transfer syntax must receive
  exactly what the modality produced: re-encoding would be lossy or slow);
  native frames are cut out of *Pixel Data* and returned little endian.
* :func:`decoded_frame`: one frame as a numpy array (pydicom + plugins).
* :func:`render_image`, :func:`render`, :func:`thumbnail`: consumer images
  (JPEG, PNG, GIF) with the grayscale pipeline of PS3.4 / PS3.3 C.11
  (Modality LUT, VOI LUT or window, MONOCHROME1 / Presentation LUT inversion)
  and colour conversion to RGB.
* :func:`parse_window`, :func:`parse_viewport`: the WADO-RS ``window`` and
  ``viewport`` query parameters (PS3.18 8.3.5.1).

Each function takes a dataset, or an :class:`ImageFile`: a stored object's
header plus its seekable file, from which one frame at a time is read, so
serving frame 3 of a 2 GB multi-frame never loads the other frames.
``max_bytes`` bounds what decoding a frame may build in memory
(:class:`TooLarge`, checked from the header before anything is decoded).
Pixel data that does not match the image attributes is
:class:`InconsistentPixelData`: the stored object's fault, not the request's.

Frame numbers are 1-based everywhere, as in the WADO-RS URLs.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames, get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

__all__ = [
    "MEDIA_TYPES",
    "DecodeError",
    "FrameError",
    "ImageFile",
    "InconsistentPixelData",
    "RenderError",
    "TooLarge",
    "Viewport",
    "Window",
    "decoded_frame",
    "frame_count",
    "get_frame_bytes",
    "iter_frames_raw",
    "parse_viewport",
    "parse_window",
    "render",
    "render_image",
    "thumbnail",
]

#: Media types :func:`render` can produce, for content negotiation by callers.
MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif")

#: VOI LUT Functions (PS3.3 C.11.2.1.3) accepted by the window argument.
_WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class FrameError(ValueError):
    """A frame that does not exist (bad number) or cannot be cut out of the data.

    A ValueError so the HTTP layer can answer 400/404 without importing pydicom.
    """


class InconsistentPixelData(FrameError):
    """Pixel data that does not match the image attributes (shorter than
    Rows x Columns x Samples x Bits x Frames, fewer encapsulated frames than
    Number of Frames...): the stored object is at fault, whatever is asked."""


class TooLarge(ValueError):
    """Decoding would build more than the caller allows (``max_bytes``)."""

    def __init__(self, what: str, needed: int, limit: int) -> None:
        super().__init__(f"{what} needs {needed} bytes in memory, over the limit of {limit}")
        self.what, self.needed, self.limit = what, needed, limit


class RenderError(ValueError):
    """An unsupported media type, a malformed rendering parameter or an image
    this module cannot render (e.g. an unknown photometric interpretation)."""


class DecodeError(RuntimeError):
    """pydicom and its plugins could not decode the pixel data (missing codec,
    corrupt or truncated data). Not the client's fault: a server-side error."""


class Window(NamedTuple):
    """A VOI window: *center*, *width* and the VOI LUT Function (upper case,
    ``LINEAR`` / ``LINEAR_EXACT`` / ``SIGMOID``). A plain ``(center, width)``
    tuple is accepted wherever a Window is, meaning ``LINEAR``."""

    center: float
    width: float
    function: str = "LINEAR"


class Viewport(NamedTuple):
    """The WADO-RS viewport: the output fits in ``width`` x ``height`` pixels;
    the optional source region (``sx``, ``sy``, ``sw``, ``sh``, in image
    pixels; a negative ``sw`` / ``sh`` flips) is rendered instead of the whole
    image. A plain ``(width, height)`` tuple is accepted wherever a Viewport is."""

    width: int
    height: int
    sx: int = 0
    sy: int = 0
    sw: int | None = None
    sh: int | None = None


# --------------------------------------------------------------------------- stored files

#: pixel data elements by tag
PIXEL_KEYWORDS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}
_UNDEFINED = 0xFFFFFFFF


class ImageFile:
    """A stored instance opened for frame access: ``header`` (the dataset up
    to its pixel data, which is not read) and a seekable ``file`` whose pixel
    data element starts at ``pixel_at`` (None: the object has none).  Frames
    are read from the file one at a time; nothing here closes the file."""

    def __init__(self, header: Dataset, file: BinaryIO, pixel_at: int | None) -> None:
        self.header = header
        self.file = file
        syntax = _transfer_syntax(header)
        # a deflated object is given inflated (archive.retrieve.open_header)
        self.syntax = ExplicitVRLittleEndian if syntax == DeflatedExplicitVRLittleEndian else syntax
        self.keyword: str | None = None
        self.vr = ""
        self.value_at = self.length = 0
        if pixel_at is None:
            return
        file.seek(0, io.SEEK_END)
        self.size = file.tell()
        file.seek(pixel_at)
        raw = file.read(12)
        order = "<" if self.syntax.is_little_endian else ">"
        if len(raw) < 8:
            raise InconsistentPixelData(f"the pixel data element is truncated at byte {pixel_at}")
        group, element = struct.unpack(order + "HH", raw[:4])
        self.keyword = PIXEL_KEYWORDS.get(group << 16 | element)
        if self.keyword is None:
            raise InconsistentPixelData(f"no pixel data element at byte {pixel_at}")
        if not raw[4:6].isalpha():  # implicit VR (or mislabelled as explicit)
            (self.length,) = struct.unpack(order + "I", raw[4:8])
            self.value_at = pixel_at + 8
            bits = int(header.get("BitsAllocated") or 8)
            self.vr = "OB" if self.syntax.is_encapsulated or bits <= 8 else "OW"
        else:
            if len(raw) < 12:
                raise InconsistentPixelData("the pixel data element is truncated")
            self.vr = raw[4:6].decode("ascii")
            (self.length,) = struct.unpack(order + "I", raw[8:12])
            self.value_at = pixel_at + 12
        if self.length != _UNDEFINED and self.value_at + self.length > self.size:
            raise InconsistentPixelData(
                f"the pixel data is truncated: it declares {self.length} bytes, "
                f"the object holds {self.size - self.value_at}"
            )

    def _pixel_keyword(self) -> str:
        if self.keyword is None:
            raise FrameError("the instance has no pixel data")
        return self.keyword

    def frame_bytes(self, index: int) -> bytes:
        """Frame ``index`` (1-based) as :func:`get_frame_bytes` returns it."""
        n = _check_frame(self, index)
        keyword = self._pixel_keyword()
        if self.syntax.is_encapsulated:
            if self.length != _UNDEFINED:
                raise InconsistentPixelData(
                    "compressed pixel data must be encapsulated (undefined length), "
                    f"this has a length of {self.length}"
                )
            self.file.seek(self.value_at)
            try:
                return get_frame(
                    self.file,
                    int(index) - 1,
                    number_of_frames=n,
                    extended_offsets=_extended_offsets(self.header),
                )
            except (ValueError, IndexError, EOFError, struct.error) as exc:
                raise InconsistentPixelData(
                    f"frame {index} cannot be read from the pixel data: {exc}"
                ) from exc
        frame_bits = _native_frame_bits(self.header, keyword)
        needed = math.ceil(frame_bits * n / 8)
        if self.length == _UNDEFINED or self.length < needed:
            have = "undefined" if self.length == _UNDEFINED else str(self.length)
            raise InconsistentPixelData(
                f"pixel data is truncated: {have} bytes for {n} frame(s) of "
                f"{frame_bits} bits ({needed} bytes expected from Rows x Columns x "
                "Samples per Pixel x Bits Allocated x Number of Frames)"
            )
        start = (int(index) - 1) * frame_bits
        first, last = start // 8, math.ceil((start + frame_bits) / 8)
        data = self._little_endian(first, last)
        if frame_bits % 8 == 0:
            return data
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        offset = start - first * 8
        return np.packbits(bits[offset : offset + frame_bits], bitorder="little").tobytes()

    def _little_endian(self, first: int, last: int) -> bytes:
        """Bytes ``first:last`` of the pixel data value, little endian."""
        width = _swap_width(self.header, self._pixel_keyword(), self.vr)
        if width == 0:
            self.file.seek(self.value_at + first)
            return self.file.read(last - first)
        start = first - first % width
        stop = min(math.ceil(last / width) * width, self.length)
        self.file.seek(self.value_at + start)
        chunk = to_little_endian(self.file.read(stop - start), width)
        return chunk[first - start : last - start]

    def decode(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Frame ``index`` decoded from that frame's bytes alone: the array
        and pydicom's decoding metadata (photometric interpretation after
        decoding...)."""
        frame = self.frame_bytes(index)
        opts = as_pixel_options(self.header, number_of_frames=1)
        opts.pop("extended_offsets", None)
        if self.syntax.is_encapsulated:
            source, syntax = encapsulate([frame]), self.syntax
        else:  # frame_bytes made it little endian, starting at bit 0
            source, syntax = frame, ExplicitVRLittleEndian
            float_vr = {"FloatPixelData": "OF", "DoubleFloatPixelData": "OD"}
            wide = int(self.header.get("BitsAllocated") or 8) > 8
            opts["pixel_vr"] = float_vr.get(self._pixel_keyword(), "OW" if wide else "OB")
        opts["transfer_syntax_uid"] = syntax
        opts["pixel_keyword"] = self._pixel_keyword()
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise DecodeError(f"no pixel data decoder for {syntax.name} ({syntax})") from exc
        try:
            return decoder.as_array(source, index=0, validate=True, **opts)
        except (RuntimeError, ValueError, AttributeError, KeyError, TypeError) as exc:
            raise DecodeError(f"cannot decode frame {index} ({syntax.name}): {exc}") from exc

    def value_chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The pixel data value as stored (encapsulated items included), in
        chunks, little endian for native data (the bulk data resource)."""
        self._pixel_keyword()
        if self.length == _UNDEFINED:  # encapsulated: up to the sequence delimiter
            end = self._encapsulated_end()
        else:
            end = self.value_at + self.length
        width = (
            0 if self.syntax.is_encapsulated else _swap_width(self.header, self.keyword, self.vr)
        )
        size -= size % 8
        at = self.value_at
        while at < end:
            self.file.seek(at)
            chunk = self.file.read(min(size, end - at))
            if not chunk:
                break
            at += len(chunk)
            yield to_little_endian(chunk, width)

    def _encapsulated_end(self) -> int:
        at = self.value_at
        while True:
            self.file.seek(at)
            raw = self.file.read(8)
            if len(raw) < 8:
                raise InconsistentPixelData("encapsulated pixel data has no sequence delimiter")
            group, element, length = struct.unpack("<HHI", raw)
            at += 8
            if (group, element) == (0xFFFE, 0xE0DD):
                return at
            if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED:
                raise InconsistentPixelData(
                    f"unexpected element ({group:04X},{element:04X}) in encapsulated pixel data"
                )
            at += length


Source = Dataset | ImageFile


def _dataset(src: Source) -> Dataset:
    return src.header if isinstance(src, ImageFile) else src


# --------------------------------------------------------------------------- frames


def frame_count(ds: Source) -> int:
    """Number of frames: *Number of Frames*, or 1 when absent, empty or < 1
    (single-frame IODs do not carry the attribute at all)."""
    value = _dataset(ds).get("NumberOfFrames")
    try:
        n = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise FrameError(f"invalid Number of Frames {value!r}") from exc
    return max(n, 1)


def _check_frame(ds: Source, index: int) -> int:
    """Validate a 1-based frame number; return the number of frames."""
    n = frame_count(ds)
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise FrameError(f"frame numbers are integers, not {index!r}")
    if not 1 <= index <= n:
        unit = "frame" if n == 1 else "frames"
        raise FrameError(f"frame {index} requested, the instance has {n} {unit}")
    return n


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; datasets without file meta (e.g. built in
    memory or read without a preamble) fall back to how they were read."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax:
        return UID(tsyntax)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is False:
        return UID("1.2.840.10008.1.2.2")
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _pixel_element(ds: Dataset) -> str:
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            return keyword
    raise FrameError("the instance has no pixel data")


def _extended_offsets(ds: Dataset) -> tuple[bytes, bytes] | None:
    """The Extended Offset Table when present: with it, pydicom finds frames
    of very large multi-frame objects without scanning fragments."""
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        return ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths
    return None


def _swap_width(ds: Dataset, keyword: str, vr: str = "") -> int:
    """How many bytes to swap per unit to turn stored data little endian: 0
    for little endian data; the sample size for 16/32/64-bit big endian data;
    2 for 8-bit big endian data encoded as OW (pairwise, as pydicom's decoder
    does). WADO-RS serves native frames as ``application/octet-stream`` in
    Explicit VR Little Endian, and big endian data (retired) is still found in
    archives."""
    if _transfer_syntax(ds).is_little_endian:
        return 0
    bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword)
    bits = bits or int(ds.get("BitsAllocated") or 8)
    if bits > 8:
        return bits // 8
    return 2 if bits == 8 and (vr or ds[keyword].VR) == "OW" else 0


def to_little_endian(data: bytes, width: int) -> bytes:
    """``data`` with each ``width``-byte word byte-swapped (0: unchanged)."""
    if width == 0:
        return data
    usable = len(data) - len(data) % width
    swapped = np.frombuffer(data[:usable], dtype=f">u{width}").astype(f"<u{width}")
    return swapped.tobytes() + data[usable:]


def _native_frames(ds: Dataset, keyword: str, indices: range) -> Iterator[bytes]:
    """Native frames ``indices`` (0-based), little endian. Frames of 16+ bit
    data hold whole samples, so only the requested slice is copied and
    swapped - not the whole (possibly huge) multi-frame value."""
    n = frame_count(ds)
    frame_bits = _native_frame_bits(ds, keyword)
    data = ds[keyword].value
    width = _swap_width(ds, keyword)
    if width == 2 and frame_bits % 16:
        # 8-bit OW frames of odd length straddle swapped pairs: swap it all
        padded = bytes(data) + b"\0" * (len(data) % 2)
        data, width = to_little_endian(padded, 2)[: len(data)], 0
    for i in indices:
        yield to_little_endian(_native_frame(data, frame_bits, i, n), width)


def _native_frame_bits(ds: Dataset, keyword: str) -> int:
    """Bits per native frame. Uncompressed YBR_FULL_422 stores 2 samples per
    pixel on average (Y Y Cb Cr per pixel pair), not 3 (PS3.3 C.7.6.3.1.2)."""
    try:
        bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword)
        bits = bits or int(ds.BitsAllocated)
        pixels = int(ds.Rows) * int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise FrameError(f"incomplete Image Pixel module: {exc}") from exc
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        return pixels * 2 * bits
    return pixels * samples * bits


def _native_frame(data: bytes, frame_bits: int, index0: int, n: int) -> bytes:
    """Cut frame ``index0`` (0-based) out of native pixel data.

    With BitsAllocated 1 a frame need not start on a byte boundary (e.g. 3x3
    pixels = 9 bits per frame); those frames are re-packed so that each
    returned frame starts at bit 0, as a receiver decoding one frame expects.
    """
    needed = math.ceil(frame_bits * n / 8)
    if len(data) < needed:
        raise InconsistentPixelData(
            f"pixel data is truncated: {len(data)} bytes for {n} frame(s) of "
            f"{frame_bits} bits ({needed} bytes expected)"
        )
    if frame_bits % 8 == 0:
        size = frame_bits // 8
        return bytes(data[index0 * size : (index0 + 1) * size])
    start = index0 * frame_bits
    first, last = start // 8, math.ceil((start + frame_bits) / 8)
    bits = np.unpackbits(np.frombuffer(data[first:last], np.uint8), bitorder="little")
    offset = start - first * 8
    return np.packbits(bits[offset : offset + frame_bits], bitorder="little").tobytes()


def iter_frames_raw(ds: Dataset) -> Iterator[bytes]:
    """Yield every frame, in order, as stored (see :func:`get_frame_bytes`).

    For encapsulated data this walks the fragments once (cheaper than calling
    :func:`get_frame_bytes` per frame when the Basic Offset Table is empty).
    """
    n = frame_count(ds)
    keyword = _pixel_element(ds)
    if _transfer_syntax(ds).is_encapsulated:
        count = 0
        frames = generate_frames(
            ds[keyword].value, number_of_frames=n, extended_offsets=_extended_offsets(ds)
        )
        try:
            for frame in frames:
                count += 1
                if count > n:
                    break
                yield frame
        except (ValueError, IndexError) as exc:
            raise FrameError(
                f"frame {count + 1} cannot be read from the pixel data: {exc}"
            ) from exc
        if count < n:
            raise FrameError(f"encapsulated pixel data holds {count} frame(s), expected {n}")
        return
    yield from _native_frames(ds, keyword, range(n))


def get_frame_bytes(ds: Source, index: int) -> bytes:
    """The bytes of frame ``index`` (1-based), without decoding.

    Encapsulated transfer syntaxes: the compressed frame exactly as stored
    (all its fragments joined), found through the Extended Offset Table, the
    Basic Offset Table, or - when that is empty - by counting fragments /
    JPEG end-of-image markers (pydicom.encaps). Native transfer syntaxes: the
    frame's slice of *Pixel Data* (Rows x Columns x SamplesPerPixel x
    BitsAllocated / 8 bytes, bit-exact for 1-bit data), little endian.
    Raises :class:`FrameError` for a frame number out of range,
    :class:`InconsistentPixelData` when the data do not hold that frame.
    """
    if isinstance(ds, ImageFile):
        return ds.frame_bytes(index)
    n = _check_frame(ds, index)
    keyword = _pixel_element(ds)
    if _transfer_syntax(ds).is_encapsulated:
        try:
            return get_frame(
                ds[keyword].value,
                int(index) - 1,
                number_of_frames=n,
                extended_offsets=_extended_offsets(ds),
            )
        except (ValueError, IndexError) as exc:
            raise InconsistentPixelData(
                f"frame {index} cannot be read from the pixel data: {exc}"
            ) from exc
    return next(_native_frames(ds, keyword, range(int(index) - 1, int(index))))


# --------------------------------------------------------------------------- decoding


def _frame_bytes_decoded(ds: Dataset, per_sample: int | None = None) -> tuple[int, str]:
    """Bytes one decoded frame takes (``per_sample`` bytes per sample, else
    the allocated size), and a description, from the header alone."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 8)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InconsistentPixelData(f"incomplete Image Pixel module: {exc}") from exc
    size = per_sample or max(math.ceil(bits / 8), 1)
    return rows * columns * samples * size, f"a {columns} x {rows} x {samples} frame"


def _check_size(ds: Dataset, max_bytes: int | None, per_sample: int | None = None) -> None:
    if max_bytes is None:
        return
    needed, what = _frame_bytes_decoded(ds, per_sample)
    if needed > max_bytes:
        raise TooLarge(what, needed, max_bytes)


def _decode(ds: Source, index: int, max_bytes: int | None = None) -> tuple[np.ndarray, str]:
    """Decode frame ``index`` (1-based); return the array and its photometric
    interpretation *after* decoding (JPEG and JPEG 2000 decoders convert
    YBR_FULL_422 / YBR_ICT / YBR_RCT to RGB themselves, so the dataset's value
    is not what the array holds)."""
    _check_frame(ds, index)
    _check_size(_dataset(ds), max_bytes)
    if isinstance(ds, ImageFile):
        arr, meta = ds.decode(index)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        header = ds.header
        photometric = str(
            meta.get("photometric_interpretation") or header.PhotometricInterpretation
        )
        return arr, photometric
    _pixel_element(ds)
    tsyntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise DecodeError(f"no pixel data decoder for {tsyntax.name} ({tsyntax})") from exc
    try:
        arr, meta = decoder.as_array(
            ds, index=int(index) - 1, validate=True, **as_pixel_options(ds)
        )
    except (RuntimeError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise DecodeError(f"cannot decode frame {index} ({tsyntax.name}): {exc}") from exc
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    photometric = str(meta.get("photometric_interpretation") or ds.PhotometricInterpretation)
    return arr, photometric


def decoded_frame(ds: Source, index: int = 1, *, max_bytes: int | None = None) -> np.ndarray:
    """Frame ``index`` (1-based) as pydicom decodes it, in native byte order:
    shape (rows, columns) or (rows, columns, samples); colour JPEG data comes
    back as RGB (pydicom's default ``as_rgb``). Raises :class:`FrameError` for
    a bad frame number, :class:`DecodeError` when no plugin can decode it and
    :class:`TooLarge` when the decoded frame would exceed ``max_bytes``."""
    return _decode(ds, index, max_bytes)[0]


# --------------------------------------------------------------------------- grayscale pipeline


def _frame_attr(ds: Dataset, index0: int, sequence: str, keyword: str) -> Any:
    """An attribute of a frame of an enhanced multi-frame IOD: per-frame
    functional group first, then shared, then the top-level dataset (classic
    IODs)."""
    places = (("PerFrameFunctionalGroupsSequence", index0), ("SharedFunctionalGroupsSequence", 0))
    for groups, i in places:
        items = ds.get(groups)
        if items is None or len(items) <= i:
            continue
        inner = items[i].get(sequence)
        if inner and keyword in inner[0] and inner[0][keyword].value not in (None, ""):
            return inner[0][keyword].value
    value = ds.get(keyword)
    return None if value in (None, "") else value


def _first(value: Any) -> Any:
    """The first value of a possibly multi-valued attribute."""
    if isinstance(value, MultiValue | list | tuple):
        return value[0] if len(value) else None
    return value


def _modality(ds: Dataset, arr: np.ndarray, index0: int) -> np.ndarray:
    """Stored values -> modality values (HU for CT...). A Modality LUT
    Sequence goes through pydicom; Rescale Slope / Intercept are looked up per
    frame so enhanced CT / MR render with the right scale."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float64)
    slope = _frame_attr(ds, index0, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_attr(ds, index0, "PixelValueTransformationSequence", "RescaleIntercept")
    out = arr.astype(np.float64)
    if slope is not None or intercept is not None:
        out = out * float(_first(slope) if slope is not None else 1.0)
        out += float(_first(intercept) if intercept is not None else 0.0)
    return out


def _window_function(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3 with the output range 0..1."""
    c, w, function = float(window.center), float(window.width), window.function
    if function == "LINEAR":
        if w < 1:
            raise RenderError(f"window width must be >= 1 for LINEAR, not {w:g}")
        low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        if w == 1:  # a threshold: the formula's slope is infinite
            return (values > low).astype(np.float64)
        out = (values - (c - 0.5)) / (w - 1) + 0.5
        out[values <= low] = 0.0
        out[values > high] = 1.0
        return out
    if w <= 0:
        raise RenderError(f"window width must be > 0, not {w:g}")
    if function == "LINEAR_EXACT":
        return np.clip((values - c) / w + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - c) / w, -700, 700)))
    raise RenderError(f"unknown VOI LUT function {function!r}; use one of {_WINDOW_FUNCTIONS}")


def _as_window(window: tuple) -> Window:
    if isinstance(window, Window):
        win = window
    elif isinstance(window, tuple | list) and len(window) in (2, 3):
        win = Window(*window)
    else:
        raise RenderError(f"window must be (center, width[, function]), not {window!r}")
    try:
        center, width = float(win.center), float(win.width)
    except (TypeError, ValueError) as exc:
        raise RenderError(f"window center and width must be numbers: {window!r}") from exc
    if not (math.isfinite(center) and math.isfinite(width)):
        raise RenderError(f"window center and width must be finite: {window!r}")
    function = str(win.function).upper().replace("-", "_")
    if function not in _WINDOW_FUNCTIONS:
        raise RenderError(f"unknown window function {win.function!r}; use linear or sigmoid")
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise RenderError(f"window width must be >= 1 (> 0 for {function}), not {width:g}")
    return Window(center, width, function)


def _dataset_window(ds: Dataset, index0: int) -> Window | None:
    center = _frame_attr(ds, index0, "FrameVOILUTSequence", "WindowCenter")
    width = _frame_attr(ds, index0, "FrameVOILUTSequence", "WindowWidth")
    if center is None or width is None:
        return None
    function = _frame_attr(ds, index0, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR"
    try:
        win = Window(float(_first(center)), float(_first(width)), str(function).upper())
    except (TypeError, ValueError):
        return None  # unreadable window: fall back to the data range
    if win.function not in _WINDOW_FUNCTIONS:
        win = win._replace(function="LINEAR")
    if win.width <= 0 or (win.function == "LINEAR" and win.width < 1):
        return None  # invalid stored window: fall back rather than refuse to render
    return win


def _grayscale_to_8bit(
    ds: Dataset, arr: np.ndarray, photometric: str, index0: int, window: tuple | None
) -> np.ndarray:
    """Modality LUT, then VOI (explicit window > stored window > VOI LUT
    Sequence > min/max of the frame), then the presentation inversion."""
    values = _modality(ds, arr, index0)
    if window is not None:
        scaled = _window_function(values, _as_window(window))
    elif (stored := _dataset_window(ds, index0)) is not None:
        scaled = _window_function(values, stored)
    elif "VOILUTSequence" in ds:
        # the LUT maps modality values to its own output range, 2**bits wide
        try:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
        except (AttributeError, IndexError, TypeError, ValueError):
            bits = 16
        lut_out = apply_voi_lut(np.rint(values).astype(np.int64), ds)
        scaled = np.clip(lut_out.astype(np.float64) / ((1 << bits) - 1), 0.0, 1.0)
    else:
        lo, hi = float(values.min()), float(values.max())
        if hi > lo:
            scaled = (values - lo) / (hi - lo)
        else:
            scaled = np.zeros_like(values)
    out = np.rint(scaled * 255.0).astype(np.uint8)
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        out = 255 - out
    return out


def _color_to_rgb8(ds: Dataset, arr: np.ndarray, photometric: str) -> np.ndarray:
    """Colour frames -> 8-bit RGB. pydicom already converts JPEG YBR data and
    JPEG 2000 ICT/RCT; uncompressed or RLE YBR_FULL(_422) is converted here."""
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
    elif photometric == "RGB":
        rgb = arr
    elif photometric in ("YBR_FULL", "YBR_FULL_422"):
        rgb = convert_color_space(arr, photometric, "RGB")
    else:
        raise RenderError(f"cannot render photometric interpretation {photometric!r}")
    if rgb.dtype == np.uint8:
        return rgb
    if photometric == "PALETTE COLOR":
        bits = 16 if rgb.dtype.itemsize >= 2 else 8
    else:
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or rgb.dtype.itemsize * 8)
    shift = max(bits - 8, 0)
    return np.clip(rgb.astype(np.uint64) >> shift, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- geometry


def _as_viewport(viewport: tuple) -> Viewport:
    if isinstance(viewport, Viewport):
        vp = viewport
    elif isinstance(viewport, tuple | list) and len(viewport) in (2, 6):
        vp = Viewport(*viewport)
    else:
        raise RenderError(f"viewport must be (width, height[, sx, sy, sw, sh]), not {viewport!r}")
    for name in ("width", "height"):
        value = getattr(vp, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise RenderError(f"viewport {name} must be a positive integer, not {value!r}")
    return vp


def _crop(arr: np.ndarray, vp: Viewport) -> np.ndarray:
    """Apply the viewport's source region (PS3.18 8.3.5.1.3): sx, sy the top
    left corner, |sw| x |sh| the size; a negative sw / sh flips the region
    horizontally / vertically (the region itself still starts at sx, sy)."""
    if vp.sx == 0 and vp.sy == 0 and vp.sw is None and vp.sh is None:
        return arr
    rows, cols = arr.shape[:2]
    sx, sy = int(vp.sx), int(vp.sy)
    sw = abs(int(vp.sw)) if vp.sw is not None else cols - sx
    sh = abs(int(vp.sh)) if vp.sh is not None else rows - sy
    if not (0 <= sx < cols and 0 <= sy < rows and 0 < sx + sw <= cols and 0 < sy + sh <= rows):
        raise RenderError(
            f"viewport region sx={vp.sx} sy={vp.sy} sw={vp.sw} sh={vp.sh} is outside "
            f"the {cols}x{rows} image"
        )
    out = arr[sy : sy + sh, sx : sx + sw]
    if vp.sw is not None and vp.sw < 0:
        out = out[:, ::-1]
    if vp.sh is not None and vp.sh < 0:
        out = out[::-1, :]
    return np.ascontiguousarray(out)


def _fit(width: int, height: int, box_w: int, box_h: int, upscale: bool) -> tuple[int, int]:
    """Largest size with the image's aspect ratio that fits in the box."""
    scale = min(box_w / width, box_h / height)
    if not upscale:
        scale = min(scale, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


# --------------------------------------------------------------------------- rendering


#: bytes per sample of the rendering pipeline's working copy (float64 values)
RENDER_BYTES_PER_SAMPLE = 8


def render_image(
    src: Source,
    frame: int = 1,
    *,
    window: tuple | None = None,
    viewport: tuple | None = None,
    upscale: bool = False,
    max_bytes: int | None = None,
) -> Image.Image:
    """Frame ``frame`` as an 8-bit Pillow image: mode ``L`` for grayscale,
    ``RGB`` for colour. See :func:`render` for the parameters; this is the
    un-encoded form (for animated GIFs, the viewer, tests)."""
    vp = _as_viewport(viewport) if viewport is not None else None
    if window is not None:
        _as_window(window)  # reject bad parameters before the (costly) decode
    ds = _dataset(src)
    _check_frame(src, frame)
    _check_size(ds, max_bytes, RENDER_BYTES_PER_SAMPLE)
    arr, photometric = _decode(src, frame)
    samples = int(ds.get("SamplesPerPixel", 1))
    if photometric in ("MONOCHROME1", "MONOCHROME2") and samples == 1 and arr.ndim == 2:
        pixels = _grayscale_to_8bit(ds, arr, photometric, int(frame) - 1, window)
        mode = "L"
    else:
        pixels = _color_to_rgb8(ds, arr, photometric)  # window does not apply to colour
        mode = "RGB"
    if vp is not None:
        pixels = _crop(pixels, vp)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if image.mode != mode:
        image = image.convert(mode)
    if vp is not None:
        size = _fit(image.width, image.height, int(vp.width), int(vp.height), upscale)
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def _normalise_media_type(media_type: str) -> str:
    mt = str(media_type).split(";", 1)[0].strip().lower()
    if mt not in MEDIA_TYPES:
        raise RenderError(f"unsupported media type {media_type!r}; use one of {MEDIA_TYPES}")
    return mt


def _encode(image: Image.Image, media_type: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if media_type == "image/jpeg":
        image.save(buf, format="JPEG", quality=quality, optimize=False)
    elif media_type == "image/png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        if image.mode == "RGB":
            image = image.quantize(colors=256)
        image.save(buf, format="GIF")
    return buf.getvalue()


def render(
    ds: Source,
    frame: int = 1,
    *,
    media_type: str = "image/jpeg",
    window: tuple | None = None,
    viewport: tuple | None = None,
    quality: int = 90,
    upscale: bool = False,
    max_bytes: int | None = None,
) -> bytes:
    """A consumer image of one frame, as WADO-RS ``/rendered`` and WADO-URI
    ``contentType=image/jpeg`` return (PS3.18 8.3.5 and 9.5.2.x).

    Grayscale: Modality LUT (rescale, per frame for enhanced IODs), then the
    VOI: ``window`` = ``(center, width)`` or a :class:`Window` if given (the
    ``window`` query parameter overrides the stored one), else the stored
    window (first value, with its VOI LUT Function), else the VOI LUT
    Sequence, else the frame's min..max; then 8 bits, inverted for
    MONOCHROME1 (and Presentation LUT Shape INVERSE). Colour (RGB, YBR_*,
    PALETTE COLOR): 8-bit RGB; ``window`` is ignored.

    ``viewport`` = ``(max width, max height)`` or a :class:`Viewport`: the
    output fits in that box keeping the aspect ratio; it is not enlarged
    unless ``upscale`` (a viewer scales on its side, a bigger image only
    costs bandwidth). ``media_type``: ``image/jpeg`` (``quality`` 1..100),
    ``image/png`` or ``image/gif``; parameters after ``;`` are ignored.

    ``max_bytes`` bounds the pipeline's working copy of the frame (Rows x
    Columns x Samples x 8 bytes): a bigger frame raises :class:`TooLarge`
    before it is decoded.

    Raises :class:`RenderError` (bad media type or parameter, unrenderable
    image), :class:`FrameError` (bad frame number), :class:`DecodeError`,
    :class:`InconsistentPixelData`, :class:`TooLarge`.
    """
    mt = _normalise_media_type(media_type)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise RenderError(f"quality must be an integer in 1..100, not {quality!r}")
    image = render_image(
        ds, frame, window=window, viewport=viewport, upscale=upscale, max_bytes=max_bytes
    )
    return _encode(image, mt, quality)


def thumbnail(
    ds: Source,
    *,
    size: int = 128,
    media_type: str = "image/jpeg",
    quality: int = 85,
    max_bytes: int | None = None,
) -> bytes:
    """The middle frame, rendered with the stored window and fitted into
    ``size`` x ``size`` (never enlarged): what WADO-RS ``/thumbnail`` and the
    viewer's study browser show. The middle frame is more representative
    than the first one of a cine loop or a multi-frame volume."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RenderError(f"thumbnail size must be a positive integer, not {size!r}")
    middle = (frame_count(ds) + 1) // 2
    return render(
        ds,
        middle,
        media_type=media_type,
        viewport=(size, size),
        quality=quality,
        max_bytes=max_bytes,
    )


# --------------------------------------------------------------------------- query parameters


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RenderError(f"{what} must be a number, not {text.strip()!r}") from None
    if not math.isfinite(value):
        raise RenderError(f"{what} must be finite, not {text.strip()!r}")
    return value


def parse_window(text: str) -> Window:
    """Parse the WADO-RS ``window=center,width,function`` parameter (PS3.18
    8.3.5.1.4). ``function`` is ``linear``, ``linear-exact`` or ``sigmoid``
    (case-insensitive, ``_`` accepted for ``-``) and may be left out, meaning
    linear. Returns a :class:`Window` (a NamedTuple: ``center, width, *_ =``
    unpacks it). Raises :class:`RenderError` for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise RenderError(f"window must be 'center,width,function', not {text!r}")
    center = _number(parts[0], "window center")
    width = _number(parts[1], "window width")
    function = parts[2] if len(parts) == 3 and parts[2] else "linear"
    return _as_window((center, width, function))


def _int(text: str, what: str) -> int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        raise RenderError(f"{what} must be an integer, not {text!r}") from None


def parse_viewport(text: str) -> Viewport:
    """Parse the WADO-RS ``viewport=vw,vh`` or ``viewport=vw,vh,sx,sy,sw,sh``
    parameter (PS3.18 8.3.5.1.3): the output size, then optionally the source
    region in image pixels (empty ``sx`` / ``sy`` mean 0, empty ``sw`` / ``sh``
    the rest of the image, negative ``sw`` / ``sh`` flip). Returns a
    :class:`Viewport`. Raises :class:`RenderError` for malformed values."""
    parts = str(text).split(",")
    if len(parts) not in (2, 6):
        raise RenderError(f"viewport must be 'vw,vh' or 'vw,vh,sx,sy,sw,sh', not {text!r}")
    vw, vh = _int(parts[0], "viewport width"), _int(parts[1], "viewport height")
    if vw < 1 or vh < 1:
        raise RenderError(f"viewport width and height must be positive, not {text!r}")
    if len(parts) == 2:
        return Viewport(vw, vh)
    sx = _int(parts[2], "viewport sx") if parts[2].strip() else 0
    sy = _int(parts[3], "viewport sy") if parts[3].strip() else 0
    sw = _int(parts[4], "viewport sw") if parts[4].strip() else None
    sh = _int(parts[5], "viewport sh") if parts[5].strip() else None
    if sx < 0 or sy < 0 or sw == 0 or sh == 0:
        raise RenderError(f"viewport region must start at >= 0 and be non-empty: {text!r}")
    return Viewport(vw, vh, sx, sy, sw, sh)
