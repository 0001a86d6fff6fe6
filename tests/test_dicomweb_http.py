"""DICOMweb at the HTTP level (issue 19): what PS3.18 and RFC 9110 say about
parameters the archive does not support (ignored, named in a ``Warning``),
repeated query keys (a list), 405 answers (``Allow``), a STOW-RS body cut
off mid-part (what was stored, and the failure), and CORS for a viewer
served from another origin.  Raw HTTP (requests, and a socket where the
bytes on the wire are the point) and dicomweb-client against the
in-process server."""

from __future__ import annotations

import io
import json
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.inprocess import InProcessImag, serving_in_process

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
VIEWER = "https://viewer.example.org"
PROBLEM = "application/problem+json"
BOUNDARY = "http-test-boundary"


def instance(study: str, modality: str, patient: str = "HTTP-1") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SC_CLASS
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SC_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = patient, "HTTP^Test"
    ds.StudyDate, ds.StudyTime = "20250203", "090000"
    ds.Modality = modality
    ds.SeriesNumber = ds.InstanceNumber = 1
    return ds


def as_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def body_of(parts: list[bytes], *, close: bool = True) -> bytes:
    out = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@dataclass
class World:
    server: InProcessImag
    ct: Dataset
    mr: Dataset
    us: Dataset

    def get(self, path: str, **headers: str) -> requests.Response:
        return self.server.http.get(self.server.dicomweb + path, headers=headers, timeout=30)

    def uids(self, study: str | None = None) -> set[str]:
        found = self.server.client().search_for_instances(study, get_remaining=True)
        return {item["00080018"]["Value"][0] for item in found}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = {"IMAG_DICOMWEB_CORS_ORIGINS": VIEWER}
    with serving_in_process(tmp_path_factory.mktemp("http") / "imag", settings=settings) as server:
        study_a, study_b, study_c = generate_uid(), generate_uid(), generate_uid()
        data = World(
            server, instance(study_a, "CT"), instance(study_b, "MR"), instance(study_c, "US")
        )
        stored = server.http.post(
            server.dicomweb + "/studies",
            data=body_of([as_bytes(d) for d in (data.ct, data.mr, data.us)]),
            headers={"Content-Type": STOW_TYPE},
            timeout=60,
        )
        assert stored.status_code == 200, stored.text
        yield data
        assert "Traceback" not in server.log(), server.log()[-5000:]


def studies(answer: requests.Response) -> set[str]:
    assert answer.status_code == 200, answer.text
    return {item["0020000D"]["Value"][0] for item in answer.json()}


def warnings_of(answer: requests.Response) -> list[str]:
    return answer.raw.headers.getlist("Warning") if answer.raw is not None else []


# -- unknown parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    ["PATIENTID=12345", "InvalidParam=x", "00101999=1", "includefield=NoSuchField"],
)
def test_an_unknown_query_parameter_is_ignored_with_a_warning_naming_it(
    world: World, params: str
) -> None:
    plain = world.get("/studies")
    answer = world.get(f"/studies?{params}")
    assert studies(answer) == studies(plain) and len(studies(plain)) == 3
    (warning,) = warnings_of(answer)
    name = params.split("=")[0] if "includefield" not in params else params
    assert warning.startswith(f"299 {world.server.dicomweb}: "), warning
    assert "not supported" in warning and name in warning, warning
    assert "Warning" not in plain.headers


def test_an_unknown_parameter_beside_a_real_key_still_matches_on_the_key(world: World) -> None:
    answer = world.get(
        f"/studies?PatientID=HTTP-1&InvalidParam=x&StudyInstanceUID={world.ct.StudyInstanceUID}"
    )
    assert studies(answer) == {world.ct.StudyInstanceUID}
    assert "InvalidParam" in answer.headers["Warning"]


def test_fuzzymatching_true_is_supported_so_it_gets_no_not_supported_warning(
    world: World,
) -> None:
    answer = world.get("/studies?fuzzymatching=true&PatientName=HTTP*")
    assert len(studies(answer)) == 3
    assert warnings_of(answer) == []


