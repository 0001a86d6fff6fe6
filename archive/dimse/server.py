"""The DICOM listener of ``imag serve`` (pynetdicom).

Connections that have not associated yet are held apart from associations:
they have ``dicom.associate_timeout`` to send their A-ASSOCIATE-RQ (TLS
handshake included), at most ``dicom.max_pending_connections`` of them wait at
once, and they never take one of the ``dicom.max_associations`` slots.  A
handful of silent TCP connections can then not lock modalities out.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from typing import Any

from prometheus_client import Counter, Gauge
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from archive import plugins
from archive.dimse import proxyprotocol
from archive.dimse.lean import LeanReceiver
from archive.dimse.lean_find import FIND_MODELS
from archive.dimse.nodeslots import NodeAssociations
from archive.dimse.peers import PeerTable
from archive.dimse.services import bindings
from archive.runtime import Archive
from archive.scu import close_reactor_race
from archive.security.tls import server_context

log = logging.getLogger(__name__)

PENDING = Gauge(
    "imag_dicom_pending_connections",
    "DICOM connections accepted whose A-ASSOCIATE-RQ has not arrived yet",
    multiprocess_mode="livesum",
)
CONNECTIONS_REFUSED = Counter(
    "imag_dicom_connections_refused_total",
    "DICOM connections closed or associations refused for lack of room, by reason: "
    "pending-limit (closed at once), cut (longest-waiting closed to make room), "
    "associate-timeout (no A-ASSOCIATE-RQ in time), association-limit (no slot free)",
    ["reason"],
)

# Every storage SOP class, standard or private, in whatever transfer syntax
# the sender proposes first: the archive stores as received and validates
# each object in the ingest pipeline.
_config.UNRESTRICTED_STORAGE_SERVICE = True
# Identifiers are logged by us, at the level we choose, not by pynetdicom.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

#: seconds for the ACSE exchanges of an association (release), after it is established
ACSE_TIMEOUT = 30


class PendingConnections:
    """The connections accepted whose A-ASSOCIATE-RQ has not arrived yet.

    Each has ``timeout`` seconds from its acceptance to send it; at most
    ``limit`` wait at once.  Beyond that a new connection is closed at once,
    and the one that has waited longest is cut (after a short grace), so that
    a peer trying again finds room while silent connections churn."""

    #: a pending connection younger than this is not cut to make room
    GRACE = 1.0

    def __init__(self, limit: int, timeout: float, node: NodeAssociations | None = None) -> None:
        self.limit = limit
        self.timeout = timeout
        #: where the number waiting is published for the node's other processes
        self.node = node or NodeAssociations()
        self._lock = threading.Lock()
        self._since: dict[Any, float] = {}  # socket → accepted at (monotonic), oldest first

    def _count(self) -> None:
        # under self._lock
        PENDING.set(len(self._since))
        self.node.publish_pending(len(self._since))

    def admit(self, sock: Any, address: str) -> bool:
        """Track a new connection; False when there is no room for it (the
        caller closes it)."""
        now = time.monotonic()
        with self._lock:
            for old in [s for s in self._since if s.fileno() < 0]:  # closed meanwhile
                del self._since[old]
            if len(self._since) < self.limit:
                self._since[sock] = now
                self._count()
                return True
            oldest, since = next(iter(self._since.items()))
            cut = now - since >= self.GRACE
            if cut:
                del self._since[oldest]
                self._count()
        CONNECTIONS_REFUSED.labels("pending-limit").inc()
        log.warning(
            "DICOM connection closed at once: dicom.max_pending_connections (%d) connections "
            "are waiting to associate",
            self.limit,
            extra={"peer": address, "limit": self.limit},
        )
        if cut:
            CONNECTIONS_REFUSED.labels("cut").inc()
            log.warning(
                "DICOM connection cut after %.1f s without an A-ASSOCIATE-RQ, to make room",
                now - since,
                extra={"peer": _peer_of(oldest)},
            )
            try:  # the connection's own thread sees the end of the stream and stops
                socket.socket.shutdown(oldest, socket.SHUT_RDWR)
            except OSError:
                pass
        return False

    def remaining(self, sock: Any) -> float:
        """Seconds ``sock`` has left to associate."""
        with self._lock:
            since = self._since.get(sock, time.monotonic())
        return max(0.1, since + self.timeout - time.monotonic())

    def replace(self, old: Any, new: Any) -> None:
        """``old`` is now ``new`` (wrapped for TLS), keeping its time."""
        with self._lock:
            self._since = {(new if s is old else s): t for s, t in self._since.items()}

    def done(self, sock: Any) -> float | None:
        """``sock`` associated or closed: forget it; how long it waited (None
        if it was not pending)."""
        with self._lock:
            since = self._since.pop(sock, None)
            self._count()
        return None if since is None else time.monotonic() - since


def _peer_of(sock: Any) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return ""


class PortInUse(OSError):
    """The port is held by another process (not one of this node's listeners)."""


def ensure_port_free(host: str, port: int, setting: str) -> None:
    """Raise :class:`PortInUse` when another socket listens on ``host:port``:
    a probe bound without SO_REUSEPORT fails against any listener, while
    SO_REUSEADDR keeps connections in TIME_WAIT from a previous run out of it."""
    if port == 0:
        return
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            env = "IMAG_" + setting.replace(".", "_").upper()
            raise PortInUse(
                exc.errno,
                f"port {port} on {host} is already in use by another process: stop it, or "
                f"choose another port ({setting} in the config file, or {env})",
            ) from None
        raise
    finally:
        probe.close()


class ListenerServer(ThreadedAssociationServer):
    """The DICOM listener of one process: accepts connections and hands
    each to the lean receive path or to pynetdicom.

    With several listener processes (``dicom.processes``) they all accept
    from one listening socket, made by the parent (``shared``, inherited by
    its children, non-blocking: another process may take a connection the
    selector announced).  A process holding more connections than another
    leaves a new one to it for up to :attr:`HOLD` seconds, then accepts
    anyway: a sibling that stopped accepting (killed, stuck in a codec)
    delays a connection, never refuses it.

    Connections not yet associated are admitted through :attr:`pending`
    (closed at once beyond its limit).  With TLS, the handshake runs in the
    connection's own thread, within the associate timeout: pynetdicom does it
    in the accept loop, without a timeout, so one TCP connection that never
    sends a ClientHello would stop the listener accepting anyone.  With the
    lean receive path on, every connection goes to it first (its PROXY header
    and TLS handshake done there, on asyncio) and comes back, ready, when it
    is not for it."""

    #: the longest a connection is left to a quieter process before this one takes it
    HOLD = 0.5
    #: the pause between two looks at the node's counts while leaving a connection
    HOLD_STEP = 0.001

    pending: PendingConnections | None = None
    #: the lean receive path (``dicom.lean_store``): every connection is handed
    #: to it, and comes back (:meth:`serve_on_pynetdicom`) when not for it
    lean: LeanReceiver | None = None
    _spawn_lock = threading.Lock()
    #: connections the lean path handed back with their PROXY header read and
    #: their TLS done (then a local relay of the decrypted stream): not again
    _prepared: set[Any] = set()
    #: the load balancers whose connections start with a PROXY protocol
    #: header naming the client (``dicom.proxy_protocol``); empty: none
    balancers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __init__(
        self,
        *args: Any,
        shared: socket.socket | None = None,
        node: NodeAssociations | None = None,
        **kwargs: Any,
    ) -> None:
        self.shared = shared
        #: this process's view of the node's connections (with several processes)
        self.node = node
        self._holding_since = self._held_at = 0.0
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.shared is not None:  # a child listener: the parent's socket, listening
            self.socket.close()
            self.socket = self.shared
            self.server_address = self.socket.getsockname()
            return
        super().server_bind()

    def server_activate(self) -> None:
        if self.shared is None:
            super().server_activate()

    def share(self) -> socket.socket:
        """The listening socket, made ready for the node's other listener
        processes to accept from too (non-blocking)."""
        self.socket.setblocking(False)
        return self.socket

    def _leave_to_quieter(self) -> bool:
        """Whether to leave the connection waiting to be accepted to a
        quieter process (after a short pause: the selector announces it
        again at once), within :attr:`HOLD` of the first time it was left."""
        if self.node is None or not self.node.quieter_elsewhere():
            return False
        now = time.monotonic()
        if now - self._held_at > 10 * self.HOLD_STEP:  # a new connection waits
            self._holding_since = now
        self._held_at = now
        if now - self._holding_since >= self.HOLD:
            log.warning(
                "DICOM connection left to a quieter listener process for %.1f s: taken here "
                "(is that process stuck?)",
                self.HOLD,
                extra={"listener_pid": os.getpid()},
            )
            self._holding_since = now  # the next connection is left to it again
            return False
        time.sleep(self.HOLD_STEP)
        return True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self._leave_to_quieter():
            # socketserver drops a request whose get_request raises OSError
            raise BlockingIOError(errno.EAGAIN, "left to a quieter listener process")
        client_socket, address = self.socket.accept()
        if self.ssl_context and self.lean is None and not self._from_balancer(address):
            # a balancer's PROXY header comes before the TLS handshake: its
            # connections are wrapped in their own thread, once it is read
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def process_request(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        peer = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if self.pending is not None and not self.pending.admit(request, peer):
            self.shutdown_request(request)
            return
        if self.lean is not None and type(request) is socket.socket:
            self.lean.handoff(request, client_address, proxied=self._from_balancer(client_address))
            return
        self.serve_on_pynetdicom(request, client_address)

    def serve_on_pynetdicom(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
        prepared: bool = False,
    ) -> None:
        """Serve a connection in a pynetdicom thread of its own (also called
        by the lean receiver's thread for connections that are not for it,
        ``prepared``: their PROXY header and TLS handshake are done)."""
        with self._spawn_lock:
            if prepared:
                self._prepared.add(request)
            super().process_request(request, client_address)

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        if isinstance(request, socket.socket):
            # Until its A-ASSOCIATE-RQ is in (AssociationSlots.on_requested makes
            # it blocking again, as pynetdicom expects), every read ends at the
            # associate timeout: a TLS handshake, or a request sent half-way
            # (pynetdicom's reader would wait for the rest for ever).
            wait = self.pending.remaining(request) if self.pending else self.ae.acse_timeout
            request.settimeout(wait)
        with self._spawn_lock:
            prepared = request in self._prepared
            self._prepared.discard(request)
        if prepared:
            super().process_request_thread(request, client_address)
            return
        if isinstance(request, socket.socket) and self._from_balancer(client_address):
            try:
                client = proxyprotocol.read_header(request)
            except (proxyprotocol.ProxyHeaderError, OSError) as exc:
                CONNECTIONS_REFUSED.labels("proxy-header").inc()
                log.warning(
                    proxyprotocol.NO_HEADER,
                    extra={"peer": client_address[0], "error": str(exc)},
                )
                if self.pending is not None:
                    self.pending.done(request)
                self.shutdown_request(request)
                return
            if client is not None:
                client_address = client  # the modality, as the balancer saw it
            if self.ssl_context:
                wrapped = self.ssl_context.wrap_socket(
                    request, server_side=True, do_handshake_on_connect=False
                )
                if self.pending is not None:
                    self.pending.replace(request, wrapped)
                request = wrapped
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
                if self.pending is None:
                    request.settimeout(None)
            except (OSError, ValueError) as exc:
                if isinstance(exc, TimeoutError):
                    CONNECTIONS_REFUSED.labels("associate-timeout").inc()
                log.warning(
                    "DICOM TLS handshake failed",
                    extra={"peer": client_address[0], "error": str(exc)},
                )
                if self.pending is not None:
                    self.pending.done(request)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def _from_balancer(self, client_address: tuple[str, int] | str) -> bool:
        if not self.balancers:
            return False
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.balancers)


class AssociationSlots:
    """Event handlers keeping pending connections and associations apart.

    pynetdicom counts every acceptor thread against its association limit,
    connections still waiting for their A-ASSOCIATE-RQ included.  Here a
    connection waits with the associate timeout as its ACSE timeout; when
    its request arrives it leaves the pending set, and only associations
    that got their request count against ``dicom.max_associations``."""

    def __init__(
        self,
        pending: PendingConnections,
        max_associations: int,
        acse_timeout: float,
        node: NodeAssociations | None = None,
    ):
        self.pending = pending
        self.max_associations = max_associations
        self.acse_timeout = acse_timeout
        #: the node's other listener processes' associations (dicom.processes)
        self.node = node or NodeAssociations()
        #: associations in progress outside pynetdicom (the lean receive path)
        self.elsewhere: Any = lambda: 0
        #: association → its socket (pynetdicom forgets it when it closes it)
        self._socket: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_CONN_OPEN, self.on_open),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_CONN_CLOSE, self.on_close),
        ]

    def on_open(self, event: evt.Event) -> None:
        # What is left of the associate timeout goes to the ARTIM timer, which
        # closes a connection silent for that long (EVT_CONN_CLOSE follows);
        # the acceptor's own wait for the request is given a second more, so
        # that it is always the timer that ends the wait.
        sock = getattr(event.assoc.dul.socket, "socket", None)
        self._socket[event.assoc] = sock
        remaining = self.pending.remaining(sock)
        event.assoc.acse_timeout = remaining + 1
        event.assoc.dul.artim_timer.timeout = remaining

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        sock = self._socket.get(assoc)
        self.pending.done(sock)
        if sock is not None:
            sock.settimeout(None)  # an association: blocking, as pynetdicom expects
        if self.node.admit(
            lambda: self.in_progress(assoc.ae, assoc) + self.elsewhere(), self.max_associations
        ):
            return
        CONNECTIONS_REFUSED.labels("association-limit").inc()
        log.warning(
            "association refused: dicom.max_associations (%d) associations in progress",
            self.max_associations,
            extra={"address": assoc.requestor.address, "limit": self.max_associations},
        )
        # Rejected transient, by the service provider (presentation): local limit exceeded
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        assoc.kill()

    @staticmethod
    def in_progress(ae: AE, but: Any = None) -> int:
        """pynetdicom's associations that got their request and go on (``but`` aside)."""
        return sum(
            1
            for a in ae.active_associations
            if a.is_acceptor
            and a is not but
            and a.requestor.primitive is not None
            and not (a.is_rejected or a.is_released or a.is_aborted)
        )

    def on_established(self, event: evt.Event) -> None:
        event.assoc.acse_timeout = self.acse_timeout  # the association's own, from now on

    def on_close(self, event: evt.Event) -> None:
        self.node.publish(self.in_progress(event.assoc.ae, event.assoc) + self.elsewhere())
        waited = self.pending.done(self._socket.pop(event.assoc, None))
        if waited is not None and waited >= self.pending.timeout - 0.5:
            CONNECTIONS_REFUSED.labels("associate-timeout").inc()
            log.warning(
                "DICOM connection closed: no A-ASSOCIATE-RQ within dicom.associate_timeout (%d s)",
                self.pending.timeout,
                extra={"address": event.assoc.requestor.address},
            )


