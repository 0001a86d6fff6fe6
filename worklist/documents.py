"""A validated teleradiology report as DICOM documents: a structured report and an
Encapsulated PDF, ready for the archive's ingest in new series of the study.

Why two documents: the structured report (DICOM SR, TID 2000 "Basic Diagnostic Imaging
Report") is what reporting tools, PACS and the region's systems read as data (each chapter
under its coded heading, who verified it and when); the PDF is what people open and what
is mailed. Both carry the same text, cleaned once here (``clean_text``) so that neither
can be made invalid by what a reader typed or pasted.

A series has one Modality: the SR ("SR") and the PDF ("DOC") cannot share a series, so
the caller allocates two series (and UIDs) per validated version. Everything here is pure:
the same content and UIDs give the same bytes, so a retried storage job re-sends an
identical object, which the archive treats as an idempotent success.

The PDF itself is rendered by ``worklist.pdf.report_pdf``.
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian

from archive.uids import is_valid_uid

if TYPE_CHECKING:  # imported where used: importing highdicom costs ~0.5 s at every start
    import highdicom as hd

# What the API refuses (ValueError -> 400) rather than renders: a chapter or an addendum
# is at most 64 Ki characters (a long report is ~5,000; 64 Ki leaves room for pasted
# tables), the whole report with its addenda at most 256 Ki (~80 pages, a few seconds of
# PDF layout: fpdf2 lays out ~60,000 characters a second), a name or a request field is
# short, and a report has a bounded number of addenda.
MAX_TEXT_CHARS = 64 * 1024
MAX_REPORT_CHARS = 256 * 1024
MAX_FIELD_CHARS = 4 * 1024
MAX_NAME_CHARS = 256
MAX_ADDENDA = 50

# The reports' local time by default (callers pass the site's zone when it has another):
# what people read on the PDF and in the DICOM dates and times. Those DA/TM stay local
# as the study's own are; no Timezone Offset From UTC is declared, since it would also
# claim to apply to the study dates copied from the evidence. The DT values (verification,
# observation) carry their offset, so who signed when is never ambiguous.
REPORT_TIMEZONE = ZoneInfo("Europe/Paris")

# UPS Push SOP Class: the worklist item (a UPS) a report answers is referenced as the
# procedure step that produced its series (PS3.3: "a Modality or Unified Procedure Step").
UPS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.34.6.1"
ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")
MANUFACTURER = "IMAG"
# The SR's Verifying Organization is Type 1: when the caller names no institution, the
# archive that produced and holds the report answers for it rather than an empty value.
DEFAULT_VERIFYING_ORGANIZATION = MANUFACTURER

# PS3.16 CID 7000 / 7001 / 7002 (current edition: the headings are LOINC codes; the DCM
# 1210xx headings of earlier editions are their retired equivalents).
DOCUMENT_TITLE = codes.LN.DiagnosticImagingReport  # 18748-4
HEADING_INDICATIONS = codes.LN.IndicationsForProcedure  # 18785-6
HEADING_TECHNIQUE = codes.LN.CurrentProcedureDescriptions  # 55111-9
HEADING_FINDINGS = codes.LN.Findings  # 59776-5
HEADING_CONCLUSIONS = codes.LN.Conclusions  # 55110-1
HEADING_ADDENDUM = codes.LN.Addendum  # 55107-7
# the TEXT items' concept names (CID 7002 where it has one; the heading itself otherwise)
ELEMENT_INDICATIONS = codes.LN.IndicationsForProcedure
ELEMENT_TECHNIQUE = codes.DCM.ProcedureDescription  # 121065
ELEMENT_FINDINGS = codes.DCM.Finding  # 121071
ELEMENT_CONCLUSIONS = codes.DCM.Conclusion  # 121077
ELEMENT_ADDENDUM = codes.LN.Addendum
LANGUAGE_FRENCH = Code("fr", "RFC5646", "French")


@dataclass(frozen=True)
class Signed:
    """Who validated a text and when."""

    name: str  # the reader's display name as people read it ("Dr Marie Curie")
    user: str  # the account name (stable identifier)
    at: datetime  # aware datetime (UTC) of validation

    def __post_init__(self) -> None:
        if not isinstance(self.at, datetime) or self.at.utcoffset() is None:
            raise ValueError("a signature's time must be a timezone-aware datetime")
        for label, value in (("signer name", self.name), ("signer account", self.user)):
            if not isinstance(value, str) or not clean_line(value):
                raise ValueError(f"the {label} is empty")
            if len(value) > MAX_NAME_CHARS:
                raise ValueError(f"the {label} is longer than {MAX_NAME_CHARS} characters")


@dataclass(frozen=True)
class Addendum:
    """A later text added to a validated report, validated in turn by its own signer."""

    text: str
    signed: Signed

    def __post_init__(self) -> None:
        _check_text("addendum", self.text)


@dataclass(frozen=True)
class ReportContent:
    """A validated teleradiology report: the four chapters the French national
    teleradiology specification asks for (ANS volet téléradiologie: Indications,
    Technique, Résultats, Synthèse/Conclusion), who signed it, the request it answers,
    its addenda. Constructing one checks the size limits, so an oversized text is
    refused (ValueError) before anything is rendered or stored."""

    indications: str
    technique: str
    results: str
    conclusion: str
    signed: Signed
    # the read request's clinical fields, for the PDF header: requesting_physician,
    # requesting_site, clinical_context, question, anatomical_region, exam_type,
    # priority ("STAT" | "URGENT" | "ROUTINE"); any may be missing
    request: Mapping[str, Any]
    addenda: tuple[Addendum, ...] = ()
    request_uid: str = ""  # the worklist item (UPS) UID, referenced where DICOM allows

    def __post_init__(self) -> None:
        for chapter in ("indications", "technique", "results", "conclusion"):
            _check_text(chapter, getattr(self, chapter))
        if len(self.addenda) > MAX_ADDENDA:
            raise ValueError(f"a report has at most {MAX_ADDENDA} addenda")
        texts = (self.indications, self.technique, self.results, self.conclusion)
        total = sum(map(len, texts)) + sum(len(addendum.text) for addendum in self.addenda)
        if total > MAX_REPORT_CHARS:
            raise ValueError(
                f"the report and its addenda are {total} characters long; "
                f"at most {MAX_REPORT_CHARS} are accepted together"
            )
        for key, value in self.request.items():
            if value is not None and len(str(value)) > MAX_FIELD_CHARS:
                raise ValueError(
                    f"request field {key!r} is longer than {MAX_FIELD_CHARS} characters"
                )
        if self.request_uid and not is_valid_uid(self.request_uid):
            raise ValueError(f"not a valid request UID: {self.request_uid!r}")

    @property
    def signatures(self) -> tuple[Signed, ...]:
        """The report's signature then each addendum's, in order."""
        return (self.signed, *(addendum.signed for addendum in self.addenda))


def _check_text(label: str, text: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"the {label} must be text")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(
            f"the {label} is {len(text)} characters long; at most {MAX_TEXT_CHARS} are accepted"
        )


# Unicode categories dropped from what a reader typed: controls (other than line breaks),
# format characters (bidirectional overrides and isolates, zero-width characters: they
# can make a rendered text read differently from what it says), lone surrogates (not
# encodable), private-use and unassigned code points (no font draws them).
_DROPPED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}
_LINE_BREAKS = {"\r\n": "\n", "\r": "\n", "\u2028": "\n", "\u2029": "\n\n", "\x0c": "\n\n"}


def clean_text(text: str) -> str:
    """The text as both documents carry it: NFC-normalised, line breaks as LF, tabs as
    spaces, without the invisible or unencodable characters listed above.

    DICOM text values allow only CR, LF, FF and ESC among controls and PDF fonts have no
    glyph for them; the reader's words are kept, nothing is escaped (the PDF and DICOM
    encoders do that), so a text that looks like PDF or XML syntax stays literal text."""
    for old, new in _LINE_BREAKS.items():
        text = text.replace(old, new)
    text = text.replace("\t", "    ")
    kept = (
        char
        for char in unicodedata.normalize("NFC", text)
        if char == "\n" or unicodedata.category(char) not in _DROPPED_CATEGORIES
    )
    return "".join(kept).strip("\n")


def clean_line(text: str) -> str:
    """A one-line value (a name, a header field): ``clean_text`` with its line breaks
    and runs of spaces folded into single spaces."""
    return " ".join(clean_text(text).split())


def local_time(at: datetime, tz: tzinfo = REPORT_TIMEZONE) -> datetime:
    """``at`` in the reports' local time."""
    return at.astimezone(tz)


