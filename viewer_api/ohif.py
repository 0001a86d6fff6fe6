"""The OHIF Viewer served from IMAG's own origin, reading this archive's DICOMweb.

Set ``viewer.ohif_dir`` to a built OHIF Viewer (the ``dist/`` folder of the
``@ohif/app`` package from the npm registry, unchanged) and ``imag serve``
serves it: the study list at ``/viewer/``, a study at
``/viewer/viewer?StudyInstanceUIDs=...``.  Same origin, so no CORS set-up and
no second web server.

Three things shape the routes:

* The npm build is made for the origin's root: its ``index.html`` loads
  ``/app.bundle.<hash>.js`` and ``/app-config.js``, and webpack fetches its
  chunks and WebAssembly codecs from ``/`` (``__webpack_require__.p = "/"``).
  Rewriting the build to move it under ``/viewer/`` would be a patched viewer,
  not the published one.  So each top-level entry of ``dist/`` (about a
  hundred hashed bundles, ``assets/``, ``ort/``...) is served at the exact
  path the build names, one route per entry, computed once at start-up; a name
  that an IMAG route already owns is left to IMAG (and logged).  Nothing else
  of the root is taken: an unknown path is still IMAG's 404.
* The single-page application's own pages (the study list, the viewer
  modes) live under ``/viewer/``: ``routerBasename`` is ``/viewer`` in the
  generated app config, and any path under it that is not a file answers
  ``index.html`` (the SPA fallback).
* ``app-config.js`` is generated here, never read from ``dist/``: OHIF's one
  DICOMweb data source points at this origin's ``/dicom-web`` (QIDO-RS,
  WADO-RS and WADO-URI roots) with the options IMAG supports.

Only the viewer's files are public (no patient data in them); every DICOMweb
request the viewer makes is authenticated like any other.  The viewer carries
the credential as ``Authorization: Bearer``, OHIF's own ways:
``?token=<API token or OIDC access token>`` on a viewer link (OHIF sends it on
every DICOMweb request and removes it from the address bar), or OHIF's OIDC
sign-in (``oidc`` in the app config) against the provider IMAG trusts
(``auth.oidc.issuer``) when ``viewer.oidc_client_id`` is set.

Files are looked up in a table of what ``dist/`` held at start-up, never by
joining a request path onto a folder: no path from a request reaches the
filesystem, so no traversal is possible.  Hashed file names are cached for a
year (``immutable``); everything else is revalidated (ETag) on each use, so an
upgraded viewer is picked up at once.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from archive.config import Setting, as_text
from archive.hookspecs import hookimpl
from archive.security.http import public

if TYPE_CHECKING:
    from archive.runtime import Archive

log = logging.getLogger(__name__)

#: where the single-page application's pages live (OHIF's routerBasename)
BASE = "/viewer"
#: OHIF's DICOMweb data source module (of @ohif/extension-default, in every build)
DICOMWEB_SOURCE = "@ohif/extension-default.dataSourcesModule.dicomweb"

#: media types by file extension: what the browser needs to run each file
#: (``application/wasm`` for streaming compilation of the codecs, a JavaScript
#: type for module scripts), not what the host's mime.types happens to say
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".jsonc": "application/json",
    ".webmanifest": "application/manifest+json",
    ".webapp": "application/x-web-app-manifest+json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
    ".onnx": "application/octet-stream",
}
#: a content hash in the file name (webpack's ``[contenthash:16]``): such a
#: file never changes under its name
HASHED = re.compile(r"(?:^|[./])[0-9a-f]{16}\.[a-z0-9]+$")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
#: files of ``dist/`` IMAG does not serve: Netlify's deployment rules, and the
#: build's own app config (replaced by the generated one)
NOT_SERVED = frozenset({"_headers", "_redirects", "serve.json", "app-config.js"})


def _ohif_dir(value: Any) -> str:
    """``viewer.ohif_dir``: empty (no viewer) or a folder with OHIF's index.html."""
    text = as_text(value)
    if text and not (Path(text) / "index.html").is_file():
        raise TypeError(
            "empty, or a folder holding a built OHIF Viewer (the dist/ of the "
            "@ohif/app package, with its index.html)"
        )
    return text


@hookimpl
def imag_settings() -> list[Setting]:
    return [
        Setting(
            "viewer.ohif_dir",
            "",
            _ohif_dir,
            "a built OHIF Viewer (dist/ of @ohif/app) served at /viewer/; empty: no viewer",
        ),
        Setting(
            "viewer.oidc_client_id",
            "",
            as_text,
            "OIDC client id of the viewer at auth.oidc.issuer; empty: sign in with ?token=",
        ),
        Setting("viewer.title", "IMAG", as_text, "name of the archive shown by the viewer"),
    ]


@hookimpl
def imag_routes(app: web.Application, archive: Archive) -> None:
    folder = archive.config["viewer.ohif_dir"]
    if folder:
        OhifSite(Path(folder), app_config(archive.config)).install(app)


