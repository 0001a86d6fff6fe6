"""One ownership rule for every path: a site's studies, series, instances and
patients stay its own, conflicts are never reported as stored, and each
C-STORE's audit entry commits with its index row.

Two ``imag serve`` nodes share one index and one object store (SQLite and
PostgreSQL): one keeps the stored object on a conflict (``keep``), the other
replaces it (``replace``).  Site A stored a study first.  Site B then tries,
over STOW-RS (a site-bound technician), C-STORE (a site-bound peer,
pynetdicom) and ``imag import --site B``, to reach it through UIDs below the
study and through its patient's issuer.  Each refusal is checked for its
precise answer, for nothing stored having changed, for exactly one audit row
(``imag import`` is not audited per instance: none), and for the server
serving normally afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive.config import Config
from archive.identity import Source
from archive.index import open_database
from archive.index.db import Database
from archive.index.migrate import current_version, upgrade
from archive.ingest import IngestResult
from archive.runtime import Archive
from archive.security.scope import Scope
from storage import ObjectStore, open_store
from tests.dicomfiles import make_instance
from tests.httpserver import HttpImag
from tests.processes import HOST
from tests.s3server import StoreUnderTest, index_for_store
from tests.test_access import imag_cli, new_token, stow_body

#: the world runs on a folder and on an S3 bucket (S3 on the SQLite index)
pytestmark = pytest.mark.s3_on_sqlite

SECRET_NAME, SECRET_BIRTH = "SECRET^ALICE", "19700101"
ISSUER_A, PATIENT_A = "HOSP_A", "PA-0001"
PATHS = ["stow", "c-store", "import"]


def instance(
    study: str | None = None, series: str | None = None, sop: str | None = None, **attrs: str
) -> bytes:
    """A CT instance with the given UIDs (fresh ones otherwise) and attributes."""

    def edit(ds: FileDataset) -> None:
        if sop:
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)

    return make_instance(edit, study=study, series=series)


def uid_of(data: bytes) -> str:
    return str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).SOPInstanceUID)


@dataclass
class World:
    keep: HttpImag  # on_conflict = keep
    replace: HttpImag  # on_conflict = replace, same index and store
    db: Database
    store: ObjectStore
    tokens: dict[str, str]
    workdir: Path
    study: str  # site A's study, series, instances (sop -> bytes)
    series: str
    instances: dict[str, bytes] = field(default_factory=dict)

    def node(self, policy: str) -> HttpImag:
        return self.keep if policy == "keep" else self.replace

    def last_audit_id(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[dict]:
        """The audit entries of requests since ``last``.  The regional identity
        index's own entries (a durable subscriber that may queue a vigilance item
        for what was just stored, whenever it gets to it) are left out: they
        are not the request's, and their timing is not the request's either."""
        rows = self.db.query(
            "SELECT actor, actor_kind, role, action, outcome, status, study_uid, source, detail "
            "FROM audit WHERE id > ? AND actor <> 'identity-index' ORDER BY id",
            (last,),
        )
        keys = ["actor", "kind", "role", "action", "outcome", "status", "study", "source"]
        return [
            dict(zip(keys, row[:8], strict=True)) | {"detail": json.loads(row[8] or "{}")}
            for row in rows
        ]

    def snapshot(self) -> dict:
        """Every index row of the hierarchy and every stored object."""
        tables = {
            t: self.db.query(f"SELECT * FROM {t} ORDER BY id")  # noqa: S608 - fixed names
            for t in ("patients", "studies", "series", "instances")
        }
        return tables | {"objects": sorted(self.store.iter_keys())}


@pytest.fixture(scope="module")
def world(
    module_index_url: str, module_store: StoreUnderTest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """Two nodes on each index and object store (S3 on the SQLite index)."""
    index_url = index_for_store(module_index_url, module_store)
    with open_world(index_url, tmp_path_factory.mktemp("own"), module_store) as opened:
        yield opened


@contextmanager
def open_world(
    index_url: str, workdir: Path, object_store: StoreUnderTest | None = None
) -> Iterator[World]:
    """The two nodes (keep, replace) on ``index_url`` and a folder of the world's
    (or ``object_store``: an S3 bucket), two site-bound technicians, and site A's
    study of two instances; stopped on exit.  (A context manager so that other
    modules can run their own world.)"""
    s3 = object_store is not None and object_store.is_s3
    peers = [
        {"aet": "SITE_A", "host": HOST, "port": 104, "site": "A"},
        {"aet": "SITE_B", "host": HOST, "port": 104, "site": "B"},
        {"aet": "REGION", "host": HOST, "port": 104, "regional": True},
    ]
    settings = {
        "IMAG_DICOM_PEERS": json.dumps(peers),
        "IMAG_DICOM_ACCEPT_UNKNOWN": "false",
        "IMAG_STORAGE_URL": (workdir / "objects").as_uri(),
        "IMAG_AUTH_MAX_FAILURES": "100000",
    }
    if s3:
        settings |= object_store.settings() | object_store.env
    keep = HttpImag(workdir / "keep", index_url=index_url, dicom=True, settings=settings)
    replace = HttpImag(
        workdir / "replace",
        index_url=index_url,
        dicom=True,
        # two conflict policies on one index, on purpose (archive/cluster.py)
        settings=settings | {"IMAG_INGEST_ON_CONFLICT": "replace", "IMAG_CLUSTER_CHECK": "warn"},
    )
    db = open_database(index_url)
    store = object_store.open(workdir) if s3 else open_store((workdir / "objects").as_uri())
    try:
        keep.start()
        replace.start()
        tokens = {}
        for user, site in (("tech-a", "A"), ("tech-b", "B")):
            done = imag_cli(keep, "user", "add", user, "--role", "technician", "--site", site)
            assert done.returncode == 0, done.stderr
            tokens[user] = new_token(keep, user)
        study, series = generate_uid(), generate_uid()
        world = World(keep, replace, db, store, tokens, workdir, study, series)
        patient = {
            "IssuerOfPatientID": ISSUER_A,
            "PatientID": PATIENT_A,
            "PatientName": SECRET_NAME,
            "PatientBirthDate": SECRET_BIRTH,
        }
        for _ in range(2):
            data = instance(study, series, **patient)
            world.instances[uid_of(data)] = data
        answer = stow(world, "tech-a", *world.instances.values())
        assert answer.status_code == 200, answer.text
        yield world
    finally:
        for node in (keep, replace):
            if node.proc is not None:
                code = node.stop()
                assert code == 0, f"imag serve exited {code}:\n{node.log()}"
        store.close()
        db.close()


# -- the three paths -----------------------------------------------------------------------


def stow(world: World, user: str, *datas: bytes, policy: str = "keep") -> requests.Response:
    boundary = "own-test"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + d + b"\r\n"
            for d in datas
        )
        + f"--{boundary}--\r\n".encode()
    )
    headers = stow_body(b"", boundary)[1] | {"Authorization": f"Bearer {world.tokens[user]}"}
    return requests.post(
        world.node(policy).dicomweb + "/studies", data=body, headers=headers, timeout=30
    )


def c_store(
    world: World,
    aet: str,
    data: bytes,
    policy: str = "keep",
    before_release: Callable[[], None] | None = None,
) -> Dataset:
    """C-STORE ``data`` as ``aet``; ``before_release`` runs once the answer came,
    with the association still open."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate(HOST, world.node(policy).dicom_port, ae_title="IMAG")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        if before_release is not None:
            before_release()
    finally:
        assoc.release()
    return status


