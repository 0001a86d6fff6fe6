"""The lean C-STORE receive path: storage and verification associations on asyncio.

pynetdicom serves an association with two Python threads that poll each other
with 1 ms sleeps and copy every PDU while decoding it: about 3.5 ms of CPU for
a 512 KB CT slice, which caps what one process ingests.  Most associations a
PACS receives only *store* (and echo).  For those this module runs the
association on one asyncio event loop (uvloop, archive.eventloop): PDUs are
read into a preallocated staging buffer, or -- for the bulk of a data set --
straight into the buffer that becomes the stored object, so the P-DATA
fragments of a data set are reassembled without a copy per fragment and
without a bytes object per PDU.  The complete object (file meta + data set as
received) then goes to :func:`archive.dimse.handlers.store_instance`, the one
function pynetdicom's handler calls too: the same ingest pipeline, peer table
and site scope, the same audit entry per C-STORE and the same DIMSE statuses.
The C-STORE-RSP leaves only once it returned (durable, indexed, audited).

What is reused from pynetdicom rather than rewritten: the association PDU
classes (A-ASSOCIATE-RQ decoding, A-ASSOCIATE-AC/RJ encoding), the
presentation-context negotiation (``negotiate_unrestricted``, as the
pynetdicom listener runs it with ``UNRESTRICTED_STORAGE_SERVICE``) and the
file meta of the stored object (``create_file_meta``, so both paths store the
same bytes).  The per-C-STORE work is done here: P-DATA-TF framing and the
few group 0000 elements of a C-STORE/C-ECHO request and response (a
pydicom Dataset round trip through pynetdicom's message classes cost more
than the rest of this path per instance; the tests check the bytes are the
ones pynetdicom would send).

Dispatch.  The pynetdicom listener still accepts every connection (its
pending-connection limit and associate timeout apply as before) and hands
it to :meth:`LeanReceiver.handoff`.  The receiver peeks at the
A-ASSOCIATE-RQ (``MSG_PEEK``, at most :data:`RQ_MAX` bytes, within what is
left of ``dicom.associate_timeout``) without consuming it.  Only a request
whose every proposed abstract syntax is Verification, a storage SOP class
(standard, private or unknown: what pynetdicom would accept as storage) or a
C-FIND query model (answered by :mod:`archive.dimse.lean_find`) and that
carries no role selection, user identity or asynchronous operations item is
served here.  Anything else -- C-GET, C-MOVE, worklist, storage
commitment, a request we cannot decode, noise, a connection closed or silent
before its request -- goes back, untouched (nothing read from it), to the
pynetdicom server exactly as its ``process_request`` would have served it.

TLS and balancers.  A connection from a **PROXY-protocol** balancer
(``dicom.proxy_protocol``) first has its header read here (the parser of
:mod:`archive.dimse.proxyprotocol`, on the event loop): the client it names
is the address the peer table, the audit trail and the logs see; a
connection without a valid header is closed, as pynetdicom's listener closes
it.  With **TLS** (``dicom.tls_cert``) the handshake is asyncio's (the
listener's context: client certificates verified as ``dicom.tls_ca`` says),
then the A-ASSOCIATE-RQ is read through it (it cannot be peeked at): a lean
request is served on that TLS transport, with everything above (spooling
included); any other is relayed, decrypted, over a local socket pair to
pynetdicom, which serves the other end as a plain connection (the bytes
read first written into it) under the peer's own address.  Header,
handshake and request all fall within ``dicom.associate_timeout`` (a
handshake failed or too late is logged "DICOM TLS handshake failed" and
counted, as pynetdicom's listener did).

Large objects.  A data set is received in memory up to
``ingest.stream_threshold``; once it passes that size, what was received and
every further fragment go to a temporary file in the archive's spool folder
(``<data_dir>/tmp``, where STOW-RS spools its parts too), written in
:data:`SPOOL_CHUNK` pieces by the ingest threads while reading from that peer
is paused (as it is while an instance is ingested), so the event loop never
waits on the disk and one association holds at most the threshold (then one
chunk) in memory, whatever the object's size.  The complete file goes to the
pipeline's streaming entry point (``IngestPipeline.ingest_file``, through the
same :func:`~archive.dimse.handlers.store_instance`) and is deleted once the
C-STORE is answered, or as soon as the association is cut or aborted.  Each
spool file is ``flock``-ed by the process writing it, so the files a killed
process left are told apart from those live receivers (other listener
processes) are writing: :func:`sweep_spool` deletes the former when a
receiver starts or stops.  Bytes beyond ``ingest.max_object_bytes`` are
discarded as they arrive (a spool file begun is deleted then) and the
C-STORE is refused (0xA700).

``dicom.lean_store = false`` turns the path off (every association on
pynetdicom).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom import sop_class as sop_classes
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted
from pynetdicom.sop_class import Verification

from archive import eventloop, spoolfiles
from archive.dimse import proxyprotocol
from archive.dimse.handlers import (
    ACTIVE,
    ASSOCIATIONS,
    OPERATIONS,
    AssociationLog,
    peer_source,
    refuse_peer,
    store_instance,
)
from archive.dimse.lean_find import (
    C_CANCEL_RQ_FIELD,
    C_FIND_RQ_FIELD,
    FIND_MODELS,
    Find,
)
from archive.dimse.nodeslots import NodeAssociations
from archive.dimse.peers import Peer, PeerTable
from archive.dimse.services import COMMAND_SYNTAXES
from archive.ingest import IngestResult, too_large
from archive.runtime import Archive

log = logging.getLogger(__name__)

#: the largest A-ASSOCIATE-RQ looked at here (128 contexts take ~15 KB);
#: a longer one goes to pynetdicom
RQ_MAX = 64 * 1024
#: the staging buffer PDUs are read into (a data set's bulk bypasses it)
STAGE = 256 * 1024
#: a PDV with at least this much data left is read straight into the object
DIRECT_MIN = 16 * 1024
#: a command set larger than this is not a command set
COMMAND_MAX = 64 * 1024
#: a control PDU (release, abort) body larger than this is hostile
CONTROL_MAX = 1024
#: seconds an association refused or released waits for the peer to close
#: before the connection is closed from here (pynetdicom's ARTIM)
ARTIM = 5.0
#: the data set of a C-STORE that has none
NO_DATASET = 0x0101
#: once a data set is spooled, the piece of it held in memory between two
#: writes to the spool file
SPOOL_CHUNK = 4 * 2**20
#: the names of the lean path's spool files in ``<data_dir>/tmp``
SPOOL_PREFIX = "dimse-"

C_STORE_RQ_FIELD = 0x0001
C_ECHO_RQ_FIELD = 0x0030

# PDU states
_PDU_HEADER, _PDV_HEADER, _PDV_DATA, _CONTROL, _DONE = range(5)

#: A-ABORT PDUs (source 2: service provider), by reason
_ABORT = {
    reason: b"\x07\x00\x00\x00\x00\x04\x00\x00\x02" + bytes([reason])
    for reason in (0x00, 0x01, 0x02, 0x04, 0x05, 0x06)
}
_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"

_STORAGE_UIDS = frozenset(sop_classes._STORAGE_CLASSES.values())  # noqa: SLF001
_NOT_LEAN_ITEMS = (
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
    AsynchronousOperationsWindowNegotiation,
    SOPClassExtendedNegotiation,
    SOPClassCommonExtendedNegotiation,
)


def storage_like(uid: UID) -> bool:
    """An abstract syntax pynetdicom's unrestricted storage service accepts as
    storage: a storage SOP class, a private one, or one it does not know."""
    return uid.is_private or uid in _STORAGE_UIDS or not hasattr(sop_classes, uid.keyword)


def lean_request(pdu: bytes, claimed: frozenset[str]) -> A_ASSOCIATE | None:
    """The decoded A-ASSOCIATE-RQ ``pdu`` when the lean path serves it (only
    Verification, storage and C-FIND contexts -- :mod:`archive.dimse.lean_find`
    --, none ``claimed`` by another service, no negotiation item it does not
    handle); None: pynetdicom's."""
    if len(pdu) < 6 or pdu[0] != 0x01:
        return None
    try:
        rq = A_ASSOCIATE_RQ()
        rq.decode(pdu)
        primitive = rq.to_primitive()
    except Exception:  # noqa: BLE001 - pynetdicom answers what it cannot decode
        return None
    if rq.protocol_version != 0x0001:
        return None
    if str(primitive.application_context_name) != APPLICATION_CONTEXT_NAME:
        return None
    contexts = primitive.presentation_context_definition_list
    if not contexts:
        return None
    for cx in contexts:
        uid = UID(str(cx.abstract_syntax))
        if uid in claimed:
            return None
        if uid != Verification and uid not in FIND_MODELS and not storage_like(uid):
            return None
    if any(isinstance(item, _NOT_LEAN_ITEMS) for item in primitive.user_information):
        return None
    return primitive


