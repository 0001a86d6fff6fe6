"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered.

Nothing a request can multiply is built whole in memory: every multipart
answer (instances of a study, frames, rendered instances, bulk data) is
streamed part by part, and each part is read from the stored object alone
(one frame of a multi-frame is read from the object, not the whole pixel
data), so memory is bounded by one part whatever the count.  What has to be
built (a rendered or decoded frame, an instance converted to another transfer
syntax) is checked from the header against ``dicomweb.max_built_bytes``
before it is built; a frames request lists at most
``dicomweb.max_frames_per_request`` frame numbers.

A stored object that cannot give what is asked (pixel data that does not
match its image attributes, undecodable data, a header that cannot be parsed)
is answered 422 with a problem naming the instance and the reason: the
request was fine and a retry will not help, so it is neither a 400 nor a 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from archive import metadata as meta
from archive import multipart, pixels
from archive.codecs import (
    HTJ2K_CONFORMS_TO,
    TranscodeError,
    encode_as,
    encode_frame,
    frame_syntaxes,
    producible,
)
from archive.query import QueryError
from archive.retrieve import StoredObject, UnreadableObject, locate, open_header
from archive.runtime import Archive
from archive.security.http import audit_of, deny_if_hidden, require, scope_of
from archive.web import ARCHIVE, StreamedAnswer, problem, public_base
from dicomweb import PREFIX_KEY, stored
from dicomweb.accept import NotAcceptable, dicom_transfer_syntax, matches, parse_accept, wants

log = logging.getLogger(__name__)
CHUNK = 1 << 20
UNPROCESSABLE = "Unprocessable Content"
#: the most Warning headers one answer carries (the rest are counted)
MAX_WARNINGS = 10
#: instances tried for a series' or study's thumbnail before giving up
THUMBNAIL_TRIES = 5


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
    return public_base(request) + request.app[PREFIX_KEY]


def _built_limit(request: web.Request) -> int:
    return request.app[ARCHIVE].config["dicomweb.max_built_bytes"]


def _header_limits(request: web.Request) -> dict[str, int]:
    config = request.app[ARCHIVE].config
    return {
        "max_depth": config["dicomweb.max_metadata_depth"],
        "max_inflated": config["ingest.max_inflated_bytes"],
    }


# --------------------------------------------------------------------------- refusals


def _too_large(exc: pixels.TooLarge, advice: str) -> web.Response:
    return problem(
        422,
        UNPROCESSABLE,
        f"{exc.what} needs {exc.needed} bytes to build, over dicomweb.max_built_bytes "
        f"({exc.limit}); {advice}",
    )


def _unprocessable(item: StoredObject, exc: Exception, doing: str) -> web.Response:
    """The stored instance cannot give what is asked: its own fault, 422."""
    return problem(
        422,
        UNPROCESSABLE,
        f"instance {item.sop_instance_uid} cannot be {doing}: {exc}; it can still be "
        "retrieved as stored (transfer-syntax=*)",
    )


#: errors that are properties of the stored object, not of the request
OBJECT_ERRORS = (pixels.InconsistentPixelData, pixels.DecodeError, UnreadableObject)


def refusal(item: StoredObject, exc: Exception, doing: str) -> web.Response:
    """The problem answer for an exception raised while building a part."""
    if isinstance(exc, pixels.TooLarge):
        return _too_large(exc, "ask for it as stored (transfer-syntax=*), or a smaller frame")
    if isinstance(exc, OBJECT_ERRORS):
        return _unprocessable(item, exc, doing)
    return problem(400, "Bad Request", str(exc))  # FrameError, RenderError, QueryError


@asynccontextmanager
async def open_image(request: web.Request, item: StoredObject) -> AsyncIterator[pixels.ImageFile]:
    """The stored instance opened for frame access (its header parsed, its
    pixel data left in the object), closed at the end of the block."""
    archive = request.app[ARCHIVE]
    stack = ExitStack()
    try:
        header = await asyncio.to_thread(
            stack.enter_context, open_header(archive.store, item, **_header_limits(request))
        )
        yield await asyncio.to_thread(
            pixels.ImageFile, header.dataset, header.file, header.pixel_at
        )
    finally:
        await asyncio.to_thread(stack.close)


