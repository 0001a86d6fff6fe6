"""Transcoding: decode every producer syntax, lossless re-encoding verified
bit-exact, lossy data never re-encoded, corrupt data refused.

Round trips run over pydicom's bundled test files (those whose pixel data
pydicom decodes) and over generated CT, MR, CR, MG, DX, US (RGB, multi-frame),
XA (multi-frame) images and odd sizes; results are read back with pydicom's
own decoders and with dcmtk (dcmdump for all, dcmdrle / dcmdjpls where dcmtk
has a decoder).
"""

from __future__ import annotations

import io
import subprocess
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames, parse_basic_offsets
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from archive import codecs as tc
from archive.synthetic import StudySpec, make_instance, modality_preset, render_pixels
from tests.dcmtk import dcmtk, have_dcmtk
from tests.dicomfiles import pydicom_test_folders

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns a lot about its odd test files

TARGETS = [ExplicitVRLittleEndian, *tc.LOSSLESS_TARGETS]
HTJ2K_203 = UID("1.2.840.10008.1.2.4.203")
DCMTK = have_dcmtk("dcmdump")


def _id(uid: str) -> str:
    return {
        ExplicitVRLittleEndian: "explicit",
        RLELossless: "rle",
        JPEGLSLossless: "jpegls",
        JPEG2000Lossless: "j2k",
        HTJ2KLossless: "htj2k",
        HTJ2KLosslessRPCL: "htj2k-rpcl",
    }[uid]


def read(data: bytes) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(data))


def write(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pixels(ds: pydicom.Dataset) -> np.ndarray:
    """All frames as pydicom's own decoder returns them, without colour conversion."""
    arr, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, as_rgb=False)
    return arr


def frames_of(ds: pydicom.Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))


def with_frames(data: bytes, edit) -> bytes:  # noqa: ANN001 - edit: list[bytes] -> list[bytes]
    """``data`` with its encapsulated frames replaced by ``edit(frames)``."""
    ds = read(data)
    ds.PixelData = encapsulate(edit(frames_of(ds)))
    ds["PixelData"].is_undefined_length = True
    return write(ds)


# --------------------------------------------------------------------------- synthetic images


def synthetic(modality: str, **overrides) -> tuple[bytes, np.ndarray]:
    """A generated instance (Part 10 bytes) and its exact pixel array."""
    series = modality_preset(modality, instances=1, **overrides)
    study = StudySpec(patient_id="TC0001", patient_name="TRANSCODE^Test", series=[series])
    rng = np.random.default_rng(7)
    arr = render_pixels(series, 0, rng)
    return write(make_instance(study, 0, 0, rng=rng, pixels=arr)), arr


def _ybr(planar: bool = False, subsampled: bool = False) -> tuple[bytes, np.ndarray]:
    """Native YBR_FULL, YBR_FULL_422 or planar RGB variants of a US image."""
    data, rgb = synthetic("US", rows=48, columns=64)
    ds = read(data)
    if planar:
        ds.PixelData = rgb.transpose(2, 0, 1).tobytes()
        ds.PlanarConfiguration = 1
        return write(ds), rgb
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    if subsampled:  # two pixels share Cb and Cr (taken from the first one)
        ybr[:, 1::2, 1:] = ybr[:, 0::2, 1:]
        pairs = ybr.reshape(48, 32, 2, 3)
        ds.PixelData = np.concatenate(
            [pairs[:, :, 0, :1], pairs[:, :, 1, :1], pairs[:, :, 0, 1:]], axis=2
        ).tobytes()
        ds.PhotometricInterpretation = "YBR_FULL_422"
    else:
        ds.PixelData = ybr.tobytes()
        ds.PhotometricInterpretation = "YBR_FULL"
    return write(ds), ybr


