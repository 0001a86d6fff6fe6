"""The job that makes a validated report version real: its DICOM documents
stored with the study, and the PDF sent to the requester.

One job per version (kind :data:`worklist.reports.JOB_KIND`, queued in the
validation's transaction).  It runs at least once, so every step is
idempotent:

1. **Store.**  The SR and the Encapsulated PDF are built from the stored
   report with the UIDs the validation fixed, from the header of one stored
   image of the study (its patient and study modules), timed by the
   signatures: the same version always gives the same bytes, and the ingest
   takes an identical re-send as a duplicate.  They go through the archive's
   one ingest pipeline as the request's site (the study's owner), so they are
   in the catalog, QIDO, WADO-RS and C-GET like any instance.
2. **Deliver.**  The PDF (and an IHE XDM package with ``worklist.xdm``) is
   queued to ``reply_to`` through :func:`archive.messaging.send` in the
   transaction that records the message on the version: a re-run finds it and
   sends nothing more.  The messaging job then retries the SMTP delivery
   itself.  A request without an address is marked ``no address``.

A failure raises: the job queue retries with back-off; ``imag jobs`` shows a
dead one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from archive.identity import Source
from archive.jobs import PermanentJobError
from archive.messaging import Actor, Attachment, Message, send, xdm
from archive.retrieve import StoredObject, locate, open_header
from worklist.documents import (
    encapsulated_pdf,
    structured_report,
    to_bytes,
)
from worklist.pdf import TITLE, report_pdf
from worklist.reports import Report, Reports, Version, content_of
from worklist.requests import ReadRequest, Viewer
from worklist.service import worklist_of

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from archive.runtime import Archive

log = logging.getLogger(__name__)

#: series numbers of the report's series: version v's SR is 9001 + 2v, its PDF 9002 + 2v
SERIES_BASE = 9001


def run(archive: Archive, payload: dict[str, Any]) -> None:
    """The job's handler: store then deliver ``payload["version"]`` of the
    report of ``payload["request"]``."""
    uid, number = str(payload["request"]), int(payload["version"])
    worklist = worklist_of(archive)
    request = worklist.get(uid, Viewer.system())
    report = Reports(worklist).load(uid)
    version = next((v for v in report.versions if v.version == number), None) if report else None
    if report is None or version is None:
        raise PermanentJobError(f"request {uid} has no report version {number}")
    content = content_of(report, request, number)
    evidence = _evidence(archive, request.study_uid)
    patient = _patient(evidence)
    pdf = report_pdf(content, patient)
    if version.stored_at is None:
        _store(archive, request, report, version, content, evidence, pdf)
    if version.message_ref is None and not version.delivery:
        _deliver(archive, request, version, content, patient, pdf)


def _evidence(archive: Archive, study_uid: str) -> list[Dataset]:
    """The header of the study's first stored image (not one of the
    worklist's own series): the patient and study the documents belong to."""
    own = {r[0] for r in archive.db.query("SELECT series_uid FROM read_outputs")}
    items = [
        i
        for i in locate(archive.db, "STUDY", {"StudyInstanceUID": study_uid})
        if i.series_uid not in own
    ]
    if not items:
        raise PermanentJobError(f"study {study_uid} has no stored image to report on")
    return [_header(archive, items[0])]


def _header(archive: Archive, item: StoredObject) -> Dataset:
    with open_header(archive.store, item) as header:
        return header.dataset  # without pixel data: highdicom needs the modules only


def _patient(evidence: list[Dataset]) -> dict[str, str]:
    first = evidence[0]
    return {
        "name": str(first.get("PatientName", "") or ""),
        "patient_id": str(first.get("PatientID", "") or ""),
        "birth_date": str(first.get("PatientBirthDate", "") or ""),
        "sex": str(first.get("PatientSex", "") or ""),
    }


