"""The event loop every server loop of IMAG runs on (setting ``event_loop``):
uvloop's by default (a dependency), asyncio's own when asked, or when uvloop
is not installed.

uvloop (libuv) takes ~0.5 ms less per HTTP request than asyncio's selector
loop on the machine of issue 17 (a QIDO-RS search answering nothing at
10^7 instances, paired requests to two servers), mostly in the transport
and in ``call_soon_threadsafe``, which every thread hop to the index takes.
It has no ``loop.sendfile``: :mod:`dicomweb.stored` then reads objects in
the batch's thread hop (:func:`sends_files`); WADO-RS series retrieval kept
its rate against Orthanc's (1.24x with uvloop, 1.20x with sendfile, one run
each).  The lean C-STORE path showed no difference either way."""

from __future__ import annotations

import asyncio
import logging

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
    uvloop = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def new_event_loop(kind: str = "uvloop") -> asyncio.AbstractEventLoop:
    """A new event loop of ``kind`` (``uvloop`` or ``asyncio``); asyncio's
    when uvloop is asked for but not installed."""
    if kind == "uvloop":
        if uvloop is not None:
            return uvloop.new_event_loop()
        log.warning("event_loop = 'uvloop' but uvloop is not installed: asyncio's loop is used")
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what a log line or a benchmark reports."""
    return type(loop).__module__.split(".")[0]


def sends_files(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop.sendfile`` can send a file with sendfile(2) (asyncio's
    selector loop can; uvloop's inherits the abstract method, which raises)."""
    return type(loop).sendfile is not asyncio.AbstractEventLoop.sendfile
