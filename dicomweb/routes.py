"""Mount the DICOMweb services under ``/dicom-web`` (entry point ``imag.routes``)."""

from __future__ import annotations

from aiohttp import web

from archive.runtime import Archive
from archive.web import ARCHIVE
from dicomweb import PREFIX_KEY, qido, stow, wado, wado_uri
from dicomweb.cors import Cors, install

PREFIX = "/dicom-web"


def setup(app: web.Application, archive: Archive) -> None:
    """Add the DICOMweb sub-application to the archive's HTTP app."""
    # STOW-RS bodies are streamed part by part with their own limits
    sub = web.Application(client_max_size=archive.config["ingest.max_object_bytes"])
    stow.sweep_spool(archive.config.data_dir / "tmp")  # what a killed imag serve left
    sub[ARCHIVE] = archive
    sub[PREFIX_KEY] = PREFIX
    qido.add_routes(sub)
    wado.add_routes(sub)
    stow.add_routes(sub)
    wado_uri.add_routes(sub)
    install(app, sub, Cors.from_config(archive.config))  # its OPTIONS route comes last
    app.add_subapp(PREFIX, sub)
