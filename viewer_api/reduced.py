"""Decode only the resolution a viewport needs (JPEG 2000 and HTJ2K).

A JPEG 2000 codestream is a wavelet pyramid: its image at 1/2, 1/4, 1/8...
of the full size can be decoded without the finer levels, for a fraction of
the time and memory.  A 4096 x 3328 mammogram shown in a 1000-pixel-high
viewport needs level 2 (1024 x 832); decoding all 13.6 megapixels and
throwing three quarters away is what made the first image slow.

:func:`image_file` gives :func:`archive.pixels.render` an
:class:`~archive.pixels.ImageFile` whose frames decode at the coarsest level
that still covers the viewport (never coarser, so the rendered image keeps
its full displayed sharpness), when the stored syntax allows it:

* HTJ2K (Part 15): OpenJPH through ``imagecodecs.htj2k_decode(skipres=n)``;
* JPEG 2000 (Part 1): OpenJPEG through Pillow's ``reduce``, whose samples are
  shifted to 16 bits and offset when signed (undone here).

Grayscale single-sample images only: the rest of the pipeline (Modality LUT,
window, MONOCHROME1) applies unchanged, since the wavelet's low band keeps the
sample scale.  Anything else (colour, other syntaxes, a viewport as large as
the image, a codestream that cannot be read) decodes as before.
"""

from __future__ import annotations

import io
import math
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from archive import pixels
from archive.codecs.codestream import j2k_coding_style, j2k_siz
from archive.codecs.errors import TranscodeError

try:
    import imagecodecs
except ImportError:  # pragma: no cover - a dependency of the archive
    imagecodecs = None

HTJ2K = {"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
JPEG2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


def levels_for(rows: int, columns: int, viewport: tuple[int, int], available: int) -> int:
    """How many resolution levels can be skipped while the decoded image
    still covers the viewport's fitted size (0: decode in full)."""
    width, height = int(viewport[0]), int(viewport[1])
    scale = min(width / columns, height / rows)
    if scale >= 1:
        return 0
    # ceil(n / 2**k) >= n * scale  <=  2**k <= 1 / scale
    return max(0, min(available, math.floor(math.log2(1 / scale))))


class ReducedImageFile(pixels.ImageFile):
    """An ImageFile whose frames decode at a reduced resolution: ``viewport``
    is the size the image will be fitted into."""

    def __init__(
        self, header: Dataset, file: BinaryIO, pixel_at: int | None, viewport: tuple[int, int]
    ) -> None:
        super().__init__(header, file, pixel_at)
        self.viewport = viewport
        #: levels skipped by the last frame decoded (0: full resolution)
        self.skipped = 0

    def decode(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        frame = self.frame_bytes(index)
        try:
            arr = self._reduced(frame)
        except (TranscodeError, ValueError, OSError, RuntimeError):
            arr = None  # not a codestream we can reduce: the full decode decides
        if arr is None:
            self.skipped = 0
            return super().decode(index)
        return arr, {"photometric_interpretation": str(self.header.PhotometricInterpretation)}

    def _reduced(self, frame: bytes) -> np.ndarray | None:
        style = j2k_coding_style(frame)
        siz = j2k_siz(frame)
        if len(siz["precision"]) != 1:
            return None
        levels = levels_for(
            siz["rows"], siz["columns"], self.viewport, int(style.get("decompositions", 0))
        )
        if levels == 0:
            return None
        precision, signed = int(siz["precision"][0]), bool(siz["signed"][0])
        syntax = str(self.syntax)
        if syntax in HTJ2K and imagecodecs is not None and style.get("ht"):
            arr = imagecodecs.htj2k_decode(frame, skipres=levels)
        elif syntax in JPEG2000 or (syntax in HTJ2K and not style.get("ht")):
            arr = _openjpeg_reduced(frame, levels, precision, signed)
        else:
            return None
        self.skipped = levels
        return _in_range(np.asarray(arr), precision, signed)


def _in_range(arr: np.ndarray, precision: int, signed: bool) -> np.ndarray:
    """Samples of a reduced decode back in the codestream's range.

    The low band of a wavelet overshoots a little at sharp edges: below 0 for
    unsigned samples, which an unsigned container returns wrapped around
    (65535 for -1).  Wrapped values are unwrapped, then every value is
    clipped to what ``precision`` bits hold."""
    values = arr.astype(np.int32)
    if arr.dtype.kind == "u" and arr.dtype.itemsize * 8 > precision:
        container = 1 << (arr.dtype.itemsize * 8)
        values = np.where(values >= container // 2, values - container, values)
    if signed:
        low, high = -(1 << (precision - 1)), (1 << (precision - 1)) - 1
    else:
        low, high = 0, (1 << precision) - 1
    return np.clip(values, low, high)


def _openjpeg_reduced(frame: bytes, levels: int, precision: int, signed: bool) -> np.ndarray:
    """A Part 1 codestream decoded by OpenJPEG (Pillow) ``levels`` down.

    Pillow returns precision > 8 as ``I;16`` scaled up to 16 bits, and signed
    samples offset by 2**(precision - 1): both are undone, to the values the
    codestream holds."""
    with Image.open(io.BytesIO(frame)) as image:
        image.reduce = levels  # type: ignore[method-assign,assignment]
        image.load()
        arr = np.asarray(image)
    if precision > 8:
        values = arr.astype(np.int32) >> (16 - precision)
    else:
        values = arr.astype(np.int32) >> (8 - precision) if precision < 8 else arr.astype(np.int32)
    if signed:
        values -= 1 << (precision - 1)
    return values


def image_file(
    header: Dataset, file: BinaryIO, pixel_at: int | None, viewport: tuple[int, int] | None
) -> pixels.ImageFile:
    """The stored image, decoding at reduced resolution when ``viewport``
    is given, the image is a single-sample JPEG 2000 / HTJ2K one and the
    viewport is smaller than it."""
    syntax = str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", ""))
    if (
        viewport is None
        or syntax not in HTJ2K | JPEG2000
        or int(header.get("SamplesPerPixel") or 1) != 1
    ):
        return pixels.ImageFile(header, file, pixel_at)
    return ReducedImageFile(header, file, pixel_at, viewport)
