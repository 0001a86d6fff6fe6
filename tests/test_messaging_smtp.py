"""Messaging through a real SMTP server: aiosmtpd started by the test, over
STARTTLS and implicit TLS, requiring a client certificate signed by a CA the
test makes (as MSSanté operators authenticate applications).  The job queue
runs in-process on a test clock: retries happen by advancing it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from archive.clock import FakeClock
from archive.config import Config
from archive.jobs import JobQueue, Worker
from archive.messaging import Attachment, Message, get, send
from archive.messaging.message import Outgoing, PermanentFailure, TemporaryFailure
from archive.messaging.smtp import SmtpConfigError, SmtpTransport
from archive.runtime import Archive
from tests.processes import free_port

HOST = "127.0.0.1"

# -- a CA, a server and a client certificate -------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: a client certificate from another CA: refused by the server
    rogue_cert: Path
    rogue_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _ca(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common: str,
    usage: x509.ObjectIdentifier,
    folder: Path,
    stem: str,
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca("IMAG test CA")
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server = _leaf(ca, ca_key, "smtp.test", ExtendedKeyUsageOID.SERVER_AUTH, folder, "server")
    client = _leaf(ca, ca_key, "imag.test", ExtendedKeyUsageOID.CLIENT_AUTH, folder, "client")
    rogue_ca, rogue_ca_key = _ca("Someone else's CA")
    rogue = _leaf(
        rogue_ca, rogue_ca_key, "imag.test", ExtendedKeyUsageOID.CLIENT_AUTH, folder, "rogue"
    )
    return Pki(folder / "ca.pem", *server, *client, *rogue)


# -- the SMTP server --------------------------------------------------------------------------


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    #: the subject of the client certificate the server verified
    client: str | None


class Mailbox:
    """aiosmtpd handler: keeps what it receives; refuses recipients whose
    local part starts with ``unknown`` (550) or ``busy`` (450)."""

    def __init__(self) -> None:
        self.received: list[Received] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:  # noqa: ANN001
        if address.startswith("unknown"):
            return "550 5.1.1 no such mailbox"
        if address.startswith("busy"):
            return "450 4.2.1 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
        peer = server.transport.get_extra_info("peercert")
        subject = None
        if peer:
            subject = dict(x[0] for x in peer["subject"]).get("commonName")
        self.received.append(
            Received(
                envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, subject
            )
        )
        return "250 Message accepted"


def _server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no session
    return context


class _ImplicitTlsController(Controller):
    """aiosmtpd's readiness probe connects without a client certificate,
    which this server refuses: probe with one."""

    def __init__(self, *args: Any, probe: ssl.SSLContext, **kwargs: Any) -> None:
        self._probe = probe
        super().__init__(*args, **kwargs)

    def _trigger_server(self) -> None:
        with (
            socket.create_connection((self.hostname, self.port), 2.0) as raw,
            self._probe.wrap_socket(raw, server_hostname=self.hostname) as tls,
        ):
            tls.recv(1024)


@dataclass
class SmtpServer:
    mode: str  # starttls | tls
    pki: Pki
    port: int
    mailbox: Mailbox
    controller: Controller | None = None

    def start(self) -> SmtpServer:
        context = _server_context(self.pki)
        if self.mode == "tls":
            probe = ssl.create_default_context(cafile=str(self.pki.ca))
            probe.load_cert_chain(self.pki.client_cert, self.pki.client_key)
            self.controller = _ImplicitTlsController(
                self.mailbox, hostname=HOST, port=self.port, ssl_context=context, probe=probe
            )
        else:
            self.controller = Controller(
                self.mailbox,
                hostname=HOST,
                port=self.port,
                tls_context=context,
                require_starttls=True,
            )
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def smtp_server(pki: Pki) -> Iterator[Callable[..., SmtpServer]]:
    started: list[SmtpServer] = []

    def make(mode: str, port: int | None = None, start: bool = True) -> SmtpServer:
        server = SmtpServer(mode, pki, port or free_port(), Mailbox())
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        server.stop()


# -- the archive, with its job queue in-process ------------------------------------------------


@dataclass
class Mailer:
    archive: Archive
    clock: FakeClock
    worker: Worker

    def run_due(self) -> None:
        """Let the due jobs run.  The clock moves on by a millisecond first:
        the worker counts as idle once it has looked for jobs at or after
        the time of this call, and a look made just before a job was queued
        must not count."""
        self.clock.advance(0.001)
        assert self.worker.wait_idle(timeout=60)

    def later(self, seconds: float = 3700) -> None:
        """Let the longest back-off pass, then let the due jobs run."""
        self.clock.advance(seconds)
        self.run_due()


@pytest.fixture
def mailer(
    make_config: Callable[..., Config], tmp_path: Path, pki: Pki
) -> Iterator[Callable[..., Mailer]]:
    opened: list[Mailer] = []

    def open_with(server: SmtpServer, *, certificate: bool = True, **settings: Any) -> Mailer:
        values = {
            "plugins.messaging": "smtp",
            "messaging.from": "imagerie@hopital-a.mssante.fr",
            "messaging.smtp.host": HOST,
            "messaging.smtp.port": server.port,
            "messaging.smtp.security": server.mode,
            "messaging.smtp.ca_file": str(pki.ca),
            "messaging.smtp.timeout": 10,
        }
        if certificate:
            values["messaging.smtp.client_cert"] = str(pki.client_cert)
            values["messaging.smtp.client_key"] = str(pki.client_key)
        values.update(settings)
        config = make_config(index_url=f"sqlite:///{tmp_path / 'index.db'}", settings=values)
        clock = FakeClock()
        archive = Archive(config, clock=clock)
        worker = Worker(archive, "mail", poll_interval=0.05, lease_seconds=120).start()
        mailer = Mailer(archive, clock, worker)
        opened.append(mailer)
        return mailer

    yield open_with
    for m in opened:
        m.worker.stop()
        m.archive.close()


def _report(to: list[str]) -> Message:
    return Message(
        to=to,
        subject="Compte rendu IRM genou",
        text="Bonjour, veuillez trouver le compte rendu ci-joint.",
        attachments=[Attachment("CR.pdf", "application/pdf", b"%PDF-1.7\n" + bytes(range(256)))],
        purpose="report",
    )


def _failures(archive: Archive) -> list:
    return archive.audit.query(action="message.failed")


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_a_message_reaches_a_tls_server_that_requires_our_client_certificate(
    smtp_server, mailer, mode: str
) -> None:
    server = smtp_server(mode)
    m = mailer(server)
    ref = send(m.archive, _report(["dr.martin@cabinet.mssante.fr"]), by="dr.report")
    m.run_due()
    record = get(m.archive.db, ref)
    assert record is not None and record.state == "sent" and record.transport == "smtp"
    [got] = server.mailbox.received
    assert got.client == "imag.test"  # the server verified our certificate
    assert got.sender == "imagerie@hopital-a.mssante.fr"
    assert got.recipients == ["dr.martin@cabinet.mssante.fr"]
    mail = message_from_bytes(got.data, policy=policy.default)
    assert mail["Message-ID"] == record.message_id
    [attachment] = list(mail.iter_attachments())
    assert attachment.get_content() == b"%PDF-1.7\n" + bytes(range(256))
    [sent] = m.archive.audit.query(action="message.sent")
    assert sent.detail["message"] == ref and not _failures(m.archive)


def test_a_server_that_is_down_is_retried_with_back_off_and_gets_the_message_once_back(
    smtp_server, mailer
) -> None:
    server = smtp_server("starttls", start=False)  # nothing listens on its port yet
    m = mailer(server)
    ref = send(m.archive, _report(["dr.martin@cabinet.mssante.fr"]), by="dr.report")
    m.run_due()
    record = get(m.archive.db, ref)
    assert record is not None and record.state == "queued" and record.attempts == 1
    assert "Connection" in (record.last_error or "") or "refused" in (record.last_error or "")
    assert record.job_state == "pending" and record.next_attempt_at is not None
    m.run_due()  # the back-off holds: no second attempt before the clock moves
    assert get(m.archive.db, ref).attempts == 1
    m.later()
    assert get(m.archive.db, ref).attempts == 2
    server.start()
    m.later()
    record = get(m.archive.db, ref)
    assert record.state == "sent" and record.attempts == 3 and record.last_error is None
    assert len(server.mailbox.received) == 1
    m.later()  # nothing more is sent: the job is done
    assert len(server.mailbox.received) == 1
    assert JobQueue(m.archive.db).get(record.job_id).state == "done"


def test_a_client_without_a_certificate_is_refused_and_the_message_fails_after_max_attempts(
    smtp_server, mailer
) -> None:
    server = smtp_server("tls")
    m = mailer(server, certificate=False, **{"messaging.max_attempts": 3})
    ref = send(m.archive, _report(["dr.martin@cabinet.mssante.fr"]), by="dr.report")
    m.run_due()
    for _ in range(2):
        assert get(m.archive.db, ref).state == "queued"
        m.later()
    record = get(m.archive.db, ref)
    assert record.state == "failed" and record.attempts == 3
    # TLS 1.3: the handshake ends on the server's side, which then closes
    assert "(tls)" in record.last_error and "Connection unexpectedly closed" in record.last_error
    assert record.job_state == "dead"
    assert not server.mailbox.received
    [failure] = _failures(m.archive)
    assert failure.outcome == "failed" and failure.detail["message"] == ref
    assert failure.detail["attempts"] == 3 and failure.detail["permanent"] is False
    m.later()  # a dead job is not tried again
    assert get(m.archive.db, ref).attempts == 3 and len(_failures(m.archive)) == 1


def test_a_certificate_from_another_ca_is_refused_too(smtp_server, mailer, pki: Pki) -> None:
    server = smtp_server("starttls")
    m = mailer(
        server,
        certificate=False,
        **{
            "messaging.max_attempts": 1,
            "messaging.smtp.client_cert": str(pki.rogue_cert),
            "messaging.smtp.client_key": str(pki.rogue_key),
        },
    )
    ref = send(m.archive, _report(["dr.martin@cabinet.mssante.fr"]), by="dr.report")
    m.run_due()
    assert get(m.archive.db, ref).state == "failed"
    assert not server.mailbox.received and len(_failures(m.archive)) == 1


def test_a_recipient_refused_with_5xx_fails_the_message_at_once(smtp_server, mailer) -> None:
    server = smtp_server("starttls")
    m = mailer(server)
    ref = send(m.archive, _report(["unknown@cabinet.mssante.fr"]), by="dr.report")
    m.run_due()
    record = get(m.archive.db, ref)
    assert record.state == "failed" and record.attempts == 1  # no retry of a 5xx
    assert "550" in record.last_error and record.job_state == "dead"
    [failure] = _failures(m.archive)
    assert failure.detail["permanent"] is True
    assert not server.mailbox.received


def test_a_partly_refused_message_is_retried_only_to_the_recipients_still_missing(
    smtp_server, mailer
) -> None:
    server = smtp_server("starttls")
    m = mailer(server)
    ref = send(
        m.archive,
        _report(["dr.martin@cabinet.mssante.fr", "busy@hopital-b.mssante.fr"]),
        by="dr.report",
    )
    m.run_due()
    record = get(m.archive.db, ref)
    assert record.state == "queued" and record.delivered_to == ["dr.martin@cabinet.mssante.fr"]
    assert "450" in record.last_error
    server.mailbox.received.clear()
    m.later()
    # still busy: the retry went to the busy recipient alone, not to dr.martin again
    assert server.mailbox.received == []
    assert get(m.archive.db, ref).delivered_to == ["dr.martin@cabinet.mssante.fr"]


def test_plain_text_smtp_is_refused_to_a_remote_host_and_verification_stays_on(
    pki: Pki, smtp_server
) -> None:
    with pytest.raises(SmtpConfigError, match="loopback"):
        SmtpTransport("smtp.example.org", 25, security="none")
    SmtpTransport("127.0.0.1", 25, security="none")  # a local relay is allowed
    # without our CA the server's certificate is not trusted: no delivery
    server = smtp_server("tls")
    transport = SmtpTransport(
        HOST,
        server.port,
        security="tls",
        client_cert=str(pki.client_cert),
        client_key=str(pki.client_key),
        timeout=10,
    )
    outgoing = Outgoing("<x@test>", "a@b.fr", ("c@d.fr",), b"Subject: x\r\n\r\nx\r\n")
    with pytest.raises(TemporaryFailure, match="CERTIFICATE_VERIFY_FAILED"):
        transport.send(outgoing)
    assert not server.mailbox.received
    # and a refused recipient is reported as permanent by the transport itself
    trusted = SmtpTransport(
        HOST,
        server.port,
        security="tls",
        ca_file=str(pki.ca),
        client_cert=str(pki.client_cert),
        client_key=str(pki.client_key),
        timeout=10,
    )
    with pytest.raises(PermanentFailure, match="550"):
        trusted.send(Outgoing("<y@test>", "a@b.fr", ("unknown@d.fr",), outgoing.data))


def test_smtp_settings_that_cannot_work_fail_the_message_with_the_reason(
    smtp_server, mailer
) -> None:
    server = smtp_server("starttls", start=False)
    m = mailer(
        server,
        **{
            "messaging.smtp.host": "smtp.example.org",
            "messaging.smtp.security": "none",
            "messaging.max_attempts": 1,
        },
    )
    ref = send(m.archive, _report(["dr.martin@cabinet.mssante.fr"]), by="dr.report")
    m.run_due()
    record = get(m.archive.db, ref)
    assert record.state == "failed" and "only to a loopback relay" in record.last_error
    assert len(_failures(m.archive)) == 1