class LeanReceiver:
    """The asyncio event loop (in its own thread) serving lean associations.

    ``handback(sock, address, prepared)`` gives a connection that is not for
    this path to the pynetdicom server (``prepared``: its PROXY header and TLS
    handshake are done here); ``ssl_context`` (``dicom.tls_cert``): every
    connection is TLS; ``elsewhere()`` counts the associations in
    progress there, so that ``dicom.max_associations`` bounds both paths
    together; ``claimed`` are the abstract syntaxes another DICOM service
    serves (never here); ``refused(reason)`` counts a refused association
    as the listener's ``imag_dicom_connections_refused_total`` does."""

    def __init__(
        self,
        archive: Archive,
        peers: PeerTable,
        aet: str,
        *,
        claimed: frozenset[str],
        pending: Any,
        max_associations: int,
        elsewhere: Callable[[], int],
        handback: Callable[[socket.socket, Any, bool], None],
        refused: Callable[[str], None],
        ssl_context: ssl.SSLContext | None = None,
        node: NodeAssociations | None = None,
    ) -> None:
        config = archive.config
        self.archive = archive
        self.peers = peers
        self.aet = aet
        self.claimed = claimed
        self.refused = refused
        self.pending = pending
        self.max_associations = max_associations
        self.elsewhere = elsewhere
        #: the node's associations, its other listener processes' included
        self.node = node or NodeAssociations()
        self.handback = handback
        self.ssl_context = ssl_context
        self.check_called_aet: bool = config["dicom.check_called_aet"]
        self.max_pdu: int = config["dicom.max_pdu"]
        self.network_timeout: float = config["dicom.network_timeout"]
        self.max_object: int = config["ingest.max_object_bytes"]
        threshold: int = config["ingest.stream_threshold"]
        #: the most of one data set held in memory: beyond it, spooled to a file
        #: (no spooling when the size limit comes first)
        self.memory_cap = min(threshold, self.max_object)
        self.spooling = threshold < self.max_object
        self.spool_dir: Path = config.data_dir / "tmp"
        #: lean associations established (read by the pynetdicom slots)
        self.active = 0
        self.associations: set[LeanAssociation] = set()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_associations + 2, thread_name_prefix="imag-lean-ingest"
        )
        self.loop = eventloop.new_event_loop(config["event_loop"])
        self._thread = threading.Thread(target=self._run, name="imag-dicom-lean", daemon=True)

    @property
    def event_loop_name(self) -> str:
        return eventloop.loop_name(self.loop)

    def start(self) -> None:
        sweep_spool(self.spool_dir)  # what a killed process left
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def alive(self) -> bool:
        return self._thread.is_alive() and self.loop.is_running()

    def stop(self) -> None:
        """Abort the lean associations, stop the loop, wait for ingests in flight."""

        def abort_all() -> None:
            for assoc in list(self.associations):
                assoc.abort(0x00)
            self.loop.call_later(0.05, self.loop.stop)

        if self.loop.is_running():
            self.loop.call_soon_threadsafe(abort_all)
            self._thread.join(10)
        self.executor.shutdown(wait=True)
        if not self.loop.is_running():
            self.loop.close()
        sweep_spool(self.spool_dir)  # a spool file whose clean-up the stopped loop missed

    # -- dispatch ----------------------------------------------------------------------------

    def handoff(self, sock: socket.socket, address: Any, *, proxied: bool = False) -> None:
        """Called from the accepting thread: look at the connection here
        (``proxied``: from a balancer, it starts with a PROXY header)."""
        self.loop.call_soon_threadsafe(self._spawn, sock, address, proxied)

    def _spawn(self, sock: socket.socket, address: Any, proxied: bool) -> None:
        self.loop.create_task(self._open(sock, address, proxied))

    async def _open(self, sock: socket.socket, address: Any, proxied: bool) -> None:
        """What comes before the A-ASSOCIATE-RQ, in the order a balancer and
        TLS put it: the PROXY header naming the client (who the peer table
        and the logs see from then on), then the TLS handshake; all of it
        within what is left of ``dicom.associate_timeout``."""
        if proxied:
            try:
                sock.setblocking(False)
                client = await asyncio.wait_for(
                    proxyprotocol.read_header_async(sock, self.loop),
                    self.pending.remaining(sock),
                )
            except (proxyprotocol.ProxyHeaderError, OSError) as exc:  # TimeoutError too
                self.refused("proxy-header")
                log.warning(
                    proxyprotocol.NO_HEADER,
                    extra={"peer": _host(address), "error": str(exc) or "timed out"},
                )
                self.pending.done(sock)
                sock.close()
                return
            if client is not None:
                address = client  # the modality, as the balancer saw it
        if self.ssl_context is not None:
            await self._dispatch_tls(sock, address, self.ssl_context)
        else:
            await self._dispatch(sock, address)

    async def _dispatch(self, sock: socket.socket, address: Any) -> None:
        try:
            pdu = await self._peek_request(sock)
            primitive = lean_request(pdu, self.claimed) if pdu else None
        except Exception:  # noqa: BLE001 - whatever went wrong, pynetdicom decides
            log.exception("lean DICOM dispatch failed")
            primitive = None
        if primitive is None:
            sock.setblocking(True)
            self.handback(sock, address, True)
            return
        assert pdu is not None
        try:
            _consume(sock, len(pdu))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.pending.done(sock)
            sock.close()
            return
        self.pending.done(sock)
        peer_address = address[0] if isinstance(address, tuple) else str(address)
        try:
            _, assoc = await self.loop.connect_accepted_socket(
                lambda: LeanAssociation(self, peer_address), sock
            )
        except OSError:
            sock.close()
            return
        try:
            await assoc.negotiate(primitive)
        except Exception:  # noqa: BLE001 - one association's failure stops only it
            log.exception("lean DICOM association negotiation failed")
            assoc.abort(0x00)

    async def _dispatch_tls(
        self, sock: socket.socket, address: Any, context: ssl.SSLContext
    ) -> None:
        """A TLS connection: the handshake here (asyncio's TLS, ``context``
        verifying client certificates as ``dicom.tls_ca`` says), then its
        A-ASSOCIATE-RQ read (it cannot be peeked at through TLS).  A lean
        request goes on here on the same TLS transport; any other is relayed,
        decrypted, over a local socket pair to pynetdicom, which is handed
        the other end as a plain connection (the bytes read written first),
        with the peer's address for its peer table and logs."""
        peer = _host(address)
        deadline = self.loop.time() + self.pending.remaining(sock)
        opening = _Opening(self.loop)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.pending.done(sock)
            sock.close()
            return
        handshake = asyncio.ensure_future(
            self.loop.connect_accepted_socket(
                lambda: opening,
                sock,
                ssl=context,
                ssl_handshake_timeout=self.pending.timeout + 1,  # a backstop
            )
        )
        await asyncio.wait({handshake}, timeout=deadline - self.loop.time())
        if not handshake.done():  # logged before the connection is closed
            self.refused("associate-timeout")
            log.warning(
                "DICOM TLS handshake failed",
                extra={"peer": peer, "error": "not done within dicom.associate_timeout"},
            )
            self.pending.done(sock)
            handshake.cancel()  # which closes the connection
            await asyncio.wait({handshake})
            sock.close()
            return
        try:
            transport, _ = handshake.result()
        except Exception as exc:  # noqa: BLE001 - ssl.SSLError, a reset, EOF, ...
            log.warning("DICOM TLS handshake failed", extra={"peer": peer, "error": str(exc)})
            self.pending.done(sock)
            sock.close()
            return
        try:
            await asyncio.wait_for(opening.ready, max(0.0, deadline - self.loop.time()))
        except TimeoutError:
            self.refused("associate-timeout")
            log.warning(
                "DICOM connection closed: no A-ASSOCIATE-RQ within dicom.associate_timeout (%d s)",
                self.pending.timeout,
                extra={"address": peer},
            )
            self.pending.done(sock)
            transport.abort()
            return
        self.pending.done(sock)
        if opening.lost:
            return  # closed (or cut to make room) before its request
        pdu = opening.request()
        try:
            primitive = lean_request(pdu, self.claimed) if pdu else None
        except Exception:  # noqa: BLE001 - whatever went wrong, pynetdicom decides
            log.exception("lean DICOM dispatch failed")
            primitive = None
        if primitive is None:
            await self._relay(transport, bytes(opening.data), address)
            return
        assert pdu is not None
        assoc = LeanAssociation(self, peer)
        transport.set_protocol(assoc)
        assoc.connection_made(transport)
        try:
            await assoc.negotiate(primitive)
        except Exception:  # noqa: BLE001 - one association's failure stops only it
            log.exception("lean DICOM association negotiation failed")
            assoc.abort(0x00)
        early = memoryview(opening.data)[len(pdu) :]
        while early and not assoc.closed:  # sent before our answer: as if read now
            room = assoc.get_buffer(len(early))
            n = min(len(room), len(early))
            if n == 0:
                assoc.abort(0x02)
                break
            room[:n] = early[:n]
            assoc.buffer_updated(n)
            early = early[n:]
        if not (assoc.closed or assoc.waiting or assoc.flushing):
            transport.resume_reading()

    async def _relay(self, transport: asyncio.Transport, first: bytes, address: Any) -> None:
        """Serve the TLS connection on ``transport`` on pynetdicom: what it
        sends (``first``: what was read of it already), decrypted, goes over a
        local socket pair to pynetdicom, and what pynetdicom answers comes
        back encrypted.  Each side's reading pauses while the other side's
        writing is behind (a C-GET is not buffered whole here)."""
        ours, theirs = socket.socketpair()
        remote, local = _Pipe(), _Pipe()
        remote.other, local.other = local, remote
        transport.set_protocol(remote)
        remote.connection_made(transport)
        try:
            await self.loop.connect_accepted_socket(lambda: local, ours)
        except OSError:
            transport.abort()
            ours.close()
            theirs.close()
            return
        assert local.transport is not None
        if remote.lost:  # gone while the relay was being set up
            local.transport.close()
            theirs.close()
            return
        local.transport.write(first)
        theirs.setblocking(True)
        self.handback(theirs, address, True)
        transport.resume_reading()

    async def _peek_request(self, sock: socket.socket) -> bytes | None:
        """The whole A-ASSOCIATE-RQ, peeked (not consumed); None when it is
        not one we look at (too long, not a request, the peer closed, or it
        did not arrive in time)."""
        sock.setblocking(False)
        deadline = self.loop.time() + self.pending.remaining(sock)
        delay = 0.001
        while True:
            try:
                data = sock.recv(RQ_MAX + 6, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            except OSError:
                return None
            if data is not None:
                if not data or data[0] != 0x01:
                    return None
                if len(data) >= 6:
                    length = int.from_bytes(data[2:6], "big")
                    if length > RQ_MAX:
                        return None
                    if len(data) >= 6 + length:
                        return data[: 6 + length]
            left = deadline - self.loop.time()
            if left <= 0:
                return None
            if data is None:  # nothing yet: wait until readable
                await self._readable(sock, left)
            else:  # part of it: the rest is on its way (readiness would spin)
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)

    async def _readable(self, sock: socket.socket, timeout: float) -> None:
        ready = self.loop.create_future()
        fd = sock.fileno()
        self.loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            pass
        finally:
            self.loop.remove_reader(fd)

    def in_progress(self) -> int:
        """This process's associations in progress, on both paths."""
        return self.active + self.elsewhere()

    def recount(self) -> None:
        """Publish this process's associations to the node (one ended, or was
        refused after its slot was taken)."""
        self.node.publish(self.in_progress())