# --------------------------------------------------------------------------- multipart


class _Parts:
    """A multipart/related answer written part by part as it is produced, or,
    with ``single``, a single-part body of one part's bytes and type (no
    envelope: PS3.18 8.7.4, a client that asked for a single-part media type
    reads the body as the value itself)."""

    def __init__(self, request: web.Request, part_type: str, *, single: bool = False) -> None:
        self.request = request
        self.single = single
        self.boundary = multipart.new_boundary()
        self.count = 0
        self.response = StreamedAnswer(
            headers={
                "Content-Type": part_type
                if single
                else multipart.content_type(self.boundary, part_type.split(";")[0])
            }
        )

    async def start(self) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)

    async def part(self, content_type: str, data: bytes = b"", location: str = "") -> None:
        self.count += 1
        if self.single:
            if self.count > 1:  # negotiation only chooses single part for one part
                raise RuntimeError("a second part in a single-part answer")
            if location:
                self.response.headers["Content-Location"] = location
            await self.start()
            if data:
                await self.response.write(data)
            return
        await self.start()
        await self.response.write(multipart.part_head(self.boundary, content_type, location) + data)

    async def write(self, data: bytes) -> None:
        await self.response.write(data)

    async def end_part(self) -> None:
        if not self.single:
            await self.response.write(multipart.PART_END)

    async def finish(self) -> web.StreamResponse:
        await self.start()
        if not self.single:
            await self.response.write(multipart.closing(self.boundary))
        await self.response.write_eof()
        return self.response

    def abort(self, what: str, exc: BaseException) -> web.StreamResponse:
        """A part failed after the status was sent: cut the connection, so the
        client sees an incomplete answer rather than a complete wrong one."""
        log.warning(
            "streamed answer aborted",
            extra={"path": self.request.path, "what": what, "error": str(exc)},
        )
        if self.request.transport is not None:
            self.request.transport.close()
        return self.response


# --------------------------------------------------------------------------- retrieve


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