def test_a_parameter_name_with_control_characters_is_named_safely(world: World) -> None:
    answer = world.get("/studies?Evil%0D%0AX-Injected:%201=1")
    assert answer.status_code == 200
    assert "X-Injected" not in answer.headers
    assert "Evil??X-Injected: 1" in answer.headers["Warning"]


def test_a_malformed_value_of_a_supported_key_is_still_400(world: World) -> None:
    answer = world.get("/studies?StudyDate=2026-13-45&InvalidParam=x")
    assert answer.status_code == 400
    assert "StudyDate" in answer.json()["detail"]


# -- repeated keys ---------------------------------------------------------------------------


def test_a_repeated_key_is_a_list_of_values(world: World) -> None:
    both = world.get("/studies?ModalitiesInStudy=CT&ModalitiesInStudy=MR")
    assert studies(both) == {world.ct.StudyInstanceUID, world.mr.StudyInstanceUID}
    assert studies(both) == studies(world.get("/studies?ModalitiesInStudy=CT,MR"))
    uids = (
        f"StudyInstanceUID={world.ct.StudyInstanceUID}&StudyInstanceUID={world.us.StudyInstanceUID}"
    )
    assert studies(world.get(f"/studies?{uids}")) == {
        world.ct.StudyInstanceUID,
        world.us.StudyInstanceUID,
    }
    # the same value twice is that value
    assert studies(world.get("/studies?ModalitiesInStudy=US&ModalitiesInStudy=US")) == {
        world.us.StudyInstanceUID
    }


def test_a_repeated_key_of_an_attribute_without_lists_is_400_naming_it(world: World) -> None:
    answer = world.get("/studies?PatientName=A*&PatientName=B*")
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith(PROBLEM)
    assert "PatientName" in answer.json()["detail"]


# -- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/studies", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("PUT", "/studies/1.2.3/series", {"GET", "HEAD", "OPTIONS"}),
        (
            "POST",
            "/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/1",
            {"GET", "HEAD", "OPTIONS"},
        ),
    ],
)
def test_a_method_a_resource_does_not_answer_is_405_with_allow(
    world: World, method: str, path: str, allowed: set[str]
) -> None:
    answer = world.server.http.request(method, world.server.dicomweb + path, timeout=30)
    assert answer.status_code == 405
    assert {m.strip() for m in answer.headers["Allow"].split(",")} == allowed
    assert answer.headers["Content-Type"].startswith(PROBLEM)


def test_options_without_cors_says_what_the_resource_allows(world: World) -> None:
    answer = requests.options(world.server.dicomweb + "/studies/1.2.3/metadata", timeout=30)
    assert answer.status_code == 204
    assert {m.strip() for m in answer.headers["Allow"].split(",")} == {"GET", "HEAD", "OPTIONS"}
    assert not any(h.lower().startswith("access-control") for h in answer.headers)
    assert requests.options(world.server.dicomweb + "/nothing/here", timeout=30).status_code == 404


# -- STOW-RS cut off -------------------------------------------------------------------------


def raw_post(
    world: World, body: bytes, content_type: str = STOW_TYPE, *, with_head: bool = False
) -> Any:
    """POST ``body`` with a Content-Length that matches it, over a socket:
    the body ends where it ends, as when a client stops writing."""
    host, port = world.server.url.split("//")[1].split(":")
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {world.server.token}\r\nContent-Type: {content_type}\r\n"
        f"Accept: application/dicom+json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    status = int(raw.split(b" ", 2)[1])
    head, _, payload = raw.partition(b"\r\n\r\n")
    return (status, payload, head) if with_head else (status, payload)


def answer_of(payload: bytes) -> Dataset:
    text = payload
    if b"\r\n" in payload and not payload.lstrip().startswith(b"{"):  # chunked
        text = b"".join(payload.split(b"\r\n")[1::2])
    return Dataset.from_json(json.loads(text))


