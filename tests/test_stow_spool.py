"""STOW-RS parts past ``ingest.stream_threshold`` are spooled to
``<data_dir>/tmp`` (never held in memory), each file locked by the process
writing it.

The adversary is a crash at the worst moment: ``imag serve`` killed (-9) in
the middle of an upload leaves its spool file behind, and the next start
deletes it -- while a file another process is still writing stays."""

from __future__ import annotations

import io
import socket
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileDataset

from archive.dimse import lean
from archive.spoolfiles import Spool
from dicomweb.stow import SPOOL_PREFIX, sweep_spool
from tests.dicomfiles import make_instance
from tests.httpserver import HttpImag
from tests.processes import HOST, eventually

THRESHOLD = 64 * 1024
BOUNDARY = "imag-stow-spool-test"


def _big(ds: FileDataset) -> None:
    ds.Rows = ds.Columns = 1024
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(1024 * 1024 * 2)


def spool_files(server: HttpImag) -> list[Path]:
    folder = server.workdir / "data" / "tmp"
    return sorted(folder.glob(f"{SPOOL_PREFIX}*")) if folder.is_dir() else []


def test_a_stow_spool_file_left_by_a_kill_9_is_deleted_at_the_next_start(tmp_path: Path) -> None:
    server = HttpImag(
        tmp_path / "imag", settings={"IMAG_INGEST_STREAM_THRESHOLD": str(THRESHOLD)}
    ).start()
    instance = make_instance(_big)  # 2 MiB: past the threshold and one 1 MiB read
    head = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + instance
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    request = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Authorization: Bearer {server.token}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
        f"Content-Length: {len(head)}\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection((HOST, server.http_port), timeout=60) as conn:
            conn.sendall(request + head[: len(head) * 3 // 4])  # the rest never comes
            [left] = eventually(lambda: spool_files(server), what="the part spooled to a file")
            server.kill()
        assert left.exists(), "the file a killed server leaves behind"
        server.start()
        assert not left.exists()
        # and an upload spools and stores again, leaving nothing behind
        stored = server.client().store_instances([pydicom.dcmread(io.BytesIO(instance))])
        assert len(stored.ReferencedSOPSequence) == 1
        assert spool_files(server) == []
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize(
    ("prefix", "sweep", "other"),
    [
        (SPOOL_PREFIX, sweep_spool, lean.SPOOL_PREFIX),
        (lean.SPOOL_PREFIX, lean.sweep_spool, SPOOL_PREFIX),
    ],
    ids=["STOW-RS", "lean C-STORE"],
)
def test_a_sweep_deletes_only_the_spool_files_nobody_holds(
    tmp_path: Path, prefix: str, sweep: Callable[[Path], int], other: str
) -> None:
    """Processes share the spool folder (listener processes, a second imag
    serve on the data folder): one starting must not delete what another is
    receiving (it holds a lock on its file), only leftovers -- and only its
    own receiver's."""
    live = Spool(tmp_path, prefix)
    live.write(b"being received")
    stale = tmp_path / f"{prefix}12345-left"
    stale.write_bytes(b"a killed process's")
    theirs = tmp_path / f"{other}12345-left"
    theirs.write_bytes(b"the other receiver's")
    assert sweep(tmp_path) == 1
    assert live.path.exists() and not stale.exists() and theirs.exists()
    assert live.path.read_bytes() == b"being received"
    live.drop()
    assert not live.path.exists()
    assert sweep(tmp_path / "absent") == 0
