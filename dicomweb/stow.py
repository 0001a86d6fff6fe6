"""STOW-RS (PS3.18 10.5): store instances sent as multipart/related application/dicom.

The body is read part by part (never whole) and each part goes through the one
ingest pipeline.  The answer lists every stored instance (ReferencedSOPSequence)
and every refused part with its reason (FailedSOPSequence):

* 200 everything stored (or already stored, byte for byte);
* 202 some parts refused, some stored;
* 409 every part refused;
* 403 every part refused because it belongs to another site (0x0124);
* 400 a body that is not a well-formed multipart (no part can be read);
* a body cut off after some parts (a client that stopped writing): the parts
  before the cut are answered as above, a part cut in its middle fails with
  0xC000 (so 202 or 409), and a ``Warning`` says where the body ended;
* 415 a request that is not multipart/related with application/dicom parts.

A different object under a SOP Instance UID already stored, kept by policy
``keep``, is not stored and is not reported as stored: it is listed in
FailedSOPSequence with FailureReason 0x0111 (see ``CONFLICT``).  A part
refused because its study, series or SOP instance belongs to another site
gets 0x0124, and the request is audited as denied.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydicom.dataset import Dataset

from archive import spoolfiles
from archive.identity import Source
from archive.security.http import audit_of, principal_of, require
from archive.spoolfiles import Spool
from archive.uids import is_valid_uid
from archive.web import ARCHIVE, problem, public_base
from dicomweb import PREFIX_KEY

# PS3.18 Table 10.5.3-2 / PS3.4 B.2.3 failure reasons, by the pipeline's code
FAILURE = {
    "too-large": 0xA700,
    "inflated-too-large": 0xA700,
    "decoded-too-large": 0xA700,
    "too-deep": 0xA700,
    "storage-error": 0xA700,
    "index-error": 0xA700,
    "missing-attribute": 0xA900,
    "invalid-uid": 0xA900,
    "inconsistent": 0xA900,
    "study-mismatch": 0xA900,
    "inconsistent-pixel-data": 0xA900,
    "forbidden": 0x0124,  # PS3.7 C.4: Refused: Not Authorized
}
#: A different object under a stored SOP Instance UID (policy 'keep'): PS3.7
#: C.4's "Duplicate SOP Instance" (0x0111), the standard's failure for a SOP
#: Instance UID already in use.  PS3.18 lets FailureReason take PS3.4 / PS3.7
#: status values; none of PS3.18's own (0xA7xx resources, 0xA9xx data set
#: does not match its SOP class, 0xC000 cannot understand, 0x0110 processing
#: failure) says that the object is valid and its UID taken.
CONFLICT = 0x0111
CANNOT_UNDERSTAND = 0xC000


T = TypeVar("T")


class _TooLarge(Exception):
    pass


class _Cut(ValueError):
    """The request body ended inside a part: what was read of it is not an object."""


async def _within(awaitable: Awaitable[T], seconds: float) -> T:
    """``awaitable``, or 408 when the client lets the body stall for ``seconds``
    (http.body_timeout): a slow or stuck sender does not hold a handler forever."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=f"the request body stalled for {seconds:g} s (setting http.body_timeout)"
        ) from None


#: the STOW-RS spool files in ``<data_dir>/tmp`` (:mod:`archive.spoolfiles`)
SPOOL_PREFIX = "stow-"


def sweep_spool(folder: Path) -> int:
    """Delete the STOW-RS spool files a killed ``imag serve`` left (those of a
    live upload, in this or another process, are locked and stay)."""
    return spoolfiles.sweep(folder, SPOOL_PREFIX, "STOW-RS")


