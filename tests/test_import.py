"""`imag import` of a mixed folder, on SQLite and PostgreSQL, with the
filesystem and the S3 store: every valid file indexed with the right
attributes and counts, every stored object bit-identical and verified."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from archive.config import Config
from archive.importer import iter_files, run_import
from archive.runtime import Archive
from archive.synthetic import StudySpec, generate_mixed_set
from archive.verify import verify
from tests.dicomfiles import pydicom_test_folders

# Files among pydicom's test data that are not importable instances, and why.
# Anything else in those folders must be accepted.
EXPECTED_REJECTIONS = {
    "ExplVR_BigEndNoMeta.dcm": "not-dicom",  # no preamble / file meta
    "ExplVR_LitEndNoMeta.dcm": "not-dicom",
    "no_meta.dcm": "not-dicom",
    "rtstruct.dcm": "not-dicom",
    "OT-PAL-8-face.dcm": "not-dicom",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "not-dicom",
    "badVR.dcm": "inconsistent-pixel-data",  # pixel data shorter than its attributes say
    "JPEGLSNearLossless_08.dcm": "missing-attribute",  # no StudyInstanceUID
    "JPEGLSNearLossless_16.dcm": "missing-attribute",
    "SC_rgb_jls_lossy_line.dcm": "missing-attribute",
    "SC_rgb_jls_lossy_sample.dcm": "missing-attribute",
    "UN_sequence.dcm": "missing-attribute",  # no SOPClassUID
    "empty_charset_LEI.dcm": "missing-attribute",
    "nested_priv_SQ.dcm": "missing-attribute",
    "no_meta_group_length.dcm": "missing-attribute",
    "priv_SQ.dcm": "missing-attribute",
    "meta_missing_tsyntax.dcm": "missing-attribute",
    "MR_truncated.dcm": "truncated",
    "rtplan_truncated.dcm": "truncated",
    "bad_sequence.dcm": "invalid-uid",  # SOPInstanceUID is a hex digest
    "DICOMDIR": "dicomdir",
    "DICOMDIR-bigEnd": "dicomdir",
    "DICOMDIR-empty.dcm": "dicomdir",
    "DICOMDIR-implicit": "dicomdir",
    "DICOMDIR-nooffset": "dicomdir",
    "DICOMDIR-nopatient": "dicomdir",
    "DICOMDIR-reordered": "dicomdir",
}
NOT_DICOM_SUFFIXES = (".txt", ".json", ".dump", ".gz", ".icc", "README")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[StudySpec]]:
    """pydicom's test files plus two generated multi-study, multi-modality sets
    in several transfer syntaxes (Latin-1 and UTF-8 names included)."""
    root = tmp_path_factory.mktemp("mixed")
    for i, folder in enumerate(pydicom_test_folders()):
        shutil.copytree(folder, root / f"pydicom-{i}")
    specs = generate_mixed_set(root / "generated-a", seed=1)
    specs += generate_mixed_set(root / "generated-b", seed=2, studies=4)
    return root, specs


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    if request.param == "filesystem":
        return (tmp_path / "objects").as_uri(), {}
    bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_env")
    return f"s3://{bucket}/archive", {"s3.endpoint_url": endpoint, "s3.region": "us-east-1"}


@pytest.mark.slow
def test_import_of_a_mixed_folder_indexes_every_valid_file(
    mixed: tuple[Path, list[StudySpec]],
    make_config: Callable[..., Config],
    index_url: str,
    storage_url: tuple[str, dict],
) -> None:
    root, specs = mixed
    url, settings = storage_url
    config = make_config(index_url=index_url, storage_url=url, settings=settings)
    with Archive(config) as archive:
        summary = run_import(archive, [root], site="REGION", workers=2)

        # every rejection is an expected one, with a reason
        rejected = {Path(p).name: code for p, code, _ in summary.rejected}
        for name, code in rejected.items():
            if name.endswith(NOT_DICOM_SUFFIXES):
                assert code == "not-dicom"
            else:
                assert EXPECTED_REJECTIONS.get(name) == code, (name, code)
        assert all(reason for _, _, reason in summary.rejected)
        accepted = summary.stored + summary.duplicate + summary.kept
        assert accepted + len(summary.rejected) == summary.files
        assert summary.files == sum(1 for _ in iter_files([root]))

        # every object the index names re-reads bit-identical to one of the files
        by_sop: dict[str, set[bytes]] = {}
        for path in iter_files([root]):
            if Path(path).name in rejected:
                continue
            data = Path(path).read_bytes()
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            by_sop.setdefault(str(uid), set()).add(hashlib.sha256(data).digest())
        instances = list(archive.catalog.iter_instances())
        assert {i.sop_instance_uid for i in instances} == set(by_sop)
        for inst in instances:
            data = archive.store.get(inst.object_key)
            assert hashlib.sha256(data).digest() == inst.sha256
            assert inst.sha256 in by_sop[inst.sop_instance_uid]

        # the generated studies: counts, patients (issuer + ID), names, modalities
        db = archive.db
        for spec in specs:
            row = db.query_one(
                "SELECT st.num_series, st.num_instances, st.modalities, st.site, "
                "st.accession_number, p.patient_id, p.issuer, p.patient_name "
                "FROM studies st JOIN patients p ON p.id = st.patient_ref "
                "WHERE st.study_uid = ?",
                (str(spec.study_uid),),
            )
            assert row is not None, spec.study_uid
            n_series, n_inst, modalities, site, accession, pid, issuer, name = row
            assert (n_series, n_inst) == (len(spec.series), spec.instance_count)
            assert set(modalities.split("\\")) == {s.modality for s in spec.series}
            assert site == "REGION"
            assert accession == spec.accession_number
            assert (pid, name) == (spec.patient_id, spec.patient_name)
            assert issuer == (spec.issuer_of_patient_id or "REGION")
        keys = Counter(s.patient_key for s in specs)
        same_id = [k for k in keys if sum(1 for o in keys if o[0] == k[0]) > 1]
        assert same_id, "the generated set has one PatientID under two issuers"
        for pid, _ in same_id:
            assert db.scalar("SELECT COUNT(*) FROM patients WHERE patient_id = ?", (pid,)) == 2

        # counters agree with the rows
        assert db.scalar("SELECT SUM(num_instances) FROM studies") == db.scalar(
            "SELECT COUNT(*) FROM instances"
        )
        assert db.scalar("SELECT SUM(total_bytes) FROM series") == db.scalar(
            "SELECT SUM(size) FROM instances"
        )

        assert verify(archive.catalog, archive.store).clean

        # a second run finds everything already stored
        again = run_import(archive, [root], site="REGION", workers=2)
        assert again.stored == 0
        assert again.duplicate + again.kept == accepted