def conversion_size(store: Any, item: StoredObject, limits: dict[str, int]) -> int:
    """What converting ``item`` builds: its decoded size (all frames), from
    its header; raises UnreadableObject when that cannot be known."""
    with open_header(store, item, **limits) as header:
        if header.dropped:
            raise UnreadableObject(
                f"its sequences {', '.join(header.dropped)} nest too deeply to be re-encoded"
            )
        ds = header.dataset
        if header.pixel_at is None or "Rows" not in ds:
            return item.size
        try:
            frame = (
                int(ds.Rows)
                * int(ds.Columns)
                * int(ds.get("SamplesPerPixel") or 1)
                * max(int(ds.get("BitsAllocated") or 8) // 8, 1)
            )
            frames = max(int(ds.get("NumberOfFrames") or 1), 1)
        except (TypeError, ValueError) as exc:
            raise UnreadableObject(f"its Image Pixel module is unreadable: {exc}") from None
        return max(frame * frames, item.size)


async def check_conversions(
    request: web.Request, items: list[StoredObject], target: str
) -> web.Response | None:
    """Before a byte is sent: every instance that must be converted to
    ``target`` can be within ``dicomweb.max_built_bytes``; else the problem."""
    archive = request.app[ARCHIVE]
    limit = _built_limit(request)
    limits = _header_limits(request)
    for item in items:
        if target in ("*", item.transfer_syntax):
            continue
        try:
            size = await asyncio.to_thread(conversion_size, archive.store, item, limits)
        except UnreadableObject as exc:
            return _unprocessable(item, exc, f"converted to {UID(target).name}")
        if size > limit:
            return problem(
                422,
                UNPROCESSABLE,
                f"instance {item.sop_instance_uid} is {size} bytes decoded: converting it to "
                f"{UID(target).name} would build more than dicomweb.max_built_bytes ({limit}); "
                "retrieve it as stored (transfer-syntax=*)",
            )
    return None


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
        target, single = dicom_transfer_syntax(
            request.headers.get("Accept"), can, stored, single_ok=_keys(request)[0] == "IMAGE"
        )
    except NotAcceptable as exc:
        return problem(406, "Not Acceptable", str(exc))
    refused = await check_conversions(request, items, target)
    if refused is not None:
        return refused
    base = base_url(request)
    first = items[0].transfer_syntax if target == "*" else target
    parts = _Parts(
        request,
        f"application/dicom; transfer-syntax={first}" if single else "application/dicom",
        single=single,
    )
    if all(target in ("*", item.transfer_syntax) for item in items):
        return await _send_as_stored(request, parts, items, base)
    for item in items:
        ts = item.transfer_syntax if target == "*" else target
        try:
            await parts.part(
                f"application/dicom; transfer-syntax={ts}",
                location=meta.instance_url(item).replace(meta.BASE, base),
            )
            async for chunk in _chunks(archive, item, target):
                await parts.write(chunk)
            await parts.end_part()
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - after the status: cut, never a wrong answer
            return parts.abort(f"instance {item.sop_instance_uid}", exc)
    return await parts.finish()


async def _send_as_stored(
    request: web.Request, parts: _Parts, items: list[StoredObject], base: str
) -> web.StreamResponse:
    """Instances that need no conversion: their stored bytes, with a
    Content-Length and, on a plain connection, sendfile (:mod:`dicomweb.stored`)."""
    archive = request.app[ARCHIVE]
    if parts.single:
        (item,) = items
        parts.response.headers["Content-Location"] = meta.instance_url(item).replace(
            meta.BASE, base
        )
        heads = [b""]
        after = end = b""
    else:
        heads = [
            multipart.part_head(
                parts.boundary,
                f"application/dicom; transfer-syntax={item.transfer_syntax}",
                meta.instance_url(item).replace(meta.BASE, base),
            )
            for item in items
        ]
        after, end = multipart.PART_END, multipart.closing(parts.boundary)
    parts.response.content_length = stored.content_length(items, heads, len(after)) + len(end)
    try:
        await stored.send(request, parts.response, archive.store, items, heads, after, end)
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - after the status: cut, never a wrong answer
        return parts.abort("an instance as stored", exc)
    return parts.response


# --------------------------------------------------------------------------- metadata


def _warning_headers(warnings: list[str]) -> list[tuple[str, str]]:
    """RFC 7234 ``Warning: 299`` headers (as QIDO-RS uses them), at most
    :data:`MAX_WARNINGS`, quotes and non-Latin-1 characters removed."""

    def clean(text: str) -> str:
        return text.replace('"', "'").encode("latin-1", "replace").decode("latin-1")

    out = [("Warning", f'299 IMAG "{clean(w)}"') for w in warnings[:MAX_WARNINGS]]
    if len(warnings) > MAX_WARNINGS:
        more = len(warnings) - MAX_WARNINGS
        out.append(("Warning", f'299 IMAG "and {more} more warnings of the same kind"'))
    return out


@require("studies.read", "wado.metadata")
async def metadata(request: web.Request) -> web.StreamResponse:
    """Metadata of a study, series or instance as application/dicom+json.

    An instance whose header cannot be read, or whose sequences nest deeper
    than ``dicomweb.max_metadata_depth``, does not fail the others: it is
    left out (unreadable) or given without its too-deep elements, and the
    answer says so in ``Warning`` headers.  Asked alone, an unreadable
    instance is 422."""
    archive = request.app[ARCHIVE]
    config = archive.config
    try:
        wants(request.headers.get("Accept"), ["application/dicom+json", "application/json"])
    except NotAcceptable as exc:
        return problem(406, "Not Acceptable", str(exc))
    try:
        items = await _locate(request)
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    level, _ = _keys(request)
    base = base_url(request)
    depth = config["dicomweb.max_metadata_depth"]
    if level == "IMAGE":
        try:
            body, warnings = await asyncio.to_thread(
                meta.instance_metadata,
                archive.store,
                items[0],
                max_depth=depth,
                max_inflated=config["ingest.max_inflated_bytes"],
            )
        except UnreadableObject as exc:
            return _unprocessable(items[0], exc, "described")
        if warnings:
            audit_of(request).detail["warnings"] = len(warnings)
        response = web.Response(
            body=meta.with_base([body], base).encode(), content_type="application/dicom+json"
        )
        for name, value in _warning_headers(warnings):
            response.headers.add(name, value)
        return response

    def series_text(study_uid: str, series_uid: str) -> meta.SeriesMetadata | None:
        return meta.series_metadata(
            archive.db,
            archive.store,
            study_uid,
            series_uid,
            max_depth=depth,
            max_inflated=config["ingest.max_inflated_bytes"],
        )

    series_list = list(dict.fromkeys((i.study_uid, i.series_uid) for i in items))
    # first bring every series' cache up to date (one series in memory at a
    # time) for the warnings, which go in the headers; then stream them
    warnings: list[str] = []
    texts: dict[tuple[str, str], str] = {}
    for series in series_list:
        found = await asyncio.to_thread(series_text, *series)
        if found is not None:
            warnings += found.warnings
            if len(series_list) == 1:
                texts[series] = found.text
    if warnings:
        audit_of(request).detail["warnings"] = len(warnings)
    response = StreamedAnswer(headers={"Content-Type": "application/dicom+json"})
    for name, value in _warning_headers(warnings):
        response.headers.add(name, value)
    if await response.begin(request):
        return response
    await response.write(b"[")
    first = True
    for series in series_list:
        text = texts.pop(series, None)
        if text is None:
            found = await asyncio.to_thread(series_text, *series)
            text = found.text if found is not None else "[]"
        inner = text.strip()[1:-1].strip()
        if inner:
            await response.write((b"" if first else b",") + inner.replace(meta.BASE, base).encode())
            first = False
    await response.write(b"]")
    await response.write_eof()
    return response


# --------------------------------------------------------------------------- pixel negotiation

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
NATIVE = "application/octet-stream"
#: HTJ2K frames (PS3.18 Table 8.7.3-2); without a transfer-syntax parameter
#: it means HTJ2K Lossless (.201)
HTJ2K_MEDIA = "image/jphc"
HTJ2K_DEFAULT = "1.2.840.10008.1.2.4.201"
_MULTIPART = ("multipart/related", "multipart/*", "*/*", "*")


@dataclass(frozen=True)
class PixelPlan:
    """How frames or pixel data are sent: the Content-Type of each part (or
    of the single-part body), whether frames are decoded (to native little
    endian samples, or to be re-encoded), whether the body is single part,
    and the syntax frames are re-encoded in (``encode``, HTJ2K) if any."""

    content_type: str
    decode: bool
    single: bool
    encode: str = ""


def pixel_plan(
    accept: str | None,
    stored: str,
    *,
    stored_parts: int,
    native_parts: int,
    encodable: Collection[str] = frozenset(),
) -> PixelPlan:
    """The answer to an Accept header for frames or for the pixel data bulk
    resource (PS3.18 8.7.3, 8.7.4), one negotiation for both.

    Compressed data (``stored`` in :data:`FRAME_MEDIA`) is sent as stored
    when ``transfer-syntax=*`` or its own media type (and syntax) is asked,
    otherwise decoded to application/octet-stream (Explicit VR Little Endian,
    the PS3.18 default); native data is application/octet-stream, little
    endian.  ``image/jphc`` (named, not through a wildcard) gets HTJ2K: the
    stored codestreams when they are of the syntax asked (a .202 codestream
    is also a .201 one, a lossless one also a .203 one), else frames
    re-encoded one by one when the syntax asked (.201 by default) is in
    ``encodable`` (:func:`archive.codecs.frame_syntaxes`).  A single-part
    media type (not multipart/related, not ``*/*``) gets a single-part body,
    only when the answer is one part (``stored_parts`` as stored or
    re-encoded, ``native_parts`` decoded or native): never
    an envelope that was not asked for.  Media ranges are tried best q
    first.  Raises NotAcceptable when none can be honoured."""
    media = FRAME_MEDIA.get(stored)
    for m in parse_accept(accept):
        if m.q <= 0:
            continue
        multi = m.media_type in _MULTIPART
        part, ts = m.part_type, m.params.get("transfer-syntax")
        # transfer-syntax=* leaves the syntax to us, not the media type: a
        # named image type that is not the stored one is not "as stored"
        as_stored = media is not None and (
            (ts == "*" and (part in ("*/*", NATIVE) or matches(part, media)))
            or (ts in (None, stored) and part != "*/*" and matches(part, media))
        )
        if as_stored and (multi or stored_parts == 1):
            return PixelPlan(f"{media}; transfer-syntax={stored}", False, not multi)
        if part == HTJ2K_MEDIA and (multi or stored_parts == 1):
            wanted = HTJ2K_DEFAULT if ts in (None, "*") else ts
            answer = f"{HTJ2K_MEDIA}; transfer-syntax={wanted}"
            if wanted in HTJ2K_CONFORMS_TO.get(stored, ()):
                return PixelPlan(answer, False, not multi)
            if wanted in encodable:
                return PixelPlan(answer, True, not multi, encode=wanted)
        native = matches(part, NATIVE) and (
            ts in (None, ExplicitVRLittleEndian) or (media is None and ts in ("*", stored))
        )
        if native and (multi or native_parts == 1):
            return PixelPlan(NATIVE, media is not None, not multi)
    single = "" if stored_parts == 1 else "; a single-part body holds one frame"
    htj2k = ""
    if encodable:
        htj2k = f", or as {HTJ2K_MEDIA} ({', '.join(sorted(encodable))}) re-encoded losslessly"
    raise NotAcceptable(
        f"pixel data is sent as {NATIVE} (uncompressed, little endian) or, with "
        f"transfer-syntax=*, as stored ({media or NATIVE}){htj2k}, in multipart/related or, "
        f"for one part, as a single-part body{single}"
    )


def reencodable(image: pixels.ImageFile) -> frozenset[str]:
    """The HTJ2K syntaxes the frames of ``image`` can be re-encoded in (none
    for float pixel data or an image without pixels)."""
    if image.keyword != "PixelData":
        return frozenset()
    return frozenset(frame_syntaxes(image.header))


def _frame_reader(plan: PixelPlan, limit: int) -> Callable[[pixels.ImageFile, int], bytes]:
    """Frame n (1-based) as the plan sends it: as stored, decoded to little
    endian samples within ``limit`` bytes, or decoded and re-encoded as HTJ2K
    with *Bits Stored* as its precision."""

    def frame(image: pixels.ImageFile, n: int) -> bytes:
        if not plan.decode:
            return pixels.get_frame_bytes(image, n)
        array = pixels.decoded_frame(image, n, max_bytes=limit)
        if plan.encode:
            header = image.header
            bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 8)
            try:
                return encode_frame(array, plan.encode, bits)
            except TranscodeError as exc:
                raise pixels.DecodeError(f"frame {n} cannot be re-encoded: {exc}") from exc
        return array.astype(array.dtype.newbyteorder("<")).tobytes()

    return frame


