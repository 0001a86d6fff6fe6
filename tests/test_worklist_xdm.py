"""With ``worklist.xdm = true`` the validated report reaches the requester
as the PDF *and* an IHE XDM package (IHE_XDM.ZIP) holding the same PDF, its
XDS metadata naming the patient and the signing radiologist, as French
secure messaging (MSSanté) expects of a report sent between professionals.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from archive.config import Config
from archive.identity import Source
from archive.runtime import Archive
from tests.dicomfiles import make_instance
from worklist.report_delivery import run
from worklist.reports import Reports
from worklist.requests import Viewer
from worklist.service import worklist_of

FIELDS = {
    "requesting_physician": "Dr Anne Lefèvre",
    "clinical_context": "Dyspnée aiguë",
    "question": "Embolie pulmonaire ?",
    "anatomical_region": "Thorax",
    "contraindications": "aucune",
    "exam_type": "Angioscanner thoracique",
    "patient_consent": True,
}
CHAPTERS = {
    "indications": "Dyspnée aiguë, D-dimères élevés.",
    "technique": "Angioscanner thoracique au temps artériel pulmonaire.",
    "results": "Défect endoluminal de l'artère lobaire inférieure droite.",
    "conclusion": "Embolie pulmonaire lobaire inférieure droite.",
}
READER = Viewer("dr.martin", groups=frozenset({"garde-nord"}))


@pytest.fixture
def archive(make_config: Callable[..., Config]) -> Iterator[Archive]:
    with Archive(make_config(settings={"worklist.xdm": True})) as archive:
        yield archive


def test_a_validated_report_is_mailed_with_an_xdm_package_of_the_same_pdf(
    archive: Archive, tmp_path: Path
) -> None:
    study = generate_uid()
    stored = archive.pipeline.ingest(make_instance(study=study), Source(kind="import", site="a"))
    assert stored.ok, stored.reason
    worklist = worklist_of(archive)
    uid = worklist.create(
        study_uid=study,
        site="a",
        group="garde-nord",
        fields=FIELDS,
        created_by="manip.a",
        reply_to="urgences@ch-a.mssante.fr",
    ).uid
    tx = worklist.claim(uid, READER).transaction_uid
    reports = Reports(worklist)
    reports.save_draft(uid, READER, tx, CHAPTERS, reader_name="Dr Étienne Martin")
    reports.validate(uid, READER, tx)
    run(archive, {"request": uid, "version": 0})

    ((body,),) = archive.db.query("SELECT body FROM messages WHERE purpose = 'report'")
    mail = message_from_bytes(bytes(body), policy=policy.default)
    assert mail["To"] == "urgences@ch-a.mssante.fr"
    parts = {p.get_filename(): p.get_content() for p in mail.iter_attachments()}
    pdf = parts["compte-rendu.pdf"]
    assert pdf.startswith(b"%PDF")
    package = zipfile.ZipFile(io.BytesIO(parts["IHE_XDM.ZIP"]))
    names = package.namelist()
    assert "INDEX.HTM" in names and "README.TXT" in names
    metadata = next(n for n in names if n.upper().endswith("METADATA.XML"))
    documents = [n for n in names if n.upper().endswith(".PDF")]
    assert [package.read(n) for n in documents] == [pdf]  # the same PDF, byte for byte
    xml = package.read(metadata).decode()
    assert "Dr Étienne Martin" in xml and "application/pdf" in xml
