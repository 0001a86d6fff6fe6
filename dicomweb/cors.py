"""CORS (the Fetch standard's CORS protocol) for the DICOMweb API, so that a
viewer served from another origin (an OHIF deployment on its own host) can
query and retrieve from this archive.

Off by default: ``dicomweb.cors_origins`` lists the origins allowed
(``https://viewer.example.org``, scheme, host and port exactly as the browser
sends them in ``Origin``), or ``*`` for any origin.  A request whose origin is
not on the list gets no CORS header at all, so the browser keeps the answer
from the page; nothing else changes (CORS protects the user's browser, the
archive's own access control is authentication and scope, as for any client).

* A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is
  answered here, before authentication -- browsers never send credentials
  with it -- with the methods of the resource, the request headers asked
  for, and a max age.  An ``OPTIONS`` without them is answered with ``Allow``
  (RFC 9110 9.3.7).
* Every answer under ``/dicom-web`` to an allowed origin, errors and streamed
  bodies included, carries ``Access-Control-Allow-Origin`` (the origin itself,
  with ``Vary: Origin``) and exposes the headers a DICOMweb client reads
  (``Warning``, ``Content-Location``, ``Location``).
* ``dicomweb.cors_credentials`` adds ``Access-Control-Allow-Credentials:
  true``, for a viewer that sends cookies or HTTP authentication; it is
  refused together with ``*`` (the Fetch standard forbids a wildcard with
  credentials, and echoing any origin with them would hand every site the
  user's session).  A bearer token set by the viewer's own code needs no
  credentials mode: it is a request header, allowed by the preflight.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from archive.config import Config, Setting
from archive.security.http import public

PATH_PREFIX = "/dicom-web"
#: the headers of DICOMweb answers that a script must be able to read
EXPOSED = "Warning, Content-Location, Location, Content-Length"
MAX_AGE = "600"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _origins(value: Any) -> list[str]:
    """A list of origins (TOML array, or a comma-separated string), each
    ``scheme://host[:port]`` with no path, or ``*``."""
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError('a list of origins, e.g. ["https://viewer.example.org"]')
    out = []
    for raw in (v.strip() for v in value):
        if not raw:
            continue
        if raw == "*":
            out.append(raw)
            continue
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TypeError(f"origins as scheme://host[:port] (http or https), not {raw!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise TypeError(f"origins without a path, query or user (scheme://host), not {raw!r}")
        out.append(raw.rstrip("/").lower())
    return out


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise TypeError("true or false")


SETTINGS = [
    Setting(
        "dicomweb.cors_origins",
        [],
        _origins,
        "origins (scheme://host[:port]) whose pages may call the DICOMweb API from a "
        'browser (CORS), e.g. ["https://viewer.example.org"]; "*" for any; empty: none',
    ),
    Setting(
        "dicomweb.cors_credentials",
        False,
        _flag,
        "allow those origins' pages to send cookies / HTTP authentication "
        "(Access-Control-Allow-Credentials); not with *",
    ),
]


class Cors:
    """The CORS policy of one running archive."""

    def __init__(self, origins: list[str], credentials: bool) -> None:
        if credentials and "*" in origins:
            raise ValueError(
                "dicomweb.cors_credentials cannot be true with dicomweb.cors_origins = * "
                "(a wildcard origin never gets credentials): list the origins"
            )
        self.origins = set(origins)
        self.any = "*" in self.origins
        self.credentials = credentials

    @classmethod
    def from_config(cls, config: Config) -> Cors:
        return cls(config["dicomweb.cors_origins"], config["dicomweb.cors_credentials"])

    def allowed(self, origin: str | None) -> bool:
        return bool(origin) and (self.any or origin.lower() in self.origins)

    def headers(self, origin: str) -> dict[str, str]:
        """What an answer to ``origin`` (allowed) carries."""
        out = {"Access-Control-Allow-Origin": "*" if self.any else origin}
        if self.credentials:
            out["Access-Control-Allow-Credentials"] = "true"
        return out


def _vary(response: web.StreamResponse, *names: str) -> None:
    have = [v.strip() for v in response.headers.get("Vary", "").split(",") if v.strip()]
    for name in names:
        if name.lower() not in (h.lower() for h in have):
            have.append(name)
    response.headers["Vary"] = ", ".join(have)


async def _allowed_methods(request: web.Request) -> set[str]:
    """The methods the resource at the request's path answers (its routes)."""
    methods: set[str] = set()
    for resource in request.app.router.resources():
        _, allowed = await resource.resolve(request)
        methods |= set(allowed)
    return methods - {"OPTIONS", "*"}


def install(app: web.Application, sub: web.Application, cors: Cors) -> None:
    """Answer preflights in the DICOMweb sub-application ``sub`` (a catch-all
    OPTIONS route, added last, public), and add the CORS headers to every
    answer under :data:`PATH_PREFIX` through the main ``app``'s
    ``on_response_prepare`` (it runs for streamed answers, before their
    headers are sent, and for errors raised before any route matched)."""

    @public
    async def options(request: web.Request) -> web.StreamResponse:
        methods = await _allowed_methods(request)
        if not methods:
            raise web.HTTPNotFound(text=f"no resource {request.path}")
        allow = ", ".join(sorted(methods | {"OPTIONS"}))
        origin = request.headers.get("Origin")
        wanted = request.headers.get("Access-Control-Request-Method")
        response = web.Response(status=204, headers={"Allow": allow})
        if wanted and cors.allowed(origin) and wanted.upper() in methods:
            asked = [
                h.strip()
                for h in request.headers.get("Access-Control-Request-Headers", "").split(",")
                if _TOKEN.match(h.strip())
            ]
            response.headers["Access-Control-Allow-Methods"] = allow
            if asked:
                response.headers["Access-Control-Allow-Headers"] = ", ".join(asked)
            response.headers["Access-Control-Max-Age"] = MAX_AGE
        return response

    sub.router.add_route("OPTIONS", "/{tail:.*}", options)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        if not cors.origins:
            return
        if not (request.path == PATH_PREFIX or request.path.startswith(PATH_PREFIX + "/")):
            return
        origin = request.headers.get("Origin")
        _vary(response, "Origin")
        if not cors.allowed(origin):
            return
        assert origin is not None
        response.headers.update(cors.headers(origin))
        if request.method == "OPTIONS":
            _vary(response, "Access-Control-Request-Method", "Access-Control-Request-Headers")
        else:
            response.headers["Access-Control-Expose-Headers"] = EXPOSED

    app.on_response_prepare.append(add_headers)
