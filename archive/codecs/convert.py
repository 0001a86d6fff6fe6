"""Whole Part 10 objects converted, for storage: bytes in, bytes out, and
nothing returned unless the whole object was converted (and, by default,
verified bit-exact after being written and read back)."""

from __future__ import annotations

from pydicom.uid import UID

from archive.codecs.common import read_part10, write_part10
from archive.codecs.decode import decode_dataset, decode_frames
from archive.codecs.encode import encode_decoded
from archive.codecs.errors import LossySource, TranscodeError
from archive.codecs.syntaxes import LOSSY_SYNTAXES, PRODUCIBLE, TARGETS, lossy_reason, syntax_of
from archive.codecs.verify import compare_decoded


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
    return convert_part10(data, UID(target_uid), verify=verify, lossy_flag_ok=False)


def convert_part10(data: bytes, target: UID, *, verify: bool, lossy_flag_ok: bool) -> bytes:
    """:func:`transcode`; ``lossy_flag_ok`` lets a lossless syntax carrying
    *Lossy Image Compression* 01 be re-encoded (retrieval: the flag carries
    over, the pixels are what was stored)."""
    ds = read_part10(data)
    source = syntax_of(ds)
    if source == target:
        return data
    if target not in TARGETS:
        raise TranscodeError(f"cannot encode as {target.name} ({target})")
    reason = lossy_reason(ds)
    if reason and not (lossy_flag_ok and source not in LOSSY_SYNTAXES):
        raise LossySource(f"not re-encoded as {target.name}: the object arrived lossy ({reason})")
    if "PixelData" not in ds:
        if target not in PRODUCIBLE:
            raise TranscodeError(f"no Pixel Data (7FE0,0010) to encode as {target.name}")
        return write_part10(decode_dataset(ds), target)
    original = None
    if verify or source.is_encapsulated or target not in PRODUCIBLE:
        original = decode_frames(ds, as_rgb=False)
    if target in PRODUCIBLE:
        decode_dataset(ds, _decoded=original)
    else:
        encode_decoded(ds, target, original)
    out = write_part10(ds, target)
    if verify:
        compare_decoded(original, decode_frames(read_part10(out), as_rgb=False))
    return out
