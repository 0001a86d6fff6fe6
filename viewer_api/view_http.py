"""The web viewer's JSON API (``/api/view/...``), its images and the study ZIP.

Every route needs ``studies.read`` (the ZIP ``shares.download``) and reads
only through the archive's scoped look-ups with the caller's scope
(:func:`archive.security.http.scope_of`): a share link's principal, whose
scope is one study (and maybe some series), reaches that and nothing else; a
site user reaches its site's studies.  A study outside the scope is a 404,
audited as denied (:func:`~archive.security.http.deny_if_hidden`), the same
answer as a study that does not exist.

Routes (the page at ``/share/view`` calls them; nothing else is needed)::

    GET /api/view/study[?study=UID]                    the study: patient, series, reports
    GET /api/view/studies/{study}/series/{series}      its instances in order
    GET /api/view/studies/{study}/instances/{instance}/frames/{frame}/image
        ?viewport=W,H[&window=C,W]                     a frame as JPEG, at the size shown
    GET /api/view/studies/{study}/reports/{instance}   a PDF, or an SR's text as JSON
    GET /api/view/download[?study=UID]                 the study as a ZIP
    GET /api/view/mammography[?study=UID]              the four views, this round and priors

Images are rendered by :mod:`archive.pixels` at the viewport's size, decoded
at a reduced resolution where the codec allows (:mod:`viewer_api.reduced`),
and kept in a bounded in-process LRU (:mod:`viewer_api.render_cache`) after
the caller's access was checked.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pydicom
from aiohttp import web

from archive import pixels
from archive.query import QueryError
from archive.retrieve import StoredObject, UnreadableObject, locate, open_header
from archive.security.http import audit_of, deny_if_hidden, principal_of, require, scope_of
from archive.uids import is_valid_uid
from archive.web import ARCHIVE, StreamedAnswer, problem
from dicomweb.wado import OBJECT_ERRORS, refusal
from viewer_api import reduced
from viewer_api.mammography import VIEWS, mammography_layout
from viewer_api.render_cache import RenderCache
from viewer_api.study_view import (
    document_kind,
    locate_instance,
    series_instances,
    shared_study,
    sr_sections,
    study_summary,
)
from viewer_api.study_zip import Pipe, build_zip, zip_name

BASE = "/api/view"
DOWNLOAD = "shares.download"
CACHE = web.AppKey("viewer_render_cache", RenderCache)
#: the largest image the viewer may ask for (a 4K screen at 2x)
MAX_VIEWPORT = 4096
JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
#: rendered images: private (behind a credential), reusable by this browser
IMAGE_HEADERS = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}


def _archive(request: web.Request) -> Any:
    return request.app[ARCHIVE]


def _header_limits(request: web.Request) -> dict[str, int]:
    config = _archive(request).config
    return {
        "max_depth": config["dicomweb.max_metadata_depth"],
        "max_inflated": config["ingest.max_inflated_bytes"],
    }


async def _not_here(request: web.Request, keys: dict[str, str], level: str) -> web.Response:
    """404 for what is absent or outside the caller's scope (audited as denied)."""
    try:
        await deny_if_hidden(request, _archive(request).db, level, keys)
    except QueryError:
        pass
    what = {"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}[level]
    return problem(404, "Not Found", f"no {what} {list(keys.values())[-1]} here")


def _study_asked(request: web.Request) -> str | None:
    study = shared_study(scope_of(request), request.query.get("study", ""))
    audit_of(request).study_uid = study
    return study


def _no_study() -> web.Response:
    return problem(
        400, "Bad Request", "name the study: ?study=<StudyInstanceUID> (a share link names it)"
    )


@require("studies.read", "viewer.study")
async def show_study(request: web.Request) -> web.Response:
    """The study the caller was given, or asked for: what the page shows."""
    study = _study_asked(request)
    if not study:
        return _no_study()
    archive = _archive(request)
    try:
        summary = await asyncio.to_thread(study_summary, archive.db, study, scope_of(request))
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    if summary is None:
        return await _not_here(request, {"StudyInstanceUID": study}, "STUDY")
    base = f"{BASE}/studies/{study}"
    for series in summary["series"]:
        thumb = series.pop("thumbnail")
        series["url"] = f"{base}/series/{series['uid']}"
        series["thumbnail"] = (
            f"{base}/instances/{thumb['instance']}/frames/{thumb['frame']}/image?viewport=128,128"
        )
    for report in summary["reports"]:
        report["url"] = f"{base}/reports/{report['uid']}"
    allowed = principal_of(request).can(DOWNLOAD)
    summary["download"] = {
        "allowed": allowed,
        "url": f"{BASE}/download?study={study}" if allowed else None,
    }
    summary["image_url"] = base + "/instances/{instance}/frames/{frame}/image"
    return web.json_response(summary, headers=JSON_HEADERS)


@require("studies.read", "viewer.mammography")
async def mammography(request: web.Request) -> web.Response:
    """The mammography layout of the study: its four standard views and those
    of the woman's prior rounds the caller may see (:mod:`viewer_api.mammography`)."""
    study = _study_asked(request)
    if not study:
        return _no_study()
    if not is_valid_uid(study):
        return problem(400, "Bad Request", f"study: {study[:80]!r} is not a valid UID")
    archive = _archive(request)
    limits = _header_limits(request)
    try:
        layout = await asyncio.to_thread(
            mammography_layout,
            archive.db,
            archive.store,
            archive.identity,
            study,
            scope_of(request),
            max_depth=limits["max_depth"],
            max_inflated=limits["max_inflated"],
        )
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    if layout is None:
        return await _not_here(request, {"StudyInstanceUID": study}, "STUDY")
    for round_ in (layout["current"], *layout["priors"]):
        for view in VIEWS:
            cell = round_["views"][view]
            if cell is not None:
                cell["url"] = (
                    f"{BASE}/studies/{cell['study']}/instances/{cell['instance']}/frames/1/image"
                )
    # the other studies shown (maybe another site's): the audit names them
    audit_of(request).detail["priors"] = [p["study_uid"] for p in layout["priors"]]
    return web.json_response(layout, headers=JSON_HEADERS)


@require("studies.read", "viewer.series")
async def show_series(request: web.Request) -> web.Response:
    """The image instances of one series, in order."""
    study, series = request.match_info["study"], request.match_info["series"]
    archive = _archive(request)
    limits = _header_limits(request)
    try:
        found = await asyncio.to_thread(
            series_instances,
            archive.db,
            archive.store,
            study,
            series,
            scope_of(request),
            max_depth=limits["max_depth"],
            max_inflated=limits["max_inflated"],
        )
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    if found is None:
        keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
        return await _not_here(request, keys, "SERIES")
    return web.json_response({"uid": series, "instances": found}, headers=JSON_HEADERS)


def _image_params(request: web.Request) -> tuple[int, pixels.Viewport, pixels.Window | None]:
    try:
        frame = int(request.match_info["frame"])
    except ValueError:
        raise pixels.RenderError("the frame number is an integer from 1") from None
    if "viewport" not in request.query:
        raise pixels.RenderError("give the displayed size: viewport=width,height")
    viewport = pixels.parse_viewport(request.query["viewport"])
    if len(request.query["viewport"].split(",")) != 2:
        raise pixels.RenderError("viewport is width,height here (the viewer zooms itself)")
    if viewport.width > MAX_VIEWPORT or viewport.height > MAX_VIEWPORT:
        raise pixels.RenderError(f"viewport is at most {MAX_VIEWPORT},{MAX_VIEWPORT}")
    window = pixels.parse_window(request.query["window"]) if "window" in request.query else None
    return frame, viewport, window


@require("studies.read", "viewer.image")
async def image(request: web.Request) -> web.Response:
    """One frame as JPEG, fitted into the viewport the viewer shows it in."""
    study, instance = request.match_info["study"], request.match_info["instance"]
    try:
        frame, viewport, window = _image_params(request)
    except pixels.RenderError as exc:
        return problem(400, "Bad Request", str(exc))
    archive = _archive(request)
    try:
        item = await asyncio.to_thread(
            locate_instance, archive.db, study, instance, scope_of(request)
        )
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    if item is None:
        keys = {"StudyInstanceUID": study, "SOPInstanceUID": instance}
        return await _not_here(request, keys, "IMAGE")
    cache = request.app[CACHE]
    key = (item.sop_instance_uid, item.object_key, frame, viewport, window)
    body = cache.get(key)
    if body is None:
        try:
            body = await asyncio.to_thread(_render, archive, item, frame, viewport, window)
        except (pixels.FrameError, pixels.RenderError, pixels.TooLarge, *OBJECT_ERRORS) as exc:
            return refusal(item, exc, "rendered")
        cache.put(key, body)
    else:
        audit_of(request).detail["cached"] = True
    return web.Response(body=body, content_type="image/jpeg", headers=IMAGE_HEADERS)


def _render(
    archive: Any,
    item: StoredObject,
    frame: int,
    viewport: pixels.Viewport,
    window: pixels.Window | None,
) -> bytes:
    config = archive.config
    with open_header(
        archive.store,
        item,
        max_depth=config["dicomweb.max_metadata_depth"],
        max_inflated=config["ingest.max_inflated_bytes"],
    ) as header:
        source = reduced.image_file(
            header.dataset,
            header.file,
            header.pixel_at,
            viewport if config["viewer.reduced_decoding"] else None,
        )
        return pixels.render(
            source,
            frame,
            media_type="image/jpeg",
            window=window,
            viewport=viewport,
            quality=config["viewer.jpeg_quality"],
            max_bytes=config["dicomweb.max_built_bytes"],
        )


@require("studies.read", "viewer.report")
async def report(request: web.Request) -> web.StreamResponse:
    """A report document of the study: an Encapsulated PDF as application/pdf,
    a structured report as its text (JSON sections)."""
    study, instance = request.match_info["study"], request.match_info["instance"]
    archive = _archive(request)
    try:
        item = await asyncio.to_thread(
            locate_instance, archive.db, study, instance, scope_of(request)
        )
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    if item is None:
        keys = {"StudyInstanceUID": study, "SOPInstanceUID": instance}
        return await _not_here(request, keys, "IMAGE")
    kind = document_kind(item.sop_class_uid)
    if kind is None:
        return problem(404, "Not Found", f"instance {instance} is not a report document")
    try:
        ds = await asyncio.to_thread(_read, archive, item)
    except UnreadableObject as exc:
        return refusal(item, exc, "read")
    if kind == "sr":
        body = {"uid": instance, "kind": "sr", "sections": sr_sections(ds)}
        return web.json_response(body, headers=JSON_HEADERS)
    document = bytes(ds.get("EncapsulatedDocument") or b"")
    if document.endswith(b"\0"):
        document = document[:-1]
    return web.Response(
        body=document,
        content_type="application/pdf",
        headers={
            **JSON_HEADERS,
            "Content-Disposition": 'inline; filename="report.pdf"',
        },
    )


def _read(archive: Any, item: StoredObject) -> pydicom.Dataset:
    try:
        with archive.store.open(item.object_key) as source:
            return pydicom.dcmread(source)
    except (pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
        raise UnreadableObject(str(exc)) from exc


@require(DOWNLOAD, "viewer.download")
async def download(request: web.Request) -> web.StreamResponse:
    """The study as a ZIP (DICOMDIR + DICOM files + JPEGs + the report),
    streamed as it is built."""
    study = _study_asked(request)
    if not study:
        return _no_study()
    archive = _archive(request)
    scope = scope_of(request)
    try:
        summary = await asyncio.to_thread(study_summary, archive.db, study, scope)
        items = await asyncio.to_thread(
            locate, archive.db, "STUDY", {"StudyInstanceUID": study}, scope
        )
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    if summary is None or not items:
        return await _not_here(request, {"StudyInstanceUID": study}, "STUDY")
    audit_of(request).detail["instances"] = len(items)
    response = StreamedAnswer(
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{zip_name(summary["study"])}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
    )
    if request.method == "HEAD":  # the download's headers alone, nothing built
        await response.begin(request)
        return response
    config = archive.config
    pipe = Pipe()
    builder = asyncio.ensure_future(
        asyncio.to_thread(
            build_zip,
            archive.store,
            items,
            pipe,
            max_frames=config["viewer.zip_max_frames"],
            max_bytes=config["dicomweb.max_built_bytes"],
            header_limits=_header_limits(request),
        )
    )
    finished = False
    try:
        await response.prepare(request)
        while (chunk := await asyncio.to_thread(pipe.next_chunk)) is not None:
            await response.write(chunk)
        finished = True
    except Exception:
        # the builder failed or the client left: cut the connection, so that
        # a truncated ZIP is never taken for a whole one
        if request.transport is not None:
            request.transport.close()
        return response
    finally:
        if not finished:
            pipe.cancel()  # the builder stops at its next write
            with contextlib.suppress(Exception):
                await builder
    await builder
    await response.write_eof()
    return response


def add_routes(app: web.Application, cache: RenderCache) -> None:
    app[CACHE] = cache
    study = BASE + "/studies/{study}"
    app.router.add_get(BASE + "/study", show_study)
    app.router.add_get(study + "/series/{series}", show_series)
    app.router.add_get(study + "/instances/{instance}/frames/{frame}/image", image)
    app.router.add_get(study + "/reports/{instance}", report)
    app.router.add_get(BASE + "/download", download)
    app.router.add_get(BASE + "/mammography", mammography)