async def _read_part(
    part: BodyPartReader, limit: int, spool_above: int, folder: Path, timeout: float = 60
) -> bytes | Spool:
    """The part's bytes, or past ``spool_above`` bytes a spool file holding
    them (large objects are never held in memory), which the caller drops."""
    chunks: list[bytes] = []
    size = 0
    spool: Spool | None = None
    try:
        while chunk := await _within(part.read_chunk(1 << 20), timeout):
            size += len(chunk)
            if size > limit:
                # drain: the next part must be readable
                while await _within(part.read_chunk(1 << 20), timeout):
                    pass
                raise _TooLarge(size)
            if spool is None and size > spool_above:
                spool = await asyncio.to_thread(Spool, folder, SPOOL_PREFIX)
                await asyncio.to_thread(spool.write, b"".join(chunks))
                chunks = []
            if spool is not None:
                await asyncio.to_thread(spool.write, chunk)
            else:
                chunks.append(chunk)
        if not part.at_eof():  # the body ended before the delimiter closing the part
            raise _Cut(f"the body ended after {size} bytes of a part, before its delimiter")
    except BaseException:
        if spool is not None:
            spool.drop()
        raise
    if spool is not None:
        return spool
    return b"".join(chunks)


def _failed(sop_class: str, sop_instance: str, reason: int) -> Dataset:
    item = Dataset()
    if sop_class:
        item.ReferencedSOPClassUID = sop_class
    if sop_instance:
        item.ReferencedSOPInstanceUID = sop_instance
    item.FailureReason = reason
    return item


