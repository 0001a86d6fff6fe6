"""The validated teleradiology report as documents (worklist/documents.py, worklist/pdf.py):
a DICOM structured report and an Encapsulated PDF that Debian's dciodvfy (dicom3tools)
finds no error in, and a PDF that a real PDF reader (pypdf) opens and reads back."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pypdf
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.dicomfiles import make_instance
from worklist import pdf as pdf_module
from worklist.documents import (
    MAX_ADDENDA,
    MAX_REPORT_CHARS,
    MAX_TEXT_CHARS,
    Addendum,
    ReportContent,
    Signed,
    encapsulated_pdf,
    structured_report,
    to_bytes,
)
from worklist.pdf import report_pdf

DCIODVFY = "/usr/bin/dciodvfy"  # Debian's dicom3tools (scripts/test installs it)
ROOT = Path(__file__).resolve().parent.parent

# Winter (UTC+1) for the report, summer (UTC+2) for the second addendum: the local times
# shown and stored must follow Paris's offset of each moment.
REPORT_SIGNED = Signed("Dr Marie Curie", "mcurie", datetime(2024, 3, 30, 22, 15, tzinfo=UTC))
FIRST_ADDENDUM = Signed("Dr Marie Curie", "mcurie", datetime(2024, 3, 31, 7, 5, tzinfo=UTC))
SECOND_ADDENDUM = Signed("Pr Louis Pasteur", "lpasteur", datetime(2024, 4, 2, 9, 0, tzinfo=UTC))
PATIENT = {
    "name": "DUPONT-LEFÈVRE^Hélène",
    "patient_id": "IPP-0042",
    "birth_date": "19580214",
    "sex": "F",
}
CHAPTERS = {
    # (attribute, heading code, text item code): TID 2000 sections (PS3.16 CID 7001/7002)
    "indications": ("18785-6", "18785-6"),
    "technique": ("55111-9", "121065"),
    "results": ("59776-5", "121071"),
    "conclusion": ("55110-1", "121077"),
}


def sample_report(request_uid: str = "1.2.826.0.1.3680043.8.498.77") -> ReportContent:
    """A report with French accents in every chapter and two addenda."""
    return ReportContent(
        indications="Céphalées brutales chez une patiente de 66 ans ; œdème papillaire ?",
        technique="Scanner cérébral sans injection, coupes de 0,625 mm.\nDLP : 950 mGy·cm.",
        results="Pas d'hémorragie intracrânienne. Cœur des noyaux gris préservé. Coût : 0 €.",
        conclusion="Examen sans anomalie décelable. « Pas de saignement ».",
        signed=REPORT_SIGNED,
        request={
            "requesting_physician": "Dr Émile Roux",
            "requesting_site": "Centre hospitalier de Saint-Benoît",
            "clinical_context": "Céphalée en coup de tonnerre",
            "question": "Hémorragie méningée ?",
            "anatomical_region": "Crâne",
            "exam_type": "Scanner",
            "priority": "STAT",
        },
        addenda=(
            Addendum("Précision : pas de fracture de la voûte.", FIRST_ADDENDUM),
            Addendum("Relecture : angioscanner conseillé si récidive.", SECOND_ADDENDUM),
        ),
        request_uid=request_uid,
    )


def study_evidence(count: int = 2) -> list[Dataset]:
    """Headers of a study's instances, the patient's name in Latin-1 (ISO_IR 100)."""
    study, series = generate_uid(), generate_uid()

    def edit(ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "DUPONT-LEFÈVRE^Hélène"
        ds.PatientWeight = "61"
        ds.AccessionNumber = "ACC-2024-0042"
        ds.ReferringPhysicianName = "ROUX^Émile"

    return [
        pydicom.dcmread(io.BytesIO(make_instance(edit, study=study, series=series)))
        for _ in range(count)
    ]


def dciodvfy(tmp_path: Path, ds: Dataset) -> tuple[list[str], list[str]]:
    """dciodvfy's (errors, warnings) on the Part-10 file ``to_bytes`` makes of ``ds``."""
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(to_bytes(ds))
    assert os.access(DCIODVFY, os.X_OK), "dciodvfy missing: apt-get install dicom3tools"
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return (
        [line for line in lines if line.startswith("Error")],
        [line for line in lines if line.startswith("Warning")],
    )


