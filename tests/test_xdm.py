"""IHE XDM packages: the layout of IHE_XDM.ZIP and its METADATA.XML, parsed
and checked against the structure of IHE ITI TF-3 (ebRIM 3.0
SubmitObjectsRequest), with the patient identified by the INS."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from datetime import UTC, datetime
from xml.etree import ElementTree as ET

import pytest

from archive.messaging import xdm

LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
NS = {"lcm": LCM, "rim": RIM}
NOW = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)
PDF = b"%PDF-1.7\n" + bytes(range(256)) * 40
CDA = b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"/>'
INS = "279035121518989"  # the ANS test INS
DOC_ENTRY_PATIENT = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DOC_ENTRY_UNIQUE = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
SET_PATIENT = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SET_UNIQUE = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SET_SOURCE = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
STABLE_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
FORMAT_CODE = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"


def _documents() -> list[xdm.Document]:
    return [
        xdm.Document(PDF, "application/pdf", "Compte rendu IRM genou", unique_id="1.2.3.4.5"),
        xdm.Document(CDA, "text/xml", "CR structuré"),
    ]


def _zip(patient: xdm.Patient, documents: list[xdm.Document] | None = None) -> zipfile.ZipFile:
    attachment = xdm.package(
        xdm.Submission(
            patient,
            documents or _documents(),
            author=xdm.Author(
                person="801234567^MARTIN^Claire^^^^^^&1.2.250.1.71.4.2.1&ISO",
                institution="CHU Martinique^^^^^&1.2.250.1.71.4.2.2&ISO^IDNST^^^1972000001",
            ),
            title="Compte rendu",
            recipients=["dr.x@cabinet.mssante.fr"],
            source_id="1.2.250.1.999.1",
            sender="IMAG test",
        ),
        now=NOW,
    )
    assert attachment.filename == "IHE_XDM.ZIP" and attachment.content_type == "application/zip"
    return zipfile.ZipFile(io.BytesIO(attachment.data))


def _slot(element: ET.Element, name: str) -> list[str]:
    for slot in element.findall("rim:Slot", NS):
        if slot.get("name") == name:
            return [v.text or "" for v in slot.findall("rim:ValueList/rim:Value", NS)]
    raise AssertionError(f"no slot {name}")


def _external(element: ET.Element, scheme: str) -> str:
    [found] = [
        e
        for e in element.findall("rim:ExternalIdentifier", NS)
        if e.get("identificationScheme") == scheme
    ]
    assert found.get("registryObject") == element.get("id")
    return found.get("value") or ""


def _classified(element: ET.Element, scheme: str) -> ET.Element:
    [found] = [
        c
        for c in element.findall("rim:Classification", NS)
        if c.get("classificationScheme") == scheme
    ]
    assert found.get("classifiedObject") == element.get("id")
    return found


def test_the_package_has_the_xdm_layout_with_8_3_names_and_the_documents_intact() -> None:
    archive = _zip(xdm.Patient(ins=INS, local_id="IPP42", local_issuer="1.2.250.1.71.4.2.2"))
    names = archive.namelist()
    assert names == [
        "README.TXT",
        "INDEX.HTM",
        "IHE_XDM/SUBSET01/METADATA.XML",
        "IHE_XDM/SUBSET01/DOC0001.PDF",
        "IHE_XDM/SUBSET01/DOC0002.XML",
    ]
    for name in names:  # ISO 9660 level 1: 8.3 upper-case names in each folder
        for part in name.split("/"):
            assert re.fullmatch(r"[A-Z0-9_]{1,8}(\.[A-Z0-9]{1,3})?", part), part
    assert archive.read("IHE_XDM/SUBSET01/DOC0001.PDF") == PDF
    assert archive.read("IHE_XDM/SUBSET01/DOC0002.XML") == CDA
    index = archive.read("INDEX.HTM").decode()
    assert 'href="IHE_XDM/SUBSET01/DOC0001.PDF"' in index and "CR structur" in index
    assert "IHE XDM" in archive.read("README.TXT").decode()
    assert archive.testzip() is None


def test_metadata_is_a_submit_objects_request_with_a_set_and_one_entry_per_document() -> None:
    archive = _zip(xdm.Patient(ins=INS, local_id="IPP42", local_issuer="1.2.250.1.71.4.2.2"))
    root = ET.fromstring(archive.read("IHE_XDM/SUBSET01/METADATA.XML"))
    assert root.tag == f"{{{LCM}}}SubmitObjectsRequest"
    objects = root.find("rim:RegistryObjectList", NS)
    assert objects is not None
    ins_cx = f"{INS}^^^&1.2.250.1.213.1.4.8&ISO"

    # the SubmissionSet: a RegistryPackage classified as one
    [package] = objects.findall("rim:RegistryPackage", NS)
    set_id = package.get("id")
    [node] = [
        c for c in objects.findall("rim:Classification", NS) if c.get("classifiedObject") == set_id
    ]
    assert node.get("classificationNode") == SET_NODE
    assert _slot(package, "submissionTime") == ["20260314092653"]
    assert _slot(package, "intendedRecipient") == ["|^^Internet^dr.x@cabinet.mssante.fr"]
    assert _external(package, SET_PATIENT) == ins_cx
    assert _external(package, SET_SOURCE) == "1.2.250.1.999.1"
    assert re.fullmatch(r"2\.25\.[0-9]+", _external(package, SET_UNIQUE))

    # one stable DocumentEntry per document, each a member of the set
    entries = objects.findall("rim:ExtrinsicObject", NS)
    assert len(entries) == 2
    members = {
        a.get("targetObject")
        for a in objects.findall("rim:Association", NS)
        if a.get("sourceObject") == set_id
        and a.get("associationType") == "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
    }
    assert members == {e.get("id") for e in entries}
    files = {"DOC0001.PDF": PDF, "DOC0002.XML": CDA}
    for entry, mime in zip(entries, ("application/pdf", "text/xml"), strict=True):
        assert entry.get("objectType") == STABLE_ENTRY and entry.get("mimeType") == mime
        [uri] = _slot(entry, "URI")
        data = files.pop(uri)
        assert archive.read(f"IHE_XDM/SUBSET01/{uri}") == data
        assert _slot(entry, "hash") == [hashlib.sha1(data).hexdigest()]
        assert _slot(entry, "size") == [str(len(data))]
        assert _slot(entry, "creationTime") == ["20260314092653"]
        assert _slot(entry, "sourcePatientId") == ["IPP42^^^&1.2.250.1.71.4.2.2&ISO"]
        assert _external(entry, DOC_ENTRY_PATIENT) == ins_cx  # filed by the INS
        assert _external(entry, DOC_ENTRY_UNIQUE)
        author = _classified(entry, AUTHOR)
        assert _slot(author, "authorPerson")[0].startswith("801234567^MARTIN^Claire")
        for scheme in (CLASS_CODE, TYPE_CODE, FORMAT_CODE):
            coded = _classified(entry, scheme)
            assert coded.get("nodeRepresentation") and _slot(coded, "codingScheme")
    assert not files
    assert _external(entries[0], DOC_ENTRY_UNIQUE) == "1.2.3.4.5"  # the one given is kept


def test_without_an_ins_the_patient_is_the_local_identifier_with_its_issuer() -> None:
    archive = _zip(xdm.Patient(local_id="IPP42", local_issuer="1.2.250.1.71.4.2.2"))
    root = ET.fromstring(archive.read("IHE_XDM/SUBSET01/METADATA.XML"))
    values = {
        e.get("value")
        for e in root.iter(f"{{{RIM}}}ExternalIdentifier")
        if e.get("identificationScheme") in (DOC_ENTRY_PATIENT, SET_PATIENT)
    }
    assert values == {"IPP42^^^&1.2.250.1.71.4.2.2&ISO"}
    named = _zip(xdm.Patient(local_id="IPP42", local_issuer="CHU-MARTINIQUE"))
    assert b"IPP42^^^CHU-MARTINIQUE" in named.read("IHE_XDM/SUBSET01/METADATA.XML")


@pytest.mark.parametrize(
    ("patient", "error"),
    [
        (xdm.Patient(), "INS or a local identifier"),
        (xdm.Patient(ins="2790351215189"), "15-character"),
        (xdm.Patient(ins=INS, ins_oid="1.2.3"), "not an INS OID"),
        (xdm.Patient(local_id="IPP^42"), "delimiter"),
    ],
)
def test_a_package_without_a_usable_patient_identifier_is_refused(
    patient: xdm.Patient, error: str
) -> None:
    with pytest.raises(xdm.XdmError, match=error):
        _zip(patient)


def test_an_empty_package_is_refused_and_unknown_types_get_a_bin_name() -> None:
    with pytest.raises(xdm.XdmError, match="at least one document"):
        xdm.build(xdm.Submission(xdm.Patient(ins=INS), []))
    archive = _zip(xdm.Patient(ins=INS), [xdm.Document(b"\x00\x01", "application/x-thing", "x")])
    assert "IHE_XDM/SUBSET01/DOC0001.BIN" in archive.namelist()
