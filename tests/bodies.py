"""A request body that arrives in two pieces, the second sent only once the
server has read the first (a slow phone link, a chunked upload): a handler
that takes one ``request.content.read(n)`` for the whole body gets the first
piece alone.  An event, not a pause, orders the two (time is not the point)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests
from aiohttp.streams import StreamReader


def send_in_two_pieces(
    monkeypatch: pytest.MonkeyPatch, method: str, url: str, body: bytes, headers: dict[str, str]
) -> requests.Response:
    """``body`` sent chunked to the in-process server at ``url``: its first 20
    bytes, then the rest once the server's body reader has returned data."""
    first_read = threading.Event()
    read_some = StreamReader.read

    async def read(self: StreamReader, n: int = -1) -> bytes:
        data = await read_some(self, n)
        first_read.set()
        return data

    monkeypatch.setattr(StreamReader, "read", read)

    def pieces() -> Iterator[bytes]:
        yield body[:20]
        assert first_read.wait(10), "the server never read the first piece"
        yield body[20:]

    return requests.request(method, url, data=pieces(), headers=headers, timeout=30)