def _host(address: Any) -> str:
    return str(address[0]) if isinstance(address, tuple) else str(address)


class _Opening(asyncio.Protocol):
    """The start of a TLS connection, decrypted, until it holds a whole
    A-ASSOCIATE-RQ or cannot be one (another PDU, noise, longer than
    :data:`RQ_MAX`); then reading pauses and :attr:`ready` is set (also when
    the connection is lost first)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.data = bytearray()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.ready.done():
            return
        head = self.data
        if head[0] != 0x01 or (
            len(head) >= 6
            and (
                int.from_bytes(head[2:6], "big") > RQ_MAX
                or len(head) >= 6 + int.from_bytes(head[2:6], "big")
            )
        ):
            assert self.transport is not None
            self.transport.pause_reading()
            self.ready.set_result(None)

    def request(self) -> bytes | None:
        """The A-ASSOCIATE-RQ PDU read, or None (not one we look at)."""
        head = self.data
        if len(head) < 6 or head[0] != 0x01:
            return None
        length = int.from_bytes(head[2:6], "big")
        if length > RQ_MAX or len(head) < 6 + length:
            return None
        return bytes(head[: 6 + length])

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_result(None)


class _Pipe(asyncio.Protocol):
    """One side of the relay between a TLS connection and the local socket
    pynetdicom serves: what arrives here is written to the other side, whose
    back-pressure pauses reading here; an end here ends the other side (once
    what it has to write is written)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.other is not None and self.other.transport is not None
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        self._end_other()
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._end_other()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def _end_other(self) -> None:
        other = self.other.transport if self.other is not None else None
        if other is not None and not other.is_closing():
            other.close()


