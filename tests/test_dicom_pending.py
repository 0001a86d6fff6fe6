"""Connections that never associate cannot lock modalities out.

A real ``imag serve`` with few association slots: silent TCP connections (a
port scanner, a slow-loris, a crashed client) wait apart from associations,
for ``dicom.associate_timeout`` at most, ``dicom.max_pending_connections`` of
them at once; beyond that new ones are closed at once.  Peers are dcmtk's
echoscu and pynetdicom; the server's own /metrics and log tell what it did.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from tests.dicomnet import CLIENT_HANDLERS, HOST, SERVER_AET, ImagServer, capture_associate_rq
from tests.processes import eventually

MAX_ASSOCIATIONS = 2
MAX_PENDING = 3
PEERS = [
    {"aet": "MODALITY_A", "host": HOST, "port": 104, "site": "A"},
    {"aet": "MODALITY_B", "host": HOST, "port": 104, "site": "B"},
]


def _server(workdir: Path, associate_timeout: int) -> ImagServer:
    return ImagServer(
        workdir,
        f"sqlite:///{workdir / 'index.db'}",
        PEERS,
        settings={
            "dicom": {
                "max_associations": MAX_ASSOCIATIONS,
                "max_pending_connections": MAX_PENDING,
                "associate_timeout": associate_timeout,
            }
        },
    ).start()


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImagServer]:
    """Pending connections may wait a minute: what is closed is closed for lack of room."""
    server = _server(tmp_path_factory.mktemp("patient"), associate_timeout=60)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImagServer]:
    """A one-second associate timeout."""
    server = _server(tmp_path_factory.mktemp("quick"), associate_timeout=1)
    yield server
    assert server.stop() == 0, server.log()


def metric(server: ImagServer, name: str, labels: str = "") -> float:
    """A value from the server's /metrics (with the admin token its first start wrote)."""
    token = (server.data_dir / "admin-token").read_text().strip()
    text = requests.get(
        f"http://{HOST}:{server.http_port}/metrics",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).text
    wanted = name + (f"{{{labels}}}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def silent(server: ImagServer, n: int) -> list[socket.socket]:
    """``n`` TCP connections that never send a byte, once the server holds them
    as pending."""
    before = metric(server, "imag_dicom_pending_connections")
    conns = [socket.create_connection((HOST, server.dicom_port), timeout=30) for _ in range(n)]
    eventually(
        lambda: metric(server, "imag_dicom_pending_connections") >= before + n,
        what=f"the server holds {n} more pending connections",
    )
    return conns


def closed_by_server(conn: socket.socket, within: float) -> float:
    """Seconds until the server closed ``conn`` (it sends nothing first)."""
    conn.settimeout(within)
    started = time.monotonic()
    try:
        data = conn.recv(1024)
    except ConnectionResetError:
        data = b""
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {within} s") from None
    assert data == b"", data
    return time.monotonic() - started


def echo_status(server: ImagServer, aet: str = "MODALITY_A") -> int | None:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    try:
        assoc = ae.associate(HOST, server.dicom_port, ae_title=SERVER_AET)
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status)
    finally:
        ae.shutdown()


def close_all(conns: list[socket.socket]) -> None:
    for conn in conns:
        conn.close()


def test_silent_connections_as_many_as_the_association_slots_do_not_lock_peers_out(
    patient: ImagServer,
) -> None:
    conns = silent(patient, MAX_ASSOCIATIONS)
    try:
        started = time.monotonic()
        run = patient.echoscu("MODALITY_A")
        assert run.returncode == 0, run.stdout
        assert time.monotonic() - started < 5
        # every slot is still there for real associations while they hang on
        held = []
        for _ in range(MAX_ASSOCIATIONS):
            ae = AE(ae_title="MODALITY_B")
            ae.add_requested_context(Verification)
            assoc = ae.associate(
                HOST, patient.dicom_port, ae_title=SERVER_AET, evt_handlers=CLIENT_HANDLERS
            )
            held.append((ae, assoc))
        try:
            assert all(assoc.is_established for _, assoc in held)
            assert all(assoc.send_c_echo().Status == 0x0000 for _, assoc in held)
            # ... and the slots are still a limit
            over = patient.echoscu("MODALITY_A")
            assert over.returncode != 0
            assert "Local Limit Exceeded" in over.stdout, over.stdout
        finally:
            for ae, assoc in held:
                assoc.release()
                ae.shutdown()
    finally:
        close_all(conns)
    assert (
        metric(patient, "imag_dicom_connections_refused_total", 'reason="association-limit"') >= 1
    )
    assert "dicom.max_associations (2) associations in progress" in patient.log()
    eventually(
        lambda: patient.echoscu("MODALITY_A").returncode == 0, what="the server serves again"
    )


