"""Property-based fuzzing (hypothesis) of the two readers of untrusted bytes
at ingest: the DICOM header parse and the STOW-RS multipart reader.

* :func:`archive.parse.parse_header` and :func:`~archive.parse.parse_header_file`
  on mutations of valid objects (:func:`tests.hostile.valid_objects`: native
  in three syntaxes, deflated, RLE multi-frame, padded, nested sequences) -
  bit flips, truncations, overwritten length fields, inserted elements,
  random bytes - return a header or raise ``Rejected``, nothing else: no
  RecursionError, no pydicom or struct exception, no unbounded time.
* STOW-RS on a real ``imag serve`` (aiohttp's MultipartReader, our part
  reader and the ingest behind them) on mutated multipart bodies - boundary
  and Content-Type parameters, part headers, truncation, inserted bytes, line
  endings - answers every request with a client status (200/202/400/409/
  413/415) and a parseable body, never a 5xx, and keeps serving.

Runs briefly by default (a few seconds).  Longer on demand::

    IMAG_FUZZ_EXAMPLES=100000 .venv/bin/pytest -p no:cacheprovider tests/test_fuzz.py

Every crash found this way becomes a fixed case of the hostile corpus
(:mod:`tests.hostile`) or a regression test here.
"""

from __future__ import annotations

import io
import os
import struct
import time
from collections.abc import Iterator

import pydicom
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive.parse import Header, Rejected, parse_header, parse_header_file
from archive.validate import Limits
from tests.dicomfiles import make_instance
from tests.hostile import valid_objects
from tests.httpserver import HttpImag, running_imag

