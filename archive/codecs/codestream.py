"""Codestream structure checks and facts, without decoding.

Some decoders (OpenJPEG, OpenJPH) return an image for truncated or damaged
data; the checks here walk the markers of each frame so that corrupt data is
refused instead of decoding to garbage.  Also: splitting encapsulated Pixel
Data into frames, and reading the coding style of a JPEG 2000 / HTJ2K main
header (to check what an encoder wrote).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from archive.codecs.common import EXTENDED_OFFSETS, image_pixel
from archive.codecs.errors import TranscodeError


def check_j2k(cs: bytes) -> str | None:
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


def check_frames(ds: Dataset, uid: UID, count: int) -> None:
    """Raise :class:`TranscodeError` for the first structurally corrupt frame
    of ``ds`` (encapsulated in ``uid``); syntaxes without a check pass."""
    if uid in JPEG2000TransferSyntaxes:
        check = check_j2k
    elif uid in JPEGTransferSyntaxes or uid in JPEGLSTransferSyntaxes:
        check = _check_jpeg
    elif uid == RLELossless:
        _, _, samples, bits, _, _ = image_pixel(ds)
        segments = samples * max(bits // 8, 1)

        def check(cs: bytes) -> str | None:
            return _check_rle(cs, segments)

    else:
        return
    for index, frame in enumerate(encapsulated_frames(ds, count), start=1):
        reason = check(frame)
        if reason:
            raise TranscodeError(f"{uid.name} frame {index} of {count} is corrupt: {reason}")


def encapsulated_frames(ds: Dataset, count: int) -> Iterator[bytes]:
    """The ``count`` frames of encapsulated Pixel Data, using the Extended
    Offset Table when there is one; a frame count mismatch is corruption."""
    eot = None
    if all(k in ds for k in EXTENDED_OFFSETS):
        eot = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count, extended_offsets=eot))
    except Exception as exc:
        raise TranscodeError(f"encapsulated Pixel Data is malformed: {exc}") from exc
    if len(frames) != count:
        raise TranscodeError(f"{len(frames)} encapsulated frames, Number of Frames is {count}")
    yield from frames


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


#: SIZ marker segment (ISO/IEC 15444-1 A.5.1): after SOC, Lsiz, Rsiz, eight
#: 32-bit sizes and offsets, Csiz, then Ssiz XRsiz YRsiz per component
_SIZ_CSIZ = 40
_SIZ_COMPONENTS = 42


def j2k_siz(cs: bytes) -> dict:
    """The image of a JPEG 2000 / HTJ2K codestream as its SIZ marker declares
    it: ``columns``, ``rows`` and, per component, ``precision`` (bits, 1-38)
    and ``signed`` (lists, one entry per component).  Raises
    :class:`TranscodeError` when the codestream does not start with SOC, SIZ.

    Why: *Bits Stored* and *Pixel Representation* should agree with what the
    codestream declares (the JPEG 2000 rules of PS3.5 section 8.2), which
    decoders use for the DC level shift and the range of what they return."""
    if cs[:4] != b"\xff\x4f\xff\x51" or len(cs) < _SIZ_COMPONENTS:
        raise TranscodeError("not a JPEG 2000 codestream: no SOC and SIZ markers")
    field = int.from_bytes
    count = field(cs[_SIZ_CSIZ : _SIZ_CSIZ + 2], "big")
    end = _SIZ_COMPONENTS + 3 * count
    if count == 0 or len(cs) < end or 4 + field(cs[4:6], "big") < end:
        raise TranscodeError("the SIZ marker segment is truncated")
    ssiz = [cs[_SIZ_COMPONENTS + 3 * k] for k in range(count)]
    return {
        "columns": field(cs[8:12], "big") - field(cs[16:20], "big"),
        "rows": field(cs[12:16], "big") - field(cs[20:24], "big"),
        "precision": [(s & 0x7F) + 1 for s in ssiz],
        "signed": [bool(s & 0x80) for s in ssiz],
    }


def with_j2k_precision(cs: bytes, precision: int, signed: bool) -> bytes:
    """``cs`` with every component's precision and signedness in SIZ (Ssiz)
    set to ``precision`` / ``signed``; nothing else is changed.

    Only meaningful when the coded values already are those of that
    precision (see :func:`archive.codecs.backend.encode_htj2k`): a decoder
    adds 2**(precision - 1) to unsigned components after the inverse
    transform, so the encoder must have been given values shifted to match."""
    if not 1 <= precision <= 38:
        raise TranscodeError(f"a JPEG 2000 component precision is 1-38 bits, not {precision}")
    count = len(j2k_siz(cs)["precision"])
    out = bytearray(cs)
    for k in range(count):
        out[_SIZ_COMPONENTS + 3 * k] = (0x80 if signed else 0) | (precision - 1)
    return bytes(out)