def test_beyond_the_pending_budget_new_connections_are_closed_at_once_and_peers_get_in(
    patient: ImagServer,
) -> None:
    refused_before = metric(
        patient, "imag_dicom_connections_refused_total", 'reason="pending-limit"'
    )
    conns = silent(patient, MAX_PENDING)
    try:
        extra = socket.create_connection((HOST, patient.dicom_port), timeout=30)
        with extra:
            assert closed_by_server(extra, within=5) < 2
        assert (
            metric(patient, "imag_dicom_connections_refused_total", 'reason="pending-limit"')
            >= refused_before + 1
        )
        assert "dicom.max_pending_connections (3) connections are waiting" in patient.log()
        # Each refusal also cuts the longest-waiting silent connection (once it
        # waited a second): a peer trying again gets in, long before the
        # one-minute associate timeout.
        started = time.monotonic()
        eventually(
            lambda: echo_status(patient) == 0x0000, what="a peer associates again", timeout=15
        )
        assert time.monotonic() - started < 10
        assert closed_by_server(conns[0], within=5) < 5  # the oldest was cut
        assert metric(patient, "imag_dicom_connections_refused_total", 'reason="cut"') >= 1
    finally:
        close_all(conns)
    assert requests.get(f"http://{HOST}:{patient.http_port}/health", timeout=10).ok


def test_a_connection_silent_for_the_associate_timeout_is_closed_by_the_server(
    quick: ImagServer,
) -> None:
    [conn] = silent(quick, 1)
    with conn:
        waited = closed_by_server(conn, within=10)
    assert waited < 5  # dicom.associate_timeout = 1 s, not the 30 s ACSE timeout
    eventually(
        lambda: (
            metric(quick, "imag_dicom_connections_refused_total", 'reason="associate-timeout"') >= 1
        ),
        what="the timeout is counted",
    )
    assert "no A-ASSOCIATE-RQ within dicom.associate_timeout (1 s)" in quick.log()
    assert quick.echoscu("MODALITY_A").returncode == 0


def test_an_association_request_that_stalls_half_way_is_closed_at_the_associate_timeout(
    quick: ImagServer,
) -> None:
    """A slow-loris: the A-ASSOCIATE-RQ header arrives, the rest never does."""
    rq = capture_associate_rq("MODALITY_A", [build_context(Verification)])
    conn = socket.create_connection((HOST, quick.dicom_port), timeout=10)
    with conn:
        conn.sendall(rq[: len(rq) // 2])
        waited = closed_by_server(conn, within=10)
    assert waited < 5
    # the half request held no association slot: both are free meanwhile
    assert quick.echoscu("MODALITY_A").returncode == 0
    assert quick.proc is not None and quick.proc.poll() is None


def test_dicom_associate_settings_appear_in_config_show(quick: ImagServer) -> None:
    shown = quick.imag("config", "show")
    assert shown.returncode == 0, shown.stderr
    for setting, env in (
        ("dicom.associate_timeout", "IMAG_DICOM_ASSOCIATE_TIMEOUT"),
        ("dicom.max_pending_connections", "IMAG_DICOM_MAX_PENDING_CONNECTIONS"),
    ):
        assert re.search(rf"{re.escape(setting)}\b", shown.stdout), shown.stdout
        assert env in shown.stdout


@pytest.mark.serial
def test_a_tls_connection_that_never_starts_its_handshake_is_closed_at_the_timeout(
    tmp_path: Path,
) -> None:
    """The TLS handshake counts in the associate timeout; a real handshake
    and association go on meanwhile."""
    from tests.httpserver import running_imag
    from tests.test_tls import client_context, dicom_tls_settings, make_pki, pynetdicom_echo

    pki = make_pki(tmp_path / "pki")
    settings = dicom_tls_settings(pki) | {"IMAG_DICOM_ASSOCIATE_TIMEOUT": "1"}
    with running_imag(tmp_path / "imag", dicom=True, settings=settings) as server:
        conn = socket.create_connection((HOST, server.dicom_port), timeout=10)
        with conn:
            assert pynetdicom_echo(server.dicom_port, client_context(pki, pki.client)) == 0
            assert closed_by_server(conn, within=10) < 5
        assert "DICOM TLS handshake failed" in server.log()
