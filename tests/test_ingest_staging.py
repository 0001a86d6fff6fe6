"""The ingest pipeline writes a new instance's object while it hashes it
(:meth:`storage.ObjectStore.stage`) and reads the data set offset from its
one header parse: what it stores, indexes and answers stays what it was.

The adversaries: a disk failing under the staged write, a failure after the
write began, several senders racing with one new instance.  Each leaves no
temporary file, no object and no index row that should not be there."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom.dsutils import encode_file_meta

from archive import ingest as ingest_module
from archive.config import Config
from archive.identity import Source
from archive.index import StoreOutcome
from archive.parse import dataset_offset, parse_header, parse_header_file
from archive.runtime import Archive
from storage import ObjectStore, StorageError
from storage.filesystem import TEMP_PREFIX, FilesystemStore
from storage.s3 import S3Store
from tests.dicomfiles import make_instance
from tests.hostile import valid_objects

SOURCE = Source(kind="import", site="SITE-A")


def temporary_files(store: FilesystemStore) -> list[Path]:
    """Every unfinished write left in a filesystem store."""
    return [p for p in store.root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def snapshot(archive: Archive) -> tuple:
    return archive.catalog.counts(), {k: archive.store.get(k) for k in archive.store.iter_keys()}


def test_new_instances_are_stored_bit_identical_with_correct_digests_and_no_temporary_file(
    archive: Archive,
) -> None:
    study, series = generate_uid(), generate_uid()
    sent = [make_instance(study=study, series=series) for _ in range(5)]
    for data in sent:
        result = archive.pipeline.ingest(data, SOURCE)
        assert result.ok and result.outcome is StoreOutcome.STORED
        assert archive.store.get(result.object_key) == data
        row = archive.catalog.find_instance(result.sop_instance_uid)
        assert row.sha256 == hashlib.sha256(data).digest()
        # stored as received: the data set and content digests are read back when needed
        assert (row.dataset_sha256, row.content_sha256) == (None, None)
    assert temporary_files(archive.store) == []
    # the digests are what duplicate detection compares: a re-send is a
    # duplicate, and so is its data set under another file meta
    again = archive.pipeline.ingest(sent[0], SOURCE)
    assert again.outcome is StoreOutcome.DUPLICATE
    meta = pydicom.dcmread(io.BytesIO(sent[1]), stop_before_pixels=True).file_meta
    meta.ImplementationClassUID, meta.ImplementationVersionName = "1.2.3.4", "ANOTHER"
    start = dataset_offset(io.BytesIO(sent[1]))
    relayed = b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + sent[1][start:]
    assert relayed != sent[1]
    assert archive.pipeline.ingest(relayed, SOURCE).outcome is StoreOutcome.DUPLICATE
    assert archive.catalog.counts()["instances"] == len(sent)


def test_a_disk_failing_under_the_staged_write_refuses_and_stores_nothing(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = generate_uid()
    archive.pipeline.ingest(make_instance(study=study), SOURCE)
    before = snapshot(archive)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    result = archive.pipeline.ingest(make_instance(study=study), SOURCE)
    monkeypatch.undo()
    assert not result.ok and result.code == "storage-error"
    assert "could not be stored" in result.reason
    assert snapshot(archive) == before
    assert temporary_files(archive.store) == []


def test_a_failure_after_the_write_began_removes_the_staged_object(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(archive)

    def broken(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("index attributes unreadable")

    monkeypatch.setattr(ingest_module, "index_fields", broken)
    with pytest.raises(RuntimeError, match="unreadable"):
        archive.pipeline.ingest(make_instance(), SOURCE)
    assert snapshot(archive) == before
    assert temporary_files(archive.store) == []


def test_senders_racing_with_one_new_instance_store_one_object(archive: Archive) -> None:
    data = make_instance()
    start = threading.Barrier(6)
    results = []

    def send() -> None:
        start.wait()
        results.append(archive.pipeline.ingest(data, SOURCE))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in results)
    assert {r.object_key for r in results} == set(archive.store.iter_keys())
    assert len(set(archive.store.iter_keys())) == 1
    assert archive.catalog.counts()["instances"] == 1
    assert temporary_files(archive.store) == []


def test_a_new_object_is_written_while_its_header_is_parsed(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staged write starts before the header parse ends (the parse waits
    here until the write has begun; it would wait for ever -- the timeout --
    if the write began only after it)."""
    writing = threading.Event()
    stage = archive.store.stage

    def watched_stage(data: bytes, near: str):  # noqa: ANN202 - a StagedPut
        writing.set()
        return stage(data, near)

    def parse_once_writing(data: bytes, limits: object = None):  # noqa: ANN202 - a Header
        assert writing.wait(10), "the object was not being written while its header was parsed"
        return parse_header(data, limits)

    monkeypatch.setattr(archive.store, "stage", watched_stage)
    monkeypatch.setattr(ingest_module, "parse_header", parse_once_writing)
    data = make_instance()
    result = archive.pipeline.ingest(data, SOURCE)
    assert result.outcome is StoreOutcome.STORED
    assert archive.store.get(result.object_key) == data
    assert temporary_files(archive.store) == []