async def _send_frames(
    request: web.Request,
    image: pixels.ImageFile,
    numbers: list[int],
    plan: PixelPlan,
    *,
    one_part: bool,
) -> web.StreamResponse:
    """Frames ``numbers`` as ``plan`` says, one part each, or all in one part
    (``one_part``: the pixel data value, frames concatenated).  The first
    frame is built before the status is sent, so that its refusal is a proper
    problem answer; a later failure cuts the connection."""
    read = _frame_reader(plan, _built_limit(request))
    data = await asyncio.to_thread(read, image, numbers[0])
    parts = _Parts(request, plan.content_type, single=plan.single)
    last = numbers[0]
    n = last
    try:
        if one_part:
            await parts.part(plan.content_type, data)
        for n in numbers:
            if n != last:
                data = await asyncio.to_thread(read, image, n)
                last = n
            if one_part:
                if n != numbers[0]:
                    await parts.write(data)
                continue
            await parts.part(plan.content_type, data)
            await parts.end_part()
        if one_part:
            await parts.end_part()
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - after the status: cut
        return parts.abort(f"frame {n}", exc)
    return await parts.finish()


# --------------------------------------------------------------------------- bulk data


def bulk_steps(text: str, max_depth: int) -> list[int]:
    """The steps of a bulk data path (``54000100/0/54001010``): tags of 8
    hex digits and 0-based item indexes alternating, a tag first and last, at
    most ``max_depth`` sequences deep.  Raises ValueError otherwise."""
    fields = text.split("/")
    if len(fields) % 2 == 0 or len(fields) > 2 * max_depth + 1:
        raise ValueError(text)
    steps = []
    for i, field in enumerate(fields):
        if i % 2 == 0:
            if len(field) != 8 or not all(c in "0123456789abcdefABCDEF" for c in field):
                raise ValueError(field)
            steps.append(int(field, 16))
        else:
            if not (field.isascii() and field.isdigit()) or len(field) > 9:
                raise ValueError(field)
            steps.append(int(field))
    return steps


