"""IHE XDM packages (``IHE_XDM.ZIP``): documents with their XDS metadata, as
health-professional secure messaging (MSSanté) attaches them.

Layout (IHE ITI TF-1 XDM, ITI TF-3 4.2; MSSanté Référentiel #2)::

    README.TXT                          who made the package, what it holds
    INDEX.HTM                           a page listing and linking the documents
    IHE_XDM/SUBSET01/METADATA.XML       lcm:SubmitObjectsRequest (ebRIM 3.0)
    IHE_XDM/SUBSET01/DOC0001.PDF ...    the documents, ISO 9660 8.3 names

METADATA.XML holds one SubmissionSet (``rim:RegistryPackage`` classified as
such, with its uniqueId, sourceId, patientId, submission time, author and
content type) and one DocumentEntry (``rim:ExtrinsicObject``) per document
with its uniqueId, patientId, MIME type, SHA-1 hash and size of the bytes in
the package, creation time, author, classCode, typeCode, formatCode,
confidentiality and language, and its URI (the 8.3 file name, relative to
METADATA.XML); HasMember associations tie the entries to the set.

The patient is identified by the INS when it is known, as the receiver files
the documents by it: ``matricule^^^&1.2.250.1.213.1.4.8&ISO`` (the OID of the
INS kind); else by the local identifier with its assigning authority.
"""

from __future__ import annotations

import hashlib
import html
import io
import re
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.etree import ElementTree as ET

from archive.messaging.message import Attachment

FILENAME = "IHE_XDM.ZIP"
SUBSET = "IHE_XDM/SUBSET01"
METADATA = f"{SUBSET}/METADATA.XML"

LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"

#: INS OIDs (ANS): NIR, NIA, and the test / demo NIR of test configurations
INS_NIR = "1.2.250.1.213.1.4.8"
INS_NIA = "1.2.250.1.213.1.4.9"
INS_OIDS = (INS_NIR, INS_NIA, "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11")

# ebRIM identifiers of the XDS metadata model (ITI TF-3 4.2.5, table 4.2.5-1)
DOCUMENT_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"  # stable DocumentEntry
SUBMISSION_SET = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
DOC_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DOC_CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DOC_CONFIDENTIALITY = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DOC_FORMAT_CODE = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DOC_FACILITY_TYPE = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
DOC_PRACTICE_SETTING = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
DOC_TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DOC_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DOC_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
SET_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
SET_CONTENT_TYPE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SET_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SET_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SET_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
CLASSIFICATION = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
EXTERNAL_ID = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"

#: 8.3 extensions by MIME type (anything else: .BIN)
EXTENSIONS = {
    "application/pdf": "PDF",
    "text/xml": "XML",
    "application/xml": "XML",
    "application/hl7-v3+xml": "XML",
    "text/plain": "TXT",
    "text/html": "HTM",
    "image/jpeg": "JPG",
    "image/png": "PNG",
    "application/dicom": "DCM",
    "text/rtf": "RTF",
}


@dataclass(frozen=True)
class Code:
    """A coded value: code, coding scheme (an OID or a name), display name."""

    code: str
    scheme: str
    display: str


#: defaults, overridable per document: a diagnostic imaging report (LOINC)
IMAGING_REPORT = Code("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")
#: the MIME type is enough to read the document (IHE format code)
MIME_SUFFICIENT = Code(
    "urn:ihe:iti:xds:2017:mimeTypeSufficient", "1.3.6.1.4.1.19376.1.2.3", "Mime type sufficient"
)
NORMAL = Code("N", "2.16.840.1.113883.5.25", "Normal")


class XdmError(ValueError):
    """The package cannot be made as asked (no document, no patient...)."""