def _store(
    archive: Archive,
    request: ReadRequest,
    report: Report,
    version: Version,
    content: Any,
    evidence: list[Dataset],
    pdf: bytes,
) -> None:
    number = version.version
    sr = structured_report(
        evidence,
        content,
        series_uid=version.sr_series_uid,
        sop_instance_uid=version.sr_sop_uid,
        series_number=SERIES_BASE + 2 * number,
        instance_number=1,
        institution=_organization(request),
        previous_versions=_previous(archive, request, report, number),
    )
    document = encapsulated_pdf(
        evidence,
        pdf,
        series_uid=version.pdf_series_uid,
        sop_instance_uid=version.pdf_sop_uid,
        series_number=SERIES_BASE + 2 * number + 1,
        instance_number=1,
        title=TITLE if number == 0 else f"{TITLE} (addendum {number})",
        signed=content.signatures[-1],
        request_uid=request.uid,
        institution=_organization(request),
    )
    source = Source(kind="import", site=request.site, user="worklist")
    for ds in (sr, document):
        result = archive.pipeline.ingest(to_bytes(ds), source)
        if not result.ok:
            raise RuntimeError(
                f"the report's {ds.Modality} was not stored: {result.code} {result.reason}"
            )
    archive.db.execute(
        "UPDATE report_versions SET stored_at = ? WHERE request_uid = ? AND version = ?",
        (archive.clock.now(), report.request_uid, number),
    )
    log.info(
        "report stored",
        extra={"request": request.uid, "version": number, "study": request.study_uid},
    )


def _previous(archive: Archive, request: ReadRequest, report: Report, number: int) -> list[Any]:
    """The SR version ``number`` supersedes (none for the report itself): it
    must be stored first, so that every run of this job references it and
    makes the same bytes (raised otherwise: the job is retried)."""
    if number == 0:
        return []
    before = next(v for v in report.versions if v.version == number - 1)
    keys = {
        "StudyInstanceUID": request.study_uid,
        "SeriesInstanceUID": before.sr_series_uid,
        "SOPInstanceUID": before.sr_sop_uid,
    }
    found = locate(archive.db, "IMAGE", keys)
    if not found:
        raise RuntimeError(f"version {number - 1} of the report is not stored yet")
    return [_header(archive, found[0])]


def _organization(request: ReadRequest) -> str:
    """Who verifies, as an organization (the SR's Verifying Organization, Type
    1): the reading group that answered, else the archive's name."""
    return f"Téléradiologie {request.group}" if request.group else "IMAG téléradiologie"


def _deliver(
    archive: Archive,
    request: ReadRequest,
    version: Version,
    content: Any,
    patient: dict[str, str],
    pdf: bytes,
) -> None:
    db = archive.db
    addresses = [a.strip() for a in request.reply_to.split(",") if a.strip()]
    number = version.version
    with db.transaction():
        done = db.query_one(
            "SELECT message_ref, delivery FROM report_versions WHERE request_uid = ? "
            "AND version = ?",
            (request.uid, number),
        )
        if done is not None and (done[0] is not None or done[1]):
            return  # another run got here first
        if not addresses:
            db.execute(
                "UPDATE report_versions SET delivery = 'no address' WHERE request_uid = ? "
                "AND version = ?",
                (request.uid, number),
            )
            return
        filename = "compte-rendu.pdf" if number == 0 else f"compte-rendu-addendum-{number}.pdf"
        attachments = [Attachment(filename, "application/pdf", pdf)]
        if archive.config["worklist.xdm"]:
            attachments.append(_xdm(content, patient, pdf, addresses))
        subject = TITLE if number == 0 else f"{TITLE} : addendum n° {number}"
        message = Message(
            to=addresses,
            subject=subject,
            text=(
                "Bonjour,\n\nVeuillez trouver ci-joint le compte rendu validé"
                + (f" (addendum n° {number})" if number else "")
                + f" de la demande de lecture {request.uid}.\n\nIMAG\n"
            ),
            attachments=attachments,
            purpose="report",
            study_uid=request.study_uid,
        )
        ref = send(archive, message, by=Actor("worklist", kind="system", site=request.site))
        db.execute(
            "UPDATE report_versions SET message_ref = ?, delivery = 'queued' "
            "WHERE request_uid = ? AND version = ?",
            (ref, request.uid, number),
        )


def _xdm(content: Any, patient: dict[str, str], pdf: bytes, to: list[str]) -> Attachment:
    family, _, given = patient["name"].partition("^")
    signed = content.signatures[-1]
    submission = xdm.Submission(
        patient=xdm.Patient(
            local_id=patient["patient_id"] or None,
            family_name=family,
            given_name=given.split("^")[0],
            birth_date=patient["birth_date"],
            sex=patient["sex"],
        ),
        documents=[xdm.Document(pdf, "application/pdf", TITLE, creation_time=signed.at)],
        author=xdm.Author(person=content.signed.name),
        source_id=xdm.source_oid("imag-worklist"),
        title=TITLE,
        recipients=to,
    )
    return xdm.package(submission, now=signed.at)
