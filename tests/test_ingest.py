"""The ingest pipeline: what is accepted is durable and indexed; what is
refused gets a clear reason and leaves everything already stored intact."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.uid import generate_uid

from archive.config import Config
from archive.identity import Source
from archive.index import StoreOutcome
from archive.index.catalog import Origin
from archive.runtime import Archive
from tests.dicomfiles import make_instance
from tests.s3server import StoreUnderTest
from tests.statements import statements_run

SOURCE = Source(kind="import", site="SITE-A")


@pytest.fixture
def stored_config(
    make_config: Callable[..., Config], index_url: str, store_under_test: StoreUnderTest
) -> Callable[..., Config]:
    """``make_config`` on this index and on each object store (a folder, an S3
    bucket): the pipeline writes, checks and removes objects the same way in both."""

    def make(settings: dict | None = None) -> Config:
        return make_config(
            index_url=index_url, settings={**store_under_test.overrides(), **(settings or {})}
        )

    return make


@pytest.fixture
def archive(stored_config: Callable[..., Config]) -> Iterator[Archive]:
    """conftest's archive, on each object store as well as each index."""
    with Archive(stored_config()) as arch:
        yield arch


def snapshot(archive: Archive) -> tuple:
    """Everything stored: counts, and every object's bytes by key."""
    objects = {k: archive.store.get(k) for k in archive.store.iter_keys()}
    return archive.catalog.counts(), objects


def test_an_accepted_instance_is_stored_bit_identical_and_indexed(archive: Archive) -> None:
    data = make_instance()
    result = archive.pipeline.ingest(data, SOURCE)
    assert result.ok and result.outcome is StoreOutcome.STORED
    assert archive.store.get(result.object_key) == data
    stored = archive.catalog.find_instance(result.sop_instance_uid)
    assert stored.sha256 == hashlib.sha256(data).digest()
    assert stored.size == len(data)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    row = archive.db.query_one(
        "SELECT p.issuer, p.patient_id, st.site, se.modality, i.stored_ts, i.original_ts "
        "FROM instances i JOIN series se ON se.id = i.series_ref "
        "JOIN studies st ON st.id = se.study_ref JOIN patients p ON p.id = st.patient_ref"
    )
    assert row == (
        "SITE-A",
        ds.PatientID,
        "SITE-A",
        "CT",
        ds.file_meta.TransferSyntaxUID,
        ds.file_meta.TransferSyntaxUID,
    )


def test_resending_identical_bytes_is_an_idempotent_success(archive: Archive) -> None:
    data = make_instance()
    first = archive.pipeline.ingest(data, SOURCE)
    before = snapshot(archive)
    again = archive.pipeline.ingest(data, SOURCE)
    assert again.ok and again.outcome is StoreOutcome.DUPLICATE
    assert again.object_key == first.object_key
    assert snapshot(archive) == before


def test_a_different_object_under_a_known_uid_is_kept_by_default(archive: Archive) -> None:
    data = make_instance()
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    first = archive.pipeline.ingest(data, SOURCE)
    before = snapshot(archive)
    ds.StudyDescription = "changed"
    other = archive.pipeline.ingest(_encode(ds), SOURCE)
    # kept, and not reported as stored: the object sent was discarded
    assert not other.ok and other.outcome is StoreOutcome.KEPT
    assert other.code == "conflict" and "was not stored" in other.reason
    assert snapshot(archive) == before
    assert archive.store.get(first.object_key) == data


def test_replace_policy_swaps_the_object_and_removes_the_old_one(
    stored_config: Callable[..., Config],
) -> None:
    with Archive(stored_config({"ingest.on_conflict": "replace"})) as archive:
        data = make_instance()
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        first = archive.pipeline.ingest(data, SOURCE)
        ds.StudyDescription = "corrected"
        new = _encode(ds)
        second = archive.pipeline.ingest(new, SOURCE)
        assert second.outcome is StoreOutcome.REPLACED
        assert list(archive.store.iter_keys()) == [second.object_key]
        assert not archive.store.exists(first.object_key)
        assert archive.store.get(second.object_key) == new
        assert archive.catalog.counts()["instances"] == 1
        assert archive.catalog.counts()["bytes"] == len(new)


def _encode(ds: pydicom.FileDataset) -> bytes:
    from tests.dicomfiles import encode

    return encode(ds)


