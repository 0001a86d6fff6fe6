"""Conversion for receivers: which syntaxes an instance can be sent in, and
producing the one a receiver asked for or accepts (WADO-RS, WADO-URI,
C-GET, C-MOVE, routing); and, for WADO-RS frames, which HTJ2K syntaxes the
frames of an instance can be re-encoded in one frame at a time."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, HTJ2KLossless, HTJ2KLosslessRPCL

from archive.codecs import backend
from archive.codecs.capabilities import decodable, encodable, encodable_targets
from archive.codecs.common import read_part10, write_part10
from archive.codecs.convert import convert_part10
from archive.codecs.decode import decode_dataset
from archive.codecs.encode import check_image_pixel, encode_dataset
from archive.codecs.errors import TranscodeError
from archive.codecs.syntaxes import (
    HTJ2K_ALL,
    HTJ2K_LOSSLESS,
    LITTLE_ENDIAN_NATIVE,
    LOSSLESS_SOURCE_SYNTAXES,
    LOSSLESS_TARGETS,
    PRODUCIBLE,
    is_lossy,
    syntax_of,
)


def producible(stored: str) -> set[str]:
    """Transfer syntaxes an instance stored in ``stored`` can be sent in: the
    stored one; the uncompressed ones when it decodes here; the lossless
    compressed targets this environment encodes when ``stored`` is lossless."""
    uid = UID(stored)
    out: set[str] = {uid}
    if not decodable(uid):
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
    ds = read_part10(data)
    stored = syntax_of(ds)
    if stored == uid:
        return data
    if uid not in producible(stored):
        raise TranscodeError(f"cannot convert {stored.name} to {uid.name}")
    if uid in PRODUCIBLE:
        return write_part10(decode_dataset(ds, strict=False), uid)
    return convert_part10(data, uid, verify=True, lossy_flag_ok=True)


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
    native_ok = bool(wanted & set(LITTLE_ENDIAN_NATIVE))
    if native_ok:
        if stored in LITTLE_ENDIAN_NATIVE or stored.is_deflated:
            return ds
        decode_dataset(ds)
        ds.set_original_encoding(False, True)
        return ds
    if not is_lossy(ds):
        for target in LOSSLESS_TARGETS:
            if target in wanted and target in encodable():
                return encode_dataset(ds, target)
    return ds


#: HTJ2K (lossless or lossy allowed): a reversible .201 codestream is one of its
HTJ2K_ANY = HTJ2K_ALL[2]

#: what a stored HTJ2K syntax's codestreams also are: a .202 codestream (RPCL,
#: TLM) is a .201 one, and every lossless codestream is a .203 one
HTJ2K_CONFORMS_TO = {
    HTJ2KLossless: frozenset({HTJ2K_ANY}),
    HTJ2KLosslessRPCL: frozenset({HTJ2KLossless, HTJ2K_ANY}),
}

#: photometric interpretations whose values every decoder returns as they are
#: (no colour conversion), so a re-encoded frame holds what the metadata says
_AS_DECODED = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB")


def frame_syntaxes(header: Dataset) -> frozenset[UID]:
    """The HTJ2K syntaxes (image/jphc) the frames of an instance can be sent
    in when they are re-encoded one at a time (WADO-RS frames and pixel
    data), from its header alone: none unless its stored syntax is lossless
    and decodes here, OpenJPH is here, and its Image Pixel module is one
    HTJ2K lossless holds with values decoders return unconverted (grey,
    palette, RGB: a YBR frame would be decoded to RGB, and then the frame
    would not be what the metadata describes).  Data that arrived lossy in a
    lossy syntax is never re-encoded (:func:`producible` neither does it).

    .203 (lossy allowed) is offered when .201 is: the lossless codestream
    written for .201 is one a .203 decoder takes."""
    try:
        stored = syntax_of(header)
        photometric = str(header.get("PhotometricInterpretation", "")).strip()
        if stored not in LOSSLESS_SOURCE_SYNTAXES or photometric not in _AS_DECODED:
            return frozenset()
        if not decodable(stored):
            return frozenset()
        out = set()
        for target in HTJ2K_LOSSLESS:
            try:
                check_image_pixel(header, target, photometric)
            except TranscodeError:
                continue
            out.add(target)
    except TranscodeError:
        return frozenset()
    if HTJ2KLossless in out:
        out.add(HTJ2K_ANY)
    return frozenset(out)


def encode_frame(frame: np.ndarray, target: str, bits_stored: int) -> bytes:
    """One decoded frame (as pydicom returns it: container dtype, samples
    interleaved) as an HTJ2K codestream for ``target`` (one of
    :func:`frame_syntaxes`), reversible, with ``bits_stored`` as its
    precision (see :func:`archive.codecs.backend.encode_htj2k`)."""
    uid = UID(target)
    if uid not in HTJ2K_ALL:
        raise TranscodeError(f"frames are re-encoded in HTJ2K only, not {uid.name}")
    written = HTJ2KLossless if uid == HTJ2K_ANY else uid
    return backend.encode_htj2k([frame], written, bits_stored)[0]
