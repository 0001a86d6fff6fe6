"""The lean C-STORE receive path (archive.dimse.lean) as peers use it.

dcmtk's storescu (one and four associations, 16 KB PDUs, implicit, explicit,
big endian, deflated and compressed syntaxes) and pynetdicom (4 MiB PDUs)
push to a real ``imag serve``; every object must come back bit-identical,
each association's log line must say the lean path served it (C-FIND
too: tests/test_dimse_lean_find.py), and an association proposing C-GET
must still be served by pynetdicom.  The
adversaries: strangers (the same A-ASSOCIATE-RJ reasons as pynetdicom's),
more associations than allowed (one limit over both paths), noise, a PDU
claiming gigabytes, a data set cut off, an object over the size limit, and a
kill -9 in the middle of a push.  Nothing is mocked: every exchange is DICOM
over TCP."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from archive.dimse.lean import (
    Command,
    echo_response,
    file_meta,
    lean_request,
    p_data_pdus,
    store_response,
)
from archive.index import open_database
from archive.synthetic import StudySpec, generate_mixed_set, modality_preset, write_study
from storage import open_store
from tests.audittrail import AuditCursor
from tests.dicomnet import (
    CLIENT_HANDLERS,
    HOST,
    SERVER_AET,
    ImagServer,
    capture_associate_rq,
    read_pdu,
    run_tool,
    split_part10,
    storescu_profile,
)
from tests.processes import eventually
from tests.test_dicom_pending import metric
from tests.test_dimse import (
    assert_no_acknowledged_instance_lost,
    ct_dataset,
    kill_mid_push,
)

SUCCESS = 0x0000
STORE_OK = 'service="C-STORE",status="0x0000"'
STORESCU = "/usr/bin/storescu"


def peers() -> list[dict]:
    return [
        {"aet": "MODALITY_A", "host": HOST, "port": 104, "site": "A"},
        {"aet": "MODALITY_B", "host": HOST, "port": 104, "site": "B"},
        {"aet": "PYCLIENT", "host": HOST, "port": 104, "site": "C"},
        {"aet": "WRONGHOST", "host": "127.0.0.2", "port": 104, "site": "A"},
    ]


def lean_lines(server: ImagServer) -> list[str]:
    """The association log lines of the lean path."""
    return [
        ln for ln in server.log().splitlines() if "association ended" in ln and "path=lean" in ln
    ]


def pynetdicom_lines(server: ImagServer) -> list[str]:
    return [
        ln
        for ln in server.log().splitlines()
        if "association ended" in ln and "archive.dimse.handlers" in ln
    ]


def _stored_four(server: ImagServer) -> list[str]:
    return [ln for ln in lean_lines(server) if field(ln, "stored") == "4"]


def field(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", line)
    assert match, f"no {name} in {line!r}"
    return match[1]


def index_rows(server: ImagServer, sql: str, params: tuple = ()) -> list[tuple]:
    db = open_database(server.index_url)
    try:
        return db.query(sql, params)
    finally:
        db.close()


def assert_stored_as_sent(server: ImagServer, files: dict[str, Path]) -> None:
    """Each file's data set is stored byte for byte, in the syntax it was sent in,
    with a whole object behind each index row."""
    rows = index_rows(
        server,
        "SELECT sop_instance_uid, object_key, sha256, stored_ts FROM instances "
        f"WHERE sop_instance_uid IN ({', '.join('?' * len(files))})",
        tuple(files),
    )
    assert {r[0] for r in rows} == set(files)
    store = open_store((server.data_dir / "objects").as_uri())
    try:
        for uid, key, sha256, stored_ts in rows:
            stored = store.get(key)
            assert hashlib.sha256(stored).digest() == bytes(sha256), uid
            ts, dataset = split_part10(files[uid].read_bytes())
            assert stored_ts == ts == split_part10(stored)[0], f"{uid} not stored as received"
            assert split_part10(stored)[1] == dataset, f"{uid}: stored data set differs"
    finally:
        store.close()


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- the shared server ------------------------------------------------------------------------


@dataclass
class Lean:
    server: ImagServer
    audit: AuditCursor


@pytest.fixture(scope="module")
def lean(module_index_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lean]:
    """`imag serve` with the lean path on (as by default), on each index backend."""
    workdir = tmp_path_factory.mktemp("lean")
    server = ImagServer(
        workdir, module_index_url, peers(), settings={"dicom": {"lean_store": True}}
    ).start()
    db = open_database(module_index_url)
    try:
        yield Lean(server, AuditCursor(db))
    finally:
        db.close()
        code = server.stop()
        assert code == 0, f"imag serve exited {code} on SIGTERM:\n{server.log()}"


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    spec = StudySpec(
        patient_id="LEAN01",
        patient_name="LEAN^Path",
        issuer_of_patient_id="SITE_A",
        series=[modality_preset("CT", rows=256, columns=256, instances=12)],
    )
    return write_study(spec, tmp_path_factory.mktemp("ct"), seed=17)


# -- storescu ---------------------------------------------------------------------------------


def test_storescu_over_one_association_with_16kb_pdus_is_served_lean_and_stored_bit_identical(
    lean: Lean, ct_files: list[Path]
) -> None:
    server = lean.server
    before = len(lean_lines(server))
    lean.audit.new_rows()
    stores_before = metric(server, "imag_dicom_operations_total", STORE_OK)
    accepted_before = metric(server, "imag_dicom_associations_total", 'outcome="accepted"')
    run = run_tool(
        STORESCU,
        "-aec",
        SERVER_AET,
        "-aet",
        "MODALITY_A",
        "--max-send-pdu",
        "16384",
        "-pdu",
        "16384",
        HOST,
        str(server.dicom_port),
        *map(str, ct_files),
    )
    assert run.returncode == 0 and "Store Failed" not in run.stdout, run.stdout
    assert_stored_as_sent(server, {uid_of(p): p for p in ct_files})
    # the association's line is written once the server saw the connection close
    [line] = eventually(lambda: lean_lines(server)[before:], what="the association's log line")
    assert field(line, "stored") == str(len(ct_files))
    assert field(line, "outcome") == "released" and field(line, "calling_aet") == "MODALITY_A"
    # one audit entry per C-STORE, naming its instance, the sender and its site
    stores = [r for r in lean.audit.new_rows() if r["action"] == "dicom.c-store"]
    assert sorted(detail(r)["instances"][0] for r in stores) == sorted(uid_of(p) for p in ct_files)
    assert {(r["actor"], r["outcome"], detail(r)["site"]) for r in stores} == {
        ("MODALITY_A", "allowed", "A")
    }
    # the metrics the pynetdicom handlers keep
    assert metric(server, "imag_dicom_operations_total", STORE_OK) == stores_before + len(ct_files)
    assert (
        metric(server, "imag_dicom_associations_total", 'outcome="accepted"') == accepted_before + 1
    )


def test_both_receive_paths_store_the_same_bytes_and_write_the_same_audit_entries(
    ct_files: list[Path], tmp_path: Path
) -> None:
    """The lean path and pynetdicom's (``dicom.lean_store = false``) hand the
    objects to the same pipeline: the stored files are identical, file meta
    included, and so are the audit entries but for their time."""
    stored: dict[bool, dict[str, bytes]] = {}
    audits: dict[bool, list[tuple]] = {}
    for lean_store in (True, False):
        workdir = tmp_path / ("lean" if lean_store else "pynetdicom")
        server = ImagServer(
            workdir,
            f"sqlite:///{workdir / 'index.db'}",
            peers(),
            settings={"dicom": {"lean_store": lean_store}},
        ).start()
        try:
            db = open_database(server.index_url)
            cursor = AuditCursor(db)
            run = run_tool(
                STORESCU,
                "-aec",
                SERVER_AET,
                "-aet",
                "MODALITY_B",
                HOST,
                str(server.dicom_port),
                *map(str, ct_files[:4]),
            )
            assert run.returncode == 0, run.stdout
            audits[lean_store] = sorted(
                (r["actor"], r["role"], r["action"], r["outcome"], r["status"], r["source"])
                + (r["study_uid"], detail(r)["instances"][0], detail(r)["site"])
                for r in cursor.new_rows()
                if r["action"] == "dicom.c-store"
            )
            db.close()
            rows = index_rows(server, "SELECT sop_instance_uid, object_key FROM instances")
            store = open_store((server.data_dir / "objects").as_uri())
            stored[lean_store] = {uid: store.get(key) for uid, key in rows}
            store.close()
            # the association's line is logged as its connection closes, which
            # may come after storescu has exited: waited for (it failed a CI run)
            served = (
                eventually(partial(_stored_four, server), what="the lean association's log line")
                if lean_store
                else _stored_four(server)
            )
        finally:
            assert server.stop() == 0, server.log()
        assert bool(served) is lean_store, "the setting chooses the path"
    assert len(audits[True]) == 4 and audits[True] == audits[False]
    assert stored[True] == stored[False]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mixed")
    generate_mixed_set(folder, studies=6, seed=23)
    return {uid_of(p): p for p in sorted(folder.iterdir())}


def test_four_parallel_storescu_push_every_transfer_syntax_stored_bit_identical(
    lean: Lean, mixed: dict[str, Path], tmp_path: Path
) -> None:
    server = lean.server
    sent = {split_part10(p.read_bytes())[0] for p in mixed.values()}
    assert {
        JPEG2000Lossless,
        RLELossless,
        ExplicitVRBigEndian,
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
    } <= sent, "the set should cover compressed, deflated, big endian and implicit syntaxes"
    before = len(lean_lines(server))
    files = sorted(mixed.values())
    profile = storescu_profile(files, tmp_path / "push.cfg")
    # studies are a site's: each study's files go over one site's associations
    by_study: dict[str, list[Path]] = {}
    for path in files:
        study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
        by_study.setdefault(study, []).append(path)
    groups: list[list[Path]] = [[], [], [], []]
    for n, paths in enumerate(by_study.values()):
        groups[n % 4] += paths
    procs = [
        server.storescu(("MODALITY_A", "MODALITY_B")[n % 2], group, profile)
        for n, group in enumerate(groups)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Store Failed" not in out, out
    assert_stored_as_sent(server, mixed)
    eventually(lambda: len(lean_lines(server)) >= before + 4, what="the associations' log lines")
    lines = lean_lines(server)[before:]
    assert len(lines) == 4
    assert sum(int(field(ln, "stored")) for ln in lines) == len(mixed)


def test_pynetdicom_scu_echoes_and_stores_objects_larger_than_a_4mib_pdu(lean: Lean) -> None:
    server = lean.server
    before = len(lean_lines(server))
    big = ct_dataset(rows=1536)  # 4.5 MiB of pixels: two PDUs of our 4 MiB maximum
    small = ct_dataset(rows=16, seed=2)
    ae = AE(ae_title="PYCLIENT")
    ae.maximum_pdu_size = 4 * 2**20
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, server.dicom_port, ae_title=SERVER_AET, evt_handlers=CLIENT_HANDLERS)
    try:
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 4 * 2**20  # what we announce
        assert assoc.send_c_echo().Status == SUCCESS
        assert assoc.send_c_store(big).Status == SUCCESS
        assert assoc.send_c_store(small).Status == SUCCESS
    finally:
        assoc.release()
        ae.shutdown()
    # the association's line is written once the server saw the connection close
    [line] = eventually(lambda: lean_lines(server)[before:], what="the association's log line")
    assert field(line, "stored") == "2"
    store = open_store((server.data_dir / "objects").as_uri())
    try:
        for ds in (big, small):
            [(key,)] = index_rows(
                server,
                "SELECT object_key FROM instances WHERE sop_instance_uid = ?",
                (ds.SOPInstanceUID,),
            )
            sent = encode(ds, False, True)  # the data set as pynetdicom sent it
            assert split_part10(store.get(key))[1] == sent
    finally:
        store.close()


def test_an_association_proposing_c_get_is_served_by_pynetdicom_and_c_find_alone_lean(
    lean: Lean, ct_files: list[Path], tmp_path: Path
) -> None:
    server = lean.server
    before_push = len(lean_lines(server))
    push = run_tool(
        STORESCU,
        "-aec",
        SERVER_AET,
        "-aet",
        "MODALITY_A",
        HOST,
        str(server.dicom_port),
        str(ct_files[0]),
    )
    assert push.returncode == 0, push.stdout
    # the push's own line is written once the server saw storescu close: wait for it, so
    # that it is not taken for the C-FIND's
    eventually(lambda: len(lean_lines(server)) > before_push, timeout=10, what="the push's line")
    lean_before, pyn_before = len(lean_lines(server)), len(pynetdicom_lines(server))
    run, answers = server.findscu(
        "MODALITY_A",
        "-S",
        {"QueryRetrieveLevel": "STUDY", "PatientID": "LEAN01", "StudyInstanceUID": ""},
    )
    assert run.returncode == 0, run.stdout
    assert len(answers) == 1
    eventually(lambda: len(lean_lines(server)) > lean_before, timeout=10, what="C-FIND's line")
    [line] = lean_lines(server)[lean_before:]
    assert field(line, "found") == "1"
    run, received = server.getscu(
        "MODALITY_A", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3"}, tmp_path
    )
    assert run.returncode == 0, run.stdout
    assert received == {}
    assert len(lean_lines(server)) == lean_before + 1
    eventually(lambda: len(pynetdicom_lines(server)) > pyn_before, timeout=10, what="C-GET's")
    # and a C-ECHO alone is the lean path's
    assert server.echoscu("MODALITY_B").returncode == 0
    eventually(lambda: len(lean_lines(server)) == lean_before + 2, timeout=10, what="echo's")


# -- who may associate ------------------------------------------------------------------------


def test_strangers_are_rejected_on_the_lean_path_with_pynetdicoms_reasons_and_audited(
    lean: Lean, ct_files: list[Path]
) -> None:
    server = lean.server
    lean.audit.new_rows()

    def push(aet: str, called: str = SERVER_AET) -> subprocess.CompletedProcess:
        return run_tool(
            STORESCU, "-aec", called, "-aet", aet, HOST, str(server.dicom_port), str(ct_files[0])
        )

    unknown = push("NOBODY")
    assert unknown.returncode != 0
    assert "Rejected Permanent, Source: Service User" in unknown.stdout, unknown.stdout
    assert "Calling AE Title Not Recognized" in unknown.stdout
    misplaced = push("WRONGHOST")
    assert "Calling AE Title Not Recognized" in misplaced.stdout, misplaced.stdout
    wrong_called = push("MODALITY_A", called="SOMEONE_ELSE")
    assert "Called AE Title Not Recognized" in wrong_called.stdout, wrong_called.stdout
    log = server.log()
    assert "association rejected: calling AE title 'NOBODY' is not a configured peer" in log
    assert (
        "association rejected: calling AE title 'WRONGHOST' connected from 127.0.0.1, "
        "not from its configured host 127.0.0.2" in log
    )
    denied = [r for r in lean.audit.new_rows() if r["action"] == "dicom.associate"]
    assert [(r["actor"], r["outcome"]) for r in denied] == [
        ("NOBODY", "denied"),
        ("WRONGHOST", "denied"),
    ]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[ImagServer]:
    """Two associations at a time, a 64 KiB object limit."""
    server = ImagServer(
        tmp_path,
        f"sqlite:///{tmp_path / 'index.db'}",
        peers(),
        settings={
            "dicom": {"max_associations": 2, "lean_store": True},
            "ingest": {"max_object_bytes": 64 * 1024},
        },
    ).start()
    yield server
    assert server.stop() == 0, server.log()


def associate(server: ImagServer, aet: str = "MODALITY_A") -> tuple[AE, object]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, server.dicom_port, ae_title=SERVER_AET, evt_handlers=CLIENT_HANDLERS)
    assert assoc.is_established
    return ae, assoc


def test_one_association_limit_bounds_the_lean_and_the_pynetdicom_paths_together(
    limited: ImagServer,
) -> None:
    lean_held = associate(limited)  # storage: lean
    get = run_tool(
        "getscu",
        "-S",
        "-aec",
        SERVER_AET,
        "-aet",
        "MODALITY_A",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID=1.2.3",
        HOST,
        str(limited.dicom_port),
    )  # served by pynetdicom while the lean one is held: two in progress at most
    assert get.returncode == 0, get.stdout
    second = associate(limited)
    try:
        over_lean = limited.echoscu("MODALITY_B")  # a third, for the lean path
        assert over_lean.returncode != 0
        assert "Local Limit Exceeded" in over_lean.stdout, over_lean.stdout
        over_pyn = run_tool(
            "movescu",  # (getscu does not print the rejection's reason)
            "-S",
            "-aec",
            SERVER_AET,
            "-aet",
            "MODALITY_A",
            "-aem",
            "MODALITY_A",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID=1.2.3",
            HOST,
            str(limited.dicom_port),
        )  # a third, for pynetdicom: the lean ones count there too
        assert over_pyn.returncode != 0
        assert "Local Limit Exceeded" in over_pyn.stdout, over_pyn.stdout
        assert lean_held[1].send_c_echo().Status == SUCCESS  # those admitted go on
    finally:
        for ae, assoc in (lean_held, second):
            assoc.release()
            ae.shutdown()
    eventually(lambda: limited.echoscu("MODALITY_B").returncode == 0, timeout=10, interval=0.1,
               what="the server accepting again")  # fmt: skip


# -- hostile input ----------------------------------------------------------------------------


def indexed(server: ImagServer, sop_uid: str) -> bool:
    return bool(
        index_rows(server, "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_uid,))
    )


def stored_objects(server: ImagServer, sop_uid: str) -> list[Path]:
    return list((server.data_dir / "objects").rglob(f"{sop_uid}.*"))


def store_pdus(ds: pydicom.Dataset, max_pdu: int = 4096) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE of ``ds`` on presentation context 1."""
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False, implicit_vr=False, little_endian=True)
    req.DataSet = io.BytesIO(buf.getvalue())
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    pdus = []
    for primitive in msg.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def raw_association(server: ImagServer) -> socket.socket:
    rq = capture_associate_rq("MODALITY_A", [build_context(CTImageStorage, ExplicitVRLittleEndian)])
    conn = socket.create_connection((HOST, server.dicom_port), timeout=10)
    conn.sendall(rq)
    assert read_pdu(conn)[0] == 0x02  # A-ASSOCIATE-AC
    return conn


