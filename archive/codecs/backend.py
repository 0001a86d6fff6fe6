"""The codecs pydicom does not provide, through imagecodecs (one optional
import, here only).

* HTJ2K with OpenJPH: ``imagecodecs.htj2k_encode`` one codestream per frame,
  reversible (5/3 wavelet), without colour transform (RGB stays RGB), in
  RPCL progression order (OpenJPH's default, checked after encoding) with
  enough decompositions for a base resolution <= 64 pixels; .202
  additionally carries TLM markers and one tile-part per resolution, as
  PS3.5 10.18 asks for.  The component precision is *Bits Stored* (a
  12-bit image has a 12-bit codestream): imagecodecs' OpenJPH wrapper only
  writes the container size (8 or 16 bits), so unsigned samples are offset
  before encoding so that OpenJPH's DC level shift (2**(container - 1)) is
  the one of *Bits Stored* (2**(bits - 1)), and the SIZ marker then says
  *Bits Stored* (see :func:`encode_htj2k`).
* HTJ2K decoding with OpenJPH, used only when pydicom has no HTJ2K decoder:
  imagecodecs 2026.3.6's ``htj2k_decode`` swallows OpenJPH's errors (they
  are printed as "Exception ignored" and a partly decoded image is
  returned), so those swallowed errors are trapped here.
* JPEG 2000 (OpenJPEG) and JPEG-LS (CharLS) for tiny images that pydicom's
  encoder plugins refuse or mishandle.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from pydicom.uid import UID, HTJ2KLosslessRPCL

from archive.codecs.codestream import j2k_coding_style, with_j2k_precision
from archive.codecs.errors import TranscodeError

try:  # OpenJPH: the only HTJ2K encoder available to Python here
    import imagecodecs
except ImportError:  # pragma: no cover - a dependency, but keep decoding working without it
    imagecodecs = None

# pylibjpeg-openjpeg always uses 6 resolutions, which OpenJPEG refuses for
# images under 32 pixels wide or high
OPENJPEG_MIN_SIZE = 32


def present() -> bool:
    """Whether imagecodecs is installed at all."""
    return imagecodecs is not None


def openjph_available() -> bool:
    """Whether imagecodecs was built with OpenJPH (HTJ2K)."""
    return (
        imagecodecs is not None
        and bool(getattr(imagecodecs, "HTJ2K", None))
        and bool(imagecodecs.HTJ2K.available)
    )


def _htj2k_options(rows: int, columns: int, target: UID) -> dict:
    # PS3.5 10.18: decompositions such that the base resolution is <= 64 pixels
    needed = math.ceil(math.log2(max(rows, columns) / 64)) if max(rows, columns) > 64 else 0
    options = {"reversible": True, "rgb": False, "resolutions": max(5, needed)}
    if target == HTJ2KLosslessRPCL:
        options["tlm"] = True
        options["tilepart"] = imagecodecs.HTJ2K.TILEPART.RESOLUTIONS
    return options


def htj2k_precision(frames: list[np.ndarray], bits_stored: int | None) -> int:
    """The component precision to write: ``bits_stored`` when every sample
    fits in it (unsigned 0..2**bits - 1, signed two's complement), else the
    container size, so that values above *Bits Stored* are kept rather than
    clipped (a lossless encoder never changes a value)."""
    container = frames[0].dtype.itemsize * 8
    if not bits_stored or not 1 <= bits_stored < container:
        return container
    if frames[0].dtype.kind == "i":
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    for frame in frames:
        if frame.size and (int(frame.min()) < low or int(frame.max()) > high):
            return container
    return bits_stored


def _dc_offset(frame: np.ndarray, precision: int) -> np.ndarray:
    """Unsigned samples moved so that OpenJPH's level shift for the container
    size leaves the values the level shift of ``precision`` gives: x -
    2**(precision - 1) = (x + offset) - 2**(container - 1).  Signed samples
    are not level shifted, so they go as they are."""
    container = frame.dtype.itemsize * 8
    if frame.dtype.kind == "i" or precision >= container:
        return frame
    offset = (1 << (container - 1)) - (1 << (precision - 1))
    return frame + frame.dtype.type(offset)  # at most 2**(c-1) + 2**(p-1) - 1: no overflow


def encode_htj2k(
    frames: list[np.ndarray], target: UID, bits_stored: int | None = None
) -> list[bytes]:
    """One HTJ2K codestream per frame, checked to be what ``target`` requires,
    declaring ``bits_stored`` as the component precision (the container size
    when not given, or when a sample does not fit: :func:`htj2k_precision`)."""
    rows, columns = frames[0].shape[:2]
    options = _htj2k_options(rows, columns, target)
    precision = htj2k_precision(frames, bits_stored)
    signed = frames[0].dtype.kind == "i"
    out = []
    for index, frame in enumerate(frames, start=1):
        try:
            coded = imagecodecs.htj2k_encode(
                np.ascontiguousarray(_dc_offset(frame, precision)), **options
            )
        except Exception as exc:
            raise TranscodeError(f"OpenJPH could not encode frame {index}: {exc}") from exc
        out.append(with_j2k_precision(bytes(coded), precision, signed))
    info = j2k_coding_style(out[0])
    if info.get("mct") != 0 or not info.get("reversible"):
        raise TranscodeError(f"OpenJPH did not write a reversible codestream without MCT: {info}")
    if target == HTJ2KLosslessRPCL and (info.get("progression") != 2 or not info["tlm"]):
        raise TranscodeError(
            f"OpenJPH did not write RPCL progression with TLM markers, which {target.name} "
            f"requires: {info}"
        )
    return out


def encode_small_j2k(frames: list[np.ndarray], bits_stored: int) -> list[bytes]:
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


def encode_small_jls(frames: list[np.ndarray]) -> list[bytes]:
    """JPEG-LS through CharLS in imagecodecs (precision = container size)."""
    out = []
    for frame in frames:
        unsigned = frame.view(frame.dtype.str.replace("i", "u"))  # JPEG-LS is unsigned
        try:
            out.append(bytes(imagecodecs.jpegls_encode(np.ascontiguousarray(unsigned))))
        except Exception as exc:
            raise TranscodeError(f"JPEG-LS Lossless encoding failed: {exc}") from exc
    return out


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


def decode_htj2k_frame(frame: bytes, what: str) -> np.ndarray:
    """One HTJ2K codestream decoded by OpenJPH (interleaved samples); raises
    :class:`TranscodeError`, naming ``what``, for errors OpenJPH reports or
    that imagecodecs swallows.  Check the structure first: see
    :func:`archive.codecs.codestream.check_j2k`."""
    with _trap_unraisable() as errors:
        try:
            arr = imagecodecs.htj2k_decode(frame, planar=False)
        except Exception as exc:
            raise TranscodeError(f"{what} does not decode: {exc}") from exc
    if errors:
        raise TranscodeError(f"{what} does not decode: OpenJPH: {errors[0]}")
    return arr
