"""Reports of reading requests, end to end: the holder writes and validates
the report through ``/api/worklist/requests/{uid}/report``; the job stores a
DICOM SR and an Encapsulated PDF with the study (retrievable by WADO-RS and
QIDO, the SR checked by Debian's dciodvfy, the PDF opened by a PDF reader)
and mails the PDF to the requester through a real SMTP server (aiosmtpd,
STARTTLS, client certificate); a later change is refused, an addendum
accepted and stored as a new version.

The HTTP application is ``imag serve``'s, in this process (tests/inprocess.py),
on a FakeClock; the job queue runs in a worker thread on the same clock, so
leases pass by moving the clock, never by sleeping.  Index: SQLite and
PostgreSQL.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pydicom
import pypdf
import pytest
import requests

from archive.clock import FakeClock
from archive.identity import Source
from archive.jobs import Worker
from archive.security.principals import Principals
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag, serving_in_process
from tests.test_messaging_smtp import HOST, SmtpServer, pki, smtp_server  # noqa: F401
from worklist.documents import MAX_TEXT_CHARS
from worklist.report_delivery import run
from worklist.service import worklist_of

DCIODVFY = "/usr/bin/dciodvfy"
START = datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
SITE, OTHER_SITE, GROUP = "site-a", "site-b", "garde-nord"
REQUESTER = "dr.lefevre@site-a.mssante.fr"
FIELDS = {
    "requesting_physician": "Dr Anne Lefèvre",
    "clinical_context": "Chute, douleur de hanche droite",
    "question": "Fracture du col ?",
    "anatomical_region": "Hanche droite",
    "contraindications": "aucune",
    "exam_type": "Radiographie du bassin",
    "patient_consent": True,
    "gp_address": "dr.generaliste@cabinet.mssante.fr",
}
GP = FIELDS["gp_address"]
REPORT = {
    "indications": "Chute de sa hauteur, douleur inguinale droite, impotence fonctionnelle.",
    "technique": "Radiographies du bassin de face et de la hanche droite de profil.",
    "results": "Trait de fracture cervical vrai déplacé, pas d'autre lésion osseuse.",
    "conclusion": "Fracture cervicale vraie du fémur droit, Garden III : avis orthopédique.",
    "reader_name": "Dr Étienne Martin",
}


@dataclass
class World:
    server: InProcessImag
    clock: FakeClock
    worker: Worker
    tokens: dict[str, str]
    study_uid: str
    smtp: SmtpServer

    @property
    def archive(self) -> Any:
        assert self.server.archive is not None
        return self.server.archive

    def call(self, user: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}", **kwargs.pop("headers", {})}
        return requests.request(
            method, self.server.url + path, headers=headers, timeout=60, **kwargs
        )

    def mails_to(self, address: str) -> list:
        """What the SMTP server received for ``address`` (the GP also gets
        the sharing portal's link to the study)."""
        return [m for m in self.smtp.mailbox.received if m.recipients == [address]]

    def report(self, uid: str) -> str:
        return f"/api/worklist/requests/{uid}/report"

    def run_jobs(self) -> None:
        """Let the due jobs run (the clock moves a millisecond first: a worker
        look made just before a job was queued must not count as idle)."""
        self.clock.advance(0.001)
        assert self.worker.wait_idle(timeout=120)

    def new_request(self, reply_to: str = REQUESTER) -> str:
        request = worklist_of(self.archive).create(
            study_uid=self.study_uid,
            site=SITE,
            group=GROUP,
            fields=FIELDS,
            created_by="manip.a",
            reply_to=reply_to,
        )
        return request.uid

    def claim(self, uid: str, user: str = "dr.martin") -> str:
        answer = self.call(user, "POST", f"/api/worklist/requests/{uid}/claim")
        assert answer.status_code == 200, answer.text
        return answer.json()["transaction_uid"]

    def write(self, uid: str, tx: str, body: dict | None = None, user: str = "dr.martin"):
        return self.call(
            user, "PUT", self.report(uid), json=body or REPORT, headers={"X-Transaction-UID": tx}
        )

    def validate(self, uid: str, tx: str, user: str = "dr.martin") -> requests.Response:
        return self.call(user, "POST", self.report(uid) + "/validate", json={"transaction_uid": tx})

    def audit_since(self, last: int) -> list[dict]:
        rows = self.archive.db.query(
            "SELECT actor, action, outcome, status, detail FROM audit WHERE id > ? ORDER BY id",
            (last,),
        )
        return [
            {"actor": a, "action": b, "outcome": c, "status": d, "detail": json.loads(e or "{}")}
            for a, b, c, d, e in rows
        ]

    def last_audit(self) -> int:
        return int(self.archive.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def stored_series(self) -> set[str]:
        return {
            r[0]
            for r in self.archive.db.query(
                "SELECT se.series_uid FROM series se JOIN studies st ON st.id = se.study_ref "
                "WHERE st.study_uid = ?",
                (self.study_uid,),
            )
        }


@pytest.fixture
def world(
    tmp_path: Path,
    index_url: str,
    smtp_server: Callable[..., SmtpServer],  # noqa: F811
    pki: Any,  # noqa: F811
) -> Iterator[World]:
    smtp = smtp_server("starttls")
    clock = FakeClock(START)
    settings = {
        "IMAG_LOG_LEVEL": "WARNING",
        "IMAG_PLUGINS_MESSAGING": "smtp",
        "IMAG_MESSAGING_FROM": "teleradiologie@imag.mssante.fr",
        "IMAG_MESSAGING_SMTP_HOST": HOST,
        "IMAG_MESSAGING_SMTP_PORT": str(smtp.port),
        "IMAG_MESSAGING_SMTP_SECURITY": "starttls",
        "IMAG_MESSAGING_SMTP_CA_FILE": str(pki.ca),
        "IMAG_MESSAGING_SMTP_CLIENT_CERT": str(pki.client_cert),
        "IMAG_MESSAGING_SMTP_CLIENT_KEY": str(pki.client_key),
        "IMAG_MESSAGING_SMTP_TIMEOUT": "10",
        "IMAG_WORKLIST_LEASE_SECONDS": "600",
    }
    with serving_in_process(
        tmp_path / "imag", settings=settings, clock=clock, index_url=index_url
    ) as server:
        archive = server.archive
        assert archive is not None
        principals = Principals(archive.db)
        tokens = {"admin": server.token}
        for user, role, sites, groups in (
            ("dr.martin", "radiologist", [], [GROUP]),
            ("dr.durand", "radiologist", [], [GROUP]),
            ("manip.a", "technician", [SITE], []),
            ("manip.b", "technician", [OTHER_SITE], []),
        ):
            principals.add(user, role, sites=sites, groups=groups)
            tokens[user] = principals.create_token(user)[1]
        study_uid = pydicom.uid.generate_uid()
        for _ in range(2):
            result = archive.pipeline.ingest(
                make_instance(study=study_uid), Source(kind="import", site=SITE)
            )
            assert result.ok, result.reason
        worker = Worker(archive, "reports", poll_interval=0.05, lease_seconds=300).start()
        try:
            yield World(server, clock, worker, tokens, study_uid, smtp)
        finally:
            worker.stop()


def dciodvfy_errors(path: Path) -> list[str]:
    assert os.access(DCIODVFY, os.X_OK), "dciodvfy missing: apt-get install dicom3tools"
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def wado_instance(world: World, series: str, sop: str) -> bytes:
    """One instance by WADO-RS (multipart/related; type=application/dicom)."""
    path = f"/dicom-web/studies/{world.study_uid}/series/{series}/instances/{sop}"
    answer = world.call(
        "admin", "GET", path, headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    assert answer.status_code == 200, answer.text
    boundary = answer.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = answer.content.split(b"--" + boundary.encode())
    body = next(p for p in parts if b"\r\n\r\n" in p)
    return body.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]


def pdf_text(document: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(document), strict=True)
    return " ".join(" ".join(page.extract_text() for page in reader.pages).split())


def test_a_validated_report_is_stored_as_dicom_mailed_to_the_requester_and_only_addenda_follow(
    world: World, tmp_path: Path
) -> None:
    uid = world.new_request()
    tx = world.claim(uid)
    draft = world.write(uid, tx)
    assert draft.status_code == 200, draft.text
    assert draft.json()["state"] == "draft"
    # the requesting site does not see a draft
    assert world.call("manip.a", "GET", world.report(uid)).status_code == 404

    validated = world.validate(uid, tx)
    assert validated.status_code == 200, validated.text
    body = validated.json()
    assert body["state"] == "validated" and body["reader_name"] == "Dr Étienne Martin"
    request = world.call("dr.martin", "GET", f"/api/worklist/requests/{uid}").json()
    assert request["state"] == "COMPLETED"
    (version,) = body["versions"]
    assert version["stored"] is False and version["delivery"] == "pending"

    world.run_jobs()

    # stored with the study: QIDO lists the SR and DOC series, WADO-RS returns them
    found = world.call(
        "admin", "GET", f"/dicom-web/studies/{world.study_uid}/series", params={"Modality": "SR"}
    )
    assert found.status_code == 200, found.text
    assert [s["0020000E"]["Value"][0] for s in found.json()] == [version["sr"]["series_uid"]]
    found = world.call(
        "admin", "GET", f"/dicom-web/studies/{world.study_uid}/series", params={"Modality": "DOC"}
    )
    assert [s["0020000E"]["Value"][0] for s in found.json()] == [version["pdf"]["series_uid"]]
    sr_bytes = wado_instance(world, version["sr"]["series_uid"], version["sr"]["sop_instance_uid"])
    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    assert sr.StudyInstanceUID == world.study_uid and sr.VerificationFlag == "VERIFIED"
    assert "Étienne Martin" in str(sr.VerifyingObserverSequence[0].VerifyingObserverName)
    texts = [
        i.ContentSequence[0].TextValue for i in sr.ContentSequence if i.ValueType == "CONTAINER"
    ]
    assert REPORT["conclusion"] in texts and REPORT["indications"] in texts
    pdf_ds = pydicom.dcmread(
        io.BytesIO(
            wado_instance(world, version["pdf"]["series_uid"], version["pdf"]["sop_instance_uid"])
        )
    )
    (tmp_path / "pdf.dcm").write_bytes(
        wado_instance(world, version["pdf"]["series_uid"], version["pdf"]["sop_instance_uid"])
    )
    assert dciodvfy_errors(tmp_path / "pdf.dcm") == []
    document = bytes(pdf_ds.EncapsulatedDocument)[: pdf_ds.EncapsulatedDocumentLength]
    assert "Garden III" in pdf_text(document)

    # delivered to the requester through the SMTP server, the PDF attached
    world.run_jobs()
    (mail,) = world.mails_to(REQUESTER)
    # the patient's GP gets a link to the study from the sharing portal, not the report
    (link,) = world.mails_to(GP)
    assert b"/share/" in link.data and b"application/pdf" not in link.data
    message = message_from_bytes(mail.data, policy=policy.default)
    (attachment,) = [p for p in message.iter_attachments()]
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == document
    shown = world.call("manip.a", "GET", world.report(uid))
    assert shown.status_code == 200 and shown.json()["versions"][0]["delivery"] == "queued"

    # the report is immutable now; an addendum is accepted and makes a new version
    late = world.write(uid, tx, {"conclusion": "Autre chose."})
    assert late.status_code == 409, late.text
    added = world.call(
        "dr.durand",
        "POST",
        world.report(uid) + "/addenda",
        json={"text": "Relecture : pas de fracture controlatérale.", "author_name": "Dr Durand"},
    )
    assert added.status_code == 201, added.text
    assert added.json()["addenda"][0]["state"] == "draft"
    # only its author signs it
    assert (
        world.call("dr.martin", "POST", world.report(uid) + "/addenda/1/validate").status_code
        == 403
    )
    signed = world.call("dr.durand", "POST", world.report(uid) + "/addenda/1/validate")
    assert signed.status_code == 200, signed.text
    second = signed.json()["versions"][1]
    assert second["version"] == 1
    assert {second["sr"]["series_uid"], second["pdf"]["series_uid"]}.isdisjoint(
        {version["sr"]["series_uid"], version["pdf"]["series_uid"]}
    )
    world.run_jobs()
    world.run_jobs()
    assert {second["sr"]["series_uid"], second["pdf"]["series_uid"]} <= world.stored_series()
    assert len(world.mails_to(REQUESTER)) == 2
    again = world.call("admin", "GET", world.report(uid)).json()
    assert [v["stored"] for v in again["versions"]] == [True, True]
    addendum_pdf = pydicom.dcmread(
        io.BytesIO(
            wado_instance(world, second["pdf"]["series_uid"], second["pdf"]["sop_instance_uid"])
        )
    )
    addendum_sr = pydicom.dcmread(
        io.BytesIO(
            wado_instance(world, second["sr"]["series_uid"], second["sr"]["sop_instance_uid"])
        )
    )
    (tmp_path / "sr2.dcm").write_bytes(
        wado_instance(world, second["sr"]["series_uid"], second["sr"]["sop_instance_uid"])
    )
    assert dciodvfy_errors(tmp_path / "sr2.dcm") == []
    predecessor = addendum_sr.PredecessorDocumentsSequence[0]
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == version["sr"]["sop_instance_uid"]
    text = pdf_text(bytes(addendum_pdf.EncapsulatedDocument))
    assert "controlatérale" in text and "Garden III" in text

    # one report.validated event per validated version
    events = world.archive.db.query(
        "SELECT detail FROM changes WHERE type = 'report.validated' ORDER BY seq"
    )
    assert [json.loads(d)["version"] for (d,) in events] == [0, 1]
    # the patient's GP, named in the request, is who the sharing portal shares it with
    assert {tuple(json.loads(d)["share_with"]) for (d,) in events} == {(GP,)}
    # the report's own series never ask for a new reading
    assert (
        world.archive.db.scalar(
            "SELECT count(*) FROM read_requests WHERE study_uid = ?", (world.study_uid,)
        )
        == 1
    )


def test_rerunning_the_storage_job_stores_nothing_new_and_mails_nothing_twice(
    world: World,
) -> None:
    uid = world.new_request()
    tx = world.claim(uid)
    world.write(uid, tx)
    assert world.validate(uid, tx).status_code == 200
    world.run_jobs()
    world.run_jobs()
    instances = world.archive.db.scalar("SELECT count(*) FROM instances")
    world.archive.db.execute("UPDATE report_versions SET stored_at = NULL")
    run(world.archive, {"request": uid, "version": 0})  # a re-run, as after a crash
    world.run_jobs()
    assert world.archive.db.scalar("SELECT count(*) FROM instances") == instances
    assert len(world.mails_to(REQUESTER)) == 1


def test_a_late_holder_is_refused_with_c301_and_nothing_is_stored(world: World) -> None:
    uid = world.new_request()
    tx = world.claim(uid)
    assert world.write(uid, tx).status_code == 200
    world.clock.advance(601)  # the lease (600 s) passes without activity
    before = world.stored_series()
    late = world.validate(uid, tx)
    assert late.status_code == 409, late.text
    assert late.json()["ups_status"] == "C301"
    # the request was taken by another reader meanwhile: still C301
    world.claim(uid, "dr.durand")
    late = world.validate(uid, tx)
    assert late.status_code == 409 and late.json()["ups_status"] == "C301"
    world.run_jobs()
    assert world.stored_series() == before
    db = world.archive.db
    assert db.scalar("SELECT count(*) FROM report_versions") == 0
    assert db.scalar("SELECT count(*) FROM changes WHERE type = 'report.validated'") == 0
    assert world.call("admin", "GET", world.report(uid)).json()["state"] == "draft"


def test_a_chapter_over_the_limit_is_a_400_and_nothing_changes(world: World) -> None:
    uid = world.new_request()
    tx = world.claim(uid)
    assert world.write(uid, tx).status_code == 200
    huge = world.write(uid, tx, {"results": "x" * (MAX_TEXT_CHARS + 1)})
    assert huge.status_code == 400, huge.text
    assert [p["name"] for p in huge.json()["invalid-params"]] == ["results"]
    wrong = world.write(uid, tx, {"results": ["not", "text"], "summary": "?"})
    assert wrong.status_code == 400
    assert {p["name"] for p in wrong.json()["invalid-params"]} == {"results", "summary"}
    assert world.call("admin", "GET", world.report(uid)).json()["results"] == REPORT["results"]


def test_another_sites_user_gets_404_and_every_read_is_audited(world: World) -> None:
    uid = world.new_request()
    tx = world.claim(uid)
    world.write(uid, tx)
    assert world.validate(uid, tx).status_code == 200
    last = world.last_audit()
    assert world.call("manip.b", "GET", world.report(uid)).status_code == 404
    assert world.call("manip.a", "GET", world.report(uid)).status_code == 200
    entries = [e for e in world.audit_since(last) if e["action"] == "worklist.report.show"]
    assert [(e["actor"], e["outcome"], e["status"]) for e in entries] == [
        ("manip.b", "denied", 404),
        ("manip.a", "allowed", 200),
    ]
    assert all(e["detail"]["request"] == uid for e in entries)


def test_a_request_without_an_address_says_so_in_the_report(world: World) -> None:
    uid = world.new_request(reply_to="")
    tx = world.claim(uid)
    world.write(uid, tx)
    assert world.validate(uid, tx).status_code == 200
    world.run_jobs()
    report = world.call("dr.martin", "GET", world.report(uid)).json()
    assert report["versions"][0]["delivery"] == "no address"
    assert report["versions"][0]["stored"] is True
    assert world.mails_to(REQUESTER) == []


def test_an_addendum_before_validation_is_refused(world: World) -> None:
    uid = world.new_request()
    tx = world.claim(uid)
    world.write(uid, tx)
    early = world.call("dr.martin", "POST", world.report(uid) + "/addenda", json={"text": "x"})
    assert early.status_code == 409, early.text
