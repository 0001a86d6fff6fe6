"""Bit-exact verification of a re-encode: every frame must decode to exactly
the original values before a re-encoded object is stored or sent."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from archive.codecs.decode import Decoded, decode_frames
from archive.codecs.errors import TranscodeError


def compare_decoded(original: Decoded, encoded: Decoded) -> None:
    """Raise :class:`TranscodeError` naming the first difference between two
    decoded images (frame count, shape, sample values)."""
    if len(original.frames) != len(encoded.frames):
        raise TranscodeError(
            f"re-encode is not lossless: {len(encoded.frames)} frames instead of "
            f"{len(original.frames)}"
        )
    for index, (a, b) in enumerate(zip(original.frames, encoded.frames, strict=True), start=1):
        if a.shape != b.shape:
            raise TranscodeError(
                f"re-encode is not lossless: frame {index} is {b.shape} instead of {a.shape}"
            )
        if not np.array_equal(a, b):
            differ = int(np.count_nonzero(a != b))
            raise TranscodeError(
                f"re-encode is not lossless: {differ} sample(s) differ in frame {index}"
            )


def verify_lossless(original_ds: Dataset, encoded_ds: Dataset) -> None:
    """Raise :class:`TranscodeError` unless every frame of ``encoded_ds``
    decodes to exactly the values of ``original_ds`` (neither is modified)."""
    compare_decoded(
        decode_frames(original_ds, as_rgb=False), decode_frames(encoded_ds, as_rgb=False)
    )