@dataclass(frozen=True)
class Patient:
    """Who the documents are about.  ``ins``: the INS matricule when known
    (with the OID of its kind); else ``local_id`` with its assigning authority
    ``local_issuer`` (an OID, or a name).  Name, birth date (YYYYMMDD) and sex
    go to sourcePatientInfo."""

    ins: str | None = None
    ins_oid: str = INS_NIR
    local_id: str | None = None
    local_issuer: str | None = None
    family_name: str = ""
    given_name: str = ""
    birth_date: str = ""
    sex: str = ""

    def patient_id(self) -> str:
        """The CX value of patientId: the INS when known, else the local ID."""
        if self.ins:
            if self.ins_oid not in INS_OIDS:
                raise XdmError(f"{self.ins_oid!r} is not an INS OID ({', '.join(INS_OIDS)})")
            if not re.fullmatch(r"[0-9]{5}[0-9AB][0-9]{9}", self.ins):
                raise XdmError(f"INS {self.ins!r} is not a 15-character matricule")
            return f"{self.ins}^^^&{self.ins_oid}&ISO"
        if self.local_id:
            return _cx(self.local_id, self.local_issuer)
        raise XdmError("the patient needs an INS or a local identifier")

    def source_patient_id(self) -> str:
        """sourcePatientId: the local identifier when there is one, else the INS."""
        if self.local_id:
            return _cx(self.local_id, self.local_issuer)
        return self.patient_id()


def _cx(value: str, issuer: str | None) -> str:
    _plain(value, "a patient identifier")
    if not issuer:
        return value
    _plain(issuer, "an issuer")
    if re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
        return f"{value}^^^&{issuer}&ISO"
    return f"{value}^^^{issuer}"


def _plain(value: str, what: str) -> str:
    if re.search(r"[\^&~|\\\x00-\x1f]", value):
        raise XdmError(f"{what} {value!r} contains an HL7 delimiter or control character")
    return value


@dataclass(frozen=True)
class Author:
    """The author of the documents: a person (HL7 XCN, e.g.
    ``8001234567^DUPONT^Jean^^^^^^&1.2.250.1.71.4.2.1&ISO``), their
    institution (XON), role and specialty; empty parts are left out."""

    person: str = ""
    institution: str = ""
    role: str = ""
    specialty: str = ""

    def slots(self) -> list[tuple[str, list[str]]]:
        found = [
            ("authorPerson", self.person),
            ("authorInstitution", self.institution),
            ("authorRole", self.role),
            ("authorSpecialty", self.specialty),
        ]
        return [(name, [value]) for name, value in found if value]


@dataclass
class Document:
    """One document to package."""

    data: bytes
    mime_type: str
    title: str
    class_code: Code = IMAGING_REPORT
    type_code: Code = IMAGING_REPORT
    format_code: Code = MIME_SUFFICIENT
    confidentiality: Code = NORMAL
    language: str = "fr-FR"
    #: XDS uniqueId (an OID); a new 2.25 UUID-derived one when not given
    unique_id: str | None = None
    creation_time: datetime | None = None
    facility_type: Code | None = None
    practice_setting: Code | None = None
    #: the file name the document had (shown in INDEX.HTM)
    original_name: str = ""


@dataclass
class Submission:
    """The package as a whole: patient, author, documents, who it goes to."""

    patient: Patient
    documents: Sequence[Document]
    author: Author = field(default_factory=Author)
    #: the sending system's OID (sourceId)
    source_id: str = ""
    title: str = ""
    content_type: Code = IMAGING_REPORT
    recipients: Sequence[str] = ()
    unique_id: str | None = None
    sender: str = "IMAG"


def new_oid() -> str:
    """A new OID, unique without a registered root (ITU-T X.667: 2.25.<UUID>)."""
    return f"2.25.{uuid.uuid4().int}"