@require("studies.write", "stow.store")
async def store(request: web.Request) -> web.Response:
    archive = request.app[ARCHIVE]
    content_type = request.headers.get("Content-Type", "")
    if not content_type.lower().startswith("multipart/related"):
        return problem(
            415,
            "Unsupported Media Type",
            'STOW-RS takes multipart/related; type="application/dicom"; '
            f"got {content_type or 'no Content-Type'}",
        )
    part_type = ""
    for field in content_type.split(";")[1:]:
        name, _, value = field.partition("=")
        if name.strip().lower() == "type":
            part_type = value.strip().strip('"').lower()
    if part_type and part_type != "application/dicom":
        return problem(
            415,
            "Unsupported Media Type",
            f"parts of type {part_type} are not supported: send application/dicom",
        )
    try:
        reader = MultipartReader(request.headers, request.content)
    except (AssertionError, ValueError, KeyError) as exc:
        return problem(400, "Bad Request", f"malformed multipart body: {exc}")

    study_in_path = request.match_info.get("study")
    if study_in_path is not None and not is_valid_uid(study_in_path):
        return problem(400, "Bad Request", f"{study_in_path!r} is not a valid Study Instance UID")
    limit: int = archive.config["ingest.max_object_bytes"]
    timeout: float = archive.config["http.body_timeout"]
    who = principal_of(request)
    site = who.write_site(request.headers.get("X-IMAG-Site", "").strip())
    if site is None:
        return problem(
            403,
            "Forbidden",
            f"{who.name} may store only into its sites ({', '.join(who.sites) or 'none'}); "
            "name one of them in the X-IMAG-Site header",
        )
    source = Source(
        kind="stow",
        site=site or archive.config["ingest.default_site"],
        address=request.remote or "",
        user=who.name,
        scope=who.scope,
    )
    studies: dict[str, None] = {}
    base = public_base(request) + request.app[PREFIX_KEY]
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    parts = 0
    in_part = False  # a part was opened and is not finished
    cut = ""  # how the body ended early, if it did
    try:
        while True:
            in_part = False
            part = await _within(reader.next(), timeout)
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                return problem(400, "Bad Request", "nested multipart bodies are not supported")
            parts += 1
            in_part = True
            kind = part.headers.get("Content-Type", part_type or "application/dicom")
            if kind.split(";")[0].strip().lower() != "application/dicom":
                await part.release()
                failed.append(_failed("", "", CANNOT_UNDERSTAND))
                continue
            try:
                data = await _read_part(
                    part,
                    limit,
                    archive.config["ingest.stream_threshold"],
                    archive.config.data_dir / "tmp",
                    timeout,
                )
            except _TooLarge:
                failed.append(_failed("", "", FAILURE["too-large"]))
                continue
            try:
                result = await _ingest(
                    archive, data.path if isinstance(data, Spool) else data, source, study_in_path
                )
            finally:
                if isinstance(data, Spool):
                    await asyncio.to_thread(data.drop)
            if result.study_uid:
                studies[result.study_uid] = None
            if result.ok:
                item = Dataset()
                item.ReferencedSOPClassUID = result.sop_class_uid
                item.ReferencedSOPInstanceUID = result.sop_instance_uid
                item.RetrieveURL = (
                    f"{base}/studies/{result.study_uid}/series/"
                    f"{result.series_uid}/instances/{result.sop_instance_uid}"
                )
                referenced.append(item)
            else:
                reason = (
                    CONFLICT
                    if result.code == "conflict"
                    else FAILURE.get(result.code, CANNOT_UNDERSTAND)
                )
                failed.append(_failed(result.sop_class_uid, result.sop_instance_uid, reason))
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # aiohttp on framing
        if parts == 0:
            return problem(400, "Bad Request", f"malformed multipart body: {exc}")
        # the body was cut off (or broke its framing) after some parts: what
        # was stored stays stored and is answered; a part cut in the middle is
        # a failure (nothing of it is stored), an end without the close
        # delimiter after a complete part is only warned about
        where = f"inside part {parts}" if in_part else f"after part {parts}"
        cut = f"the request body ended {where} without its multipart close delimiter ({exc})"
        if in_part:
            failed.append(_failed("", "", CANNOT_UNDERSTAND))
    if parts == 0:
        return problem(400, "Bad Request", "the multipart body holds no part")

    audit = audit_of(request)
    audit.detail.update(stored=len(referenced), failed=len(failed))
    if cut:
        audit.detail["cut"] = cut[:300]
    forbidden = sum(f.FailureReason == FAILURE["forbidden"] for f in failed)
    conflicts = sum(f.FailureReason == CONFLICT for f in failed)
    if forbidden:
        # another site's data: a security event, whatever else the request stored
        audit.outcome = "denied"
        audit.detail["forbidden"] = forbidden
    if conflicts:
        audit.detail["conflicts"] = conflicts
    if len(studies) == 1:
        audit.study_uid = next(iter(studies))
    elif studies:
        audit.detail["studies"] = list(studies)[:100]
    answer = Dataset()
    if study_in_path:
        answer.RetrieveURL = f"{base}/studies/{study_in_path}"
    if referenced:
        answer.ReferencedSOPSequence = referenced
    if failed:
        answer.FailedSOPSequence = failed
    status = 200 if not failed else (202 if referenced else 409)
    if status == 409 and all(f.FailureReason == FAILURE["forbidden"] for f in failed):
        status = 403  # nothing stored, and only because of the caller's scope
    response = web.Response(
        status=status,
        body=json.dumps(answer.to_json_dict()).encode(),
        content_type="application/dicom+json",
    )
    if cut:
        text = cut.replace('"', "'").encode("ascii", "replace").decode("ascii")
        response.headers["Warning"] = f"299 {base}: {' '.join(text.split())}"
    return response


async def _ingest(archive, data: bytes | Path, source: Source, study: str | None):  # noqa: ANN001, ANN202
    from archive.ingest import IngestResult
    from archive.parse import Rejected, parse_header, parse_header_file
    from archive.validate import Limits

    if study:
        limits = Limits.from_config(archive.config)
        # PS3.18: instances of another study than the one in the path are refused
        try:
            if isinstance(data, Path):
                with open(data, "rb") as fp:
                    header = await asyncio.to_thread(
                        parse_header_file, fp, data.stat().st_size, limits
                    )
            else:
                header = await asyncio.to_thread(parse_header, data, limits)
        except Rejected as exc:
            return IngestResult.rejected(exc)
        if header.study_uid != study:
            return IngestResult.rejected(
                Rejected("study-mismatch", f"instance of study {header.study_uid}, not {study}"),
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                study_uid=header.study_uid,
                series_uid=header.series_uid,
            )
    if isinstance(data, Path):
        return await asyncio.to_thread(archive.pipeline.ingest_file, data, source)
    return await asyncio.to_thread(archive.pipeline.ingest, data, source)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/studies", store)
    app.router.add_post("/studies/{study}", store)
