"""WADO-RS instances retrieved as stored (``dicomweb/stored.py``), on a
folder (sendfile) and on S3 (objects read, not sent from a file), each on
SQLite and PostgreSQL.

The study holds objects of the three sizes the sender treats apart: small
ones (sent by sendfile, or read whole within their batch), one over 1 MiB
(read in chunks from S3) and one over ``SENDFILE_MAX`` (read in chunks from
a folder too).  The answer declares its length and is the stored bytes;
HEAD declares it without a body.  The adversaries: an object whose size is
not the indexed one (longer, shorter) or that is gone cuts the answer short
-- never a complete answer that lies -- with its one audit entry and a log
line naming the object; a client that leaves in the middle leaves the server
answering the next request whole, with no stored object left open."""

from __future__ import annotations

import io
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
import pytest
import requests

from archive.index import open_database
from archive.synthetic import StudySpec, modality_preset, write_study
from dicomweb.stored import CHUNK, SENDFILE_MAX
from tests.audittrail import AuditCursor
from tests.httpserver import HttpImag, running_imag
from tests.processes import HOST, eventually
from tests.s3server import StoreUnderTest, index_for_store

pytestmark = pytest.mark.s3_on_sqlite

DICOM = "application/dicom"
AS_STORED = f'multipart/related; type="{DICOM}"; transfer-syntax=*'


@pytest.fixture(scope="module")
def index_url(module_index_url: str, module_store: StoreUnderTest) -> str:
    return index_for_store(module_index_url, module_store)


@dataclass
class World:
    server: HttpImag
    store: StoreUnderTest
    index_url: str
    study: str
    sent: dict[str, bytes]  #: what was stored (as received), by SOP Instance UID
    small: str  #: a few KB
    medium: str  #: over CHUNK
    large: str  #: over SENDFILE_MAX

    @property
    def study_path(self) -> str:
        return f"{self.server.dicomweb}/studies/{self.study}"

    def key_of(self, uid: str) -> str:
        db = open_database(self.index_url)
        try:
            return str(
                db.scalar("SELECT object_key FROM instances WHERE sop_instance_uid = ?", (uid,))
            )
        finally:
            db.close()

    def server_fds(self) -> int:
        """The server's open files that are neither sockets nor the index's
        own: stored objects and spools.  The index's connection pool may open
        one more connection during the answers, and keep it: a socket on
        PostgreSQL, the database file and its WAL on SQLite (clean-clone CI
        runs counted them as files left open for ever, on each in turn)."""
        assert self.server.proc is not None
        index = self.index_url.removeprefix("sqlite:///") if "sqlite" in self.index_url else None
        folder = f"/proc/{self.server.proc.pid}/fd"
        open_files = 0
        for fd in os.listdir(folder):
            try:
                target = os.readlink(f"{folder}/{fd}")
            except OSError:  # closed meanwhile
                continue
            pool = target.startswith("socket:") or (index is not None and target.startswith(index))
            open_files += not pool
        return open_files


@pytest.fixture(scope="module")
def world(
    index_url: str, module_store: StoreUnderTest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("stored")
    spec = StudySpec(
        patient_id="STORED01",
        patient_name="STORED^Sent",
        series=[
            modality_preset("CT", rows=32, columns=32, instances=3),
            modality_preset("CT", rows=1024, columns=1024, instances=1),  # 2 MiB
            modality_preset("CT", rows=2100, columns=2100, instances=1),  # 8.4 MiB
        ],
    )
    paths = write_study(spec, folder / "study", seed=41)
    sent = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes()
        for p in paths
    }
    by_size = sorted(sent, key=lambda uid: len(sent[uid]))
    small, medium, large = by_size[0], by_size[-2], by_size[-1]
    assert len(sent[small]) < CHUNK < len(sent[medium]) <= SENDFILE_MAX < len(sent[large])
    # asyncio's loop, which sends files with sendfile(2) (uvloop's, the
    # default, reads them: the other WADO-RS tests)
    settings = {**module_store.settings(), "IMAG_EVENT_LOOP": "asyncio"}
    with running_imag(folder / "imag", index_url=index_url, settings=settings) as server:
        answer = server.client().store_instances([pydicom.dcmread(p) for p in paths])
        assert "FailedSOPSequence" not in answer
        yield World(server, module_store, index_url, spec.study_uid, sent, small, medium, large)