def source_oid(system: str) -> str:
    """A stable OID for a sending system without a registered one: the same
    name gives the same sourceId in every package (2.25.<name-based UUID>)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'imag:' + system).int}"


def short_name(index: int, mime_type: str) -> str:
    """The 8.3 name of the ``index``-th document (1-based): DOC0001.PDF."""
    if not 1 <= index <= 9999:
        raise XdmError("an XDM subset holds at most 9999 documents")
    return f"DOC{index:04d}.{EXTENSIONS.get(mime_type.lower(), 'BIN')}"


def _hl7_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y%m%d%H%M%S")


def package(submission: Submission, *, now: datetime | None = None) -> Attachment:
    """The ``IHE_XDM.ZIP`` attachment of ``submission``."""
    return Attachment(FILENAME, "application/zip", build(submission, now=now))


def build(submission: Submission, *, now: datetime | None = None) -> bytes:
    """The bytes of ``IHE_XDM.ZIP`` (see the module's docstring)."""
    if not submission.documents:
        raise XdmError("an XDM package needs at least one document")
    now = now or datetime.now(UTC)
    names = [short_name(i, d.mime_type) for i, d in enumerate(submission.documents, 1)]
    metadata = metadata_xml(submission, names, now=now)
    buffer = io.BytesIO()
    stamp = now.astimezone(UTC).timetuple()[:6]
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:

        def add(name: str, data: bytes) -> None:
            archive.writestr(zipfile.ZipInfo(name, date_time=stamp), data, zipfile.ZIP_DEFLATED)

        add("README.TXT", readme(submission, names, now).encode("utf-8"))
        add("INDEX.HTM", index_htm(submission, names).encode("utf-8"))
        add(METADATA, metadata)
        for name, document in zip(names, submission.documents, strict=True):
            add(f"{SUBSET}/{name}", document.data)
    return buffer.getvalue()


def readme(submission: Submission, names: Sequence[str], now: datetime) -> str:
    lines = [
        "IHE XDM package (IHE IT Infrastructure Technical Framework, XDM profile)",
        f"Made by: {submission.sender}",
        f"Made on: {now.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC",
        f"Documents: {len(names)}, in {SUBSET}, described in {METADATA}",
        "",
        "Contents:",
    ]
    lines += [
        f"  {SUBSET}/{name}  {doc.mime_type}  {doc.title}"
        for name, doc in zip(names, submission.documents, strict=True)
    ]
    return "\r\n".join(lines) + "\r\n"


def index_htm(submission: Submission, names: Sequence[str]) -> str:
    items = "\n".join(
        f'<li><a href="{SUBSET}/{name}">{html.escape(doc.title)}</a> '
        f"({html.escape(doc.mime_type)}, {len(doc.data)} bytes)</li>"
        for name, doc in zip(names, submission.documents, strict=True)
    )
    title = html.escape(submission.title or "Documents")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{title}</title></head>\n<body><h1>{title}</h1>\n"
        f"<p>Sent by {html.escape(submission.sender)}. Metadata: "
        f'<a href="{METADATA}">{METADATA}</a></p>\n<ul>\n{items}\n</ul>\n</body></html>\n'
    )


# -- METADATA.XML --------------------------------------------------------------------------

ET.register_namespace("lcm", LCM)
ET.register_namespace("rim", RIM)


def _r(tag: str) -> str:
    return f"{{{RIM}}}{tag}"


def _slot(parent: ET.Element, name: str, values: Sequence[str]) -> None:
    slot = ET.SubElement(parent, _r("Slot"), name=name)
    value_list = ET.SubElement(slot, _r("ValueList"))
    for value in values:
        ET.SubElement(value_list, _r("Value")).text = value


def _name(parent: ET.Element, text: str) -> None:
    name = ET.SubElement(parent, _r("Name"))
    ET.SubElement(name, _r("LocalizedString"), value=text)


def _classification(
    parent: ET.Element, ident: str, scheme: str, target: str, code: Code | None = None
) -> ET.Element:
    """A coded attribute (``code`` given) or an author (empty node representation)."""
    element = ET.SubElement(
        parent,
        _r("Classification"),
        id=ident,
        objectType=CLASSIFICATION,
        classificationScheme=scheme,
        classifiedObject=target,
        nodeRepresentation=code.code if code else "",
    )
    if code is not None:
        _slot(element, "codingScheme", [code.scheme])
        _name(element, code.display)
    return element


def _external_id(
    parent: ET.Element, ident: str, scheme: str, target: str, value: str, name: str
) -> None:
    element = ET.SubElement(
        parent,
        _r("ExternalIdentifier"),
        id=ident,
        objectType=EXTERNAL_ID,
        identificationScheme=scheme,
        registryObject=target,
        value=value,
    )
    _name(element, name)


