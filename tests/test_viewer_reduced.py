"""Reduced-resolution decoding for the viewer (JPEG 2000, HTJ2K) and its
bounded render cache: the decoded image covers the viewport and no more, its
values stay those of the image (in range, close to the full decode averaged
down), and the cache never holds more bytes than it is given."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import HTJ2KLossless, JPEG2000Lossless

from archive import pixels
from archive.codecs import encode_as
from archive.synthetic import StudySpec, modality_preset, write_study
from viewer_api import reduced
from viewer_api.render_cache import RenderCache


def stored(tmp_path: Path, modality: str, syntax: str) -> bytes:
    spec = StudySpec(
        patient_id="P", patient_name="A^B", series=[modality_preset(modality, instances=1)]
    )
    raw = write_study(spec, tmp_path)[0].read_bytes()
    return encode_as(raw, syntax)


def opened(raw: bytes, viewport: tuple[int, int] | None) -> pixels.ImageFile:
    header = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    return reduced.image_file(header, io.BytesIO(raw), raw.index(b"\xe0\x7f\x10\x00"), viewport)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, HTJ2KLossless])
@pytest.mark.parametrize("modality", ["MG", "DX", "CT"])
def test_a_reduced_decode_covers_the_viewport_with_the_images_values(
    tmp_path: Path, syntax: str, modality: str
) -> None:
    raw = stored(tmp_path, modality, syntax)
    full = opened(raw, None).decode(1)[0].astype(np.float64)
    image = opened(raw, (256, 256))
    assert isinstance(image, reduced.ReducedImageFile)
    arr = image.decode(1)[0]
    k = 1 << image.skipped
    assert image.skipped >= 1
    rows, columns = full.shape
    assert arr.shape == (-(-rows // k), -(-columns // k))
    # never below the viewport's fitted size
    assert max(arr.shape[0] / 256, arr.shape[1] / 256) >= 1 or min(arr.shape) >= 128
    assert full.min() - 512 <= arr.min() and arr.max() <= full.max() + 2048
    averaged = full.reshape(rows // k, k, columns // k, k).mean(axis=(1, 3))
    spread = full.max() - full.min()
    assert np.abs(averaged - arr).mean() < 0.02 * spread


def test_a_viewport_as_large_as_the_image_decodes_it_in_full(tmp_path: Path) -> None:
    raw = stored(tmp_path, "MG", HTJ2KLossless)
    image = opened(raw, (800, 1024))
    arr = image.decode(1)[0]
    assert arr.shape == (1024, 800) and image.skipped == 0


def test_uncompressed_and_colour_images_are_not_reduced(tmp_path: Path) -> None:
    spec = StudySpec(patient_id="P", patient_name="A^B", series=[modality_preset("US")])
    raw = write_study(spec, tmp_path)[0].read_bytes()
    assert type(opened(raw, (64, 64))) is pixels.ImageFile


@pytest.mark.parametrize(
    ("rows", "columns", "viewport", "available", "levels"),
    [
        (4096, 3328, (1000, 1000), 5, 2),  # 1024 x 832 covers 1000 x 812
        (4096, 3328, (128, 128), 5, 5),  # bounded by the decompositions
        (512, 512, (512, 512), 5, 0),
        (512, 512, (300, 300), 5, 0),  # 256 would be too small
        (512, 512, (256, 900), 5, 1),
    ],
)
def test_levels_skipped_keep_the_fitted_size_covered(
    rows: int, columns: int, viewport: tuple[int, int], available: int, levels: int
) -> None:
    assert reduced.levels_for(rows, columns, viewport, available) == levels


def test_the_render_cache_is_bounded_by_bytes_and_drops_the_least_recently_used() -> None:
    cache = RenderCache(max_bytes=100)
    cache.put("a", b"x" * 40)
    cache.put("b", b"x" * 40)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", b"x" * 40)
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    assert cache.size <= 100 and len(cache) == 2
    cache.put("huge", b"x" * 101)  # larger than the cache: not kept, nothing dropped
    assert cache.get("huge") is None and len(cache) == 2
