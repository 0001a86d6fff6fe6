"""A reading request as a UPS workitem (DICOM JSON), and a UPS dataset sent by
a client as the request it asks for.

Both directions live here so that what UPS-RS shows and what it accepts are
one mapping, documented once.  The clinical fields of a request (the national
specification's exam request, :data:`worklist.requests.FIELDS`) sit where
DICOM has an attribute for them; where it has none, in UPS's own place for
"what the performer needs": the Scheduled Processing Parameters Sequence
(0074,1210), as coded content items.

==========================  =================================================================
request field               workitem attribute
==========================  =================================================================
requesting_physician        ReferencedRequestSequence > RequestingPhysician (0032,1032)
question                    ReferencedRequestSequence > ReasonForTheRequestedProcedure
                            (0040,1002)
exam_type                   ReferencedRequestSequence > RequestedProcedureDescription
                            (0032,1060)
previous_results            ReferencedRequestSequence > ImagingServiceRequestComments
                            (0040,2400)
clinical_context            AdditionalPatientHistory (0010,21B0)
contraindications           MedicalAlerts (0010,2000)
anatomical_region           ScheduledProcessingParametersSequence: TEXT item, concept
                            (123014, DCM, "Target Region") -- Anatomic Region Sequence is
                            coded, the request's region is free text
patient_consent             ScheduledProcessingParametersSequence: CODE item, concept
                            (122004, DCM, "Patient informed consent given"), value
                            (373066001, SCT, "Yes")
study_uid                   InputInformationSequence > StudyInstanceUID (and
                            ReferencedRequestSequence > StudyInstanceUID)
priority                    ScheduledProcedureStepPriority (0074,1200): HIGH = STAT,
                            MEDIUM = URGENT, LOW = ROUTINE
due_at                      ExpectedCompletionDateTime (0040,4011)
created_at                  ScheduledProcedureStepStartDateTime (0040,4005)
updated_at                  ScheduledProcedureStepModificationDateTime (0040,4010)
group                       WorklistLabel (0074,1202)
site                        ReferencedRequestSequence > RequestingService (0032,1033)
performer                   ScheduledHumanPerformersSequence (0040,4034), while held
cancel request              ProcedureStepProgressInformationSequence (0074,1002) >
                            ProcedureStepCancellationDateTime, ReasonForCancellation
==========================  =================================================================

The task is coded (110005, DCM, "Interpretation") in the Scheduled Workitem
Code Sequence; the patient module comes from the archive's index (the
patient of the study), never from the client.  The Transaction UID is never
shown (PS3.18 11.5: it is the holder's lock, and the holder made it).  Dates
are written in UTC with their offset; a date-time a client sends must carry
its offset (or the dataset a Timezone Offset From UTC): the sites are in
several time zones, and a local time would be ambiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import DT

from archive.uids import is_valid_uid
from worklist.requests import ReadRequest
from worklist.ups import PRIORITIES, SCHEDULED, UPS_PRIORITY_TO_NAME

#: Unified Procedure Step - Push SOP Class: the workitems' SOP Class UID
UPS_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.1"
INTERPRETATION = ("110005", "DCM", "Interpretation")
TARGET_REGION = ("123014", "DCM", "Target Region")
CONSENT = ("122004", "DCM", "Patient informed consent given")
YES = ("373066001", "SCT", "Yes")
NO = ("373067005", "SCT", "No")
#: the local coding scheme of the archive's accounts (human performers)
ACCOUNTS_SCHEME = "99IMAG"

#: where each request field is in a workitem (for the problems a 400 lists)
ATTRIBUTE_OF = {
    "requesting_physician": "ReferencedRequestSequence>RequestingPhysician (0032,1032)",
    "question": "ReferencedRequestSequence>ReasonForTheRequestedProcedure (0040,1002)",
    "exam_type": "ReferencedRequestSequence>RequestedProcedureDescription (0032,1060)",
    "previous_results": "ReferencedRequestSequence>ImagingServiceRequestComments (0040,2400)",
    "clinical_context": "AdditionalPatientHistory (0010,21B0)",
    "contraindications": "MedicalAlerts (0010,2000)",
    "anatomical_region": "ScheduledProcessingParametersSequence>(123014, DCM, Target Region)",
    "patient_consent": "ScheduledProcessingParametersSequence>(122004, DCM, Patient informed "
    "consent given) = (373066001, SCT, Yes)",
    "study_uid": "InputInformationSequence>StudyInstanceUID (0020,000D)",
    "priority": "ScheduledProcedureStepPriority (0074,1200)",
    "due_at": "ExpectedCompletionDateTime (0040,4011)",
    "uid": "SOPInstanceUID (0008,0018)",
}
#: the request's text fields in the Referenced Request Sequence item
_IN_REQUEST = {
    "requesting_physician": "RequestingPhysician",
    "question": "ReasonForTheRequestedProcedure",
    "exam_type": "RequestedProcedureDescription",
    "previous_results": "ImagingServiceRequestComments",
}
#: ... and at the top level of the workitem
_TOP = {"clinical_context": "AdditionalPatientHistory", "contraindications": "MedicalAlerts"}
#: the top-level attributes the request fields are read from
FIELD_KEYWORDS = frozenset(
    {*_TOP.values(), "ReferencedRequestSequence", "ScheduledProcessingParametersSequence"}
)
LABELS = {"read": "Teleradiology reading", "expertise": "Tele-expertise"}


class DatasetInvalid(ValueError):
    """A UPS dataset that cannot be taken as sent (HTTP 400): ``problems``,
    attribute -> what is wrong, every one at once."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.problems.items()))


