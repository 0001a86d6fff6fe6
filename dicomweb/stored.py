"""Stored objects sent as they are stored: the body of a WADO-RS retrieve
that converts nothing (``transfer-syntax=*``, or the syntax they are stored in).

Why this is not a read/write loop: profiled with py-spy while a series of
1,000 CT slices of 512 KB was retrieved, ``imag serve`` spent its time in
three thread hops per instance (open, read, the read that finds the end),
copying each object through a Python ``bytes`` into the socket, and framing
it in HTTP chunks that the client then had to parse again; it served
0.5-0.9x Orthanc's rate at 1.6x its CPU per byte (1.56 s of CPU per GB
against 0.98).  Here instead (0.55-0.75 s per GB; figures in the README):

* the answer's length is known before a byte is sent (each instance's stored
  size is in the index), so it carries a ``Content-Length`` and no chunked
  framing; an object whose size is not the indexed one cuts the answer short,
  never completes it wrongly;
* objects are opened in batches, one thread hop per batch, the next batch
  opened while the current one is sent, and the kernel is asked to read them
  ahead (``POSIX_FADV_WILLNEED``), so the event loop does not wait on the disk;
* a file goes from the page cache to the socket with ``sendfile(2)``
  (``loop.sendfile``), never through Python;
* where sendfile is not possible -- TLS (the process encrypts every byte), an
  object that is not a file (S3), one over :data:`SENDFILE_MAX` (whose pages
  sendfile would wait for on the event loop) -- small objects are read whole
  within their batch's thread hop and larger ones streamed in
  :data:`CHUNK` reads, as before.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import BinaryIO

from aiohttp import web

from archive import eventloop
from archive.retrieve import StoredObject
from storage import ObjectStore

#: what a read of an object too large to be read whole asks for at a time
CHUNK = 1 << 20
#: objects opened (and, without sendfile, read) per thread hop, at most ...
BATCH_COUNT = 64
#: ... and at most these many bytes of them: an answer holds at most two
#: batches read whole (the one sent and the next), whatever the study ...
BATCH_BYTES = 2 << 20
#: ... or, once its objects turn out to be files sent with sendfile (nothing
#: held in memory), these many: fewer thread hops (-20 % CPU per byte)
SENDFILE_BATCH_BYTES = 8 << 20
#: the largest object sent with sendfile; a larger one is read in a thread
#: (sendfile runs on the event loop and blocks it while it waits for the disk)
SENDFILE_MAX = 8 << 20


class SizeMismatch(OSError):
    """A stored object is not the size the index says: the answer's
    ``Content-Length`` would be a lie, so the answer is cut."""


@dataclass
class _Opened:
    item: StoredObject
    data: bytes | None = None  #: the object read whole
    file: BinaryIO | None = None  #: or open, to send or stream
    fd: int | None = None  #: the file's descriptor, when sendfile can read it

    def close(self) -> None:
        if self.file is not None:
            with suppress(OSError):
                self.file.close()
            self.file = None


def content_length(items: Sequence[StoredObject], before: Sequence[bytes], after: int) -> int:
    """The body's length: each object with the bytes sent before it, ``after``
    bytes after each, as the index knows their sizes."""
    return sum(item.size + len(head) + after for item, head in zip(items, before, strict=True))


def _batch_end(items: Sequence[StoredObject], start: int, max_bytes: int) -> int:
    """Where the batch that begins at ``start`` ends: at most
    :data:`BATCH_COUNT` objects and ``max_bytes`` (one object at least)."""
    end, size = start, 0
    while end < len(items) and end - start < BATCH_COUNT:
        size += items[end].size
        if end > start and size > max_bytes:
            break
        end += 1
    return end


def _fileno(stream: BinaryIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def _open_batch(store: ObjectStore, items: Sequence[StoredObject], sendfile: bool) -> list[_Opened]:
    """Open ``items`` (in a worker thread): a file sendfile may read stays
    open with its size checked and its read-ahead started; without sendfile,
    an object up to :data:`CHUNK` is read whole and closed."""
    opened: list[_Opened] = []
    try:
        for item in items:
            stream = store.open(item.object_key)
            entry = _Opened(item, file=stream)
            opened.append(entry)
            fd = _fileno(stream)
            if fd is not None:
                size = os.fstat(fd).st_size
                if size != item.size:
                    raise SizeMismatch(_mismatch(item, size))
                if sendfile and size <= SENDFILE_MAX:
                    entry.fd = fd
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
                    continue
            if item.size <= CHUNK:
                entry.data = stream.read(item.size + 1)
                entry.close()
                if len(entry.data) != item.size:
                    raise SizeMismatch(_mismatch(item, len(entry.data)))
    except BaseException:
        for entry in opened:
            entry.close()
        raise
    return opened


def _mismatch(item: StoredObject, size: int) -> str:
    return (
        f"stored object {item.object_key} is {size} bytes, the index says {item.size} "
        "(imag verify checks the store)"
    )


def _can_sendfile(request: web.Request) -> bool:
    """Whether the connection is a plain socket sendfile(2) can write to, on
    an event loop that can (not uvloop's: objects are then read in the
    batch's thread hop, as over TLS)."""
    transport = request.transport
    return (
        eventloop.sends_files(asyncio.get_running_loop())
        and transport is not None
        and transport.get_extra_info("sslcontext") is None
        and transport.get_extra_info("socket") is not None
    )


async def send(
    request: web.Request,
    response: web.StreamResponse,
    store: ObjectStore,
    items: Sequence[StoredObject],
    before: Sequence[bytes],
    after: bytes = b"",
    end_bytes: bytes = b"",
) -> None:
    """Prepare ``response`` (whose ``content_length`` the caller set from
    :func:`content_length`) and write its body: for each object, its
    ``before`` bytes, the object as stored, ``after``; then ``end_bytes``.

    Raises what reading or sending raises (:class:`SizeMismatch`, the
    store's errors, ConnectionError) once the status may have been sent;
    the caller cuts the connection."""
    if request.method == "HEAD":
        await response.prepare(request)
        return
    sendfile = _can_sendfile(request)
    loop = asyncio.get_running_loop()

    def open_ahead(start: int, max_bytes: int) -> tuple[asyncio.Future[list[_Opened]], int]:
        end = _batch_end(items, start, max_bytes)
        return loop.run_in_executor(None, _open_batch, store, items[start:end], sendfile), end

    pending: asyncio.Future[list[_Opened]] | None
    pending, end = open_ahead(0, BATCH_BYTES)
    batch: list[_Opened] = []
    index, tail = 0, b""
    try:
        await response.prepare(request)  # the status, and the audit entry, go first
        while pending is not None:
            batch = await pending
            files = sendfile and all(entry.fd is not None for entry in batch)
            pending = None
            if end < len(items):
                pending, end = open_ahead(end, SENDFILE_BATCH_BYTES if files else BATCH_BYTES)
            for entry in batch:
                await response.write(tail + before[index])
                index += 1
                if entry.data is not None:
                    await response.write(entry.data)
                    entry.data = None
                elif not (sendfile and entry.fd is not None):
                    await _stream(response, entry)
                elif not await _sendfile(loop, request, entry):
                    sendfile = False  # not possible on this connection after all
                    await _stream(response, entry)
                entry.close()
                tail = after
    finally:
        for entry in batch:
            entry.close()
        if pending is not None:  # abandoned: its files are closed once it is done
            pending.add_done_callback(_close_all)
    await response.write(tail + end_bytes)
    await response.write_eof()


def _close_all(future: asyncio.Future[list[_Opened]]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    for entry in future.result():
        entry.close()


async def _sendfile(loop: asyncio.AbstractEventLoop, request: web.Request, entry: _Opened) -> bool:
    """Send ``entry``'s file with sendfile(2); False (nothing sent) when the
    event loop or the transport cannot."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    assert entry.file is not None
    try:
        await loop.sendfile(transport, entry.file, 0, entry.item.size, fallback=False)
    except (NotImplementedError, RuntimeError):  # raised before a byte is sent
        entry.file.seek(0)
        return False
    return True


async def _stream(response: web.StreamResponse, entry: _Opened) -> None:
    """An object too large to read whole, in :data:`CHUNK` reads in a thread."""
    assert entry.file is not None
    left = entry.item.size
    while left > 0:
        chunk = await asyncio.to_thread(entry.file.read, min(CHUNK, left))
        if not chunk:
            break
        left -= len(chunk)
        await response.write(chunk)
    if left:
        raise SizeMismatch(_mismatch(entry.item, entry.item.size - left))
    if await asyncio.to_thread(entry.file.read, 1):
        raise SizeMismatch(f"stored object {entry.item.object_key} is longer than the index says")