def _dicom_date_time(at: datetime, tz: tzinfo) -> tuple[str, str, str]:
    """(DA, TM, DT with offset) of ``at`` in local time, to the second."""
    local = local_time(at, tz)
    date, time = local.strftime("%Y%m%d"), local.strftime("%H%M%S")
    return date, time, f"{date}{time}{local:%z}"  # DT's offset suffix: "+HHMM"


def person_name(display_name: str) -> str:
    """A PN value for a display name ("Dr Marie Curie").

    The display name is what people read; splitting it into family and given names
    would guess wrong ("Jean de La Fontaine"), so it goes whole into the family-name
    component, cut to the 64 characters a component may hold, without the PN delimiters
    (``^ = \\``). The trailing caret says "one component, on purpose"."""
    name = clean_line(display_name)
    for delimiter in "^=\\":
        name = name.replace(delimiter, " ")
    return " ".join(name.split())[:64].rstrip() + "^"


def _long_string(label: str, value: str) -> str:
    value = clean_line(value).replace("\\", " ")  # a backslash separates LO values
    if len(value) > 64:
        raise ValueError(f"the {label} is longer than 64 characters (DICOM LO)")
    return value


def _check_uids(**uids: str) -> None:
    for label, uid in uids.items():
        if not is_valid_uid(uid):
            raise ValueError(f"not a valid {label.replace('_', ' ')}: {uid!r}")


