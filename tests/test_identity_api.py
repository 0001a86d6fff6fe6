"""The identity plugin end to end, on a real ``imag serve`` (SQLite and
PostgreSQL) with its DICOM listener and job workers: producers' instances
arrive by STOW-RS, the identity subscriber links them, a site's user finds its
studies by INS through QIDO-RS (dicomweb-client) and C-FIND (pynetdicom) and
another site's user finds nothing; the identity-vigilance officer works the
queue through ``/api/identity`` and ``imag identity``; every decision is
audited; site users are refused the vigilance API."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive.identity.ins import INS_ISSUER, OID_NIR
from archive.index import open_database
from archive.index.db import Database
from tests.httpserver import HttpImag, running_imag
from tests.processes import HOST, eventually, free_port
from tests.test_identity_index import INS, instance

#: user -> (role, site)
USERS = {
    "officer": ("identity-vigilance", ""),
    "doctor-a": ("radiologist", "A"),
    "doctor-b": ("radiologist", "B"),
    "doctor-c": ("radiologist", "C"),
}


@pytest.fixture(scope="module")
def index_url(module_index_url: str) -> str:
    return module_index_url


def imag_cli(server: HttpImag, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "archive.cli", *args],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def stow(server: HttpImag, data: bytes, site: str) -> str:
    boundary = "identity-b0undary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    answer = server.http.post(
        server.dicomweb + "/studies",
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "X-IMAG-Site": site,
        },
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).StudyInstanceUID)


@dataclass
class World:
    server: HttpImag
    db: Database
    tokens: dict[str, str]
    studies: dict[str, str]  # site -> its study of the woman

    def call(self, user: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        return requests.request(
            method, self.server.url + path, headers=headers, timeout=30, **kwargs
        )

    def last_audit(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[tuple[str, str, str, dict]]:
        return [
            (r[0], r[1], r[2], json.loads(r[3] or "{}"))
            for r in self.db.query(
                "SELECT actor, action, outcome, detail FROM audit WHERE id > ? ORDER BY id",
                (last,),
            )
        ]

    def regional_of(self, site: str) -> str:
        return self.db.scalar(
            "SELECT r.regional_id FROM identity_links l JOIN patients p ON p.id = l.patient_ref "
            "JOIN identity_regional r ON r.id = l.regional_ref WHERE p.site = ?",
            (site,),
        )

    def queue(self) -> list[dict]:
        answer = self.call("officer", "GET", "/api/identity/queue")
        assert answer.status_code == 200, answer.text
        return answer.json()["items"]


@pytest.fixture(scope="module")
def world(index_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    scu_port = free_port()
    peers = [
        {"aet": "SITE_A", "host": HOST, "port": scu_port, "site": "A"},
        {"aet": "SITE_B", "host": HOST, "port": scu_port, "site": "B"},
        {"aet": "SITE_C", "host": HOST, "port": scu_port, "site": "C"},
    ]
    settings = {
        "IMAG_DICOM_PEERS": json.dumps(peers),
        "IMAG_DICOM_ACCEPT_UNKNOWN": "false",
        "IMAG_AUTH_MAX_FAILURES": "100000",
    }
    with running_imag(
        tmp_path_factory.mktemp("imag"), index_url=index_url, dicom=True, settings=settings
    ) as server:
        tokens = {"admin": server.token}
        for user, (role, site) in USERS.items():
            done = imag_cli(
                server, "user", "add", user, "--role", role, *(["--site", site] if site else [])
            )
            assert done.returncode == 0, done.stderr
            done = imag_cli(server, "token", "create", user)
            assert done.returncode == 0, done.stderr
            tokens[user] = done.stdout.strip()
        studies = {
            # the INS as the main PatientID with its qualifiers (DRIM-M KOS example)
            "A": stow(server, instance(INS, INS_ISSUER, ins=INS), "A"),
            # a local IPP, the INS in Other Patient IDs Sequence
            "B": stow(server, instance("B-9", "CLINIQUE-B", ins=INS, in_other_ids=True), "B"),
            # the same woman without INS at a third site: a link proposal
            "C": stow(server, instance("C-3", "CABINET-C", "DE-VINCI^Ruth"), "C"),
            # the same INS with another birth date: a conflict
            "D": stow(
                server, instance("D-1", "CHU-D", birth="19790513", ins=INS, in_other_ids=True), "D"
            ),
        }
        db = open_database(index_url)
        try:
            world = World(server, db, tokens, studies)
            eventually(
                lambda: (
                    db.scalar("SELECT COUNT(*) FROM identity_links") == 4
                    and len(world.queue()) == 2
                ),
                timeout=60,
                what="the identity subscriber to link the four local identities",
            )
            yield world
        finally:
            db.close()


# -- search by INS -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "sites"), [("doctor-a", "A"), ("doctor-b", "B"), ("doctor-c", ""), ("admin", "ABD")]
)
def test_qido_by_ins_finds_the_callers_studies_of_that_person_and_nothing_else(
    world: World, user: str, sites: str
) -> None:
    client = world.server.client(world.tokens[user])
    for filters in (
        {"PatientID": INS, "IssuerOfPatientID": INS_ISSUER},
        {"PatientID": INS, "IssuerOfPatientIDQualifiersSequence.UniversalEntityID": OID_NIR},
    ):
        found = client.search_for_studies(search_filters=filters)
        uids = {pydicom.Dataset.from_json(f).StudyInstanceUID for f in found}
        assert uids == {world.studies[s] for s in sites}, filters
    if user == "doctor-b":
        [answer] = client.search_for_studies(
            search_filters={"PatientID": INS, "IssuerOfPatientID": INS_ISSUER}
        )
        ds = pydicom.Dataset.from_json(answer)
        assert (ds.PatientID, ds.IssuerOfPatientID) == ("B-9", "CLINIQUE-B")  # its own IDs


def _c_find(world: World, aet: str, identifier: Dataset) -> set[str]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, world.server.dicom_port, ae_title=world.server.aet)
    assert assoc.is_established
    found = set()
    try:
        for status, answer in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        ):
            assert status.Status in (0xFF00, 0x0000), hex(status.Status)
            if status.Status == 0xFF00:
                found.add(str(answer.StudyInstanceUID))
    finally:
        assoc.release()
    return found


@pytest.mark.parametrize(("aet", "site"), [("SITE_A", "A"), ("SITE_B", "B"), ("SITE_C", "")])
@pytest.mark.parametrize("by", ["issuer", "qualifier"])
def test_c_find_by_ins_finds_the_peers_studies_of_that_person_and_nothing_else(
    world: World, aet: str, site: str, by: str
) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientID = INS
    if by == "issuer":
        query.IssuerOfPatientID = INS_ISSUER
    else:
        qualifier = Dataset()
        qualifier.UniversalEntityID = OID_NIR
        qualifier.UniversalEntityIDType = "ISO"
        query.IssuerOfPatientIDQualifiersSequence = [qualifier]
    last = world.last_audit()
    assert _c_find(world, aet, query) == ({world.studies[site]} if site else set())
    [entry] = [e for e in world.audit_since(last) if e[1] == "dicom.c-find"]
    assert entry[3]["results"] == (1 if site else 0)


def test_a_regional_identifier_finds_every_linked_study_for_the_admin(world: World) -> None:
    rid = world.regional_of("A")
    assert world.regional_of("B") == rid
    found = world.server.client().search_for_studies(
        search_filters={"PatientID": rid, "IssuerOfPatientID": "IMAG-RPI"}
    )
    uids = {pydicom.Dataset.from_json(f).StudyInstanceUID for f in found}
    assert uids == {world.studies["A"], world.studies["B"]}


# -- the vigilance API ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/identity/queue"),
        ("GET", "/api/identity/identities"),
        ("POST", "/api/identity/merge"),
        ("POST", "/api/identity/queue/1/accept"),
        ("POST", "/api/identity/merges/1/unmerge"),
    ],
)
def test_a_site_user_is_refused_the_vigilance_api_and_the_refusal_is_audited(
    world: World, method: str, path: str
) -> None:
    last = world.last_audit()
    answer = world.call("doctor-a", method, path, json={"survivor": "x", "merged": "y"})
    assert answer.status_code == 403
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert "identity." in answer.json()["detail"]
    [entry] = world.audit_since(last)
    assert (entry[0], entry[2]) == ("doctor-a", "denied")
    assert world.queue() and len(world.queue()) == 2  # nothing decided


def test_the_queue_holds_the_proposal_and_the_conflict_with_their_identities(world: World) -> None:
    items = {i["kind"]: i for i in world.queue()}
    assert set(items) == {"proposal", "conflict"}
    assert {items["proposal"]["regional_a"], items["proposal"]["regional_b"]} == {
        world.regional_of("A"),
        world.regional_of("C"),
    }
    assert items["conflict"]["reason"] == "ins-traits"
    assert items["conflict"]["detail"]["traits"] == ["birth_date"]
    shown = world.call("officer", "GET", f"/api/identity/identities/{world.regional_of('A')}")
    assert shown.status_code == 200
    body = shown.json()
    assert body["ins"] == INS
    assert {li["site"]: li["studies"] for li in body["local_identities"]} == {
        "A": [world.studies["A"]],
        "B": [world.studies["B"]],
    }


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("GET", "/api/identity/identities/RPI999999999", None, 404, "no regional identity"),
        ("POST", "/api/identity/merges/999999/unmerge", {}, 404, "no merge"),
        ("POST", "/api/identity/queue/999999/accept", {}, 404, "no item"),
        ("POST", "/api/identity/merge", {"survivor": "RPI000000001"}, 400, "'merged' is required"),
        ("POST", "/api/identity/merge", ["not", "an object"], 400, "JSON object"),
        ("GET", "/api/identity/queue?state=maybe", None, 400, "state must be"),
    ],
)
def test_bad_vigilance_requests_get_problem_details_and_change_nothing(
    world: World, method: str, path: str, body: Any, status: int, words: str
) -> None:
    before = world.db.query("SELECT * FROM identity_links ORDER BY patient_ref")
    answer = world.call("officer", method, path, json=body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]
    assert world.db.query("SELECT * FROM identity_links ORDER BY patient_ref") == before


def test_an_identity_merged_into_itself_is_a_409(world: World) -> None:
    rid = world.regional_of("A")
    answer = world.call(
        "officer", "POST", "/api/identity/merge", json={"survivor": rid, "merged": rid}
    )
    assert answer.status_code == 409
    assert "into itself" in answer.json()["detail"]


def _state(world: World) -> dict[str, Any]:
    return {
        "regional": world.db.query("SELECT * FROM identity_regional ORDER BY id"),
        "links": world.db.query("SELECT * FROM identity_links ORDER BY patient_ref"),
        "shown": {
            site: world.call(
                "officer", "GET", f"/api/identity/identities/{world.regional_of(site)}"
            ).json()
            for site in "ABCD"
        },
    }


def test_accept_over_http_then_unmerge_restores_everything_and_a_second_unmerge_is_409(
    world: World,
) -> None:
    [proposal] = [i for i in world.queue() if i["kind"] == "proposal"]
    before = _state(world)
    last = world.last_audit()
    answer = world.call(
        "officer", "POST", f"/api/identity/queue/{proposal['id']}/accept", json={"note": "checked"}
    )
    assert answer.status_code == 200, answer.text
    merge = answer.json()["merge"]
    assert world.regional_of("C") == world.regional_of("A")
    # doctor C now finds its study by INS (its identity is the INS holder's)
    client = world.server.client(world.tokens["doctor-c"])
    found = client.search_for_studies(
        search_filters={"PatientID": INS, "IssuerOfPatientID": INS_ISSUER}
    )
    assert {pydicom.Dataset.from_json(f).StudyInstanceUID for f in found} == {world.studies["C"]}
    actions = [(e[0], e[1]) for e in world.audit_since(last)]
    assert ("officer", "identity.merged") in actions
    assert ("officer", "identity.proposal.accepted") in actions
    assert ("officer", "identity.accept") in actions  # the request itself

    last = world.last_audit()
    answer = world.call("officer", "POST", f"/api/identity/merges/{merge['id']}/unmerge", json={})
    assert answer.status_code == 200, answer.text
    after = _state(world)
    assert after == before  # field by field: identities, links, studies shown
    assert ("officer", "identity.unmerged") in [(e[0], e[1]) for e in world.audit_since(last)]
    again = world.call("officer", "POST", f"/api/identity/merges/{merge['id']}/unmerge", json={})
    assert again.status_code == 409
    assert "already undone" in again.json()["detail"]
    assert _state(world) == before
    assert [i["id"] for i in world.queue() if i["kind"] == "proposal"] == [proposal["id"]]


def test_the_cli_lists_the_queue_and_resolves_the_conflict_with_a_note(world: World) -> None:
    done = imag_cli(world.server, "identity", "queue")
    assert done.returncode == 0, done.stderr
    [conflict] = [i for i in world.queue() if i["kind"] == "conflict"]
    assert f"#{conflict['id']}" in done.stdout and "ins-traits" in done.stdout
    refused = imag_cli(world.server, "identity", "resolve", str(conflict["id"]), "dismiss")
    assert refused.returncode == 1
    assert "needs a note" in refused.stderr
    last = world.last_audit()
    done = imag_cli(
        world.server,
        "identity",
        "resolve",
        str(conflict["id"]),
        "dismiss",
        "--note",
        "two people: D's birth date is right, its INS is being corrected",
        "--as",
        "officer-cli",
    )
    assert done.returncode == 0, done.stderr
    assert "resolved by officer-cli" in done.stdout
    [entry] = [e for e in world.audit_since(last) if e[1] == "identity.conflict.resolved"]
    assert entry[0] == "officer-cli" and entry[3]["action"] == "dismiss"
    assert all(i["id"] != conflict["id"] for i in world.queue())
    shown = imag_cli(world.server, "identity", "show", world.regional_of("A"), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["ins"] == INS
    unknown = imag_cli(world.server, "identity", "show", "RPI999999999")
    assert unknown.returncode == 1 and "imag identity list" in unknown.stderr
