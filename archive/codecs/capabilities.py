"""What this environment can decode and encode, probed from pydicom's codec
plugins and imagecodecs, and which plugin to prefer for each syntax."""

from __future__ import annotations

from functools import cache

import numpy as np
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    UID,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGLSLossless,
    JPEGLSTransferSyntaxes,
    RLELossless,
)

from archive.codecs import backend
from archive.codecs.syntaxes import HTJ2K_ALL, HTJ2K_LOSSLESS, LOSSLESS_TARGETS, NATIVE_SOURCES

#: pydicom encoder plugins for the targets pydicom encodes, fastest first
ENCODER_PLUGINS = {
    RLELossless: ("pylibjpeg", "pydicom"),
    JPEGLSLossless: ("pyjpegls",),
    JPEG2000Lossless: ("pylibjpeg",),
}

#: pydicom decoder plugins to use when available: pylibjpeg-rle is ~8x faster
#: than pydicom's own RLE decoder; pylibjpeg-openjpeg rather than Pillow for
#: JPEG 2000 (same speed, and the plugin that decodes HTJ2K)
DECODER_PLUGIN = {
    RLELossless: "pylibjpeg",
    **dict.fromkeys(JPEGLSTransferSyntaxes, "pyjpegls"),
    **dict.fromkeys(JPEG2000TransferSyntaxes, "pylibjpeg"),
}


def encodable_targets() -> set[UID]:
    """The lossless compressed syntaxes this environment can encode."""
    return set(encodable())


@cache
def encodable() -> frozenset[UID]:
    """:func:`encodable_targets`, probed once per process."""
    out: set[UID] = set()
    for uid in LOSSLESS_TARGETS:
        if uid in HTJ2K_LOSSLESS:
            if _htj2k_encodes(uid):
                out.add(uid)
        elif any(plugin_available(uid, p) for p in ENCODER_PLUGINS[uid]):
            out.add(uid)
    return frozenset(out)


def _htj2k_encodes(uid: UID) -> bool:
    """Whether OpenJPH (imagecodecs) is here and writes what ``uid`` requires:
    probed once with a small image (older imagecodecs have no TLM / tile-part
    options, so no conforming HTJ2K RPCL)."""
    if not backend.openjph_available():
        return False
    try:
        backend.encode_htj2k([np.arange(96 * 80, dtype=np.uint16).reshape(96, 80)], uid)
    except Exception:
        return False
    return True


def plugin_available(uid: UID, plugin: str) -> bool:
    """Whether pydicom's encoder for ``uid`` has ``plugin`` installed."""
    try:
        return plugin in get_encoder(uid).available_plugins
    except (NotImplementedError, ValueError):
        return False


def decodable(uid: UID) -> bool:
    """Whether pixel data in ``uid`` can be decoded here."""
    if uid in NATIVE_SOURCES:
        return True
    try:
        if get_decoder(uid).is_available:
            return True
    except (NotImplementedError, ValueError):
        pass
    return uid in HTJ2K_ALL and backend.openjph_available()
