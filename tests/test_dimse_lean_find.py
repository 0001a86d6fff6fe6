"""C-FIND on the lean asyncio path (archive.dimse.lean_find) as peers use it.

One index, bulk-loaded with the scale benchmark's synthetic rows (7 sites,
French names with accents, a modality mix) plus a few real objects pushed by
C-STORE, is served by two ``imag serve``: one with the lean path (the
default), one with ``dicom.lean_store = false`` (every association on
pynetdicom).  dcmtk's findscu and pynetdicom as SCU must get the same answers
from both, at every level, with wildcards, date ranges, UID lists and a
site-bound peer; each association's log line says which path served it.  The
adversaries: a C-CANCEL in the middle of a long answer read by a slow peer,
an identifier that does not decode, one over the size limit, a request while
an answer is being sent.  The identifiers written from index rows are
compared byte for byte with what ``answer()`` and pydicom write, and the
command sets and PDUs with what pynetdicom sends.  Nothing is mocked: every
exchange is DICOM over TCP."""

from __future__ import annotations

import io
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_CANCEL_RQ, C_FIND_RQ, C_FIND_RSP
from pynetdicom.dimse_primitives import C_CANCEL, C_FIND
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from archive.config import Config
from archive.dimse.identifiers import answer, query_from_identifier
from archive.dimse.lean_find import AnswerEncoder, find_response, pdus
from archive.index import open_database
from archive.index.extra import DEFAULT as DEFAULT_EXTRA_SETTING
from archive.index.extra import ExtraAttributes
from archive.query import attributes_for, extra_attributes, search
from archive.synthetic import StudySpec, modality_preset, write_study
from benchmarks import scale_data
from tests.audittrail import AuditCursor
from tests.dicomnet import (
    CLIENT_HANDLERS,
    HOST,
    SERVER_AET,
    ImagServer,
    capture_associate_rq,
    read_pdu,
    run_tool,
)
from tests.processes import eventually
from tests.test_dicom_pending import metric
from tests.test_dimse_lean import field, lean_lines, pynetdicom_lines

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind
SEED = 3
#: bulk-loaded instances: 3,000 studies, an IMAGE-level answer of 30,000 rows
INSTANCES = 30_000
NORD, SUD = "CHU_NORD", "CHU_SUD"


def peers() -> list[dict]:
    return [
        {"aet": "NORD_SCU", "host": HOST, "port": 104, "site": NORD},
        {"aet": "SUD_SCU", "host": HOST, "port": 104, "site": SUD},
        {"aet": "REGION_SCU", "host": HOST, "port": 104, "regional": True},
    ]


@dataclass
class World:
    lean: ImagServer
    pynetdicom: ImagServer
    shape: scale_data.Shape
    audit: AuditCursor
    pushed: list[Path]

    def server(self, lean: bool) -> ImagServer:
        return self.lean if lean else self.pynetdicom