_ZEROS = memoryview(bytes(2**20))


def _grow(buffer: bytearray, size: int) -> None:
    """Extend ``buffer`` to ``size`` bytes (zeros) a MiB at a time: extending
    by ``bytes(n)`` would hold ``n`` more bytes for a moment, half again the
    peak memory of a large object received in memory."""
    while (short := size - len(buffer)) > 0:
        buffer += _ZEROS[:short]


def _consume(sock: socket.socket, n: int) -> None:
    """Read the ``n`` bytes peeked already (they are in the socket buffer)."""
    while n > 0:
        chunk = sock.recv(n)
        if not chunk:
            raise OSError("closed")
        n -= len(chunk)


class Spool(spoolfiles.Spool):
    """A C-STORE data set's spool file (:class:`archive.spoolfiles.Spool`).
    Opened, written and dropped in the ingest threads."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, SPOOL_PREFIX)


def sweep_spool(folder: Path) -> int:
    """Delete the lean path's spool files nobody holds: those of a process
    killed while receiving (a live receiver's, in this or another listener
    process, are locked and stay).  Returns how many were deleted."""
    return spoolfiles.sweep(folder, SPOOL_PREFIX, "C-STORE")


def _spool_write(spool: Spool | None, folder: Path, data: memoryview) -> Spool:
    """Write ``data`` to ``spool`` (begun in ``folder`` when None); in an
    ingest thread."""
    target = spool if spool is not None else Spool(folder)
    try:
        target.write(data)
    except BaseException:
        target.drop()
        raise
    return target


def _store_spooled(
    archive: Archive,
    spool: Spool,
    tail: memoryview,
    source: Any,
    affected: str,
    started: float,
) -> tuple[int, str]:
    """Write the last piece of a spooled data set, ingest the file (streamed,
    never loaded whole) and delete it; in an ingest thread."""
    try:
        data: Path | IngestResult
        try:
            spool.write(tail)
            data = spool.path
        except OSError:
            log.exception("a C-STORE data set could not be spooled to disk")
            data = IngestResult(
                None, code="storage-error", reason="the archive could not spool the object"
            )
        return store_instance(archive, data, source, affected, started)
    finally:
        spool.drop()


class LeanAssociation(asyncio.BufferedProtocol):
    """One association: A-ASSOCIATE negotiation, then C-ECHO and C-STORE.

    Bytes arrive through :meth:`get_buffer` / :meth:`buffer_updated` into
    :attr:`stage`, parsed by a small state machine (PDU header, PDV header,
    PDV data, control PDU body); while a PDV of a data set has
    :data:`DIRECT_MIN` bytes or more left, the socket is read straight into
    the object being received.  Reading pauses while an instance is being
    ingested (a peer without asynchronous operations sends nothing until it
    has its response), which bounds the memory an association takes, and
    while a piece of a large data set is written to its spool file."""

    def __init__(self, receiver: LeanReceiver, address: str) -> None:
        self.receiver = receiver
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.stage = bytearray(STAGE)
        self.view = memoryview(self.stage)
        self.start = 0
        self.end = 0
        self.state = _PDU_HEADER
        self.pdu_left = 0  # bytes of the current P-DATA-TF body not yet parsed
        self.pdv_left = 0  # data bytes of the current PDV not yet taken
        self.pdv_command = False
        self.pdv_last = False
        self.control_type = 0
        self.control_left = 0
        self.command = bytearray()
        # the C-STORE being received
        self.store_request: Command | None = None
        self.store_context = 0
        self.dataset: bytearray | None = None  # in memory (all, or the piece not yet spooled)
        self.fill = 0
        self.spool: Spool | None = None  # the file a large data set goes to
        self.spooled = 0  # bytes of the data set in the spool file
        self.flushing = False  # a piece is being written to the spool file: reading paused
        self.discarded = 0  # refused data set: its size so far (nothing of it kept)
        self.refusal = ""  # why: too-large, or storage-error (the spool file failed)
        self.direct: memoryview | None = None
        self.size_hint = 0  # the last object's size: objects of a series are alike
        self.waiting = False  # an instance is being ingested: reading paused
        self.established = False
        self.closed = False
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0
        self.peer: Peer | None = None
        self.calling_aet = ""
        self.record: AssociationLog | None = None
        self.activity = 0
        self._seen = 0
        self._watchdog: asyncio.TimerHandle | None = None
        #: the C-FIND being received or answered (archive.dimse.lean_find)
        self.find: Find | None = None
        self.write_paused = False

    # -- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.receiver.associations.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.receiver.associations.discard(self)
        if self.find is not None:
            self.find.resume()  # to notice it is gone
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.direct = None
        if self.spool is not None and not self.flushing:
            self._drop_spool()  # a data set cut off (when flushing: once written)
        if self.established:
            self.established = False
            self.receiver.active -= 1
            self.receiver.recount()
            ACTIVE.dec()
            if not self.waiting:
                self._log_end()  # else once the instance in flight is answered

    def get_buffer(self, sizehint: int) -> memoryview:
        self.direct = None  # a read that found nothing (EAGAIN) leaves its view behind
        if (
            self.state == _PDV_DATA
            and not self.pdv_command
            and self.dataset is not None
            and self.start == self.end
            and self.pdv_left >= DIRECT_MIN
            and not self.refusal
            and not self.flushing
            and self.spooled + self.fill + self.pdv_left <= self.receiver.max_object
        ):
            room = min(self._space(self.pdv_left), self.pdv_left)
            if room >= DIRECT_MIN:
                self.direct = memoryview(self.dataset)[self.fill : self.fill + room]
                return self.direct
        if self.start == self.end:
            self.start = self.end = 0
        elif STAGE - self.end < 4096:  # move the unparsed tail (a few bytes) to the front
            n = self.end - self.start
            self.stage[:n] = bytes(self.view[self.start : self.end])
            self.start, self.end = 0, n
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.activity += 1
        if self.direct is not None:
            # dropped, not released: the event loop may still hold it (uvloop
            # does until this returns), so the object must not be resized here
            self.direct = None
            self.fill += nbytes
            self.pdv_left -= nbytes
            if self.pdv_left == 0:
                self._pdv_done()
            if not self.waiting:
                self._parse()
            return
        self.end += nbytes
        self._parse()

    def eof_received(self) -> bool:
        return False  # close

    def pause_writing(self) -> None:
        self.write_paused = True  # a C-FIND answer waits for the peer to read

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.find is not None:
            self.find.resume()

    def writable(self) -> bool:
        """Responses may still be sent (not closed, released or aborted)."""
        return not self.closed and self.state != _DONE

    # -- negotiation -------------------------------------------------------------------------

    async def negotiate(self, rq: A_ASSOCIATE) -> None:
        """Answer the A-ASSOCIATE-RQ: the association limit, the peer table
        and the called AE title as the pynetdicom listener checks them, with
        the same A-ASSOCIATE-RJ reasons, then the presentation contexts."""
        receiver = self.receiver
        self.calling_aet = str(rq.calling_ae_title or "").strip()
        if not receiver.node.admit(receiver.in_progress, receiver.max_associations):
            receiver.refused("association-limit")
            log.warning(
                "association refused: dicom.max_associations (%d) associations in progress",
                receiver.max_associations,
                extra={"address": self.address, "limit": receiver.max_associations},
            )
            self._reject(rq, 0x02, 0x03, 0x02)  # transient, presentation: local limit exceeded
            return
        decision = receiver.peers.check(self.calling_aet, self.address)
        called_ok = not receiver.check_called_aet or str(rq.called_ae_title).strip() == receiver.aet
        if not decision.allowed or not called_ok:
            receiver.recount()  # the slot admit() took goes back before anything is awaited
        if not decision.allowed:
            await receiver.loop.run_in_executor(
                receiver.executor,
                refuse_peer,
                receiver.archive,
                decision,
                self.calling_aet,
                self.address,
            )
            self._reject(rq, 0x01, 0x01, 0x03)  # permanent, user: calling AE not recognised
            return
        if not called_ok:
            self._reject(rq, 0x01, 0x01, 0x07)  # permanent, user: called AE not recognised
            return
        if self.closed:
            receiver.recount()
            return
        self.peer = decision.peer
        self.peer_max_pdu = rq.maximum_length_received or 0
        supported = []
        for abstract_syntax in (Verification, *sorted(FIND_MODELS)):
            cx = PresentationContext()
            cx.abstract_syntax = abstract_syntax
            cx.transfer_syntax = list(COMMAND_SYNTAXES)
            supported.append(cx)
        result, _ = negotiate_unrestricted(rq.presentation_context_definition_list, supported, {})
        self.contexts = {int(cx.context_id): cx for cx in result if cx.result == 0x00}
        ac = A_ASSOCIATE()
        ac.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = result
        ac.user_information = _acceptor_user_information(receiver.max_pdu)
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self.established = True
        receiver.active += 1
        ASSOCIATIONS.labels("accepted").inc()
        ACTIVE.inc()
        self.record = AssociationLog(self.calling_aet, self.address, time.monotonic())
        self._write(pdu.encode())
        self._arm_watchdog()

    def _reject(self, rq: A_ASSOCIATE, result: int, source: int, diagnostic: int) -> None:
        if self.closed or self.transport is None:
            return
        rj = A_ASSOCIATE()
        rj.result = result
        rj.result_source = source
        rj.diagnostic = diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(rj)
        self.state = _DONE
        self._write(pdu.encode())
        # as pynetdicom: the peer closes once it read the rejection (ARTIM otherwise)
        self.receiver.loop.call_later(ARTIM, self._close)

    # -- the byte stream ---------------------------------------------------------------------

    def _parse(self) -> None:
        stage, view = self.stage, self.view
        while not self.waiting and not self.flushing and not self.closed:
            start, avail = self.start, self.end - self.start
            state = self.state
            if state == _PDV_DATA:
                if not avail:
                    return
                take = avail if avail < self.pdv_left else self.pdv_left
                take = self._take(view[start : start + take])  # 0: written to disk first
                self.start = start + take
                self.pdv_left -= take
                if self.pdv_left == 0:
                    self._pdv_done()
            elif state == _PDV_HEADER:
                if self.pdu_left < 6:
                    return self.abort(0x06)  # a P-DATA-TF body that is no PDV
                if avail < 6:
                    return
                item = int.from_bytes(view[start : start + 4], "big")
                context_id, control = stage[start + 4], stage[start + 5]
                self.start = start + 6
                if item < 2 or item + 4 > self.pdu_left:
                    return self.abort(0x06)
                self.pdu_left -= item + 4
                self.pdv_left = item - 2
                self.pdv_command = bool(control & 1)
                self.pdv_last = bool(control & 2)
                if not self._pdv_begins(context_id):
                    return
                self.state = _PDV_DATA
                if self.pdv_left == 0:
                    self._pdv_done()
            elif state == _PDU_HEADER:
                if avail < 6:
                    return
                kind = stage[start]
                length = int.from_bytes(view[start + 2 : start + 6], "big")
                self.start = start + 6
                if not self.established:
                    return self.abort(0x02)
                if kind == 0x04:
                    if length > self.receiver.max_pdu + 6 or length < 6:
                        # more than we announced (or nothing): bounded memory, abort
                        return self.abort(0x06)
                    self.pdu_left = length
                    self.state = _PDV_HEADER
                elif kind in (0x05, 0x07):
                    if length > CONTROL_MAX:
                        return self.abort(0x06)
                    self.control_type, self.control_left = kind, length
                    self.state = _CONTROL
                elif kind in (0x01, 0x02, 0x03, 0x06):
                    return self.abort(0x02)  # unexpected PDU
                else:
                    return self.abort(0x01)  # unrecognised PDU
            elif state == _CONTROL:
                if avail < self.control_left:
                    return
                self.start = start + self.control_left
                return self._control(self.control_type)
            else:  # _DONE: refused or released, whatever comes is ignored
                self.start = self.end
                return

    def _pdv_begins(self, context_id: int) -> bool:
        if context_id not in self.contexts:
            self.abort(0x06)
            return False
        find = self.find
        if self.pdv_command:
            if (
                self.dataset is not None
                or (find is not None and find.receiving)
                or len(self.command) + self.pdv_left > COMMAND_MAX
            ):
                self.abort(0x06)
                return False
            self.command_context = context_id
        elif find is not None and find.receiving:
            if context_id != find.context_id:
                self.abort(0x06)
                return False
        elif self.dataset is None or context_id != self.store_context:
            self.abort(0x06)  # a data set nobody announced, or on another context
            return False
        return True

    def _take(self, data: memoryview) -> int:
        """Keep ``data`` (part of a PDV); returns how much of it was taken:
        less when the in-memory piece of the object is full and goes to the
        spool file first (the rest is taken once it is written)."""
        n = len(data)
        if self.pdv_command:
            self.command += data
            return n
        if self.find is not None and self.find.receiving:
            self.find.take(data)
            return n
        if self.refusal or self.spooled + self.fill + n > self.receiver.max_object:
            self._discard(n, "too-large")
            return n
        dataset = self.dataset
        assert dataset is not None
        room = self._space(n)
        if room == 0:
            self._flush()
            return 0
        if room < n:
            n, data = room, data[:room]
        dataset[self.fill : self.fill + n] = data
        self.fill += n
        return n

    def _space(self, n: int) -> int:
        """Room for up to ``n`` more bytes in the in-memory piece of the
        object, grown (up to ``memory_cap`` while nothing is spooled) when
        short; 0: full, write it to the spool file first."""
        dataset = self.dataset
        assert dataset is not None
        size, need = len(dataset), self.fill + n
        if need > size and self.spool is None:
            cap = max(self.receiver.memory_cap, size)
            if size < cap:
                _grow(dataset, min(max(need, 2 * size), cap))
        return len(dataset) - self.fill

    def _discard(self, n: int, why: str) -> None:
        """Refuse the data set being received: count ``n`` more bytes of it
        and keep none (memory released, a spool file deleted)."""
        if not self.refusal:
            self.discarded = self.spooled + self.fill
            self.refusal = why
            self.dataset = bytearray()
            self.fill = self.spooled = 0
            if self.spool is not None:
                self._drop_spool()
        self.discarded += n

    def _flush(self) -> None:
        """Write the in-memory piece of the data set to its spool file (begun
        now if need be) in an ingest thread; reading waits meanwhile."""
        assert self.transport is not None and self.dataset is not None
        self.flushing = True
        self.transport.pause_reading()
        receiver, piece = self.receiver, memoryview(self.dataset)[: self.fill]
        future = receiver.loop.run_in_executor(
            receiver.executor, _spool_write, self.spool, receiver.spool_dir, piece
        )
        future.add_done_callback(lambda f: self._flushed(f, piece))

    def _flushed(self, future: asyncio.Future, piece: memoryview) -> None:
        self.flushing = False
        written = len(piece)
        del piece  # (not released: a traceback may still hold a slice of it)
        try:
            self.spool = future.result()
        except Exception:  # noqa: BLE001 - the disk failed (full?): refuse this object
            log.exception("a C-STORE data set could not be spooled to disk")
            self.spool = None  # _spool_write deleted it
            if not self.closed:
                self._discard(0, "storage-error")
        else:
            self.spooled += written
            self.fill = 0
            if len(self.dataset or b"") != SPOOL_CHUNK:
                self.dataset = bytearray(SPOOL_CHUNK)  # from now on, a chunk at a time
        if self.closed:
            if self.spool is not None:
                self._drop_spool()
            return
        assert self.transport is not None
        self.transport.resume_reading()
        self._parse()

    def _drop_spool(self) -> None:
        spool, self.spool = self.spool, None
        if spool is not None:
            self.receiver.executor.submit(spool.drop)

    def _pdv_done(self) -> None:
        self.state = _PDV_HEADER if self.pdu_left else _PDU_HEADER
        if not self.pdv_last:
            return
        if self.pdv_command:
            self._command_complete()
        elif self.find is not None and self.find.receiving:
            self.find.identifier_complete()
        else:
            self._dataset_complete()

    def _control(self, kind: int) -> None:
        self.state = _DONE
        if kind == 0x05:  # A-RELEASE-RQ
            if self.record is not None:
                self.record.ended = "released"
            self._write(_RELEASE_RP)
            self.receiver.loop.call_later(ARTIM, self._close)
        else:  # A-ABORT
            if self.record is not None:
                self.record.ended = "aborted"
            self._close()

    # -- DIMSE -------------------------------------------------------------------------------

    def _command_complete(self) -> None:
        try:
            command = Command.read(self.command)
        except ValueError:
            return self.abort(0x06)  # not a command set
        self.command = bytearray()
        context = self.contexts[self.command_context]
        if command.field == C_CANCEL_RQ_FIELD:
            if self.find is not None and self.find.message_id == command.responded_to:
                self.find.cancel()
            return None  # pynetdicom too ignores a C-CANCEL of nothing in progress
        if self.find is not None:
            # no asynchronous operations were negotiated: a request while an
            # answer is being sent breaks the protocol
            return self.abort(0x02)
        if command.field == C_FIND_RQ_FIELD:
            if (
                str(context.abstract_syntax) not in FIND_MODELS
                or command.data_set_type == NO_DATASET
            ):
                return self.abort(0x02)  # not a service of this context
            self.find = Find(
                self,
                command.message_id,
                command.sop_class_uid,
                self.command_context,
                UID(str(context.transfer_syntax[0])),
                self._found,
            )
            return None
        if command.field == C_ECHO_RQ_FIELD:
            OPERATIONS.labels("C-ECHO", "0x0000").inc()
            rsp = echo_response(command.message_id)
            self._send(rsp, self.command_context)
            return
        if command.field != C_STORE_RQ_FIELD or command.data_set_type == NO_DATASET:
            return self.abort(0x02)  # not a service of this association
        sop_class = UID(command.sop_class_uid)
        sop_instance = UID(command.sop_instance_uid)
        self.store_request = command
        self.store_context = self.command_context
        meta = file_meta(sop_class, sop_instance, str(context.transfer_syntax[0]))
        size = max(len(meta) + self.size_hint, 64 * 1024)
        self.dataset = bytearray(max(min(size, self.receiver.memory_cap), len(meta)))
        self.dataset[: len(meta)] = meta
        self.fill = len(meta)
        self.spooled = self.discarded = 0

    def _dataset_complete(self) -> None:
        started = time.perf_counter()
        dataset, request = self.dataset, self.store_request
        assert dataset is not None and request is not None
        self.dataset = None
        self.store_request = None
        affected = request.sop_instance_uid
        receiver = self.receiver
        source = peer_source(receiver.archive, self.peer, self.calling_aet, self.address)
        spool, self.spool = self.spool, None
        job: Callable[[], tuple[int, str]]
        if self.refusal == "too-large":
            # the pipeline's own refusal of an object over the limit
            refused = IngestResult.rejected(too_large(self.discarded, receiver.max_object))
            job = partial(store_instance, receiver.archive, refused, source, affected, started)
        elif self.refusal:
            failed = IngestResult(
                None, code=self.refusal, reason="the archive could not spool the object"
            )
            job = partial(store_instance, receiver.archive, failed, source, affected, started)
        elif spool is not None:  # the last piece is written with the file's ingest
            self.size_hint = self.spooled + self.fill
            tail = memoryview(dataset)[: self.fill]
            job = partial(_store_spooled, receiver.archive, spool, tail, source, affected, started)
        else:
            self.size_hint = self.fill
            # the pipeline takes bytes (immutable while it parses, hashes and
            # stores them): one copy of the whole object, none per fragment
            whole = bytes(memoryview(dataset)[: self.fill])
            job = partial(store_instance, receiver.archive, whole, source, affected, started)
        del dataset
        self.discarded = self.spooled = self.fill = 0
        self.refusal = ""
        self.waiting = True
        assert self.transport is not None
        self.transport.pause_reading()
        future = receiver.loop.run_in_executor(receiver.executor, job)
        context = self.store_context
        future.add_done_callback(lambda f: self._stored(f, request, context))

    def _stored(self, future: asyncio.Future, request: Command, context_id: int) -> None:
        self.waiting = False
        try:
            status, comment = future.result()
        except Exception:  # noqa: BLE001 - store_instance answers failures itself
            log.exception("lean C-STORE failed")
            status, comment = 0xA700, "the archive could not process the instance"
        if self.record is not None:
            if status == 0x0000:
                self.record.stored += 1
            else:
                self.record.store_failures += 1
        if self.closed:
            self._log_end()
            return
        self._send(store_response(request, status, comment), context_id)
        assert self.transport is not None
        self.transport.resume_reading()
        self._parse()  # whatever arrived with the last PDU

    def _found(self, find: Find) -> None:
        """A C-FIND answered: the next request may be read."""
        if self.find is find:
            self.find = None

    def _send(self, command: bytes, context_id: int) -> None:
        """A command set (no data set follows) in P-DATA-TF PDUs no longer
        than the peer's maximum."""
        self._write(p_data_pdus(command, context_id, self.peer_max_pdu))

    # -- ending ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self, reason: int) -> None:
        """Send an A-ABORT (service provider, ``reason``) and close."""
        if self.closed:
            return
        self.state = _DONE
        if self.record is not None:
            self.record.ended = "aborted"
        self._write(_ABORT[reason])
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _log_end(self) -> None:
        if self.record is not None:
            record, self.record = self.record, None
            # the pynetdicom handlers' line, saying which path served it
            log.info("association ended", extra={**record.fields(record.ended), "path": "lean"})

    def _arm_watchdog(self) -> None:
        """Abort an association silent for ``dicom.network_timeout`` (not
        while we are ingesting: the wait is then ours)."""
        period = min(5.0, self.receiver.network_timeout / 4)
        idle = [0.0]

        def check() -> None:
            if self.closed:
                return
            querying = self.find is not None and self.find.querying
            if self.waiting or self.flushing or querying or self.activity != self._seen:
                self._seen, idle[0] = self.activity, 0.0
            else:
                idle[0] += period
                if idle[0] >= self.receiver.network_timeout:
                    log.warning(
                        "DICOM association aborted: silent for dicom.network_timeout (%d s)",
                        self.receiver.network_timeout,
                        extra={"calling_aet": self.calling_aet, "address": self.address},
                    )
                    return self.abort(0x00)
            self._watchdog = self.receiver.loop.call_later(period, check)

        self._watchdog = self.receiver.loop.call_later(period, check)


