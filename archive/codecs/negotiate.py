"""Conversion for receivers: which syntaxes an instance can be sent in, and
producing the one a receiver asked for or accepts (WADO-RS, WADO-URI,
C-GET, C-MOVE, routing)."""

from __future__ import annotations

from collections.abc import Collection

from pydicom.dataset import Dataset
from pydicom.uid import UID

from archive.codecs.capabilities import decodable, encodable, encodable_targets
from archive.codecs.common import read_part10, write_part10
from archive.codecs.convert import convert_part10
from archive.codecs.decode import decode_dataset
from archive.codecs.encode import encode_dataset
from archive.codecs.errors import TranscodeError
from archive.codecs.syntaxes import (
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