@pytest.fixture(scope="module")
def world(module_index_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    shape = scale_data.load(module_index_url, INSTANCES, SEED, report=lambda text: None)
    # two nodes of one cluster: one index, one object store
    store = {"url": tmp_path_factory.mktemp("objects").as_uri()}
    lean = ImagServer(
        tmp_path_factory.mktemp("lean"),
        module_index_url,
        peers(),
        settings={"storage": store},
        probe_aet="REGION_SCU",
    ).start()
    other = ImagServer(
        tmp_path_factory.mktemp("pynetdicom"),
        module_index_url,
        peers(),
        settings={"storage": store, "dicom": {"lean_store": False}},
        probe_aet="REGION_SCU",
    ).start()
    # the first node's admin token, for the metrics of both
    token = (lean.data_dir / "admin-token").read_text()
    other.data_dir.mkdir(parents=True, exist_ok=True)
    (other.data_dir / "admin-token").write_text(token)
    spec = StudySpec(
        patient_id="FIND01",
        patient_name="CÔTÉ^Hélène=コテ^エレン",
        issuer_of_patient_id="CHU_NORD",
        charset="ISO_IR 192",
        series=[
            modality_preset("MG", rows=64, columns=64, instances=2),
            modality_preset("CT", rows=64, columns=64, instances=3),
        ],
    )
    pushed = write_study(spec, tmp_path_factory.mktemp("pushed"), seed=5)
    run = run_tool(
        "/usr/bin/storescu",
        "-aec",
        SERVER_AET,
        "-aet",
        "NORD_SCU",
        HOST,
        str(lean.dicom_port),
        *map(str, pushed),
    )
    assert run.returncode == 0, run.stdout
    db = open_database(module_index_url)
    try:
        yield World(lean, other, shape, AuditCursor(db), pushed)
    finally:
        db.close()
        for server in (lean, other):
            assert server.stop() == 0, server.log()


def next_line(server: ImagServer, lean: bool, before: int) -> str:
    """The one association log line of the path (lean or pynetdicom) after
    the ``before`` it had (written as the connection closes)."""
    lines = lean_lines if lean else pynetdicom_lines
    eventually(lambda: len(lines(server)) > before, timeout=10, what="the association's log line")
    [line] = lines(server)[before:]
    return line


def sample_study(world: World, number: int) -> scale_data.Study:
    return scale_data.study(SEED, number, world.shape)


# -- findscu: the same answers on both paths ---------------------------------------------------


def findscu_queries(world: World) -> list[tuple[str, str, dict[str, str]]]:
    """(model, calling AE, keys) of the comparisons: every level, wildcards,
    date ranges, UID lists, accents."""
    study = sample_study(world, 17)
    other = sample_study(world, 18)
    person = scale_data.patient(SEED, study.patient)
    pushed = pydicom.dcmread(world.pushed[0], stop_before_pixels=True)
    return [
        (
            "-P",
            "REGION_SCU",
            {
                "QueryRetrieveLevel": "PATIENT",
                "SpecificCharacterSet": "ISO_IR 192",
                "PatientName": "CÔTÉ*",
                "PatientID": "",
                "PatientBirthDate": "",
                "PatientSex": "",
                "NumberOfPatientRelatedStudies": "",
            },
        ),
        (
            "-S",
            "REGION_SCU",
            {
                "QueryRetrieveLevel": "STUDY",
                "PatientID": person.patient_id,
                "PatientName": "",
                "StudyInstanceUID": "",
                "StudyDate": "",
                "StudyTime": "",
                "AccessionNumber": "",
                "ModalitiesInStudy": "",
                "StudyDescription": "",
                "NumberOfStudyRelatedInstances": "",
                "RetrieveAETitle": "",
                "InstanceAvailability": "",
            },
        ),
        (
            "-S",
            "REGION_SCU",
            {
                "QueryRetrieveLevel": "STUDY",
                "StudyDate": f"{study.date[:6]}01-{study.date[:6]}28",
                "ModalitiesInStudy": "CT\\MR",
                "PatientName": "M?R*",
                "StudyInstanceUID": "",
            },
        ),
        (
            "-S",
            "NORD_SCU",
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": f"{study.uid}\\{other.uid}\\{pushed.StudyInstanceUID}",
                "SeriesInstanceUID": "",
                "Modality": "",
                "SeriesNumber": "",
                "SeriesDescription": "",
                "NumberOfSeriesRelatedInstances": "",
                "ImageLaterality": "",
            },
        ),
        (
            "-S",
            "REGION_SCU",
            {
                "QueryRetrieveLevel": "IMAGE",
                "StudyInstanceUID": pushed.StudyInstanceUID,
                "SeriesInstanceUID": pushed.SeriesInstanceUID,
                "SOPInstanceUID": "",
                "SOPClassUID": "",
                "InstanceNumber": "",
                "ImageLaterality": "",
                "ViewPosition": "",
            },
        ),
        (
            "-S",
            "REGION_SCU",
            {
                "QueryRetrieveLevel": "IMAGE",
                "StudyInstanceUID": study.uid,
                "SeriesInstanceUID": study.series[0].uid,
                "SOPInstanceUID": "",
                "InstanceNumber": "",
            },
        ),
    ]


def test_findscu_gets_the_same_answers_from_the_lean_path_and_from_pynetdicom(
    world: World,
) -> None:
    for model, aet, keys in findscu_queries(world):
        answers = {}
        for lean in (True, False):
            server = world.server(lean)
            lean_before, pyn_before = len(lean_lines(server)), len(pynetdicom_lines(server))
            run, found = server.findscu(aet, model, keys)
            assert run.returncode == 0, run.stdout
            answers[lean] = found
            line = next_line(server, lean, lean_before if lean else pyn_before)
            assert field(line, "found") == str(len(found))
        assert answers[True] == answers[False], keys
        assert answers[True], f"the comparison needs matches: {keys}"


