"""The DICOM listener of ``imag serve`` (pynetdicom)."""

from __future__ import annotations

import logging
import socket
import ssl
import threading

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from archive.dimse.handlers import DicomServices
from archive.dimse.peers import PeerTable
from archive.runtime import Archive
from archive.security.tls import server_context

log = logging.getLogger(__name__)

# Every storage SOP class, standard or private, in whatever transfer syntax
# the sender proposes first: the archive stores as received and validates
# each object in the ingest pipeline.
_config.UNRESTRICTED_STORAGE_SERVICE = True
# Identifiers are logged by us, at the level we choose, not by pynetdicom.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

QUERY_RETRIEVE = [
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
]
COMMAND_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]


class ReusePortServer(ThreadedAssociationServer):
    """An association server whose socket other IMAG processes may share
    (SO_REUSEPORT): the kernel spreads incoming associations over them.

    With TLS, the handshake runs in the connection's own thread, within the
    ACSE timeout: pynetdicom does it in the accept loop, without a timeout, so
    one TCP connection that never sends a ClientHello would stop the listener
    accepting anyone."""

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = self.socket.accept()
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.ae.acse_timeout)
                request.do_handshake()
                request.settimeout(None)  # blocking, as pynetdicom expects
            except (OSError, ValueError) as exc:
                log.warning(
                    "DICOM TLS handshake failed",
                    extra={"peer": client_address[0], "error": str(exc)},
                )
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class DicomServer:
    """C-ECHO, C-STORE, C-FIND, C-GET and C-MOVE for the configured peers."""

    def __init__(self, archive: Archive) -> None:
        config = archive.config
        self.archive = archive
        self.aet: str = config["dicom.aet"]
        self.ae = AE(ae_title=self.aet)
        self.ae.maximum_associations = config["dicom.max_associations"]
        self.ae.maximum_pdu_size = config["dicom.max_pdu"]
        self.ae.network_timeout = config["dicom.network_timeout"]
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = config["dicom.network_timeout"]
        self.ae.require_called_aet = config["dicom.check_called_aet"]
        self.ae.add_supported_context(Verification, COMMAND_SYNTAXES)
        for sop_class in QUERY_RETRIEVE:
            self.ae.add_supported_context(sop_class, COMMAND_SYNTAXES)
        self.peers = PeerTable(config["dicom.peers"], config["dicom.accept_unknown"])
        self.services = DicomServices(archive, self.peers, self.aet)
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` in a background thread."""
        config = self.archive.config
        ssl_context = None
        if config["dicom.tls_cert"]:
            ssl_context = server_context(
                config["dicom.tls_cert"], config["dicom.tls_key"], config["dicom.tls_ca"]
            )
        self._server = self.ae.make_server(
            (host, port),
            evt_handlers=self.services.handlers(),
            server_class=ReusePortServer,
            ssl_context=ssl_context,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="imag-dicom-server", daemon=True
        )
        self._thread.start()
        log.info(
            "DICOM listening",
            extra={"host": host, "port": self.port, "aet": self.aet, "tls": bool(ssl_context)},
        )

    def stop(self) -> None:
        """Stop accepting, abort the associations in progress."""
        self.ae.shutdown()
        self._server = None
