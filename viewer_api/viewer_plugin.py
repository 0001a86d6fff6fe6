"""The sharing portal's viewer, registered through the platform's hooks: its
settings (``viewer.*`` beside the OHIF ones), the permission to download a
study, the page (``/share/view``) and its JSON API (``/api/view``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from archive.config import Setting, as_bool, as_int
from archive.hookspecs import hookimpl

if TYPE_CHECKING:
    from aiohttp import web

    from archive.runtime import Archive

DOWNLOAD = "shares.download"
MB = 1 << 20


@hookimpl
def imag_settings() -> list[Setting]:
    return [
        Setting(
            "viewer.render_cache_bytes",
            128 * MB,
            as_int(0, 64 * 1024 * MB),
            "bytes of rendered images the viewer keeps in memory per process (0: none)",
        ),
        Setting(
            "viewer.reduced_decoding",
            True,
            as_bool,
            "decode JPEG 2000 / HTJ2K images at the resolution the viewer shows them",
        ),
        Setting(
            "viewer.jpeg_quality",
            90,
            as_int(30, 100),
            "JPEG quality of the images the viewer shows",
        ),
        Setting(
            "viewer.zip_max_frames",
            200,
            as_int(1, 100_000),
            "JPEGs written per multi-frame instance in a downloaded study",
        ),
    ]


@hookimpl
def imag_permissions() -> dict[str, str]:
    return {DOWNLOAD: "download a study as a ZIP (DICOM files, DICOMDIR, JPEGs, the report)"}


@hookimpl
def imag_routes(app: web.Application, archive: Archive) -> None:
    from viewer_api import page, view_http
    from viewer_api.render_cache import RenderCache

    view_http.add_routes(app, RenderCache(archive.config["viewer.render_cache_bytes"]))
    page.add_routes(app)