EXAMPLES = int(os.environ.get("IMAG_FUZZ_EXAMPLES", "0"))
PARSE_EXAMPLES = EXAMPLES or 300
STOW_EXAMPLES = EXAMPLES or 120
#: small limits: a mutation that inflates or declares big pixel data is refused fast
LIMITS = Limits(
    max_inflated_bytes=8 << 20,
    max_frame_bytes=64 << 20,
    max_decoded_bytes=256 << 20,
    max_sequence_depth=32,
)
SEEDS = valid_objects()
FUZZ = settings(
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _length_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of length fields in ``data``: top-level elements (as
    pydicom reads them) and every item header."""
    fields = []
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=False)
        for raw in ds.elements():
            tell = getattr(raw, "value_tell", None)
            if tell is None:
                continue
            long = raw.VR in (None, "OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UN", "UT", "UC")
            fields.append((tell - 4, 4) if long else (tell - 2, 2))
    except Exception:  # noqa: BLE001 - the deflated seed's offsets are not the file's
        pass
    at = data.find(b"\xfe\xff\x00\xe0")
    while at >= 0:
        fields.append((at + 4, 4))
        at = data.find(b"\xfe\xff\x00\xe0", at + 1)
    return [(o, w) for o, w in fields if o >= 0 and o + w <= len(data)]


LENGTH_FIELDS = {name: _length_fields(data) for name, data in SEEDS.items()}
SPECIAL_LENGTHS = [0, 1, 2, 7, 8, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000]
ELEMENTS = [  # inserted whole: a sequence start, an item, delimiters, a pixel data header
    struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF),
    struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF),
    struct.pack("<HHI", 0xFFFE, 0xE00D, 0),
    struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
    struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF),
    struct.pack("<HH2sH", 0x0028, 0x0008, b"IS", 2) + b"9Z",
]


@st.composite
def mutated_objects(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "length", "insert", "overwrite"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "length" and LENGTH_FIELDS[name]:
            offset, width = draw(st.sampled_from(LENGTH_FIELDS[name]))
            value = draw(st.sampled_from(SPECIAL_LENGTHS) | st.integers(0, 2**32 - 1))
            if offset + width <= len(data):
                data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(
                    width, "little"
                )
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from(ELEMENTS) | st.binary(min_size=1, max_size=16))
        else:
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
    return bytes(data)


def _parse_both(data: bytes) -> None:
    """Both parse paths: a header or Rejected; each well under a second."""
    for parse in (
        lambda: parse_header(data, LIMITS),
        lambda: parse_header_file(io.BytesIO(data), len(data), LIMITS),
    ):
        started = time.perf_counter()
        try:
            assert isinstance(parse(), Header)
        except Rejected as exc:
            assert exc.code and exc.reason
        assert time.perf_counter() - started < 5, "a parse took too long"


def test_every_seed_is_a_valid_object() -> None:
    for data in SEEDS.values():
        _parse_both(data)
        assert isinstance(parse_header(data, LIMITS), Header)


@settings(FUZZ, max_examples=PARSE_EXAMPLES)
@given(mutated_objects())
def test_the_header_parse_of_mutated_objects_only_ever_rejects(data: bytes) -> None:
    _parse_both(data)


# -- STOW-RS multipart ----------------------------------------------------------------------

BOUNDARY = "fuzz-b0undary"
CLIENT_STATUSES = {200, 202, 400, 408, 409, 413, 415}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpImag]:
    settings = {"IMAG_AUTH_MAX_FAILURES": "100000", "IMAG_HTTP_BODY_TIMEOUT": "5"}
    with running_imag(tmp_path_factory.mktemp("fuzz"), settings=settings) as imag:
        yield imag
    assert "Traceback" not in imag.log(), imag.log()[-5000:]  # no request failed


def _part(data: bytes, headers: str = "Content-Type: application/dicom") -> bytes:
    return f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n"


@st.composite
def mutated_stow(draw: st.DrawFn) -> tuple[str, bytes]:
    """(Content-Type, body) of a STOW-RS request, mutated."""
    seeds = [SEEDS["explicit"], SEEDS["rle-frames"], SEEDS["deflated"]]
    parts = [draw(st.sampled_from(seeds)) for _ in range(draw(st.integers(1, 2)))]
    headers = draw(
        st.sampled_from(
            [
                "Content-Type: application/dicom",
                "Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                "Content-Type: application/dicom+json",
                "Content-Type: multipart/related; boundary=inner",
                "Content-Type application/dicom",
                "Content-Length: 3\r\nContent-Type: application/dicom",
                "X-" + "h" * 9000 + ": v",
                "",
            ]
        )
    )
    body = bytearray(b"".join(_part(p, headers) for p in parts) + f"--{BOUNDARY}--\r\n".encode())
    boundary = draw(
        st.sampled_from(
            [BOUNDARY, f'"{BOUNDARY}"', "other", "", BOUNDARY + "x" * 100, "a" * 80, " "]
        )
    )
    ctype = draw(
        st.sampled_from(
            [
                f'multipart/related; type="application/dicom"; boundary={boundary}',
                f"multipart/related; boundary={boundary}",
                'multipart/related; type="application/dicom"',
                f"multipart/form-data; boundary={boundary}",
                f'multipart/related; type="image/jpeg"; boundary={boundary}',
            ]
        )
    )
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["truncate", "insert", "flip", "lf", "crlf-boundary"]))
        at = draw(st.integers(0, max(len(body) - 1, 0)))
        if kind == "truncate":
            del body[at:]
        elif kind == "insert":
            body[at:at] = draw(
                st.sampled_from([b"\r\n", b"--", f"\r\n--{BOUNDARY}\r\n".encode()])
                | st.binary(min_size=1, max_size=32)
            )
        elif kind == "flip" and body:
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "lf":
            body = bytearray(bytes(body).replace(b"\r\n", b"\n", draw(st.integers(1, 4))))
        else:
            body = bytearray(bytes(body).replace(f"--{BOUNDARY}--".encode(), b"", 1))
    return ctype, bytes(body)


#: found by the fuzzer: part header lines aiohttp refuses (InvalidHeader, LineTooLong,
#: both aiohttp.http_exceptions.HttpProcessingError) escape dicomweb/stow.py's
#: ``except (ValueError, AssertionError)`` and become a 500
BAD_PART_HEADERS = [
    "Content-Type application/dicom",  # no colon
    "X-" + "h" * 9000 + ": v",  # longer than aiohttp's 8190-byte line limit
    "Content-Type: application/dicom\r\n: no-name",
    "Content-Type: application/dicom\r\n\x00bad: v",
]


@pytest.mark.parametrize("headers", BAD_PART_HEADERS, ids=range(len(BAD_PART_HEADERS)))
def test_a_part_header_aiohttp_refuses_is_answered_400(server: HttpImag, headers: str) -> None:
    body = _part(make_instance(), headers) + f"--{BOUNDARY}--\r\n".encode()
    answer = server.http.post(
        server.dicomweb + "/studies",
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        },
        timeout=30,
    )
    assert answer.status_code == 400, (answer.status_code, answer.text[:300])
    assert answer.headers["Content-Type"].startswith("application/problem+json")


def test_the_stow_reader_of_mutated_bodies_answers_only_client_statuses(
    server: HttpImag,
) -> None:

    @settings(FUZZ, max_examples=STOW_EXAMPLES)
    @given(mutated_stow())
    def post(request: tuple[str, bytes]) -> None:
        ctype, body = request
        answer = server.http.post(
            server.dicomweb + "/studies", data=body, headers={"Content-Type": ctype}, timeout=30
        )
        assert answer.status_code in CLIENT_STATUSES, (answer.status_code, answer.text[:500])
        kind = answer.headers.get("Content-Type", "")
        assert kind.startswith(("application/problem+json", "application/dicom+json")), kind
        answer.json()

    post()
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    fine = server.http.post(
        server.dicomweb + "/studies",
        data=_part(make_instance()) + f"--{BOUNDARY}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        },
        timeout=30,
    )
    assert fine.status_code == 200, fine.text
