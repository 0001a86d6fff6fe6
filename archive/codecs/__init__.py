"""Transfer syntax conversion: decoding, lossless re-encoding, verification.

Two users:

* **storage** (per-producer policy, DESIGN "Storage and index"):
  :func:`transcode` turns a received Part 10 object into the producer's
  stored syntax - HTJ2K lossless, JPEG 2000 lossless, JPEG-LS lossless, RLE
  lossless or Explicit VR Little Endian - and verifies the result bit-exact
  before anything is stored.  Data that arrived lossy is never re-encoded
  (:class:`LossySource`); corrupt compressed data is refused
  (:class:`TranscodeError`) and never yields a partly written object.
* **retrieval** (WADO-RS, WADO-URI, C-GET, C-MOVE, routing):
  :func:`producible` says which syntaxes an instance stored in a given
  syntax can be sent in, :func:`encode_as` produces them,
  :func:`convert_for` makes a dataset sendable to a receiver.

One module per job, in the manner of pydicom's ``pixels`` package:

=================  ==========================================================
``errors``         :class:`TranscodeError`, :class:`LossySource`
``syntaxes``       which syntaxes are native / lossless / lossy / targets;
                   :func:`is_lossy`
``common``         Part 10 bytes in and out, Image Pixel module facts
``codestream``     structure checks of JPEG / JPEG-LS / JPEG 2000 / RLE
                   frames, encapsulated frames, :func:`j2k_coding_style`
``backend``        imagecodecs: OpenJPH HTJ2K encode / decode, small images
``capabilities``   what this environment decodes and encodes, plugin choice
``decode``         :func:`decode_dataset`, :func:`decoded_pixels`
``encode``         :func:`encode_dataset`
``verify``         :func:`verify_lossless`
``convert``        :func:`transcode` (whole Part 10 objects, for storage)
``negotiate``      :func:`producible`, :func:`encode_as`, :func:`convert_for`;
                   :func:`frame_syntaxes`, :func:`encode_frame` (WADO-RS
                   frames re-encoded as HTJ2K one at a time)
=================  ==========================================================

Nothing here imports the rest of the archive: the package is pure codec work.
"""

from __future__ import annotations

from archive.codecs.capabilities import encodable_targets
from archive.codecs.codestream import j2k_coding_style
from archive.codecs.convert import transcode
from archive.codecs.decode import decode_dataset, decoded_pixels
from archive.codecs.encode import encode_dataset
from archive.codecs.errors import LossySource, TranscodeError
from archive.codecs.negotiate import (
    HTJ2K_CONFORMS_TO,
    convert_for,
    encode_as,
    encode_frame,
    frame_syntaxes,
    producible,
)
from archive.codecs.syntaxes import (
    LOSSLESS_SOURCE_SYNTAXES,
    LOSSLESS_TARGETS,
    LOSSY_SYNTAXES,
    PRODUCIBLE,
    TARGETS,
    is_lossy,
)
from archive.codecs.verify import verify_lossless

__all__ = [
    "HTJ2K_CONFORMS_TO",
    "LOSSLESS_SOURCE_SYNTAXES",
    "LOSSLESS_TARGETS",
    "LOSSY_SYNTAXES",
    "PRODUCIBLE",
    "TARGETS",
    "LossySource",
    "TranscodeError",
    "convert_for",
    "decode_dataset",
    "decoded_pixels",
    "encodable_targets",
    "encode_as",
    "encode_dataset",
    "encode_frame",
    "frame_syntaxes",
    "is_lossy",
    "j2k_coding_style",
    "producible",
    "transcode",
    "verify_lossless",
]
