"""DICOMweb as clients use it: dicomweb-client, raw HTTP, pynetdicom's C-FIND
and Orthanc's DICOMweb plugin against a real ``imag serve`` on SQLite and on
PostgreSQL.  The data are the generated mixed set (CT, MR, MG, US, CR, DX, XA,
OT; explicit / implicit / big endian / deflated / RLE / JPEG 2000 lossless;
Latin-1 and UTF-8 names; one PatientID under two issuers) plus a Latin-1
study whose series carries Performed Procedure Step start date and time.

Not covered here (another piece of work): WADO-RS frames, rendered and
thumbnail resources, WADO-URI."""

from __future__ import annotations

import http.client
import io
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive.synthetic import (
    StudySpec,
    generate_mixed_set,
    make_instance,
    modality_preset,
    write_study,
)
from tests.dicomnet import assert_same_instance
from tests.httpserver import HttpImag, free_port, running_imag
from tests.inprocess import serving_in_process
from tests.s3server import StoreUnderTest, index_for_store

# the DICOMweb paths meet the store alike on any index: S3 on SQLite only here
# (PostgreSQL + S3: test_dicomweb_s3, test_several_nodes)
pytestmark = pytest.mark.s3_on_sqlite

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOM = "application/dicom"
PROBLEM = "application/problem+json"

# -- the data --------------------------------------------------------------------------------

PPS_DATE, PPS_TIME = "20240705", "083000"


def extra_study() -> StudySpec:
    """A Latin-1 producer's CÔTÉ (the mixed set's CÔTÉ^Zoé is UTF-8), whose
    series carries the Performed Procedure Step attributes QIDO-RS matches on."""
    return StudySpec(
        patient_id="IMAG0006",
        patient_name="CÔTÉ^Jean",
        issuer_of_patient_id="CLINIQUE_SUD",
        birth_date="19800101",
        sex="M",
        study_description="Scanner cérébral",
        accession_number="ACC6001",
        study_date="20240705",
        study_time="083000",
        referring_physician="MARTIN^Paul",
        institution_name="Clinique Sud",
        charset="ISO_IR 100",
        study_id="6",
        series=[
            modality_preset("CT", rows=32, columns=32, instances=3, series_description="Crâne")
        ],
    )


@dataclass
class Corpus:
    specs: list[StudySpec]  # the mixed set, then the extra study
    files: dict[str, Path]  # every file STOW-RS sends at the start, by SOP Instance UID
    late: Path  # one more instance of the extra study's series, stored by the cache test

    @property
    def extra(self) -> StudySpec:
        return self.specs[-1]


def _with_pps(ds: Dataset) -> Dataset:
    ds.PerformedProcedureStepStartDate = PPS_DATE
    ds.PerformedProcedureStepStartTime = PPS_TIME
    return ds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    folder = tmp_path_factory.mktemp("corpus")
    specs = generate_mixed_set(folder / "set", seed=11)
    extra = extra_study()
    for path in write_study(extra, folder / "set", seed=11):
        _with_pps(pydicom.dcmread(path)).save_as(path, enforce_file_format=True)
    late = folder / "late.dcm"
    _with_pps(make_instance(extra, 0, 3, rng=np.random.default_rng(3))).save_as(
        late, enforce_file_format=True
    )
    files = {str(header(p).SOPInstanceUID): p for p in sorted((folder / "set").iterdir())}
    return Corpus([*specs, extra], files, late)


@cache
def header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


# -- the archive under test: one per index backend, the corpus stored once --------------------


@pytest.fixture(scope="module")
def index_url(module_index_url: str, module_store: StoreUnderTest) -> str:
    """One index per backend and object store for the whole module (conftest's
    is per test): a server on S3 never sees rows of objects in a folder."""
    return index_for_store(module_index_url, module_store)


@dataclass
class Imag:
    server: HttpImag
    client: DICOMwebClient
    stored: dict[str, Path]  # what the archive holds, by SOP Instance UID
    first_stow: Dataset  # the answer to the STOW-RS of the corpus

    @property
    def base(self) -> str:
        return self.server.dicomweb

    def headers(self) -> list[Dataset]:
        return [header(p) for p in self.stored.values()]

    def studies(self) -> dict[str, list[Dataset]]:
        return _group(self.headers(), "StudyInstanceUID")

    def series(self) -> dict[str, list[Dataset]]:
        return _group(self.headers(), "SeriesInstanceUID")

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return self.server.http.get(self.base + path, timeout=60, **kwargs)  # type: ignore[arg-type]

    def instance_uids(self) -> list[str]:
        """Every SOP Instance UID QIDO-RS finds, in its order."""
        return [value(i, "SOPInstanceUID") for i in self.client.search_for_instances()]


def _group(headers: list[Dataset], keyword: str) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for h in headers:
        out.setdefault(str(h[keyword].value), []).append(h)
    return out


@pytest.fixture(scope="module")
def imag(
    index_url: str,
    corpus: Corpus,
    module_store: StoreUnderTest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Imag]:
    """One server per index and per object store (a folder, an S3 bucket whose
    bodies cannot seek), the corpus stored once through STOW-RS."""
    # DICOM is on for the QIDO-RS / C-FIND comparison, which needs the same data
    with running_imag(
        tmp_path_factory.mktemp("imag"),
        index_url=index_url,
        dicom=True,
        settings=module_store.settings(),
    ) as server:
        client = server.client()
        answer = client.store_instances([pydicom.dcmread(p) for p in corpus.files.values()])
        yield Imag(server, client, dict(corpus.files), answer)
    assert "Traceback" not in server.log(), server.log()[-5000:]  # no request failed with a 500


# -- helpers ---------------------------------------------------------------------------------


def tag_of(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


def values(item: dict, keyword: str) -> list:
    """The values of an attribute in a DICOM JSON object (PN as its Alphabetic form)."""
    out = item.get(tag_of(keyword), {}).get("Value") or []
    return [v.get("Alphabetic") if isinstance(v, dict) else v for v in out]


def value(item: dict, keyword: str) -> object:
    found = values(item, keyword)
    return found[0] if found else None


def text(ds: Dataset, keyword: str) -> str | None:
    """An attribute of a stored header as QIDO-RS answers it (None when empty)."""
    elem = ds.get(keyword)
    return str(elem) if elem not in (None, "") else None


def multipart(parts: list[tuple[str, bytes]], boundary: str = "imag-test-3f2a") -> bytes:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
        for ctype, data in parts
    )
    return body + f"--{boundary}--\r\n".encode()


