"""multipart/related framing (RFC 2387), one definition for every writer.

WADO-RS answers and routing's STOW-RS requests are written part by part as
their bodies are read, never assembled whole: a study of a thousand objects
costs one chunk of memory, not a thousand objects.  The framing here is
transport-free; :func:`stream` gives the bytes of a whole body lazily (for
``urllib`` and other synchronous clients), and async writers send
:func:`part_head` / :data:`PART_END` / :func:`closing` themselves.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from typing import BinaryIO

CHUNK = 1 << 20
PART_END = b"\r\n"


def new_boundary() -> str:
    """A boundary that cannot occur in the parts by chance (128 random bits)."""
    return secrets.token_hex(16)


def content_type(boundary: str, part_type: str) -> str:
    """The ``Content-Type`` header of the whole body."""
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def part_head(boundary: str, part_type: str, location: str = "") -> bytes:
    """The delimiter and headers that open a part (its body follows)."""
    head = f"--{boundary}\r\nContent-Type: {part_type}\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return (head + "\r\n").encode()


def closing(boundary: str) -> bytes:
    """The close delimiter that ends the body."""
    return f"--{boundary}--\r\n".encode()


def chunks(fp: BinaryIO, size: int = CHUNK) -> Iterator[bytes]:
    """A file's bytes in chunks, the file closed at the end (or when dropped)."""
    with fp:
        while block := fp.read(size):
            yield block


def stream(parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """The body of a multipart/related of ``(part type, body chunks)`` parts,
    produced lazily: each part's chunks are pulled only when the body reaches it."""
    for part_type, body in parts:
        yield part_head(boundary, part_type)
        yield from body
        yield PART_END
    yield closing(boundary)
