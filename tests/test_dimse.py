"""DICOM network services as peers use them: dcmtk's echoscu, storescu,
findscu, getscu and movescu (to a storescp started here) and pynetdicom drive
a real `imag serve`; a kill -9 in the middle of a push; hostile input over
raw sockets.  Nothing is mocked: every exchange is DICOM over TCP."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from archive.index import open_database
from archive.synthetic import (
    StudySpec,
    generate_mixed_set,
    modality_preset,
    write_study,
)
from storage import open_store
from tests.dcmtk import dcmtk
from tests.dicomnet import (
    CLIENT_HANDLERS,
    HOST,
    SERVER_AET,
    TOOL_ENV,
    ImagServer,
    StoreSCP,
    assert_same_instance,
    capture_associate_rq,
    read_pdu,
    split_part10,
    storescu_profile,
)
from tests.processes import eventually
from tests.s3server import StoreUnderTest, index_for_store

# the DIMSE paths meet the store alike on any index: S3 on SQLite only here
# (PostgreSQL + S3: test_dicomweb_s3, test_several_nodes)
pytestmark = pytest.mark.s3_on_sqlite

SUCCESS = 0x0000


def peers(storescp_port: int = 104) -> list[dict]:
    return [
        {"aet": "MODALITY_A", "host": HOST, "port": 104, "site": "A"},
        {"aet": "MODALITY_B", "host": HOST, "port": 104, "site": "B"},
        {"aet": "REGIONAL", "host": HOST, "port": 104, "regional": True},
        {"aet": "PYCLIENT", "host": HOST, "port": 104, "site": "C"},
        {"aet": "WRONGHOST", "host": "127.0.0.2", "port": 104, "site": "A"},
        {"aet": "STORESCP", "host": HOST, "port": storescp_port, "site": "A"},
    ]


# -- the shared server: one per index backend, the mixed set pushed once ---------------------


@pytest.fixture(scope="module")
def index_url(module_index_url: str, module_store: StoreUnderTest) -> str:
    """One index per backend and object store for the whole module (conftest's
    is per test): a server on S3 never sees rows of objects in a folder."""
    return index_for_store(module_index_url, module_store)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[StudySpec], dict[str, Path]]:
    """Eight studies in mixed modalities and transfer syntaxes; files by SOP Instance UID."""
    folder = tmp_path_factory.mktemp("mixed")
    specs = generate_mixed_set(folder, studies=8, seed=11)
    files = {}
    for path in sorted(folder.iterdir()):
        files[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return specs, files


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    scp = StoreSCP("STORESCP", tmp_path_factory.mktemp("storescp") / "received")
    yield scp
    scp.stop()


@dataclass
class Pushed:
    """The running server and what was pushed into it."""

    server: ImagServer
    store: StoreUnderTest
    specs: list[StudySpec]
    files: dict[str, Path]  # SOP Instance UID -> file sent
    site_of: dict[str, str]  # Study Instance UID -> site of the sender
    runs: list[tuple[str, int, str]]  # (calling AE, exit code, output) per storescu

    def spec(self, accession: str) -> StudySpec:
        return next(s for s in self.specs if s.accession_number == accession)

    def files_of(self, study_uid: str, series_uid: str | None = None) -> dict[str, Path]:
        out = {}
        for uid, path in self.files.items():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.StudyInstanceUID == study_uid and series_uid in (None, ds.SeriesInstanceUID):
                out[uid] = path
        return out


@pytest.fixture(scope="module")
def pushed(
    index_url: str,
    mixed: tuple[list[StudySpec], dict[str, Path]],
    storescp: StoreSCP,
    module_store: StoreUnderTest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pushed]:
    """`imag serve` on this index backend and object store (a folder or an S3
    bucket), with the mixed set pushed by four storescu processes at once: even
    studies by MODALITY_A (site A), odd ones by MODALITY_B (site B), each site's
    files dealt over two associations."""
    specs, files = mixed
    workdir = tmp_path_factory.mktemp("imag")
    server = ImagServer(
        workdir,
        index_url,
        peers(storescp.port),
        settings=module_store.toml(),
        extra_env=module_store.env,
    ).start()
    site_of = {spec.study_uid: "AB"[n % 2] for n, spec in enumerate(specs)}
    by_site: dict[str, list[Path]] = {"A": [], "B": []}
    for path in files.values():
        study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
        by_site[site_of[study]].append(path)
    profile = storescu_profile(files.values(), workdir / "push.cfg")
    procs = []
    for site, paths in by_site.items():
        for half in (paths[0::2], paths[1::2]):
            procs.append((f"MODALITY_{site}", server.storescu(f"MODALITY_{site}", half, profile)))
    runs = []
    for aet, proc in procs:
        out, _ = proc.communicate(timeout=120)
        runs.append((aet, proc.returncode, out))
    try:
        yield Pushed(server, module_store, specs, files, site_of, runs)
    finally:
        code = server.stop()
        assert code == 0, f"imag serve exited {code} on SIGTERM:\n{server.log()}"


def index_rows(server: ImagServer, sql: str, params: tuple = ()) -> list[tuple]:
    db = open_database(server.index_url)
    try:
        return db.query(sql, params)
    finally:
        db.close()


# -- C-ECHO and who may associate ------------------------------------------------------------


def test_echoscu_succeeds_for_a_known_peer_and_strangers_are_rejected_with_the_reason_logged(
    pushed: Pushed,
) -> None:
    server = pushed.server
    ok = server.echoscu("MODALITY_A")
    assert ok.returncode == 0, ok.stdout

    unknown = server.echoscu("NOBODY")
    assert unknown.returncode != 0
    assert "Association Rejected" in unknown.stdout
    assert "Calling AE Title Not Recognized" in unknown.stdout

    # a configured AE title, but calling from 127.0.0.1 instead of its host 127.0.0.2
    misplaced = server.echoscu("WRONGHOST")
    assert misplaced.returncode != 0
    assert "Calling AE Title Not Recognized" in misplaced.stdout

    wrong_called = server.echoscu("MODALITY_A", called="SOMEONE_ELSE")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stdout

    log = server.log()
    assert "association rejected: calling AE title 'NOBODY' is not a configured peer" in log
    assert (
        "association rejected: calling AE title 'WRONGHOST' connected from 127.0.0.1, "
        "not from its configured host 127.0.0.2" in log
    )
    assert server.echoscu("MODALITY_B").returncode == 0  # and it keeps serving


# -- C-STORE from storescu -------------------------------------------------------------------


def test_storescu_pushes_a_mixed_set_over_four_parallel_associations_stored_as_sent(
    pushed: Pushed,
) -> None:
    server, files = pushed.server, pushed.files
    for aet, code, out in pushed.runs:
        assert code == 0 and "Store Failed" not in out, f"storescu as {aet}:\n{out}"
    sent_syntaxes = {split_part10(p.read_bytes())[0] for p in files.values()}
    assert {JPEG2000Lossless, RLELossless, ExplicitVRBigEndian, ImplicitVRLittleEndian} <= (
        sent_syntaxes
    ), "the set should cover compressed, big endian and implicit syntaxes"

    run = server.imag("stats", "--json")
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)
    # patients are (site, issuer, ID): a local identity belongs to the site that sent
    # it; a producer without IssuerOfPatientID gets its site as the issuer
    patients = {
        (site, s.issuer_of_patient_id or site, s.patient_id)
        for s in pushed.specs
        for site in [pushed.site_of[s.study_uid]]
    }
    assert {k: stats[k] for k in ("patients", "studies", "series", "instances")} == {
        "patients": len(patients),
        "studies": len(pushed.specs),
        "series": sum(len(s.series) for s in pushed.specs),
        "instances": len(files),
    }
    assert stats["bytes"] > 0

    rows = index_rows(
        server,
        "SELECT i.sop_instance_uid, i.object_key, i.sha256, i.stored_ts, st.study_uid, st.site "
        "FROM instances i JOIN series se ON se.id = i.series_ref "
        "JOIN studies st ON st.id = se.study_ref",
    )
    assert {r[0] for r in rows} == set(files)
    if pushed.store.is_s3:  # nothing of the objects on local disk
        assert not (server.data_dir / "objects").exists()
    store = pushed.store.open(server.data_dir)
    try:
        for uid, key, sha256, stored_ts, study_uid, site in rows:
            stored = store.get(key)
            assert hashlib.sha256(stored).digest() == bytes(sha256), uid
            sent = files[uid].read_bytes()
            ts, dataset = split_part10(sent)
            assert stored_ts == ts == split_part10(stored)[0], f"{uid} not stored as received"
            assert split_part10(stored)[1] == dataset, f"{uid}: stored data set differs"
            assert site == pushed.site_of[study_uid]
    finally:
        store.close()


# -- C-FIND from findscu ---------------------------------------------------------------------


def test_findscu_at_patient_level_matches_a_utf8_name_wildcard_and_keys_patients_by_issuer(
    pushed: Pushed,
) -> None:
    server = pushed.server
    run, answers = server.findscu(
        "REGIONAL",
        "-P",
        {
            "QueryRetrieveLevel": "PATIENT",
            "SpecificCharacterSet": "ISO_IR 192",
            "PatientName": "MÜ*",
            "PatientID": None,
            "IssuerOfPatientID": None,
            "NumberOfPatientRelatedStudies": None,
        },
    )
    assert run.returncode == 0, run.stdout
    # one study sent by each site: a local identity belongs to its site, so the
    # regional view has one patient row per site (linking them is the identity
    # plugin's job), each with its own study
    assert [(a.PatientName, a.PatientID, a.IssuerOfPatientID) for a in answers] == [
        ("MÜLLER^Hans", "IMAG0001", "HOSP_NORD")
    ] * 2
    assert [a.NumberOfPatientRelatedStudies for a in answers] == [1, 1]

    # the same patient seen from site A: only the study site A sent counts
    _, from_a = server.findscu(
        "MODALITY_A",
        "-P",
        {
            "QueryRetrieveLevel": "PATIENT",
            "SpecificCharacterSet": "ISO_IR 192",
            "PatientName": "mü*",  # PN matching is case-insensitive
            "NumberOfPatientRelatedStudies": None,
        },
    )
    assert [(a.PatientName, a.NumberOfPatientRelatedStudies) for a in from_a] == [
        ("MÜLLER^Hans", 1)
    ]

    # one PatientID, two issuers: two patients, each with its own name
    _, same_id = server.findscu(
        "REGIONAL",
        "-P",
        {
            "QueryRetrieveLevel": "PATIENT",
            "PatientID": "IMAG0002",
            "IssuerOfPatientID": None,
            "PatientName": None,
        },
    )
    assert sorted((a.IssuerOfPatientID, str(a.PatientName)) for a in same_id) == [
        ("CLINIQUE_SUD", "NGUYỄN^Thị Thu"),
        ("HOSP_NORD", "CÔTÉ^Zoé"),
    ]
    # no IssuerOfPatientID sent: the sender's site stands in
    _, no_issuer = server.findscu(
        "REGIONAL",
        "-P",
        {"QueryRetrieveLevel": "PATIENT", "PatientID": "IMAG0004", "IssuerOfPatientID": None},
    )
    assert [a.IssuerOfPatientID for a in no_issuer] == [
        pushed.site_of[pushed.spec("ACC4001").study_uid]
    ]


def test_findscu_at_study_level_matches_date_ranges_and_uid_lists_and_returns_counts(
    pushed: Pushed,
) -> None:
    server, specs = pushed.server, pushed.specs
    _, answers = server.findscu(
        "REGIONAL",
        "-S",
        {
            "QueryRetrieveLevel": "STUDY",
            "StudyInstanceUID": None,
            "StudyDate": None,
            "AccessionNumber": None,
            "PatientID": None,
            "NumberOfStudyRelatedSeries": None,
            "NumberOfStudyRelatedInstances": None,
            "ModalitiesInStudy": None,
        },
    )
    found = {a.StudyInstanceUID: a for a in answers}
    assert {s.study_uid for s in specs} <= set(found)
    for spec in specs:
        a = found[spec.study_uid]
        assert (a.StudyDate, a.AccessionNumber, a.PatientID) == (
            spec.study_date,
            spec.accession_number,
            spec.patient_id,
        )
        assert int(a.NumberOfStudyRelatedSeries) == len(spec.series)
        assert int(a.NumberOfStudyRelatedInstances) == spec.instance_count
        modalities = a.ModalitiesInStudy
        modalities = [modalities] if isinstance(modalities, str) else list(modalities)
        assert sorted(modalities) == sorted({s.modality for s in spec.series})

    pushed_uids = {s.study_uid for s in specs}

    def study_uids(keys: dict) -> set[str]:
        """The pushed studies matching ``keys`` (other tests may add studies)."""
        run, answers = server.findscu(
            "REGIONAL", "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": None} | keys
        )
        assert run.returncode == 0, run.stdout
        return {a.StudyInstanceUID for a in answers} & pushed_uids

    def dated(lo: str, hi: str) -> set[str]:
        return {s.study_uid for s in specs if lo <= s.study_date <= hi}

    assert study_uids({"StudyDate": "20240301-20240430"}) == dated("20240301", "20240430")
    assert dated("20240301", "20240430"), "the range should match something"
    assert study_uids({"StudyDate": "-20240131"}) == dated("0", "20240131")
    assert study_uids({"StudyDate": "20240601-"}) == dated("20240601", "9")
    two = [specs[1].study_uid, specs[4].study_uid]
    assert study_uids({"StudyInstanceUID": "\\".join(two)}) == set(two)
    assert study_uids({"AccessionNumber": "ACC1*"}) == {
        s.study_uid for s in specs if s.accession_number.startswith("ACC1")
    }


def test_findscu_at_series_and_image_levels_answers_what_was_pushed(pushed: Pushed) -> None:
    server = pushed.server
    for spec in pushed.specs:
        run, answers = server.findscu(
            "REGIONAL",
            "-S",
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": spec.study_uid,
                "SeriesInstanceUID": None,
                "Modality": None,
                "NumberOfSeriesRelatedInstances": None,
            },
        )
        assert run.returncode == 0, run.stdout
        assert sorted(
            (a.SeriesInstanceUID, a.Modality, int(a.NumberOfSeriesRelatedInstances))
            for a in answers
        ) == sorted((s.series_uid, s.modality, s.instances) for s in spec.series)

    _, mr_like = server.findscu(
        "REGIONAL",
        "-S",
        {"QueryRetrieveLevel": "SERIES", "Modality": "M?", "SeriesInstanceUID": None},
    )
    assert {a.SeriesInstanceUID for a in mr_like} == {
        s.series_uid for spec in pushed.specs for s in spec.series if s.modality in ("MR", "MG")
    }

    spec = pushed.spec("ACC1001")
    series = spec.series[0]
    sent = pushed.files_of(spec.study_uid, series.series_uid)
    _, images = server.findscu(
        "REGIONAL",
        "-S",
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": spec.study_uid,
            "SeriesInstanceUID": series.series_uid,
            "SOPInstanceUID": None,
            "SOPClassUID": None,
            "InstanceNumber": None,
        },
    )
    assert {a.SOPInstanceUID for a in images} == set(sent)
    for a in images:
        ds = pydicom.dcmread(sent[a.SOPInstanceUID], stop_before_pixels=True)
        assert (a.SOPClassUID, int(a.InstanceNumber)) == (ds.SOPClassUID, ds.InstanceNumber)


def test_a_modality_finds_and_retrieves_only_its_own_sites_studies(
    pushed: Pushed, tmp_path: Path
) -> None:
    server = pushed.server

    def studies(aet: str) -> set[str]:
        run, answers = server.findscu(
            aet, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": None}
        )
        assert run.returncode == 0, run.stdout
        return {a.StudyInstanceUID for a in answers}

    of_site = {site: {uid for uid, s in pushed.site_of.items() if s == site} for site in ("A", "B")}
    assert studies("MODALITY_A") == of_site["A"]
    assert studies("MODALITY_B") == of_site["B"]
    everything = {r[0] for r in index_rows(server, "SELECT study_uid FROM studies")}
    assert studies("REGIONAL") == everything >= of_site["A"] | of_site["B"]

    # retrieving follows the same scope: site A cannot pull site B's study
    b_study = sorted(of_site["B"])[0]
    run, received = server.getscu(
        "MODALITY_A", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": b_study}, tmp_path / "x"
    )
    assert run.returncode == 0, run.stdout
    assert received == {}


# -- C-GET from getscu, C-MOVE to storescp ---------------------------------------------------


def test_getscu_retrieves_a_study_a_series_and_an_instance_as_they_were_sent(
    pushed: Pushed, tmp_path: Path
) -> None:
    server = pushed.server
    ct = pushed.spec("ACC1001")  # explicit VR little endian series + JPEG 2000 series, site A
    us = pushed.spec("ACC3001")  # site B
    cr = pushed.spec("ACC4001")  # big endian CR, site A
    cr_uid = next(iter(pushed.files_of(cr.study_uid, cr.series[0].series_uid)))
    requests = [
        ("MODALITY_A", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ct.study_uid}),
        (
            "REGIONAL",
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": us.study_uid,
                "SeriesInstanceUID": us.series[0].series_uid,
            },
        ),
        (
            "MODALITY_A",
            {
                "QueryRetrieveLevel": "IMAGE",
                "StudyInstanceUID": cr.study_uid,
                "SeriesInstanceUID": cr.series[0].series_uid,
                "SOPInstanceUID": cr_uid,
            },
        ),
    ]
    expected = [
        pushed.files_of(ct.study_uid),
        pushed.files_of(us.study_uid, us.series[0].series_uid),
        {cr_uid: pushed.files[cr_uid]},
    ]
    for n, ((aet, keys), want) in enumerate(zip(requests, expected, strict=True)):
        run, received = server.getscu(aet, keys, tmp_path / f"get{n}")
        assert run.returncode == 0 and "Fail" not in run.stdout, run.stdout
        assert set(received) == set(want), keys["QueryRetrieveLevel"]
        for uid, path in received.items():
            sent_ts, sent = split_part10(want[uid].read_bytes())
            got_ts, got = split_part10(path.read_bytes())
            # getscu takes explicit VR little endian: what was sent in it comes
            # back byte for byte; big endian, implicit VR and compressed data
            # come back re-encoded or decoded, with the same values
            if sent_ts in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
                assert (got_ts, got) == (ExplicitVRLittleEndian, sent), f"{uid} differs"
            assert_same_instance(want[uid], path)


def test_movescu_sends_a_study_a_series_and_an_instance_to_storescp_bit_identical(
    pushed: Pushed, storescp: StoreSCP
) -> None:
    server = pushed.server
    mg = pushed.spec("ACC2001")  # RLE, site A
    xa = pushed.spec("ACC5001")  # JPEG 2000 multi-frame XA + implicit VR OT, site B
    cr = pushed.spec("ACC4001")  # big endian
    cr_uid = next(iter(pushed.files_of(cr.study_uid, cr.series[0].series_uid)))
    cases = [
        (
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": mg.study_uid},
            pushed.files_of(mg.study_uid),
        ),
        (
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": xa.study_uid,
                "SeriesInstanceUID": xa.series[0].series_uid,
            },
            pushed.files_of(xa.study_uid, xa.series[0].series_uid),
        ),
        (
            {
                "QueryRetrieveLevel": "IMAGE",
                "StudyInstanceUID": cr.study_uid,
                "SeriesInstanceUID": cr.series[0].series_uid,
                "SOPInstanceUID": cr_uid,
            },
            {cr_uid: pushed.files[cr_uid]},
        ),
    ]
    for keys, want in cases:
        storescp.clear()
        run = server.movescu("REGIONAL", "STORESCP", keys)
        assert run.returncode == 0 and "Fail" not in run.stdout, run.stdout
        received = storescp.received()
        assert set(received) == set(want), keys["QueryRetrieveLevel"]
        for uid, path in received.items():
            sent_ts, sent = split_part10(want[uid].read_bytes())
            got_ts, got = split_part10(path.read_bytes())
            assert got_ts == sent_ts, f"{uid} arrived in {got_ts}, was sent in {sent_ts}"
            assert got == sent, f"{uid}: data set differs"


def test_movescu_to_an_unknown_destination_fails_with_move_destination_unknown(
    pushed: Pushed,
) -> None:
    spec = pushed.specs[0]
    run = pushed.server.movescu(
        "REGIONAL", "NOWHERE", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": spec.study_uid}
    )
    assert run.returncode != 0
    assert "MoveDestinationUnknown" in run.stdout or "a801" in run.stdout.lower(), run.stdout
    assert "C-MOVE to an unknown destination" in pushed.server.log()


def test_getscu_accepting_only_uncompressed_data_receives_compressed_objects_decoded(
    pushed: Pushed, tmp_path: Path
) -> None:
    """JPEG 2000 and RLE objects go to getscu, which proposes only the
    uncompressed syntaxes: same instance, same pixel values."""
    xa = pushed.spec("ACC5001")
    mg = pushed.spec("ACC2001")
    for aet, spec, series in (("MODALITY_B", xa, xa.series[0]), ("MODALITY_A", mg, mg.series[0])):
        want = pushed.files_of(spec.study_uid, series.series_uid)
        assert {split_part10(p.read_bytes())[0] for p in want.values()} <= {
            JPEG2000Lossless,
            RLELossless,
        }
        run, received = pushed.server.getscu(
            aet,
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": spec.study_uid,
                "SeriesInstanceUID": series.series_uid,
            },
            tmp_path / series.modality,
        )
        assert run.returncode == 0, run.stdout
        assert set(received) == set(want)  # the SOP Instance UIDs are kept
        for uid, path in received.items():
            assert split_part10(path.read_bytes())[0] == ExplicitVRLittleEndian
            assert_same_instance(want[uid], path)


@pytest.mark.parametrize("prefer", ["+xv", "+xr"], ids=["jpeg2000", "rle"])
def test_getscu_preferring_a_compressed_syntax_receives_every_instance_of_a_mixed_study(
    pushed: Pushed, tmp_path: Path, prefer: str
) -> None:
    """getscu proposes one context per SOP class, the compressed syntax first;
    the archive accepts it, so instances stored otherwise (uncompressed, or
    in another compressed syntax) must be re-encoded losslessly to be sent."""
    ct = pushed.spec("ACC1001")  # 5 explicit VR little endian + 3 JPEG 2000 CT slices
    want = pushed.files_of(ct.study_uid)
    run, received = pushed.server.getscu(
        "MODALITY_A",
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ct.study_uid},
        tmp_path,
        prefer,
    )
    assert run.returncode == 0 and "Fail" not in run.stdout, run.stdout
    assert set(received) == set(want)
    expected_ts = {"+xv": JPEG2000Lossless, "+xr": RLELossless}[prefer]
    for uid, path in received.items():
        assert split_part10(path.read_bytes())[0] == expected_ts
        assert_same_instance(want[uid], path)


# -- pynetdicom as a second client -----------------------------------------------------------


def test_pynetdicom_client_echoes_stores_finds_and_gets_a_series_with_role_selection(
    pushed: Pushed, tmp_path: Path
) -> None:
    spec = StudySpec(
        patient_id="PYN0001",
        patient_name="PYNETDICOM^Client",
        issuer_of_patient_id="SITE_C",
        study_date="20200102",
        accession_number="PYN1",
        series=[modality_preset("CT", rows=32, columns=32, instances=3)],
    )
    paths = write_study(spec, tmp_path / "sent", seed=5)
    sent = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in paths}

    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return SUCCESS

    ae = AE(ae_title="PYCLIENT")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate(
        HOST,
        pushed.server.dicom_port,
        ae_title=SERVER_AET,
        ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store), *CLIENT_HANDLERS],
    )
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == SUCCESS
        for path in paths:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == SUCCESS

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = spec.study_uid
        query.NumberOfStudyRelatedInstances = ""
        query.ModalitiesInStudy = ""
        query.PatientName = ""
        answers = [
            (status.Status, ident)
            for status, ident in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
        ]
        assert [s for s, _ in answers] == [0xFF00, SUCCESS]
        ident = answers[0][1]
        assert (ident.NumberOfStudyRelatedInstances, ident.ModalitiesInStudy) == (3, "CT")
        assert ident.PatientName == "PYNETDICOM^Client"

        get = Dataset()
        get.QueryRetrieveLevel = "SERIES"
        get.StudyInstanceUID = spec.study_uid
        get.SeriesInstanceUID = spec.series[0].series_uid
        statuses = list(assoc.send_c_get(get, StudyRootQueryRetrieveInformationModelGet))
        final = statuses[-1][0]
        assert final.Status == SUCCESS
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 0)
    finally:
        assoc.release()
        ae.shutdown()
    assert {str(ds.SOPInstanceUID) for ds in received} == set(sent)
    for ds in received:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert_same_instance(sent[str(ds.SOPInstanceUID)], buf.getvalue())

    # stored for site C: invisible to site A
    _, from_a = pushed.server.findscu(
        "MODALITY_A", "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": spec.study_uid}
    )
    assert from_a == []


# -- kill -9 during a push -------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    spec = StudySpec(
        patient_id="CRASH01",
        patient_name="KILL^Nine",
        issuer_of_patient_id="SITE_A",
        series=[modality_preset("CT", rows=48, columns=48, instances=240)],
    )
    return write_study(spec, tmp_path_factory.mktemp("crash"), seed=9)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
@pytest.mark.slow
def test_kill_9_during_a_four_association_push_loses_no_acknowledged_instance(
    backend: str, crash_series: list[Path], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    paths = crash_series
    url = (
        f"sqlite:///{tmp_path / 'index.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    server = ImagServer(tmp_path / "imag", url, peers()).start()
    done = kill_mid_push(server, paths)
    assert_no_acknowledged_instance_lost(server, paths, done)


def kill_mid_push(
    server: ImagServer, paths: list[Path], before_kill: Callable[[], None] | None = None
) -> set[str]:
    """Push ``paths`` over four storescu associations, kill -9 the server once
    60 are acknowledged (``before_kill`` runs just before), and return the
    SOP Instance UIDs acknowledged."""
    acknowledged: list[Path] = []
    pushes = [push_verbosely(server, paths[n::4], acknowledged) for n in range(4)]
    eventually(lambda: len(acknowledged) >= 60, timeout=60, interval=0.002,
               what="60 acknowledged instances")  # fmt: skip
    if before_kill is not None:
        before_kill()
    server.kill()
    for proc, reader in pushes:
        proc.wait(30)
        reader.join(30)
    assert any(proc.returncode != 0 for proc, _ in pushes), "the push should be cut short"
    uid_of = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    done = {uid_of[p] for p in acknowledged}
    assert 0 < len(done) < len(paths), "the kill should land part-way through the push"
    return done


def assert_no_acknowledged_instance_lost(
    server: ImagServer, paths: list[Path], done: set[str]
) -> None:
    """After a kill: every acknowledged instance is there with its whole
    object, a re-send completes the series, and ``imag verify`` is clean."""
    server.start()  # same data folder, same index
    rows = index_rows(
        server, "SELECT sop_instance_uid, object_key, sha256, integrity FROM instances"
    )
    assert done <= {r[0] for r in rows}, "an acknowledged instance was lost"
    store = open_store((server.data_dir / "objects").as_uri())
    try:
        for uid, key, sha256, integrity in rows:  # no row without its whole object
            assert integrity == "ok"
            assert hashlib.sha256(store.get(key)).digest() == bytes(sha256), uid
    finally:
        store.close()

    # re-sending everything completes the series; what was stored is a duplicate
    resent: list[Path] = []
    for proc, reader in [push_verbosely(server, paths[n::4], resent) for n in range(4)]:
        assert proc.wait(60) == 0
        reader.join(10)
    assert sorted(resent) == sorted(paths)
    assert server.stop() == 0, server.log()

    repair = server.imag("verify", "--repair", "--json", "-q")
    found = json.loads(repair.stdout)
    assert (found["missing"], found["corrupt"]) == ([], []), found  # orphans may be left
    final = server.imag("verify", "--json", "-q")
    assert final.returncode == 0, final.stdout
    report = json.loads(final.stdout)
    assert report["clean"] and report["ok"] == len(paths)


def push_verbosely(
    server: ImagServer, files: list[Path], acknowledged: list[Path]
) -> tuple[subprocess.Popen, threading.Thread]:
    """storescu -v on one association; each file whose C-STORE is answered
    with success is appended to ``acknowledged`` as the response arrives."""
    proc = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aec", SERVER_AET, "-aet", "MODALITY_A", HOST]
        + [str(server.dicom_port), *map(str, files)],
        env=TOOL_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def follow() -> None:
        sending = None
        for line in proc.stderr:
            if line.startswith("I: Sending file: "):
                sending = Path(line[len("I: Sending file: ") :].strip())
            elif line.startswith("I: Received Store Response (Success)") and sending:
                acknowledged.append(sending)
                sending = None

    reader = threading.Thread(target=follow)
    reader.start()
    return proc, reader


# -- hostile input ---------------------------------------------------------------------------

MAX_OBJECT = 64 * 1024


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImagServer]:
    """A server with a small object limit."""
    workdir = tmp_path_factory.mktemp("guarded")
    server = ImagServer(
        workdir,
        f"sqlite:///{workdir / 'index.db'}",
        peers(),
        settings={"ingest": {"max_object_bytes": MAX_OBJECT}},
    ).start()
    yield server
    assert server.stop() == 0, server.log()


def ct_dataset(rows: int = 32, *, seed: int = 1) -> Dataset:
    spec = StudySpec(
        patient_id="HOSTILE",
        patient_name="HOSTILE^Input",
        series=[modality_preset("CT", rows=rows, columns=rows, instances=1)],
    )
    with tempfile.TemporaryDirectory() as folder:
        [path] = write_study(spec, Path(folder), seed=seed)
        ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def associate(server: ImagServer, aet: str = "MODALITY_A") -> tuple[AE, object]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, server.dicom_port, ae_title=SERVER_AET, evt_handlers=CLIENT_HANDLERS)
    assert assoc.is_established
    return ae, assoc


def indexed(server: ImagServer, sop_uid: str) -> bool:
    rows = index_rows(server, "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_uid,))
    return bool(rows)


def stored_objects(server: ImagServer, sop_uid: str) -> list[Path]:
    return [p for p in (server.data_dir / "objects").rglob(f"{sop_uid}.*")]


def test_a_data_set_missing_its_uids_is_refused_with_an_error_comment(
    guarded: ImagServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ae, assoc = associate(guarded)
    try:
        no_study = ct_dataset()
        no_study_uid = no_study.SOPInstanceUID
        del no_study.StudyInstanceUID
        status = assoc.send_c_store(no_study)
        assert status.Status & 0xFF00 == 0xA900, hex(status.Status)
        assert "StudyInstanceUID" in status.ErrorComment

        # pynetdicom refuses to send a Dataset without SOPInstanceUID; sent from
        # a file, only the file meta names the instance
        no_sop = ct_dataset()
        sop_uid = no_sop.SOPInstanceUID
        del no_sop.SOPInstanceUID
        path = tmp_path / "no-sop.dcm"
        no_sop.save_as(path, enforce_file_format=False)
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        status = assoc.send_c_store(path)
        assert status.Status & 0xFF00 == 0xA900, hex(status.Status)
        assert "SOPInstanceUID" in status.ErrorComment
        assert assoc.send_c_echo().Status == SUCCESS  # the association goes on
    finally:
        assoc.release()
        ae.shutdown()
    for uid in (no_study_uid, sop_uid):
        assert not indexed(guarded, uid) and not stored_objects(guarded, uid)


def test_an_oversize_object_is_refused_out_of_resources(guarded: ImagServer) -> None:
    big = ct_dataset(rows=256)  # 128 KiB of pixels, over the 64 KiB limit
    ae, assoc = associate(guarded)
    try:
        status = assoc.send_c_store(big)
        assert status.Status == 0xA700, hex(status.Status)
        assert "limit" in status.ErrorComment
        small = ct_dataset()
        assert assoc.send_c_store(small).Status == SUCCESS
    finally:
        assoc.release()
        ae.shutdown()
    assert not indexed(guarded, big.SOPInstanceUID) and not stored_objects(
        guarded, big.SOPInstanceUID
    )
    assert indexed(guarded, small.SOPInstanceUID)


def _partial_store(server: ImagServer, ds: Dataset, ending: str) -> None:
    """Associate over a raw socket, send the C-STORE command and part of the
    data set, then end with an A-ABORT, a truncated PDU or a bare close."""
    rq = capture_associate_rq("MODALITY_A", [build_context(CTImageStorage, ExplicitVRLittleEndian)])
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
    for primitive in msg.encode_msg(1, 4096):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    assert len(pdus) > 4
    with socket.create_connection((HOST, server.dicom_port), timeout=10) as conn:
        conn.sendall(rq)
        assert read_pdu(conn)[0] == 0x02  # A-ASSOCIATE-AC
        for pdu in pdus[: len(pdus) // 2]:
            conn.sendall(pdu)
        if ending == "abort":
            conn.sendall(bytes.fromhex("07000000000400000000"))
        elif ending == "truncated":
            conn.sendall(pdus[len(pdus) // 2][:100])
        time.sleep(0.2)


@pytest.mark.parametrize("ending", ["abort", "truncated", "close"])
def test_an_association_ending_mid_transfer_leaves_nothing_behind(
    guarded: ImagServer, ending: str
) -> None:
    ds = ct_dataset(rows=128)
    _partial_store(guarded, ds, ending)
    assert guarded.echoscu("MODALITY_B").returncode == 0  # still serving
    assert not indexed(guarded, ds.SOPInstanceUID)
    assert not stored_objects(guarded, ds.SOPInstanceUID)
    # the same instance, sent whole, is then stored
    ae, assoc = associate(guarded)
    try:
        assert assoc.send_c_store(ds).Status == SUCCESS
    finally:
        assoc.release()
        ae.shutdown()
    assert indexed(guarded, ds.SOPInstanceUID)


def test_truncated_pdus_and_random_bytes_are_dropped_and_the_server_keeps_serving(
    guarded: ImagServer,
) -> None:
    rq = capture_associate_rq("MODALITY_A", [build_context(Verification)])
    rng = np.random.default_rng(3)
    hostile = [
        rng.bytes(512),  # noise
        rq[: len(rq) // 2],  # half an A-ASSOCIATE-RQ
        b"\x01\x00\x00\x01\x00\x00" + rq[6:40],  # an A-ASSOCIATE-RQ claiming 64 KiB
        b"\x04\x00\x00\x00\x00\x10" + b"\xff" * 16,  # P-DATA before any association
    ]
    for payload in hostile:
        with socket.create_connection((HOST, guarded.dicom_port), timeout=10) as conn:
            conn.sendall(payload)
            # other associations are served while the hostile one is open
            assert guarded.echoscu("MODALITY_A").returncode == 0
            conn.settimeout(0.2)
            try:
                answer = conn.recv(16)
            except TimeoutError:
                answer = None  # waiting for the rest of a PDU that never comes
            assert answer in (None, b"") or answer[0] == 0x07, answer  # A-ABORT
        assert guarded.echoscu("MODALITY_A").returncode == 0
    # an association, then a truncated P-DATA PDU and a close
    with socket.create_connection((HOST, guarded.dicom_port), timeout=10) as conn:
        conn.sendall(rq)
        assert read_pdu(conn)[0] == 0x02
        conn.sendall(b"\x04\x00\x00\x00\x03\xe8" + b"\x00" * 10)
    assert guarded.echoscu("MODALITY_A").returncode == 0
    assert guarded.proc.poll() is None


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[ImagServer]:
    """A server taking two associations at a time."""
    server = ImagServer(
        tmp_path,
        f"sqlite:///{tmp_path / 'index.db'}",
        peers(),
        settings={"dicom": {"max_associations": 2}},
    ).start()
    yield server
    assert server.stop() == 0, server.log()


def test_associations_beyond_the_maximum_are_refused_and_later_ones_accepted(
    limited: ImagServer,
) -> None:
    held = [associate(limited) for _ in range(2)]
    try:
        over = limited.echoscu("MODALITY_B")
        assert over.returncode != 0
        assert "Local Limit Exceeded" in over.stdout, over.stdout
        assert held[0][1].send_c_echo().Status == SUCCESS  # those admitted go on
    finally:
        for ae, assoc in held:
            assoc.release()
            ae.shutdown()
    deadline = time.monotonic() + 10
    while limited.echoscu("MODALITY_B").returncode != 0:
        assert time.monotonic() < deadline, "the server should accept again"
        time.sleep(0.1)


def test_a_connection_closed_before_associating_frees_its_slot_at_once(
    limited: ImagServer,
) -> None:
    """Port scans and load balancers' TCP health checks must not lock
    modalities out until the ACSE timeout."""
    for _ in range(2):  # e.g. a load balancer's TCP health checks
        socket.create_connection((HOST, limited.dicom_port), timeout=5).close()
    deadline = time.monotonic() + 3
    while limited.echoscu("MODALITY_B").returncode != 0:
        assert time.monotonic() < deadline, "still locked out 3 s after the connections closed"
        time.sleep(0.1)
