"""archive/web.py::read_capped, the one reader of the small JSON bodies (a
share, a worklist action, a UPS-RS workitem, an identity request): the whole
body however it arrives, and None -- the caller's 413 -- for a body over the
limit, whether its Content-Length says so or a chunked sender goes past it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from archive.web import read_capped

LIMIT = 16


async def _answers(body: bytes | AsyncIterator[bytes], **headers: str) -> tuple[int, bytes]:
    async def handler(request: web.Request) -> web.Response:
        raw = await read_capped(request, LIMIT)
        return web.Response(status=413) if raw is None else web.Response(body=raw)

    app = web.Application()
    app.router.add_post("/", handler)
    async with TestClient(TestServer(app)) as client:
        answer = await client.post("/", data=body, headers=headers)
        return answer.status, await answer.read()


async def _pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:  # each a chunk of its own
        yield part


def test_a_body_within_the_limit_is_read_whole_even_in_pieces() -> None:
    assert asyncio.run(_answers(b"x" * LIMIT)) == (200, b"x" * LIMIT)
    assert asyncio.run(_answers(_pieces(b"abc", b"defgh", b"ij"))) == (200, b"abcdefghij")


def test_a_body_declared_over_the_limit_is_refused() -> None:
    assert asyncio.run(_answers(b"x" * (LIMIT + 1)))[0] == 413


def test_a_chunked_body_going_past_the_limit_is_refused() -> None:
    """The hostile sender declares no length and sends more than allowed."""
    status, _ = asyncio.run(_answers(_pieces(b"x" * 10, b"y" * 10, b"z" * 1000)))
    assert status == 413
