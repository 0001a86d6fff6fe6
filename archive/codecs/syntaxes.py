"""Which transfer syntaxes are native, lossless, lossy, producible or targets,
and whether a dataset arrived lossy.

Pure knowledge about syntaxes: nothing here depends on which codecs this
environment has (see :mod:`archive.codecs.capabilities`).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
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
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGTransferSyntaxes,
    RLELossless,
)

from archive.codecs.errors import TranscodeError

#: syntaxes we can produce from any stored instance whose pixel data decodes
PRODUCIBLE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})

NATIVE_SOURCES = frozenset(
    {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    }
)

#: syntaxes whose pixel data is lossless by construction
LOSSLESS_SOURCE_SYNTAXES = NATIVE_SOURCES | {
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

HTJ2K_LOSSLESS = (HTJ2KLossless, HTJ2KLosslessRPCL)
HTJ2K_ALL = (*HTJ2K_LOSSLESS, UID("1.2.840.10008.1.2.4.203"))

#: the lossless compressed syntaxes :func:`archive.codecs.encode_dataset` knows how to write
LOSSLESS_TARGETS = (RLELossless, JPEGLSLossless, JPEG2000Lossless, *HTJ2K_LOSSLESS)
#: every syntax :func:`archive.codecs.transcode` may be asked for
TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, *LOSSLESS_TARGETS)

LITTLE_ENDIAN_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

JPEG_LOSSY = frozenset(u for u in JPEGTransferSyntaxes if u in LOSSY_SYNTAXES)


def syntax_of(ds: Dataset) -> UID:
    """The dataset's Transfer Syntax UID; refuses objects without one, which
    cannot be decoded or converted."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not tsyntax:
        raise TranscodeError("the object has no Transfer Syntax UID (0002,0010)")
    return UID(str(tsyntax))


def is_lossy(ds: Dataset) -> bool:
    """True when ``ds`` arrived lossy: a lossy transfer syntax, or *Lossy Image
    Compression* "01" (the flag survives lossless re-encodes)."""
    return lossy_reason(ds) is not None


def lossy_reason(ds: Dataset) -> str | None:
    """Why ``ds`` counts as lossy (for the refusal message), or None."""
    uid = syntax_of(ds)
    if uid in LOSSY_SYNTAXES:
        return f"its transfer syntax {uid.name} ({uid}) is lossy"
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        return "Lossy Image Compression (0028,2110) is 01"
    return None
