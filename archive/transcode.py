"""Transfer syntax conversion: decoding, lossless re-encoding, verification.

Two users:

* **storage** (per-producer policy, DESIGN "Storage and index"):
  :func:`transcode` turns a received Part 10 object into the producer's
  stored syntax - HTJ2K lossless, JPEG 2000 lossless, JPEG-LS lossless, RLE
  lossless or Explicit VR Little Endian - and verifies the result bit-exact
  before anything is stored.  Data that arrived lossy is never re-encoded
  (:class:`LossySource`); corrupt compressed data is refused
  (:class:`TranscodeError`) and never yields a partly written object.
* **retrieval** (WADO-RS, WADO-URI): :func:`producible` says which syntaxes
  an instance stored in a given syntax can be sent in, :func:`encode_as`
  produces them.

Decoding (:func:`decode_dataset`, :func:`decoded_pixels`) covers every
syntax producers send: the uncompressed ones (implicit / explicit little
endian, explicit big endian, deflated), RLE, JPEG baseline / extended /
lossless (processes 14 and 14 SV1), JPEG-LS lossless and near-lossless,
JPEG 2000 lossless and lossy, HTJ2K (.201 / .202 / .203).  pydicom's
decoders (plugins pylibjpeg-libjpeg, -openjpeg, -rle, pyjpegls) do the work;
HTJ2K goes through OpenJPEG (pylibjpeg-openjpeg) and falls back to OpenJPH
(imagecodecs) only when pydicom has no HTJ2K decoder: imagecodecs 2026.3.6's
``htj2k_decode`` swallows OpenJPH's errors (they are printed as "Exception
ignored" and a partly decoded image is returned), so that path runs with a
codestream structure check and traps those swallowed errors.

Encoding (:func:`encode_dataset`): pydicom's ``Dataset.compress`` for RLE
(pylibjpeg-rle, else pydicom's own encoder), JPEG-LS (pyjpegls / CharLS) and
JPEG 2000 (pylibjpeg-openjpeg); HTJ2K with OpenJPH through
``imagecodecs.htj2k_encode``, one codestream per frame, encapsulated here.
HTJ2K codestreams are reversible (5/3 wavelet), without colour transform
(RGB stays RGB), in RPCL progression order (OpenJPH's default, checked after
encoding) with enough decompositions for a base resolution <= 64 pixels;
.202 additionally carries TLM markers and one tile-part per resolution, as
PS3.5 10.18 asks for.  OpenJPH writes the container size (8 or 16 bits) as
the component precision, not *Bits Stored*: lossless, and decoders return
the same values, but a 12-bit image has a 16-bit codestream.

Pixel values are compared as pydicom returns them: unused high bits (above
*Bits Stored*) are cleared / sign-extended, so they are not preserved by a
re-encode (retired overlays in high bits are the only known use).
"""

from __future__ import annotations

import io
import math
import sys
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.pixels import get_decoder, get_encoder, pack_bits
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEG2000TransferSyntaxes,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

try:  # OpenJPH: the only HTJ2K encoder available to Python here
    import imagecodecs
except ImportError:  # pragma: no cover - a dependency, but keep decoding working without it
    imagecodecs = None

__all__ = [
    "LOSSLESS_SOURCE_SYNTAXES",
    "LOSSLESS_TARGETS",
    "LOSSY_SYNTAXES",
    "PRODUCIBLE",
    "TARGETS",
    "LossySource",
    "TranscodeError",
    "decode_dataset",
    "decoded_pixels",
    "encodable_targets",
    "encode_as",
    "encode_dataset",
    "is_lossy",
    "j2k_coding_style",
    "producible",
    "transcode",
    "verify_lossless",
]


class TranscodeError(ValueError):
    """The object cannot be converted: unsupported syntax or image, corrupt or
    undecodable pixel data, or a re-encode that is not bit-exact."""


class LossySource(TranscodeError):
    """The object arrived lossy compressed: it is never re-encoded."""


#: syntaxes we can produce from any stored instance whose pixel data decodes
PRODUCIBLE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})

_NATIVE_SOURCES = frozenset(
    {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    }
)

#: syntaxes whose pixel data is lossless by construction
LOSSLESS_SOURCE_SYNTAXES = _NATIVE_SOURCES | {
    RLELossless,
    UID("1.2.840.10008.1.2.4.57"),  # JPEG Lossless, process 14
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
}

#: syntaxes that are (or may be) lossy: JPEG baseline / extended, the retired
#: JPEG processes (never seen, no decoder: treated as lossy, so kept as they
#: are), JPEG-LS near-lossless, JPEG 2000 and HTJ2K "lossy allowed", MPEG /
#: HEVC video, JPEG XL (JPEG recompression and lossy).
LOSSY_SYNTAXES = frozenset(
    UID(f"1.2.840.10008.1.2.4.{n}")
    for n in (
        *range(50, 57),
        *range(58, 66),
        81,
        91,
        93,
        *range(100, 109),
        111,
        112,
        203,
    )
)

_HTJ2K_LOSSLESS = (HTJ2KLossless, HTJ2KLosslessRPCL)
_HTJ2K_ALL = (*_HTJ2K_LOSSLESS, UID("1.2.840.10008.1.2.4.203"))

