"""Behind a TCP load balancer the DICOM port still sees the modality's address.

A real HAProxy (Debian package) forwards DICOM associations to ``imag serve``
with ``send-proxy`` (v1) or ``send-proxy-v2``, connecting from its own loopback
address 127.0.0.3; the modality connects to HAProxy from 127.0.0.2 and is
declared as a peer at that address only.  With ``dicom.proxy_protocol`` naming
the balancer, the peer check and the audit trail see 127.0.0.2.

Those connections are the lean receive path's (``path=lean`` in their log
line): it reads the header, then the TLS handshake when the node speaks TLS
(HAProxy passes it through), and hands what it does not serve to pynetdicom
with the header read, under the modality's address.

Adversaries: a modality at another address using the declared AE title (refused:
the check sees its real address); a connection from the balancer's address
without a header (closed, logged); a PROXY header forged by a host that is not a
configured balancer (not read as one: the association fails, its address stands).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from archive.config import load_config
from archive.dimse.proxyprotocol import (
    ProxyHeaderError,
    header_v1,
    header_v2,
    read_header,
    read_header_async,
)
from archive.index import open_database
from tests.dicomfiles import make_instance
from tests.dicomnet import capture_associate_rq, read_pdu
from tests.haproxy import HAPROXY, Haproxy
from tests.httpserver import HttpImag
from tests.processes import HOST, eventually, free_port
from tests.test_dimse_lean import field, lean_lines, pynetdicom_lines
from tests.test_tls import Pki, client_context, dicom_tls_settings, make_pki

MODALITY, STRANGER, BALANCER = "127.0.0.2", "127.0.0.4", "127.0.0.3"


# -- the header parser, over real sockets ----------------------------------------------------


def _read_async(sock: socket.socket) -> tuple[str, int] | None:
    """read_header_async (the lean path's) on an event loop of its own."""

    async def read() -> tuple[str, int] | None:
        return await read_header_async(sock, asyncio.get_running_loop())

    sock.setblocking(False)
    try:
        return asyncio.run(asyncio.wait_for(read(), 5))
    finally:
        sock.settimeout(5)


def _parsed(data: bytes) -> tuple[str, int] | None:
    """What both readers (blocking, and on an event loop) find in ``data``:
    the same, or both refuse it."""
    outcomes: list[object] = []
    for reader in (read_header, _read_async):
        left, right = socket.socketpair()
        with left, right:
            right.settimeout(5)
            left.sendall(data + b"\x01\x00rest-of-the-stream")
            try:
                outcomes.append(reader(right))
            except ProxyHeaderError as exc:
                outcomes.append(exc)
                continue
            # the header, and nothing after it, was consumed: DICOM starts there
            assert right.recv(100) == b"\x01\x00rest-of-the-stream"
    blocking, on_loop = outcomes
    if isinstance(blocking, ProxyHeaderError):
        assert isinstance(on_loop, ProxyHeaderError), on_loop
        raise blocking
    assert on_loop == blocking
    return blocking  # type: ignore[return-value]


@pytest.mark.parametrize("make", [header_v1, header_v2], ids=["v1", "v2"])
@pytest.mark.parametrize("source", ["10.1.2.3", "2001:db8::7"], ids=["ipv4", "ipv6"])
def test_a_proxy_header_gives_the_clients_address_and_consumes_nothing_more(make, source):
    dest = "10.9.9.9" if ":" not in source else "2001:db8::1"
    assert _parsed(make(source, 40123, dest, 11112)) == (source, 40123)


def test_a_balancers_own_connections_keep_the_socket_address() -> None:
    assert _parsed(b"PROXY UNKNOWN\r\n") is None
    local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0, 0])  # v2 LOCAL, no address
    assert _parsed(local) is None


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x00\x00\x00\xccA-ASSOCIATE-RQ...",  # DICOM straight away
        b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 99999 2\r\n",
        b"PROXY TCP6 10.0.0.1 10.0.0.2 1 2\r\n",
        b"PROXY TCP4 " + b"9" * 200 + b"\r\n",  # longer than any v1 line
        b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x31, 0x11, 0, 12]) + bytes(12),  # version 3
    ],
    ids=["dicom", "bad-ip", "bad-port", "family", "too-long", "v3"],
)
def test_a_malformed_header_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        _parsed(data)