def nested_element(ds: Dataset, steps: list[int]) -> tuple[DataElement | None, str]:
    """The binary element at ``steps`` in ``ds``, or None and what is missing."""
    current = ds
    for i in range(0, len(steps) - 1, 2):
        tag, index = steps[i], steps[i + 1]
        elem = current.get(tag)
        if elem is None or elem.VR != "SQ":
            return None, f"no sequence {tag:08X} at {meta.bulk_path(*steps[:i]) or 'top level'}"
        if index >= len(elem.value):
            return None, (
                f"sequence {meta.bulk_path(*steps[: i + 1])} has {len(elem.value)} item(s), "
                f"numbered from 0: no item {index}"
            )
        current = elem.value[index]
    elem = current.get(steps[-1])
    if elem is None or elem.VR == "SQ" or not isinstance(elem.value, bytes) or not elem.value:
        return None, f"no binary value {meta.bulk_path(*steps)}"
    return elem, ""


@require("studies.read", "wado.bulkdata")
async def bulkdata(request: web.Request) -> web.StreamResponse:
    """A bulk data value of an instance, at any depth in its sequences
    (``/bulk/54000100/0/54001010``, item indexes 0-based, as metadata gives
    them), little endian (PS3.18 8.7.3.3.2), streamed; multipart/related or,
    when a single-part media type is asked, the bare value.  The pixel data
    goes through the negotiation of frames (:func:`pixel_plan`): compressed
    pixel data is sent decoded unless it is asked as stored."""
    archive = request.app[ARCHIVE]
    path = request.match_info["path"]
    try:
        steps = bulk_steps(path, archive.config["dicomweb.max_metadata_depth"])
        items = await _locate(request)
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    except ValueError:
        return problem(
            400,
            "Bad Request",
            "bulk data is addressed by an 8-digit hex tag, or a path of sequence tags and "
            f"0-based item indexes (54000100/0/54001010), not {path[:200]!r}",
        )
    item = items[0]
    accept = request.headers.get("Accept")
    try:
        async with open_image(request, item) as image:
            pixel = image.keyword is not None and len(steps) == 1
            if pixel and image.keyword == pixels.PIXEL_KEYWORDS.get(steps[0]):
                return await _pixel_bulk(request, image, accept)
            elem, missing = nested_element(image.header, steps)
            if elem is None:
                return problem(404, "Not Found", f"instance {item.sop_instance_uid} has {missing}")
            try:
                plan = pixel_plan(accept, ExplicitVRLittleEndian, stored_parts=1, native_parts=1)
            except NotAcceptable as exc:
                return problem(406, "Not Acceptable", str(exc))
            value = meta.little_endian_bytes(elem.value, elem.VR, image.syntax.is_little_endian)
            parts = _Parts(request, NATIVE, single=plan.single)
            await parts.part(NATIVE, value)
            await parts.end_part()
            return await parts.finish()
    except (pixels.FrameError, pixels.TooLarge, *OBJECT_ERRORS) as exc:
        return refusal(item, exc, "read for its bulk data")