def _check_evidence(evidence: Sequence[Dataset]) -> str:
    """The one study the evidence belongs to: a report is about exactly one study."""
    if not evidence:
        raise ValueError("no evidence: the report's study instances are needed")
    studies = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(studies) != 1:
        raise ValueError("the evidence spans several studies; a report is about one study")
    return studies.pop()


def _observer(signed: Signed, institution: str) -> hd.sr.ObservationContext:
    """TID 1001 / 1002 / 1003: the person who wrote and signed, by name and account."""
    import highdicom as hd

    return hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=person_name(signed.name),
                login_name=clean_line(signed.user),
                organization_name=institution or None,
            ),
        )
    )


def _section(heading: Code, element: Code, text: str) -> hd.sr.ContainerContentItem:
    """A TID 2000 section: a heading CONTAINER holding the chapter's TEXT."""
    import highdicom as hd

    section = hd.sr.ContainerContentItem(
        name=heading, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    section.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=element,
                value=clean_text(text),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return section


def _addendum_section(
    addendum: Addendum, institution: str, tz: tzinfo
) -> hd.sr.ContainerContentItem:
    """An Addendum section with its own author and time (Observation DateTime differs
    from the document's Content Date/Time, so PS3.3 requires it on the item)."""
    import highdicom as hd

    section = _section(HEADING_ADDENDUM, ELEMENT_ADDENDUM, addendum.text)
    section.ObservationDateTime = _dicom_date_time(addendum.signed.at, tz)[2]
    section.ContentSequence = hd.sr.ContentSequence(
        [*_observer(addendum.signed, institution), *section.ContentSequence]
    )
    return section


def _report_tree(
    content: ReportContent, institution: str, tz: tzinfo
) -> hd.sr.ContainerContentItem:
    import highdicom as hd

    root = hd.sr.ContainerContentItem(name=DOCUMENT_TITLE, template_id="2000")
    chapters = (
        (HEADING_INDICATIONS, ELEMENT_INDICATIONS, content.indications),
        (HEADING_TECHNIQUE, ELEMENT_TECHNIQUE, content.technique),
        (HEADING_FINDINGS, ELEMENT_FINDINGS, content.results),
        (HEADING_CONCLUSIONS, ELEMENT_CONCLUSIONS, content.conclusion),
    )
    root.ContentSequence = hd.sr.ContentSequence(
        [
            *hd.sr.LanguageOfContentItemAndDescendants(LANGUAGE_FRENCH),
            *_observer(content.signed, institution),
            *(_section(*chapter) for chapter in chapters),
            *(_addendum_section(a, institution, tz) for a in content.addenda),
        ]
    )
    return root


def _ups_reference(request_uid: str) -> list[Dataset]:
    if not request_uid:
        return []
    item = Dataset()
    item.ReferencedSOPClassUID = UPS_SOP_CLASS_UID
    item.ReferencedSOPInstanceUID = request_uid
    return [item]


def _stamp_times(ds: Dataset, content_at: datetime, created_at: datetime, tz: tzinfo) -> None:
    """Content Date/Time from the validation, Instance Creation (and highdicom's
    Contribution DateTime) from the version's last signature: not the clock at
    rendering, so a re-run gives the same dataset."""
    ds.ContentDate, ds.ContentTime, _ = _dicom_date_time(content_at, tz)
    ds.InstanceCreationDate, ds.InstanceCreationTime, created = _dicom_date_time(created_at, tz)
    for equipment in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = created


def structured_report(
    evidence: Sequence[Dataset],
    content: ReportContent,
    *,
    series_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    institution: str = "",
    previous_versions: Sequence[Dataset] = (),
    tz: tzinfo = REPORT_TIMEZONE,
) -> Dataset:
    """The report as a Comprehensive SR following TID 2000, verified by its signer(s).

    ``evidence``: headers of the study's instances; the patient and study modules come
    from them (highdicom) and they are listed as the current requested procedure's
    evidence. ``previous_versions``: the SR(s) this version supersedes (an earlier
    version without the latest addendum), referenced as predecessor documents.
    ``institution``: who verifies, as an organization (also the Institution Name and
    the observers' organization); without one the Verifying Organization, Type 1, is
    :data:`DEFAULT_VERIFYING_ORGANIZATION`. Comprehensive rather than Basic Text SR
    because highdicom builds the former through its public API; the content uses only
    what a Basic Text SR allows."""
    import highdicom as hd

    _check_evidence(evidence)
    _check_uids(series_uid=series_uid, sop_instance_uid=sop_instance_uid)
    institution = _long_string("institution", institution)
    organization = institution or DEFAULT_VERIFYING_ORGANIZATION  # Type 1: never empty
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence),
        content=_report_tree(content, institution, tz),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        is_verified=True,
        institution_name=institution or None,
        verifying_observer_name=person_name(content.signed.name),
        verifying_organization=organization,
        previous_versions=list(previous_versions) or None,
        series_description="Compte rendu de téléradiologie",
        specific_character_set="ISO_IR 192",
    )
    # one verifier per signature: the report's and each addendum's, at their own times
    verifiers = []
    for signed in content.signatures:
        verifier = Dataset()
        verifier.VerifyingObserverName = person_name(signed.name)
        verifier.VerifyingObserverIdentificationCodeSequence = []
        verifier.VerifyingOrganization = organization
        verifier.VerificationDateTime = _dicom_date_time(signed.at, tz)[2]
        verifiers.append(verifier)
    sr.VerifyingObserverSequence = verifiers
    sr.ReferencedPerformedProcedureStepSequence = _ups_reference(content.request_uid)
    _stamp_times(sr, content.signed.at, content.signatures[-1].at, tz)
    return sr