def imag_import(
    world: World,
    site: str,
    *datas: bytes,
    policy: str = "keep",
    settings: dict[str, str] | None = None,
) -> dict:
    """``imag import --site SITE`` of ``datas`` (one file each), with ``IMAG_*``
    ``settings`` added; the JSON summary."""
    folder = world.workdir / f"import-{generate_uid()}"
    folder.mkdir()
    for n, data in enumerate(datas):
        (folder / f"{n}.dcm").write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-m", "archive.cli", "import", "--site", site, "--json", "--quiet"]
        + ["--workers", "1", str(folder)],
        env=world.keep.env | {"IMAG_INGEST_ON_CONFLICT": policy} | (settings or {}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode in (0, 2), done.stderr
    return json.loads(done.stdout)


def refused(
    world: World,
    path: str,
    site: str,
    data: bytes,
    *,
    policy: str = "keep",
    dimse: int,
    failure: int,
    http: int,
    code: str,
) -> str:
    """Send ``data`` as ``site`` over ``path``; check the precise refusal and
    its one audit row; return the reason the sender got."""
    last = world.last_audit_id()
    sop = uid_of(data)
    if path == "stow":
        answer = stow(world, f"tech-{site.lower()}", data, policy=policy)
        assert answer.status_code == http, answer.text
        [failed] = answer.json()["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [failure]
        assert failed["00081155"]["Value"] == [sop]
        assert "00081199" not in answer.json()  # nothing in ReferencedSOPSequence
        [entry] = world.audit_since(last)
        assert (entry["action"], entry["status"]) == ("stow.store", http)
        assert entry["outcome"] == ("denied" if code == "forbidden" else "failed")
        return answer.text
    if path == "c-store":
        status = c_store(world, f"SITE_{site}", data, policy=policy)
        assert status.Status == dimse
        [entry] = world.audit_since(last)
        assert (entry["actor"], entry["action"], entry["status"]) == (
            f"SITE_{site}",
            "dicom.c-store",
            dimse,
        )
        assert entry["outcome"] == ("denied" if code == "forbidden" else "failed")
        assert entry["detail"]["instances"] == [sop]
        assert entry["detail"]["code"] == code
        return str(status.ErrorComment)
    summary = imag_import(world, site, data, policy=policy)
    assert summary["rejected_by_code"] == {code: 1}, summary
    assert world.audit_since(last) == []  # imag import is not audited per instance
    return summary["rejections"][0]["reason"]


def still_serving(world: World, policy: str = "keep") -> None:
    """/health answers, and site A still finds exactly its study, over HTTP and DICOM."""
    node = world.node(policy)
    assert requests.get(node.url + "/health", timeout=10).status_code == 200
    found = requests.get(
        node.dicomweb + f"/studies?StudyInstanceUID={world.study}",
        headers={"Authorization": f"Bearer {world.tokens['tech-a']}"},
        timeout=10,
    )
    assert found.status_code == 200 and len(found.json()) == 1
    assert found.json()[0]["00201208"]["Value"] == [len(world.instances)]
    assert c_find(world, "SITE_A", "STUDY", StudyInstanceUID=world.study) != []


def c_find(world: World, aet: str, level: str, **keys: str) -> list[Dataset]:
    model = (
        PatientRootQueryRetrieveInformationModelFind
        if level == "PATIENT"
        else StudyRootQueryRetrieveInformationModelFind
    )
    ae = AE(ae_title=aet)
    ae.add_requested_context(model)
    assoc = ae.associate(HOST, world.keep.dicom_port, ae_title="IMAG")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    try:
        return [
            identifier
            for status, identifier in assoc.send_c_find(query, model)
            if status and status.Status == 0xFF00
        ]
    finally:
        assoc.release()


def reveals_nothing_of_a(world: World, text: str) -> None:
    """``text`` names nothing of site A's that the sender did not send itself."""
    for secret in (world.study, SECRET_NAME, "SECRET", SECRET_BIRTH, "site A", "(A)"):
        assert secret not in text, text


# -- class 1: a new study naming another site's series -------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_new_study_naming_another_sites_series_is_refused_and_changes_nothing(
    world: World, path: str
) -> None:
    before = world.snapshot()
    data = instance(generate_uid(), world.series)  # a new study, site A's series
    reason = refused(
        world, path, "B", data, dimse=0x0124, failure=0x0124, http=403, code="forbidden"
    )
    assert world.snapshot() == before
    reveals_nothing_of_a(world, reason)
    if path == "import":
        assert "another site" in reason
    still_serving(world)


@pytest.mark.parametrize("path", ["stow", "c-store"])
def test_a_series_already_under_another_study_is_inconsistent_even_for_its_own_site(
    world: World, path: str
) -> None:
    """A series belongs to one study: site A itself cannot file its series
    under a second study (0xA900-class, STOW 409)."""
    before = world.snapshot()
    data = instance(generate_uid(), world.series)
    reason = refused(
        world, path, "A", data, dimse=0xA900, failure=0xA900, http=409, code="inconsistent"
    )
    assert world.snapshot() == before
    assert world.study not in reason
    still_serving(world)


def test_a_regional_peer_cannot_file_a_series_under_a_second_study_either(world: World) -> None:
    before = world.snapshot()
    last = world.last_audit_id()
    status = c_store(world, "REGION", instance(generate_uid(), world.series))
    assert status.Status == 0xA900
    assert "another study" in str(status.ErrorComment)
    assert world.snapshot() == before
    [entry] = world.audit_since(last)
    assert (entry["actor"], entry["role"], entry["outcome"]) == (
        "REGION",
        "regional-peer",
        "failed",
    )


# -- class 3: another site's SOP Instance UID, under keep and replace ------------------------


@pytest.mark.parametrize("policy", ["keep", "replace"])
@pytest.mark.parametrize("path", PATHS)
def test_another_sites_sop_instance_uid_is_never_replaced_nor_answered_as_stored(
    world: World, path: str, policy: str
) -> None:
    sop = next(iter(world.instances))
    before = world.snapshot()
    data = instance(generate_uid(), generate_uid(), sop, StudyDescription="B's copy")
    reason = refused(
        world,
        path,
        "B",
        data,
        policy=policy,
        dimse=0x0124,
        failure=0x0124,
        http=403,
        code="forbidden",
    )
    assert world.snapshot() == before
    key = world.db.scalar("SELECT object_key FROM instances WHERE sop_instance_uid = ?", (sop,))
    assert world.store.get(key) == world.instances[sop]  # site A's bytes, untouched
    reveals_nothing_of_a(world, reason)
    still_serving(world, policy)


# -- class 2: another site's issuer and a guessed patient ID ---------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_sender_naming_another_sites_issuer_files_its_own_patient_and_never_sees_theirs(
    world: World, path: str
) -> None:
    a_patient = world.db.query(
        "SELECT * FROM patients WHERE site = 'A' AND issuer = ? AND patient_id = ?",
        (ISSUER_A, PATIENT_A),
    )
    study = generate_uid()
    name = f"INTRUDER^{path.upper().replace('-', '')}"
    data = instance(
        study,
        IssuerOfPatientID=ISSUER_A,
        PatientID=PATIENT_A,
        PatientName=name,
        PatientBirthDate="19991231",
    )
    last = world.last_audit_id()
    if path == "stow":
        answer = stow(world, "tech-b", data)
        assert answer.status_code == 200, answer.text
        [entry] = world.audit_since(last)
        assert (entry["action"], entry["outcome"], entry["study"]) == (
            "stow.store",
            "allowed",
            study,
        )
    elif path == "c-store":
        assert c_store(world, "SITE_B", data).Status == 0x0000
        [entry] = world.audit_since(last)
        assert (entry["outcome"], entry["study"]) == ("allowed", study)
        assert entry["detail"]["instances"] == [uid_of(data)]
    else:
        assert imag_import(world, "B", data)["stored"] == 1
    # filed under site B's own patient row, with what B sent; A's row unchanged
    owner = world.db.query_one(
        "SELECT p.site, p.issuer, p.patient_id, p.birth_date FROM studies st "
        "JOIN patients p ON p.id = st.patient_ref WHERE st.study_uid = ?",
        (study,),
    )
    assert owner == ("B", ISSUER_A, PATIENT_A, "19991231")
    assert (
        world.db.query(
            "SELECT * FROM patients WHERE site = 'A' AND issuer = ? AND patient_id = ?",
            (ISSUER_A, PATIENT_A),
        )
        == a_patient
    )
    # site B's searches return its own data only, never site A's demographics
    qido = requests.get(
        world.keep.dicomweb + f"/studies?PatientID={PATIENT_A}&includefield=00100030",
        headers={"Authorization": f"Bearer {world.tokens['tech-b']}"},
        timeout=10,
    )
    assert qido.status_code == 200 and qido.json()
    reveals_nothing_of_a(world, qido.text)
    assert study in qido.text
    for level in ("PATIENT", "STUDY"):
        found = c_find(
            world,
            "SITE_B",
            level,
            PatientID=PATIENT_A,
            PatientName="",
            PatientBirthDate="",
            **({"StudyInstanceUID": ""} if level == "STUDY" else {}),
        )
        assert found
        for identifier in found:
            assert str(identifier.PatientName) != SECRET_NAME
            assert identifier.PatientBirthDate != SECRET_BIRTH
    # and site A still sees exactly its own patient
    [mine] = c_find(
        world, "SITE_A", "PATIENT", PatientID=PATIENT_A, PatientName="", PatientBirthDate=""
    )
    assert (str(mine.PatientName), mine.PatientBirthDate) == (SECRET_NAME, SECRET_BIRTH)
    still_serving(world)


