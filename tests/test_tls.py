"""TLS on both of IMAG's doors, tested with real clients and a throwaway PKI.

DICOM (PS3.15 B.1): with ``dicom.tls_cert`` the DICOM port speaks TLS only, and
with ``dicom.tls_ca`` a peer is let in only with a client certificate that CA
signed.  dcmtk (storescu, echoscu) and pynetdicom play the modalities.  HTTP:
with ``http.tls_cert`` ``imag serve`` answers HTTPS only, and authentication
still applies inside the encrypted channel."""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from archive.config import load_config
from archive.synthetic import StudySpec, modality_preset, write_study
from tests.dicomfiles import make_instance
from tests.dicomnet import CLIENT_HANDLERS, SERVER_AET, run_tool, split_part10
from tests.httpserver import HttpImag, running_imag
from tests.processes import HOST, eventually
from tests.test_dimse_lean import (
    STORESCU,
    assert_stored_as_sent,
    field,
    lean_lines,
    pynetdicom_lines,
    uid_of,
)
from tests.test_dimse_lean_spool import proc_status_kib, spool_files, write_big

# -- a throwaway PKI -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    """A certificate and its unencrypted private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """``ca`` signed ``server`` (127.0.0.1 and localhost) and ``client``; the
    ``rogue_ca``, which IMAG is never told about, signed ``rogue_client``."""

    ca: Path
    server: Pem
    client: Pem
    rogue_ca: Path
    rogue_client: Pem


def _key() -> rsa.RSAPrivateKey:
    # RSA: every TLS profile dcmtk offers (BCP 195 included) has RSA suites
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IMAG tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(folder: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Pem:
    pem = Pem(folder / f"{stem}.crt", folder / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem.key.chmod(0o600)
    return pem


def _certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A CA certificate (``issuer`` None: self-signed) or a leaf for ``usage``."""
    now = datetime.datetime.now(datetime.UTC)
    is_ca = issuer is None
    issuer_name = _name(subject) if is_ca else issuer[0].subject
    signing_key = key if is_ca else issuer[1]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=False,
                key_encipherment=not is_ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_key = _key(), _key()
    ca = _certificate("IMAG test CA", ca_key, None)
    rogue = _certificate("Rogue CA", rogue_key, None)

    def leaf(stem: str, signer: tuple, usage: x509.ObjectIdentifier, **kw: object) -> Pem:
        key = _key()
        return _write(folder, stem, _certificate(stem, key, signer, usage=usage, **kw), key)

    server = leaf(
        "imag-server",
        (ca, ca_key),
        ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")],
    )
    client = leaf("MODALITY", (ca, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_client = leaf("ROGUE", (rogue, rogue_key), ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path = _write(folder, "ca", ca, ca_key).cert
    rogue_path = _write(folder, "rogue-ca", rogue, rogue_key).cert
    return Pki(ca_path, server, client, rogue_path, rogue_client)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One PKI for the module (RSA key generation is the slow part)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def dicom_tls_settings(pki: Pki, *, ca: bool = True) -> dict[str, str]:
    settings = {
        "IMAG_DICOM_TLS_CERT": str(pki.server.cert),
        "IMAG_DICOM_TLS_KEY": str(pki.server.key),
    }
    if ca:
        settings["IMAG_DICOM_TLS_CA"] = str(pki.ca)
    return settings


@pytest.fixture(scope="module")
def dicom_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpImag]:
    """An IMAG whose DICOM port speaks mutual TLS with the test CA (HTTP stays plain)."""
    with running_imag(
        tmp_path_factory.mktemp("imag-dicom-tls"), dicom=True, settings=dicom_tls_settings(pki)
    ) as server:
        yield server


# -- helpers ---------------------------------------------------------------------------------


def instance_file(folder: Path) -> tuple[Path, str]:
    """A fresh CT instance written to ``folder``; (path, SOP Instance UID)."""
    uid = generate_uid()

    def edit(ds: object) -> None:
        ds.SOPInstanceUID = uid  # type: ignore[attr-defined]
        ds.file_meta.MediaStorageSOPInstanceUID = uid  # type: ignore[attr-defined]

    path = folder / f"{uid}.dcm"
    path.write_bytes(make_instance(edit))
    return path, uid


def found(server: HttpImag, sop_instance_uid: str) -> list[dict]:
    """What QIDO-RS answers for that SOP Instance UID."""
    return server.client().search_for_instances(search_filters={"SOPInstanceUID": sop_instance_uid})


def tls_options(client: Pem | None, ca: Path) -> list[str]:
    """dcmtk's TLS options: ``+tls key cert`` (or anonymous ``+tla`` without a
    client certificate), trusting ``ca`` for the server's certificate."""
    head = ["+tls", str(client.key), str(client.cert)] if client else ["+tla"]
    return [*head, "+cf", str(ca)]


def storescu(server: HttpImag, path: Path, *options: str) -> subprocess.CompletedProcess:
    return run_tool(
        "storescu",
        *options,
        "-aec",
        SERVER_AET,
        "-aet",
        "MODALITY",
        HOST,
        str(server.dicom_port),
        str(path),
        timeout=60,
    )


def echoscu(server: HttpImag, *options: str) -> subprocess.CompletedProcess:
    return run_tool(
        "echoscu",
        *options,
        "-aec",
        SERVER_AET,
        "-aet",
        "MODALITY",
        HOST,
        str(server.dicom_port),
        timeout=30,
    )


def refused(run: subprocess.CompletedProcess) -> bool:
    """The dcmtk tool failed at the association (and not, say, reading its file)."""
    return run.returncode != 0 and "Association Request Failed" in run.stdout


def client_context(pki: Pki, client: Pem | None) -> ssl.SSLContext:
    """A client context trusting the test CA, presenting ``client`` if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def pynetdicom_echo(port: int, context: ssl.SSLContext, timeout: float = 10) -> int | None:
    """C-ECHO over TLS with pynetdicom: the status, or None without an association."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.network_timeout = timeout
    try:
        assoc = ae.associate(
            HOST,
            port,
            ae_title=SERVER_AET,
            tls_args=(context, HOST),
            evt_handlers=CLIENT_HANDLERS,
        )
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status) if "Status" in status else None
    finally:
        ae.shutdown()


# -- DICOM over TLS ---------------------------------------------------------------------------


def test_storescu_with_a_client_certificate_the_ca_signed_stores_over_tls(
    dicom_tls: HttpImag, pki: Pki, tmp_path: Path
) -> None:
    """The point of DICOM TLS: a modality with a certificate from the
    configured CA sends an instance over the encrypted association and it is
    archived like any other (QIDO-RS finds it)."""
    path, uid = instance_file(tmp_path)
    run = storescu(dicom_tls, path, *tls_options(pki.client, pki.ca))
    assert run.returncode == 0, run.stdout + dicom_tls.log()
    answers = found(dicom_tls, uid)
    assert len(answers) == 1, answers
    assert answers[0]["00080018"]["Value"] == [uid]


def test_echoscu_over_tls_verifies_the_archive_certificate(dicom_tls: HttpImag, pki: Pki) -> None:
    """The modality checks the archive too: echoscu trusting the test CA
    succeeds, echoscu trusting only another CA refuses the archive's
    certificate (mutual authentication, not only the archive checking)."""
    ok = echoscu(dicom_tls, *tls_options(pki.client, pki.ca))
    assert ok.returncode == 0, ok.stdout
    wrong_trust = echoscu(dicom_tls, *tls_options(pki.client, pki.rogue_ca))
    assert wrong_trust.returncode != 0, wrong_trust.stdout
    assert "certificate verify failed" in wrong_trust.stdout


def test_plain_dicom_against_the_tls_port_is_refused(dicom_tls: HttpImag, tmp_path: Path) -> None:
    """With TLS on, the port must not fall back to clear text: a plain
    echoscu gets no association and a plain storescu stores nothing."""
    echo = echoscu(dicom_tls)
    assert refused(echo), echo.stdout
    path, uid = instance_file(tmp_path)
    store = storescu(dicom_tls, path)
    assert refused(store), store.stdout
    assert found(dicom_tls, uid) == []


def test_a_client_certificate_from_an_untrusted_ca_is_refused(
    dicom_tls: HttpImag, pki: Pki, tmp_path: Path
) -> None:
    """dicom.tls_ca is the gate: a well-formed client certificate signed by a
    CA the archive does not trust gets no association and stores nothing."""
    path, uid = instance_file(tmp_path)
    run = storescu(dicom_tls, path, *tls_options(pki.rogue_client, pki.ca))
    assert refused(run), run.stdout
    assert found(dicom_tls, uid) == []


def test_a_tls_client_without_a_certificate_is_refused_when_tls_ca_is_set(
    dicom_tls: HttpImag, pki: Pki, tmp_path: Path
) -> None:
    """Encryption alone is not authentication: with dicom.tls_ca set, an
    anonymous TLS client (storescu +tla, no certificate) is refused."""
    path, uid = instance_file(tmp_path)
    run = storescu(dicom_tls, path, *tls_options(None, pki.ca))
    assert refused(run), run.stdout
    assert found(dicom_tls, uid) == []


def test_pynetdicom_tls_client_with_a_client_certificate_gets_a_c_echo(
    dicom_tls: HttpImag, pki: Pki
) -> None:
    """pynetdicom-based peers (scripts, other archives) pass tls_args; with a
    certificate from the CA and hostname checking on, C-ECHO succeeds; the
    same client without a certificate gets no association."""
    assert pynetdicom_echo(dicom_tls.dicom_port, client_context(pki, pki.client)) == 0x0000
    assert pynetdicom_echo(dicom_tls.dicom_port, client_context(pki, None)) is None


def test_a_silent_connection_does_not_stall_the_tls_listener(dicom_tls: HttpImag, pki: Pki) -> None:
    """A TCP connection that never starts its TLS handshake (a port scanner, a
    crashed client, a slow-loris) must not block the accept loop: other
    modalities still associate while it hangs there."""
    with socket.create_connection((HOST, dicom_tls.dicom_port), timeout=5):
        time.sleep(0.2)  # let the listener accept it
        started = time.monotonic()
        status = pynetdicom_echo(dicom_tls.dicom_port, client_context(pki, pki.client), 10)
        assert status == 0x0000, dicom_tls.log()
        assert time.monotonic() - started < 5


def test_without_tls_ca_any_tls_client_may_associate(pki: Pki, tmp_path: Path) -> None:
    """dicom.tls_ca is what asks for client certificates: without it the port
    still encrypts (plain DICOM is refused) but needs no client certificate,
    the archive relying on AE titles as without TLS."""
    with running_imag(
        tmp_path / "imag", dicom=True, settings=dicom_tls_settings(pki, ca=False)
    ) as server:
        anonymous = echoscu(server, *tls_options(None, pki.ca))
        assert anonymous.returncode == 0, anonymous.stdout + server.log()
        plain = echoscu(server)
        assert refused(plain), plain.stdout


def test_the_client_ca_is_tls_ca_alone_not_the_system_trust_store(pki: Pki, tmp_path: Path) -> None:
    """dicom.tls_ca must be the only CA that can vouch for a peer: the
    operating system's public CAs sign certificates for anyone.  The rogue CA
    is made system-trusted for the server process (SSL_CERT_FILE), and its
    client certificate must still be refused."""
    settings = dicom_tls_settings(pki) | {"SSL_CERT_FILE": str(pki.rogue_ca)}
    with running_imag(tmp_path / "imag", dicom=True, settings=settings) as server:
        rogue = echoscu(server, *tls_options(pki.rogue_client, pki.ca))
        assert refused(rogue), rogue.stdout
        ok = echoscu(server, *tls_options(pki.client, pki.ca))
        assert ok.returncode == 0, ok.stdout + server.log()


# -- the lean receive path over TLS ----------------------------------------------------------
#
# TLS connections are the lean path's too: asyncio does the handshake, reads
# the A-ASSOCIATE-RQ through it, serves storage and verification itself and
# relays anything else, decrypted, to pynetdicom.


def index_and_data(server: HttpImag) -> SimpleNamespace:
    """What the lean tests' helpers read of a server: its index and its data folder."""
    return SimpleNamespace(
        index_url=load_config(env=server.env).index_url, data_dir=server.workdir / "data"
    )


def metric_of(server: HttpImag, name: str, labels: str = "") -> float:
    """A value from the server's /metrics."""
    text = server.http.get(server.url + "/metrics", timeout=10).text
    wanted = name + (f"{{{labels}}}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    spec = StudySpec(
        patient_id="TLS01",
        patient_name="TLS^Lean",
        issuer_of_patient_id="SITE_A",
        series=[modality_preset("CT", rows=256, columns=256, instances=16)],
    )
    return write_study(spec, tmp_path_factory.mktemp("tls-ct"), seed=29)


def storescu_tls(server: HttpImag, pki: Pki, files: list[Path]) -> subprocess.Popen:
    """dcmtk's storescu sending ``files`` over one mutual-TLS association."""
    return subprocess.Popen(
        [STORESCU, *tls_options(pki.client, pki.ca), "-aec", SERVER_AET, "-aet", "MODALITY"]
        + [HOST, str(server.dicom_port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
    )


@pytest.mark.parametrize("associations", [1, 4])
def test_storescu_over_tls_is_served_by_the_lean_path_and_stores_bit_identical_objects(
    dicom_tls: HttpImag, pki: Pki, ct_series: list[Path], associations: int
) -> None:
    """`storescu +tls` on one and on four parallel associations: each
    association's log line says the lean path served it (under the peer's
    address), and every object is stored byte for byte as sent."""
    files = ct_series[:4] if associations == 1 else ct_series[4:]
    before = len(lean_lines(dicom_tls))
    procs = [storescu_tls(dicom_tls, pki, files[n::associations]) for n in range(associations)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Store Failed" not in out, out + dicom_tls.log()
    assert_stored_as_sent(index_and_data(dicom_tls), {uid_of(p): p for p in files})
    lines = eventually(
        lambda: (found := lean_lines(dicom_tls)[before:]) and len(found) >= associations and found,
        what="the associations' log lines",
    )
    assert len(lines) == associations
    assert sum(int(field(ln, "stored")) for ln in lines) == len(files)
    assert {(field(ln, "address"), field(ln, "outcome")) for ln in lines} == {(HOST, "released")}


def test_a_tls_c_find_is_answered_and_a_tls_c_get_is_served_by_pynetdicom_through_the_relay(
    dicom_tls: HttpImag, pki: Pki, ct_series: list[Path]
) -> None:
    """Associations the lean path does not serve still work over TLS: findscu
    +tls gets its answer, and a C-GET (pynetdicom as SCU, with the SCP role
    for storage) is served by pynetdicom through the local relay -- every
    object comes back byte for byte, and the association is logged under
    the peer's own address."""
    sent = ct_series  # the whole study (other tests may have sent some of it)
    push = storescu_tls(dicom_tls, pki, sent)
    assert push.wait(timeout=60) == 0
    study = str(pydicom.dcmread(sent[0], stop_before_pixels=True).StudyInstanceUID)
    with tempfile.TemporaryDirectory() as out:
        find = run_tool(
            "findscu",
            "-S",
            "-X",
            "-od",
            out,
            *tls_options(pki.client, pki.ca),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "-k",
            "PatientID",
            "-aec",
            SERVER_AET,
            "-aet",
            "MODALITY",
            HOST,
            str(dicom_tls.dicom_port),
        )
        answers = [pydicom.dcmread(p) for p in Path(out).glob("rsp*.dcm")]
    assert find.returncode == 0, find.stdout
    assert [(a.StudyInstanceUID, a.PatientID) for a in answers] == [(study, "TLS01")]

    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0x0000

    before = len(pynetdicom_lines(dicom_tls))
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = build_role(CTImageStorage, scp_role=True)
    try:
        assoc = ae.associate(
            HOST,
            dicom_tls.dicom_port,
            ae_title=SERVER_AET,
            ext_neg=[role],
            tls_args=(client_context(pki, pki.client), HOST),
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert assoc.is_established, dicom_tls.log()
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        statuses = [
            int(s.Status)
            for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            if s
        ]
        assoc.release()
    finally:
        ae.shutdown()
    assert statuses[-1] == 0x0000, statuses
    assert received == {uid_of(p): split_part10(p.read_bytes())[1] for p in sent}
    [line] = eventually(
        lambda: pynetdicom_lines(dicom_tls)[before:], what="the C-GET association's log line"
    )
    assert (field(line, "address"), field(line, "retrieved")) == (HOST, str(len(sent)))


def test_a_client_refused_at_the_handshake_is_logged_and_its_connection_is_not_left_pending(
    dicom_tls: HttpImag, pki: Pki, tmp_path: Path
) -> None:
    """A refused certificate ends at the handshake: logged (as before), and
    the connection leaves the pending set at once (it would otherwise hold a
    slot of dicom.max_pending_connections until the associate timeout)."""
    failures = dicom_tls.log().count("DICOM TLS handshake failed")
    path, uid = instance_file(tmp_path)
    run = storescu(dicom_tls, path, *tls_options(pki.rogue_client, pki.ca))
    assert refused(run), run.stdout
    eventually(
        lambda: dicom_tls.log().count("DICOM TLS handshake failed") > failures,
        what="the handshake failure logged",
    )
    eventually(
        lambda: metric_of(dicom_tls, "imag_dicom_pending_connections") == 0,
        what="no connection left pending",
    )
    assert found(dicom_tls, uid) == []


@pytest.fixture(scope="module")
def impatient_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpImag]:
    """Mutual TLS with a two-second associate timeout."""
    settings = dicom_tls_settings(pki) | {"IMAG_DICOM_ASSOCIATE_TIMEOUT": "2"}
    with running_imag(
        tmp_path_factory.mktemp("imag-impatient-tls"), dicom=True, settings=settings
    ) as server:
        yield server


def closed_within(conn: socket.socket | ssl.SSLSocket, seconds: float) -> float:
    """Seconds until the server closed ``conn`` (sending nothing first)."""
    conn.settimeout(seconds)
    started = time.monotonic()
    try:
        data = conn.recv(1024)
    except (ConnectionResetError, ssl.SSLEOFError):
        data = b""
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {seconds} s") from None
    assert data == b"", data
    return time.monotonic() - started


@pytest.mark.parametrize("stalls", ["in-the-handshake", "after-the-handshake"])
def test_a_tls_connection_that_does_not_associate_is_closed_at_the_associate_timeout(
    impatient_tls: HttpImag, pki: Pki, stalls: str
) -> None:
    """The associate timeout covers the handshake and the A-ASSOCIATE-RQ
    after it: a peer that stops half-way through its handshake, or completes
    it and then says nothing, is closed at the timeout (counted as
    associate-timeout, logged), while a real peer associates meanwhile."""
    server = impatient_tls
    timeouts = metric_of(
        server, "imag_dicom_connections_refused_total", 'reason="associate-timeout"'
    )
    raw = socket.create_connection((HOST, server.dicom_port), timeout=10)
    with raw:
        if stalls == "in-the-handshake":
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello, cut
            conn: socket.socket | ssl.SSLSocket = raw
            logged = "DICOM TLS handshake failed"
        else:
            conn = client_context(pki, pki.client).wrap_socket(raw, server_hostname=HOST)
            logged = "no A-ASSOCIATE-RQ within dicom.associate_timeout"
        assert pynetdicom_echo(server.dicom_port, client_context(pki, pki.client)) == 0x0000
        assert closed_within(conn, 10) < 5
    eventually(lambda: logged in server.log(), what=f"{logged!r} logged")
    assert (
        metric_of(server, "imag_dicom_connections_refused_total", 'reason="associate-timeout"')
        == timeouts + 1
    )
    assert metric_of(server, "imag_dicom_pending_connections") == 0


# -- large objects over TLS ------------------------------------------------------------------

MiB = 2**20


@pytest.fixture(scope="module")
def spooling_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpImag]:
    """Mutual TLS, data sets spooled to disk above 1 MiB."""
    settings = dicom_tls_settings(pki) | {
        "IMAG_INGEST_STREAM_THRESHOLD": "1MiB",
        "IMAG_INGEST_MAX_OBJECT_BYTES": "64MiB",
    }
    with running_imag(
        tmp_path_factory.mktemp("imag-spooling-tls"), dicom=True, settings=settings
    ) as server:
        yield server


def test_a_large_object_over_tls_is_spooled_not_held_and_stored_bit_identical(
    spooling_tls: HttpImag, pki: Pki, tmp_path: Path
) -> None:
    """Spooling past ingest.stream_threshold holds over TLS too: a 48 MiB
    object raises the server's peak memory by a few MiB, not by its size
    (held in memory it would be twice that), goes through the spool folder
    and is stored byte for byte."""
    server = spooling_tls
    assert server.proc is not None
    pid = server.proc.pid
    warm, big = write_big(tmp_path, 8, seed=91), write_big(tmp_path, 48, seed=92)
    before = len(lean_lines(server))
    push = storescu_tls(server, pki, [warm])
    assert push.wait(timeout=120) == 0
    rss_before = proc_status_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    push = storescu_tls(server, pki, [big])
    out, _ = push.communicate(timeout=300)
    assert push.returncode == 0 and "Store Failed" not in out, out
    grown = proc_status_kib(pid, "VmHWM") - rss_before
    assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB receiving a 48 MiB object over TLS"
    view = index_and_data(server)
    assert_stored_as_sent(view, {uid_of(big): big, uid_of(warm): warm})
    assert (view.data_dir / "tmp").is_dir(), "the object never went through the spool"
    eventually(lambda: not spool_files(view), what="the spool file deleted")
    lines = eventually(
        lambda: (found := lean_lines(server)[before:]) and len(found) >= 2 and found,
        what="the associations' log lines",
    )
    assert [field(ln, "stored") for ln in lines] == ["1", "1"]


# -- HTTPS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpImag]:
    settings = {
        "IMAG_HTTP_TLS_CERT": str(pki.server.cert),
        "IMAG_HTTP_TLS_KEY": str(pki.server.key),
    }
    with running_imag(
        tmp_path_factory.mktemp("imag-https"), settings=settings, tls_ca=pki.ca
    ) as server:
        yield server


def test_https_serves_health_with_a_certificate_the_ca_verifies(https: HttpImag, pki: Pki) -> None:
    """Clients verify the archive against the CA (for 127.0.0.1 and localhost);
    /health answers without a token, as load balancers need."""
    assert https.url.startswith("https://")
    for host in (HOST, "localhost"):
        answer = requests.get(
            f"https://{host}:{https.http_port}/health", verify=str(pki.ca), timeout=10
        )
        assert answer.status_code == 200
        assert answer.json()["status"] == "ok"


def test_https_whoami_with_the_admin_token_names_the_admin(https: HttpImag, pki: Pki) -> None:
    """Authentication works unchanged inside TLS: the bearer token of the
    first start is accepted, and a request without it is not."""
    answer = requests.get(
        https.url + "/whoami",
        headers={"Authorization": f"Bearer {https.token}"},
        verify=str(pki.ca),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == "admin"
    anonymous = requests.get(https.url + "/whoami", verify=str(pki.ca), timeout=10)
    assert anonymous.status_code == 401


def test_https_certificate_is_refused_by_a_client_trusting_another_ca(
    https: HttpImag, pki: Pki
) -> None:
    """The check above means something: the same request trusting only the
    rogue CA fails certificate verification."""
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(https.url + "/health", verify=str(pki.rogue_ca), timeout=10)


def test_plain_http_to_the_https_port_gets_no_answer(https: HttpImag) -> None:
    """No clear-text fallback: plain HTTP to the HTTPS port gets no HTTP
    answer at all (the token would otherwise travel in clear)."""
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(
            f"http://{HOST}:{https.http_port}/whoami",
            headers={"Authorization": f"Bearer {https.token}"},
            timeout=10,
        )


def test_https_wado_study_as_stored_is_the_stored_bytes_with_its_length(
    https: HttpImag, pki: Pki, tmp_path: Path
) -> None:
    """Over TLS the process encrypts every byte, so stored objects cannot go
    to the socket with sendfile(2) (dicomweb/stored.py reads them instead):
    the answer is the same stored bytes with its declared length, for small
    objects and for one over 1 MiB (read in chunks)."""
    spec = StudySpec(
        patient_id="TLS02",
        patient_name="TLS^Wado",
        series=[
            modality_preset("CT", rows=64, columns=64, instances=2),
            modality_preset("CT", rows=1024, columns=1024, instances=1),
        ],
    )
    sent = {uid_of(p): p.read_bytes() for p in write_study(spec, tmp_path, seed=43)}
    body = b"".join(
        b"--tls-wado\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
        for data in sent.values()
    )
    stored = https.http.post(
        https.dicomweb + "/studies",
        data=body + b"--tls-wado--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=tls-wado'},
        verify=str(pki.ca),
        timeout=60,
    )
    assert stored.status_code == 200, stored.text
    answer = https.http.get(
        f"{https.dicomweb}/studies/{spec.study_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        verify=str(pki.ca),
        timeout=60,
    )
    assert answer.status_code == 200
    assert int(answer.headers["Content-Length"]) == len(answer.content)
    boundary = answer.headers["Content-Type"].rsplit("boundary=", 1)[1].encode()
    parts = [
        chunk.partition(b"\r\n\r\n")[2][:-2]
        for chunk in answer.content.split(b"--" + boundary)[1:-1]
    ]
    assert {uid_of_bytes(p): p for p in parts} == sent


def uid_of_bytes(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
