"""Behind a TCP load balancer the DICOM port still sees the modality's address.

A real HAProxy (Debian package) forwards DICOM associations to ``imag serve``
with ``send-proxy`` (v1) or ``send-proxy-v2``, connecting from its own loopback
address 127.0.0.3; the modality connects to HAProxy from 127.0.0.2 and is
declared as a peer at that address only.  With ``dicom.proxy_protocol`` naming
the balancer, the peer check and the audit trail see 127.0.0.2.

Adversaries: a modality at another address using the declared AE title (refused:
the check sees its real address); a connection from the balancer's address
without a header (closed, logged); a PROXY header forged by a host that is not a
configured balancer (not read as one: the association fails, its address stands).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from archive.config import load_config
from archive.dimse.proxyprotocol import ProxyHeaderError, header_v1, header_v2, read_header
from archive.index import open_database
from tests.dicomfiles import make_instance
from tests.haproxy import HAPROXY, Haproxy
from tests.httpserver import HttpImag
from tests.processes import HOST, eventually, free_port

MODALITY, STRANGER, BALANCER = "127.0.0.2", "127.0.0.4", "127.0.0.3"


# -- the header parser, over real sockets ----------------------------------------------------


def _parsed(data: bytes) -> tuple[str, int] | None:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(5)
        left.sendall(data + b"\x01\x00rest-of-the-stream")
        found = read_header(right)
        # the header, and nothing after it, was consumed: DICOM starts there
        assert right.recv(100) == b"\x01\x00rest-of-the-stream"
        return found


@pytest.mark.parametrize("make", [header_v1, header_v2], ids=["v1", "v2"])
@pytest.mark.parametrize(
    "source", ["10.1.2.3", "2001:db8::7"], ids=["ipv4", "ipv6"]
)
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


def test_a_connection_closed_inside_the_header_is_refused() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(5)
        left.sendall(b"PROXY TCP4 10.0")
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyHeaderError):
            read_header(right)


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


@pytest.fixture(params=["send-proxy", "send-proxy-v2"])
def balanced(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[HttpImag, int]]:
    peers = [{"aet": "MODALITY", "host": MODALITY, "port": 104, "site": "A"}]
    node = HttpImag(
        tmp_path / "node",
        dicom=True,
        settings={
            "IMAG_DICOM_ACCEPT_UNKNOWN": "false",
            "IMAG_DICOM_PEERS": json.dumps(peers),
            "IMAG_DICOM_PROXY_PROTOCOL": BALANCER,
        },
    ).start()
    proxy, front = _haproxy(tmp_path, node.dicom_port, request.param)
    try:
        yield node, front
    finally:
        proxy.stop()
        assert node.stop() == 0


def _associate(port: int, aet: str, source: str):  # noqa: ANN202 - pynetdicom Association
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.network_timeout = 30
    return ae.associate(HOST, port, ae_title="IMAG", bind_address=(source, 0))


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