def _acceptor_user_information(max_pdu: int) -> list:
    """Our maximum PDU length and implementation, as pynetdicom announces them."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    return [length, uid, version]


# -- DIMSE command sets ------------------------------------------------------------------------
#
# A command set is a handful of group 0000 elements in implicit VR little
# endian.  Reading and writing them here costs a few microseconds where
# pydicom's Dataset round trip (and pynetdicom's message classes on top of it)
# cost a few hundred per C-STORE; tests check both encodings are the same bytes.

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")


@dataclass(frozen=True)
class Command:
    """The fields of a request command set this path acts on."""

    field: int
    message_id: int
    data_set_type: int
    sop_class_uid: str
    sop_instance_uid: str
    #: MessageIDBeingRespondedTo (of a C-CANCEL-RQ)
    responded_to: int = 0

    @classmethod
    def read(cls, data: bytes | bytearray) -> Command:
        """Parse a command set; ValueError when it is not one."""
        values: dict[int, bytes] = {}
        pos, end = 0, len(data)
        while pos < end:
            if pos + 8 > end:
                raise ValueError("a truncated element")
            group, element, length = _ELEMENT.unpack_from(data, pos)
            pos += 8
            if group != 0 or pos + length > end:
                raise ValueError("not a command set element")
            values[element] = bytes(data[pos : pos + length])
            pos += length

        def us(element: int, default: int | None = None) -> int:
            value = values.get(element)
            if value is None or len(value) != 2:
                if default is None:
                    raise ValueError(f"no (0000,{element:04X})")
                return default
            return _US.unpack(value)[0]

        def ui(element: int) -> str:
            return values.get(element, b"").rstrip(b"\0 ").decode("ascii", "replace")

        return cls(
            field=us(0x0100),
            message_id=us(0x0110, 0),
            data_set_type=us(0x0800, NO_DATASET),
            sop_class_uid=ui(0x0002),
            sop_instance_uid=ui(0x1000),
            responded_to=us(0x0120, 0),
        )


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def _sh(text: str) -> bytes:
    value = text.encode("ascii")
    return value + b" " if len(value) % 2 else value


#: (0002,0001) File Meta Information Version: OB, 2 bytes, 00 01
_META_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"
#: (0002,0012) and (0002,0013): pynetdicom's implementation UID and version name
_META_IMPLEMENTATION = b"".join(
    struct.pack("<HH2sH", 0x0002, element, b"UI" if element == 0x0012 else b"SH", len(value))
    + value
    for element, value in (
        (0x0012, _ui(PYNETDICOM_IMPLEMENTATION_UID)),
        (0x0013, _sh(PYNETDICOM_IMPLEMENTATION_VERSION)),
    )
)


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information of a received object: the
    bytes ``encode_file_meta(create_file_meta(...))`` gives (what the
    pynetdicom path stores), written directly: building and encoding a
    pydicom data set for it was ~6% of the receive path's CPU."""
    body = bytearray(_META_VERSION)
    for element, uid in (
        (0x0002, sop_class_uid),
        (0x0003, sop_instance_uid),
        (0x0010, transfer_syntax),
    ):
        value = _ui(uid)
        body += struct.pack("<HH2sH", 0x0002, element, b"UI", len(value)) + value
    body += _META_IMPLEMENTATION
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + length + bytes(body)