#: the lossless compressed syntaxes :func:`encode_dataset` knows how to write
LOSSLESS_TARGETS = (RLELossless, JPEGLSLossless, JPEG2000Lossless, *_HTJ2K_LOSSLESS)
#: every syntax :func:`transcode` may be asked for
TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, *LOSSLESS_TARGETS)

# pydicom encoder plugins, fastest first
_PLUGINS = {
    RLELossless: ("pylibjpeg", "pydicom"),
    JPEGLSLossless: ("pyjpegls",),
    JPEG2000Lossless: ("pylibjpeg",),
}

# pydicom decoder plugins to use when available: pylibjpeg-rle is ~8x faster
# than pydicom's own RLE decoder; pylibjpeg-openjpeg rather than Pillow for
# JPEG 2000 (same speed, and the plugin that decodes HTJ2K)
_DECODER_PLUGIN = {
    RLELossless: "pylibjpeg",
    **dict.fromkeys(JPEGLSTransferSyntaxes, "pyjpegls"),
    **dict.fromkeys(JPEG2000TransferSyntaxes, "pylibjpeg"),
}

_JPEG_LOSSY = frozenset(u for u in JPEGTransferSyntaxes if u in LOSSY_SYNTAXES)
_EXTENDED_OFFSETS = ("ExtendedOffsetTable", "ExtendedOffsetTableLengths")
_ENCAPSULATED_TOTAL_LENGTH = 0x7FE00003  # Encapsulated Pixel Data Value Total Length


# --------------------------------------------------------------------------- small helpers


def _syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not tsyntax:
        raise TranscodeError("the object has no Transfer Syntax UID (0002,0010)")
    return UID(str(tsyntax))


