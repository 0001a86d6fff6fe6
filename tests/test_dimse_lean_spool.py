"""Large objects over C-STORE on the lean path: spooled to disk, never held whole.

A real ``imag serve`` (subprocess) with ``ingest.stream_threshold`` at 1 MiB
receives objects of tens of MiB from dcmtk's storescu and from pynetdicom:
each is stored bit-identical, the server's peak memory does not grow by the
object's size (read from /proc: a bound, not a timing), and the spool folder
is empty once the C-STORE is answered.  The adversaries: a peer cutting the
association in the middle of a large object (closed, aborted, a PDU cut
short), an object over ``ingest.max_object_bytes`` (refused 0xA700 with one
audit entry, nothing stored, the association goes on), a kill -9 in the
middle of one (the left-over file is deleted at the next start), and another
process's spool file being written while a receiver starts (kept)."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification

from archive.dimse.lean import SPOOL_PREFIX
from archive.index import open_database
from storage import open_store
from tests.audittrail import AuditCursor
from tests.dicomnet import CLIENT_HANDLERS, HOST, SERVER_AET, ImagServer, run_tool, split_part10
from tests.processes import eventually
from tests.test_dimse import ct_dataset
from tests.test_dimse_lean import (
    STORESCU,
    SUCCESS,
    assert_stored_as_sent,
    detail,
    field,
    index_rows,
    indexed,
    lean_lines,
    peers,
    raw_association,
    store_pdus,
    stored_objects,
    uid_of,
)

MiB = 2**20
THRESHOLD = 1 * MiB
LIMIT = 56 * MiB


def big_dataset(mib: int, *, seed: int) -> pydicom.Dataset:
    """A CT data set of ``mib`` MiB of random 16-bit pixels (4096 rows), a new UID."""
    ds = ct_dataset(rows=16, seed=seed)
    ds.Rows, ds.Columns = 4096, mib * 128  # 4096 x (mib * 128) x 2 bytes = mib MiB
    ds.PixelData = random.Random(seed).randbytes(mib * MiB)
    return ds


def write_big(folder: Path, mib: int, *, seed: int) -> Path:
    path = folder / f"big-{mib}-{seed}.dcm"
    big_dataset(mib, seed=seed).save_as(path, enforce_file_format=True)
    return path


def spool_files(server: ImagServer) -> list[Path]:
    folder = server.data_dir / "tmp"
    return sorted(folder.glob(f"{SPOOL_PREFIX}*")) if folder.is_dir() else []


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def storescu(server: ImagServer, *files: Path, pdu: int = 16384) -> None:
    run = run_tool(
        STORESCU,
        "-aec",
        SERVER_AET,
        "-aet",
        "MODALITY_A",
        "--max-send-pdu",
        str(pdu),
        HOST,
        str(server.dicom_port),
        *map(str, files),
        timeout=300,
    )
    assert run.returncode == 0 and "Store Failed" not in run.stdout, run.stdout


def pynetdicom_association(server: ImagServer, max_pdu: int = 4 * MiB) -> tuple[AE, object]:
    ae = AE(ae_title="PYCLIENT")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, server.dicom_port, ae_title=SERVER_AET, evt_handlers=CLIENT_HANDLERS)
    assert assoc.is_established
    return ae, assoc


def stored_bytes(server: ImagServer, sop_uid: str) -> bytes:
    [(key,)] = index_rows(
        server, "SELECT object_key FROM instances WHERE sop_instance_uid = ?", (sop_uid,)
    )
    store = open_store((server.data_dir / "objects").as_uri())
    try:
        return store.get(key)
    finally:
        store.close()


def spooling_server(workdir: Path) -> ImagServer:
    return ImagServer(
        workdir,
        f"sqlite:///{workdir / 'index.db'}",
        peers(),
        settings={
            "dicom": {"lean_store": True},
            "ingest": {"stream_threshold": THRESHOLD, "max_object_bytes": LIMIT},
        },
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImagServer]:
    """``imag serve``, lean path on, spooling above 1 MiB, objects up to 56 MiB."""
    imag = spooling_server(tmp_path_factory.mktemp("spool")).start()
    yield imag
    assert imag.stop() == 0, imag.log()
    assert "Traceback" not in imag.log(), imag.log()[-5000:]


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("big")
    return {mib: write_big(folder, mib, seed=mib) for mib in (8, 24, 48)}


# -- stored as sent ---------------------------------------------------------------------------


def test_an_object_above_the_threshold_from_storescu_is_spooled_and_stored_bit_identical(
    server: ImagServer, big_files: dict[int, Path]
) -> None:
    before = len(lean_lines(server))
    path = big_files[24]
    storescu(server, path)  # 16 KB PDUs: ~1,500 fragments, each to disk through the spool
    assert_stored_as_sent(server, {uid_of(path): path})
    [line] = lean_lines(server)[before:]
    assert field(line, "stored") == "1"
    assert (server.data_dir / "tmp").is_dir(), "the object never went through the spool"
    eventually(lambda: not spool_files(server), what="the spool file deleted")


def test_an_object_above_the_threshold_from_pynetdicom_is_stored_bit_identical(
    server: ImagServer,
) -> None:
    big = big_dataset(24, seed=41)
    small = ct_dataset(rows=32, seed=42)
    ae, assoc = pynetdicom_association(server)  # 4 MiB PDUs: the direct-read path
    try:
        assert assoc.send_c_store(big).Status == SUCCESS
        assert assoc.send_c_store(small).Status == SUCCESS  # in memory again, after it
    finally:
        assoc.release()
        ae.shutdown()
    for ds in (big, small):
        sent = encode(ds, False, True)  # the data set as pynetdicom sent it
        assert split_part10(stored_bytes(server, ds.SOPInstanceUID))[1] == sent
    eventually(lambda: not spool_files(server), what="the spool file deleted")


# -- memory -----------------------------------------------------------------------------------


def test_receiving_a_large_object_does_not_grow_the_server_by_its_size(
    server: ImagServer, big_files: dict[int, Path]
) -> None:
    """Held in memory, a 48 MiB object would raise the peak by twice that (the
    object and the copy handed to the pipeline); spooled, by a few MiB."""
    pid = server.proc.pid
    storescu(server, big_files[8])  # warm: the spool, the pipeline's file path
    rss_before = proc_status_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    assert proc_status_kib(pid, "VmHWM") <= rss_before + 1024
    storescu(server, big_files[48])
    grown = proc_status_kib(pid, "VmHWM") - rss_before
    assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB receiving a 48 MiB object"
    assert indexed(server, uid_of(big_files[48]))


# -- adversaries ------------------------------------------------------------------------------


def begin_big_store(server: ImagServer, ds: pydicom.Dataset) -> tuple[socket.socket, list[bytes]]:
    """An association sending the first part (past the threshold) of a C-STORE
    of ``ds``, once the server has begun spooling it; the PDUs not yet sent."""
    pdus = store_pdus(ds, max_pdu=64 * 1024)
    conn = raw_association(server)
    half = len(pdus) // 2
    conn.sendall(b"".join(pdus[:half]))
    eventually(lambda: spool_files(server), what="the data set spooled to a file")
    return conn, pdus[half:]


@pytest.mark.parametrize("ending", ["close", "abort", "truncated"])
def test_a_large_object_cut_off_leaves_no_spool_file_and_nothing_stored(
    server: ImagServer, ending: str
) -> None:
    ds = big_dataset(8, seed=50 + len(ending))
    before = len(lean_lines(server))
    conn, rest = begin_big_store(server, ds)
    with conn:
        if ending == "abort":
            conn.sendall(bytes.fromhex("07000000000400000000"))
        elif ending == "truncated":
            conn.sendall(rest[0][: len(rest[0]) // 2])
    eventually(lambda: not spool_files(server), what="the spool file deleted")
    assert not indexed(server, ds.SOPInstanceUID)
    assert not stored_objects(server, ds.SOPInstanceUID)
    assert server.echoscu("MODALITY_B").returncode == 0
    cut = eventually(
        lambda: [
            ln for ln in lean_lines(server)[before:] if field(ln, "calling_aet") == "MODALITY_A"
        ],
        what="the cut association's log line",
    )
    assert [(field(ln, "stored"), field(ln, "outcome")) for ln in cut] == [
        ("0", "closed" if ending != "abort" else "aborted")
    ]


def test_an_object_over_the_size_limit_is_refused_its_spool_deleted_and_the_association_goes_on(
    server: ImagServer,
) -> None:
    db = open_database(server.index_url)
    audit = AuditCursor(db)
    over = big_dataset(LIMIT // MiB + 1, seed=60)  # spooled, then past the limit
    small = ct_dataset(rows=32, seed=61)
    before = len(lean_lines(server))
    ae, assoc = pynetdicom_association(server)
    try:
        status = assoc.send_c_store(over)
        assert status.Status == 0xA700, hex(status.Status)
        assert "limit" in status.ErrorComment
        assert assoc.send_c_store(small).Status == SUCCESS
    finally:
        assoc.release()
        ae.shutdown()
    assert not indexed(server, over.SOPInstanceUID)
    assert not stored_objects(server, over.SOPInstanceUID)
    assert indexed(server, small.SOPInstanceUID)
    eventually(lambda: not spool_files(server), what="the refused object's spool file deleted")
    refused = [
        r
        for r in audit.new_rows()
        if r["action"] == "dicom.c-store" and detail(r)["instances"] == [over.SOPInstanceUID]
    ]
    db.close()
    assert len(refused) == 1 and refused[0]["outcome"] != "allowed", refused
    [line] = eventually(lambda: lean_lines(server)[before:], what="the association's log line")
    assert (field(line, "stored"), field(line, "store_failures")) == ("1", "1")


def test_a_spool_file_left_by_a_kill_9_is_deleted_at_the_next_start(tmp_path: Path) -> None:
    imag = spooling_server(tmp_path / "imag").start()
    ds = big_dataset(8, seed=70)
    conn, _ = begin_big_store(imag, ds)
    with conn:
        [left] = spool_files(imag)
        imag.kill()
    assert left.exists(), "the file a killed server leaves behind"
    imag.start()
    try:
        assert not left.exists()
        assert not indexed(imag, ds.SOPInstanceUID)
        storescu(imag, write_big(tmp_path, 2, seed=71))  # and spooling works again
        eventually(lambda: not spool_files(imag), what="the spool file deleted")
    finally:
        assert imag.stop() == 0, imag.log()


def test_two_large_objects_in_a_row_on_one_association_are_each_stored_bit_identical(
    server: ImagServer,
) -> None:
    """Two large objects in a row on one association: the in-memory piece
    and the spool are reset between them (nothing of the first leaks into
    the second)."""
    first, second = big_dataset(3, seed=80), big_dataset(5, seed=81)
    ae, assoc = pynetdicom_association(server, max_pdu=16384)
    try:
        assert assoc.send_c_store(first).Status == SUCCESS
        assert assoc.send_c_store(second).Status == SUCCESS
    finally:
        assoc.release()
        ae.shutdown()
    for ds in (first, second):
        sent = encode(ds, False, True)
        assert split_part10(stored_bytes(server, ds.SOPInstanceUID))[1] == sent