SYNTHETIC = {
    "CT": lambda: synthetic("CT"),  # 512x512 signed 16-bit
    "CT-signed-12bit": lambda: synthetic("CT", rows=128, columns=96, bits_stored=12),
    "MR": lambda: synthetic("MR"),  # 256x256, 12 bits
    "CR": lambda: synthetic("CR"),  # 2048x2048, 12 bits
    "MG-16bit": lambda: synthetic("MG", rows=1536, columns=1152, bits_stored=16),
    "DX-MONOCHROME1": lambda: synthetic("DX", rows=300, columns=240),
    "US-RGB": lambda: synthetic("US"),  # 480x640 RGB
    "US-RGB-multiframe": lambda: synthetic("US", frames=4, rows=240, columns=320),
    "XA-multiframe": lambda: synthetic("XA", frames=6, rows=128, columns=128),
    "OT-signed-8bit": lambda: synthetic(
        "OT", bits_allocated=8, bits_stored=8, pixel_representation=1, rows=40, columns=50
    ),
    "odd-511x257": lambda: synthetic("MR", rows=257, columns=511),
    "one-row": lambda: synthetic("MR", rows=1, columns=300),
    "one-column": lambda: synthetic("CT", rows=300, columns=1),
    "tiny-RGB-3x3": lambda: synthetic("US", rows=3, columns=3),
    "RGB-planar": lambda: _ybr(planar=True),
    "YBR_FULL": lambda: _ybr(),
    "YBR_FULL_422": lambda: _ybr(subsampled=True),
}


@cache
def synthetic_case(name: str) -> tuple[bytes, np.ndarray]:
    return SYNTHETIC[name]()


@cache
def synthetic_result(name: str, target: str) -> bytes:
    return tc.transcode(synthetic_case(name)[0], target)


@pytest.mark.parametrize("target", TARGETS, ids=_id)
@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_round_trip(name: str, target: str) -> None:
    data, expected = synthetic_case(name)
    source = read(data)
    out = synthetic_result(name, target)
    if source.file_meta.TransferSyntaxUID == target:
        assert out is data  # nothing to do
        return
    ds = read(out)
    assert ds.file_meta.TransferSyntaxUID == target
    assert ds.SOPInstanceUID == source.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    got = pixels(ds)
    if got.shape != expected.shape:  # a multi-frame array vs a single frame
        got = got.reshape(expected.shape)
    assert got.dtype == expected.dtype
    assert np.array_equal(got, expected), "decode(encode(x)) != x"
    assert ds.get("LossyImageCompression") == source.get("LossyImageCompression")
    photometric = source.PhotometricInterpretation
    if photometric == "YBR_FULL_422":  # expanded while decoding: the values are YBR_FULL
        photometric = "YBR_FULL"
    assert ds.PhotometricInterpretation == photometric
    if int(ds.SamplesPerPixel) == 3:
        assert ds.PlanarConfiguration == 0
    if target == ExplicitVRLittleEndian:
        assert not ds["PixelData"].is_undefined_length
        return
    elem = ds["PixelData"]
    assert elem.VR == "OB" and elem.is_undefined_length
    count = int(ds.get("NumberOfFrames", 1))
    assert len(frames_of(ds)) == count
    offsets = parse_basic_offsets(io.BytesIO(elem.value))
    assert len(offsets) == count, "a Basic Offset Table with one entry per frame"
    assert "ExtendedOffsetTable" not in ds


def test_lossless_flag_kept_and_instance_unchanged_in_place() -> None:
    data, _ = synthetic("MR", rows=64, columns=64)
    ds = read(data)
    ds.LossyImageCompression = "00"
    out = tc.transcode(write(ds), HTJ2KLossless)
    assert read(out).LossyImageCompression == "00"
    # encode_dataset works in place and keeps the SOP Instance UID
    ds = read(data)
    uid = ds.SOPInstanceUID
    assert tc.encode_dataset(ds, JPEG2000Lossless) is ds
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert ds.SOPInstanceUID == uid
    tc.verify_lossless(read(data), ds)
    assert tc.decode_dataset(ds).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not ds["PixelData"].is_undefined_length and ds["PixelData"].VR == "OW"


def test_same_syntax_returns_the_bytes_unchanged() -> None:
    data, _ = synthetic("MR", rows=32, columns=32)
    assert tc.transcode(data, ExplicitVRLittleEndian) is data
    rle = tc.transcode(data, RLELossless)
    assert tc.transcode(rle, RLELossless) is rle


