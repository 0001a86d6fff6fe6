"""HEAD on the answers that are written piece by piece (WADO-RS metadata and
frames, WADO-URI, the viewer's ZIP download) gets the GET's status and
headers and no body.

The adversary is the client itself, or the proxy in front of it, that keeps
the connection for its next request: aiohttp sends what a handler writes to
a stream for HEAD too, without a length or chunked framing, and those bytes
would be read as the start of the next answer.  Each test pipelines HEAD and
``GET /health`` on one connection; the second answer must follow the
first one's headers at once."""

from __future__ import annotations

import io
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
import pytest

from archive.identity import Source
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag, serving_in_process
from tests.processes import HOST
from viewer_api import view_http


@dataclass
class Stored:
    server: InProcessImag
    study: str
    series: str
    instance: str


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    with serving_in_process(tmp_path_factory.mktemp("head")) as server:
        assert server.archive is not None
        data = make_instance()
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        result = server.archive.pipeline.ingest(data, Source(kind="import", site=""))
        assert result.ok, result.reason
        yield Stored(
            server,
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPInstanceUID),
        )


def _head_then_health(server: InProcessImag, path: str, accept: str) -> tuple[bytes, bytes]:
    """The HEAD answer's header block, and everything that followed it."""
    sent = (
        f"HEAD {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: {accept}\r\n"
        f"Authorization: Bearer {server.token}\r\n\r\n"
        f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    )
    received = b""
    with socket.create_connection((HOST, server.http_port), timeout=60) as conn:
        conn.sendall(sent.encode())
        while chunk := conn.recv(1 << 16):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    return head, rest


def _paths(s: Stored) -> dict[str, tuple[str, str]]:
    instance = f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.instance}"
    return {
        "study metadata": (f"/dicom-web/studies/{s.study}/metadata", "application/dicom+json"),
        "frames": (
            f"{instance}/frames/1",
            'multipart/related; type="application/octet-stream"',
        ),
        "WADO-URI object": (
            f"/dicom-web/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
            f"&objectUID={s.instance}&contentType=application/dicom",
            "application/dicom",
        ),
        "ZIP download": (f"/api/view/download?study={s.study}", "*/*"),
    }


@pytest.mark.parametrize("what", ["study metadata", "frames", "WADO-URI object", "ZIP download"])
def test_head_of_a_streamed_answer_sends_its_headers_and_no_body(stored: Stored, what: str) -> None:
    path, accept = _paths(stored)[what]
    got = stored.server.http.get(stored.server.url + path, headers={"Accept": accept}, timeout=60)
    assert got.status_code == 200, got.text[:300]
    assert got.content, "the GET answer has a body"
    head, rest = _head_then_health(stored.server, path, accept)
    assert head.startswith(b"HTTP/1.1 200"), head
    content_type = re.search(rb"(?im)^content-type: *([^;\r\n]+)", head)
    assert content_type and content_type[1].decode() == got.headers["Content-Type"].split(";")[0]
    assert rest.startswith(b"HTTP/1.1 200"), f"bytes after HEAD's headers: {rest[:120]!r}"
    assert b'"status": "ok"' in rest


def test_a_head_of_the_download_builds_no_zip(
    stored: Stored, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEAD of the download answers from the index alone: the builder, which
    would read every object of the study, is not started."""
    built: list[object] = []
    monkeypatch.setattr(view_http, "build_zip", lambda *a, **k: built.append(a))
    path, accept = _paths(stored)["ZIP download"]
    head, rest = _head_then_health(stored.server, path, accept)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"application/zip" in head
    assert rest.startswith(b"HTTP/1.1 200")
    assert built == []