def read_back(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def code_of(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue


def sections(sr: Dataset) -> list[Dataset]:
    return [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"]


def section_texts(section: Dataset) -> list[tuple[str, str]]:
    """The (concept code, text) of the TEXT items a section CONTAINS."""
    return [
        (code_of(item), item.TextValue)
        for item in section.ContentSequence
        if item.ValueType == "TEXT" and item.RelationshipType == "CONTAINS"
    ]


def observer_name(item: Dataset) -> str:
    names = [str(i.PersonName) for i in item.ContentSequence if i.ValueType == "PNAME"]
    return names[0]


def pdf_text(document: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(document), strict=True)
    return "\n".join(page.extract_text() for page in reader.pages)


def words(text: str) -> str:
    return " ".join(text.split())


PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def make_sr(evidence: list[Dataset], content: ReportContent, **kwargs: object) -> Dataset:
    return structured_report(
        evidence,
        content,
        series_uid=kwargs.pop("series_uid", generate_uid()),  # type: ignore[arg-type]
        sop_instance_uid=kwargs.pop("sop_instance_uid", generate_uid()),  # type: ignore[arg-type]
        series_number=901,
        instance_number=1,
        institution="Téléradiologie Océan Indien",
        **kwargs,  # type: ignore[arg-type]
    )


def make_encapsulated(evidence: list[Dataset], document: bytes, **kwargs: object) -> Dataset:
    options: dict = {"title": "Compte rendu de téléradiologie", "signed": SECOND_ADDENDUM}
    return encapsulated_pdf(
        evidence,
        document,
        series_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=902,
        instance_number=1,
        **{**options, **kwargs},
    )


def test_structured_report_passes_dciodvfy_and_reads_back_chapter_by_chapter(tmp_path):
    evidence = study_evidence()
    content = sample_report()
    series_uid = generate_uid()
    sr = make_sr(evidence, content, series_uid=series_uid)

    errors, warnings = dciodvfy(tmp_path, sr)
    assert errors == [], errors
    assert warnings == [], warnings  # none with real-looking evidence

    back = read_back(sr)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert (back.Modality, back.SeriesInstanceUID, back.SeriesNumber) == ("SR", series_uid, 901)
    assert code_of(back) == "18748-4"  # Diagnostic Imaging Report
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    found = {code_of(section): section_texts(section) for section in sections(back)[:4]}
    for chapter, (heading, element) in CHAPTERS.items():
        assert found[heading] == [(element, getattr(content, chapter))]

    # verified, complete and final; the report's signer and each addendum's, local time
    assert (back.VerificationFlag, back.CompletionFlag, back.PreliminaryFlag) == (
        "VERIFIED",
        "COMPLETE",
        "FINAL",
    )
    verifiers = [
        (str(v.VerifyingObserverName), v.VerificationDateTime)
        for v in back.VerifyingObserverSequence
    ]
    assert verifiers == [
        ("Dr Marie Curie^", "20240330231500+0100"),
        ("Dr Marie Curie^", "20240331090500+0200"),  # Paris went to summer time at 02:00
        ("Pr Louis Pasteur^", "20240402110000+0200"),
    ]
    assert (back.ContentDate, back.ContentTime) == ("20240330", "231500")
    assert observer_name(back) == "Dr Marie Curie^"  # the author: TID 1002 person observer

    addenda = sections(back)[4:]
    assert [code_of(a) for a in addenda] == ["55107-7", "55107-7"]
    assert [section_texts(a)[0][1] for a in addenda] == [a.text for a in content.addenda]
    assert [observer_name(a) for a in addenda] == ["Dr Marie Curie^", "Pr Louis Pasteur^"]
    assert [a.ObservationDateTime for a in addenda] == [
        "20240331090500+0200",
        "20240402110000+0200",
    ]

    # the patient and the study are the evidence's, in UTF-8 now
    assert back.SpecificCharacterSet == "ISO_IR 192"
    for keyword in PATIENT_AND_STUDY:
        assert str(back[keyword].value) == str(evidence[0][keyword].value), keyword
    referenced = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedSOPSequence} == {
        ds.SOPInstanceUID for ds in evidence
    }
    # the worklist item (UPS) it answers
    step = back.ReferencedPerformedProcedureStepSequence[0]
    assert (step.ReferencedSOPClassUID, step.ReferencedSOPInstanceUID) == (
        "1.2.840.10008.5.1.4.34.6.1",
        content.request_uid,
    )


def test_structured_report_is_the_same_bytes_when_rebuilt():
    """A retried storage job re-sends an identical object (an idempotent success),
    not a conflicting one: nothing in the SR comes from the clock."""
    evidence, content = study_evidence(), sample_report()
    uids = {"series_uid": generate_uid(), "sop_instance_uid": generate_uid()}
    assert to_bytes(make_sr(evidence, content, **uids)) == to_bytes(
        make_sr(evidence, content, **uids)
    )


def test_a_later_version_references_the_one_it_supersedes(tmp_path):
    evidence = study_evidence()
    first = make_sr(evidence, sample_report())
    second = make_sr(evidence, sample_report(), previous_versions=[first])
    assert dciodvfy(tmp_path, second)[0] == []
    predecessor = read_back(second).PredecessorDocumentsSequence[0]
    sop = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert sop.ReferencedSOPInstanceUID == first.SOPInstanceUID


@pytest.mark.parametrize("institution", ["", " \t "])
def test_without_an_institution_the_archive_is_the_verifying_organization(tmp_path, institution):
    """Verifying Organization is Type 1: a report built without an institution (or a
    blank one) names the archive there, not an empty value, and stays valid."""
    sr = structured_report(
        study_evidence(),
        sample_report(),
        series_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=901,
        instance_number=1,
        institution=institution,
    )
    errors, warnings = dciodvfy(tmp_path, sr)
    assert errors == [], errors
    assert warnings == [], warnings
    back = read_back(sr)
    organizations = [v.VerifyingOrganization for v in back.VerifyingObserverSequence]
    assert organizations == ["IMAG"] * 3  # the report's signer and each addendum's
    assert "InstitutionName" not in back  # Type 3: absent rather than invented


def test_encapsulated_pdf_passes_dciodvfy_and_its_document_opens(tmp_path):
    evidence, content = study_evidence(), sample_report()
    document = report_pdf(content, PATIENT)
    ds = make_encapsulated(evidence, document, request_uid=content.request_uid)

    errors, warnings = dciodvfy(tmp_path, ds)
    assert errors == [], errors
    assert warnings == [], warnings

    back = read_back(ds)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert back.Modality == "DOC"
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert back.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert back.ConceptNameCodeSequence[0].CodingSchemeDesignator == "LN"
    assert back.DocumentTitle == "Compte rendu de téléradiologie"
    assert back.EncapsulatedDocumentLength == len(document)
    assert len(back.EncapsulatedDocument) % 2 == 0
    assert back.EncapsulatedDocument[: len(document)] == document
    assert back.EncapsulatedDocument[len(document) :] in (b"", b"\x00")
    assert (back.ContentDate, back.ContentTime) == ("20240402", "110000")
    for keyword in PATIENT_AND_STUDY:
        assert str(back[keyword].value) == str(evidence[0][keyword].value), keyword
    step = back.ReferencedPerformedProcedureStepSequence[0]
    assert step.ReferencedSOPInstanceUID == content.request_uid

    text = words(pdf_text(back.EncapsulatedDocument[: back.EncapsulatedDocumentLength]))
    for heading in ("Indications", "Technique", "Résultats", "Synthèse / Conclusion"):
        assert heading in text
    for chapter in CHAPTERS:
        assert words(getattr(content, chapter)) in text
    assert "Compte rendu de téléradiologie" in text
    assert "DUPONT-LEFÈVRE Hélène" in text and "14/02/1958" in text and "IPP-0042" in text
    assert "Dr Émile Roux" in text and "Urgence immédiate (STAT)" in text
    # each signature in Paris local time: winter, then summer
    assert "Dr Marie Curie (mcurie) le 30/03/2024 à 23:15" in text
    assert "Dr Marie Curie (mcurie) le 31/03/2024 à 09:05" in text
    assert "Pr Louis Pasteur (lpasteur) le 02/04/2024 à 11:00" in text
    assert text.index("Addendum n° 1") < text.index("Addendum n° 2")
    assert words(content.addenda[1].text) in text


def test_report_pdf_is_the_same_bytes_for_the_same_report_in_another_process():
    """A job re-run (another process, another hash seed, a later time) renders the same
    bytes: the creation date is the last signature's, nothing comes from the clock."""
    here = hashlib.sha256(report_pdf(sample_report(), PATIENT)).hexdigest()
    assert hashlib.sha256(report_pdf(sample_report(), PATIENT)).hexdigest() == here
    child = (
        "import hashlib, sys\n"
        "from tests.test_worklist_documents import PATIENT, sample_report\n"
        "from worklist.pdf import report_pdf\n"
        "sys.stdout.write(hashlib.sha256(report_pdf(sample_report(), PATIENT)).hexdigest())\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", child],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert run.stdout == here
    assert report_pdf(sample_report(), PATIENT) != report_pdf(
        sample_report(), {**PATIENT, "name": "MARTIN^Paul"}
    )


HOSTILE = (
    "%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\nstream\nendstream\n%%EOF\n"
    ") ( \\) \\\\ <?xml version='1.0'?><!DOCTYPE r [<!ENTITY x 'y'>]><r>&x;</r>]]> "
    "\u202evitagen\u202c \u200f\u2067isolé\u2069\u200e "
    "\x00\x01\x07\x08\x0b\x1b\x7f\x85 \ud800 \ufeff\u200b "
    "עברית العربية 中文 😀 fin é œ €\r\n\tsuite\u2028dernière ligne"
)


def hostile_report() -> ReportContent:
    long_chapter = (HOSTILE * (MAX_TEXT_CHARS // len(HOSTILE) + 1))[:MAX_TEXT_CHARS]
    hostile_signer = Signed("Dr \u202eMarie^Curie=\\", "mcurie\x00", REPORT_SIGNED.at)
    return ReportContent(
        indications=long_chapter,
        technique=HOSTILE,
        results=HOSTILE,
        conclusion=HOSTILE,
        signed=hostile_signer,
        request={"question": HOSTILE, "priority": 3, "exam_type": None},
        addenda=(Addendum(HOSTILE, hostile_signer),),
    )


def test_hostile_text_within_the_limits_gives_valid_documents(tmp_path):
    """Control characters, bidirectional overrides, a lone surrogate, text that looks
    like PDF or XML syntax, a 64 Ki chapter: valid SR, valid PDF, the words kept."""
    content, evidence = hostile_report(), study_evidence()
    sr = make_sr(evidence, content)
    assert dciodvfy(tmp_path, sr)[0] == []
    back = read_back(sr)
    technique = section_texts(sections(back)[1])[0][1]
    assert "endobj" in technique and "<!ENTITY x 'y'>" in technique and "fin é œ €" in technique
    assert not any(char in technique for char in "\u202e\u200f\u2067\x00\x07\x1b\ufeff\u200b")
    assert "\r" not in technique and "\t" not in technique
    assert str(back.VerifyingObserverSequence[0].VerifyingObserverName) == "Dr Marie Curie^"

    document = report_pdf(content, {"name": HOSTILE[:300], "patient_id": "<x>\x00"})
    text = words(pdf_text(document))  # strict parsing: a broken PDF raises
    assert "endobj stream endstream %%EOF" in text and "<!ENTITY x 'y'>" in text
    assert "fin é œ €" in text
    assert dciodvfy(tmp_path, make_encapsulated(evidence, document, title=HOSTILE))[0] == []


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda r: ReportContent(**{**r, "results": "x" * 10**6}),
            "the results is 1000000 characters long",
        ),
        (
            lambda r: ReportContent(
                **{**r, "addenda": (Addendum("y" * (MAX_TEXT_CHARS + 1), REPORT_SIGNED),)}
            ),
            "the addendum is",
        ),
        (
            lambda r: ReportContent(
                **{
                    **r,
                    "addenda": tuple(
                        Addendum("z" * MAX_TEXT_CHARS, REPORT_SIGNED)
                        for _ in range(MAX_REPORT_CHARS // MAX_TEXT_CHARS)
                    ),
                }
            ),
            "the report and its addenda are",
        ),
        (
            lambda r: ReportContent(
                **{**r, "addenda": (Addendum("ok", REPORT_SIGNED),) * (MAX_ADDENDA + 1)}
            ),
            f"at most {MAX_ADDENDA} addenda",
        ),
        (
            lambda r: ReportContent(**{**r, "request": {"question": "q" * 10**5}}),
            "request field 'question'",
        ),
        (lambda r: ReportContent(**{**r, "request_uid": "1.2.x"}), "not a valid request UID"),
        (lambda r: Signed("Dr Curie", "mcurie", datetime(2024, 1, 1, 12)), "timezone-aware"),
        (lambda r: Signed("\u202e\x00 ", "mcurie", REPORT_SIGNED.at), "signer name is empty"),
    ],
    ids=[
        "chapter-of-a-million-characters",
        "oversized-addendum",
        "report-with-addenda-too-long",
        "too-many-addenda",
        "oversized-request-field",
        "forged-request-uid",
        "naive-signature-time",
        "invisible-signer-name",
    ],
)
def test_oversized_or_malformed_report_is_refused_with_a_clear_error(build, message):
    with pytest.raises(ValueError, match=message):
        build(dict(sample_report().__dict__))


def test_an_oversized_patient_field_is_refused_by_the_pdf():
    with pytest.raises(ValueError, match="patient field 'name'"):
        report_pdf(sample_report(), {**PATIENT, "name": "N" * 10**6})


def test_a_chapter_at_the_limit_is_accepted():
    report = sample_report()
    ReportContent(**{**report.__dict__, "results": "x" * MAX_TEXT_CHARS})


def test_encapsulated_pdf_refuses_bytes_that_are_not_a_pdf():
    with pytest.raises(ValueError, match="not a PDF"):
        make_encapsulated(study_evidence(), b"<html>not a pdf</html>")


@pytest.mark.parametrize("which", ["structured_report", "encapsulated_pdf"])
def test_evidence_from_two_studies_or_none_is_refused(which):
    two_studies = study_evidence(1) + study_evidence(1)
    for evidence, message in ((two_studies, "several studies"), ([], "no evidence")):
        with pytest.raises(ValueError, match=message):
            if which == "structured_report":
                make_sr(evidence, sample_report())
            else:
                make_encapsulated(evidence, report_pdf(sample_report(), PATIENT))


def test_forged_series_uid_is_refused():
    with pytest.raises(ValueError, match="not a valid series uid"):
        make_sr(study_evidence(), sample_report(), series_uid="1.2.3/../../etc")


def test_without_a_unicode_font_the_pdf_falls_back_to_helvetica(monkeypatch):
    """A machine without DejaVu still gets a valid PDF; what Latin-1 lacks is spelled
    out (œ -> oe, € -> EUR) rather than crashing the core font."""
    assert pdf_module.unicode_fonts() is not None  # scripts/run and scripts/test install it
    monkeypatch.setattr(pdf_module, "FONT_DIRS", ())
    assert pdf_module.unicode_fonts() is None
    text = words(pdf_text(report_pdf(sample_report(), PATIENT)))
    assert "Coeur des noyaux gris préservé. Coût : 0 EUR." in text
    assert "oedème papillaire" in text
    assert "Pr Louis Pasteur (lpasteur) le 02/04/2024 à 11:00" in text
    assert "fin é oe EUR" in words(pdf_text(report_pdf(hostile_report(), PATIENT)))
