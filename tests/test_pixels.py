"""archive.pixels: stored frames, decoded frames, rendered images, query parameters."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from archive import pixels as px
from archive.pixels import DecodeError, FrameError, RenderError, Viewport, Window
from archive.synthetic import (
    StudySpec,
    available_transfer_syntaxes,
    expected_pixels,
    make_instance,
    modality_preset,
)
from tests.dicomfiles import pydicom_test_folders

LOSSLESS = available_transfer_syntaxes(lossless_only=True)


# --------------------------------------------------------------------------- helpers


def _path(name: str) -> Path:
    """A pydicom test file, from the bundled folder or pydicom-data (globbed
    directly: pydicom's own lookup tries to download)."""
    for folder in pydicom_test_folders():
        if (folder / name).exists():
            return folder / name
    pytest.skip(f"{name} is not installed (pydicom-data)")


def _read(name: str) -> FileDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(_path(name))


def _stored(ds: FileDataset) -> FileDataset:
    """The dataset as the archive reads it back from the object store."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _synthetic(modality: str, ts=ExplicitVRLittleEndian, **overrides):
    """(stored dataset, expected pixel array) for one small synthetic instance."""
    # openjpeg refuses images under 32 pixels a side with its default 6 resolutions
    overrides.setdefault("rows", 32)
    overrides.setdefault("columns", 40)
    study = StudySpec(
        patient_id="PX1",
        patient_name="PIXEL^Test",
        series=[modality_preset(modality, transfer_syntax=ts, **overrides)],
    )
    pixels = expected_pixels(study, 0, 0)
    ds = make_instance(study, 0, 0, rng=np.random.default_rng(0), pixels=pixels)
    return _stored(ds), pixels


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _png(ds: Dataset, frame: int = 1, **kwargs) -> np.ndarray:
    return np.asarray(_image(px.render(ds, frame, media_type="image/png", **kwargs)))


def _with_pixels(ds: FileDataset, frames: list[bytes], ts, **encaps) -> FileDataset:
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = ts
    out.PixelData = encapsulate(frames, **encaps) if ts.is_encapsulated else b"".join(frames)
    out["PixelData"].VR = "OB"
    out.NumberOfFrames = len(frames)
    return out


# --------------------------------------------------------------------------- frames


def test_frame_count_is_one_without_number_of_frames_and_the_attribute_otherwise():
    assert px.frame_count(_read("CT_small.dcm")) == 1
    ds, _ = _synthetic("XA", frames=3)
    assert px.frame_count(ds) == 3


def test_native_multiframe_raw_frames_concatenate_to_pixel_data():
    ds, expected = _synthetic("OT", frames=3, bits_allocated=16, bits_stored=12)
    frames = list(px.iter_frames_raw(ds))
    assert len(frames) == 3
    assert all(len(f) == 32 * 40 * 2 for f in frames)
    assert b"".join(frames) == ds.PixelData[: 3 * 32 * 40 * 2]
    assert px.get_frame_bytes(ds, 2) == frames[1]
    second = np.frombuffer(px.get_frame_bytes(ds, 2), "<u2").reshape(32, 40)
    assert np.array_equal(second, expected[1])


def test_big_endian_native_frames_are_served_little_endian():
    ds, expected = _synthetic("OT", ExplicitVRBigEndian, frames=2, bits_allocated=16)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    for i in (1, 2):
        assert px.get_frame_bytes(ds, i) == expected[i - 1].astype("<u2").tobytes()


def test_one_bit_frames_that_do_not_start_on_a_byte_are_repacked_from_bit_zero():
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 2, size=(3, 3, 3), dtype=np.uint8)  # 9 bits per frame
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.update(
        {
            "Rows": 3, "Columns": 3, "NumberOfFrames": 3, "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 1,
            "BitsStored": 1, "HighBit": 0, "PixelRepresentation": 0,
        }
    )  # fmt: skip
    ds.PixelData = pack_bits(arr)
    ds["PixelData"].VR = "OB"
    for i in range(3):
        frame = px.get_frame_bytes(ds, i + 1)
        assert len(frame) == 2
        bits = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")[:9]
        assert np.array_equal(bits.reshape(3, 3), arr[i])
        assert np.array_equal(px.decoded_frame(ds, i + 1), arr[i])


def test_compressed_frames_are_returned_as_stored_and_decode_on_their_own():
    ds = _read("emri_small_jpeg_2k_lossless.dcm")
    stored = list(generate_frames(ds.PixelData, number_of_frames=10))
    assert list(px.iter_frames_raw(ds)) == stored
    frame = px.get_frame_bytes(ds, 3)
    assert frame == stored[2]
    alone = _with_pixels(ds, [frame], ds.file_meta.TransferSyntaxUID)
    assert np.array_equal(px.decoded_frame(alone, 1), ds.pixel_array[2])


@pytest.mark.parametrize("has_bot", [True, False], ids=["offset-table", "empty-offset-table"])
def test_multi_fragment_frames_are_joined_with_or_without_offset_table(has_bot):
    ds = _read("emri_small_jpeg_2k_lossless.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=10))
    split = _with_pixels(ds, frames, JPEG2000Lossless, fragments_per_frame=3, has_bot=has_bot)
    assert split.PixelData != ds.PixelData
    assert [px.get_frame_bytes(split, i) for i in (1, 5, 10)] == [frames[0], frames[4], frames[9]]
    assert list(px.iter_frames_raw(split)) == frames


def test_rle_frames_are_found_in_synthetic_multiframe_instances():
    if RLELossless not in LOSSLESS:
        pytest.skip("no RLE encoder")
    ds, expected = _synthetic("XA", RLELossless, frames=3)
    for has_bot in (True, False):
        frames = list(px.iter_frames_raw(ds))
        again = _with_pixels(ds, frames, RLELossless, has_bot=has_bot)
        assert px.get_frame_bytes(again, 3) == frames[2]
        assert np.array_equal(px.decoded_frame(again, 3), expected[2])


@pytest.mark.parametrize("name", ["CT_small.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_frame_numbers_out_of_range_raise_frame_error(name):
    ds = _read(name)
    n = px.frame_count(ds)
    with pytest.raises(FrameError, match=f"frame {n + 1} requested, the instance has {n} frame"):
        px.get_frame_bytes(ds, n + 1)
    for bad in (0, -1):
        with pytest.raises(FrameError):
            px.get_frame_bytes(ds, bad)
    with pytest.raises(FrameError):
        px.decoded_frame(ds, n + 1)
    with pytest.raises(FrameError):
        px.render(ds, n + 1)


def test_frame_error_message_names_requested_and_available_frames():
    ds, _ = _synthetic("XA", frames=3)
    with pytest.raises(FrameError, match="^frame 5 requested, the instance has 3 frames$"):
        px.get_frame_bytes(ds, 5)


def test_truncated_native_pixel_data_is_a_frame_error():
    ds, _ = _synthetic("XA", frames=3)
    ds.PixelData = ds.PixelData[:-100]
    with pytest.raises(FrameError, match="truncated"):
        px.get_frame_bytes(ds, 3)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("ts", LOSSLESS, ids=lambda uid: uid.name)
@pytest.mark.parametrize(
    "modality, overrides",
    [("MR", {}), ("CT", {}), ("US", {}), ("XA", {"frames": 3})],
    ids=["MR-12bit", "CT-signed", "US-rgb", "XA-multiframe"],
)
def test_decoded_frame_equals_generated_pixels_for_lossless_syntaxes(ts, modality, overrides):
    ds, expected = _synthetic(modality, ts, **overrides)
    frames = list(expected) if overrides.get("frames", 1) > 1 else [expected]
    for i, want in enumerate(frames, start=1):
        got = px.decoded_frame(ds, i)
        assert got.dtype.isnative
        assert np.array_equal(got, want), f"frame {i}"


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "JPEG2000.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_rle.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "US1_J2KR.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "color3d_jpeg_baseline.dcm",
        "examples_palette.dcm",
        "image_dfl.dcm",
    ],
)
def test_decoded_frame_reads_bundled_files_in_every_transfer_syntax(name):
    ds = _read(name)
    n = px.frame_count(ds)
    middle = (n + 1) // 2
    got = px.decoded_frame(ds, middle)
    assert got.shape[:2] == (ds.Rows, ds.Columns)
    if n > 1:
        assert np.array_equal(got, ds.pixel_array[middle - 1])
    else:
        assert np.array_equal(got, ds.pixel_array)


def test_undecodable_pixel_data_raises_decode_error():
    ds = _read("MR_small_jp2klossless.dcm")
    broken = _with_pixels(ds, [b"\xff\x4f\xff\x51 not a codestream"], JPEG2000Lossless)
    with pytest.raises(DecodeError, match="cannot decode frame 1"):
        px.decoded_frame(broken, 1)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    "name, mode",
    [
        ("CT_small.dcm", "L"),
        ("MR_small_RLE.dcm", "L"),
        ("JPEG2000.dcm", "L"),
        ("emri_small_jpeg_2k_lossless.dcm", "L"),
        ("SC_rgb_rle.dcm", "RGB"),
        ("SC_rgb_jpeg_dcmtk.dcm", "RGB"),
        ("US1_J2KR.dcm", "RGB"),
        ("color3d_jpeg_baseline.dcm", "RGB"),
        ("examples_palette.dcm", "RGB"),
    ],
)
@pytest.mark.parametrize("media_type, fmt", [("image/jpeg", "JPEG"), ("image/png", "PNG")])
def test_rendered_images_open_with_the_image_size_and_grey_or_rgb_mode(name, mode, media_type, fmt):
    ds = _read(name)
    image = _image(px.render(ds, px.frame_count(ds), media_type=media_type))
    assert image.format == fmt
    assert image.size == (ds.Columns, ds.Rows)
    assert image.mode == mode


def test_gif_is_rendered_too_and_media_type_parameters_are_ignored():
    ds = _read("SC_rgb_rle.dcm")
    assert _image(px.render(ds, media_type="image/gif")).format == "GIF"
    assert _image(px.render(ds, media_type="Image/PNG; charset=x")).format == "PNG"


def test_ybr_and_rgb_encodings_of_one_image_render_alike():
    reference = _png(_read("SC_rgb.dcm")).astype(int)
    for name in ("SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        assert np.abs(_png(_read(name)).astype(int) - reference).max() <= 8, name
    assert np.array_equal(_png(_read("SC_rgb_rle.dcm")), reference)


def test_narrow_window_saturates_more_pixels_than_a_wide_one():
    ds = _read("CT_small.dcm")
    wide = _png(ds, window=(40, 4000))
    narrow = _png(ds, window=(40, 40))
    assert not np.array_equal(wide, narrow)

    def saturated(a):
        return int(np.count_nonzero((a == 0) | (a == 255)))

    assert saturated(narrow) > saturated(wide)


def test_explicit_window_overrides_the_stored_window():
    ds, _ = _synthetic("CT")
    assert float(ds.WindowWidth) == 400
    assert np.array_equal(_png(ds), _png(ds, window=(40, 400)))
    assert not np.array_equal(_png(ds), _png(ds, window=(400, 2000)))


def test_window_applies_to_modality_values_after_rescale():
    ds, _ = _synthetic("CT")
    shifted = copy.deepcopy(ds)
    shifted.RescaleIntercept = float(ds.RescaleIntercept) + 1000
    assert np.array_equal(_png(ds, window=(40, 400)), _png(shifted, window=(1040, 400)))


def test_rescale_from_shared_functional_groups_is_used_for_enhanced_objects():
    ds, _ = _synthetic("CT")
    enhanced = copy.deepcopy(ds)
    item = Dataset()
    item.RescaleSlope = ds.RescaleSlope
    item.RescaleIntercept = ds.RescaleIntercept
    group = Dataset()
    group.PixelValueTransformationSequence = Sequence([item])
    enhanced.SharedFunctionalGroupsSequence = Sequence([group])
    del enhanced.RescaleSlope, enhanced.RescaleIntercept
    assert np.array_equal(_png(enhanced, window=(40, 400)), _png(ds, window=(40, 400)))


def test_sigmoid_window_differs_from_linear_and_keeps_the_order_of_values():
    ds, _ = _synthetic("CT")
    linear = _png(ds, window=(40, 400))
    sigmoid = _png(ds, window=Window(40, 400, "SIGMOID"))
    assert not np.array_equal(linear, sigmoid)
    values = px.decoded_frame(ds).astype(float).ravel()
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(sigmoid.ravel()[order].astype(int)) >= 0)


def test_without_any_window_the_frame_range_spans_black_to_white():
    ds, _ = _synthetic("MR")
    del ds.WindowCenter, ds.WindowWidth
    out = _png(ds)
    assert out.min() == 0 and out.max() == 255


def test_monochrome1_is_rendered_inverted_relative_to_monochrome2():
    ds, _ = _synthetic("DX", rows=40, columns=30)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    as_m2 = copy.deepcopy(ds)
    as_m2.PhotometricInterpretation = "MONOCHROME2"
    m1, m2 = _png(ds).astype(int), _png(as_m2).astype(int)
    assert np.array_equal(m1, 255 - m2)
    assert m1.std() > 0


def test_viewport_scales_down_keeping_the_aspect_ratio():
    ds = _read("JPEG2000.dcm")  # 256 columns x 1024 rows
    assert _image(px.render(ds, viewport=(100, 100))).size == (25, 100)
    assert _image(px.render(ds, viewport=(64, 4096))).size == (64, 256)


def test_viewport_does_not_enlarge_unless_asked():
    ds = _read("CT_small.dcm")  # 128 x 128
    assert _image(px.render(ds, viewport=(512, 300))).size == (128, 128)
    assert _image(px.render(ds, viewport=(512, 300), upscale=True)).size == (300, 300)


def test_viewport_source_region_crops_and_negative_sizes_flip():
    ds = _read("CT_small.dcm")
    full = _png(ds)
    region = _png(ds, viewport=Viewport(128, 128, 10, 20, 50, 30))
    assert np.array_equal(region, full[20:50, 10:60])
    flipped = _png(ds, viewport=Viewport(128, 128, 10, 20, -50, -30))
    assert np.array_equal(flipped, full[20:50, 10:60][::-1, ::-1])
    with pytest.raises(RenderError, match="outside"):
        px.render(ds, viewport=Viewport(128, 128, 100, 0, 50, 10))


def test_parsed_query_parameters_are_accepted_by_render():
    ds = _read("CT_small.dcm")
    image = _image(
        px.render(ds, window=px.parse_window("40,400,linear"), viewport=px.parse_viewport("64,64"))
    )
    assert image.size == (64, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"media_type": "image/tiff"}, "unsupported media type"),
        ({"media_type": "application/dicom"}, "unsupported media type"),
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "quality"),
        ({"window": (40, 0)}, "width"),
        ({"window": (40, 400, "cubic")}, "unknown window function"),
        ({"window": (40,)}, "window must be"),
        ({"viewport": (0, 10)}, "viewport width"),
        ({"viewport": (10,)}, "viewport must be"),
    ],
)
def test_render_rejects_unsupported_media_types_and_parameters(kwargs, message):
    with pytest.raises(RenderError, match=message):
        px.render(_read("CT_small.dcm"), **kwargs)


def test_thumbnail_is_the_middle_frame_fitted_in_the_square():
    ds = _read("color3d_jpeg_baseline.dcm")  # 120 frames of 640 x 480
    data = px.thumbnail(ds)
    image = _image(data)
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size == (128, 96)
    assert data == px.render(ds, 60, viewport=(128, 128), quality=85)


def test_thumbnail_fits_any_size_and_media_type():
    ds = _read("JPEG2000.dcm")
    image = _image(px.thumbnail(ds, size=64, media_type="image/png"))
    assert image.format == "PNG" and max(image.size) <= 64 and image.size == (16, 64)
    with pytest.raises(RenderError):
        px.thumbnail(ds, size=0)


# --------------------------------------------------------------------------- query parameters


@pytest.mark.parametrize(
    "text, expected",
    [
        ("40,400,linear", (40.0, 400.0, "LINEAR")),
        ("40,400", (40.0, 400.0, "LINEAR")),
        ("-600, 1500, SIGMOID", (-600.0, 1500.0, "SIGMOID")),
        ("1.5e2,10,linear-exact", (150.0, 10.0, "LINEAR_EXACT")),
        ("0.5,0.5,sigmoid", (0.5, 0.5, "SIGMOID")),
    ],
)
def test_parse_window_accepts_the_standard_forms(text, expected):
    window = px.parse_window(text)
    assert window == expected
    center, width, *_ = window
    assert (center, width) == (window.center, window.width)


@pytest.mark.parametrize(
    "text",
    ["", "40", "a,b", "40,400,cubic", "40,0,linear", "40,0.5,linear", "40,400,linear,x",
     "nan,400", "40,inf", ",400"],
)  # fmt: skip
def test_parse_window_rejects_garbage(text):
    with pytest.raises(RenderError):
        px.parse_window(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512,512", Viewport(512, 512)),
        (" 256 , 128 ", Viewport(256, 128)),
        ("256,128,10,20,100,-50", Viewport(256, 128, 10, 20, 100, -50)),
        ("256,128,,,,", Viewport(256, 128, 0, 0, None, None)),
    ],
)
def test_parse_viewport_accepts_short_and_long_forms(text, expected):
    assert px.parse_viewport(text) == expected
    width, height, *_ = px.parse_viewport(text)
    assert (width, height) == expected[:2]


@pytest.mark.parametrize(
    "text",
    ["", "512", "0,10", "10,-1", "a,b", "1.5,2", "1,2,3", "1,2,3,4,5", "512,512,-1,0,10,10",
     "512,512,0,0,0,10", "512,512,x,0,10,10"],
)  # fmt: skip
def test_parse_viewport_rejects_malformed_values(text):
    with pytest.raises(RenderError):
        px.parse_viewport(text)