def test_other_uncompressed_sources() -> None:
    data, expected = synthetic("CT", rows=64, columns=48)
    ds = read(data)
    for ts in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        source = read(data)
        for _ in source.iterall():  # decode the raw elements before changing the encoding
            pass
        if ts == ExplicitVRBigEndian:
            source.PixelData = expected.astype(">i2").tobytes()
        source.file_meta.TransferSyntaxUID = ts
        source.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
        buffer = io.BytesIO()
        source.save_as(buffer, enforce_file_format=True)
        for target in (ExplicitVRLittleEndian, HTJ2KLossless):
            out = read(tc.transcode(buffer.getvalue(), target))
            assert np.array_equal(pixels(out), expected), (ts.name, target)
            assert out.RescaleIntercept == ds.RescaleIntercept


def test_encapsulated_icon_becomes_native() -> None:
    import imagecodecs
    from pydicom.dataset import Dataset

    data, expected = synthetic("MR", rows=64, columns=64)
    ds = read(tc.transcode(data, JPEG2000Lossless))
    icon = Dataset()
    icon.Rows = icon.Columns = 16
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    small = np.arange(256, dtype=np.uint8).reshape(16, 16)
    icon.PixelData = encapsulate([bytes(imagecodecs.jpeg2k_encode(small, level=0))])
    icon["PixelData"].VR, icon["PixelData"].is_undefined_length = "OB", True
    ds.IconImageSequence = [icon]
    source = write(ds)
    for target in (ExplicitVRLittleEndian, HTJ2KLossless):
        out = read(tc.transcode(source, target, verify=target != ExplicitVRLittleEndian))
        assert np.array_equal(pixels(out), expected)
        item = out.IconImageSequence[0]
        assert not item["PixelData"].is_undefined_length
        assert np.array_equal(np.frombuffer(item.PixelData, np.uint8).reshape(16, 16), small)


def test_extended_offset_table_source() -> None:
    """A source with an Extended Offset Table decodes through it; outputs too
    small to need one do not carry it over."""
    data, expected = synthetic("XA", frames=5, rows=64, columns=64)
    ds = read(data)
    ds.compress(RLELossless, expected, encapsulate_ext=True, generate_instance_uid=False)
    source = write(ds)
    assert "ExtendedOffsetTable" in read(source)
    for target in (ExplicitVRLittleEndian, HTJ2KLossless, JPEGLSLossless):
        out = read(tc.transcode(source, target))
        assert "ExtendedOffsetTable" not in out and "ExtendedOffsetTableLengths" not in out
        assert np.array_equal(pixels(out), expected)


def test_verify_lossless_detects_a_difference() -> None:
    data, _ = synthetic("MR", rows=32, columns=32)
    encoded = read(synthetic_result("MR", JPEGLSLossless))
    tc.verify_lossless(read(synthetic_case("MR")[0]), encoded)
    altered = read(data)
    arr = pixels(altered).copy()
    arr[5, 7] += 1
    altered.PixelData = arr.tobytes()
    with pytest.raises(tc.TranscodeError, match="not lossless"):
        tc.verify_lossless(altered, read(tc.transcode(data, JPEGLSLossless)))


# --------------------------------------------------------------------------- HTJ2K details