def test_a_site_bound_peer_sees_only_its_site_on_the_lean_path_and_a_hidden_study_is_audited(
    world: World,
) -> None:
    abroad = next(s for n in range(1, 200) if (s := sample_study(world, n)).site not in (NORD, SUD))
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": abroad.uid, "PatientID": ""}
    world.audit.new_rows()
    for lean in (True, False):
        run, found = world.server(lean).findscu("NORD_SCU", "-S", keys)
        assert run.returncode == 0 and found == []
    rows = [r for r in world.audit.new_rows() if r["action"] == "dicom.c-find"]
    assert [(r["outcome"], r["study_uid"]) for r in rows] == [("denied", abroad.uid)] * 2
    assert rows[0]["detail"] == rows[1]["detail"]
    by_site = {
        "QueryRetrieveLevel": "STUDY",
        "StudyDate": "20200101-20201231",
        "StudyInstanceUID": "",
        "AccessionNumber": "",
    }
    _, nord = world.lean.findscu("NORD_SCU", "-S", by_site)
    _, everyone = world.lean.findscu("REGION_SCU", "-S", by_site)
    # accession numbers begin with the first three letters of the site
    assert nord and all(str(ds.AccessionNumber).startswith(NORD[:3]) for ds in nord)
    assert len(everyone) > len(nord)


# -- pynetdicom as SCU ------------------------------------------------------------------------


