"""DICOMweb registered as a plugin of the core: its routes under ``/dicom-web``, and
its CORS settings (:mod:`dicomweb.cors`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from archive.hookspecs import hookimpl

if TYPE_CHECKING:
    from aiohttp import web

    from archive.config import Setting
    from archive.runtime import Archive


@hookimpl
def imag_routes(app: web.Application, archive: Archive) -> None:
    from dicomweb.routes import setup

    setup(app, archive)


@hookimpl
def imag_settings() -> list[Setting]:
    from dicomweb.cors import SETTINGS

    return list(SETTINGS)