def _read(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types for malformed input
        raise TranscodeError(f"not a readable DICOM Part 10 object: {exc}") from exc


def _write(ds: Dataset, target: UID) -> bytes:
    ds.file_meta.TransferSyntaxUID = target
    buffer = io.BytesIO()
    ds.save_as(
        buffer, implicit_vr=target.is_implicit_VR, little_endian=True, enforce_file_format=True
    )
    return buffer.getvalue()


def _frame_count(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    try:
        return max(int(value), 1) if value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise TranscodeError(f"invalid Number of Frames {value!r}") from exc


def _image(ds: Dataset) -> tuple[int, int, int, int, int, int]:
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


def _container(bits_allocated: int, signed: int) -> np.dtype:
    if bits_allocated not in (8, 16, 32, 64):
        raise TranscodeError(f"cannot handle Bits Allocated {bits_allocated} here")
    return np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")


def is_lossy(ds: Dataset) -> bool:
    """True when ``ds`` arrived lossy: a lossy transfer syntax, or *Lossy Image
    Compression* "01" (the flag survives lossless re-encodes)."""
    return _lossy_reason(ds) is not None


def _lossy_reason(ds: Dataset) -> str | None:
    uid = _syntax(ds)
    if uid in LOSSY_SYNTAXES:
        return f"its transfer syntax {uid.name} ({uid}) is lossy"
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        return "Lossy Image Compression (0028,2110) is 01"
    return None


def encodable_targets() -> set[UID]:
    """The lossless compressed syntaxes this environment can encode."""
    return set(_encodable())


@cache
def _encodable() -> frozenset[UID]:
    out: set[UID] = set()
    for uid in LOSSLESS_TARGETS:
        if uid in _HTJ2K_LOSSLESS:
            if _htj2k_encodes(uid):
                out.add(uid)
        elif any(_plugin_available(uid, p) for p in _PLUGINS[uid]):
            out.add(uid)
    return frozenset(out)


def _htj2k_encodes(uid: UID) -> bool:
    """Whether OpenJPH (imagecodecs) is here and writes what ``uid`` requires:
    probed once with a small image (older imagecodecs have no TLM / tile-part
    options, so no conforming HTJ2K RPCL)."""
    if imagecodecs is None or not getattr(imagecodecs, "HTJ2K", None):
        return False
    if not imagecodecs.HTJ2K.available:
        return False
    try:
        _encode_htj2k([np.arange(96 * 80, dtype=np.uint16).reshape(96, 80)], uid)
    except Exception:
        return False
    return True


def _plugin_available(uid: UID, plugin: str) -> bool:
    try:
        return plugin in get_encoder(uid).available_plugins
    except (NotImplementedError, ValueError):
        return False


def _decodable(uid: UID) -> bool:
    if uid in _NATIVE_SOURCES:
        return True
    try:
        if get_decoder(uid).is_available:
            return True
    except (NotImplementedError, ValueError):
        pass
    return uid in _HTJ2K_ALL and imagecodecs is not None and imagecodecs.HTJ2K.available


# --------------------------------------------------------------------------- codestream checks


def _check_j2k(cs: bytes) -> str | None:
    """Why a JPEG 2000 / HTJ2K codestream is structurally broken, or None.

    OpenJPEG decodes some truncated or damaged codestreams without error; this
    walks the main header and the tile-part chain (Psot lengths) to the EOC
    marker, which catches truncation and damaged markers.  Errors inside the
    entropy-coded data cannot be seen here (JPEG 2000 has no checksum)."""
    if cs[:4] == b"\x00\x00\x00\x0c" or cs[4:8] == b"jP  ":
        return None  # a JP2 file rather than a codestream: left to the decoder
    if cs[:4] != b"\xff\x4f\xff\x51":
        return "does not start with the SOC and SIZ markers"
    end = len(cs)
    pos = 2
    while True:  # main header: marker segments up to the first SOT
        if pos + 4 > end:
            return "main header truncated"
        marker = int.from_bytes(cs[pos : pos + 2], "big")
        if marker == 0xFF90:
            break
        if marker >> 8 != 0xFF or marker < 0xFF30:
            return f"bad marker 0x{marker:04X} in the main header at byte {pos}"
        pos += 2 + int.from_bytes(cs[pos + 2 : pos + 4], "big")
    while True:  # tile-parts: SOT Lsot Isot Psot TPsot TNsot
        if pos + 12 > end:
            return "tile-part header truncated"
        psot = int.from_bytes(cs[pos + 6 : pos + 10], "big")
        if psot == 0:  # the last tile-part runs to EOC
            return None if _unpadded(cs).endswith(b"\xff\xd9") else "no EOC marker"
        if psot < 14 or pos + psot > end:
            return f"tile-part at byte {pos} ({psot} bytes) runs past the end ({end} bytes)"
        pos += psot
        rest = _unpadded(cs[pos:])
        if rest.startswith(b"\xff\xd9") or not rest:
            return None
        if not rest.startswith(b"\xff\x90"):
            return f"no SOT or EOC marker after the tile-part ending at byte {pos}"


def _unpadded(cs: bytes) -> bytes:
    """``cs`` without the padding after its last marker (fragments are padded
    to an even length, with 00 or with FF fill bytes)."""
    return cs.rstrip(b"\x00\xff")


def _check_jpeg(cs: bytes) -> str | None:
    if not cs.startswith(b"\xff\xd8"):
        return "does not start with the SOI marker"
    if not _unpadded(cs).endswith(b"\xff\xd9"):
        return "truncated: no EOI marker at the end"
    return None


def _check_rle(cs: bytes, expected_segments: int) -> str | None:
    if len(cs) < 64:
        return "RLE header truncated"
    header = np.frombuffer(cs[:64], "<u4")
    count = int(header[0])
    if count != expected_segments:
        return f"{count} RLE segments, {expected_segments} expected"
    offsets = [int(o) for o in header[1 : count + 1]]
    if offsets[0] != 64 or offsets != sorted(offsets) or offsets[-1] >= len(cs):
        return f"bad RLE segment offsets {offsets} for {len(cs)} bytes"
    return None


def _check_frames(ds: Dataset, uid: UID, count: int) -> None:
    if uid in JPEG2000TransferSyntaxes:
        check = _check_j2k
    elif uid in JPEGTransferSyntaxes or uid in JPEGLSTransferSyntaxes:
        check = _check_jpeg
    elif uid == RLELossless:
        _, _, samples, bits, _, _ = _image(ds)
        segments = samples * max(bits // 8, 1)

        def check(cs: bytes) -> str | None:
            return _check_rle(cs, segments)

    else:
        return
    for index, frame in enumerate(_encapsulated_frames(ds, count), start=1):
        reason = check(frame)
        if reason:
            raise TranscodeError(f"{uid.name} frame {index} of {count} is corrupt: {reason}")


def _encapsulated_frames(ds: Dataset, count: int) -> Iterator[bytes]:
    eot = None
    if all(k in ds for k in _EXTENDED_OFFSETS):
        eot = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count, extended_offsets=eot))
    except Exception as exc:
        raise TranscodeError(f"encapsulated Pixel Data is malformed: {exc}") from exc
    if len(frames) != count:
        raise TranscodeError(f"{len(frames)} encapsulated frames, Number of Frames is {count}")
    yield from frames


# --------------------------------------------------------------------------- decoding


class _Decoded:
    """All frames of an image, as pydicom returns them, in the dataset's
    container dtype, plus the photometric interpretation of those values."""

    def __init__(self, frames: list[np.ndarray], photometric: str) -> None:
        self.frames = frames
        self.photometric = photometric

    def array(self) -> np.ndarray:
        return np.stack(self.frames)


def _decode(ds: Dataset, *, strict: bool = True, as_rgb: bool | None = None) -> _Decoded:
    """Decode every frame of ``ds`` (not modified).

    ``as_rgb`` None: YCbCr is converted to RGB only for lossy JPEG, where the
    conversion is part of the codec; elsewhere values stay as stored (an
    exact YBR_FULL_422 → YBR_FULL expansion for native data).  ``strict``
    adds the codestream structure checks."""
    if "PixelData" not in ds:
        raise TranscodeError("the object has no Pixel Data (7FE0,0010)")
    uid = _syntax(ds)
    count = _frame_count(ds)
    rows, columns, samples, bits, _, signed = _image(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if as_rgb is None:
        as_rgb = uid in _JPEG_LOSSY
    if uid.is_encapsulated and strict:
        _check_frames(ds, uid, count)
    frames: list[np.ndarray] = []
    try:
        decoder = get_decoder(uid)
        pydicom_can = decoder.is_available
    except (NotImplementedError, ValueError):
        decoder, pydicom_can = None, False
    if not pydicom_can:
        if uid in _HTJ2K_ALL and imagecodecs is not None and imagecodecs.HTJ2K.available:
            return _decode_htj2k_openjph(ds, count)
        raise TranscodeError(f"no decoder available here for {uid.name} ({uid})")
    preferred = _DECODER_PLUGIN.get(uid, "")
    plugin = preferred if preferred in decoder.available_plugins else ""
    try:
        for arr, info in decoder.iter_array(ds, as_rgb=as_rgb, decoding_plugin=plugin):
            frames.append(arr)
            photometric = str(info.get("photometric_interpretation", photometric))
            if len(frames) > count:
                break
    except TranscodeError:
        raise
    except Exception as exc:  # codec errors come as RuntimeError, ValueError...
        raise TranscodeError(
            f"{uid.name} pixel data does not decode (frame {len(frames) + 1} of {count}): {exc}"
        ) from exc
    if len(frames) != count:
        if strict or len(frames) < count:
            raise TranscodeError(f"{len(frames)} frames decoded, Number of Frames is {count}")
        frames = frames[:count]
    if bits == 1:
        return _Decoded(frames, photometric)
    dtype = _container(bits, signed)
    shape = (rows, columns) if samples == 1 else (rows, columns, samples)
    out = []
    for index, arr in enumerate(frames, start=1):
        if arr.shape != shape:
            raise TranscodeError(f"frame {index} decodes to {arr.shape}, the header says {shape}")
        out.append(_to_container(arr, dtype, index))
    return _Decoded(out, photometric)


def _to_container(arr: np.ndarray, dtype: np.dtype, index: int) -> np.ndarray:
    if arr.dtype == dtype:
        return arr
    if arr.size and not (
        np.iinfo(dtype).min <= int(arr.min()) and int(arr.max()) <= np.iinfo(dtype).max
    ):
        raise TranscodeError(
            f"frame {index} decodes to values {int(arr.min())}..{int(arr.max())}, "
            f"which do not fit Bits Allocated / Pixel Representation ({dtype})"
        )
    return arr.astype(dtype)


_UNRAISABLE_LOCK = threading.Lock()


@contextmanager
def _trap_unraisable() -> Iterator[list[BaseException]]:
    """Collect the exceptions Cython code reports as "Exception ignored" in
    this thread (imagecodecs' OpenJPH wrapper does so for decoding errors)."""
    caught: list[BaseException] = []
    me = threading.get_ident()
    with _UNRAISABLE_LOCK:
        previous = sys.unraisablehook

        def hook(unraisable) -> None:  # noqa: ANN001 - sys.UnraisableHookArgs
            if threading.get_ident() == me and unraisable.exc_value is not None:
                caught.append(unraisable.exc_value)
            else:
                previous(unraisable)

        sys.unraisablehook = hook
        try:
            yield caught
        finally:
            sys.unraisablehook = previous


def _decode_htj2k_openjph(ds: Dataset, count: int) -> _Decoded:
    """HTJ2K frames decoded by OpenJPH (imagecodecs), for when pydicom has no
    HTJ2K decoder.  The structure check always runs here (OpenJPH's errors do
    not surface as exceptions), and the swallowed errors are trapped."""
    uid = _syntax(ds)
    rows, columns, samples, bits, _, signed = _image(ds)
    dtype = _container(bits, signed)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    frames = []
    for index, frame in enumerate(_encapsulated_frames(ds, count), start=1):
        what = f"{uid.name} frame {index} of {count}"
        reason = _check_j2k(frame)
        if reason:
            raise TranscodeError(f"{what} is corrupt: {reason}")
        with _trap_unraisable() as errors:
            try:
                arr = imagecodecs.htj2k_decode(frame, planar=False)
            except Exception as exc:
                raise TranscodeError(f"{what} does not decode: {exc}") from exc
        if errors:
            raise TranscodeError(f"{what} does not decode: OpenJPH: {errors[0]}")
        params = get_j2k_parameters(frame)
        precision = int(params.get("precision", arr.dtype.itemsize * 8))
        if bool(params.get("is_signed", signed)) != bool(signed) and precision < bits:
            # the codestream's signedness is wrong for the dataset: reinterpret
            # the low `precision` bits, as pydicom does
            wide = arr.astype(dtype)
            shift = bits - precision
            arr = (wide << shift) >> shift
        shape = (rows, columns) if samples == 1 else (rows, columns, samples)
        if arr.shape != shape:
            raise TranscodeError(f"{what} decodes to {arr.shape}, the header says {shape}")
        frames.append(_to_container(arr, dtype, index))
        if samples == 3 and photometric in ("YBR_RCT", "YBR_ICT"):
            photometric = "RGB"  # OpenJPH applies the inverse colour transform
    return _Decoded(frames, photometric)


def decoded_pixels(ds: Dataset) -> np.ndarray:
    """Every frame of ``ds`` decoded: shape (frames, rows, columns[, samples]),
    the dataset's container dtype, values as stored (no colour conversion
    except what a lossy JPEG codec does itself).  ``ds`` is not modified.
    Raises :class:`TranscodeError`."""
    return _decode(ds).array()


def _nativise_icons(ds: Dataset, source: UID) -> None:
    """Icon Image Sequence items with encapsulated pixel data get native
    pixel data (or are dropped when they do not decode: the icon is Type 3)."""
    icons = ds.get("IconImageSequence")
    if not icons or not source.is_encapsulated:
        return
    for item in icons:
        if "PixelData" not in item or not item["PixelData"].is_undefined_length:
            continue
        try:
            tmp = Dataset()
            tmp.update(item)
            tmp.file_meta = pydicom.dataset.FileMetaDataset()
            tmp.file_meta.TransferSyntaxUID = source
            decoded = _decode(tmp, strict=False)
        except TranscodeError:
            del ds.IconImageSequence
            return
        _set_native(item, decoded)


def _set_native(ds: Dataset, decoded: _Decoded) -> None:
    if int(ds.BitsAllocated) == 1:  # frames need not start on a byte boundary
        data = pack_bits(np.concatenate([f.ravel() for f in decoded.frames]), pad=False)
    else:
        data = b"".join(f.tobytes() for f in decoded.frames)
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    elem = ds["PixelData"]
    elem.VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    elem.is_undefined_length = False
    ds.PhotometricInterpretation = decoded.photometric
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        ds.PlanarConfiguration = 0
    if "NumberOfFrames" in ds or len(decoded.frames) > 1:
        ds.NumberOfFrames = len(decoded.frames)
    _drop_encapsulation_attributes(ds)


def _drop_encapsulation_attributes(ds: Dataset) -> None:
    for keyword in _EXTENDED_OFFSETS:
        if keyword in ds:
            delattr(ds, keyword)
    if _ENCAPSULATED_TOTAL_LENGTH in ds:
        del ds[_ENCAPSULATED_TOTAL_LENGTH]


def decode_dataset(
    ds: Dataset, *, strict: bool = True, _decoded: _Decoded | None = None
) -> Dataset:
    """``ds`` in Explicit VR Little Endian with native pixel data, in place.

    Uncompressed sources keep their pixel bytes (big endian data and the other
    OW / OL / OF / OD / OV values are byte-swapped); compressed pixel data is
    decoded frame by frame.  Lossy JPEG YCbCr comes out RGB (the codec's own
    conversion); everything else keeps its values and photometric
    interpretation (YBR_FULL_422 native data becomes YBR_FULL, JPEG 2000
    YBR_RCT / YBR_ICT becomes RGB).  *Lossy Image Compression* is kept.
    ``strict`` (default) adds codestream structure checks, so corrupt data
    raises :class:`TranscodeError` rather than decoding to garbage.
    """
    uid = _syntax(ds)
    if uid == ExplicitVRBigEndian:
        # pixel values as pydicom reads them (a plain word swap would treat all
        # OW pixel data as 16-bit words: wrong for 32-bit pixels), the other
        # binary values swapped by _swap_words
        decoded = _decoded
        if decoded is None and "PixelData" in ds:
            decoded = _decode(ds, strict=strict, as_rgb=False)
        _swap_words(ds)
        if decoded is not None:
            _set_native(ds, decoded)
    elif uid.is_encapsulated and "PixelData" in ds:
        decoded = _decoded if _decoded is not None else _decode(ds, strict=strict)
        _nativise_icons(ds, uid)
        _set_native(ds, decoded)
    elif uid.is_encapsulated:
        _nativise_icons(ds, uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


# --------------------------------------------------------------------------- encoding


def _check_encodable(ds: Dataset, target: UID, photometric: str) -> None:
    if "PixelData" not in ds:
        raise TranscodeError(f"no Pixel Data (7FE0,0010) to encode as {target.name}")
    if target not in _encodable():
        raise TranscodeError(f"no encoder available here for {target.name} ({target})")
    rows, columns, samples, bits, stored, signed = _image(ds)
    if bits not in (8, 16):
        raise TranscodeError(f"{target.name} is not written here for Bits Allocated {bits}")
    # HTJ2K: the JPEG 2000 rules (PS3.5 8.2.4)
    profile_uid = JPEG2000Lossless if target in _HTJ2K_LOSSLESS else target
    profiles = ENCODING_PROFILES.get(profile_uid)
    if profiles and not any(
        photometric == pi and samples == spp and signed in prs and bits in bas and stored in bss
        for pi, spp, prs, bas, bss in profiles
    ):
        raise TranscodeError(
            f"{target.name} cannot hold {photometric} {samples} sample(s), Bits Allocated "
            f"{bits}, Bits Stored {stored}, Pixel Representation {signed} (PS3.5 section 8.2)"
        )


def _htj2k_options(rows: int, columns: int, target: UID) -> dict:
    # PS3.5 10.18: decompositions such that the base resolution is <= 64 pixels
    needed = math.ceil(math.log2(max(rows, columns) / 64)) if max(rows, columns) > 64 else 0
    options = {"reversible": True, "rgb": False, "resolutions": max(5, needed)}
    if target == HTJ2KLosslessRPCL:
        options["tlm"] = True
        options["tilepart"] = imagecodecs.HTJ2K.TILEPART.RESOLUTIONS
    return options


def j2k_coding_style(cs: bytes) -> dict:
    """Main-header facts of a JPEG 2000 / HTJ2K codestream: ``progression``
    (0 LRCP, 1 RLCP, 2 RPCL, 3 PCRL, 4 CPRL), ``mct``, ``decompositions``,
    ``reversible`` (5/3 wavelet), ``tlm`` and ``ht`` (CAP marker: Part 15)."""
    info = {"tlm": False, "ht": False}
    pos = 2
    while pos + 4 <= len(cs):
        marker = int.from_bytes(cs[pos : pos + 2], "big")
        if marker == 0xFF90:
            break
        length = int.from_bytes(cs[pos + 2 : pos + 4], "big")
        if marker == 0xFF52:  # COD: Scod, SGcod (order, layers x2, mct), SPcod
            info.update(
                progression=cs[pos + 5],
                mct=cs[pos + 8],
                decompositions=cs[pos + 9],
                reversible=cs[pos + 13] == 1,
            )
        elif marker == 0xFF55:
            info["tlm"] = True
        elif marker == 0xFF50:
            info["ht"] = True
        pos += 2 + length
    return info


def _encode_htj2k(frames: list[np.ndarray], target: UID) -> list[bytes]:
    rows, columns = frames[0].shape[:2]
    options = _htj2k_options(rows, columns, target)
    out = []
    for index, frame in enumerate(frames, start=1):
        try:
            out.append(bytes(imagecodecs.htj2k_encode(np.ascontiguousarray(frame), **options)))
        except Exception as exc:
            raise TranscodeError(f"OpenJPH could not encode frame {index}: {exc}") from exc
    info = j2k_coding_style(out[0])
    if info.get("mct") != 0 or not info.get("reversible"):
        raise TranscodeError(f"OpenJPH did not write a reversible codestream without MCT: {info}")
    if target == HTJ2KLosslessRPCL and (info.get("progression") != 2 or not info["tlm"]):
        raise TranscodeError(
            f"OpenJPH did not write RPCL progression with TLM markers, which {target.name} "
            f"requires: {info}"
        )
    return out


# pylibjpeg-openjpeg always uses 6 resolutions, which OpenJPEG refuses for
# images under 32 pixels wide or high
_OPENJPEG_MIN_SIZE = 32


def _encode_small_j2k(frames: list[np.ndarray], bits_stored: int) -> list[bytes]:
    """JPEG 2000 lossless for images under 32 pixels: OpenJPEG through
    imagecodecs, with as many resolutions as the size allows."""
    if imagecodecs is None or not imagecodecs.JPEG2K.available:
        raise TranscodeError("JPEG 2000 Lossless of images under 32 pixels needs imagecodecs")
    rows, columns = frames[0].shape[:2]
    options = {
        "level": 0,
        "reversible": True,
        "mct": False,
        "codecformat": "J2K",
        "bitspersample": bits_stored,
        "resolutions": min(6, int(math.log2(min(rows, columns))) + 1),
    }
    try:
        return [
            bytes(imagecodecs.jpeg2k_encode(np.ascontiguousarray(f), **options)) for f in frames
        ]
    except Exception as exc:
        raise TranscodeError(f"JPEG 2000 Lossless encoding failed: {exc}") from exc


def _encode_small_jls(frames: list[np.ndarray]) -> list[bytes]:
    """JPEG-LS through CharLS in imagecodecs (precision = container size)."""
    out = []
    for frame in frames:
        unsigned = frame.view(frame.dtype.str.replace("i", "u"))  # JPEG-LS is unsigned
        try:
            out.append(bytes(imagecodecs.jpegls_encode(np.ascontiguousarray(unsigned))))
        except Exception as exc:
            raise TranscodeError(f"JPEG-LS Lossless encoding failed: {exc}") from exc
    return out


def _set_encapsulated(ds: Dataset, frames: list[bytes]) -> None:
    """Encapsulate with a Basic Offset Table, or an Extended Offset Table when
    the offsets do not fit in 32 bits (as pydicom's compress does)."""
    total = (len(frames) - 1) * 8 + sum(len(f) for f in frames[:-1])
    if total > 2**32 - 1:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            frames
        )
    else:
        ds.PixelData = encapsulate(frames)
    elem = ds["PixelData"]
    elem.VR = "OB"
    elem.is_undefined_length = True


_IMAGE_PIXEL = (
    "SamplesPerPixel",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def _encoded_scratch(ds: Dataset, target: UID, decoded: _Decoded) -> Dataset:
    """A scratch dataset holding the Image Pixel attributes and the encoded
    Pixel Data (and Extended Offset Table when needed); ``ds`` is untouched,
    so a failure leaves nothing half converted."""
    scratch = Dataset()
    for keyword in _IMAGE_PIXEL:
        if keyword in ds:
            scratch[keyword] = ds[keyword]
    scratch.PhotometricInterpretation = decoded.photometric
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        scratch.PlanarConfiguration = 0  # encoders take (and decoders give) interleaved samples
    if "NumberOfFrames" in ds or len(decoded.frames) > 1:
        scratch.NumberOfFrames = len(decoded.frames)
    rows, columns = decoded.frames[0].shape[:2]
    if target in _HTJ2K_LOSSLESS:
        _set_encapsulated(scratch, _encode_htj2k(decoded.frames, target))
    elif target == JPEG2000Lossless and min(rows, columns) < _OPENJPEG_MIN_SIZE:
        _set_encapsulated(scratch, _encode_small_j2k(decoded.frames, int(ds.BitsStored)))
    else:
        arr = decoded.frames[0] if len(decoded.frames) == 1 else decoded.array()
        plugin = next(p for p in _PLUGINS[target] if _plugin_available(target, p))
        options = {"use_mct": False} if target == JPEG2000Lossless else {}
        try:
            scratch.compress(
                target, arr, encoding_plugin=plugin, generate_instance_uid=False, **options
            )
        except Exception as exc:
            if target != JPEGLSLossless or imagecodecs is None:
                raise TranscodeError(f"{target.name} encoding failed: {exc}") from exc
            # pyjpegls under-sizes its output buffer for tiny images (a few pixels)
            _set_encapsulated(scratch, _encode_small_jls(decoded.frames))
    return scratch


def _encode(ds: Dataset, target: UID, decoded: _Decoded) -> Dataset:
    """Encode ``decoded`` (the pixels of ``ds``) as ``target``, then update ``ds``."""
    source = _syntax(ds)
    _check_encodable(ds, target, decoded.photometric)
    scratch = _encoded_scratch(ds, target, decoded)
    if source == ExplicitVRBigEndian:
        _swap_words(ds)  # the other word-sized values
    _nativise_icons(ds, source)
    _drop_encapsulation_attributes(ds)
    for elem in scratch:
        ds[elem.tag] = elem
    ds.file_meta.TransferSyntaxUID = target
    return ds


def encode_dataset(ds: Dataset, target_uid: str) -> Dataset:
    """``ds`` re-encoded in ``target_uid``, in place (and returned).

    Targets: Explicit / Implicit VR Little Endian (decoding), RLE Lossless,
    JPEG-LS Lossless, JPEG 2000 Lossless, HTJ2K Lossless and HTJ2K Lossless
    RPCL.  Unchanged when already in the target.  Compressed targets refuse
    lossy sources (:class:`LossySource`); *Photometric Interpretation* follows
    the decoded values, *Planar Configuration* becomes 0, *Pixel Data* is OB
    encapsulated with a Basic (or, above 4 GiB, Extended) Offset Table;
    *Lossy Image Compression* is kept as it was.  ``ds`` is only modified once
    the encoding succeeded.  No verification: see :func:`verify_lossless` and
    :func:`transcode`.
    """
    target = UID(target_uid)
    source = _syntax(ds)
    if target == source:
        return ds
    if target in PRODUCIBLE:
        decode_dataset(ds)
        ds.file_meta.TransferSyntaxUID = target
        return ds
    if target not in LOSSLESS_TARGETS:
        raise TranscodeError(f"cannot encode as {target.name} ({target})")
    reason = _lossy_reason(ds)
    if reason:
        raise LossySource(f"not re-encoded as {target.name}: the object arrived lossy ({reason})")
    if "PixelData" not in ds:
        raise TranscodeError(f"no Pixel Data (7FE0,0010) to encode as {target.name}")
    return _encode(ds, target, _decode(ds, as_rgb=False))


# --------------------------------------------------------------------------- verification


def _compare(original: _Decoded, encoded: _Decoded) -> None:
    if len(original.frames) != len(encoded.frames):
        raise TranscodeError(
            f"re-encode is not lossless: {len(encoded.frames)} frames instead of "
            f"{len(original.frames)}"
        )
    for index, (a, b) in enumerate(zip(original.frames, encoded.frames, strict=True), start=1):
        if a.shape != b.shape:
            raise TranscodeError(
                f"re-encode is not lossless: frame {index} is {b.shape} instead of {a.shape}"
            )
        if not np.array_equal(a, b):
            differ = int(np.count_nonzero(a != b))
            raise TranscodeError(
                f"re-encode is not lossless: {differ} sample(s) differ in frame {index}"
            )


def verify_lossless(original_ds: Dataset, encoded_ds: Dataset) -> None:
    """Raise :class:`TranscodeError` unless every frame of ``encoded_ds``
    decodes to exactly the values of ``original_ds`` (neither is modified)."""
    _compare(_decode(original_ds, as_rgb=False), _decode(encoded_ds, as_rgb=False))


# --------------------------------------------------------------------------- Part 10 bytes


def transcode(data: bytes, target_uid: str, *, verify: bool = True) -> bytes:
    """The Part 10 object ``data`` in ``target_uid``, as Part 10 bytes.

    ``data`` itself when already in the target.  Raises :class:`LossySource`
    when the object arrived lossy (lossy syntax or *Lossy Image Compression*
    01): it is never re-encoded, not even decompressed.  Raises
    :class:`TranscodeError` for unsupported targets or images, corrupt or
    undecodable pixel data and, with ``verify`` (default), when the written
    object, read back, does not decode to exactly the original pixels.
    Nothing is returned unless the whole object was converted.
    """
    return _transcode(data, UID(target_uid), verify=verify, lossy_flag_ok=False)


def _transcode(data: bytes, target: UID, *, verify: bool, lossy_flag_ok: bool) -> bytes:
    ds = _read(data)
    source = _syntax(ds)
    if source == target:
        return data
    if target not in TARGETS:
        raise TranscodeError(f"cannot encode as {target.name} ({target})")
    reason = _lossy_reason(ds)
    if reason and not (lossy_flag_ok and source not in LOSSY_SYNTAXES):
        raise LossySource(f"not re-encoded as {target.name}: the object arrived lossy ({reason})")
    if "PixelData" not in ds:
        if target not in PRODUCIBLE:
            raise TranscodeError(f"no Pixel Data (7FE0,0010) to encode as {target.name}")
        return _write(decode_dataset(ds), target)
    original = None
    if verify or source.is_encapsulated or target not in PRODUCIBLE:
        original = _decode(ds, as_rgb=False)
    if target in PRODUCIBLE:
        decode_dataset(ds, _decoded=original)
    else:
        _encode(ds, target, original)
    out = _write(ds, target)
    if verify:
        _compare(original, _decode(_read(out), as_rgb=False))
    return out


# --------------------------------------------------------------------------- retrieval


def producible(stored: str) -> set[str]:
    """Transfer syntaxes an instance stored in ``stored`` can be sent in: the
    stored one; the uncompressed ones when it decodes here; the lossless
    compressed targets this environment encodes when ``stored`` is lossless."""
    uid = UID(stored)
    out: set[str] = {uid}
    if not _decodable(uid):
        return out
    out |= PRODUCIBLE
    if uid in LOSSLESS_SOURCE_SYNTAXES:
        out |= encodable_targets()
    return out


def encode_as(data: bytes, target: str) -> bytes:
    """The Part 10 object ``data`` re-encoded in ``target`` (returned as is
    when already there), for retrieval.  Uncompressed targets decode any
    decodable object, lossy ones included; lossless compressed targets need a
    lossless stored syntax (see :func:`producible`) and are verified
    bit-exact (*Lossy Image Compression* 01 carries over unchanged).  Raises
    ValueError (:class:`TranscodeError`) when it cannot be done."""
    uid = UID(target)
    ds = _read(data)
    stored = _syntax(ds)
    if stored == uid:
        return data
    if uid not in producible(stored):
        raise TranscodeError(f"cannot convert {stored.name} to {uid.name}")
    if uid in PRODUCIBLE:
        return _write(decode_dataset(ds, strict=False), uid)
    return _transcode(data, uid, verify=True, lossy_flag_ok=True)


# --------------------------------------------------------------------------- retrieval

# Bytes per word of the binary VRs whose raw values are byte-swapped between
# the big and the little endian syntaxes (other VRs are decoded by pydicom).
_WORD = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _swap_words(ds: Dataset) -> None:
    """Relabel a big endian dataset's binary values little endian: iterating
    decodes every other element with the big endian encoding, while pydicom
    writes OW / OL / OF / OD / OV bytes as they are, so those are swapped."""
    for elem in ds.iterall():
        size = _WORD.get(elem.VR)
        if size and isinstance(elem.value, bytes) and len(elem.value) % size == 0:
            elem.value = np.frombuffer(elem.value, f">u{size}").astype(f"<u{size}").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # pynetdicom encodes by the dataset's original encoding when it has one
    ds.set_original_encoding(False, True)


_LITTLE_ENDIAN_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def convert_for(ds: Dataset, accepted: Collection[str]) -> Dataset:
    """Make ``ds`` sendable to a receiver that accepts ``accepted`` transfer
    syntaxes for its SOP class (C-GET, C-MOVE, WADO-RS bulk data).

    The stored syntax is kept when accepted; little endian uncompressed data
    is left for the network layer, which re-encodes among those syntaxes;
    big endian and compressed data are decoded to Explicit VR Little Endian
    for receivers of uncompressed data; a receiver that takes only compressed
    syntaxes gets a lossless re-encoding when the data is lossless.  When
    nothing fits, ``ds`` is returned unchanged and the send fails for that
    instance, as it must.
    """
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if not accepted or stored in accepted:
        return ds
    wanted = {UID(ts) for ts in accepted}
    native_ok = bool(wanted & set(_LITTLE_ENDIAN_NATIVE))
    if native_ok:
        if stored in _LITTLE_ENDIAN_NATIVE or stored.is_deflated:
            return ds
        decode_dataset(ds)
        ds.set_original_encoding(False, True)
        return ds
    if not is_lossy(ds):
        for target in LOSSLESS_TARGETS:
            if target in wanted and target in _encodable():
                return encode_dataset(ds, target)
    return ds