# -- conflicts tell the truth (policy keep) --------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_different_object_under_a_stored_uid_is_not_reported_as_stored(
    world: World, path: str
) -> None:
    sop, original = next(iter(world.instances.items()))
    other = instance(world.study, world.series, sop, StudyDescription="a different object")
    before = world.snapshot()
    last = world.last_audit_id()
    if path == "stow":
        answer = stow(world, "tech-a", other)
        assert answer.status_code == 409, answer.text
        [failed] = answer.json()["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [0x0111]  # Duplicate SOP Instance
        assert failed["00081155"]["Value"] == [sop]
        [entry] = world.audit_since(last)
        assert (entry["outcome"], entry["status"]) == ("failed", 409)
        assert entry["detail"]["conflicts"] == 1
    elif path == "c-store":
        status = c_store(world, "SITE_A", other)
        assert status.Status == 0xB006  # warning: what was sent was discarded
        assert "this one was not" in str(status.ErrorComment)
        [entry] = world.audit_since(last)
        assert (entry["outcome"], entry["status"]) == ("failed", 0xB006)
        assert entry["detail"]["instances"] == [sop]
    else:
        summary = imag_import(world, "A", other)
        assert (summary["conflict_kept"], summary["stored"], summary["rejected"]) == (1, 0, 0)
    assert world.snapshot() == before
    key = world.db.scalar("SELECT object_key FROM instances WHERE sop_instance_uid = ?", (sop,))
    assert world.store.get(key) == original


@pytest.mark.parametrize("path", PATHS)
def test_identical_bytes_stay_an_idempotent_success(world: World, path: str) -> None:
    """Sent again, an instance is stored once and the answer is a success.
    (A C-STORE object gets file meta information built by the receiver, other
    bytes than the file STOW-RS stored: there the first copy is a C-STORE too.)"""
    data = instance(world.study, world.series)
    sop = uid_of(data)
    if path == "c-store":
        assert c_store(world, "SITE_A", data).Status == 0x0000
    else:  # STOW-RS and imag import both store the bytes as they are
        assert stow(world, "tech-a", data).status_code == 200
    world.instances[sop] = data
    before = world.snapshot()
    last = world.last_audit_id()
    if path == "stow":
        answer = stow(world, "tech-a", data)
        assert answer.status_code == 200, answer.text
        assert answer.json()["00081199"]["Value"][0]["00081155"]["Value"] == [sop]
        [entry] = world.audit_since(last)
        assert (entry["outcome"], entry["status"]) == ("allowed", 200)
    elif path == "c-store":
        assert c_store(world, "SITE_A", data).Status == 0x0000
        [entry] = world.audit_since(last)
        assert (entry["outcome"], entry["status"], entry["detail"]["result"]) == (
            "allowed",
            0,
            "duplicate",
        )
        assert entry["detail"]["instances"] == [sop]
    else:
        assert imag_import(world, "A", data)["duplicate"] == 1
    assert world.snapshot() == before


def test_stow_of_a_conflict_and_a_new_instance_is_202_listing_the_conflict(world: World) -> None:
    sop = next(iter(world.instances))
    other = instance(world.study, world.series, sop, StudyDescription="another one")
    new = instance(world.study, world.series)
    answer = stow(world, "tech-a", other, new)
    assert answer.status_code == 202, answer.text
    [stored] = answer.json()["00081199"]["Value"]
    [failed] = answer.json()["00081198"]["Value"]
    assert stored["00081155"]["Value"] == [uid_of(new)]
    assert (failed["00081155"]["Value"], failed["00081197"]["Value"]) == ([sop], [0x0111])
    world.instances[uid_of(new)] = new


# -- C-STORE audit: committed with the index row, refusals before the answer ----------------


def test_each_c_store_is_audited_with_its_instance_before_the_answer_leaves(
    world: World,
) -> None:
    new = instance(world.study, world.series)
    refused_one = instance(generate_uid(), world.series)
    seen: list[list[dict]] = []
    last = world.last_audit_id()
    for data, aet in ((new, "SITE_A"), (refused_one, "SITE_B")):
        start = world.last_audit_id()
        c_store(world, aet, data, before_release=lambda s=start: seen.append(world.audit_since(s)))
    [[stored], [denied]] = seen  # each there before its association was released
    assert (stored["outcome"], stored["status"], stored["study"]) == ("allowed", 0, world.study)
    assert stored["detail"]["instances"] == [uid_of(new)]
    assert (stored["role"], stored["source"]) == ("site-peer", f"SITE_A@{HOST}")
    assert (denied["outcome"], denied["status"]) == ("denied", 0x0124)
    assert denied["detail"]["instances"] == [uid_of(refused_one)]
    assert len(world.audit_since(last)) == 2  # nothing more at release
    world.instances[uid_of(new)] = new


def test_a_c_store_whose_audit_entry_cannot_be_written_is_not_acknowledged(
    world: World,
) -> None:
    """Fail closed: with the audit table refusing inserts, a C-STORE is
    answered 0xA700 and its instance is not indexed; afterwards it stores."""
    db = world.db
    if db.dialect == "sqlite":
        db.execute(
            "CREATE TRIGGER test_audit_blocked BEFORE INSERT ON audit "
            "BEGIN SELECT RAISE(ABORT, 'audit blocked by the test'); END"
        )
        unblock = "DROP TRIGGER test_audit_blocked"
    else:
        db.execute(
            "CREATE FUNCTION test_audit_blocked() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'audit blocked by the test'; END $$"
        )
        db.execute(
            "CREATE TRIGGER test_audit_blocked BEFORE INSERT ON audit "
            "FOR EACH ROW EXECUTE FUNCTION test_audit_blocked()"
        )
        unblock = "DROP TRIGGER test_audit_blocked ON audit"
    data = instance(world.study, world.series)
    last = world.last_audit_id()
    try:
        status = c_store(world, "SITE_A", data)
    finally:
        db.execute(unblock)
        if db.dialect == "postgresql":
            db.execute("DROP FUNCTION test_audit_blocked()")
    assert status.Status == 0xA700
    assert "audit trail unavailable" in str(status.ErrorComment)
    sop = uid_of(data)
    assert db.scalar("SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?", (sop,)) == 0
    assert world.audit_since(last) == []
    # the audit trail writable again, the same instance is stored and audited
    assert c_store(world, "SITE_A", data).Status == 0x0000
    [entry] = world.audit_since(last)
    assert (entry["outcome"], entry["detail"]["instances"]) == ("allowed", [sop])
    world.instances[sop] = data
    still_serving(world)


# -- the race of two sites creating the same new study ---------------------------------------


def race(
    one: Archive, two: Archive, sites: tuple[str, str]
) -> tuple[str, dict[str, str], list[tuple[str, IngestResult]]]:
    """20 threads, 10 per site, each storing a new instance of one new study
    (its site's own series) at the same moment, alternating between two
    pipelines; the study, the series by site and (site, result) of each."""
    study = generate_uid()
    series = {site: generate_uid() for site in sites}
    barrier = threading.Barrier(20)
    results: list[tuple[str, IngestResult]] = []
    lock = threading.Lock()

    def attempt(n: int) -> None:
        site = sites[n % 2]
        pipeline = (one, two)[(n // 2) % 2].pipeline
        data = instance(study, series[site], PatientID=f"P-{site}")
        source = Source("stow", site=site, scope=Scope.of([site]))
        barrier.wait()
        result = pipeline.ingest(data, source)
        with lock:
            results.append((site, result))

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    return study, series, results


def test_two_sites_creating_the_same_new_study_at_once_end_with_one_owner(
    make_config: Callable[..., Config], index_url: str
) -> None:
    """20 concurrent attempts, 10 per site, through two pipelines on the same
    index (two index writers, so on PostgreSQL two transactions really race):
    one site owns the study, every attempt of the other is refused, the
    counters agree and no object is left behind."""
    config = make_config(index_url=index_url)
    sites = ("SITE_NORD", "SITE_SUD")
    with Archive(config) as one, Archive(config, migrate=False) as two:
        for _round in range(3):
            study, series, results = race(one, two, sites)
            owner = one.catalog.study_site(study)
            assert owner in sites
            for site, result in results:
                if site == owner:
                    assert result.ok, result
                else:
                    assert (result.ok, result.code) == (False, "forbidden"), result
                    assert owner not in result.reason
            row = one.db.query_one(
                "SELECT st.num_series, st.num_instances, st.total_bytes, "
                "(SELECT COUNT(*) FROM series se WHERE se.study_ref = st.id), "
                "(SELECT SUM(se.num_instances) FROM series se WHERE se.study_ref = st.id), "
                "(SELECT SUM(i.size) FROM instances i JOIN series se ON se.id = i.series_ref "
                " WHERE se.study_ref = st.id) FROM studies st WHERE st.study_uid = ?",
                (study,),
            )
            assert row[:2] == (1, 10) and row[3:5] == (1, 10) and row[2] == row[5]
            assert (
                one.db.scalar(
                    "SELECT COUNT(*) FROM series WHERE series_uid = ?",
                    (series[sites[1 - sites.index(owner)]],),
                )
                == 0
            )
        counts = one.catalog.counts()
        assert (counts["studies"], counts["series"], counts["instances"]) == (3, 3, 30)
        # the losing site's patient rows were rolled back with its records
        assert {r[0] for r in one.db.query("SELECT site FROM patients")} <= set(sites)
        assert counts["patients"] == len({r[0] for r in one.db.query("SELECT site FROM studies")})
        indexed = {r[0] for r in one.db.query("SELECT object_key FROM instances")}
        assert set(one.store.iter_keys()) == indexed  # no orphan object


# -- the migration of existing patients ------------------------------------------------------


def test_the_upgrade_gives_each_site_its_own_copy_of_a_patient_it_shared(
    index_url: str,
) -> None:
    """An index filled before patients were per site: a patient whose studies
    came from two sites is split, each site's studies pointing at its own row."""
    db = open_database(index_url)
    try:
        upgrade(db, until=7)
        assert current_version(db) == 7
        with db.transaction():
            shared = db.scalar(
                "INSERT INTO patients (issuer, patient_id, patient_name, birth_date, created_at) "
                "VALUES ('HOSP_A', 'P1', 'SECRET^ALICE', '19700101', '2024-01-01') RETURNING id"
            )
            alone = db.scalar(
                "INSERT INTO patients (issuer, patient_id, created_at) "
                "VALUES ('HOSP_B', 'P2', '2024-01-01') RETURNING id"
            )
            for uid, site, patient in (
                ("1.1", "A", shared),
                ("1.2", "B", shared),
                ("1.3", "B", shared),
                ("1.4", "B", alone),
            ):
                db.execute(
                    "INSERT INTO studies (patient_ref, study_uid, site, created_at, updated_at) "
                    "VALUES (?, ?, ?, '2024-01-01', '2024-01-01')",
                    (patient, uid, site),
                )
        applied = upgrade(db)
        assert any("patients_per_site" in name for name in applied)
        rows = db.query(
            "SELECT st.study_uid, p.site, p.issuer, p.patient_id, p.patient_name, p.id "
            "FROM studies st JOIN patients p ON p.id = st.patient_ref ORDER BY st.study_uid"
        )
        assert [r[:4] for r in rows] == [
            ("1.1", "A", "HOSP_A", "P1"),
            ("1.2", "B", "HOSP_A", "P1"),
            ("1.3", "B", "HOSP_A", "P1"),
            ("1.4", "B", "HOSP_B", "P2"),
        ]
        assert rows[0][5] == shared and rows[1][5] == rows[2][5] != shared
        assert rows[3][5] == alone
        assert db.scalar("SELECT COUNT(*) FROM patients") == 3
        # the new key is unique per site, and the old one no longer is
        with db.transaction():
            db.execute(
                "INSERT INTO patients (site, issuer, patient_id, created_at) "
                "VALUES ('C', 'HOSP_A', 'P1', '2024-01-01')"
            )
        with pytest.raises(Exception, match="(?i)unique"), db.transaction():
            db.execute(
                "INSERT INTO patients (site, issuer, patient_id, created_at) "
                "VALUES ('C', 'HOSP_A', 'P1', '2024-01-01')"
            )
        if db.dialect == "sqlite":
            assert db.query("PRAGMA foreign_key_check") == []
            assert db.scalar("PRAGMA foreign_keys") == 1
    finally:
        db.close()