def test_a_stow_body_cut_mid_part_answers_what_was_stored_and_the_failure(
    world: World,
) -> None:
    study = generate_uid()
    first, second = instance(study, "CT", "CUT-1"), instance(study, "CT", "CUT-1")
    whole = body_of([as_bytes(first), as_bytes(second)])
    cut = whole[: whole.index(bytes(second.SOPInstanceUID, "ascii")) + 10]
    status, payload, head = raw_post(world, cut, with_head=True)
    assert status == 202, payload
    answer = answer_of(payload)
    (stored,) = answer.ReferencedSOPSequence
    assert stored.ReferencedSOPInstanceUID == first.SOPInstanceUID
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == 0xC000
    # the first is really stored, the cut one is not
    assert world.uids(study) == {first.SOPInstanceUID}
    assert b"inside part 2" in head, head  # the Warning says where the body ended


def test_a_stow_body_cut_in_its_first_part_is_409_and_stores_nothing(world: World) -> None:
    study = generate_uid()
    data = as_bytes(instance(study, "CT", "CUT-2"))
    whole = body_of([data])
    status, payload = raw_post(world, whole[: len(whole) // 2])
    assert status == 409, payload
    answer = answer_of(payload)
    assert "ReferencedSOPSequence" not in answer
    assert answer.FailedSOPSequence[0].FailureReason == 0xC000
    assert world.uids(study) == set()


def test_a_stow_body_cut_right_after_a_delimiter_keeps_the_complete_part(world: World) -> None:
    study = generate_uid()
    one = instance(study, "CT", "CUT-3")
    body = body_of([as_bytes(one)], close=False) + f"--{BOUNDARY}\r\n".encode()
    status, payload = raw_post(world, body)
    assert status == 202, payload  # the part begun by the delimiter is cut: it failed
    answer = answer_of(payload)
    assert [s.ReferencedSOPInstanceUID for s in answer.ReferencedSOPSequence] == [
        one.SOPInstanceUID
    ]
    assert [f.FailureReason for f in answer.FailedSOPSequence] == [0xC000]
    assert world.uids(study) == {one.SOPInstanceUID}


def test_a_last_part_without_a_delimiter_after_it_is_not_stored(world: World) -> None:
    """Without the delimiter, nothing says the part is whole (RFC 2046 5.1.1):
    it fails, and a truncated object is never stored as if it were complete."""
    study = generate_uid()
    one = instance(study, "CT", "CUT-4")
    status, payload = raw_post(world, body_of([as_bytes(one)], close=False))
    assert status == 409, payload
    assert answer_of(payload).FailedSOPSequence[0].FailureReason == 0xC000
    assert world.uids(study) == set()


# -- CORS ------------------------------------------------------------------------------------


def test_a_preflight_from_an_allowed_origin_is_answered_without_credentials(
    world: World,
) -> None:
    answer = requests.options(
        world.server.dicomweb + "/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/1",
        headers={
            "Origin": VIEWER,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, accept",
        },
        timeout=30,
    )
    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "GET" in answer.headers["Access-Control-Allow-Methods"]
    assert answer.headers["Access-Control-Allow-Headers"] == "authorization, accept"
    assert "Access-Control-Allow-Credentials" not in answer.headers  # not configured
    assert "Origin" in answer.headers["Vary"]


def test_an_allowed_origin_reads_answers_errors_and_streams_with_exposed_warnings(
    world: World,
) -> None:
    origin = {"Origin": VIEWER}
    search = world.get("/studies?InvalidParam=1", **origin)
    assert search.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "Warning" in search.headers["Access-Control-Expose-Headers"]
    ct = world.ct
    path = f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/metadata"
    streamed = world.get(path, **origin)
    assert streamed.status_code == 200
    assert streamed.headers["Access-Control-Allow-Origin"] == VIEWER
    missing = world.get("/studies/1.2.3/metadata", **origin)
    assert missing.status_code == 404
    assert missing.headers["Access-Control-Allow-Origin"] == VIEWER
    unauthenticated = requests.get(world.server.dicomweb + "/studies", headers=origin, timeout=30)
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["Access-Control-Allow-Origin"] == VIEWER


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.org",
        "https://viewer.example.org:8443",
        "http://viewer.example.org",
        "null",
    ],
)
def test_an_origin_not_on_the_list_gets_no_cors_headers(world: World, origin: str) -> None:
    preflight = requests.options(
        world.server.dicomweb + "/studies",
        headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
        timeout=30,
    )
    search = world.get("/studies", Origin=origin)
    assert search.status_code == 200  # the API answers as to any client; the browser hides it
    for answer in (preflight, search):
        assert not [h for h in answer.headers if h.lower().startswith("access-control")], (
            answer.headers
        )


