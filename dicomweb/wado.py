"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data.

Instances are streamed as ``multipart/related; type="application/dicom"``,
part by part, straight from the object store when no conversion is needed
(objects over 2 GB included), so no study is ever held whole in memory.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

from aiohttp import web

from archive import metadata as meta
from archive.query import QueryError
from archive.retrieve import StoredObject, locate
from archive.runtime import Archive
from archive.server import ARCHIVE, problem, public_base
from archive.transcode import encode_as, producible
from dicomweb.accept import NotAcceptable, dicom_transfer_syntax, wants

CHUNK = 1 << 20


def _keys(request: web.Request) -> tuple[str, dict[str, str]]:
    info = request.match_info
    keys = {"StudyInstanceUID": info["study"]}
    level = "STUDY"
    if "series" in info:
        keys["SeriesInstanceUID"] = info["series"]
        level = "SERIES"
    if "instance" in info:
        keys["SOPInstanceUID"] = info["instance"]
        level = "IMAGE"
    return level, keys


async def _locate(request: web.Request) -> list[StoredObject]:
    archive = request.app[ARCHIVE]
    level, keys = _keys(request)
    items = await asyncio.to_thread(locate, archive.db, level, keys, None)
    if not items:
        raise web.HTTPNotFound(text=f"no {level.lower()} {list(keys.values())[-1]} here")
    return items


def base_url(request: web.Request) -> str:
    return public_base(request) + request.app["prefix"]


async def _chunks(archive: Archive, item: StoredObject, target: str) -> AsyncIterator[bytes]:
    """The object's bytes in ``target`` syntax, streamed when unconverted."""
    if target in ("*", item.transfer_syntax):
        stream = await asyncio.to_thread(archive.store.open, item.object_key)
        try:
            while chunk := await asyncio.to_thread(stream.read, CHUNK):
                yield chunk
        finally:
            stream.close()
        return
    data = await asyncio.to_thread(archive.store.get, item.object_key)
    yield await asyncio.to_thread(encode_as, data, target)


async def retrieve(request: web.Request) -> web.StreamResponse:
    """Study, series or instance as multipart/related application/dicom."""
    archive = request.app[ARCHIVE]
    try:
        items = await _locate(request)
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    stored = {i.transfer_syntax for i in items}
    can = set.intersection(*(producible(ts) for ts in stored))
    try:
        target = dicom_transfer_syntax(request.headers.get("Accept"), can, stored)
    except NotAcceptable as exc:
        return problem(406, "Not Acceptable", str(exc))
    boundary = secrets.token_hex(16)
    response = web.StreamResponse(
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        }
    )
    await response.prepare(request)
    for item in items:
        ts = item.transfer_syntax if target == "*" else target
        await response.write(
            f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={ts}\r\n"
            f"Content-Location: {meta.instance_url(item).replace(meta.BASE, base_url(request))}"
            "\r\n\r\n".encode()
        )
        async for chunk in _chunks(archive, item, target):
            await response.write(chunk)
        await response.write(b"\r\n")
    await response.write(f"--{boundary}--\r\n".encode())
    await response.write_eof()
    return response


async def metadata(request: web.Request) -> web.Response:
    """Metadata of a study, series or instance as application/dicom+json."""
    archive = request.app[ARCHIVE]
    try:
        wants(request.headers.get("Accept"), ["application/dicom+json", "application/json"])
    except NotAcceptable as exc:
        return problem(406, "Not Acceptable", str(exc))
    try:
        items = await _locate(request)
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    level, _ = _keys(request)
    if level == "IMAGE":
        body = [await asyncio.to_thread(meta.instance_metadata, archive.store, items[0])]
    else:
        body = []
        for series in dict.fromkeys((i.study_uid, i.series_uid) for i in items):
            body += (
                await asyncio.to_thread(meta.series_metadata, archive.db, archive.store, *series)
                or []
            )
    return web.Response(
        body=meta.with_base(body, base_url(request)).encode(), content_type="application/dicom+json"
    )


async def bulkdata(request: web.Request) -> web.Response:
    """A top-level bulk data element of an instance (application/octet-stream)."""
    import io

    import pydicom

    archive = request.app[ARCHIVE]
    try:
        items = await _locate(request)
        tag = int(request.match_info["tag"], 16)
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    except ValueError:
        return problem(400, "Bad Request", "bulk data is addressed by an 8-digit hex tag")
    data = await asyncio.to_thread(archive.store.get, items[0].object_key)
    ds = pydicom.dcmread(io.BytesIO(data))
    if tag not in ds or not isinstance(ds[tag].value, bytes):
        return problem(404, "Not Found", f"instance has no bulk data element {tag:08X}")
    boundary = secrets.token_hex(16)
    body = (
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + ds[tag].value
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return web.Response(
        body=body,
        headers={
            "Content-Type": f'multipart/related; type="application/octet-stream"; '
            f"boundary={boundary}"
        },
    )


def add_routes(app: web.Application) -> None:
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    for path in (study, series, instance):
        app.router.add_get(path, retrieve)
        app.router.add_get(path + "/metadata", metadata)
    app.router.add_get(instance + "/bulk/{tag}", bulkdata)