class DicomServer:
    """C-ECHO, C-STORE, C-FIND, C-GET and C-MOVE for the configured peers."""

    def __init__(self, archive: Archive, node: NodeAssociations | None = None) -> None:
        """``node``: this process's view of the node's associations, when it is
        one of several listener processes (``dicom.processes``)."""
        config = archive.config
        self.archive = archive
        self.node = node or NodeAssociations()
        self.aet: str = config["dicom.aet"]
        close_reactor_race()  # its C-MOVE sub-associations are pynetdicom SCUs
        self.ae = AE(ae_title=self.aet)
        max_associations = config["dicom.max_associations"]
        max_pending = config["dicom.max_pending_connections"]
        self.pending = PendingConnections(max_pending, config["dicom.associate_timeout"], self.node)
        # pynetdicom's own limit counts pending connections too; ours
        # (AssociationSlots) does not.  Theirs stays above what ours allows,
        # threads still winding down included, as a backstop.
        self.ae.maximum_associations = 2 * (max_associations + max_pending)
        self.ae.maximum_pdu_size = config["dicom.max_pdu"]
        self.ae.network_timeout = config["dicom.network_timeout"]
        self.ae.acse_timeout = ACSE_TIMEOUT
        self.ae.dimse_timeout = config["dicom.network_timeout"]
        self.ae.require_called_aet = config["dicom.check_called_aet"]
        services = plugins.listed("imag_dicom_services", config=config)
        #: abstract syntaxes some service serves: never on the lean path
        #: (only Verification and storage are, as pynetdicom would store them,
        #: and the core's C-FIND, which the lean path answers as it does)
        self.claimed: set[str] = set()
        for service in services:
            for abstract_syntax, syntaxes in service.contexts:
                self.ae.add_supported_context(abstract_syntax, syntaxes)
                lean_find = service.name == "core" and str(abstract_syntax) in FIND_MODELS
                if str(abstract_syntax) != Verification and not lean_find:
                    self.claimed.add(str(abstract_syntax))
        self.peers = PeerTable(config["dicom.peers"], config["dicom.accept_unknown"])
        self.service_handlers = bindings(services, archive, self.peers, self.aet)
        self.slots = AssociationSlots(self.pending, max_associations, ACSE_TIMEOUT, self.node)
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.lean: LeanReceiver | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def start(self, host: str, port: int, *, shared: socket.socket | None = None) -> None:
        """Listen on ``host:port`` in a background thread, or accept from
        ``shared``, the parent's listening socket, in a listener process of
        ``dicom.processes``.  The port must be free (:class:`PortInUse`)."""
        config = self.archive.config
        if shared is None:
            ensure_port_free(host, port, "dicom.port")
        ssl_context = None
        if config["dicom.tls_cert"]:
            ssl_context = server_context(
                config["dicom.tls_cert"], config["dicom.tls_key"], config["dicom.tls_ca"]
            )
        self._server = self.ae.make_server(
            (host, port),
            # the slots first: an association refused for lack of room is not
            # looked at any further
            evt_handlers=self.slots.handlers() + self.service_handlers,
            server_class=functools.partial(ListenerServer, shared=shared, node=self.node),
            ssl_context=ssl_context,
        )
        self._server.pending = self.pending  # before it accepts anyone
        if config["dicom.lean_store"]:
            server = self._server
            self.lean = LeanReceiver(
                self.archive,
                self.peers,
                self.aet,
                claimed=frozenset(self.claimed),
                pending=self.pending,
                max_associations=config["dicom.max_associations"],
                elsewhere=lambda: AssociationSlots.in_progress(self.ae),
                node=self.node,
                handback=server.serve_on_pynetdicom,  # type: ignore[attr-defined]
                refused=lambda reason: CONNECTIONS_REFUSED.labels(reason).inc(),
                ssl_context=ssl_context,
            )
            self.slots.elsewhere = lambda: self.lean.active if self.lean else 0
            self.lean.start()
            self._server.lean = self.lean
        self._server.balancers = tuple(
            ipaddress.ip_network(a, strict=False) for a in config["dicom.proxy_protocol"]
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="imag-dicom-server", daemon=True
        )
        self._thread.start()
        self.node.publish_pending(0)  # accepting: the node's other processes may leave it some
        log.info(
            "DICOM listening",
            extra={
                "host": host,
                "port": self.port,
                "aet": self.aet,
                "tls": bool(ssl_context),
                "lean_store": self.lean.event_loop_name if self.lean else "off",
            },
        )

    def share(self) -> socket.socket:
        """The listening socket, for the node's other listener processes
        (``dicom.processes``) to accept from too."""
        assert self._server is not None
        return self._server.share()  # type: ignore[attr-defined]

    def ensure_listening(self) -> None:
        """Raise unless the listener thread is accepting (a readiness check)."""
        if self._thread is None or not self._thread.is_alive() or self._server is None:
            raise RuntimeError("the DICOM listener is not running")
        if self._server.socket.fileno() < 0:
            raise RuntimeError("the DICOM listening socket is closed")
        if self.lean is not None and not self.lean.alive():
            raise RuntimeError("the lean DICOM receive loop is not running")

    def stop(self) -> None:
        """Stop accepting, abort the associations in progress."""
        self.ae.shutdown()
        if self.lean is not None:
            self.lean.stop()
        self._server = None