def test_htj2k_codestreams() -> None:
    rpcl = read(synthetic_result("CR", HTJ2KLosslessRPCL))
    plain = read(synthetic_result("CR", HTJ2KLossless))
    for ds in (rpcl, plain):
        info = tc.j2k_coding_style(frames_of(ds)[0])
        assert info["ht"] and info["reversible"] and info["mct"] == 0
        assert 2048 >> info["decompositions"] <= 64  # a thumbnail-size base resolution
    rpcl_info = tc.j2k_coding_style(frames_of(rpcl)[0])
    assert rpcl_info["progression"] == 2 and rpcl_info["tlm"]  # RPCL, TLM (PS3.5 10.18)
    # one tile-part per resolution: SOT markers = decompositions + 1
    assert frames_of(rpcl)[0].count(b"\xff\x90") == rpcl_info["decompositions"] + 1
    # RGB without colour transform stays RGB
    us = read(synthetic_result("US-RGB", HTJ2KLossless))
    assert us.PhotometricInterpretation == "RGB"
    assert tc.j2k_coding_style(frames_of(us)[0])["mct"] == 0
    # a very wide image gets more decompositions
    wide, arr = synthetic("MR", rows=1, columns=8192)
    ds = read(tc.transcode(wide, HTJ2KLosslessRPCL))
    assert 8192 >> tc.j2k_coding_style(frames_of(ds)[0])["decompositions"] <= 64
    assert np.array_equal(pixels(ds), arr)


def test_htj2k_openjph_fallback_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """When pydicom has no HTJ2K decoder, OpenJPH (imagecodecs) decodes -
    and corrupt data still raises, although imagecodecs swallows OpenJPH's
    errors."""
    good = synthetic_result("US-RGB-multiframe", HTJ2KLosslessRPCL)
    expected = synthetic_case("US-RGB-multiframe")[1]
    real = get_decoder

    class Missing:
        is_available = False

    def no_htj2k(uid):  # noqa: ANN001, ANN202
        return Missing() if uid in (HTJ2KLossless, HTJ2KLosslessRPCL) else real(uid)

    monkeypatch.setattr(tc.decode, "get_decoder", no_htj2k)
    assert np.array_equal(tc.decoded_pixels(read(good)), expected)
    out = read(tc.transcode(good, JPEGLSLossless))
    assert np.array_equal(pixels(out), expected)

    def damage(frames: list[bytes]) -> list[bytes]:
        middle = len(frames[1]) // 2
        broken = frames[1][:middle] + bytes(b ^ 0x5A for b in frames[1][middle : middle + 64])
        return [frames[0], broken + frames[1][middle + 64 :], *frames[2:]]

    for bad in (with_frames(good, damage), with_frames(good, lambda f: [f[0][:-300], *f[1:]])):
        with pytest.raises(tc.TranscodeError, match="frame"):
            tc.transcode(bad, JPEGLSLossless)


# --------------------------------------------------------------------------- lossy and corrupt


def _bundled(name: str) -> bytes:
    for folder in pydicom_test_folders():
        for path in folder.rglob(name):
            return path.read_bytes()
    pytest.skip(f"{name} is not among the installed pydicom test files")


def _lossy_htj2k() -> bytes:
    import imagecodecs

    data, arr = synthetic("MR", rows=64, columns=64)
    ds = read(data)
    ds.PixelData = encapsulate([bytes(imagecodecs.htj2k_encode(arr, level=0.01))])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2K_203
    return write(ds)


def _flagged_lossy() -> bytes:
    data, _ = synthetic("CR", rows=64, columns=64)
    ds = read(data)
    ds.LossyImageCompression = "01"
    return write(ds)


LOSSY = {
    "jpeg-baseline": lambda: _bundled("SC_rgb_dcmtk_+eb+cy+s2.dcm"),
    "jpeg-extended": lambda: _bundled("JPGExtended.dcm"),
    "jpegls-near-lossless": lambda: _bundled("SC_rgb_jls_lossy_line.dcm"),
    "j2k-lossy": lambda: _bundled("RG1_J2KI.dcm"),
    "htj2k-lossy": _lossy_htj2k,
    "flag-01": _flagged_lossy,
}