@pytest.mark.parametrize("reader", [read_header, _read_async], ids=["blocking", "on-a-loop"])
def test_a_connection_closed_inside_the_header_is_refused(reader) -> None:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(5)
        left.sendall(b"PROXY TCP4 10.0")
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyHeaderError):
            reader(right)


# -- through a real HAProxy ------------------------------------------------------------------


def _haproxy(workdir: Path, backend_port: int, send: str) -> tuple[Haproxy, int]:
    front = free_port()
    config = (
        "defaults\n"
        "  mode tcp\n"
        "  timeout connect 5s\n"
        "  timeout client 60s\n"
        "  timeout server 60s\n"
        "frontend dicom\n"
        f"  bind {HOST}:{front}\n"
        "  default_backend imag\n"
        "backend imag\n"
        f"  server node1 {HOST}:{backend_port} {send} source {BALANCER}\n"
    )
    return Haproxy(workdir, config, [front]).start(), front


def _balanced_node(
    tmp_path: Path, send: str, tls: dict[str, str] | None = None
) -> Iterator[tuple[HttpImag, int]]:
    peers = [{"aet": "MODALITY", "host": MODALITY, "port": 104, "site": "A"}]
    node = HttpImag(
        tmp_path / "node",
        dicom=True,
        settings={
            "IMAG_DICOM_ACCEPT_UNKNOWN": "false",
            "IMAG_DICOM_PEERS": json.dumps(peers),
            "IMAG_DICOM_PROXY_PROTOCOL": BALANCER,
        }
        | (tls or {}),
    ).start()
    proxy, front = _haproxy(tmp_path, node.dicom_port, send)
    try:
        yield node, front
    finally:
        proxy.stop()
        assert node.stop() == 0


@pytest.fixture(params=["send-proxy", "send-proxy-v2"])
def balanced(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[HttpImag, int]]:
    yield from _balanced_node(tmp_path, request.param)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["send-proxy", "send-proxy-v2"])
def balanced_tls(
    request: pytest.FixtureRequest, tmp_path: Path, pki: Pki
) -> Iterator[tuple[HttpImag, int]]:
    """The node speaks mutual TLS; HAProxy passes it through after its header."""
    yield from _balanced_node(tmp_path, request.param, dicom_tls_settings(pki))


def _associate(  # noqa: ANN202 - pynetdicom Association
    port: int,
    aet: str,
    source: str,
    *,
    retrieve: bool = False,
    tls: tuple[ssl.SSLContext, str] | None = None,
):
    """An association from ``source``: Verification and CT storage (the lean
    path's), or Verification and C-GET (``retrieve``: pynetdicom's)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(
        StudyRootQueryRetrieveInformationModelGet if retrieve else CTImageStorage
    )
    ae.acse_timeout = ae.network_timeout = 30
    return ae.associate(HOST, port, ae_title="IMAG", bind_address=(source, 0), tls_args=tls)


def _audit_sources(node: HttpImag) -> list[tuple[str, str, str]]:
    db = open_database(load_config(env=node.env).index_url)
    try:
        return [tuple(r) for r in db.query("SELECT action, outcome, source FROM audit")]
    finally:
        db.close()


def test_a_modality_behind_haproxy_is_seen_with_its_own_address(
    balanced: tuple[HttpImag, int],
) -> None:
    node, front = balanced
    assoc = _associate(front, "MODALITY", MODALITY)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dcmread(BytesIO(make_instance())))
        assert status.Status == 0x0000
    finally:
        assoc.release()
    sources = {source for _, _, source in _audit_sources(node) if source}
    assert any(MODALITY in s for s in sources), sources
    assert not any(BALANCER in s for s in sources), sources
    [line] = eventually(lambda: lean_lines(node), what="the association's log line")
    assert (field(line, "address"), field(line, "stored")) == (MODALITY, "1")


def test_an_association_the_lean_path_does_not_serve_reaches_pynetdicom_under_the_modalitys_address(
    balanced: tuple[HttpImag, int],
) -> None:
    """The lean path read the header: pynetdicom gets the connection without
    it, and sees the modality's address (the peer check lets it in)."""
    node, front = balanced
    assoc = _associate(front, "MODALITY", MODALITY, retrieve=True)
    assert assoc.is_established, node.log()
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    [line] = eventually(lambda: pynetdicom_lines(node), what="the association's log line")
    assert field(line, "address") == MODALITY
    assert lean_lines(node) == []