def _drop(keyword: str) -> Callable[[pydicom.FileDataset], None]:
    def edit(ds: pydicom.FileDataset) -> None:
        delattr(ds, keyword)

    return edit


def _set(keyword: str, value: str) -> Callable[[pydicom.FileDataset], None]:
    def edit(ds: pydicom.FileDataset) -> None:
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value

    return edit


BAD_INPUTS = {
    "truncated pixel data": (lambda: make_instance()[:-1000], "truncated", "truncated"),
    "truncated inside the header": (lambda: make_instance()[:699], "truncated", "truncated"),
    "non-DICOM bytes": (lambda: b"%PDF-1.7 this is not an image" * 20, "not-dicom", "DICM"),
    "empty": (lambda: b"", "not-dicom", "DICM"),
    "missing SOP Instance UID": (
        lambda: make_instance(_drop("SOPInstanceUID")),
        "missing-attribute",
        "SOPInstanceUID",
    ),
    "missing Study Instance UID": (
        lambda: make_instance(_drop("StudyInstanceUID")),
        "missing-attribute",
        "StudyInstanceUID",
    ),
    "missing Series Instance UID": (
        lambda: make_instance(_drop("SeriesInstanceUID")),
        "missing-attribute",
        "SeriesInstanceUID",
    ),
    "UID with letters": (
        lambda: make_instance(_set("SOPInstanceUID", "1.2.abc.4")),
        "invalid-uid",
        "SOPInstanceUID",
    ),
    "UID with path separators": (
        lambda: make_instance(_set("StudyInstanceUID", "1.2/../../etc")),
        "invalid-uid",
        "StudyInstanceUID",
    ),
    "UID too long": (
        lambda: make_instance(_set("SeriesInstanceUID", "1." + "2" * 70)),
        "invalid-uid",
        "at most 64",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_a_reason_and_changes_nothing(
    archive: Archive, case: str
) -> None:
    kept = make_instance()
    archive.pipeline.ingest(kept, SOURCE)
    before = snapshot(archive)
    build, code, words = BAD_INPUTS[case]
    result = archive.pipeline.ingest(build(), SOURCE)
    assert not result.ok
    assert result.code == code, result.reason
    assert words in result.reason
    assert snapshot(archive) == before


def test_an_object_over_the_size_limit_is_refused(
    stored_config: Callable[..., Config],
) -> None:
    with Archive(stored_config({"ingest.max_object_bytes": 10_000})) as archive:
        result = archive.pipeline.ingest(make_instance(), SOURCE)
        assert (result.ok, result.code) == (False, "too-large")
        assert "ingest.max_object_bytes" in result.reason
        assert archive.catalog.counts()["instances"] == 0
        assert list(archive.store.iter_keys()) == []


def test_an_unreachable_object_store_refuses_and_indexes_nothing(
    make_config: Callable[..., Config], tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real S3 client against a port where nothing listens."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    config = make_config(
        storage_url="s3://bucket/prefix",
        settings={"s3.endpoint_url": "http://127.0.0.1:9", "s3.region": "x"},
    )
    with Archive(config) as archive:
        result = archive.pipeline.ingest(make_instance(), SOURCE)
        assert (result.ok, result.code) == (False, "storage-error")
        assert archive.catalog.counts()["instances"] == 0


def test_same_local_patient_id_at_two_sites_without_issuer_stays_two_patients(
    archive: Archive,
) -> None:
    def no_issuer(ds: pydicom.FileDataset) -> None:
        ds.PatientID = "12345"
        if "IssuerOfPatientID" in ds:
            del ds.IssuerOfPatientID

    archive.pipeline.ingest(make_instance(no_issuer), Source("import", site="A"))
    archive.pipeline.ingest(make_instance(no_issuer), Source("import", site="B"))
    assert archive.catalog.counts()["patients"] == 2


@pytest.mark.parametrize(
    "case", ["valid", "truncated pixel data", "truncated header", "trailing element cut"]
)
def test_file_ingest_streams_and_checks_framing_like_the_in_memory_path(
    archive: Archive, tmp_path, case: str
) -> None:
    """Objects over ingest.stream_threshold are parsed header-only and
    streamed; completeness is judged from the pixel data framing instead."""
    data = make_instance()
    cut = {
        "valid": data,
        "truncated pixel data": data[:-1000],
        "truncated header": data[:699],
        "trailing element cut": data[:-1],
    }[case]
    path = tmp_path / "object.dcm"
    path.write_bytes(cut)
    in_memory = archive.pipeline.prepare(cut, SOURCE)
    streamed = archive.pipeline.ingest_file(path, SOURCE)
    if case == "valid":
        assert streamed.ok and streamed.outcome is StoreOutcome.STORED
        assert archive.store.get(streamed.object_key) == data
    else:
        assert not streamed.ok and streamed.code == "truncated", streamed.reason
        assert not getattr(in_memory, "ok", True) or in_memory.outcome is None
        assert archive.catalog.counts()["instances"] == 0


def test_a_c_store_audit_entry_names_the_patient_of_the_study_the_instance_went_into(
    archive: Archive,
) -> None:
    """The C-STORE audit entry, written in the instance's transaction, names
    the patient of the study as the index holds it -- also when the instance
    names another patient (the study's is kept) -- and reads nothing more for
    it: the commit knows that patient already."""
    origin = Origin("MODALITY", "peer", role=None, source="MODALITY@127.0.0.1", site="")
    source = Source(kind="dicom", site="", calling_aet="MODALITY", origin=origin)
    study = generate_uid()

    def of(patient: str) -> Callable[[pydicom.FileDataset], None]:
        return lambda ds: setattr(ds, "PatientID", patient)

    sent = [
        make_instance(of("FIRST-1"), study=study),  # a new study, its patient FIRST-1
        make_instance(of("OTHER-2"), study=study),  # names another patient
        make_instance(of("FIRST-1"), study=study),
    ]
    with statements_run(archive.db) as statements:
        for data in sent:
            assert archive.pipeline.ingest(data, source).outcome is StoreOutcome.STORED
    entries = archive.db.query(
        "SELECT patient_id, study_uid, outcome FROM audit WHERE action = 'dicom.c-store' "
        "ORDER BY id"
    )
    assert entries == [("FIRST-1", study, "allowed")] * 3
    assert not [
        s
        for s in statements
        if "JOIN patients p ON p.id = st.patient_ref" in s and s.startswith("SELECT p.patient_id")
    ]


def test_an_index_failure_before_the_audit_entry_is_an_index_error_not_an_audit_failure(
    archive: Archive,
) -> None:
    """On PostgreSQL the commit sends its writes without waiting for each
    (one round trip for several): a refused write before the audit entry
    must still be reported as the index's failure, not the audit trail's,
    and leave nothing behind."""
    origin = Origin("MODALITY", "peer", role=None, source="MODALITY@127.0.0.1", site="")
    source = Source(kind="dicom", site="", calling_aet="MODALITY", origin=origin)
    db = archive.db
    if db.dialect == "sqlite":
        db.execute(
            "CREATE TRIGGER test_series_blocked BEFORE UPDATE ON series "
            "BEGIN SELECT RAISE(ABORT, 'series blocked by the test'); END"
        )
        unblock = ["DROP TRIGGER test_series_blocked"]
    else:
        db.execute(
            "CREATE FUNCTION test_series_blocked() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'series blocked by the test'; END $$"
        )
        db.execute(
            "CREATE TRIGGER test_series_blocked BEFORE UPDATE ON series "
            "FOR EACH ROW EXECUTE FUNCTION test_series_blocked()"
        )
        unblock = [
            "DROP TRIGGER test_series_blocked ON series",
            "DROP FUNCTION test_series_blocked()",
        ]
    failures = REGISTRY.get_sample_value(
        "imag_audit_write_failures_total", {"action": "dicom.c-store"}
    )
    data = make_instance()
    try:
        result = archive.pipeline.ingest(data, source)
    finally:
        for sql in unblock:
            db.execute(sql)
    assert (result.ok, result.code) == (False, "index-error")
    after = REGISTRY.get_sample_value(
        "imag_audit_write_failures_total", {"action": "dicom.c-store"}
    )
    assert after == failures
    assert archive.catalog.counts()["instances"] == 0
    assert db.scalar("SELECT COUNT(*) FROM audit WHERE action = 'dicom.c-store'") == 0
    # and once the index takes writes again the same instance is stored
    assert archive.pipeline.ingest(data, source).outcome is StoreOutcome.STORED
