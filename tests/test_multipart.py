"""The one multipart/related writer: bodies a standard parser reads back, built lazily."""

from __future__ import annotations

import email.parser
import email.policy
import io

from archive import multipart


def parse(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in message.iter_parts()]


def test_a_streamed_body_is_read_back_part_for_part_by_a_standard_parser() -> None:
    boundary = multipart.new_boundary()
    parts = [
        ("application/dicom", [b"DICM", b"\r\n--not-a-boundary\r\n", b"x" * 10]),
        ("application/octet-stream", [b""]),
    ]
    body = b"".join(multipart.stream(parts, boundary))
    got = parse(multipart.content_type(boundary, "application/dicom"), body)
    assert got == [
        ("application/dicom", b"DICM\r\n--not-a-boundary\r\n" + b"x" * 10),
        ("application/octet-stream", b""),
    ]


def test_a_part_is_read_from_its_source_only_when_the_body_reaches_it() -> None:
    pulled: list[str] = []

    def source(name: str):  # noqa: ANN202
        pulled.append(name)
        yield name.encode()

    body = multipart.stream((("application/dicom", source(n)) for n in ("a", "b")), "B")
    assert next(body) == multipart.part_head("B", "application/dicom") and pulled == []
    assert next(body) == b"a" and pulled == ["a"]
    rest = b"".join(body)
    assert pulled == ["a", "b"] and rest.endswith(multipart.closing("B"))


def test_a_file_is_streamed_in_chunks_and_closed() -> None:
    fp = io.BytesIO(b"0123456789")
    assert list(multipart.chunks(fp, 4)) == [b"0123", b"4567", b"89"]
    assert fp.closed