def answer_of(conn: socket.socket) -> bytes:
    """What the server sends next: b"" when it closed without a word."""
    try:
        return read_pdu(conn)
    except ConnectionError:  # closed, or reset
        return b""


def detail(row: dict) -> dict:
    value = row["detail"]
    return json.loads(value) if isinstance(value, str) else value


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    "hostile",
    [
        "p-data-of-2-gib",
        "pdv-longer-than-its-pdu",
        "unknown-context",
        "data-set-without-command",
        "unknown-pdu-type",
        "associate-rq-again",
    ],
)
def test_hostile_pdus_inside_a_lean_association_are_aborted_and_nothing_is_stored(
    limited: ImagServer, hostile: str
) -> None:
    ds = ct_dataset(rows=64, seed=5)
    pdus = store_pdus(ds)
    rss_before = rss_kib(limited.proc.pid)
    before = len(lean_lines(limited))
    with raw_association(limited) as conn:
        if hostile == "p-data-of-2-gib":
            conn.sendall(pdus[0])  # the command
            conn.sendall(b"\x04\x00\x7f\xff\xff\xff" + b"\x00" * 1024)
        elif hostile == "pdv-longer-than-its-pdu":
            conn.sendall(b"\x04\x00\x00\x00\x00\x10" + b"\x00\x01\x00\x00\x01\x03" + b"\x00" * 10)
        elif hostile == "unknown-context":
            pdu = bytearray(pdus[0])
            pdu[10] = 99  # the PDV's presentation context ID
            conn.sendall(pdu)
        elif hostile == "data-set-without-command":
            conn.sendall(pdus[-1])
        elif hostile == "unknown-pdu-type":
            conn.sendall(b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        else:
            conn.sendall(capture_associate_rq("MODALITY_A", [build_context(Verification)]))
        answer = answer_of(conn)
        assert answer[:1] == b"\x07", answer[:16]  # A-ABORT
        assert answer_of(conn) == b""  # and the connection closed
    assert rss_kib(limited.proc.pid) - rss_before < 64 * 1024, "memory grew with the claim"
    assert not indexed(limited, ds.SOPInstanceUID) and not stored_objects(
        limited, ds.SOPInstanceUID
    )
    assert limited.echoscu("MODALITY_B").returncode == 0  # still serving
    eventually(
        lambda: any(field(ln, "outcome") == "aborted" for ln in lean_lines(limited)[before:]),
        timeout=5,
        what="the association's log line saying aborted",
    )


@pytest.mark.parametrize("ending", ["truncated", "close", "abort"])
def test_a_data_set_cut_off_leaves_nothing_behind_and_the_whole_one_is_then_stored(
    limited: ImagServer, ending: str
) -> None:
    ds = ct_dataset(rows=64, seed=7)
    pdus = store_pdus(ds)
    with raw_association(limited) as conn:
        for pdu in pdus[: len(pdus) // 2]:
            conn.sendall(pdu)
        if ending == "truncated":
            conn.sendall(pdus[len(pdus) // 2][:100])
        elif ending == "abort":
            conn.sendall(bytes.fromhex("07000000000400000000"))
    assert limited.echoscu("MODALITY_B").returncode == 0
    assert not indexed(limited, ds.SOPInstanceUID) and not stored_objects(
        limited, ds.SOPInstanceUID
    )
    ae, assoc = associate(limited)
    try:
        assert assoc.send_c_store(ds).Status == SUCCESS
    finally:
        assoc.release()
        ae.shutdown()
    assert indexed(limited, ds.SOPInstanceUID)


def test_noise_and_half_requests_before_associating_go_to_pynetdicom_which_drops_them(
    limited: ImagServer,
) -> None:
    rq = capture_associate_rq("MODALITY_A", [build_context(CTImageStorage, ExplicitVRLittleEndian)])
    for payload in (
        bytes(range(256)) * 2,  # noise
        b"\x01\x00\x00\x01\x00\x00" + rq[6:40],  # an A-ASSOCIATE-RQ claiming 64 KiB
        b"\x01\x00\x7f\xff\xff\xff" + rq[6:],  # ... claiming 2 GiB
    ):
        with socket.create_connection((HOST, limited.dicom_port), timeout=10) as conn:
            conn.sendall(payload)
            conn.settimeout(0.5)
            try:
                answer = conn.recv(16)
            except TimeoutError:
                answer = None  # waiting for the rest that never comes
            assert answer in (None, b"") or answer[0] == 0x07, answer
        assert limited.echoscu("MODALITY_A").returncode == 0
    assert limited.proc.poll() is None


def test_an_object_over_the_size_limit_is_refused_out_of_resources_and_the_association_goes_on(
    limited: ImagServer,
) -> None:
    big = ct_dataset(rows=256)  # 128 KiB of pixels, over the 64 KiB limit
    small = ct_dataset(rows=32, seed=3)
    before = len(lean_lines(limited))
    ae, assoc = associate(limited)
    try:
        status = assoc.send_c_store(big)
        assert status.Status == 0xA700, hex(status.Status)
        assert "limit" in status.ErrorComment
        assert assoc.send_c_store(small).Status == SUCCESS
    finally:
        assoc.release()
        ae.shutdown()
    assert not indexed(limited, big.SOPInstanceUID)
    assert not stored_objects(limited, big.SOPInstanceUID)
    assert indexed(limited, small.SOPInstanceUID)
    [line] = eventually(lambda: lean_lines(limited)[before:], what="the association's log line")
    assert (field(line, "stored"), field(line, "store_failures")) == ("1", "1")


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[ImagServer]:
    """A one-second network timeout."""
    server = ImagServer(
        tmp_path,
        f"sqlite:///{tmp_path / 'index.db'}",
        peers(),
        settings={"dicom": {"network_timeout": 1, "lean_store": True}},
    ).start()
    yield server
    assert server.stop() == 0, server.log()


def test_a_lean_association_silent_for_the_network_timeout_is_aborted(
    impatient: ImagServer,
) -> None:
    ds = ct_dataset(rows=64, seed=11)
    pdus = store_pdus(ds)
    with raw_association(impatient) as conn:
        conn.sendall(b"".join(pdus[:2]))  # a C-STORE begun, then silence
        assert metric(impatient, "imag_dicom_associations_active") == 1
        conn.settimeout(30)
        assert answer_of(conn)[:1] == b"\x07"  # A-ABORT, once dicom.network_timeout passed
        assert answer_of(conn) == b""
    assert "silent for dicom.network_timeout" in impatient.log()
    eventually(
        lambda: metric(impatient, "imag_dicom_associations_active") == 0,
        what="the aborted association no longer counted as active",
    )
    assert not indexed(impatient, ds.SOPInstanceUID)
    assert impatient.echoscu("MODALITY_A").returncode == 0


# -- kill -9 during a push --------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    spec = StudySpec(
        patient_id="CRASH02",
        patient_name="KILL^Lean",
        issuer_of_patient_id="SITE_A",
        series=[modality_preset("CT", rows=48, columns=48, instances=240)],
    )
    return write_study(spec, tmp_path_factory.mktemp("crash"), seed=19)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
@pytest.mark.slow
def test_kill_9_during_a_four_association_lean_push_loses_no_acknowledged_instance(
    backend: str, crash_series: list[Path], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    paths = crash_series
    url = (
        f"sqlite:///{tmp_path / 'index.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    server = ImagServer(
        tmp_path / "imag", url, peers(), settings={"dicom": {"lean_store": True}}
    ).start()

    def lean_is_serving() -> None:
        assert len(lean_lines(server)) >= 1  # the probe's echo: the lean path is serving

    done = kill_mid_push(server, paths, before_kill=lean_is_serving)
    assert_no_acknowledged_instance_lost(server, paths, done)


# -- the pieces, against pynetdicom's own encoding ---------------------------------------------


def pynetdicom_pdus(message: object, primitive: object, context_id: int, max_pdu: int) -> bytes:
    message.primitive_to_message(primitive)  # type: ignore[attr-defined]
    out = b""
    for p_data in message.encode_msg(context_id, max_pdu):  # type: ignore[attr-defined]
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out += pdu.encode()
    return out


@pytest.mark.parametrize("max_pdu", [0, 16, 16384])
@pytest.mark.parametrize(
    "status, comment",
    [(0x0000, ""), (0xA700, "the object is over the limit"), (0xA900, "odd length")],
)
def test_c_store_and_c_echo_responses_are_the_bytes_pynetdicom_sends(
    max_pdu: int, status: int, comment: str
) -> None:
    sop_instance = generate_uid()
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    request.DataSet = io.BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    rq = C_STORE_RQ()
    rq.primitive_to_message(request)
    command = Command.read(encode(rq.command_set, True, True))
    assert (command.field, command.message_id, command.sop_instance_uid) == (1, 7, sop_instance)
    assert command.sop_class_uid == CTImageStorage and command.data_set_type != 0x0101

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    assert p_data_pdus(store_response(command, status, comment), 3, max_pdu) == pynetdicom_pdus(
        C_STORE_RSP(), rsp, 3, max_pdu
    )
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 9
    echo.AffectedSOPClassUID = Verification
    echo.Status = 0
    assert p_data_pdus(echo_response(9), 1, max_pdu) == pynetdicom_pdus(
        C_ECHO_RSP(), echo, 1, max_pdu
    )


@pytest.mark.parametrize(
    "sop_class, sop_instance, syntax",
    [
        (CTImageStorage, "1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd UID lengths: padded
        (CTImageStorage, "1.2.3.4.56", "1.2.840.10008.1.2"),
        ("1.2", "1.23", "1.2.840.10008.1.2.4.90"),
        (CTImageStorage, "9" * 64, "1.2.840.10008.1.2.5"),  # the longest UID
    ],
)
def test_the_stored_file_meta_is_the_bytes_pynetdicom_writes(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    """Both receive paths store the same file for the same data set (so one
    re-sent over the other path is the same object, not a conflict)."""
    expected = encode_file_meta(
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        )
    )
    assert file_meta(sop_class, sop_instance, syntax) == b"\x00" * 128 + b"DICM" + expected


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x00", b"\x08\x00\x10\x00\x02\x00\x00\x00AB", b"\x00\x00\x00\x01\xff\xff\xff\x7f"],
)
def test_bytes_that_are_no_command_set_are_refused(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        Command.read(garbage)


def test_only_storage_verification_and_c_find_requests_are_taken_by_the_lean_path() -> None:
    def rq(*contexts: object, calling: str = "MODALITY_A") -> bytes:
        return capture_associate_rq(calling, list(contexts))

    store = build_context(CTImageStorage, ExplicitVRLittleEndian)
    private = build_context("1.3.6.1.4.1.9590.100.1.2.1", ExplicitVRLittleEndian)
    assert lean_request(rq(store, build_context(Verification)), frozenset()) is not None
    assert lean_request(rq(private), frozenset()) is not None  # private: stored as received
    find = build_context(StudyRootQueryRetrieveInformationModelFind)
    assert lean_request(rq(store, find), frozenset()) is not None  # C-FIND: lean_find's
    get = build_context(StudyRootQueryRetrieveInformationModelGet)
    assert lean_request(rq(store, find, get), frozenset()) is None  # C-GET: pynetdicom's
    # a storage class another service claims is not the lean path's either
    assert lean_request(rq(store), frozenset({CTImageStorage})) is None
    assert lean_request(b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16, frozenset()) is None
    assert lean_request(rq(store)[:-10], frozenset()) is None
