"""Who may see what: the access-control matrix over HTTP and DICOM, with the
audit entry every access leaves.

One ``imag serve`` (SQLite and PostgreSQL) holds three studies: one of site A,
one of site B, and one of site C routed to the reading group G1.  Users of each
role are created with the real ``imag user`` / ``imag token`` commands; DICOM
peers are a site-A AE and a regional AE (pynetdicom).  Each request is checked
for its answer *and* for exactly one new audit row with the right fields.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from archive.index import open_database
from archive.index.db import Database
from tests.dicomfiles import make_instance
from tests.httpserver import HttpImag, running_imag
from tests.inprocess import serving_in_process
from tests.processes import HOST, free_port
from tests.s3server import StoreUnderTest, index_for_store

#: the shared server runs on a folder and on an S3 bucket (S3 on the SQLite index)
pytestmark = pytest.mark.s3_on_sqlite


@pytest.fixture(scope="module")
def index_url(module_index_url: str, module_store: StoreUnderTest) -> str:
    """One index per backend and object store (S3 on the SQLite index)."""
    return index_for_store(module_index_url, module_store)


def imag_cli(server: HttpImag, *args: str) -> subprocess.CompletedProcess:
    """Run an ``imag`` command against the server's index, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "archive.cli", *args],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def new_token(server: HttpImag, owner: str, *extra: str) -> str:
    done = imag_cli(server, "token", "create", owner, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


#: user → (role, sites, groups, service account)
USERS = {
    "site-admin-a": ("site_admin", "A", "", False),
    "radiologist-a": ("radiologist", "A", "", False),
    "reader-g1": ("screening_reader", "", "G1", False),
    "tech-a": ("technician", "A", "", False),
    "prometheus": ("monitor", "", "", True),
}


@dataclass
class World:
    server: HttpImag
    db: Database
    tokens: dict[str, str]  # user → API token ("admin" included)
    studies: dict[str, str]  # "A", "B", "C" → Study Instance UID
    series: dict[str, str]
    instances: dict[str, str]
    scu_port: int  # the site-A peer's storage SCP, for C-MOVE

    def last_audit_id(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[dict]:
        rows = self.db.query(
            "SELECT actor, actor_kind, role, action, outcome, status, study_uid, patient_id, "
            "source, detail FROM audit WHERE id > ? ORDER BY id",
            (last,),
        )
        keys = [
            "actor",
            "kind",
            "role",
            "action",
            "outcome",
            "status",
            "study",
            "patient",
            "source",
            "detail",
        ]
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def get(self, user: str | None, path: str, **kwargs: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        headers |= kwargs.pop("headers", {})  # type: ignore[arg-type]
        return requests.get(self.server.url + path, headers=headers, timeout=30, **kwargs)


def stow_body(data: bytes, boundary: str = "acc-test") -> tuple[bytes, dict[str, str]]:
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
    }


@pytest.fixture(scope="module")
def world(
    index_url: str, module_store: StoreUnderTest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    scu_port = free_port()
    peers = [
        {"aet": "SITE_A", "host": HOST, "port": scu_port, "site": "A"},
        {"aet": "REGION", "host": HOST, "port": scu_port, "regional": True},
    ]
    settings = {
        "IMAG_DICOM_PEERS": json.dumps(peers),
        "IMAG_DICOM_ACCEPT_UNKNOWN": "false",
        "IMAG_AUTH_MAX_FAILURES": "100000",  # the matrix sends many refused requests
        **module_store.settings(),
        **module_store.env,
    }
    with running_imag(
        tmp_path_factory.mktemp("imag"), index_url=index_url, dicom=True, settings=settings
    ) as server:
        tokens = {"admin": server.token}
        for user, (role, sites, groups, service) in USERS.items():
            args = ["user", "add", user, "--role", role]
            args += ["--site", sites] if sites else []
            args += ["--group", groups] if groups else []
            args += ["--service"] if service else []
            done = imag_cli(server, *args)
            assert done.returncode == 0, done.stderr
            tokens[user] = new_token(server, user, "--name", "matrix")
        studies, series, instances = {}, {}, {}
        for site in "ABC":
            studies[site], series[site] = generate_uid(), generate_uid()
            data = make_instance(study=studies[site], series=series[site])
            instances[site] = str(
                pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).SOPInstanceUID
            )
            body, headers = stow_body(data)
            answer = server.http.post(
                server.dicomweb + "/studies",
                data=body,
                headers=headers | {"X-IMAG-Site": site},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
        done = imag_cli(server, "group", "grant", "G1", studies["C"])
        assert done.returncode == 0, done.stderr
        db = open_database(index_url)
        try:
            yield World(server, db, tokens, studies, series, instances, scu_port)
        finally:
            db.close()


# -- the HTTP matrix ---------------------------------------------------------------------------

#: which study each user sees as "own" (the other is site B's, seen by no one but admin)
OWN = {
    "admin": "A",
    "site-admin-a": "A",
    "radiologist-a": "A",
    "reader-g1": "C",
    "tech-a": "A",
}
ROLE = {"admin": "admin", **{u: v[0] for u, v in USERS.items()}}
READERS = ["admin", "site-admin-a", "radiologist-a", "reader-g1", "tech-a"]
WRITERS = ["admin", "site-admin-a", "tech-a"]
EVERYONE = [*READERS, "prometheus"]


def check_one_audit(
    world: World,
    last: int,
    user: str | None,
    action: str,
    outcome: str,
    status: int,
    study: str | None = None,
) -> dict:
    entries = world.audit_since(last)
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["action"] == action
    assert entry["outcome"] == outcome
    assert entry["status"] == status
    assert entry["actor"] == (user or "unknown")
    assert entry["role"] == (ROLE[user] if user else None)
    assert entry["source"] == HOST
    if study is not None:
        assert entry["study"] == study
        assert entry["patient"]  # looked up from the study
    return entry


@pytest.mark.parametrize("user", EVERYONE)
@pytest.mark.parametrize("which", ["own", "other"])
def test_qido_answers_only_the_studies_of_the_callers_sites_and_groups(
    world: World, user: str, which: str
) -> None:
    site = OWN.get(user, "A") if which == "own" else "B"
    study = world.studies[site]
    last = world.last_audit_id()
    answer = world.get(user, f"/dicom-web/studies?StudyInstanceUID={study}")
    if user == "prometheus":
        assert answer.status_code == 403
        check_one_audit(world, last, user, "qido.search", "denied", 403)
        return
    assert answer.status_code == 200
    visible = user == "admin" or which == "own"
    assert len(answer.json()) == (1 if visible else 0)
    # a look-up by UID of a study outside the scope: no match, audited as denied with that study
    outcome, audited_study = ("allowed", None) if visible else ("denied", study)
    entry = check_one_audit(world, last, user, "qido.search", outcome, 200, audited_study)
    assert json.loads(entry["detail"])["results"] == (1 if visible else 0)


@pytest.mark.parametrize("user", READERS)
def test_qido_counts_every_study_in_scope_and_nothing_else(world: World, user: str) -> None:
    answer = world.get(user, "/dicom-web/studies")
    found = {s["0020000D"]["Value"][0] for s in answer.json()}
    expected = set(world.studies.values()) if user == "admin" else {world.studies[OWN[user]]}
    assert found == expected
    # patient-level counts are computed in the same scoped SQL
    related = world.get(user, "/dicom-web/studies?includefield=00201200")
    assert len(related.json()) == len(expected)


@pytest.mark.parametrize("user", EVERYONE)
@pytest.mark.parametrize("which", ["own", "other"])
@pytest.mark.parametrize(
    "route",
    ["metadata", "retrieve", "instance", "wado-uri"],
)
def test_wado_retrieves_studies_in_scope_and_hides_the_others(
    world: World, user: str, which: str, route: str
) -> None:
    site = OWN.get(user, "A") if which == "own" else "B"
    study, series, sop = world.studies[site], world.series[site], world.instances[site]
    path, action = {
        "metadata": (f"/dicom-web/studies/{study}/metadata", "wado.metadata"),
        "retrieve": (f"/dicom-web/studies/{study}", "wado.retrieve"),
        "instance": (
            f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
            "wado.retrieve",
        ),
        "wado-uri": (
            f"/dicom-web/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
            f"&objectUID={sop}&contentType=application/dicom",
            "wado-uri.retrieve",
        ),
    }[route]
    last = world.last_audit_id()
    answer = world.get(user, path)
    if user == "prometheus":
        assert answer.status_code == 403
        check_one_audit(world, last, user, action, "denied", 403, study)
        return
    if user == "admin" or which == "own":
        assert answer.status_code == 200
        check_one_audit(world, last, user, action, "allowed", 200, study)
    else:
        # absent to the caller (no hint that it exists), denied in the audit trail
        assert answer.status_code == 404
        check_one_audit(world, last, user, action, "denied", 404, study)


@pytest.mark.parametrize("user", EVERYONE)
@pytest.mark.parametrize("which", ["own", "other"])
def test_stow_stores_into_the_callers_own_studies_only(world: World, user: str, which: str) -> None:
    site = OWN.get(user, "A") if which == "own" else "B"
    study = world.studies[site]
    data = make_instance(study=study, series=world.series[site])
    body, headers = stow_body(data)
    last = world.last_audit_id()
    before = world.db.scalar("SELECT num_instances FROM studies WHERE study_uid = ?", (study,))
    answer = requests.post(
        world.server.dicomweb + "/studies",
        data=body,
        headers=headers | {"Authorization": f"Bearer {world.tokens[user]}"},
        timeout=30,
    )
    after = world.db.scalar("SELECT num_instances FROM studies WHERE study_uid = ?", (study,))
    if user not in WRITERS:
        assert answer.status_code == 403
        check_one_audit(world, last, user, "stow.store", "denied", 403)
        assert after == before
    elif user == "admin" or which == "own":
        assert answer.status_code == 200, answer.text
        check_one_audit(world, last, user, "stow.store", "allowed", 200, study)
        assert after == before + 1
    else:
        assert answer.status_code == 403
        failed = answer.json()["00081198"]["Value"][0]
        assert failed["00081197"]["Value"] == [0x0124]  # Refused: Not Authorized
        check_one_audit(world, last, user, "stow.store", "denied", 403, study)
        assert after == before


@pytest.mark.parametrize("user", EVERYONE)
@pytest.mark.parametrize(
    ("path", "action", "allowed"),
    [
        ("/changes", "changes.read", {"admin"}),
        ("/metrics", "metrics.scrape", {"admin", "site-admin-a", "prometheus"}),
        ("/admin/audit?limit=1", "audit.read", {"admin"}),
        ("/whoami", "auth.whoami", set(EVERYONE)),
    ],
)
def test_admin_and_service_routes_follow_the_role(
    world: World, user: str, path: str, action: str, allowed: set[str]
) -> None:
    last = world.last_audit_id()
    answer = world.get(user, path)
    if user in allowed:
        assert answer.status_code == 200
        check_one_audit(world, last, user, action, "allowed", 200)
    else:
        assert answer.status_code == 403
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert "permission" in answer.json()["detail"]
        check_one_audit(world, last, user, action, "denied", 403)


@pytest.mark.parametrize(
    "path",
    [
        "/dicom-web/studies",
        "/dicom-web/studies/1.2.3/metadata",
        "/dicom-web/wado?requestType=WADO",
        "/changes",
        "/metrics",
        "/admin/audit",
        "/whoami",
        "/worklist/requests",  # a prefix no service serves yet: refused before routing
    ],
)
def test_every_route_but_health_needs_credentials(world: World, path: str) -> None:
    last = world.last_audit_id()
    answer = world.get(None, path)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer" in answer.json()["detail"]
    entry = check_one_audit(world, last, None, world.audit_since(last)[0]["action"], "denied", 401)
    assert json.loads(entry["detail"])["reason"] == "no credentials"
    assert world.get(None, "/health").status_code == 200
    assert world.last_audit_id() == last + 1  # /health is not audited


@pytest.mark.slow
def test_a_revoked_expired_disabled_or_tampered_token_is_401_and_audited(world: World) -> None:
    server = world.server
    assert imag_cli(server, "user", "add", "leaver", "--role", "radiologist").returncode == 0
    revoked = new_token(server, "leaver", "--name", "to-revoke")
    listed = json.loads(imag_cli(server, "token", "list", "leaver", "--json").stdout)
    token_id = next(t["id"] for t in listed if t["name"] == "to-revoke")
    whoami = requests.get(
        server.url + "/whoami", headers={"Authorization": f"Bearer {revoked}"}, timeout=10
    )
    assert whoami.status_code == 200 and whoami.json()["name"] == "leaver"
    assert imag_cli(server, "token", "revoke", str(token_id)).returncode == 0
    expiring = new_token(server, "leaver", "--expires-days", "0.00001")  # under a second
    time.sleep(1.2)
    assert imag_cli(server, "user", "add", "away", "--role", "technician").returncode == 0
    disabled = new_token(server, "away")
    assert imag_cli(server, "user", "disable", "away").returncode == 0
    good = world.tokens["tech-a"]
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    cases = [
        (revoked, "leaver", "revoked"),
        (expiring, "leaver", "expired"),
        (disabled, "away", "disabled"),
        (tampered, "unknown", "unknown API token"),
    ]
    for token, actor, reason in cases:
        last = world.last_audit_id()
        answer = requests.get(
            server.url + "/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert answer.status_code == 401, (reason, answer.text)
        assert reason in answer.json()["detail"]
        [entry] = world.audit_since(last)
        assert (entry["actor"], entry["outcome"], entry["status"]) == (actor, "denied", 401)
        assert reason in json.loads(entry["detail"])["reason"]
    # the tokens list never shows secrets, and shows the revocation
    listing = imag_cli(server, "token", "list", "leaver").stdout
    assert "revoked" in listing and revoked not in listing
    stored = {row[0] for row in world.db.query("SELECT token_hash FROM tokens")}
    assert revoked not in stored and all(len(h) == 64 for h in stored)


def test_imag_audit_exports_json_lines_filtered_by_study_and_actor(world: World) -> None:
    study = world.studies["A"]
    world.get("radiologist-a", f"/dicom-web/studies/{study}/metadata")
    done = imag_cli(world.server, "audit", "--json", "--study", study, "--actor", "radiologist-a")
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    assert entries and all(
        e["study_uid"] == study and e["actor"] == "radiologist-a" for e in entries
    )
    assert {"at", "role", "action", "outcome", "patient_id", "source"} <= set(entries[-1])
    text = imag_cli(world.server, "audit", "--actor", "radiologist-a", "--limit", "1").stdout
    assert len(text.splitlines()) == 1 and "radiologist-a" in text


def test_the_audit_trail_cannot_be_changed_or_deleted_through_sql(world: World) -> None:
    for statement in ("UPDATE audit SET outcome = 'allowed'", "DELETE FROM audit"):
        with pytest.raises(Exception, match="append-only"):
            world.db.execute(statement)
    assert world.last_audit_id() > 0


# -- DICOM: the same rule for peers -----------------------------------------------------------


def _find_studies(world: World, aet: str) -> set[str]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, world.server.dicom_port, ae_title=world.server.aet)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    found = set()
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if status and status.Status == 0xFF00:
                found.add(str(identifier.StudyInstanceUID))
    finally:
        assoc.release()
    return found


@pytest.mark.parametrize("aet", ["SITE_A", "REGION"])
def test_c_find_from_a_site_bound_ae_finds_only_its_site(world: World, aet: str) -> None:
    last = world.last_audit_id()
    found = _find_studies(world, aet)
    expected = set(world.studies.values()) if aet == "REGION" else {world.studies["A"]}
    assert found == expected
    [entry] = world.audit_since(last)
    assert (entry["actor"], entry["kind"], entry["action"], entry["outcome"]) == (
        aet,
        "peer",
        "dicom.c-find",
        "allowed",
    )
    assert entry["role"] == ("regional-peer" if aet == "REGION" else "site-peer")
    assert json.loads(entry["detail"])["results"] == len(expected)
    assert entry["source"] == f"{aet}@{HOST}"


def _c_get(world: World, aet: str, study: str) -> int:
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        HOST,
        world.server.dicom_port,
        ae_title=world.server.aet,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        for _status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            pass
    finally:
        assoc.release()
    return len(received)


@pytest.mark.parametrize("aet", ["SITE_A", "REGION"])
@pytest.mark.parametrize("site", ["A", "B"])
def test_c_get_retrieves_only_studies_in_the_peers_scope(world: World, aet: str, site: str) -> None:
    study = world.studies[site]
    stored = world.db.scalar("SELECT num_instances FROM studies WHERE study_uid = ?", (study,))
    last = world.last_audit_id()
    got = _c_get(world, aet, study)
    visible = aet == "REGION" or site == "A"
    assert got == (stored if visible else 0)
    [entry] = world.audit_since(last)
    assert (entry["actor"], entry["action"]) == (aet, "dicom.c-get")
    assert entry["outcome"] == ("allowed" if visible else "denied")
    assert entry["study"] == study  # denied too: `imag audit --study` finds the attempt


@pytest.mark.parametrize("aet", ["SITE_A", "REGION"])
@pytest.mark.parametrize("site", ["A", "B"])
def test_c_move_sends_only_studies_in_the_peers_scope(world: World, aet: str, site: str) -> None:
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="SITE_A")
    scp.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = scp.start_server(
        (HOST, world.scu_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        study = world.studies[site]
        stored = world.db.scalar("SELECT num_instances FROM studies WHERE study_uid = ?", (study,))
        ae = AE(ae_title=aet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate(HOST, world.server.dicom_port, ae_title=world.server.aet)
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        last = world.last_audit_id()
        try:
            for _status, _ in assoc.send_c_move(
                query, "SITE_A", StudyRootQueryRetrieveInformationModelMove
            ):
                pass
        finally:
            assoc.release()
    finally:
        server.shutdown()
    visible = aet == "REGION" or site == "A"
    assert len(received) == (stored if visible else 0)
    [entry] = world.audit_since(last)
    assert (entry["actor"], entry["action"]) == (aet, "dicom.c-move")
    assert entry["outcome"] == ("allowed" if visible else "denied")
    assert json.loads(entry["detail"])["destination"] == "SITE_A"


def test_c_store_from_a_site_peer_into_another_sites_study_is_refused(world: World) -> None:
    data = make_instance(study=world.studies["B"], series=world.series["B"])
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    ae = AE(ae_title="SITE_A")
    ae.add_requested_context(CTImageStorage, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate(HOST, world.server.dicom_port, ae_title=world.server.aet)
    assert assoc.is_established
    last = world.last_audit_id()
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0x0124  # Refused: Not Authorized
    assert (
        world.db.scalar(
            "SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?", (str(ds.SOPInstanceUID),)
        )
        == 0
    )
    [entry] = world.audit_since(last)  # written before the answer left
    assert (entry["actor"], entry["action"], entry["outcome"]) == (
        "SITE_A",
        "dicom.c-store",
        "denied",
    )
    assert entry["study"] == world.studies["B"]


@pytest.mark.parametrize("path", ["stow", "c-store"])
@pytest.mark.parametrize("which", ["series", "instance"])
def test_a_write_reaching_another_sites_series_or_instance_is_refused(
    world: World, path: str, which: str
) -> None:
    """Ownership below the study: a new study naming site B's series, or
    site B's SOP Instance UID, is refused to site A (0x0124) and changes nothing."""
    study = generate_uid()

    def edit(ds: pydicom.FileDataset) -> None:
        if which == "instance":
            ds.SOPInstanceUID = world.instances["B"]
            ds.file_meta.MediaStorageSOPInstanceUID = world.instances["B"]

    data = make_instance(edit, study=study, series=world.series["B"] if which == "series" else None)
    counts = "SELECT COUNT(*), SUM(num_instances), SUM(num_series) FROM studies"
    before = world.db.query_one(counts)
    last = world.last_audit_id()
    if path == "stow":
        body, headers = stow_body(data)
        answer = requests.post(
            world.server.dicomweb + "/studies",
            data=body,
            headers=headers | {"Authorization": f"Bearer {world.tokens['tech-a']}"},
            timeout=30,
        )
        assert answer.status_code == 403, answer.text
        assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0124]
        check_one_audit(world, last, "tech-a", "stow.store", "denied", 403)
    else:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        ae = AE(ae_title="SITE_A")
        ae.add_requested_context(CTImageStorage, str(ds.file_meta.TransferSyntaxUID))
        assoc = ae.associate(HOST, world.server.dicom_port, ae_title=world.server.aet)
        assert assoc.is_established
        try:
            assert assoc.send_c_store(ds).Status == 0x0124
        finally:
            assoc.release()
        [entry] = world.audit_since(last)
        assert (entry["actor"], entry["action"], entry["outcome"], entry["status"]) == (
            "SITE_A",
            "dicom.c-store",
            "denied",
            0x0124,
        )
    assert world.db.query_one(counts) == before
    assert world.db.scalar("SELECT COUNT(*) FROM studies WHERE study_uid = ?", (study,)) == 0


def test_an_unknown_ae_is_rejected_and_audited(world: World) -> None:
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    last = world.last_audit_id()
    assoc = ae.associate(HOST, world.server.dicom_port, ae_title=world.server.aet)
    assert assoc.is_rejected
    [entry] = world.audit_since(last)
    assert (entry["actor"], entry["action"], entry["outcome"]) == (
        "STRANGER",
        "dicom.associate",
        "denied",
    )
    assert "not a configured peer" in json.loads(entry["detail"])["reason"]


# -- abuse limits -----------------------------------------------------------------------------


def test_repeated_failed_authentication_is_answered_429_with_retry_after(
    tmp_path: Path,
) -> None:
    settings = {"IMAG_AUTH_MAX_FAILURES": "3", "IMAG_AUTH_FAILURE_WINDOW_SECONDS": "30"}
    with serving_in_process(tmp_path / "imag", settings=settings) as server:
        bad = {"Authorization": "Bearer imag_not-a-real-token"}
        codes = [
            requests.get(server.url + "/whoami", headers=bad, timeout=10).status_code
            for _ in range(3)
        ]
        assert codes == [401, 401, 401]
        limited = requests.get(server.url + "/whoami", headers=bad, timeout=10)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 30
        assert "retry in" in limited.json()["detail"]
        # the address is limited, whatever token it now presents
        assert server.http.get(server.url + "/whoami", timeout=10).status_code == 429
        assert requests.get(server.url + "/health", timeout=10).status_code == 200


@pytest.mark.serial
def test_a_stow_body_that_stalls_is_answered_408_and_stores_nothing(tmp_path: Path) -> None:
    """A sender that stops mid-body does not hold a handler forever."""
    with serving_in_process(tmp_path / "imag", settings={"IMAG_HTTP_BODY_TIMEOUT": "1"}) as server:
        body, headers = stow_body(make_instance())
        head = (
            f"POST /dicom-web/studies HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Authorization: Bearer {server.token}\r\nContent-Type: {headers['Content-Type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((HOST, server.http_port), timeout=15) as sock:
            sock.sendall(head + body[: len(body) // 2])  # then nothing more
            started = time.monotonic()
            answer = sock.recv(65536).decode("latin-1")
            waited = time.monotonic() - started
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "http.body_timeout" in answer
        assert waited < 10
        assert server.http.get(server.dicomweb + "/studies", timeout=10).json() == []


def test_a_token_failing_from_many_addresses_is_limited_on_its_own(tmp_path: Path) -> None:
    """Per-token limits: a leaked revoked token sprayed from many clients (here
    distinct addresses behind a trusted proxy) is refused once it failed too often,
    while the same addresses with another credential are not."""
    settings = {
        "IMAG_AUTH_MAX_FAILURES": "3",
        "IMAG_HTTP_TRUSTED_PROXIES": HOST,
    }
    with serving_in_process(tmp_path / "imag", settings=settings) as server:
        bad = "Bearer imag_sprayed-token"

        def call(address: str, credential: str) -> requests.Response:
            headers = {"Authorization": credential, "X-Forwarded-For": address}
            return requests.get(server.url + "/whoami", headers=headers, timeout=10)

        codes = [call(f"198.51.100.{i}", bad).status_code for i in range(1, 5)]
        assert codes == [401, 401, 401, 429]
        assert call("198.51.100.1", f"Bearer {server.token}").status_code == 200
        audit = server.http.get(server.url + "/admin/audit?action=auth.rate-limited", timeout=10)
        [entry] = [json.loads(line) for line in audit.text.splitlines()]
        assert (entry["source"], entry["status"]) == ("198.51.100.4", 429)


def test_imag_user_list_shows_every_account_with_its_role_sites_and_state(world: World) -> None:
    listed = json.loads(imag_cli(world.server, "user", "list", "--json").stdout)
    by_name = {a["name"]: a for a in listed}
    assert by_name["reader-g1"]["role"] == "screening_reader"
    assert by_name["reader-g1"]["groups"] == ["G1"]
    assert by_name["tech-a"]["sites"] == ["A"]
    assert by_name["prometheus"]["kind"] == "service"
    assert not any(a["disabled"] for a in listed if a["name"] in USERS)
