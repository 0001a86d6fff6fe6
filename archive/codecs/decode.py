"""Decoding every syntax producers send, and making a dataset native.

The uncompressed ones (implicit / explicit little endian, explicit big
endian, deflated), RLE, JPEG baseline / extended / lossless (processes 14
and 14 SV1), JPEG-LS lossless and near-lossless, JPEG 2000 lossless and
lossy, HTJ2K (.201 / .202 / .203).  pydicom's decoders (plugins
pylibjpeg-libjpeg, -openjpeg, -rle, pyjpegls) do the work; HTJ2K goes through
OpenJPEG (pylibjpeg-openjpeg) and falls back to OpenJPH (see
:mod:`archive.codecs.backend`) only when pydicom has no HTJ2K decoder; that
path always runs the codestream structure check.

Pixel values are compared as pydicom returns them: unused high bits (above
*Bits Stored*) are cleared / sign-extended, so they are not preserved by a
re-encode (retired overlays in high bits are the only known use).
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pack_bits
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from archive.codecs import backend
from archive.codecs.capabilities import DECODER_PLUGIN
from archive.codecs.codestream import check_frames, check_j2k, encapsulated_frames
from archive.codecs.common import (
    container_dtype,
    drop_encapsulation_attributes,
    frame_count,
    image_pixel,
)
from archive.codecs.errors import TranscodeError
from archive.codecs.syntaxes import HTJ2K_ALL, JPEG_LOSSY, syntax_of


class Decoded:
    """All frames of an image, as pydicom returns them, in the dataset's
    container dtype, plus the photometric interpretation of those values."""

    def __init__(self, frames: list[np.ndarray], photometric: str) -> None:
        self.frames = frames
        self.photometric = photometric

    def array(self) -> np.ndarray:
        return np.stack(self.frames)


def decode_frames(ds: Dataset, *, strict: bool = True, as_rgb: bool | None = None) -> Decoded:
    """Decode every frame of ``ds`` (not modified).

    ``as_rgb`` None: YCbCr is converted to RGB only for lossy JPEG, where the
    conversion is part of the codec; elsewhere values stay as stored (an
    exact YBR_FULL_422 → YBR_FULL expansion for native data).  ``strict``
    adds the codestream structure checks."""
    if "PixelData" not in ds:
        raise TranscodeError("the object has no Pixel Data (7FE0,0010)")
    uid = syntax_of(ds)
    count = frame_count(ds)
    rows, columns, samples, bits, _, signed = image_pixel(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if as_rgb is None:
        as_rgb = uid in JPEG_LOSSY
    if uid.is_encapsulated and strict:
        check_frames(ds, uid, count)
    frames: list[np.ndarray] = []
    try:
        decoder = get_decoder(uid)
        pydicom_can = decoder.is_available
    except (NotImplementedError, ValueError):
        decoder, pydicom_can = None, False
    if not pydicom_can:
        if uid in HTJ2K_ALL and backend.openjph_available():
            return _decode_htj2k_openjph(ds, count)
        raise TranscodeError(f"no decoder available here for {uid.name} ({uid})")
    preferred = DECODER_PLUGIN.get(uid, "")
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
        return Decoded(frames, photometric)
    dtype = container_dtype(bits, signed)
    shape = (rows, columns) if samples == 1 else (rows, columns, samples)
    out = []
    for index, arr in enumerate(frames, start=1):
        if arr.shape != shape:
            raise TranscodeError(f"frame {index} decodes to {arr.shape}, the header says {shape}")
        out.append(_to_container(arr, dtype, index))
    return Decoded(out, photometric)


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


def _decode_htj2k_openjph(ds: Dataset, count: int) -> Decoded:
    """HTJ2K frames decoded by OpenJPH (imagecodecs), for when pydicom has no
    HTJ2K decoder.  The structure check always runs here (OpenJPH's errors do
    not surface as exceptions), and the swallowed errors are trapped."""
    uid = syntax_of(ds)
    rows, columns, samples, bits, _, signed = image_pixel(ds)
    dtype = container_dtype(bits, signed)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    frames = []
    for index, frame in enumerate(encapsulated_frames(ds, count), start=1):
        what = f"{uid.name} frame {index} of {count}"
        reason = check_j2k(frame)
        if reason:
            raise TranscodeError(f"{what} is corrupt: {reason}")
        arr = backend.decode_htj2k_frame(frame, what)
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
    return Decoded(frames, photometric)


def decoded_pixels(ds: Dataset) -> np.ndarray:
    """Every frame of ``ds`` decoded: shape (frames, rows, columns[, samples]),
    the dataset's container dtype, values as stored (no colour conversion
    except what a lossy JPEG codec does itself).  ``ds`` is not modified.
    Raises :class:`TranscodeError`."""
    return decode_frames(ds).array()


def nativise_icons(ds: Dataset, source: UID) -> None:
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
            decoded = decode_frames(tmp, strict=False)
        except TranscodeError:
            del ds.IconImageSequence
            return
        _set_native(item, decoded)


def _set_native(ds: Dataset, decoded: Decoded) -> None:
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
    drop_encapsulation_attributes(ds)


# Bytes per word of the binary VRs whose raw values are byte-swapped between
# the big and the little endian syntaxes (other VRs are decoded by pydicom).
_WORD = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def swap_words(ds: Dataset) -> None:
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


def decode_dataset(ds: Dataset, *, strict: bool = True, _decoded: Decoded | None = None) -> Dataset:
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
    uid = syntax_of(ds)
    if uid == ExplicitVRBigEndian:
        # pixel values as pydicom reads them (a plain word swap would treat all
        # OW pixel data as 16-bit words: wrong for 32-bit pixels), the other
        # binary values swapped by swap_words
        decoded = _decoded
        if decoded is None and "PixelData" in ds:
            decoded = decode_frames(ds, strict=strict, as_rgb=False)
        swap_words(ds)
        if decoded is not None:
            _set_native(ds, decoded)
    elif uid.is_encapsulated and "PixelData" in ds:
        decoded = _decoded if _decoded is not None else decode_frames(ds, strict=strict)
        nativise_icons(ds, uid)
        _set_native(ds, decoded)
    elif uid.is_encapsulated:
        nativise_icons(ds, uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