async def _pixel_bulk(
    request: web.Request, image: pixels.ImageFile, accept: str | None
) -> web.StreamResponse:
    """The pixel data bulk resource: native data (or compressed data of a
    syntax without a frame media type, e.g. video) streamed as stored, little
    endian; compressed images as frames parts when asked as stored, else
    decoded frame by frame into one application/octet-stream value."""
    stored = str(image.syntax)
    compressed = stored in FRAME_MEDIA
    encodable = await asyncio.to_thread(reencodable, image)
    count = await asyncio.to_thread(pixels.frame_count, image) if compressed or encodable else 1
    try:
        plan = pixel_plan(accept, stored, stored_parts=count, native_parts=1, encodable=encodable)
    except NotAcceptable as exc:
        return problem(406, "Not Acceptable", str(exc))
    if compressed or plan.encode:
        return await _send_frames(
            request,
            image,
            list(range(1, count + 1)),
            plan,
            one_part=plan.decode and not plan.encode,
        )
    chunks = image.value_chunks(CHUNK)
    first = await asyncio.to_thread(next, chunks, b"")
    parts = _Parts(request, NATIVE, single=plan.single)
    try:
        await parts.part(NATIVE, first)
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            await parts.write(chunk)
        await parts.end_part()
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - after the status: cut
        return parts.abort("bulk data 7FE00010", exc)
    return await parts.finish()