@dataclass(frozen=True)
class Patient:
    """The patient of a request's study, as the archive's index has it."""

    name: str = ""
    patient_id: str = ""
    issuer: str = ""
    birth_date: str = ""
    sex: str = ""
    accession_number: str = ""


# -- a request as a workitem -------------------------------------------------------------------


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    code, scheme, meaning = value
    if len(code) > 16:  # SH: a longer code is a Long Code Value (UC)
        item.LongCodeValue = code
    else:
        item.CodeValue = code
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning[:64]
    return item


def dicom_datetime(value: datetime) -> str:
    """A DT value in UTC with its offset (``YYYYMMDDHHMMSS.FFFFFF+0000``)."""
    return value.astimezone(UTC).strftime("%Y%m%d%H%M%S.%f") + "+0000"


def workitem(item: ReadRequest, patient: Patient | None, retrieve_url: str) -> Dataset:
    """The request as a UPS workitem (without its Transaction UID)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UPS_SOP_CLASS
    ds.SOPInstanceUID = item.uid
    patient = patient or Patient()
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    fields = item.fields
    for name, keyword in _TOP.items():
        if fields.get(name):
            setattr(ds, keyword, fields[name])
    ds.ProcedureStepState = item.state
    ds.ScheduledProcedureStepPriority = PRIORITIES[item.priority]
    ds.WorklistLabel = item.group or ""
    label = LABELS.get(item.kind, "Reading")
    if fields.get("exam_type"):
        label = f"{label}: {fields['exam_type']}"
    ds.ProcedureStepLabel = label[:64]
    ds.InputReadinessState = "READY"
    ds.ScheduledProcedureStepStartDateTime = dicom_datetime(item.created_at)
    ds.ExpectedCompletionDateTime = dicom_datetime(item.due_at)
    ds.ScheduledProcedureStepModificationDateTime = dicom_datetime(item.updated_at)
    ds.ScheduledWorkitemCodeSequence = Sequence([_code(INTERPRETATION)])
    ds.ScheduledProcessingParametersSequence = Sequence(_parameters(fields))
    source = Dataset()
    source.TypeOfInstances = "DICOM"
    source.StudyInstanceUID = item.study_uid
    source.RetrieveURL = retrieve_url
    ds.InputInformationSequence = Sequence([source])
    ds.ReferencedRequestSequence = Sequence([_request_item(item, patient)])
    if item.performer:
        performer = Dataset()
        performer.HumanPerformerCodeSequence = Sequence(
            [_code((item.performer, ACCOUNTS_SCHEME, item.performer))]
        )
        performer.HumanPerformerName = item.performer
        performer.HumanPerformerOrganization = (item.group or "")[:64]
        ds.ScheduledHumanPerformersSequence = Sequence([performer])
    if item.cancel_requested_at is not None:
        progress = Dataset()
        progress.ProcedureStepCancellationDateTime = dicom_datetime(item.cancel_requested_at)
        progress.ReasonForCancellation = item.cancel_reason
        progress.ContactDisplayName = item.cancel_requested_by or ""
        ds.ProcedureStepProgressInformationSequence = Sequence([progress])
    return ds


def _parameters(fields: Mapping[str, Any]) -> list[Dataset]:
    items = []
    if fields.get("anatomical_region"):
        region = Dataset()
        region.ValueType = "TEXT"
        region.ConceptNameCodeSequence = Sequence([_code(TARGET_REGION)])
        region.TextValue = fields["anatomical_region"]
        items.append(region)
    if fields.get("patient_consent") is True:
        consent = Dataset()
        consent.ValueType = "CODE"
        consent.ConceptNameCodeSequence = Sequence([_code(CONSENT)])
        consent.ConceptCodeSequence = Sequence([_code(YES)])
        items.append(consent)
    return items


def _request_item(item: ReadRequest, patient: Patient) -> Dataset:
    request = Dataset()
    request.StudyInstanceUID = item.study_uid
    request.AccessionNumber = patient.accession_number
    request.RequestedProcedureID = ""
    request.RequestingService = item.site
    for name, keyword in _IN_REQUEST.items():
        value = item.fields.get(name)
        if value:
            setattr(request, keyword, value)
    if "RequestedProcedureDescription" not in request:
        request.RequestedProcedureDescription = ""
    return request


# -- a client's dataset as a request -----------------------------------------------------------


@dataclass
class Asked:
    """What a client's UPS dataset asks: the clinical fields it carries
    (only those present), and for a creation the study, priority, due time
    and UID; ``ignored`` names what it sent that the archive decides itself
    (answered with a warning: the workitem was created with modifications)."""

    fields: dict[str, Any] = field(default_factory=dict)
    study_uid: str | None = None
    priority: str | None = None
    due_at: datetime | None = None
    uid: str | None = None
    state: str | None = None
    transaction_uid: str | None = None
    ignored: list[str] = field(default_factory=list)


def _refuse_bulk(*_args: Any) -> bytes:
    raise ValueError("bulk data URIs are not accepted in a workitem")


def parse_json(body: Any) -> Dataset:
    """The one dataset of a DICOM JSON body (an object, or an array of one)."""
    if isinstance(body, list):
        if len(body) != 1:
            raise DatasetInvalid({"body": "one dataset (a DICOM JSON object, or an array of one)"})
        body = body[0]
    if not isinstance(body, dict):
        raise DatasetInvalid({"body": "a DICOM JSON object"})
    try:
        ds = Dataset.from_json(body, bulk_data_uri_handler=_refuse_bulk)
        for element in ds.iterall():  # decoding is lazy: a wrong value shows here
            _ = element.value
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad JSON
        raise DatasetInvalid({"body": f"not a valid DICOM JSON dataset: {exc}"}) from None
    return ds


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _one(ds: Dataset, keyword: str, problems: dict[str, str]) -> Dataset | None:
    items = ds.get(keyword)
    if not items:
        return None
    if len(items) > 1:
        problems[keyword] = "one item"
    return items[0]


def _coded(item: Dataset, keyword: str) -> tuple[str, str] | None:
    codes = item.get(keyword)
    if not codes:
        return None
    code = codes[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
    return (str(value or ""), str(code.get("CodingSchemeDesignator", "")))


def fields_of(ds: Dataset, problems: dict[str, str]) -> dict[str, Any]:
    """The request fields a dataset carries (only those present: an update
    changes what it names; an empty value clears)."""
    fields: dict[str, Any] = {}
    for name, keyword in _TOP.items():
        if keyword in ds:
            fields[name] = _text(ds[keyword].value)
    request = _one(ds, "ReferencedRequestSequence", problems)
    if request is not None:
        for name, keyword in _IN_REQUEST.items():
            if keyword in request:
                fields[name] = _text(request[keyword].value)
    for item in ds.get("ScheduledProcessingParametersSequence") or []:
        concept = _coded(item, "ConceptNameCodeSequence")
        if concept == TARGET_REGION[:2]:
            fields["anatomical_region"] = _text(item.get("TextValue"))
        elif concept == CONSENT[:2]:
            answer = _coded(item, "ConceptCodeSequence")
            if answer not in (YES[:2], NO[:2]):
                problems[ATTRIBUTE_OF["patient_consent"]] = "coded Yes or No"
            fields["patient_consent"] = answer == YES[:2]
    return fields


def _when(ds: Dataset, keyword: str, problems: dict[str, str]) -> datetime | None:
    """A DT attribute as an aware date-time (its offset, or the dataset's
    Timezone Offset From UTC); a local time without either is refused."""
    raw = ds.get(keyword)
    if raw in (None, ""):
        return None
    try:
        value = raw if isinstance(raw, DT) else DT(str(raw))
    except ValueError:
        problems[keyword] = "a DICOM date-time (YYYYMMDDHHMMSS&ZZXX)"
        return None
    if value.tzinfo is None:
        offset = str(ds.get("TimezoneOffsetFromUTC") or "")
        if len(offset) != 5 or offset[0] not in "+-" or not offset[1:].isdigit():
            problems[keyword] = "a date-time with its UTC offset (&ZZXX), or a dataset with "
            problems[keyword] += "Timezone Offset From UTC (0008,0201)"
            return None
        sign = 1 if offset[0] == "+" else -1
        minutes = sign * (int(offset[1:3]) * 60 + int(offset[3:5]))
        zone = timezone(timedelta(minutes=minutes))
        return datetime(*value.timetuple()[:6], value.microsecond, tzinfo=zone)
    return datetime.fromisoformat(value.isoformat())


def _uid(value: Any, keyword: str, problems: dict[str, str]) -> str | None:
    text = _text(value).strip()
    if not text:
        return None
    if not is_valid_uid(text):
        problems[keyword] = "a DICOM UID: digits and dots, at most 64 characters"
        return None
    return text


def asked_by(ds: Dataset, *, creating: bool) -> Asked:
    """What a Create (``creating``) or an Update dataset asks for, every
    fault at once (:class:`DatasetInvalid`)."""
    problems: dict[str, str] = {}
    asked = Asked(fields=fields_of(ds, problems))
    sop_class = _text(ds.get("SOPClassUID")).strip()
    if sop_class and sop_class != UPS_SOP_CLASS:
        problems["SOPClassUID"] = f"a workitem is a UPS ({UPS_SOP_CLASS})"
    asked.uid = _uid(ds.get("SOPInstanceUID"), "SOPInstanceUID", problems)
    asked.transaction_uid = _uid(ds.get("TransactionUID"), "TransactionUID", problems)
    state = _text(ds.get("ProcedureStepState")).strip()
    asked.state = state or None
    if creating:
        if state and state != SCHEDULED:
            problems["ProcedureStepState"] = "a workitem is created SCHEDULED"
        if asked.transaction_uid:
            problems["TransactionUID"] = "absent: a workitem is created unclaimed"
        studies = set()
        source = _one(ds, "InputInformationSequence", problems)
        request = _one(ds, "ReferencedRequestSequence", problems)
        for item, name in (
            (source, "InputInformationSequence"),
            (request, "ReferencedRequestSequence"),
        ):
            if item is not None:
                uid = _uid(item.get("StudyInstanceUID"), f"{name}>StudyInstanceUID", problems)
                if uid:
                    studies.add(uid)
        if len(studies) > 1:
            problems[ATTRIBUTE_OF["study_uid"]] = "one study (the input and the request differ)"
        asked.study_uid = next(iter(studies)) if len(studies) == 1 else None
        priority = _text(ds.get("ScheduledProcedureStepPriority")).strip().upper()
        if priority and priority not in UPS_PRIORITY_TO_NAME:
            problems[ATTRIBUTE_OF["priority"]] = "HIGH, MEDIUM or LOW"
        asked.priority = UPS_PRIORITY_TO_NAME.get(priority or "LOW")
        asked.due_at = _when(ds, "ExpectedCompletionDateTime", problems)
        asked.ignored = [
            keyword
            for keyword in (
                "WorklistLabel",
                "ScheduledProcedureStepStartDateTime",
                "ScheduledHumanPerformersSequence",
                "PatientName",
                "PatientID",
            )
            if ds.get(keyword) not in (None, "", [])
        ]
    elif state:
        problems["ProcedureStepState"] = "changed by PUT {workitem}/state, not by an update"
    if problems:
        raise DatasetInvalid(problems)
    return asked


def problems_as_attributes(problems: Mapping[str, str]) -> dict[str, str]:
    """The domain's problems (request field -> reason) named as the workitem's attributes."""
    return {ATTRIBUTE_OF.get(name, name): reason for name, reason in problems.items()}
