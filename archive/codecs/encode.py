"""Lossless encoding of a dataset's pixels in a target syntax.

pydicom's ``Dataset.compress`` writes RLE (pylibjpeg-rle, else pydicom's own
encoder), JPEG-LS (pyjpegls / CharLS) and JPEG 2000 (pylibjpeg-openjpeg);
HTJ2K and the tiny images pydicom's plugins refuse go through imagecodecs
(:mod:`archive.codecs.backend`), one codestream per frame, encapsulated
here.  Nothing is verified here: see :mod:`archive.codecs.verify`.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import UID, ExplicitVRBigEndian, JPEG2000Lossless, JPEGLSLossless

from archive.codecs import backend
from archive.codecs.capabilities import ENCODER_PLUGINS, encodable, plugin_available
from archive.codecs.common import IMAGE_PIXEL, drop_encapsulation_attributes, image_pixel
from archive.codecs.decode import (
    Decoded,
    decode_dataset,
    decode_frames,
    nativise_icons,
    swap_words,
)
from archive.codecs.errors import LossySource, TranscodeError
from archive.codecs.syntaxes import (
    HTJ2K_LOSSLESS,
    LOSSLESS_TARGETS,
    PRODUCIBLE,
    lossy_reason,
    syntax_of,
)


def _check_encodable(ds: Dataset, target: UID, photometric: str) -> None:
    if "PixelData" not in ds:
        raise TranscodeError(f"no Pixel Data (7FE0,0010) to encode as {target.name}")
    check_image_pixel(ds, target, photometric)


def check_image_pixel(ds: Dataset, target: UID, photometric: str) -> None:
    """Raise :class:`TranscodeError` unless this environment encodes
    ``target`` and the Image Pixel module of ``ds`` (with ``photometric``,
    the values' interpretation) is one ``target`` can hold.  Needs the header
    only, so a frame-by-frame answer can be refused before it starts."""
    if target not in encodable():
        raise TranscodeError(f"no encoder available here for {target.name} ({target})")
    rows, columns, samples, bits, stored, signed = image_pixel(ds)
    if bits not in (8, 16):
        raise TranscodeError(f"{target.name} is not written here for Bits Allocated {bits}")
    # HTJ2K: the JPEG 2000 rules (PS3.5 8.2.4)
    profile_uid = JPEG2000Lossless if target in HTJ2K_LOSSLESS else target
    profiles = ENCODING_PROFILES.get(profile_uid)
    if profiles and not any(
        photometric == pi and samples == spp and signed in prs and bits in bas and stored in bss
        for pi, spp, prs, bas, bss in profiles
    ):
        raise TranscodeError(
            f"{target.name} cannot hold {photometric} {samples} sample(s), Bits Allocated "
            f"{bits}, Bits Stored {stored}, Pixel Representation {signed} (PS3.5 section 8.2)"
        )


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


def _encoded_scratch(ds: Dataset, target: UID, decoded: Decoded) -> Dataset:
    """A scratch dataset holding the Image Pixel attributes and the encoded
    Pixel Data (and Extended Offset Table when needed); ``ds`` is untouched,
    so a failure leaves nothing half converted."""
    scratch = Dataset()
    for keyword in IMAGE_PIXEL:
        if keyword in ds:
            scratch[keyword] = ds[keyword]
    scratch.PhotometricInterpretation = decoded.photometric
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        scratch.PlanarConfiguration = 0  # encoders take (and decoders give) interleaved samples
    if "NumberOfFrames" in ds or len(decoded.frames) > 1:
        scratch.NumberOfFrames = len(decoded.frames)
    rows, columns = decoded.frames[0].shape[:2]
    if target in HTJ2K_LOSSLESS:
        _set_encapsulated(scratch, backend.encode_htj2k(decoded.frames, target, int(ds.BitsStored)))
    elif target == JPEG2000Lossless and min(rows, columns) < backend.OPENJPEG_MIN_SIZE:
        _set_encapsulated(scratch, backend.encode_small_j2k(decoded.frames, int(ds.BitsStored)))
    else:
        arr = decoded.frames[0] if len(decoded.frames) == 1 else decoded.array()
        plugin = next(p for p in ENCODER_PLUGINS[target] if plugin_available(target, p))
        options = {"use_mct": False} if target == JPEG2000Lossless else {}
        try:
            scratch.compress(
                target, arr, encoding_plugin=plugin, generate_instance_uid=False, **options
            )
        except Exception as exc:
            if target != JPEGLSLossless or not backend.present():
                raise TranscodeError(f"{target.name} encoding failed: {exc}") from exc
            # pyjpegls under-sizes its output buffer for tiny images (a few pixels)
            _set_encapsulated(scratch, backend.encode_small_jls(decoded.frames))
    return scratch


def encode_decoded(ds: Dataset, target: UID, decoded: Decoded) -> Dataset:
    """Encode ``decoded`` (the pixels of ``ds``) as ``target``, then update ``ds``."""
    source = syntax_of(ds)
    _check_encodable(ds, target, decoded.photometric)
    scratch = _encoded_scratch(ds, target, decoded)
    if source == ExplicitVRBigEndian:
        swap_words(ds)  # the other word-sized values
    nativise_icons(ds, source)
    drop_encapsulation_attributes(ds)
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
    the encoding succeeded.  No verification: see
    :func:`archive.codecs.verify_lossless` and :func:`archive.codecs.transcode`.
    """
    target = UID(target_uid)
    source = syntax_of(ds)
    if target == source:
        return ds
    if target in PRODUCIBLE:
        decode_dataset(ds)
        ds.file_meta.TransferSyntaxUID = target
        return ds
    if target not in LOSSLESS_TARGETS:
        raise TranscodeError(f"cannot encode as {target.name} ({target})")
    reason = lossy_reason(ds)
    if reason:
        raise LossySource(f"not re-encoded as {target.name}: the object arrived lossy ({reason})")
    if "PixelData" not in ds:
        raise TranscodeError(f"no Pixel Data (7FE0,0010) to encode as {target.name}")
    return encode_decoded(ds, target, decode_frames(ds, as_rgb=False))