def pynetdicom_find(
    server: ImagServer, identifier: Dataset, *, lean: bool, aet: str = "REGION_SCU"
) -> list[tuple[int, Dataset | None]]:
    """(status, identifier) of each response to one C-FIND; a C-GET context
    proposed beside sends the association to pynetdicom."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(STUDY_ROOT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if not lean:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate(HOST, server.dicom_port, ae_title=SERVER_AET, evt_handlers=CLIENT_HANDLERS)
    assert assoc.is_established
    try:
        return [(int(s.Status), ds) for s, ds in assoc.send_c_find(identifier, STUDY_ROOT)]
    finally:
        assoc.release()
        ae.shutdown()


def test_pynetdicom_scu_gets_the_same_responses_from_both_paths_of_one_server(
    world: World,
) -> None:
    server = world.lean
    study = sample_study(world, 40)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = study.uid
    identifier.SeriesInstanceUID = ""
    identifier.Modality = ""
    identifier.SeriesDescription = ""
    identifier.PatientName = ""
    identifier.NumberOfSeriesRelatedInstances = ""
    identifier.ReferencedSeriesSequence = []
    lean_before = len(lean_lines(server))
    lean = pynetdicom_find(server, identifier, lean=True)
    assert field(next_line(server, True, lean_before), "found") == str(len(study.series))
    pyn_before = len(pynetdicom_lines(server))
    other = pynetdicom_find(server, identifier, lean=False)
    assert field(next_line(server, False, pyn_before), "found") == str(len(study.series))
    assert [s for s, _ in lean] == [0xFF00] * len(study.series) + [0x0000]
    assert lean == other


def test_an_association_mixing_c_store_and_c_find_is_served_lean(world: World) -> None:
    server = world.lean
    ds = pydicom.dcmread(world.pushed[-1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ae = AE(ae_title="NORD_SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(STUDY_ROOT)
    before = len(lean_lines(server))
    finds = metric(server, "imag_dicom_operations_total", 'service="C-FIND",status="0x0000"')
    assoc = ae.associate(HOST, server.dicom_port, ae_title=SERVER_AET, evt_handlers=CLIENT_HANDLERS)
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = ds.StudyInstanceUID
        query.SeriesInstanceUID = ds.SeriesInstanceUID
        query.SOPInstanceUID = ds.SOPInstanceUID
        assert [int(s.Status) for s, _ in assoc.send_c_find(query, STUDY_ROOT)] == [0x0000]
        assert assoc.send_c_store(ds).Status == 0x0000
        [(pending, found), (done, _)] = list(assoc.send_c_find(query, STUDY_ROOT))
        assert (pending.Status, done.Status) == (0xFF00, 0x0000)
        assert found.SOPInstanceUID == ds.SOPInstanceUID
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
        ae.shutdown()
    line = next_line(server, True, before)
    assert (field(line, "stored"), field(line, "found")) == ("1", "1")
    after = metric(server, "imag_dicom_operations_total", 'service="C-FIND",status="0x0000"')
    assert after == finds + 2


# -- raw DIMSE, for cancels and hostile identifiers --------------------------------------------


def message_pdus(message: object, primitive: object, context_id: int, max_pdu: int) -> bytes:
    message.primitive_to_message(primitive)  # type: ignore[attr-defined]
    out = b""
    for p_data in message.encode_msg(context_id, max_pdu):  # type: ignore[attr-defined]
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out += pdu.encode()
    return out


class RawScu:
    """An association from a plain socket (``rcvbuf``: a small receive
    buffer, a slow reader), Study Root FIND in ``syntax`` on context 1."""

    def __init__(
        self,
        server: ImagServer,
        aet: str = "REGION_SCU",
        rcvbuf: int = 0,
        syntax: str = ImplicitVRLittleEndian,
    ) -> None:
        self.conn = socket.socket()
        if rcvbuf:
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.conn.settimeout(60)
        self.conn.connect((HOST, server.dicom_port))
        rq = capture_associate_rq(aet, [build_context(STUDY_ROOT, syntax)])
        self.conn.sendall(rq)
        assert read_pdu(self.conn)[0] == 0x02, "A-ASSOCIATE-AC"

    def find(self, identifier: bytes, message_id: int = 7) -> None:
        request = C_FIND()
        request.MessageID = message_id
        request.AffectedSOPClassUID = STUDY_ROOT
        request.Priority = 2
        request.Identifier = io.BytesIO(identifier)
        self.conn.sendall(message_pdus(C_FIND_RQ(), request, 1, 16382))

    def cancel(self, message_id: int = 7) -> None:
        request = C_CANCEL()
        request.MessageIDBeingRespondedTo = message_id
        self.conn.sendall(message_pdus(C_CANCEL_RQ(), request, 1, 16382))

    def response(self) -> tuple[Dataset, bytes]:
        """The next command set (decoded) and its data set (bytes, maybe none)."""
        command, data = b"", b""
        while True:
            pdu = read_pdu(self.conn)
            assert pdu[0] == 0x04, f"not a P-DATA-TF: {pdu[:10]!r}"
            pos = 6
            while pos < len(pdu):
                length = int.from_bytes(pdu[pos : pos + 4], "big")
                control, value = pdu[pos + 5], pdu[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 1:
                    command += value
                    if control & 2:
                        rsp = decode(io.BytesIO(command), True, True)
                        if rsp.CommandDataSetType == 0x0101:
                            return rsp, b""
                else:
                    data += value
                    if control & 2:
                        return rsp, data

    def release(self) -> None:
        self.conn.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        assert read_pdu(self.conn)[0] == 0x06
        self.conn.close()


def implicit(ds: Dataset) -> bytes:
    return encode(ds, True, True) or b""


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "pynetdicom"])
def test_a_c_cancel_read_while_a_long_answer_is_written_stops_it_with_fe00(
    world: World, lean: bool
) -> None:
    """Every instance (30,000 rows) to a peer reading slowly: the C-CANCEL it
    sends after the first match stops the answer long before its end, and the
    association goes on."""
    server = world.server(lean)
    cancels = metric(server, "imag_dicom_operations_total", 'service="C-FIND",status="0xFE00"')
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = ""
    query.SOPClassUID = ""
    scu = RawScu(server, rcvbuf=4096)
    scu.find(implicit(query))
    first, data = scu.response()
    assert first.Status == 0xFF00 and data
    scu.cancel()
    pending = 1
    while (rsp := scu.response()[0]).Status == 0xFF00:
        pending += 1
    assert rsp.Status == 0xFE00, hex(rsp.Status)
    assert pending < INSTANCES // 2, "the answer was not stopped"
    query.SOPInstanceUID = scale_data.instance_uid(sample_study(world, 9).series[0], 0)
    scu.find(implicit(query), message_id=8)
    assert [scu.response()[0].Status for _ in range(2)] == [0xFF00, 0x0000]
    scu.release()
    after = metric(server, "imag_dicom_operations_total", 'service="C-FIND",status="0xFE00"')
    assert after == cancels + 1


def undefined_length_name() -> bytes:
    """PatientName of undefined length, no delimiter: it swallows the rest."""
    query = Dataset()
    query.PatientID = "NOBODY"
    query.QueryRetrieveLevel = "STUDY"
    return b"\x10\x00\x10\x00\xff\xff\xff\xffABCD" + implicit(query)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "pynetdicom"])
@pytest.mark.parametrize(
    "syntax, identifier, comment",
    [
        (ImplicitVRLittleEndian, undefined_length_name(), "QueryRetrieveLevel"),
        (DeflatedExplicitVRLittleEndian, b"\xff" * 64, "cannot be decoded"),
    ],
    ids=["undefined-length", "not-deflate"],
)
def test_an_identifier_that_does_not_decode_is_refused_a900_and_audited_once(
    world: World, lean: bool, syntax: str, identifier: bytes, comment: str
) -> None:
    server = world.server(lean)
    world.audit.new_rows()
    scu = RawScu(server, syntax=syntax)
    scu.find(identifier)
    rsp, data = scu.response()
    assert rsp.Status == 0xA900 and not data
    assert comment in rsp.ErrorComment
    [row] = world.audit.new_rows()
    assert (row["action"], row["outcome"], row["status"]) == ("dicom.c-find", "failed", 0xA900)
    good = Dataset()
    good.QueryRetrieveLevel = "STUDY"
    good.PatientID = "NOBODY"
    scu.find(encode(good, *_ts(syntax), syntax == DeflatedExplicitVRLittleEndian) or b"", 9)
    assert scu.response()[0].Status == 0x0000  # the association goes on
    scu.release()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of the long value
def test_an_identifier_over_the_size_limit_is_refused_without_being_held(world: World) -> None:
    server = world.lean
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyDescription = "x" * 60_000
    huge = implicit(query) * 20  # 1.2 MB
    world.audit.new_rows()
    scu = RawScu(server)
    scu.find(huge)
    rsp, _ = scu.response()
    assert rsp.Status == 0xA900 and "over" in rsp.ErrorComment
    [row] = world.audit.new_rows()
    assert (row["action"], row["outcome"]) == ("dicom.c-find", "failed")
    scu.release()


def test_a_request_sent_while_an_answer_is_written_aborts_the_association(world: World) -> None:
    """No asynchronous operations were negotiated: a second C-FIND before the
    first is answered breaks the protocol, and the association is aborted."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = ""
    scu = RawScu(world.lean, rcvbuf=4096)
    scu.find(implicit(query))
    scu.find(implicit(query), message_id=8)
    kinds = set()
    try:
        while True:
            kinds.add(read_pdu(scu.conn)[0])
    except (ConnectionError, OSError):
        pass
    assert 0x07 in kinds, "A-ABORT"