def metadata_xml(submission: Submission, names: Sequence[str], *, now: datetime) -> bytes:
    """The lcm:SubmitObjectsRequest of the package."""
    patient_id = submission.patient.patient_id()
    source_patient = submission.patient.source_patient_id()
    root = ET.Element(f"{{{LCM}}}SubmitObjectsRequest")
    objects = ET.SubElement(root, _r("RegistryObjectList"))
    counter = iter(range(1, 10**6))

    def ident(prefix: str) -> str:
        return f"{prefix}{next(counter):04d}"

    entries = []
    for index, (name, doc) in enumerate(zip(names, submission.documents, strict=True), 1):
        entry_id = f"Document{index:04d}"
        entries.append(entry_id)
        entry = ET.SubElement(
            objects,
            _r("ExtrinsicObject"),
            id=entry_id,
            mimeType=doc.mime_type,
            objectType=DOCUMENT_ENTRY,
            status=APPROVED,
        )
        created = doc.creation_time or now
        info = [f"PID-3|{source_patient}"]
        if submission.patient.family_name or submission.patient.given_name:
            info.append(
                f"PID-5|{_plain(submission.patient.family_name, 'a name')}^"
                f"{_plain(submission.patient.given_name, 'a name')}"
            )
        if submission.patient.birth_date:
            info.append(f"PID-7|{_plain(submission.patient.birth_date, 'a birth date')}")
        if submission.patient.sex:
            info.append(f"PID-8|{_plain(submission.patient.sex, 'a sex')}")
        for slot_name, values in (
            ("creationTime", [_hl7_time(created)]),
            ("hash", [hashlib.sha1(doc.data).hexdigest()]),
            ("languageCode", [doc.language]),
            ("size", [str(len(doc.data))]),
            ("sourcePatientId", [source_patient]),
            ("sourcePatientInfo", info),
            ("URI", [name]),
        ):
            _slot(entry, slot_name, values)
        _name(entry, doc.title)
        author = submission.author.slots()
        if author:
            element = _classification(entry, ident("cl"), DOC_AUTHOR, entry_id)
            for slot_name, values in author:
                _slot(element, slot_name, values)
        coded = [
            (DOC_CLASS_CODE, doc.class_code),
            (DOC_CONFIDENTIALITY, doc.confidentiality),
            (DOC_FORMAT_CODE, doc.format_code),
            (DOC_FACILITY_TYPE, doc.facility_type),
            (DOC_PRACTICE_SETTING, doc.practice_setting),
            (DOC_TYPE_CODE, doc.type_code),
        ]
        for scheme, code in coded:
            if code is not None:
                _classification(entry, ident("cl"), scheme, entry_id, code)
        _external_id(
            entry, ident("ei"), DOC_PATIENT_ID, entry_id, patient_id, "XDSDocumentEntry.patientId"
        )
        _external_id(
            entry,
            ident("ei"),
            DOC_UNIQUE_ID,
            entry_id,
            doc.unique_id or new_oid(),
            "XDSDocumentEntry.uniqueId",
        )

    set_id = "SubmissionSet01"
    package_element = ET.SubElement(objects, _r("RegistryPackage"), id=set_id, status=APPROVED)
    _slot(package_element, "submissionTime", [_hl7_time(now)])
    if submission.recipients:
        _slot(
            package_element,
            "intendedRecipient",
            [f"|^^Internet^{_plain(r, 'a recipient')}" for r in submission.recipients],
        )
    _name(package_element, submission.title or "Documents")
    author = submission.author.slots()
    if author:
        element = _classification(package_element, ident("cl"), SET_AUTHOR, set_id)
        for slot_name, values in author:
            _slot(element, slot_name, values)
    _classification(package_element, ident("cl"), SET_CONTENT_TYPE, set_id, submission.content_type)
    _external_id(
        package_element,
        ident("ei"),
        SET_UNIQUE_ID,
        set_id,
        submission.unique_id or new_oid(),
        "XDSSubmissionSet.uniqueId",
    )
    _external_id(
        package_element,
        ident("ei"),
        SET_SOURCE_ID,
        set_id,
        submission.source_id or source_oid(submission.sender),
        "XDSSubmissionSet.sourceId",
    )
    _external_id(
        package_element,
        ident("ei"),
        SET_PATIENT_ID,
        set_id,
        patient_id,
        "XDSSubmissionSet.patientId",
    )
    ET.SubElement(
        objects,
        _r("Classification"),
        id=ident("cl"),
        objectType=CLASSIFICATION,
        classifiedObject=set_id,
        classificationNode=SUBMISSION_SET,
    )
    for entry_id in entries:
        association = ET.SubElement(
            objects,
            _r("Association"),
            id=ident("as"),
            associationType=HAS_MEMBER,
            sourceObject=set_id,
            targetObject=entry_id,
            objectType="urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Association",
        )
        _slot(association, "SubmissionSetStatus", ["Original"])
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)
