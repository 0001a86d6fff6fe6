"""The same data set arriving by two paths is one instance, whatever its file meta.

A C-STORE receiver builds the file meta itself (pynetdicom's
``encoded_dataset``: its own implementation UID and version, no source AE
title, a zero preamble); STOW-RS and ``imag import`` keep the sender's.  So an
instance imported from a modality's file and sent again by storescu (or
routed again by a peer) arrives as other file bytes around the same data set:
it must be an idempotent duplicate (C-STORE 0x0000, STOW-RS 200, import
"already stored"), not a conflict (0xB006 / 409), and nothing stored changes.
A genuinely different data set under that SOP Instance UID stays a conflict,
and so does the same data set with other pixel bytes (another pixel
encoding).  The same values re-encoded by the relay (storescu drops the
trailing padding, writes sequence lengths, sends Implicit VR as Explicit VR)
are the same content: tests/test_usability.py sends such files.

The files sent by dcmtk's storescu here carry no trailing padding
(FFFC,FFFC), so that their data set bytes arrive unchanged and the data set
digest is what recognises them.  The network tests run against the real
``imag serve`` nodes of :mod:`tests.test_ownership` (its ``world`` fixture,
SQLite and PostgreSQL); the others on an in-process archive.
"""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import encode_file_meta

import archive.ingest
from archive.config import Config
from archive.identity import Source
from archive.index import StoreOutcome, open_database
from archive.index.migrate import upgrade
from archive.ingest import Prepared, digests_of_bytes, digests_of_file
from archive.parse import dataset_offset
from archive.runtime import Archive
from tests.dicomfiles import base_dataset
from tests.dicomnet import SERVER_AET, run_tool, storescu_profile
from tests.processes import HOST
from tests.s3server import StoreUnderTest, index_for_store
from tests.test_ownership import World, imag_import, open_world, still_serving, stow

pytestmark = pytest.mark.s3_on_sqlite  # the world runs on a folder and on an S3 bucket

STORESCU = "storescu"  # dcmtk's, by path (run_tool)
FOREIGN_IMPLEMENTATION = "1.2.826.0.1.3680043.9.7433.1.1"
FOREIGN_PREAMBLE = b"FOREIGN-PACS-PREAMBLE".ljust(128, b"\x01")