def encapsulated_pdf(
    evidence: Sequence[Dataset],
    pdf: bytes,
    *,
    series_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    title: str,
    signed: Signed,
    request_uid: str = "",
    institution: str = "",
    tz: tzinfo = REPORT_TIMEZONE,
) -> Dataset:
    """The PDF as an Encapsulated PDF instance (Modality DOC) of the evidence's study.

    ``signed``: who validated the version this PDF renders and when (the report's
    signature, or its latest addendum's); it dates the document."""
    import highdicom as hd

    _check_evidence(evidence)
    _check_uids(series_uid=series_uid, sop_instance_uid=sop_instance_uid)
    if request_uid:
        _check_uids(request_uid=request_uid)
    if not bytes(pdf[:5]) == b"%PDF-":
        raise ValueError("the document is not a PDF (no %PDF- header)")
    institution = _long_string("institution", institution)
    title = clean_line(title)
    if not title or len(title) > 1024:
        raise ValueError("a document title is 1 to 1024 characters (DICOM ST)")
    ds = hd.SOPClass(
        study_instance_uid=evidence[0].StudyInstanceUID,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=ENCAPSULATED_PDF_STORAGE,
        instance_number=instance_number,
        modality="DOC",
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        institution_name=institution or None,
        series_description=title[:64],
        specific_character_set="ISO_IR 192",
    )
    ds.copy_patient_and_study_information(evidence[0])
    ds.ConversionType = "WSD"  # SC Equipment: made on a workstation
    if request_uid:  # Type 3 here: absent rather than empty
        ds.ReferencedPerformedProcedureStepSequence = _ups_reference(request_uid)
    _stamp_times(ds, signed.at, signed.at, tz)
    ds.AcquisitionDateTime = _dicom_date_time(signed.at, tz)[2]
    ds.BurnedInAnnotation = "YES"  # the PDF names the patient
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(DOCUMENT_TITLE)]
    ds.VerificationFlag = "VERIFIED"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    document = bytes(pdf)
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + b"\x00" * (len(document) % 2)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """Part-10 file bytes (Explicit VR Little Endian) for the archive's ingest."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()