class _HeldCommit:
    """A staged object whose commit (rename to its key, folder fsync) waits
    for ``release``, then does what ``then`` says: commit, or fail."""

    def __init__(self, staged: object, release: threading.Event, fail: bool) -> None:
        self.staged, self.release, self.fail = staged, release, fail

    def commit(self, key: str) -> int:
        assert self.release.wait(30), "the test never released the object's commit"
        if self.fail:
            self.staged.abort()  # type: ignore[attr-defined]
            raise StorageError(f"put {key!r}: syncing its folder failed: [Errno 5] EIO")
        return self.staged.commit(key)  # type: ignore[attr-defined]

    def abort(self) -> None:
        self.staged.abort()  # type: ignore[attr-defined]


def _hold_commits(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False
) -> tuple[threading.Event, threading.Event]:
    """Every staged object's commit held until the first event is set; the
    second is set once the index writer ran an instance's statements (its
    commit hooks run last inside the transaction, before COMMIT)."""
    release, statements_ran = threading.Event(), threading.Event()
    stage = archive.store.stage
    monkeypatch.setattr(
        archive.store, "stage", lambda data, near: _HeldCommit(stage(data, near), release, fail)
    )
    assert archive.pipeline.writer is not None
    monkeypatch.setattr(
        archive.pipeline.writer,
        "hooks",
        [*archive.pipeline.writer.hooks, lambda db, done: statements_ran.set()],
    )
    return release, statements_ran