@pytest.mark.parametrize("name", list(LOSSY))
def test_lossy_sources_are_never_re_encoded(name: str) -> None:
    data = LOSSY[name]()
    ds = read(data)
    assert tc.is_lossy(ds)
    stored = ds.file_meta.TransferSyntaxUID
    assert tc.transcode(data, stored) is data
    for target in {*TARGETS} - {stored}:
        with pytest.raises(tc.LossySource, match="arrived lossy"):
            tc.transcode(data, target)
        if target != ExplicitVRLittleEndian:
            with pytest.raises(tc.LossySource):
                tc.encode_dataset(read(data), target)
    # it still decodes (retrieval, rendering) and keeps its lossy flag
    if stored != ExplicitVRLittleEndian:
        native = tc.decode_dataset(read(data))
        assert native.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert native.get("LossyImageCompression") == ds.get("LossyImageCompression")
        assert "HTJ2K" not in str(tc.producible(stored))
        assert ExplicitVRLittleEndian in tc.producible(stored)
        assert read(tc.encode_as(data, ExplicitVRLittleEndian)).file_meta.TransferSyntaxUID == (
            ExplicitVRLittleEndian
        )


def test_lossy_jpeg_ycbcr_decodes_to_rgb() -> None:
    ds = tc.decode_dataset(read(_bundled("SC_rgb_dcmtk_+eb+cy+s2.dcm")))
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.LossyImageCompression == "01"
    assert ds.PlanarConfiguration == 0


