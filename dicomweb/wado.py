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
from pydicom.dataset import FileDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from archive import metadata as meta
from archive import pixels
from archive.query import QueryError
from archive.retrieve import StoredObject, locate, read
from archive.runtime import Archive
from archive.security.http import deny_if_hidden, require, scope_of
from archive.server import ARCHIVE, problem, public_base
from archive.transcode import convert_for, encode_as, producible
from dicomweb.accept import NotAcceptable, dicom_transfer_syntax, parse_accept, wants

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
    items = await asyncio.to_thread(locate, archive.db, level, keys, scope_of(request))
    if not items:
        await deny_if_hidden(request, archive.db, level, keys)
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


@require("studies.read", "wado.retrieve")
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


@require("studies.read", "wado.metadata")
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


@require("studies.read", "wado.bulkdata")
async def bulkdata(request: web.Request) -> web.Response:
    """A top-level bulk data element of an instance (application/octet-stream)."""
    try:
        items = await _locate(request)
        tag = int(request.match_info["tag"], 16)
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    except ValueError:
        return problem(400, "Bad Request", "bulk data is addressed by an 8-digit hex tag")
    ds = await _dataset(request, items[0])
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
        # bulk data is sent little endian (PS3.18 8.7.3.3.2): swap the OW/OL/OF/OD/OV words
        ds = convert_for(ds, {ExplicitVRLittleEndian})
    if tag not in ds or not isinstance(ds[tag].value, bytes):
        return problem(404, "Not Found", f"instance has no bulk data element {tag:08X}")
    return _multipart([("application/octet-stream", ds[tag].value)])


# PS3.18 Table 8.7.3-2: media types of compressed frames, by transfer syntax
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def _multipart(parts: list[tuple[str, bytes]]) -> web.Response:
    boundary = secrets.token_hex(16)
    kinds = {kind.split(";")[0] for kind, _ in parts}
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
            for kind, data in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    part_type = kinds.pop() if len(kinds) == 1 else "application/octet-stream"
    return web.Response(
        body=body,
        headers={"Content-Type": f'multipart/related; type="{part_type}"; boundary={boundary}'},
    )


async def _dataset(request: web.Request, item: StoredObject) -> FileDataset:
    return await asyncio.to_thread(read, request.app[ARCHIVE].store, item)


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise QueryError(f"frame numbers must be integers separated by commas: {text!r}") from None
    if not numbers or any(n < 1 for n in numbers):
        raise QueryError(f"frame numbers start at 1: {text!r}")
    return numbers


@require("studies.read", "wado.frames")
async def frames(request: web.Request) -> web.Response:
    """Frames of an instance: as stored (transfer-syntax=*) or uncompressed."""
    try:
        items = await _locate(request)
        numbers = _frame_numbers(request.match_info["frames"])
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    item = items[0]
    compressed = item.transfer_syntax in FRAME_MEDIA
    accept = parse_accept(request.headers.get("Accept"))
    as_stored = any(
        m.params.get("transfer-syntax") == "*"
        or (compressed and m.part_type == FRAME_MEDIA[item.transfer_syntax])
        for m in accept
    )
    wants_native = any(
        m.part_type in ("application/octet-stream", "*/*")
        and m.params.get("transfer-syntax") in (None, ExplicitVRLittleEndian)
        for m in accept
    )
    if not as_stored and not wants_native:
        return problem(
            406,
            "Not Acceptable",
            "frames are sent as application/octet-stream "
            "(uncompressed) or, with transfer-syntax=*, as stored ("
            f"{FRAME_MEDIA.get(item.transfer_syntax, 'application/octet-stream')})",
        )
    ds = await _dataset(request, item)
    parts = []
    try:
        for n in numbers:
            if as_stored or not compressed:
                data = await asyncio.to_thread(pixels.get_frame_bytes, ds, n)
                kind = (
                    (f"{FRAME_MEDIA[item.transfer_syntax]}; transfer-syntax={item.transfer_syntax}")
                    if compressed and as_stored
                    else "application/octet-stream"
                )
            else:
                array = await asyncio.to_thread(pixels.decoded_frame, ds, n)
                data, kind = (
                    array.astype(array.dtype.newbyteorder("<")).tobytes(),
                    "application/octet-stream",
                )
            parts.append((kind, data))
    except pixels.FrameError as exc:
        return problem(400, "Bad Request", str(exc))
    except pixels.DecodeError as exc:
        return problem(500, "Internal Server Error", str(exc))
    return _multipart(parts)


