"""Behaviour of the synthetic DICOM generator (archive.synthetic)."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
)

from archive import synthetic
from archive.synthetic import (
    LOSSLESS_TRANSFER_SYNTAXES,
    SeriesSpec,
    StudySpec,
    available_transfer_syntaxes,
    ct_benchmark_study,
    expected_pixels,
    generate_ct_series,
    generate_mixed_set,
    modality_preset,
    write_study,
)
from tests.dcmtk import dcmtk, have_dcmtk

SEED = 11
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
CODECS = {"ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, list[StudySpec]]:
    folder = tmp_path_factory.mktemp("mixed")
    specs = generate_mixed_set(folder, seed=SEED)
    return folder, specs


def _locate(specs: list[StudySpec], ds) -> tuple[StudySpec, int, int]:
    """(study spec, series index, instance index) of a read-back dataset."""
    study = next(s for s in specs if s.study_uid == ds.StudyInstanceUID)
    series_index = [s.series_uid for s in study.series].index(ds.SeriesInstanceUID)
    return study, series_index, int(ds.InstanceNumber) - 1


def _one_file_per_syntax(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(folder.glob("*.dcm")):
        ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        out.setdefault(ts, path)
    return out


def _tiny_study(transfer_syntax: str, modality: str = "CT", **overrides) -> StudySpec:
    small = {"rows": 32, "columns": 48} if modality != "US" else {"rows": 32, "columns": 40}
    small.update(overrides)
    return StudySpec(
        patient_id="TINY1",
        patient_name="TINY^Test",
        accession_number="TINY",
        series=[modality_preset(modality, instances=1, transfer_syntax=transfer_syntax, **small)],
    )


# --------------------------------------------------------------------------- mixed set


def test_mixed_set_covers_what_import_tests_need(mixed):
    folder, specs = mixed
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == sum(s.instance_count for s in specs)
    assert len(specs) == 6

    modalities = {series.modality for s in specs for series in s.series}
    assert {"CT", "MR", "CR", "MG", "US"} <= modalities
    syntaxes = {series.transfer_syntax for s in specs for series in s.series}
    assert {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEG2000Lossless,
    } <= syntaxes
    assert any(series.frames > 1 for s in specs for series in s.series)
    assert any(
        series.photometric == "RGB" and series.modality == "US"
        for s in specs
        for series in s.series
    )
    assert {s.charset for s in specs} == {"ISO_IR 100", "ISO_IR 192"}
    for charset in CODECS:
        assert any(s.charset == charset and not s.patient_name.isascii() for s in specs)

    # one patient (same PatientID and issuer) with two studies
    studies_per_patient = Counter(s.patient_key for s in specs)
    assert max(studies_per_patient.values()) >= 2

    # UIDs were filled in and are distinct
    study_uids = [s.study_uid for s in specs]
    series_uids = [series.series_uid for s in specs for series in s.series]
    assert len(set(study_uids)) == len(study_uids)
    assert len(set(series_uids)) == len(series_uids)


def test_same_patient_id_different_issuer_are_different_patients(mixed):
    _, specs = mixed
    by_id: dict[str, set[tuple[str, str]]] = {}
    for s in specs:
        by_id.setdefault(s.patient_id, set()).add((s.issuer_of_patient_id or "", s.patient_name))
    shared = {pid: people for pid, people in by_id.items() if len(people) > 1}
    assert shared, "expected a PatientID used by two patients"
    for people in shared.values():
        issuers = [issuer for issuer, _ in people]
        names = [name for _, name in people]
        assert all(issuers) and len(set(issuers)) == len(issuers)
        assert len(set(names)) == len(names)


def test_every_file_reads_back_with_the_attributes_of_its_spec(mixed):
    folder, specs = mixed
    seen_sop_uids = set()
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        study, si, ii = _locate(specs, ds)
        series = study.series[si]
        meta = ds.file_meta

        assert meta.TransferSyntaxUID == series.transfer_syntax
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == series.sop_class
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.ImplementationClassUID == synthetic.IMPLEMENTATION_CLASS_UID
        assert ds.SpecificCharacterSet == study.charset

        assert str(ds.PatientName) == study.patient_name
        assert ds.PatientID == study.patient_id
        if study.issuer_of_patient_id:
            assert ds.IssuerOfPatientID == study.issuer_of_patient_id
        else:
            assert "IssuerOfPatientID" not in ds
        assert ds.PatientBirthDate == study.birth_date
        assert ds.PatientSex == study.sex
        assert ds.StudyDate == study.study_date
        assert ds.StudyTime == study.study_time
        assert ds.AccessionNumber == study.accession_number
        assert ds.StudyDescription == study.study_description
        assert str(ds.ReferringPhysicianName) == study.referring_physician
        assert ds.InstitutionName == study.institution_name
        assert ds.StudyID

        assert ds.Modality == series.modality
        assert ds.SeriesNumber == si + 1
        assert ds.SeriesDescription == series.series_description
        assert ds.get("BodyPartExamined", "") == series.body_part
        assert 0 <= ii < series.instances

        assert (ds.Rows, ds.Columns) == (series.rows, series.columns)
        assert ds.BitsAllocated == series.bits_allocated
        assert ds.BitsStored == series.bits_stored
        assert ds.HighBit == series.bits_stored - 1
        assert ds.PixelRepresentation == series.pixel_representation
        assert ds.SamplesPerPixel == series.samples_per_pixel
        assert ds.PhotometricInterpretation == series.photometric
        if series.frames > 1:
            assert ds.NumberOfFrames == series.frames
        else:
            assert "NumberOfFrames" not in ds
        if series.modality in ("CT", "MR"):
            for keyword in (
                "ImagePositionPatient",
                "ImageOrientationPatient",
                "SliceThickness",
                "PixelSpacing",
                "FrameOfReferenceUID",
            ):
                assert keyword in ds, keyword

        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert len(uid) <= 64 and UID_RE.match(uid), uid
        assert ds.SOPInstanceUID not in seen_sop_uids
        seen_sop_uids.add(ds.SOPInstanceUID)


def test_names_are_encoded_in_the_declared_character_set(mixed):
    folder, specs = mixed
    checked = set()
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        raw = ds.get_item("PatientName").value  # undecoded bytes as stored
        study, _, _ = _locate(specs, ds)
        codec = CODECS[study.charset]
        assert raw.rstrip(b" ") == study.patient_name.encode(codec)
        assert str(ds.PatientName) == study.patient_name
        if study.charset == "ISO_IR 192" and study.patient_name.isascii() is False:
            # a UTF-8 name never equals its Latin-1 encoding when accented
            try:
                assert raw.rstrip(b" ") != study.patient_name.encode("latin_1")
            except UnicodeEncodeError:
                pass  # not even representable in Latin-1 (e.g. Vietnamese)
        ts = ds.file_meta.TransferSyntaxUID
        if not ts.is_deflated:
            data = path.read_bytes()
            assert study.patient_name.encode(codec) in data
            other = "utf_8" if codec == "latin_1" else "latin_1"
            try:
                assert study.patient_name.encode(other) not in data
            except UnicodeEncodeError:
                pass
        checked.add(study.charset)
    assert checked == set(CODECS)


def test_pixel_data_decodes_to_the_generated_array(mixed):
    folder, specs = mixed
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        study, si, ii = _locate(specs, ds)
        assert ds.file_meta.TransferSyntaxUID in LOSSLESS_TRANSFER_SYNTAXES
        expected = expected_pixels(study, si, ii, seed=SEED)
        actual = ds.pixel_array
        assert actual.shape == expected.shape, path.name
        assert actual.dtype.kind == expected.dtype.kind
        assert actual.dtype.itemsize == expected.dtype.itemsize
        np.testing.assert_array_equal(actual, expected, err_msg=path.name)
        # not a flat field: a real image with structure
        assert len(np.unique(expected)) > 20


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_mixed_set(a, studies=3, seed=5)
    generate_mixed_set(b, studies=3, seed=5)
    generate_mixed_set(c, studies=3, seed=6)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # another seed gives other UIDs (hence other file names)
    assert not set(names) & {p.name for p in c.iterdir()}


# --------------------------------------------------------------------------- CT series


def test_generate_ct_series_one_series_of_512_slices(tmp_path):
    paths = generate_ct_series(tmp_path / "ct", 3, seed=2)
    assert len(paths) == 3
    datasets = [pydicom.dcmread(p) for p in paths]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3]
    assert len({float(ds.ImagePositionPatient[2]) for ds in datasets}) == 3
    for ds in datasets:
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (512, 512, 16)
        assert ds.PixelRepresentation == 1
        assert ds.RescaleIntercept == -1024
        hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
        assert hu.min() < -900 and hu.max() > 500  # air and bone
    # slices are different images
    assert not np.array_equal(datasets[0].pixel_array, datasets[1].pixel_array)


def test_generate_ct_series_equals_the_generic_writer(tmp_path):
    fast = generate_ct_series(tmp_path / "fast", 3, seed=4, transfer_syntax=RLELossless)
    slow = write_study(
        ct_benchmark_study(3, seed=4, transfer_syntax=RLELossless), tmp_path / "slow", seed=4
    )
    assert [p.name for p in fast] == [p.name for p in slow]
    for f, s in zip(fast, slow, strict=True):
        assert f.read_bytes() == s.read_bytes(), f.name


# --------------------------------------------------------------------------- syntaxes


def test_available_transfer_syntaxes_here():
    available = available_transfer_syntaxes()
    for ts in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        RLELossless,  # pydicom's own encoder is always there
    ):
        assert ts in available
    assert set(available_transfer_syntaxes(lossless_only=True)) <= LOSSLESS_TRANSFER_SYNTAXES


@pytest.mark.parametrize("ts", available_transfer_syntaxes(lossless_only=True), ids=str)
@pytest.mark.parametrize(
    "modality,overrides",
    [
        ("CT", {}),
        ("MR", {}),
        ("DX", {}),
        ("US", {}),
        ("US", {"frames": 3}),
        ("XA", {"frames": 2}),
    ],
    ids=["ct-signed16", "mr-12bit", "dx-mono1", "us-rgb", "us-rgb-multiframe", "xa-8bit-mf"],
)
def test_every_writable_lossless_syntax_round_trips(tmp_path, ts, modality, overrides):
    study = _tiny_study(ts, modality, **overrides)
    (path,) = write_study(study, tmp_path, seed=1)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ts
    np.testing.assert_array_equal(ds.pixel_array, expected_pixels(study, 0, 0, seed=1))


@pytest.mark.skipif(JPEG2000 not in available_transfer_syntaxes(), reason="no J2K encoder")
def test_lossy_jpeg2000_is_flagged_lossy_and_close(tmp_path):
    study = _tiny_study(JPEG2000, "MR", rows=64, columns=64)
    (path,) = write_study(study, tmp_path, seed=1)
    ds = pydicom.dcmread(path)
    assert ds.LossyImageCompression == "01"
    diff = ds.pixel_array.astype(np.int32) - expected_pixels(study, 0, 0, seed=1)
    psnr = 20 * np.log10(4095 / np.sqrt(np.mean(diff.astype(np.float64) ** 2)))
    assert 25 < psnr < 80  # lossy at ~10:1, but still the same picture


@pytest.mark.parametrize("ts", [JPEGLSLossless, HTJ2KLossless], ids=str)
def test_unavailable_encoder_raises_a_clear_error(tmp_path, ts):
    if ts in available_transfer_syntaxes():
        pytest.skip(f"{ts.name} is writable here")
    with pytest.raises(RuntimeError, match="no encoder available"):
        write_study(_tiny_study(ts), tmp_path)


# --------------------------------------------------------------------------- specs


def test_presets_use_the_right_sop_classes():
    assert modality_preset("CT").sop_class == CTImageStorage
    assert modality_preset("MG").sop_class == DigitalMammographyXRayImageStorageForPresentation
    assert (modality_preset("MG").rows, modality_preset("MG").columns) == (1024, 800)
    assert modality_preset("US").sop_class == UltrasoundImageStorage
    assert modality_preset("US", frames=10).sop_class == UltrasoundMultiFrameImageStorage
    assert modality_preset("XA").sop_class == XRayAngiographicImageStorage
    ct = modality_preset("CT")
    assert (ct.rows, ct.columns, ct.bits_allocated, ct.pixel_representation) == (512, 512, 16, 1)
    with pytest.raises(ValueError):
        modality_preset("CT", frames=2).sop_class  # noqa: B018
    with pytest.raises(ValueError):
        SeriesSpec("US", 10, 10, samples_per_pixel=3, photometric="MONOCHROME2")


def test_text_not_encodable_in_the_charset_is_refused(tmp_path):
    study = _tiny_study(ExplicitVRLittleEndian)
    study.patient_name = "NGUYỄN^Thị"
    study.charset = "ISO_IR 100"
    with pytest.raises(ValueError, match="ISO_IR 100"):
        write_study(study, tmp_path)


def test_command_line(tmp_path, capsys):
    assert synthetic.main([str(tmp_path / "m"), "--mixed", "--studies", "2"]) == 0
    assert "wrote 15 files, 2 studies" in capsys.readouterr().out
    assert synthetic.main([str(tmp_path / "c"), "--ct", "2"]) == 0
    assert "wrote 2 CT slices" in capsys.readouterr().out
    assert len(list((tmp_path / "c").glob("*.dcm"))) == 2


# --------------------------------------------------------------------------- dcmtk


def test_dcmtk_reads_one_file_of_each_syntax(tmp_path, mixed):
    if not have_dcmtk("dcmdump"):
        pytest.skip("dcmtk not installed")
    files = _one_file_per_syntax(mixed[0])
    for ts in available_transfer_syntaxes():
        if ts not in files:
            (path,) = write_study(_tiny_study(ts, "MR"), tmp_path / "extra")
            files[ts] = path
    for ts, path in files.items():
        result = subprocess.run(
            [dcmtk("dcmdump"), str(path)],
            capture_output=True,
            encoding="latin_1",  # dcmdump prints values undecoded
            timeout=30,
        )
        assert result.returncode == 0, (ts.name, result.stderr)
        assert "E:" not in result.stderr and "W:" not in result.stderr, (ts.name, result.stderr)
        assert "PatientName" in result.stdout


@pytest.mark.parametrize(
    "ts,tool",
    [
        (RLELossless, ["dcmdrle"]),
        (ExplicitVRBigEndian, ["dcmconv", "+te"]),
        (DeflatedExplicitVRLittleEndian, ["dcmconv", "+te"]),
        (ImplicitVRLittleEndian, ["dcmconv", "+te"]),
    ],
    ids=["rle", "big-endian", "deflated", "implicit"],
)
def test_dcmtk_decodes_to_the_same_pixels(tmp_path, mixed, ts, tool):
    """An independent decoder (dcmtk) agrees, e.g. on the big endian byte swapping."""
    if not have_dcmtk(tool[0]):
        pytest.skip("dcmtk not installed")
    folder, specs = mixed
    path = _one_file_per_syntax(folder)[ts]
    out = tmp_path / "decoded.dcm"
    result = subprocess.run(
        [dcmtk(tool[0]), *tool[1:], str(path), str(out)], capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    study, si, ii = _locate(specs, ds)
    assert str(ds.PatientName) == study.patient_name
    np.testing.assert_array_equal(ds.pixel_array, expected_pixels(study, si, ii, seed=SEED))