def _truncate(frames: list[bytes]) -> list[bytes]:
    return [frames[0][: len(frames[0]) // 2]]


def _break_sot(frames: list[bytes]) -> list[bytes]:
    cs = frames[0]
    at = cs.index(b"\xff\x90")
    return [cs[:at] + b"\x12\x34" + cs[at + 2 :]]


def _flip_middle(frames: list[bytes]) -> list[bytes]:
    cs = frames[0]
    middle = len(cs) // 2
    return [cs[:middle] + bytes(b ^ 0xFF for b in cs[middle : middle + 32]) + cs[middle + 32 :]]


CORRUPT = {
    "j2k-truncated": (JPEG2000Lossless, _truncate),
    "j2k-sot-marker-damaged": (JPEG2000Lossless, _break_sot),
    "htj2k-truncated": (HTJ2KLossless, _truncate),
    "htj2k-bytes-flipped": (HTJ2KLossless, _flip_middle),
    "htj2k-rpcl-sot-damaged": (HTJ2KLosslessRPCL, _break_sot),
    "jpegls-truncated": (JPEGLSLossless, _truncate),
    "rle-truncated": (RLELossless, _truncate),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_pixel_data_is_refused(name: str) -> None:
    syntax, damage = CORRUPT[name]
    bad = with_frames(synthetic_result("MR", syntax), damage)
    for target in TARGETS:
        if target == syntax:
            continue
        with pytest.raises(tc.TranscodeError) as caught:
            tc.transcode(bad, target)
        assert not isinstance(caught.value, tc.LossySource)
        assert "frame 1" in str(caught.value)
    ds = read(bad)
    before = ds.PixelData
    with pytest.raises(tc.TranscodeError):
        tc.encode_dataset(ds, HTJ2KLossless if syntax != HTJ2KLossless else RLELossless)
    assert ds.file_meta.TransferSyntaxUID == syntax and ds.PixelData == before  # untouched


def test_unsupported_images_get_a_clear_reason() -> None:
    with pytest.raises(tc.TranscodeError, match="Bits Allocated 32"):
        tc.transcode(_bundled("rtdose.dcm"), HTJ2KLossless)
    with pytest.raises(tc.TranscodeError, match="Bits Allocated 1"):
        tc.transcode(_bundled("liver_1frame.dcm"), JPEG2000Lossless)
    with pytest.raises(tc.TranscodeError, match="not a readable DICOM"):
        tc.transcode(b"not DICOM at all", HTJ2KLossless)
    with pytest.raises(tc.TranscodeError, match="cannot encode"):
        tc.transcode(synthetic_case("MR")[0], "1.2.840.10008.1.2.4.50")


def test_producible_and_encode_as() -> None:
    assert tc.producible(RLELossless) >= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    assert tc.producible(RLELossless) >= tc.encodable_targets()
    assert tc.encodable_targets() == set(tc.LOSSLESS_TARGETS)  # everything encodes here
    assert tc.producible("1.2.840.10008.1.2.4.50") == {
        "1.2.840.10008.1.2.4.50",
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    }
    assert tc.producible("1.2.840.10008.1.2.4.100") == {"1.2.840.10008.1.2.4.100"}  # MPEG-2
    data, expected = synthetic_case("MR")
    out = read(tc.encode_as(data, ImplicitVRLittleEndian))
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert np.array_equal(pixels(out), expected)
    out = read(tc.encode_as(synthetic_result("MR", RLELossless), HTJ2KLosslessRPCL))
    assert np.array_equal(pixels(out), expected)
    with pytest.raises(ValueError, match="cannot convert"):
        tc.encode_as(_bundled("SC_rgb_dcmtk_+eb+cy+s2.dcm"), HTJ2KLossless)


# --------------------------------------------------------------------------- pydicom's test files


@cache
def bundled_files() -> tuple[tuple[str, bytes], ...]:
    """(name, bytes) of every bundled test file with pixel data pydicom decodes."""
    out = []
    for folder in pydicom_test_folders():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(path)
                    if "PixelData" not in ds:
                        continue
                    pixels(ds)
            except Exception:
                continue
            out.append((str(path.relative_to(folder)), path.read_bytes()))
    return tuple(out)


@pytest.mark.parametrize("target", TARGETS, ids=_id)
@pytest.mark.slow
def test_bundled_files_round_trip(target: str, tmp_path: Path) -> None:
    files = bundled_files()
    assert len(files) > 100
    converted = 0
    for name, data in files:
        source = read(data)
        if source.file_meta.TransferSyntaxUID == target:
            assert tc.transcode(data, target) is data
            continue
        if tc.is_lossy(source):
            with pytest.raises(tc.LossySource):
                tc.transcode(data, target)
            continue
        bits = int(source.BitsAllocated)
        if bits not in (8, 16) and target != ExplicitVRLittleEndian:
            with pytest.raises(tc.TranscodeError, match=f"Bits Allocated {bits}"):
                tc.transcode(data, target)
            continue
        out = tc.transcode(data, target)
        ds = read(out)
        assert ds.file_meta.TransferSyntaxUID == target, name
        assert np.array_equal(pixels(ds), pixels(source)), name
        (tmp_path / f"{converted:03d}.dcm").write_bytes(out)
        converted += 1
    assert converted > 40
    if DCMTK:
        _dcmdump_all(sorted(tmp_path.glob("*.dcm")))


# --------------------------------------------------------------------------- dcmtk


def _dcmtk(*args: str) -> tuple[int, list[str]]:
    """Exit status and the error lines (E: / F:) a dcmtk tool printed."""
    result = subprocess.run([dcmtk(args[0]), *args[1:]], capture_output=True, timeout=120)
    lines = result.stderr.decode("utf-8", "replace").splitlines()
    return result.returncode, [line for line in lines if line[:2] in ("E:", "F:")]


def _dcmdump_all(paths: list[Path]) -> None:
    status, errors = _dcmtk("dcmdump", "-q", *map(str, paths))
    assert status == 0 and not errors, errors[:10]


DCMTK_DECODER = {RLELossless: "dcmdrle", JPEGLSLossless: "dcmdjpls"}


@pytest.mark.skipif(not DCMTK, reason="dcmtk is not installed")
@pytest.mark.parametrize("target", tc.LOSSLESS_TARGETS, ids=_id)
def test_dcmtk_reads_the_results(target: str, tmp_path: Path) -> None:
    paths = []
    for name in SYNTHETIC:
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(synthetic_result(name, target))
        paths.append(path)
    _dcmdump_all(paths)
    tool = DCMTK_DECODER.get(target)
    if tool is None:
        pytest.skip(f"dcmtk 3.6.7 has no {UID(target).name} decoder (dcmdump parsed the files)")
    for name, path in zip(SYNTHETIC, paths, strict=True):
        native = tmp_path / f"{name}.native.dcm"
        status, errors = _dcmtk(tool, str(path), str(native))
        assert status == 0 and not errors, (name, errors)
        decoded = pydicom.dcmread(native)
        expected = synthetic_case(name)[1]
        assert np.array_equal(pixels(decoded).reshape(expected.shape), expected), name