@pytest.fixture(scope="module")
def world(
    module_index_url: str,
    module_store: StoreUnderTest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    """The nodes of :mod:`tests.test_ownership`, for this module, on each object
    store (a folder, an S3 bucket: S3 on the SQLite index, see s3_on_sqlite)."""
    index_url = index_for_store(module_index_url, module_store)
    with open_world(index_url, tmp_path_factory.mktemp("same"), module_store) as opened:
        yield opened


def foreign_file(
    study: str, series: str, sop: str | None = None, *, implicit: bool = False, **attrs: str
) -> bytes:
    """A CT instance as another vendor's system writes it: its own preamble,
    implementation UID and version, and source AE title in the file meta
    (with its group length), no trailing padding (see the module docstring)."""
    ds = base_dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = sop or generate_uid()
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    meta = ds.file_meta
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = FOREIGN_IMPLEMENTATION
    meta.ImplementationVersionName = "FOREIGN_PACS_7"
    meta.SourceApplicationEntityTitle = "CT_SCANNER_3"
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return FOREIGN_PREAMBLE + buf.getvalue()[128:]


def data_set(data: bytes) -> bytes:
    """The bytes after the File Meta Information group."""
    return data[dataset_offset(io.BytesIO(data)) :]


def as_a_c_store_receiver_writes_it(data: bytes) -> bytes:
    """The object a pynetdicom C-STORE receiver makes of ``data``: its own
    preamble and file meta (as ``Event.encoded_dataset`` builds them), the
    data set bytes as sent."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    return b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + data_set(data)


def storescu(world: World, data: bytes, aet: str = "SITE_A") -> str:
    """Send ``data`` (written to a file) with dcmtk's storescu, proposing its
    own transfer syntax; storescu's verbose output."""
    path = world.workdir / f"push-{generate_uid()}.dcm"
    path.write_bytes(data)
    profile = storescu_profile([path], path.with_suffix(".cfg"))
    done = run_tool(
        STORESCU,
        "-v",
        "-xf",
        str(profile),
        "Push",
        "-aec",
        SERVER_AET,
        "-aet",
        aet,
        HOST,
        str(world.keep.dicom_port),
        str(path),
        timeout=60,
    )
    assert done.returncode == 0, done.stdout
    return done.stdout


def stored_row(world: World, sop: str) -> tuple:
    return world.db.query_one(
        "SELECT object_key, sha256, dataset_sha256 FROM instances WHERE sop_instance_uid = ?",
        (sop,),
    )


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- over the network: import, storescu, STOW-RS ---------------------------------------------


def test_an_imported_instance_sent_again_by_storescu_is_a_duplicate_and_changes_nothing(
    world: World,
) -> None:
    study, series = generate_uid(), generate_uid()
    data = foreign_file(study, series)
    sop = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    assert imag_import(world, "A", data)["stored"] == 1
    key, whole, dataset = stored_row(world, sop)
    assert world.store.get(key) == data  # stored as imported, the foreign file meta with it
    # stored as received: only its whole digest now, the data set's when a comparison needs it
    assert (bytes(whole), dataset) == (sha(data), None)
    before = world.snapshot()
    last = world.last_audit_id()

    out = storescu(world, data)

    assert "Received Store Response (Success)" in out, out
    [entry] = world.audit_since(last)
    assert (entry["actor"], entry["action"], entry["outcome"], entry["status"]) == (
        "SITE_A",
        "dicom.c-store",
        "allowed",
        0x0000,
    )
    assert (entry["detail"]["result"], entry["detail"]["instances"]) == ("duplicate", [sop])
    assert world.snapshot() == before
    assert world.store.get(key) == data
    still_serving(world)


@pytest.mark.parametrize("threshold", ["64MiB", "1"], ids=["in-memory", "streamed"])
def test_an_instance_stored_by_c_store_is_already_stored_for_import_and_stow(
    world: World, threshold: str
) -> None:
    """C-STORE first (the receiver's file meta), then the modality's file by
    ``imag import`` (read whole, or streamed through ``prepare_file``) and by
    STOW-RS: both are told it is already stored."""
    study, series = generate_uid(), generate_uid()
    data = foreign_file(study, series)
    sop = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    last = world.last_audit_id()
    assert "Received Store Response (Success)" in storescu(world, data)
    [entry] = world.audit_since(last)
    assert (entry["detail"]["result"], entry["status"]) == ("stored", 0x0000)
    key, whole, dataset = stored_row(world, sop)
    stored = world.store.get(key)
    assert stored != data and data_set(stored) == data_set(data)  # another file, one data set
    assert (bytes(whole), dataset) == (sha(stored), None)  # the data set's read back if needed
    meta = pydicom.dcmread(io.BytesIO(stored), stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID != FOREIGN_IMPLEMENTATION
    before = world.snapshot()
    last = world.last_audit_id()

    summary = imag_import(world, "A", data, settings={"IMAG_INGEST_STREAM_THRESHOLD": threshold})
    assert (summary["duplicate"], summary["stored"], summary["conflict_kept"]) == (1, 0, 0)
    assert summary["rejected"] == 0, summary
    assert world.audit_since(last) == []  # imag import is not audited per instance

    answer = stow(world, "tech-a", data)
    assert answer.status_code == 200, answer.text
    assert answer.json()["00081199"]["Value"][0]["00081155"]["Value"] == [sop]
    assert "00081198" not in answer.json()
    [entry] = world.audit_since(last)
    assert (entry["action"], entry["outcome"], entry["status"]) == ("stow.store", "allowed", 200)

    assert world.snapshot() == before
    assert world.store.get(key) == stored
    still_serving(world)


@pytest.mark.parametrize("path", ["storescu", "stow"])
@pytest.mark.parametrize(
    "variant", ["different-data-set", "other-pixel-encoding"], ids=["different", "rle"]
)
def test_a_different_data_set_under_the_uid_is_still_a_conflict(
    world: World, path: str, variant: str
) -> None:
    """After an import, another data set under its SOP Instance UID (another
    value, or the same values with RLE-compressed pixel data) is a conflict,
    kept out: C-STORE warning 0xB006, STOW-RS 409 with 0x0111."""
    study, series = generate_uid(), generate_uid()
    data = foreign_file(study, series)
    sop = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    assert imag_import(world, "A", data)["stored"] == 1
    if variant == "different-data-set":
        other = foreign_file(study, series, sop, StudyDescription="another data set")
    else:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.compress(RLELossless, generate_instance_uid=False)  # the same instance
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        other = buf.getvalue()
        same = pydicom.dcmread(io.BytesIO(other))
        assert same.SOPInstanceUID == sop
        assert same.StudyDescription == pydicom.dcmread(io.BytesIO(data)).StudyDescription
    assert data_set(other) != data_set(data)
    key = stored_row(world, sop)[0]
    before = world.snapshot()
    last = world.last_audit_id()
    if path == "storescu":
        out = storescu(world, other)
        assert "Received Store Response (Warning" in out, out
        [entry] = world.audit_since(last)
        assert (entry["action"], entry["outcome"], entry["status"]) == (
            "dicom.c-store",
            "failed",
            0xB006,
        )
        assert (entry["detail"]["code"], entry["detail"]["instances"]) == ("conflict", [sop])
    else:
        answer = stow(world, "tech-a", other)
        assert answer.status_code == 409, answer.text
        [failed] = answer.json()["00081198"]["Value"]
        assert (failed["00081155"]["Value"], failed["00081197"]["Value"]) == ([sop], [0x0111])
        [entry] = world.audit_since(last)
        assert (entry["action"], entry["outcome"], entry["status"]) == ("stow.store", "failed", 409)
    assert world.snapshot() == before
    assert world.store.get(key) == data
    still_serving(world)


def test_a_row_stored_without_data_set_digests_recognises_its_data_set_from_the_stored_object(
    world: World,
) -> None:
    """An instance whose row has no data set or content digest (indexed
    before those columns, or stored as received, which now records only the
    whole-object digest): the same bytes stay a duplicate, the same data set
    under a receiver's file meta is recognised from the stored object and is
    a duplicate too; another object under its SOP Instance UID (the
    adversary: one value changed) is still a kept conflict."""
    study, series = generate_uid(), generate_uid()
    sop = generate_uid()
    data = foreign_file(study, series, sop)
    assert stow(world, "tech-a", data).status_code == 200
    world.db.execute(
        "UPDATE instances SET dataset_sha256 = NULL, content_sha256 = NULL "
        "WHERE sop_instance_uid = ?",
        (sop,),
    )
    before = world.snapshot()
    last = world.last_audit_id()
    answer = stow(world, "tech-a", data)
    assert answer.status_code == 200, answer.text
    assert "Received Store Response (Success)" in storescu(world, data)
    assert "Received Store Response (Warning" in storescu(
        world, foreign_file(study, series, sop, PatientName="OTHER^VALUE")
    )
    first, second, third = world.audit_since(last)
    assert (first["action"], first["outcome"], first["status"]) == ("stow.store", "allowed", 200)
    assert (second["action"], second["status"], second["detail"]["result"]) == (
        "dicom.c-store",
        0x0000,
        "duplicate",
    )
    assert (third["action"], third["status"], third["detail"]["code"]) == (
        "dicom.c-store",
        0xB006,
        "conflict",
    )
    assert world.snapshot() == before
    still_serving(world)


# -- in process: the commit's own check, transcoding, the digests ----------------------------


def test_the_commit_recognises_the_same_data_set_prepared_twice_at_once(
    make_config: Callable[..., Config], index_url: str
) -> None:
    """Two copies of one data set (a file, and what a C-STORE receiver made of
    it) both prepared before either commits: the commit's in-transaction check
    stores one and answers the other as a duplicate, whose object goes."""
    data = foreign_file(generate_uid(), generate_uid())
    received = as_a_c_store_receiver_writes_it(data)
    assert received != data and data_set(received) == data_set(data)
    with Archive(make_config(index_url=index_url)) as archive:
        source = Source("stow", site="A")
        steps = [archive.pipeline.prepare(d, source) for d in (data, received)]
        assert all(isinstance(step, Prepared) for step in steps)
        results = [archive.pipeline.commit(step).result() for step in steps]
        assert [r.outcome for r in results] == [StoreOutcome.STORED, StoreOutcome.DUPLICATE]
        assert all(r.ok for r in results)
        assert results[1].object_key == results[0].object_key
        assert list(archive.store.iter_keys()) == [results[0].object_key]
        assert archive.store.get(results[0].object_key) == data
        # and afterwards, each is a duplicate at prepare time
        for d in (data, received):
            again = archive.pipeline.ingest(d, source)
            assert (again.outcome, again.ok) == (StoreOutcome.DUPLICATE, True)
        assert archive.catalog.counts()["instances"] == 1


def test_a_transcoded_instance_keeps_the_digest_of_the_data_set_as_received(
    make_config: Callable[..., Config], index_url: str
) -> None:
    data = foreign_file(generate_uid(), generate_uid())
    settings = {"store_as": "rle-lossless"}
    with Archive(make_config(index_url=index_url, settings=settings)) as archive:
        result = archive.pipeline.ingest(data, Source("import", site="A"))
        assert result.outcome is StoreOutcome.STORED
        row = archive.db.query_one(
            "SELECT stored_ts, sha256, original_sha256, dataset_sha256 FROM instances"
        )
        assert row[0] == RLELossless
        stored = archive.store.get(result.object_key)
        assert bytes(row[1]) == sha(stored)  # what imag verify checks
        assert (bytes(row[2]), bytes(row[3])) == (sha(data), sha(data_set(data)))
        again = archive.pipeline.ingest(as_a_c_store_receiver_writes_it(data), Source("c-store"))
        assert again.outcome is StoreOutcome.DUPLICATE
        assert list(archive.store.iter_keys()) == [result.object_key]


def test_the_upgrade_leaves_older_rows_without_a_data_set_digest_compared_as_before(
    make_config: Callable[..., Config], index_url: str
) -> None:
    """Migration 0010 adds the nullable column to an index of version 9 and
    keeps its rows; an older row whose object cannot be read (none in the
    store here) is compared by its whole-object digest: the same bytes are a
    duplicate, the same data set under a receiver's file meta a conflict
    (there is no data set digest to compare, and none can be read)."""
    data = foreign_file(generate_uid(), generate_uid())
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    db = open_database(index_url)
    try:
        upgrade(db, until=9)
        with db.transaction():
            patient = db.scalar(
                "INSERT INTO patients (site, issuer, patient_id, created_at) "
                "VALUES ('A', '', 'P1', '2024-01-01') RETURNING id"
            )
            study = db.scalar(
                "INSERT INTO studies (patient_ref, study_uid, site, num_series, num_instances, "
                "created_at, updated_at) VALUES (?, ?, 'A', 1, 1, '2024-01-01', '2024-01-01') "
                "RETURNING id",
                (patient, str(ds.StudyInstanceUID)),
            )
            series = db.scalar(
                "INSERT INTO series (study_ref, series_uid, num_instances, created_at, "
                "updated_at) VALUES (?, ?, 1, '2024-01-01', '2024-01-01') RETURNING id",
                (study, str(ds.SeriesInstanceUID)),
            )
            db.execute(
                "INSERT INTO instances (series_ref, sop_instance_uid, sop_class_uid, stored_ts, "
                "original_ts, object_key, size, sha256, received_at) "
                "VALUES (?, ?, ?, ?, ?, 'old/key.dcm', ?, ?, '2024-01-01')",
                (
                    series,
                    str(ds.SOPInstanceUID),
                    str(ds.SOPClassUID),
                    ExplicitVRLittleEndian,
                    ExplicitVRLittleEndian,
                    len(data),
                    sha(data),
                ),
            )
        assert "0010_dataset_digest.sql" in upgrade(db)
        assert db.query("SELECT object_key, dataset_sha256 FROM instances") == [
            ("old/key.dcm", None)
        ]
    finally:
        db.close()
    with Archive(make_config(index_url=index_url)) as archive:
        known = archive.catalog.find_instance(str(ds.SOPInstanceUID))
        assert known is not None and known.dataset_sha256 is None
        assert known.matches(sha(data), sha(data_set(data)))
        source = Source("stow", site="A")
        assert archive.pipeline.ingest(data, source).outcome is StoreOutcome.DUPLICATE
        other = archive.pipeline.ingest(as_a_c_store_receiver_writes_it(data), source)
        assert (other.outcome, other.code) == (StoreOutcome.KEPT, "conflict")
        assert list(archive.store.iter_keys()) == []  # nothing written for either


@pytest.mark.parametrize("chunk", [7, 131, 4096, 1 << 20])
def test_both_digests_of_a_file_match_those_of_its_bytes_at_any_chunk_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """The data set start falls anywhere in a chunk, or past the first ones."""
    data = foreign_file(generate_uid(), generate_uid())
    start = dataset_offset(io.BytesIO(data))
    path = tmp_path / "one.dcm"
    path.write_bytes(data)
    monkeypatch.setattr(archive.ingest, "HASH_CHUNK", chunk)
    with path.open("rb") as fp:
        assert dataset_offset(fp) == start
        from_file = digests_of_file(fp, start)
    assert from_file == digests_of_bytes(data, start)
    assert (from_file.whole, from_file.dataset) == (sha(data), sha(data[start:]))


def test_a_large_file_is_hashed_in_bounded_memory(tmp_path: Path) -> None:
    """Both digests of a 48 MiB object come from one chunked read: the memory
    allocated meanwhile stays near one chunk, far below the object's size."""
    head = foreign_file(generate_uid(), generate_uid())
    start = dataset_offset(io.BytesIO(head))
    path = tmp_path / "large.dcm"
    with path.open("wb") as out:
        out.write(head)
        block = bytes(range(256)) * 4096
        for _ in range(48):
            out.write(block)
    tracemalloc.start()
    try:
        with path.open("rb") as fp:
            digests = digests_of_file(fp, start)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * archive.ingest.HASH_CHUNK + (1 << 16), peak
    whole, dataset = hashlib.sha256(head), hashlib.sha256(head[start:])
    for _ in range(48):
        whole.update(block)
        dataset.update(block)
    assert (digests.whole, digests.dataset) == (whole.digest(), dataset.digest())