def test_a_preflight_for_a_method_the_resource_does_not_answer_gets_no_cors(
    world: World,
) -> None:
    answer = requests.options(
        world.server.dicomweb + "/studies/1.2.3/metadata",
        headers={"Origin": VIEWER, "Access-Control-Request-Method": "DELETE"},
        timeout=30,
    )
    assert "Access-Control-Allow-Methods" not in answer.headers


def test_credentials_are_allowed_only_for_listed_origins_never_with_a_wildcard(
    tmp_path: Path,
) -> None:
    from dicomweb.cors import Cors

    with pytest.raises(ValueError, match="cannot be true"):
        Cors(["*"], credentials=True)
    settings = {
        "IMAG_DICOMWEB_CORS_ORIGINS": f"{VIEWER}, https://other.example.org",
        "IMAG_DICOMWEB_CORS_CREDENTIALS": "true",
    }
    with serving_in_process(tmp_path / "imag", settings=settings) as server:
        answer = server.http.get(
            server.dicomweb + "/studies", headers={"Origin": VIEWER}, timeout=30
        )
        assert answer.headers["Access-Control-Allow-Origin"] == VIEWER
        assert answer.headers["Access-Control-Allow-Credentials"] == "true"
        other = server.http.get(
            server.dicomweb + "/studies",
            headers={"Origin": "https://third.example.org"},
            timeout=30,
        )
        assert "Access-Control-Allow-Credentials" not in other.headers
    with serving_in_process(
        tmp_path / "any", settings={"IMAG_DICOMWEB_CORS_ORIGINS": "*"}
    ) as server:
        answer = server.http.get(
            server.dicomweb + "/studies", headers={"Origin": VIEWER}, timeout=30
        )
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in answer.headers


@pytest.mark.parametrize(
    "value", ["viewer.example.org", "https://viewer.example.org/app", "ftp://x"]
)
def test_a_malformed_origin_setting_is_refused_at_start(tmp_path: Path, value: str) -> None:
    from archive.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="cors_origins"):
        load_config(
            env={"IMAG_DICOMWEB_CORS_ORIGINS": value}, overrides={"data_dir": str(tmp_path)}
        )


# -- app keys --------------------------------------------------------------------------------


def test_the_dicomweb_app_is_built_without_aiohttp_key_warnings(tmp_path: Path) -> None:
    from aiohttp import web

    from archive.config import load_config
    from archive.runtime import Archive
    from dicomweb.routes import setup

    archive = Archive(load_config(env={}, overrides={"data_dir": str(tmp_path)}))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            setup(web.Application(), archive)
    finally:
        archive.close()


def test_dicomweb_client_reads_a_searched_instance_through_the_warnings(world: World) -> None:
    """A real client is not disturbed by the warnings (it logs them)."""
    client = world.server.client()
    found = client.search_for_studies(search_filters={"InvalidParam": "x", "PatientID": "HTTP-1"})
    assert {s["0020000D"]["Value"][0] for s in found} == {
        world.ct.StudyInstanceUID,
        world.mr.StudyInstanceUID,
        world.us.StudyInstanceUID,
    }
    ct = world.ct
    got = client.retrieve_instance(
        str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID), str(ct.SOPInstanceUID)
    )
    assert isinstance(got, pydicom.Dataset) and got.SOPInstanceUID == ct.SOPInstanceUID