def app_config(config: Any) -> str:
    """The ``app-config.js`` OHIF reads at start: one DICOMweb data source on
    this origin's ``/dicom-web``, with the options that match IMAG.

    The roots are computed in the browser from ``window.location.origin``:
    right behind any reverse proxy, with no host name to configure."""
    source = {
        "friendlyName": config["viewer.title"],
        "name": "imag",
        # QIDO-RS answers includefield (and includefield=all)
        "qidoSupportsIncludeField": True,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        # PN matching is case- and accent-insensitive, and fuzzymatching is accepted
        "supportsFuzzyMatching": True,
        "supportsWildcard": True,
        "supportsReject": False,
        "staticWado": False,
        # the metadata gives BulkDataURIs (pixel data, waveforms...), absolute
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
        "dicomUploadEnabled": False,
    }
    settings: dict[str, Any] = {
        "routerBasename": BASE,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "production",
        "defaultDataSourceName": "imag",
        "dataSources": [
            {"namespace": DICOMWEB_SOURCE, "sourceName": "imag", "configuration": source}
        ],
    }
    issuer, client_id = config["auth.oidc.issuer"], config["viewer.oidc_client_id"]
    if issuer and client_id:
        settings["oidc"] = [
            {
                "authority": issuer,
                "client_id": client_id,
                "response_type": "code",
                "scope": "openid profile",
                "post_logout_redirect_uri": "/viewer/",
            }
        ]
    roots = ["qidoRoot", "wadoRoot", "wadoUriRoot"]
    body = json.dumps(settings, indent=2, sort_keys=True)
    return (
        "// Generated by IMAG (viewer_api/ohif.py) from its configuration: "
        "edits here are lost.\n"
        f"window.config = {body};\n"
        "(function (source, origin) {\n"
        + "".join(f"  source.{root} = origin + '/dicom-web';\n" for root in roots)
        + "  if (window.config.oidc) {\n"
        "    window.config.oidc[0].redirect_uri = origin + '/viewer/callback';\n"
        "    window.config.oidc[0].post_logout_redirect_uri = origin + '/viewer/';\n"
        "  }\n"
        "})(window.config.dataSources[0].configuration, window.location.origin);\n"
    )


@dataclass(frozen=True)
class _File:
    path: Path
    media_type: str
    cache: str


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OhifSite:
    """The routes of one OHIF build: its files where the build names them, its
    pages under :data:`BASE`, and the generated app config."""

    def __init__(self, dist: Path, config_js: str) -> None:
        self.dist = dist.resolve()
        self.config_js = config_js.encode()
        self.files: dict[str, _File] = {}
        for path in sorted(self.dist.rglob("*")):
            relative = path.relative_to(self.dist).as_posix()
            if not path.is_file() or relative in NOT_SERVED:
                continue
            if not path.resolve().is_relative_to(self.dist):
                log.warning("viewer: %s points outside %s, not served", relative, self.dist)
                continue
            self.files[relative] = _File(path, _media_type(path), _cache(relative))
        self.index = self.files["index.html"]

    def install(self, app: web.Application) -> None:
        taken = {r.canonical for r in app.router.resources()}
        top = sorted({name.split("/", 1)[0] for name in self.files} | {"app-config.js"})
        for name in top:
            folder = any(f.startswith(name + "/") for f in self.files)
            path = f"/{name}/{{tail:.+}}" if folder else f"/{name}"
            if f"/{name}" in taken or path in taken or name == BASE.strip("/"):
                log.warning("viewer: /%s is an IMAG route; the viewer's file is not served", name)
                continue
            handler = self._root_folder(name) if folder else self._root_file(name)
            app.router.add_get(path, handler)
        app.router.add_get(BASE, self._redirect_to_base)
        app.router.add_get(BASE + "/{tail:.*}", self._page)

    def _respond(self, request: web.Request, relative: str) -> web.StreamResponse:
        if relative == "app-config.js":
            return web.Response(
                body=self.config_js,
                headers={"Content-Type": MEDIA_TYPES[".js"], "Cache-Control": REVALIDATE},
            )
        entry = self.files.get(relative)
        if entry is None:
            raise web.HTTPNotFound()
        return web.FileResponse(
            entry.path,
            headers={
                "Content-Type": entry.media_type,
                "Cache-Control": entry.cache,
                "X-Content-Type-Options": "nosniff",
            },
        )

    def _root_file(self, name: str) -> Handler:
        @public
        async def serve(request: web.Request) -> web.StreamResponse:
            return self._respond(request, name)

        return serve

    def _root_folder(self, name: str) -> Handler:
        @public
        async def serve(request: web.Request) -> web.StreamResponse:
            return self._respond(request, f"{name}/{request.match_info['tail']}")

        return serve

    @public
    async def _redirect_to_base(self, request: web.Request) -> web.StreamResponse:
        query = f"?{request.query_string}" if request.query_string else ""
        raise web.HTTPPermanentRedirect(f"{BASE}/{query}")

    @public
    async def _page(self, request: web.Request) -> web.StreamResponse:
        """A file of the build under /viewer/ (as a build made for that base
        would ask), else the application's page: the SPA fallback, so that a
        viewer link or a reload lands in OHIF's router."""
        tail = request.match_info["tail"]
        if tail == "app-config.js" or tail in self.files:
            return self._respond(request, tail)
        if Path(tail).suffix.lower() in MEDIA_TYPES.keys() - {".html"}:
            raise web.HTTPNotFound()  # a missing script is a 404, not a page of HTML
        return self._respond(request, "index.html")


def _media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _cache(relative: str) -> str:
    return IMMUTABLE if HASHED.search(relative) else REVALIDATE