def stow(imag: Imag, parts: list[tuple[str, bytes]], study: str | None = None) -> requests.Response:
    """POST a multipart/related STOW-RS request built here, byte for byte."""
    path = "/studies" + (f"/{study}" if study else "")
    return imag.server.http.post(
        imag.base + path,
        data=multipart(parts),
        headers={"Content-Type": f'multipart/related; type="{DICOM}"; boundary=imag-test-3f2a'},
        timeout=60,
    )


def parts_of(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer: (headers, body bytes)."""
    ctype = response.headers["Content-Type"]
    assert ctype.startswith("multipart/related"), ctype
    boundary = re.search(r'boundary="?([^";]+)"?', ctype).group(1).encode()  # type: ignore
    out = []
    for chunk in response.content.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk.partition(b"\r\n\r\n")
        fields = [line.split(":", 1) for line in head.decode().strip().splitlines()]
        assert body.endswith(b"\r\n"), "a part must end with CRLF before the delimiter"
        out.append(({k.strip().lower(): v.strip() for k, v in fields}, body[:-2]))
    return out


def assert_problem(response: requests.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith(PROBLEM), response.headers
    body = response.json()
    assert body["status"] == status
    for word in words:
        assert word in body["detail"], (word, body["detail"])
    return body


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def fresh_copy(path: Path) -> Dataset:
    """A stored file as a new instance (a new SOP Instance UID)."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def study_of(imag: Imag, predicate: Callable[[Dataset], bool]) -> str:
    """The first study (in corpus order) with an instance matching ``predicate``."""
    for uid, headers in imag.studies().items():
        if any(predicate(h) for h in headers):
            return uid
    raise AssertionError("no study matches")


def syntax(h: Dataset) -> str:
    return str(h.file_meta.TransferSyntaxUID)


# -- 1. STOW-RS of the corpus ----------------------------------------------------------------


def test_stow_stores_the_mixed_set_and_answers_every_instance_with_its_url(
    imag: Imag, corpus: Corpus
) -> None:
    answer = imag.first_stow
    assert "FailedSOPSequence" not in answer
    referenced = {str(i.ReferencedSOPInstanceUID): i for i in answer.ReferencedSOPSequence}
    assert set(referenced) == set(corpus.files)
    for sop, item in referenced.items():
        h = header(corpus.files[sop])
        assert item.ReferencedSOPClassUID == h.SOPClassUID
        assert item.RetrieveURL == (
            f"{imag.base}/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}/instances/{sop}"
        )
    assert set(corpus.files) <= set(imag.instance_uids())


def test_stow_of_the_same_instances_again_is_an_idempotent_success(
    imag: Imag, corpus: Corpus
) -> None:
    before = imag.client.search_for_studies()
    uids_before = imag.instance_uids()
    answer = stow(imag, [(DICOM, p.read_bytes()) for p in corpus.files.values()])
    assert answer.status_code == 200, answer.text[:500]
    again = Dataset.from_json(answer.json())
    assert "FailedSOPSequence" not in again
    assert {str(i.ReferencedSOPInstanceUID) for i in again.ReferencedSOPSequence} == set(
        corpus.files
    )
    assert imag.instance_uids() == uids_before
    assert imag.client.search_for_studies() == before  # counts included


# -- 2. QIDO-RS ------------------------------------------------------------------------------


def test_qido_every_search_path_answers_what_was_stored(imag: Imag, corpus: Corpus) -> None:
    client = imag.client
    studies, series = imag.studies(), imag.series()
    found = {value(s, "StudyInstanceUID"): s for s in client.search_for_studies()}
    assert set(found) == set(studies)
    late_stored = str(header(corpus.late).SOPInstanceUID) in imag.stored
    for spec in corpus.specs:  # what the generator was asked for
        item = found[spec.study_uid]
        assert value(item, "PatientName") == spec.patient_name
        assert value(item, "PatientID") == spec.patient_id
        assert value(item, "IssuerOfPatientID") == spec.issuer_of_patient_id
        assert value(item, "StudyDate") == spec.study_date
        assert value(item, "AccessionNumber") == spec.accession_number
        assert value(item, "StudyDescription") == spec.study_description
        assert set(values(item, "ModalitiesInStudy")) == {s.modality for s in spec.series}
        assert value(item, "NumberOfStudyRelatedSeries") == len(spec.series)
        late = 1 if spec is corpus.extra and late_stored else 0
        assert value(item, "NumberOfStudyRelatedInstances") == spec.instance_count + late
    for study_uid, headers in studies.items():
        h, item = headers[0], found[study_uid]
        for keyword in (
            "PatientName",
            "PatientID",
            "IssuerOfPatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "ReferringPhysicianName",
            "StudyID",
            "StudyDescription",
        ):
            assert value(item, keyword) == text(h, keyword), (keyword, study_uid)
        assert sorted(values(item, "ModalitiesInStudy")) == sorted({x.Modality for x in headers})
        in_study = {str(x.SeriesInstanceUID) for x in headers}
        assert value(item, "NumberOfStudyRelatedSeries") == len(in_study)
        assert value(item, "NumberOfStudyRelatedInstances") == len(headers)
        assert value(item, "RetrieveURL") == f"{imag.base}/studies/{study_uid}"

        # /studies/{study}/series
        answered = {
            value(s, "SeriesInstanceUID"): s
            for s in client.search_for_series(study_instance_uid=study_uid)
        }
        assert set(answered) == in_study
        for series_uid, s in answered.items():
            members = series[series_uid]
            assert value(s, "Modality") == members[0].Modality
            assert value(s, "SeriesNumber") == int(members[0].SeriesNumber)
            assert value(s, "SeriesDescription") == text(members[0], "SeriesDescription")
            assert value(s, "NumberOfSeriesRelatedInstances") == len(members)
            # /studies/{study}/series/{series}/instances
            instances = client.search_for_instances(
                study_instance_uid=study_uid, series_instance_uid=series_uid
            )
            assert {value(i, "SOPInstanceUID") for i in instances} == {
                str(m.SOPInstanceUID) for m in members
            }
            for i in instances:
                m = next(m for m in members if m.SOPInstanceUID == value(i, "SOPInstanceUID"))
                assert value(i, "SOPClassUID") == m.SOPClassUID
                assert value(i, "InstanceNumber") == int(m.InstanceNumber)
                assert value(i, "NumberOfFrames") == (
                    int(m.NumberOfFrames) if "NumberOfFrames" in m else None
                )
        # /studies/{study}/instances
        assert {
            value(i, "SOPInstanceUID")
            for i in client.search_for_instances(study_instance_uid=study_uid)
        } == {str(x.SOPInstanceUID) for x in headers}

    # /series and /instances
    all_series = client.search_for_series()
    assert {value(s, "SeriesInstanceUID") for s in all_series} == set(series)
    assert all(value(s, "StudyInstanceUID") for s in all_series)
    assert set(imag.instance_uids()) == set(imag.stored)


# level, query parameters (a value may depend on the corpus), which stored headers match
Row = tuple[str, dict[str, object], Callable[[Dataset, Corpus], bool]]


def _uids(*indexes: int) -> Callable[[Corpus], str]:
    return lambda c: ",".join(str(c.specs[i].study_uid) for i in indexes)


def _series_uid(c: Corpus) -> str:
    return str(c.specs[1].series[1].series_uid)


def _some_instance(c: Corpus) -> str:
    return next(iter(c.files))


MATCHING: dict[str, Row] = {
    "StudyDate single": (
        "studies",
        {"StudyDate": "20240402"},
        lambda h, c: h.StudyDate == "20240402",
    ),
    "StudyDate range": (
        "studies",
        {"StudyDate": "20240101-20240331"},
        lambda h, c: "20240101" <= h.StudyDate <= "20240331",
    ),
    "StudyDate open start": (
        "studies",
        {"StudyDate": "-20240402"},
        lambda h, c: h.StudyDate <= "20240402",
    ),
    "StudyDate open end": (
        "studies",
        {"StudyDate": "20240601-"},
        lambda h, c: h.StudyDate >= "20240601",
    ),
    "StudyTime single": ("studies", {"StudyTime": "091500"}, lambda h, c: h.StudyTime == "091500"),
    "StudyTime range": (
        "studies",
        {"StudyTime": "08-10"},
        lambda h, c: "080000" <= h.StudyTime <= "105959",
    ),
    "AccessionNumber": (
        "studies",
        {"AccessionNumber": "ACC1001"},
        lambda h, c: h.AccessionNumber == "ACC1001",
    ),
    "AccessionNumber wildcard": (
        "studies",
        {"AccessionNumber": "ACC1*"},
        lambda h, c: h.AccessionNumber.startswith("ACC1"),
    ),
    "ModalitiesInStudy": ("studies", {"ModalitiesInStudy": "MR"}, lambda h, c: h.Modality == "MR"),
    "ModalitiesInStudy list": (
        "studies",
        {"ModalitiesInStudy": "CT,MG"},
        lambda h, c: h.Modality in ("CT", "MG"),
    ),
    "ReferringPhysicianName any case": (
        "studies",
        {"ReferringPhysicianName": "schäfer*"},
        lambda h, c: str(h.ReferringPhysicianName).startswith("SCHÄFER"),
    ),
    "PatientName exact": (
        "studies",
        {"PatientName": "MÜLLER^Hans"},
        lambda h, c: str(h.PatientName) == "MÜLLER^Hans",
    ),
    "PatientName ? wildcard": (
        "studies",
        {"PatientName": "M?LLER*"},
        lambda h, c: str(h.PatientName).startswith("MÜLLER"),
    ),
    "PatientID under two issuers": (
        "studies",
        {"PatientID": "IMAG0002"},
        lambda h, c: h.PatientID == "IMAG0002",
    ),
    "PatientID and issuer": (
        "studies",
        {"PatientID": "IMAG0002", "IssuerOfPatientID": "CLINIQUE_SUD"},
        lambda h, c: h.PatientID == "IMAG0002" and h.IssuerOfPatientID == "CLINIQUE_SUD",
    ),
    "StudyInstanceUID": (
        "studies",
        {"StudyInstanceUID": _uids(2)},
        lambda h, c: h.StudyInstanceUID == c.specs[2].study_uid,
    ),
    "StudyInstanceUID list": (
        "studies",
        {"StudyInstanceUID": _uids(0, 3, 5)},
        lambda h, c: h.StudyInstanceUID in _uids(0, 3, 5)(c).split(","),
    ),
    "StudyID": ("studies", {"StudyID": "6"}, lambda h, c: h.StudyID == "6"),
    "Modality": ("series", {"Modality": "MR"}, lambda h, c: h.Modality == "MR"),
    "SeriesInstanceUID": (
        "series",
        {"SeriesInstanceUID": _series_uid},
        lambda h, c: h.SeriesInstanceUID == _series_uid(c),
    ),
    "SeriesNumber": ("series", {"SeriesNumber": "2"}, lambda h, c: h.SeriesNumber == 2),
    "PerformedProcedureStepStartDate": (
        "series",
        {"PerformedProcedureStepStartDate": PPS_DATE},
        lambda h, c: h.get("PerformedProcedureStepStartDate") == PPS_DATE,
    ),
    "PerformedProcedureStepStartDate range": (
        "series",
        {"PerformedProcedureStepStartDate": "20240701-20240731"},
        lambda h, c: "20240701" <= h.get("PerformedProcedureStepStartDate", "") <= "20240731",
    ),
    "PerformedProcedureStepStartTime": (
        "series",
        {"PerformedProcedureStepStartTime": PPS_TIME},
        lambda h, c: h.get("PerformedProcedureStepStartTime") == PPS_TIME,
    ),
    "study key at the series level": (
        "series",
        {"PatientName": "côté*"},
        lambda h, c: str(h.PatientName).startswith("CÔTÉ"),
    ),
    "SOPClassUID": (
        "instances",
        {"SOPClassUID": CTImageStorage},
        lambda h, c: h.SOPClassUID == CTImageStorage,
    ),
    "SOPClassUID list": (
        "instances",
        {"SOPClassUID": f"{CTImageStorage},{MRImageStorage}"},
        lambda h, c: h.SOPClassUID in (CTImageStorage, MRImageStorage),
    ),
    "SOPInstanceUID": (
        "instances",
        {"SOPInstanceUID": _some_instance},
        lambda h, c: h.SOPInstanceUID == _some_instance(c),
    ),
    "InstanceNumber": ("instances", {"InstanceNumber": "3"}, lambda h, c: h.InstanceNumber == 3),
    "series key at the instance level": (
        "instances",
        {"Modality": "US", "InstanceNumber": "1"},
        lambda h, c: h.Modality == "US" and h.InstanceNumber == 1,
    ),
}
UNIQUE = {
    "studies": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
    "instances": "SOPInstanceUID",
}


@pytest.mark.parametrize("row", MATCHING, ids=str)
def test_qido_matches_each_required_key_by_keyword_and_by_tag(
    imag: Imag, corpus: Corpus, row: str
) -> None:
    level, raw, predicate = MATCHING[row]
    params = {k: v(corpus) if callable(v) else v for k, v in raw.items()}
    unique = UNIQUE[level]
    expected = {str(h[unique].value) for h in imag.headers() if predicate(h, corpus)}
    assert expected, "the row matches nothing stored: the test data changed"
    search = getattr(imag.client, f"search_for_{level}")
    by_keyword = search(search_filters=params)
    by_tag = search(search_filters={tag_of(k): v for k, v in params.items()})
    assert {value(i, unique) for i in by_keyword} == expected
    assert {value(i, unique) for i in by_tag} == expected
    for item in by_keyword:  # the matching keys are returned
        for keyword in params:
            assert tag_of(keyword) in item, keyword


def test_qido_includefield_adds_attributes_by_keyword_tag_list_and_all(imag: Imag) -> None:
    client = imag.client
    h = header(next(iter(imag.stored.values())))
    filters = {"StudyInstanceUID": str(h.StudyInstanceUID)}
    for fields in (["InstitutionName"], ["00080080"], ["InstitutionName", "StationName"]):
        (study,) = client.search_for_studies(search_filters=filters, fields=fields)
        assert value(study, "InstitutionName") == h.InstitutionName, fields
    (study,) = client.search_for_studies(
        search_filters=filters, additional_params={"includefield": "00080080,StationName"}
    )
    assert value(study, "InstitutionName") == h.InstitutionName
    assert tag_of("StationName") in study  # asked for: present, even if not indexed
    (study,) = client.search_for_studies(search_filters=filters, fields=["all"])
    assert value(study, "InstitutionName") == h.InstitutionName
    series = client.search_for_series(
        search_filters={"SeriesInstanceUID": str(h.SeriesInstanceUID)}, fields=["all"]
    )
    (s,) = series
    for keyword in ("StudyDate", "PatientName", "InstitutionName", "SeriesDescription"):
        assert value(s, keyword) == text(h, keyword), keyword
    assert value(s, "BodyPartExamined") == text(h, "BodyPartExamined")


def test_qido_accepts_fuzzymatching_and_answers_as_without_it(imag: Imag) -> None:
    filters = {"PatientName": "müller*"}
    plain = imag.client.search_for_studies(search_filters=filters)
    assert len(plain) == 2
    assert imag.client.search_for_studies(search_filters=filters, fuzzymatching=True) == plain
    assert imag.client.search_for_studies(search_filters=filters, fuzzymatching=False) == plain


def test_qido_limit_and_offset_page_through_with_a_warning_when_cut(imag: Imag) -> None:
    everything = imag.instance_uids()
    total = len(everything)
    assert total > 20
    paged: list[str] = []
    for offset in range(0, total, 7):
        answer = imag.get("/instances", params={"limit": 7, "offset": offset})
        assert answer.status_code == 200
        page = [value(i, "SOPInstanceUID") for i in answer.json()]
        assert len(page) == min(7, total - offset)
        cut = offset + 7 < total
        assert ("Warning" in answer.headers) == cut, (offset, answer.headers)
        if cut:
            assert answer.headers["Warning"].startswith("299 ")
        paged += page
    assert paged == everything
    past = imag.get("/instances", params={"offset": total})
    assert past.status_code == 200 and past.json() == [] and "Warning" not in past.headers
    whole = imag.get("/instances", params={"limit": total})
    assert len(whole.json()) == total and "Warning" not in whole.headers
    # a real client's paging (offset by offset until an empty page)
    remaining = imag.client.search_for_instances(limit=5, get_remaining=True)
    assert [value(i, "SOPInstanceUID") for i in remaining] == everything


# -- 3. percent-encoding and character sets --------------------------------------------------


def raw_get(imag: Imag, target: str) -> tuple[int, object]:
    """GET with the request target sent exactly as written (no client re-encoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", imag.server.http_port, timeout=30)
    try:
        headers = {
            "Accept": "application/dicom+json",
            "Authorization": f"Bearer {imag.server.token}",
        }
        conn.request("GET", "/dicom-web" + target, headers=headers)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, json.loads(body) if body else None


def names(answer: object) -> set[str]:
    assert isinstance(answer, list), answer
    return {value(s, "PatientName") for s in answer}


def study_uids(answer: object) -> set[str]:
    assert isinstance(answer, list), answer
    return {value(s, "StudyInstanceUID") for s in answer}


def test_qido_answers_the_same_whatever_the_percent_encoding(imag: Imag, corpus: Corpus) -> None:
    variants = {
        "wildcard": [
            "/studies?PatientName=M*",
            "/studies?PatientName=M%2A",
            "/studies?PatientName=M%2a",
            "/studies?00100010=M%2A",
            "/studies?PatientName=m%2A",
        ],
        "caret": [
            "/studies?PatientName=M%C3%9CLLER^Hans",
            "/studies?PatientName=M%C3%9CLLER%5EHans",
            "/studies?PatientName=m%C3%BCller%5ehans",
            "/studies?%50atientName=M%C3%9CLLER%5EHans",  # an encoded character in the key
        ],
        # form encoding, as dicomweb-client's quote_plus sends it: "+" is a space
        "space": [
            "/studies?PatientName=NGUY%E1%BB%84N^Th%E1%BB%8B%20Thu",
            "/studies?PatientName=NGUY%E1%BB%84N^Th%E1%BB%8B+Thu",
        ],
    }
    for name, targets in variants.items():
        answers = [raw_get(imag, t) for t in targets]
        assert all(status == 200 for status, _ in answers), (name, answers)
        first = study_uids(answers[0][1])
        assert first, name
        for target, (_, answer) in zip(targets, answers, strict=True):
            assert study_uids(answer) == first, target
    assert names(raw_get(imag, variants["caret"][0])[1]) == {"MÜLLER^Hans"}
    assert names(raw_get(imag, variants["space"][0])[1]) == {"NGUYỄN^Thị Thu"}
    # %2B is a literal plus, not a space
    assert raw_get(imag, "/studies?PatientName=NGUY%E1%BB%84N^Th%E1%BB%8B%2BThu") == (200, [])

    uids = [str(corpus.specs[i].study_uid) for i in (0, 4)]
    comma = raw_get(imag, f"/studies?StudyInstanceUID={uids[0]},{uids[1]}")
    encoded = raw_get(imag, f"/studies?StudyInstanceUID={uids[0]}%2C{uids[1]}")
    assert comma[0] == encoded[0] == 200
    assert study_uids(comma[1]) == study_uids(encoded[1]) == set(uids)


def test_qido_finds_latin1_and_utf8_producers_names_by_accented_and_case_folded_queries(
    imag: Imag, corpus: Corpus
) -> None:
    latin1 = header(next(p for p in corpus.files.values() if header(p).PatientID == "IMAG0006"))
    assert latin1.SpecificCharacterSet == "ISO_IR 100"
    both = {"CÔTÉ^Zoé", "CÔTÉ^Jean"}  # UTF-8 (ISO_IR 192) and Latin-1 (ISO_IR 100) producers
    for query in ("CÔTÉ*", "côté*", "Côté^*", "*ÔTÉ*"):
        found = imag.client.search_for_studies(search_filters={"PatientName": query})
        assert names(found) == both, query
    for target in ("/studies?PatientName=C%C3%94T%C3%89*", "/studies?PatientName=c%C3%B4t%C3%A9*"):
        status, answer = raw_get(imag, target)
        assert status == 200 and names(answer) == both, target
    # a Latin-1 byte sequence in the URL is not UTF-8: it matches nobody (and breaks nothing)
    status, answer = raw_get(imag, "/studies?PatientName=C%D4T%C9*")
    assert status in (200, 400) and (status == 400 or answer == [])


# -- 4. bad requests -------------------------------------------------------------------------

# unknown parameters and attributes are ignored with a Warning (PS3.18 8.3.4),
# not refused: see tests/test_dicomweb_http.py
BAD_QUERIES = [
    ("/studies?StudyDate=2026-13-45", "StudyDate"),
    ("/studies?StudyDate=2026-01-01", "StudyDate"),
    ("/studies?StudyTime=9am", "StudyTime"),
    ("/studies?limit=-1", "limit"),
    ("/studies?limit=abc", "limit"),
    ("/studies?offset=-1", "offset"),
    ("/studies?fuzzymatching=maybe", "fuzzymatching"),
    ("/studies?Modality=CT", "Modality"),  # a series key at the study level
    ("/series?SeriesNumber=two", "SeriesNumber"),
    ("/studies?StudyInstanceUID=1.2.3,x.y", "x.y"),
    ("/studies/1.2.3.abc/series", "1.2.3.abc"),
    ("/studies/{study}/series/not-a-uid/instances", "not-a-uid"),
    ("/studies/1.2.3.abc", "1.2.3.abc"),  # WADO-RS
    ("/studies/{study}/series/x..y/metadata", "x..y"),
]


@pytest.mark.parametrize(("target", "named"), BAD_QUERIES, ids=[t for t, _ in BAD_QUERIES])
def test_a_bad_request_is_refused_with_a_problem_naming_it_and_changes_nothing(
    imag: Imag, corpus: Corpus, target: str, named: str
) -> None:
    before = imag.instance_uids()
    response = imag.get(target.format(study=corpus.specs[0].study_uid))
    assert_problem(response, 400, named)
    assert imag.instance_uids() == before


# -- 5. WADO-RS ------------------------------------------------------------------------------

AS_STORED = f'multipart/related; type="{DICOM}"; transfer-syntax=*'


def test_wado_study_series_and_instance_as_stored_are_the_stored_bytes(imag: Imag) -> None:
    for study_uid, headers in imag.studies().items():
        response = imag.get(f"/studies/{study_uid}", headers={"Accept": AS_STORED})
        assert response.status_code == 200
        parts = parts_of(response)
        assert len(parts) == len(headers)
        for part_headers, body in parts:
            sop = str(pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID)
            assert body == imag.stored[sop].read_bytes(), sop
            ts = syntax(header(imag.stored[sop]))
            assert part_headers["content-type"] == f"{DICOM}; transfer-syntax={ts}"
    h = header(next(iter(imag.stored.values())))
    series_path = f"/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}"
    parts = parts_of(imag.get(series_path, headers={"Accept": AS_STORED}))
    members = imag.series()[str(h.SeriesInstanceUID)]
    assert sorted(body for _, body in parts) == sorted(
        imag.stored[str(m.SOPInstanceUID)].read_bytes() for m in members
    )
    (part,) = parts_of(
        imag.get(f"{series_path}/instances/{h.SOPInstanceUID}", headers={"Accept": AS_STORED})
    )
    assert part[1] == imag.stored[str(h.SOPInstanceUID)].read_bytes()


def test_wado_transfer_syntax_star_returns_jpeg_2000_as_jpeg_2000(imag: Imag) -> None:
    j2k = [h for h in imag.headers() if syntax(h) == JPEG2000Lossless]
    assert j2k
    for h in j2k:
        ds = imag.client.retrieve_instance(
            str(h.StudyInstanceUID),
            str(h.SeriesInstanceUID),
            str(h.SOPInstanceUID),
            media_types=((DICOM, "*"),),
        )
        assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert dicom_bytes(ds) == imag.stored[str(h.SOPInstanceUID)].read_bytes()
    # asked by its UID, for a series all in JPEG 2000: the same
    h = j2k[0]
    series = imag.client.retrieve_series(
        str(h.StudyInstanceUID), str(h.SeriesInstanceUID), media_types=((DICOM, JPEG2000Lossless),)
    )
    assert {ds.file_meta.TransferSyntaxUID for ds in series} == {JPEG2000Lossless}


def test_wado_default_accept_sends_explicit_little_endian_with_the_same_pixels(
    imag: Imag,
) -> None:
    seen = set()
    for study_uid in imag.studies():
        for ds in imag.client.retrieve_study(study_uid):
            sop = str(ds.SOPInstanceUID)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, sop
            assert_same_instance(imag.stored[sop], dicom_bytes(ds))
            seen.add(syntax(header(imag.stored[sop])))
    # the conversions exercised: every stored syntax of the set came back decoded
    assert {JPEG2000Lossless, RLELossless, ExplicitVRBigEndian, ImplicitVRLittleEndian} <= seen


def test_wado_converts_a_compressed_series_when_explicit_little_endian_is_named(
    imag: Imag,
) -> None:
    for stored in (RLELossless, JPEG2000Lossless):
        h = next(h for h in imag.headers() if syntax(h) == stored)
        series = imag.client.retrieve_series(
            str(h.StudyInstanceUID),
            str(h.SeriesInstanceUID),
            media_types=((DICOM, ExplicitVRLittleEndian),),
        )
        assert len(series) == len(imag.series()[str(h.SeriesInstanceUID)])
        for ds in series:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert_same_instance(imag.stored[str(ds.SOPInstanceUID)], dicom_bytes(ds))


def test_wado_an_unsatisfiable_transfer_syntax_is_406_with_a_problem(imag: Imag) -> None:
    """The archive never produces lossy data from lossless data, so asking for
    JPEG baseline of an uncompressed instance cannot be satisfied."""
    plain = next(h for h in imag.headers() if syntax(h) == ExplicitVRLittleEndian)
    path = f"/studies/{plain.StudyInstanceUID}/series/{plain.SeriesInstanceUID}"
    lossy = f'multipart/related; type="{DICOM}"; transfer-syntax={JPEGBaseline8Bit}'
    body = assert_problem(
        imag.get(f"{path}/instances/{plain.SOPInstanceUID}", headers={"Accept": lossy}), 406
    )
    assert "transfer-syntax=*" in body["detail"]  # says what can be had
    mixed = study_of(imag, lambda h: syntax(h) == JPEG2000Lossless and h.Modality == "CT")
    assert_problem(imag.get(f"/studies/{mixed}", headers={"Accept": lossy}), 406)
    assert_problem(imag.get(path, headers={"Accept": "image/png"}), 406)


def test_wado_metadata_of_study_series_and_instance_is_the_stored_header(imag: Imag) -> None:
    def check(items: list[dict], expected: list[Dataset]) -> None:
        assert {value(i, "SOPInstanceUID") for i in items} == {
            str(h.SOPInstanceUID) for h in expected
        }
        for item in items:
            ds = Dataset.from_json(item, bulk_data_uri_handler=lambda *_: None)
            h = header(imag.stored[str(ds.SOPInstanceUID)])
            differing = [e.keyword for e in h if e.tag not in ds or ds[e.tag].value != e.value]
            assert not differing, differing
            bulk = item["7FE00010"]["BulkDataURI"]
            assert bulk == (
                f"{imag.base}/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}"
                f"/instances/{h.SOPInstanceUID}/bulk/7FE00010"
            )

    client = imag.client
    for study_uid, headers in imag.studies().items():
        check(client.retrieve_study_metadata(study_uid), headers)
    for series_uid, headers in imag.series().items():
        study_uid = str(headers[0].StudyInstanceUID)
        check(client.retrieve_series_metadata(study_uid, series_uid), headers)
    h = header(next(iter(imag.stored.values())))
    ids = (str(h.StudyInstanceUID), str(h.SeriesInstanceUID), str(h.SOPInstanceUID))
    check([client.retrieve_instance_metadata(*ids)], [h])
    answer = imag.get(f"/studies/{ids[0]}/series/{ids[1]}/instances/{ids[2]}/metadata")
    assert answer.headers["Content-Type"].startswith("application/dicom+json")


def test_wado_bulk_data_of_uncompressed_pixel_data_is_the_native_little_endian_pixels(
    imag: Imag,
) -> None:
    uncompressed = [h for h in imag.headers() if not pydicom.uid.UID(syntax(h)).is_compressed]
    assert {syntax(h) for h in uncompressed} >= {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
    }
    for h in uncompressed:
        metadata = imag.client.retrieve_instance_metadata(
            str(h.StudyInstanceUID), str(h.SeriesInstanceUID), str(h.SOPInstanceUID)
        )
        (data,) = imag.client.retrieve_bulkdata(metadata["7FE00010"]["BulkDataURI"])
        ds = pydicom.dcmread(imag.stored[str(h.SOPInstanceUID)])
        pixels = ds.pixel_array
        native = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
        assert data[: len(native)] == native, syntax(h)  # OW/OB values may end with a pad byte
        assert len(data) in (len(native), len(native) + 1), syntax(h)
        if syntax(h) != ExplicitVRBigEndian:
            assert data == ds.PixelData


def test_wado_series_metadata_is_served_again_the_same_and_follows_a_new_instance(
    imag: Imag, corpus: Corpus
) -> None:
    study_uid, series_uid = str(corpus.extra.study_uid), str(corpus.extra.series[0].series_uid)
    late = header(corpus.late)
    assert str(late.SeriesInstanceUID) == series_uid and str(late.SOPInstanceUID) not in imag.stored
    first = imag.client.retrieve_series_metadata(study_uid, series_uid)
    second = imag.client.retrieve_series_metadata(study_uid, series_uid)
    assert first == second
    assert len(first) == len(imag.series()[series_uid])
    # links follow the host the client used, also when served from the cache
    port = imag.server.http_port
    other_host = imag.get(
        f"/studies/{study_uid}/series/{series_uid}/metadata", headers={"Host": f"localhost:{port}"}
    ).json()
    assert other_host[0]["7FE00010"]["BulkDataURI"].startswith(
        f"http://localhost:{port}/dicom-web/"
    )

    answer = imag.client.store_instances([pydicom.dcmread(corpus.late)])
    assert "FailedSOPSequence" not in answer
    imag.stored[str(late.SOPInstanceUID)] = corpus.late
    third = imag.client.retrieve_series_metadata(study_uid, series_uid)
    assert len(third) == len(first) + 1
    assert {value(i, "SOPInstanceUID") for i in third} == {
        value(i, "SOPInstanceUID") for i in first
    } | {str(late.SOPInstanceUID)}
    assert [i for i in third if value(i, "SOPInstanceUID") != late.SOPInstanceUID] == first
    (found,) = imag.client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
    assert value(found, "NumberOfSeriesRelatedInstances") == len(third)


# -- 6. STOW-RS bad input --------------------------------------------------------------------


@pytest.fixture
def unchanged(imag: Imag) -> Iterator[None]:
    """The test must leave every stored instance as it was (found by QIDO-RS,
    and retrieved with the same bytes)."""
    before = imag.instance_uids()
    some = sorted(imag.stored)[:3]
    yield
    assert imag.instance_uids() == before
    for sop in some:
        h = header(imag.stored[sop])
        path = f"/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}/instances/{sop}"
        (part,) = parts_of(imag.get(path, headers={"Accept": AS_STORED}))
        assert part[1] == imag.stored[sop].read_bytes()


def test_stow_a_body_not_framed_by_its_boundary_is_400(
    imag: Imag, corpus: Corpus, unchanged: None
) -> None:
    data = fresh_copy(next(iter(corpus.files.values())))
    body = multipart([(DICOM, dicom_bytes(data))], boundary="one-boundary")
    for ctype in (
        f'multipart/related; type="{DICOM}"; boundary=another-boundary',
        f'multipart/related; type="{DICOM}"',  # no boundary at all
    ):
        response = imag.server.http.post(
            imag.base + "/studies", data=body, headers={"Content-Type": ctype}, timeout=30
        )
        assert_problem(response, 400, "multipart")
    assert str(data.SOPInstanceUID) not in imag.instance_uids()


def test_stow_of_another_media_type_is_415(imag: Imag, unchanged: None) -> None:
    response = imag.server.http.post(imag.base + "/studies", json={"00100010": {}}, timeout=30)
    assert_problem(response, 415, "application/json")
    response = imag.server.http.post(
        imag.base + "/studies",
        data=multipart([("application/dicom+json", b"[]")]),
        headers={
            "Content-Type": 'multipart/related; type="application/dicom+json"; '
            "boundary=imag-test-3f2a"
        },
        timeout=30,
    )
    assert_problem(response, 415, "application/dicom+json")


def test_stow_a_part_that_is_not_dicom_fails_with_c000_and_alone_is_409(
    imag: Imag, unchanged: None
) -> None:
    response = stow(imag, [(DICOM, b"this is not a DICOM object " * 20)])
    assert response.status_code == 409, response.text
    answer = Dataset.from_json(response.json())
    assert "ReferencedSOPSequence" not in answer
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == 0xC000


def test_stow_a_bad_part_beside_a_good_one_is_202_listing_both(
    imag: Imag, corpus: Corpus, unchanged: None
) -> None:
    good = next(iter(corpus.files.values()))  # already stored: an idempotent success
    response = stow(imag, [(DICOM, b"\0" * 300), (DICOM, good.read_bytes())])
    assert response.status_code == 202, response.text
    answer = Dataset.from_json(response.json())
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == 0xC000
    (stored,) = answer.ReferencedSOPSequence
    assert stored.ReferencedSOPInstanceUID == header(good).SOPInstanceUID


def test_stow_an_instance_of_another_study_than_the_path_fails_with_a900(
    imag: Imag, corpus: Corpus, unchanged: None
) -> None:
    data = fresh_copy(next(iter(corpus.files.values())))
    other = next(uid for uid in imag.studies() if uid != data.StudyInstanceUID)
    response = stow(imag, [(DICOM, dicom_bytes(data))], study=other)
    assert response.status_code == 409, response.text
    answer = Dataset.from_json(response.json())
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == 0xA900
    assert failed.ReferencedSOPInstanceUID == data.SOPInstanceUID
    assert answer.RetrieveURL == f"{imag.base}/studies/{other}"
    assert str(data.SOPInstanceUID) not in imag.instance_uids()


def test_stow_an_instance_without_sop_instance_uid_fails_with_a900(
    imag: Imag, corpus: Corpus, unchanged: None
) -> None:
    data = fresh_copy(next(iter(corpus.files.values())))
    del data.SOPInstanceUID
    response = stow(imag, [(DICOM, dicom_bytes(data))])
    assert response.status_code == 409, response.text
    (failed,) = Dataset.from_json(response.json()).FailedSOPSequence
    assert failed.FailureReason == 0xA900


def test_stow_a_different_object_under_a_stored_uid_keeps_the_stored_one(
    imag: Imag, corpus: Corpus, unchanged: None
) -> None:
    path = next(iter(corpus.files.values()))
    changed = pydicom.dcmread(path)
    changed.StudyDescription = "CHANGED BY A SECOND SENDER"
    response = stow(imag, [(DICOM, dicom_bytes(changed))])
    assert response.status_code in (200, 202, 409), response.text
    (study,) = imag.client.search_for_studies(
        search_filters={"StudyInstanceUID": str(changed.StudyInstanceUID)}
    )
    assert value(study, "StudyDescription") == header(path).StudyDescription


def test_stow_parts_spooled_to_disk_are_stored_and_checked_as_in_memory(
    corpus: Corpus, tmp_path: Path, store_under_test: StoreUnderTest
) -> None:
    """Over ingest.stream_threshold a part goes through a file (large objects);
    here every part does: the same answers, the same bytes, the same refusals,
    and no spool file left behind -- in a folder and in an S3 bucket (where a
    spooled part is uploaded from its file)."""
    settings = {"IMAG_INGEST_STREAM_THRESHOLD": "1KiB", **store_under_test.settings()}
    with serving_in_process(tmp_path / "imag", settings=settings) as server:
        client = server.client()
        files = list(corpus.files.values())
        answer = client.store_instances([pydicom.dcmread(p) for p in files])
        assert "FailedSOPSequence" not in answer
        assert len(answer.ReferencedSOPSequence) == len(files)
        imag = Imag(server, client, dict(corpus.files), answer)
        for path in files[:: len(files) // 6]:
            h = header(path)
            target = (
                f"/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}"
                f"/instances/{h.SOPInstanceUID}"
            )
            (part,) = parts_of(imag.get(target, headers={"Accept": AS_STORED}))
            assert part[1] == path.read_bytes()
        data = fresh_copy(files[0])
        other = next(uid for uid in imag.studies() if uid != data.StudyInstanceUID)
        refused = stow(imag, [(DICOM, dicom_bytes(data))], study=other)
        assert refused.status_code == 409
        (failed,) = Dataset.from_json(refused.json()).FailedSOPSequence
        assert failed.FailureReason == 0xA900
        truncated = stow(imag, [(DICOM, dicom_bytes(fresh_copy(files[0]))[:-100])])
        assert truncated.status_code == 409
        assert set(imag.instance_uids()) == set(corpus.files)
        spool = server.workdir / "data" / "tmp"
        assert spool.is_dir(), "no part was spooled"
        assert not any(spool.iterdir()), list(spool.iterdir())
    assert "Traceback" not in server.log(), server.log()[-5000:]


# -- 7. QIDO-RS and C-FIND agree -------------------------------------------------------------

# QIDO-RS parameters, and the C-FIND keys when they differ ("," is "\" in DICOM)
PARITY: list[tuple[dict[str, object], dict[str, object] | None]] = [
    ({"PatientName": "M*"}, None),
    ({"PatientName": "côté*"}, None),
    ({"PatientName": "M?LLER^HANS"}, None),
    ({"ReferringPhysicianName": "*hélène*"}, None),
    ({"StudyDate": "20240101-20240430"}, None),
    ({"StudyDate": "-20240402"}, None),
    ({"StudyDate": "20240501-", "AccessionNumber": "ACC*"}, None),
    (
        {"StudyInstanceUID": _uids(0, 2, 5)},
        {"StudyInstanceUID": lambda c: _uids(0, 2, 5)(c).replace(",", "\\")},
    ),
    ({"ModalitiesInStudy": "MR"}, None),
    ({"ModalitiesInStudy": "CT,US"}, {"ModalitiesInStudy": "CT\\US"}),
    ({"PatientID": "IMAG0002"}, None),
    ({"PatientID": "IMAG0002", "IssuerOfPatientID": "HOSP_NORD"}, None),
]


def _resolve(keys: dict[str, object], corpus: Corpus) -> dict[str, str]:
    return {k: v(corpus) if callable(v) else str(v) for k, v in keys.items()}


def test_qido_and_c_find_find_the_same_studies_for_the_same_keys(
    imag: Imag, corpus: Corpus
) -> None:
    ae = AE(ae_title="PARITY")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", imag.server.dicom_port, ae_title=imag.server.aet)
    assert assoc.is_established
    try:
        for qido_keys, find_keys in PARITY:
            params = _resolve(qido_keys, corpus)
            identifier = Dataset()
            identifier.SpecificCharacterSet = "ISO_IR 192"
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = ""
            for keyword, key in _resolve(find_keys or qido_keys, corpus).items():
                setattr(identifier, keyword, key)
            by_find = set()
            final = None
            for status, answer in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            ):
                if status.Status in (0xFF00, 0xFF01):
                    by_find.add(str(answer.StudyInstanceUID))
                else:
                    final = status.Status
            assert final == 0x0000, (qido_keys, final)
            by_qido = study_uids(imag.client.search_for_studies(search_filters=params))
            assert by_qido, f"{qido_keys} finds nothing: the test data changed"
            assert by_qido == by_find, qido_keys
    finally:
        assoc.release()
        ae.shutdown()


# -- 8. Orthanc's DICOMweb plugin as a client ------------------------------------------------


def _orthanc_call(url: str, body: object | None = None) -> bytes:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        return answer.read()


@pytest.fixture
def orthanc(imag: Imag, tmp_path: Path) -> Iterator[str]:
    """An Orthanc on loopback with the DICOMweb plugin, IMAG configured as its
    DICOMweb server "imag"; its REST API URL."""
    if not ORTHANC_PLUGIN.exists():
        pytest.skip(f"Orthanc's DICOMweb plugin {ORTHANC_PLUGIN} is absent (orthanc-dicomweb)")
    port = free_port()
    config = {
        "Name": "imag-test",
        "StorageDirectory": str(tmp_path / "orthanc"),
        "IndexDirectory": str(tmp_path / "orthanc"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageCompression": False,
        "StableAge": 3600,
        "SaveJobs": False,
        "Plugins": [str(ORTHANC_PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "Servers": {
                "imag": {
                    "Url": imag.base + "/",
                    "HttpHeaders": {"Authorization": f"Bearer {imag.server.token}"},
                }
            },
        },
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log_path = tmp_path / "orthanc.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(tmp_path / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                plugins = json.loads(_orthanc_call(url + "/plugins"))
                assert "dicom-web" in plugins, plugins
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "Orthanc did not start:\n" + log_path.read_text()
                    ) from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.interop  # a skip (Orthanc's DICOMweb plugin absent) fails under CI=true
def test_orthanc_lists_and_retrieves_imag_studies_bit_for_bit(
    imag: Imag, corpus: Corpus, orthanc: str
) -> None:
    servers = f"{orthanc}/dicom-web/servers/imag"
    listed = json.loads(_orthanc_call(servers + "/get", {"Uri": "/studies"}))
    assert study_uids(listed) == set(imag.studies())
    # Orthanc encodes the arguments itself
    cote = json.loads(
        _orthanc_call(servers + "/get", {"Uri": "/studies", "Arguments": {"PatientName": "côté*"}})
    )
    assert names(cote) == {"CÔTÉ^Zoé", "CÔTÉ^Jean"}

    # explicit little endian + JPEG 2000; big endian + deflated; RLE
    wanted = [
        study_of(imag, lambda h: syntax(h) == JPEG2000Lossless and h.Modality == "CT"),
        study_of(imag, lambda h: syntax(h) == ExplicitVRBigEndian),
        study_of(imag, lambda h: syntax(h) == RLELossless),
    ]
    answer = json.loads(
        _orthanc_call(servers + "/retrieve", {"Resources": [{"Study": uid} for uid in wanted]})
    )
    expected = {str(h.SOPInstanceUID) for h in imag.headers() if h.StudyInstanceUID in wanted}
    assert int(answer["ReceivedInstancesCount"]) == len(expected), answer

    received: dict[str, bytes] = {}
    for instance in json.loads(_orthanc_call(orthanc + "/instances")):
        data = _orthanc_call(f"{orthanc}/instances/{instance}/file")
        received[str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = (
            data
        )
    assert set(received) == expected
    for sop, data in received.items():
        assert data == imag.stored[sop].read_bytes(), sop