# --------------------------------------------------------------------------- frames


def _frame_numbers(text: str, limit: int | None = None) -> list[int]:
    """The frame list of a URL (PS3.18 8.3.3.1: comma-separated, 1-based, in
    the order asked).  Repeats count against ``limit``: each is a part built
    and sent, which is what the limit bounds."""
    fields = [n for n in text.split(",") if n.strip()]
    if limit is not None and len(fields) > limit:
        raise QueryError(
            f"{len(fields)} frame numbers asked, at most {limit} per request "
            "(dicomweb.max_frames_per_request; repeated numbers count): "
            "split the request, or retrieve the instance"
        )
    try:
        numbers = [int(n) for n in fields]
    except ValueError:
        raise QueryError(
            f"frame numbers must be integers separated by commas: {text[:200]!r}"
        ) from None
    if not numbers or any(n < 1 for n in numbers):
        raise QueryError(f"frame numbers start at 1: {text[:200]!r}")
    return numbers


@require("studies.read", "wado.frames")
async def frames(request: web.Request) -> web.StreamResponse:
    """Frames of an instance: as stored (transfer-syntax=*), uncompressed, or
    HTJ2K (image/jphc, re-encoded when not stored so), streamed one frame at
    a time; one frame may be asked single part."""
    archive = request.app[ARCHIVE]
    try:
        numbers = _frame_numbers(
            request.match_info["frames"], archive.config["dicomweb.max_frames_per_request"]
        )
        items = await _locate(request)
    except QueryError as exc:
        return problem(400, "Bad Request", str(exc))
    item = items[0]
    try:
        async with open_image(request, item) as image:
            try:
                plan = pixel_plan(
                    request.headers.get("Accept"),
                    item.transfer_syntax,
                    stored_parts=len(numbers),
                    native_parts=len(numbers),
                    encodable=await asyncio.to_thread(reencodable, image),
                )
            except NotAcceptable as exc:
                return problem(406, "Not Acceptable", str(exc))
            count = await asyncio.to_thread(pixels.frame_count, image)
            beyond = sorted({n for n in numbers if n > count})
            if beyond:
                unit = "frame" if count == 1 else "frames"
                return problem(
                    400,
                    "Bad Request",
                    f"frame {beyond[0]} requested, the instance has {count} {unit}",
                )
            return await _send_frames(request, image, numbers, plan, one_part=False)
    except (pixels.FrameError, pixels.TooLarge, *OBJECT_ERRORS) as exc:
        return refusal(item, exc, "cut into frames")


# --------------------------------------------------------------------------- rendered


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
        if not 1 <= params["quality"] <= 100:
            raise pixels.RenderError(f"quality must be 1-100, not {query['quality']!r}")
    return params


async def _render_one(
    request: web.Request, item: StoredObject, render: Callable[[pixels.ImageFile], bytes]
) -> bytes:
    async with open_image(request, item) as image:
        return await asyncio.to_thread(render, image)