# -- the bytes, against answer() + pydicom and pynetdicom's encoding ---------------------------


def rows_of(world: World, identifier: Dataset, make_config: Callable[..., Config]) -> tuple:
    """(query, tags, rows) as the C-FIND of ``identifier`` finds them in the index."""
    config = make_config(index_url=world.lean.index_url)
    query, tags = query_from_identifier(identifier, None, extra_attributes(config))
    db = open_database(world.lean.index_url)
    try:
        return query, tags, search(db, query)
    finally:
        db.close()


def identifiers_from_the_index(world: World) -> list[Dataset]:
    """Identifiers at each level asking for every attribute the index holds
    (names with accents, dates, times, UIDs, counts, modality lists, extra
    attributes) plus keys it does not hold and an empty sequence."""
    pushed = pydicom.dcmread(world.pushed[0], stop_before_pixels=True)
    year = sample_study(world, 5).date[:4]
    out = []
    for level, keys in [
        ("PATIENT", {"PatientName": "L*"}),
        ("STUDY", {"StudyDate": f"{year}0101-{year}1231"}),
        ("STUDY", {"PatientID": str(pushed.PatientID)}),
        ("SERIES", {"StudyInstanceUID": str(pushed.StudyInstanceUID)}),
        ("SERIES", {"Modality": "MR"}),
        ("IMAGE", {"StudyInstanceUID": str(pushed.StudyInstanceUID)}),
    ]:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.QueryRetrieveLevel = level
        extra = ExtraAttributes.from_setting(DEFAULT_EXTRA_SETTING)
        for keyword in attributes_for(level, extra):
            setattr(ds, keyword, "")
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        ds.StationName = ""  # not held: answered empty
        ds.OtherPatientIDsSequence = []
        ds.RetrieveAETitle = ""
        ds.InstanceAvailability = ""
        out.append(ds)
    return out


def test_identifiers_written_from_index_rows_are_the_bytes_answer_and_pydicom_write(
    world: World, make_config: Callable[..., Config]
) -> None:
    compared = 0
    for identifier in identifiers_from_the_index(world):
        query, tags, rows = rows_of(world, identifier, make_config)
        assert rows, identifier
        for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
            encoder = AnswerEncoder(tags, query.level, SERVER_AET, syntax)
            assert encoder.layout is not None, "written from the row, not by pydicom"
            for row in rows[:400]:
                expected = encode(answer(row, tags, query.level, SERVER_AET), *_ts(syntax))
                assert encoder.encode(row) == expected, row
                compared += 1
    assert compared > 1000