def _render_params(request: web.Request) -> dict:
    query = request.query
    params: dict = {}
    if "window" in query:
        params["window"] = pixels.parse_window(query["window"])
    if "viewport" in query:
        params["viewport"] = pixels.parse_viewport(query["viewport"])
    if "quality" in query:
        try:
            params["quality"] = int(query["quality"])
        except ValueError:
            raise pixels.RenderError(f"quality must be 1-100, not {query['quality']!r}") from None
    return params


@require("studies.read", "wado.rendered")
async def rendered(request: web.Request) -> web.Response:
    """A rendered instance or frame (single image), or the rendered instances of a
    study or series (multipart, first frame of each)."""
    try:
        media = wants(request.headers.get("Accept"), list(pixels.MEDIA_TYPES))
    except NotAcceptable as exc:
        return problem(406, "Not Acceptable", str(exc))
    try:
        items = await _locate(request)
        params = _render_params(request)
        level, _ = _keys(request)
        frame = (
            _frame_numbers(request.match_info["frame"])[0] if "frame" in request.match_info else 1
        )
        images = []
        for item in items if level != "IMAGE" else items[:1]:
            ds = await _dataset(request, item)
            images.append(
                await asyncio.to_thread(pixels.render, ds, frame, media_type=media, **params)
            )
    except (QueryError, pixels.RenderError, pixels.FrameError) as exc:
        return problem(400, "Bad Request", str(exc))
    except pixels.DecodeError as exc:
        return problem(500, "Internal Server Error", str(exc))
    if level == "IMAGE":
        return web.Response(body=images[0], content_type=media)
    return _multipart([(media, image) for image in images])


@require("studies.read", "wado.thumbnail")
async def thumbnail(request: web.Request) -> web.Response:
    """A small image standing for a study, series, instance or frame."""
    try:
        media = wants(request.headers.get("Accept"), list(pixels.MEDIA_TYPES))
    except NotAcceptable as exc:
        return problem(406, "Not Acceptable", str(exc))
    try:
        items = await _locate(request)
        size = 128
        if "viewport" in request.query:
            vp = pixels.parse_viewport(request.query["viewport"])
            size = max(vp[0] or 0, vp[1] or 0) or 128
        level, _ = _keys(request)
        item = items[len(items) // 2] if level == "SERIES" else items[0]
        ds = await _dataset(request, item)
        if "frame" in request.match_info:
            frame = _frame_numbers(request.match_info["frame"])[0]
            body = await asyncio.to_thread(
                pixels.render, ds, frame, media_type=media, viewport=(size, size)
            )
        else:
            body = await asyncio.to_thread(pixels.thumbnail, ds, size=size, media_type=media)
    except (QueryError, pixels.RenderError, pixels.FrameError) as exc:
        return problem(400, "Bad Request", str(exc))
    except pixels.DecodeError as exc:
        return problem(500, "Internal Server Error", str(exc))
    return web.Response(body=body, content_type=media)


def add_routes(app: web.Application) -> None:
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    for path in (study, series, instance):
        app.router.add_get(path, retrieve)
        app.router.add_get(path + "/metadata", metadata)
    app.router.add_get(instance + "/bulk/{tag}", bulkdata)
    app.router.add_get(instance + "/frames/{frames}", frames)
    for path in (study, series, instance, instance + "/frames/{frame}"):
        app.router.add_get(path + "/rendered", rendered)
        app.router.add_get(path + "/thumbnail", thumbnail)
