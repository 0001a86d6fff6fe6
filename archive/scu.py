"""pynetdicom as a service user, with its reactor race closed.

A pynetdicom association runs a reactor thread that takes incoming DIMSE
messages off the queue and serves them (requests from the peer).  A
``send_c_*`` call first pauses it -- clears ``_reactor_checkpoint``, waits
until ``_is_paused`` -- then sends its request and reads the responses off
the same queue.  The reactor sets ``_is_paused = True`` *before* it waits at
the checkpoint and back to False after; if the checkpoint is still set, the
wait returns at once, and a sender that clears it in that instant sees the
reactor "paused" while it goes on to read the queue.  A fast answer is then
taken by the reactor, which drops it as "Received unexpected C-ECHO service
message" (pynetdicom 3.0.4, ``Association._run_reactor``; issue 875), and
the sender waits out its DIMSE timeout, or counts one match less.

IMAG is such a user when it routes studies to a DICOM peer
(:mod:`archive.routing`), and so are its tests and benchmarks; on a loaded
2-core machine it happened in two CI runs out of two.  :func:`close_reactor_race`
makes the reactor's non-blocking read return nothing while a sender has the
reactor paused: the one message the race let it take is left for the
sender.  The reactor only ever reads the queue without blocking, the
senders always block, so the two are told apart by that alone.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider

_PATCHED = "_imag_reactor_race_closed"


def close_reactor_race() -> None:
    """Patch :meth:`DIMSEServiceProvider.get_msg` once per process (idempotent)."""
    if getattr(DIMSEServiceProvider, _PATCHED, False):
        return
    original = DIMSEServiceProvider.get_msg

    def get_msg(self: DIMSEServiceProvider, block: bool = False) -> Any:
        checkpoint = getattr(self.assoc, "_reactor_checkpoint", None)
        if not block and checkpoint is not None and not checkpoint.is_set():
            return None, None  # a send_*() has paused the reactor: its answer
        return original(self, block)

    get_msg.__doc__ = original.__doc__
    DIMSEServiceProvider.get_msg = get_msg  # type: ignore[method-assign]
    setattr(DIMSEServiceProvider, _PATCHED, True)