def parts_of(body: bytes, content_type: str) -> list[bytes]:
    boundary = re.search(r"boundary=([^;]+)", content_type).group(1).encode()  # type: ignore[union-attr]
    chunks = body.split(b"--" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n", "the body is framed by its boundary"
    out = []
    for chunk in chunks[1:-1]:
        _, _, part = chunk.partition(b"\r\n\r\n")
        assert part.endswith(b"\r\n")
        out.append(part[:-2])
    return out


def uid_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_a_study_as_stored_declares_its_length_and_is_the_stored_bytes(world: World) -> None:
    answer = world.server.http.get(world.study_path, headers={"Accept": AS_STORED}, timeout=60)
    assert answer.status_code == 200
    assert "Transfer-Encoding" not in answer.headers
    assert int(answer.headers["Content-Length"]) == len(answer.content)
    parts = parts_of(answer.content, answer.headers["Content-Type"])
    assert {uid_of(p): p for p in parts} == world.sent
    # one instance asked single part: its bytes alone, with their length
    path = f"{world.study_path}/series/{_series_of(world, world.large)}/instances/{world.large}"
    single = world.server.http.get(path, headers={"Accept": DICOM}, timeout=60)
    assert single.status_code == 200
    assert single.content == world.sent[world.large]
    assert int(single.headers["Content-Length"]) == len(world.sent[world.large])


def _series_of(world: World, uid: str) -> str:
    return str(
        pydicom.dcmread(io.BytesIO(world.sent[uid]), stop_before_pixels=True).SeriesInstanceUID
    )


def test_head_of_a_study_declares_its_length_and_sends_no_body(world: World) -> None:
    """HEAD and then GET /health pipelined on one connection: the second
    answer must follow the first one's headers at once (a body sent after
    them would be read as the next answer)."""
    whole = world.server.http.get(world.study_path, headers={"Accept": AS_STORED}, timeout=60)
    target = world.study_path.removeprefix(world.server.url)
    token = world.server.token
    requests_ = (
        f"HEAD {target} HTTP/1.1\r\nHost: {HOST}\r\nAccept: {AS_STORED}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
        f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((HOST, world.server.http_port), timeout=60) as conn:
        conn.sendall(requests_.encode())
        received = b""
        while chunk := conn.recv(1 << 16):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert length and int(length[1]) == int(whole.headers["Content-Length"])
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]
    assert b'"status": "ok"' in rest


def _tamper(world: World, uid: str, how: str) -> bytes | None:
    """Change the stored object of ``uid`` behind the index's back: longer,
    shorter, or gone.  Returns its original bytes."""
    store = world.store.open(world.server.workdir / "data")
    try:
        key = world.key_of(uid)
        original = store.get(key)
        if how == "gone":
            store.delete(key)
        else:
            store.put(key, original + b"\0" * 16 if how == "longer" else original[:-16])
        return original
    finally:
        store.close()


def _restore(world: World, uid: str, original: bytes) -> None:
    store = world.store.open(world.server.workdir / "data")
    try:
        store.put(world.key_of(uid), original)
    finally:
        store.close()


@pytest.mark.parametrize("how", ["longer", "shorter", "gone"])
@pytest.mark.parametrize("which", ["small", "large"])
def test_an_object_unlike_its_index_row_cuts_the_answer_short_audited_and_logged(
    world: World, which: str, how: str
) -> None:
    uid = getattr(world, which)
    original = _tamper(world, uid, how)
    assert original is not None
    db = open_database(world.index_url)
    try:
        audit = AuditCursor(db)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            world.server.http.get(world.study_path, headers={"Accept": AS_STORED}, timeout=60)
        rows = eventually(audit.new_rows, what="the retrieval's audit entry")
        assert [(r["action"], r["outcome"], r["status"]) for r in rows] == [
            ("wado.retrieve", "allowed", 200)
        ]
    finally:
        db.close()
        _restore(world, uid, original)
    assert "streamed answer aborted" in world.server.log()
    whole = world.server.http.get(world.study_path, headers={"Accept": AS_STORED}, timeout=60)
    assert int(whole.headers["Content-Length"]) == len(whole.content)


def test_a_client_leaving_mid_answer_leaves_no_object_open_and_the_next_answer_whole(
    world: World,
) -> None:
    baseline = world.server_fds()
    for _ in range(3):
        with requests.get(
            world.study_path,
            headers={"Accept": AS_STORED, **world.server.http.headers},
            stream=True,
            timeout=60,
        ) as answer:
            assert answer.status_code == 200
            answer.raw.read(4096)  # then the connection is closed
    eventually(lambda: world.server_fds() <= baseline, what="the server's files closed")
    whole = world.server.http.get(world.study_path, headers={"Accept": AS_STORED}, timeout=60)
    assert {uid_of(p) for p in parts_of(whole.content, whole.headers["Content-Type"])} == set(
        world.sent
    )
