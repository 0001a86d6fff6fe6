"""What every HTTP service of the archive shares: the application key under
which the running :class:`~archive.runtime.Archive` is found, RFC 9457 problem
details, and the public base URL for links in answers.

It lives apart from :mod:`archive.server` (which assembles the application and
mounts the services) so that a service package such as ``dicomweb`` and the
HTTP security layer can use these helpers without importing the server that
imports them: imports point inward and no cycle forms.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from archive.runtime import Archive

#: the application key holding the running archive (``request.config_dict[ARCHIVE]``)
ARCHIVE = web.AppKey("archive", Archive)


def problem(status: int, title: str, detail: str) -> web.Response:
    """An RFC 9457 problem details response."""
    return web.Response(
        status=status,
        content_type="application/problem+json",
        text=json.dumps(
            {"type": "about:blank", "title": title, "status": status, "detail": detail}
        ),
    )


def public_base(request: web.Request) -> str:
    """The scheme://host[:port] clients use to reach us, for links in answers.

    ``http.public_url`` wins; behind a proxy X-Forwarded-Proto / -Host tell;
    otherwise the Host header, with our port added when a client (such as
    dicomweb-client) leaves it out.
    """
    configured = (
        request.config_dict[ARCHIVE].config["http.public_url"]
        if ARCHIVE in request.config_dict
        else ""
    )
    if configured:
        return configured.rstrip("/")
    proto = request.headers.get("X-Forwarded-Proto", request.scheme)
    host = request.headers.get("X-Forwarded-Host")
    if not host:
        host = request.host
        has_port = host.rsplit("]", 1)[-1].count(":") == 1
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not has_port and sockname and sockname[1] not in (80, 443):
            host = f"{host}:{sockname[1]}"
    return f"{proto}://{host}"


class StreamedAnswer(web.StreamResponse):
    """A response written piece by piece that answers HEAD with its headers
    alone.

    aiohttp sends whatever a handler writes to a ``StreamResponse``, for HEAD
    too, and with neither a length nor chunked framing: the client then
    reads those bytes as the start of its next answer on the connection.
    Handlers that can tell the answer's headers without producing its body
    start it with :meth:`begin`, which ends a HEAD answer there; the others
    write as for GET and nothing leaves."""

    head: bool = False

    async def prepare(self, request: web.BaseRequest) -> Any:
        self.head = request.method == "HEAD"
        return await super().prepare(request)

    async def begin(self, request: web.BaseRequest) -> bool:
        """Send the headers; for HEAD end the answer too and return True
        (the handler returns the response without producing its body)."""
        await self.prepare(request)
        if self.head:
            await self.write_eof()
        return self.head

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.head:
            await super().write(data)


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """The request's body read to its end, or None when it is over ``limit``
    bytes: declared so (``Content-Length``, refused before anything is read)
    or found so one byte past it (a chunked body); the caller answers 413.
    ``request.content.read(n)`` gives what has arrived so far, not the whole
    body: a body in several TCP segments was cut, and refused as not JSON
    (seen with a 64 KB report chapter)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    raw = b""
    while len(raw) <= limit:
        chunk = await request.content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    return None if len(raw) > limit else raw