def test_a_balancers_own_connection_is_answered_without_a_second_header_read(
    balanced: tuple[HttpImag, int],
) -> None:
    """A LOCAL header (the balancer on its own behalf) keeps the balancer's
    address; the request after it is pynetdicom's, which must answer it
    -- here an A-ASSOCIATE-RJ, the balancer not being a peer -- rather than
    read it as another PROXY header and close the connection."""
    node, _ = balanced
    local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0, 0])
    rq = capture_associate_rq(
        "MODALITY", [build_context(StudyRootQueryRetrieveInformationModelGet)]
    )
    with socket.create_connection(
        (HOST, node.dicom_port), timeout=30, source_address=(BALANCER, 0)
    ) as sock:
        sock.sendall(local + rq)
        assert read_pdu(sock)[0] == 0x03  # A-ASSOCIATE-RJ
    assert "no valid PROXY protocol header" not in node.log()


def test_tls_through_haproxy_is_served_lean_or_relayed_under_the_modalitys_address(
    balanced_tls: tuple[HttpImag, int], pki: Pki
) -> None:
    """PROXY header first, TLS handshake after it: a storage association is
    the lean path's, one it does not serve is relayed to pynetdicom; both are
    seen (peer check, log line) from the modality's address."""
    node, front = balanced_tls
    tls = (client_context(pki, pki.client), HOST)
    assoc = _associate(front, "MODALITY", MODALITY, tls=tls)
    assert assoc.is_established, node.log()
    try:
        assert assoc.send_c_store(dcmread(BytesIO(make_instance()))).Status == 0x0000
    finally:
        assoc.release()
    [line] = eventually(lambda: lean_lines(node), what="the lean association's log line")
    assert (field(line, "address"), field(line, "stored")) == (MODALITY, "1")
    assoc = _associate(front, "MODALITY", MODALITY, retrieve=True, tls=tls)
    assert assoc.is_established, node.log()
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    [line] = eventually(lambda: pynetdicom_lines(node), what="the relayed association's line")
    assert field(line, "address") == MODALITY
    stranger = _associate(front, "MODALITY", STRANGER, tls=tls)
    assert stranger.is_rejected


def test_the_declared_ae_title_from_another_address_is_refused_through_haproxy(
    balanced: tuple[HttpImag, int],
) -> None:
    node, front = balanced
    assoc = _associate(front, "MODALITY", STRANGER)
    assert assoc.is_rejected
    refused = [r for r in _audit_sources(node) if r[1] == "denied"]
    assert refused and all(STRANGER in source for _, _, source in refused), refused


def test_a_connection_from_the_balancer_without_a_header_is_closed(
    balanced: tuple[HttpImag, int],
) -> None:
    node, _ = balanced
    assoc = _associate(node.dicom_port, "MODALITY", BALANCER)  # straight to the node
    assert not assoc.is_established
    eventually(
        lambda: "no valid PROXY protocol header" in node.log(), timeout=30, what="the log line"
    )


def test_a_header_forged_by_a_host_that_is_not_a_balancer_is_not_believed(
    balanced: tuple[HttpImag, int],
) -> None:
    node, _ = balanced
    with socket.create_connection(
        (HOST, node.dicom_port), timeout=30, source_address=(STRANGER, 0)
    ) as sock:
        sock.sendall(header_v1(MODALITY, 5555, HOST, node.dicom_port))
        sock.sendall(b"\x01\x00" + bytes(4))  # then the start of an A-ASSOCIATE-RQ
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the node closes it: not a DICOM stream
            try:
                if not sock.recv(4096):
                    break
            except (ConnectionResetError, TimeoutError):
                break
    stored = [r for r in _audit_sources(node) if MODALITY in (r[2] or "")]
    assert stored == []  # nothing was done in the forged name


def test_the_deploy_files_are_valid_as_shipped() -> None:
    """deploy/haproxy.cfg passes HAProxy's own check; deploy/imag.toml loads
    as IMAG's configuration (every key known, every value valid)."""
    root = Path(__file__).resolve().parent.parent / "deploy"
    checked = subprocess.run(
        [HAPROXY, "-c", "-f", str(root / "haproxy.cfg")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = load_config(root / "imag.toml", env={})
    assert config["dicom.proxy_protocol"] == [] and config["worker.metrics_port"] == 9464