@require("studies.read", "wado.rendered")
async def rendered(request: web.Request) -> web.StreamResponse:
    """A rendered instance or frame (single image), or the rendered instances of a
    study or series (multipart, first frame of each, streamed; an instance
    that cannot be rendered is left out and logged, or 422 when none can)."""
    try:
        media = wants(request.headers.get("Accept"), list(pixels.MEDIA_TYPES))
    except NotAcceptable as exc:
        return problem(406, "Not Acceptable", str(exc))
    try:
        params = _render_params(request)
        frame = (
            _frame_numbers(request.match_info["frame"])[0] if "frame" in request.match_info else 1
        )
        items = await _locate(request)
    except (QueryError, pixels.RenderError) as exc:
        return problem(400, "Bad Request", str(exc))
    level, _ = _keys(request)
    limit = _built_limit(request)

    def render(image: pixels.ImageFile) -> bytes:
        return pixels.render(image, frame, media_type=media, max_bytes=limit, **params)

    if level == "IMAGE":
        try:
            body = await _render_one(request, items[0], render)
        except (pixels.FrameError, pixels.RenderError, pixels.TooLarge, *OBJECT_ERRORS) as exc:
            return refusal(items[0], exc, "rendered")
        return web.Response(body=body, content_type=media)
    parts = _Parts(request, media)
    refused: tuple[StoredObject, Exception] | None = None
    for item in items:
        try:
            image = await _render_one(request, item, render)
        except (pixels.TooLarge, *OBJECT_ERRORS) as exc:
            log.warning(
                "instance left out of a rendered answer",
                extra={"sop_instance_uid": item.sop_instance_uid, "error": str(exc)},
            )
            refused = refused or (item, exc)
            continue
        except (pixels.FrameError, pixels.RenderError) as exc:
            if not parts.response.prepared:
                return problem(400, "Bad Request", str(exc))
            return parts.abort(f"instance {item.sop_instance_uid}", exc)
        await parts.part(media, image)
        await parts.end_part()
    if not parts.response.prepared and refused is not None:
        return refusal(refused[0], refused[1], "rendered")
    return await parts.finish()


@require("studies.read", "wado.thumbnail")
async def thumbnail(request: web.Request) -> web.Response:
    """A small image standing for a study, series, instance or frame."""
    try:
        media = wants(request.headers.get("Accept"), list(pixels.MEDIA_TYPES))
    except NotAcceptable as exc:
        return problem(406, "Not Acceptable", str(exc))
    try:
        size = 128
        if "viewport" in request.query:
            vp = pixels.parse_viewport(request.query["viewport"])
            size = max(vp[0] or 0, vp[1] or 0) or 128
        frame = (
            _frame_numbers(request.match_info["frame"])[0] if "frame" in request.match_info else 0
        )
        items = await _locate(request)
    except (QueryError, pixels.RenderError) as exc:
        return problem(400, "Bad Request", str(exc))
    level, _ = _keys(request)
    # a series stands for itself by its middle instance, a study by its first;
    # when that one cannot be rendered, the next ones are tried (a few)
    start = len(items) // 2 if level == "SERIES" else 0
    candidates = (items[start:] + items[:start])[:THUMBNAIL_TRIES]
    limit = _built_limit(request)

    def render(image: pixels.ImageFile) -> bytes:
        if frame:
            return pixels.render(
                image, frame, media_type=media, viewport=(size, size), max_bytes=limit
            )
        return pixels.thumbnail(image, size=size, media_type=media, max_bytes=limit)

    first: tuple[StoredObject, Exception] | None = None
    for item in candidates:
        try:
            body = await _render_one(request, item, render)
        except (pixels.TooLarge, *OBJECT_ERRORS) as exc:
            first = first or (item, exc)
            continue
        except (pixels.FrameError, pixels.RenderError) as exc:
            return refusal(item, exc, "rendered")
        return web.Response(body=body, content_type=media)
    assert first is not None
    return refusal(first[0], first[1], "rendered")


def add_routes(app: web.Application) -> None:
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    for path in (study, series, instance):
        app.router.add_get(path, retrieve)
        app.router.add_get(path + "/metadata", metadata)
    app.router.add_get(instance + "/bulk/{path:.+}", bulkdata)
    app.router.add_get(instance + "/frames/{frames}", frames)
    for path in (study, series, instance, instance + "/frames/{frame}"):
        app.router.add_get(path + "/rendered", rendered)
        app.router.add_get(path + "/thumbnail", thumbnail)