def _ts(syntax: pydicom.uid.UID) -> tuple[bool, bool]:
    return syntax.is_implicit_VR, syntax.is_little_endian


#: values a row may hold that pydicom writes in its own way
_ODD_VALUES = {
    "PatientName": [
        "CÔTÉ^Hélène",
        "MÜLLER^Jean=ミュラー^ジャン",
        "DUPONT^Jean=",
        "A^B==",
        "O'BRIEN\\SEÁN",
        "X^Y^^^",
        "",
        None,
    ],
    "PatientID": ["P1", "IDÉ", "A B ", "", None],
    "StudyDate": ["20240101", "2024010", "20240101\\20240102", None],
    "StudyTime": ["101010", "1010.123", "1", None],
    "StudyInstanceUID": ["1.2.3", "1.2.34", "1.2.3\\1.2.44", ""],
    "ModalitiesInStudy": ["CT\\MR", "CT", "\\CT\\\\MR", "SR\\", "", None],
    "NumberOfStudyRelatedInstances": [0, 7, -3, "7", " 8 ", "+9", "003", "1\\2", "  ", None],
    "SeriesNumber": [1, "22", None, "x"],
    "StudyDescription": ["Scanner thorax ça", "a\\b", "odd", "é" * 40_000],
    "ImageLaterality": ["L", "R", "LR", "é"],
    "AccessionNumber": ["ACC1", "ACCÈ", None],
    "PatientSex": ["F", "M", ""],
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of the odd values
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                                    ExplicitVRBigEndian], ids=lambda s: s.name)  # fmt: skip
def test_odd_row_values_are_written_as_answer_and_pydicom_write_them_or_fail_alike(
    syntax: pydicom.uid.UID,
) -> None:
    rnd = random.Random(17)
    keywords = [*_ODD_VALUES, "RetrieveAETitle", "InstanceAvailability", "StationName"]
    keywords += ["QueryRetrieveLevel", "SpecificCharacterSet", "ReferencedStudySequence"]
    fast = 0
    for _ in range(1500):
        tags = [Tag(k) for k in rnd.sample(keywords, rnd.randint(1, len(keywords)))]
        level = rnd.choice(["PATIENT", "STUDY", "SERIES", "IMAGE"])
        row = {k: rnd.choice(v) for k, v in _ODD_VALUES.items() if rnd.random() < 0.9}
        row["SeriesInstanceUID"] = row["SOPInstanceUID"] = "1.2.5"
        encoder = AnswerEncoder(tags, level, SERVER_AET, syntax)
        try:
            expected: bytes | type = encode(answer(row, tags, level, SERVER_AET), *_ts(syntax))
        except Exception as exc:  # noqa: BLE001 - pydicom refuses the value: so must we
            expected = type(exc)
        try:
            got: bytes | type = encoder.encode(row)
        except Exception as exc:  # noqa: BLE001
            got = type(exc)
        assert got == expected, (row, [keyword_for_tag(t) for t in tags])
        fast += encoder.layout is not None
    assert fast > 500 or syntax == ExplicitVRBigEndian


def pynetdicom_find_rsp(
    status: int, identifier: bytes | None, comment: str, context_id: int, max_pdu: int
) -> bytes:
    rsp = C_FIND()
    rsp.MessageID = 9
    rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID = PATIENT_ROOT
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    if identifier is not None:
        rsp.Identifier = io.BytesIO(identifier)
    return message_pdus(C_FIND_RSP(), rsp, context_id, max_pdu)


@pytest.mark.parametrize("max_pdu", [0, 16, 200, 16384])
@pytest.mark.parametrize(
    "status, comment",
    [
        (0xFF00, ""),
        (0x0000, ""),
        (0xFE00, ""),
        (0xA700, "audit trail cannot be written: access refused"),
        (0xA900, "PatientBirthDate 'é' is not a date"),
    ],
)
def test_c_find_responses_are_the_bytes_pynetdicom_sends(
    max_pdu: int, status: int, comment: str
) -> None:
    identifier = (
        b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 192\x08\x00\x52\x00\x06\x00\x00\x00STUDY " * 20
        if status == 0xFF00
        else None
    )
    ours = pdus(find_response(PATIENT_ROOT, 9, status, comment), 5, max_pdu, command=True)
    if identifier is not None:
        ours += pdus(identifier, 5, max_pdu, command=False)
    assert ours == pynetdicom_find_rsp(status, identifier, comment, 5, max_pdu)