def _command_set(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(_ELEMENT.pack(0, element, len(value)) + value for element, value in elements)
    return _ELEMENT.pack(0, 0x0000, 4) + len(body).to_bytes(4, "little") + body


def store_response(request: Command, status: int, comment: str = "") -> bytes:
    """The C-STORE-RSP command set answering ``request``."""
    elements = [
        (0x0002, _ui(request.sop_class_uid)),
        (0x0100, _US.pack(0x8001)),
        (0x0120, _US.pack(request.message_id)),
        (0x0800, _US.pack(NO_DATASET)),
        (0x0900, _US.pack(status)),
    ]
    if comment:
        text = comment[:64].encode("ascii", "replace")
        elements.append((0x0902, text + b" " if len(text) % 2 else text))
    elements.append((0x1000, _ui(request.sop_instance_uid)))
    return _command_set(elements)


def echo_response(message_id: int) -> bytes:
    """The C-ECHO-RSP command set (success) answering message ``message_id``."""
    return _command_set(
        [
            (0x0002, _ui(Verification)),
            (0x0100, _US.pack(0x8030)),
            (0x0120, _US.pack(message_id)),
            (0x0800, _US.pack(NO_DATASET)),
            (0x0900, _US.pack(0x0000)),
        ]
    )


def p_data_pdus(command: bytes, context_id: int, max_pdu: int) -> bytes:
    """``command`` in P-DATA-TF PDUs of at most ``max_pdu`` bytes (0: no
    limit), each one PDV, the last flagged as such."""
    room = len(command) if max_pdu <= 0 else max(1, max_pdu - 6)
    out = bytearray()
    for start in range(0, len(command), room):
        fragment = command[start : start + room]
        last = start + room >= len(command)
        out += b"\x04\x00" + (len(fragment) + 6).to_bytes(4, "big")
        out += (len(fragment) + 2).to_bytes(4, "big")
        out += bytes((context_id, 0x03 if last else 0x01)) + fragment
    return bytes(out)