def test_an_index_row_is_written_while_its_object_is_made_durable_and_commits_after_it(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index statements of a new instance run while its object's last
    durable steps (rename, folder fsync) are still running, and the COMMIT
    waits for them: no index row is ever visible before its object, and
    nothing is answered before both."""
    release, statements_ran = _hold_commits(archive, monkeypatch)
    data = make_instance()
    results: list = []
    sender = threading.Thread(target=lambda: results.append(archive.pipeline.ingest(data, SOURCE)))
    sender.start()
    try:
        assert statements_ran.wait(10), "the index waited for the object before its statements"
        uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        assert (
            archive.catalog.find_instance(uid) is None
        )  # not committed: its object is not in place
        assert list(archive.store.iter_keys()) == []
        assert results == []  # nothing answered
    finally:
        release.set()
        sender.join(30)
    (result,) = results
    assert result.outcome is StoreOutcome.STORED
    assert archive.catalog.find_instance(result.sop_instance_uid) is not None
    assert archive.store.get(result.object_key) == data
    assert temporary_files(archive.store) == []


def test_an_object_failing_after_its_index_statements_ran_is_refused_and_rolled_back(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adversary: the disk fails the folder fsync of an object whose
    index statements already ran.  The transaction is rolled back, the
    sender gets ``storage-error`` and the archive is as it was; the next
    instance is stored."""
    study = generate_uid()
    archive.pipeline.ingest(make_instance(study=study), SOURCE)
    before = snapshot(archive)
    release, statements_ran = _hold_commits(archive, monkeypatch, fail=True)
    release.set()
    result = archive.pipeline.ingest(make_instance(study=study), SOURCE)
    assert statements_ran.is_set()
    assert not result.ok and result.code == "storage-error"
    assert "could not be stored" in result.reason and "EIO" in result.reason
    assert snapshot(archive) == before
    assert temporary_files(archive.store) == []
    monkeypatch.undo()
    assert archive.pipeline.ingest(make_instance(study=study), SOURCE).ok
    assert archive.catalog.counts()["instances"] == 2


@pytest.mark.parametrize("label", ["truncated", "foreign site", "duplicate"])
def test_an_object_written_before_it_was_refused_or_found_stored_leaves_no_file(
    archive: Archive, label: str
) -> None:
    """The adversaries of the early write: a truncated object, another site's
    instance, a re-send.  The write began before the parse decided; nothing of
    it stays."""
    study = generate_uid()
    stored = make_instance(study=study)
    archive.pipeline.ingest(stored, SOURCE)
    before = snapshot(archive)
    if label == "truncated":
        data, source = make_instance(study=study)[:-100], SOURCE
    elif label == "foreign site":
        data, source = make_instance(study=study), Source(kind="import", site="SITE-B")
    else:
        data, source = stored, SOURCE
    result = archive.pipeline.ingest(data, source)
    if label == "duplicate":
        assert result.outcome is StoreOutcome.DUPLICATE
    else:
        assert not result.ok
    assert snapshot(archive) == before
    assert temporary_files(archive.store) == []


@pytest.mark.parametrize("label", sorted(valid_objects()))
def test_the_header_parse_says_where_the_data_set_starts_in_every_framing(
    label: str, tmp_path: Path
) -> None:
    data = valid_objects()[label]
    expected = dataset_offset(io.BytesIO(data))
    assert parse_header(data).dataset_start == expected
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    with open(path, "rb") as fp:
        assert parse_header_file(fp, len(data)).dataset_start == expected


@pytest.fixture(
    params=["filesystem", pytest.param("s3", marks=pytest.mark.s3)],
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "filesystem":
        s: ObjectStore = FilesystemStore(tmp_path / "objects")
    else:
        s = S3Store(
            request.getfixturevalue("s3_bucket"),
            prefix="staging",
            endpoint_url=request.getfixturevalue("s3_env"),
        )
    yield s
    s.close()


def test_a_staged_object_is_invisible_until_committed_and_gone_when_dropped(
    store: ObjectStore,
) -> None:
    data = os.urandom(300_000)
    staged = store.stage(data, "1.2.3/4.5/6.0000.dcm")
    assert list(store.iter_keys()) == []
    assert staged.commit("1.2.3/4.5/6.abcd.dcm") == len(data)
    assert store.get("1.2.3/4.5/6.abcd.dcm") == data
    dropped = store.stage(b"never stored", "1.2.3/4.5/7.0000.dcm")
    dropped.abort()
    assert list(store.iter_keys()) == ["1.2.3/4.5/6.abcd.dcm"]
    with pytest.raises(StorageError):
        dropped.commit("1.2.3/4.5/7.abcd.dcm")
    with pytest.raises(StorageError):
        staged.commit("1.2.3/4.5/8.abcd.dcm")
    assert list(store.iter_keys()) == ["1.2.3/4.5/6.abcd.dcm"]
    if isinstance(store, FilesystemStore):
        assert temporary_files(store) == []


def test_a_staging_key_that_escapes_the_store_is_refused(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        store.stage(b"x", "../../etc/passwd")
    assert list(store.iter_keys()) == []


# -- what a killed process left ----------------------------------------------------------------

_STAGE_AND_WAIT = """
import sys
from storage.filesystem import FilesystemStore
from archive.ingest import STAGING_NEAR
staged = FilesystemStore(sys.argv[1]).stage(b"half-ingested " * 10_000, STAGING_NEAR)
print("staged", flush=True)
if sys.stdin.readline().strip() == "commit":
    staged.commit("1.2.3/4.5/6.abcd.dcm")
    print("committed", flush=True)
sys.stdin.read()  # alive until killed or its stdin closes
"""


def staging_process(root: Path) -> subprocess.Popen:
    """Another process that stages an object early, as an ingest thread does,
    then waits: to be killed, or told to commit it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _STAGE_AND_WAIT, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
    return proc


def test_an_object_staged_by_a_process_killed_before_its_commit_is_deleted_when_the_archive_opens(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(index_url=f"sqlite:///{tmp_path / 'index.db'}")
    with Archive(config) as archive:
        root = archive.store.root
        kept = archive.pipeline.ingest(make_instance(), SOURCE)
    killed = staging_process(root)
    killed.kill()  # SIGKILL: between the staged write and its commit
    killed.wait()
    [left] = temporary_files(FilesystemStore(root))
    assert left.parent == FilesystemStore(root).path_for(ingest_module.STAGING_NEAR).parent
    with Archive(config) as archive:
        assert temporary_files(archive.store) == []
        assert list(archive.store.iter_keys()) == [kept.object_key]


def test_an_object_another_live_process_staged_survives_the_sweep_and_is_committed(
    tmp_path: Path,
) -> None:
    store = FilesystemStore(tmp_path / "objects")
    live = staging_process(store.root)
    try:
        mine = store.stage(b"this process's own", ingest_module.STAGING_NEAR)
        assert store.sweep_staging(ingest_module.STAGING_NEAR) == 0
        assert store.cleanup_temp(older_than_seconds=0) == 0  # imag verify --repair alike
        assert len(temporary_files(store)) == 2
        assert live.stdin is not None and live.stdout is not None
        live.stdin.write("commit\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "committed"
        assert store.get("1.2.3/4.5/6.abcd.dcm") == b"half-ingested " * 10_000
        mine.commit("1.2.3/4.5/7.abcd.dcm")
        assert temporary_files(store) == []
    finally:
        live.kill()
        live.wait()
