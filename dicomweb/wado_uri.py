"""WADO-URI (PS3.18 9): ``?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..``.

``contentType=application/dicom`` returns the instance (in ``transferSyntax``
when given and producible); ``image/jpeg`` (the default) and ``image/png``
return a rendered frame, with ``frameNumber``, ``rows`` / ``columns``,
``windowCenter`` / ``windowWidth`` and ``imageQuality``.

The instance as stored is streamed from the object store; a conversion or a
rendering is built only within ``dicomweb.max_built_bytes``, and a stored
object that cannot give what is asked is 422, as in WADO-RS
(:mod:`dicomweb.wado`, whose helpers this uses).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from archive import pixels
from archive.codecs import encode_as, producible
from archive.query import QueryError
from archive.retrieve import locate
from archive.security.http import deny_if_hidden, require, scope_of
from archive.web import ARCHIVE, StreamedAnswer, problem
from dicomweb.wado import CHUNK, OBJECT_ERRORS, check_conversions, open_image, refusal

RENDERED = ("image/jpeg", "image/png", "image/gif")


def _int(params: dict, name: str, lo: int, hi: int) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer, not {raw!r}") from None
    if not lo <= value <= hi:
        raise QueryError(f"{name} must be between {lo} and {hi}, not {value}")
    return value


@require("studies.read", "wado-uri.retrieve")
async def wado(request: web.Request) -> web.StreamResponse:
    archive = request.app[ARCHIVE]
    params = request.query
    if params.get("requestType") != "WADO":
        return problem(400, "Bad Request", "requestType=WADO is required")
    missing = [p for p in ("studyUID", "seriesUID", "objectUID") if not params.get(p)]
    if missing:
        return problem(400, "Bad Request", f"missing parameter(s): {', '.join(missing)}")
    content_types = [c.strip() for c in params.get("contentType", "image/jpeg").split(",")]
    keys = {
        "StudyInstanceUID": params["studyUID"],
        "SeriesInstanceUID": params["seriesUID"],
        "SOPInstanceUID": params["objectUID"],
    }
    try:
        frame = _int(params, "frameNumber", 1, 2**31 - 1) or 1
        rows = _int(params, "rows", 1, 65535)
        columns = _int(params, "columns", 1, 65535)
        quality = _int(params, "imageQuality", 1, 100) or 90
        center, width = params.get("windowCenter"), params.get("windowWidth")
        window = None
        if center is not None or width is not None:
            try:
                window = (float(center or ""), float(width or ""))
            except ValueError:
                raise QueryError("windowCenter and windowWidth must both be numbers") from None
            if not all(abs(v) < float("inf") for v in window):
                raise QueryError("windowCenter and windowWidth must be finite numbers")
        items = await asyncio.to_thread(locate, archive.db, "IMAGE", keys, scope_of(request))
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    if not items:
        await deny_if_hidden(request, archive.db, "IMAGE", keys)
        return problem(404, "Not Found", "no such instance in this archive")
    item = items[0]

    if "application/dicom" in content_types:
        target = params.get("transferSyntax") or item.transfer_syntax
        if target not in producible(item.transfer_syntax):
            return problem(
                406, "Not Acceptable", f"cannot send this instance in transfer syntax {target}"
            )
        if target == item.transfer_syntax:  # as stored: streamed
            response = StreamedAnswer(headers={"Content-Type": "application/dicom"})
            response.content_length = item.size
            if request.method == "HEAD":  # the headers alone: the object is not opened
                await response.begin(request)
                return response
            stream = await asyncio.to_thread(archive.store.open, item.object_key)
            try:
                await response.prepare(request)
                while chunk := await asyncio.to_thread(stream.read, CHUNK):
                    await response.write(chunk)
            finally:
                await asyncio.to_thread(stream.close)
            await response.write_eof()
            return response
        refused = await check_conversions(request, [item], target)
        if refused is not None:
            return refused
        data = await asyncio.to_thread(archive.store.get, item.object_key)
        data = await asyncio.to_thread(encode_as, data, target)
        return web.Response(body=data, content_type="application/dicom")

    media = next((c for c in content_types if c in RENDERED or c == "*/*"), None)
    if media is None:
        return problem(
            406,
            "Not Acceptable",
            f"contentType must be application/dicom or one of {', '.join(RENDERED)}",
        )
    media = "image/jpeg" if media == "*/*" else media
    viewport = (columns or rows or 0, rows or columns or 0) if (rows or columns) else None
    limit = archive.config["dicomweb.max_built_bytes"]
    try:
        async with open_image(request, item) as image:
            body = await asyncio.to_thread(
                pixels.render,
                image,
                frame,
                media_type=media,
                window=window,
                viewport=viewport,
                quality=quality,
                max_bytes=limit,
            )
    except (pixels.FrameError, pixels.RenderError, pixels.TooLarge, *OBJECT_ERRORS) as exc:
        return refusal(item, exc, "rendered")
    return web.Response(body=body, content_type=media)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/wado", wado)
