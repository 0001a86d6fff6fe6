"""The SMTP transport: a mail relay over TLS, with a client certificate when
the operator asks for one (MSSanté operators authenticate applications by
certificate).

Security (``messaging.smtp.security``):

* ``starttls`` (port 587): plain connection upgraded by STARTTLS, refused if
  the server does not offer it;
* ``tls`` (port 465): TLS from the first byte (implicit TLS, "SMTPS");
* ``none``: no encryption, refused unless the host is a loopback address (a
  local relay that does the TLS itself).

The server's certificate is always verified, host name included, against
``messaging.smtp.ca_file`` (or the system's CAs).  A client certificate
(``client_cert`` + ``client_key``) is presented when set; a login
(``username`` + the first line of ``password_file``, read at each delivery so
a rotated password needs no restart) is optional.

Failures are classed for the job queue: connection refused or reset,
time-outs, TLS failures and 4xx answers are temporary (retried with back-off);
5xx answers are permanent (the message fails at once).  When a server refuses
some recipients and accepts others, the accepted ones are reported so that a
retry goes to the others only.
"""

from __future__ import annotations

import ipaddress
import smtplib
import ssl
from dataclasses import dataclass
from typing import Any

from archive.messaging.message import (
    DeliveryFailure,
    Outgoing,
    PermanentFailure,
    TemporaryFailure,
)

SECURITY = ("starttls", "tls", "none")


class SmtpConfigError(ValueError):
    """The SMTP settings cannot work together (plain text to a remote host...)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class SmtpTransport:
    """Deliver through an SMTP server (see the module's docstring)."""

    host: str
    port: int = 587
    security: str = "starttls"
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    username: str = ""
    password_file: str = ""
    timeout: float = 30.0
    #: the name given in EHLO (default: this machine's FQDN)
    local_hostname: str | None = None
    name: str = "smtp"

    def __post_init__(self) -> None:
        if not self.host:
            raise SmtpConfigError("messaging.smtp.host is not set")
        if self.security not in SECURITY:
            raise SmtpConfigError(
                f"messaging.smtp.security {self.security!r}: one of {', '.join(SECURITY)}"
            )
        if self.security == "none" and not is_loopback(self.host):
            raise SmtpConfigError(
                f"messaging.smtp.security = 'none' is refused for {self.host!r}: mail leaves "
                "unencrypted only to a loopback relay; use starttls or tls"
            )
        if self.client_key and not self.client_cert:
            raise SmtpConfigError("messaging.smtp.client_key needs messaging.smtp.client_cert")
        if self.username and not self.password_file:
            raise SmtpConfigError("messaging.smtp.username needs messaging.smtp.password_file")

    @classmethod
    def from_config(cls, config: Any) -> SmtpTransport:
        return cls(
            host=config["messaging.smtp.host"],
            port=config["messaging.smtp.port"],
            security=config["messaging.smtp.security"],
            ca_file=config["messaging.smtp.ca_file"],
            client_cert=config["messaging.smtp.client_cert"],
            client_key=config["messaging.smtp.client_key"],
            username=config["messaging.smtp.username"],
            password_file=config["messaging.smtp.password_file"],
            timeout=float(config["messaging.smtp.timeout"]),
        )

    def tls_context(self) -> ssl.SSLContext:
        """Server certificate and host name verified; our certificate presented
        when configured.  Built at each delivery: renewed certificates are
        picked up without a restart."""
        context = ssl.create_default_context(cafile=self.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.client_cert:
            context.load_cert_chain(self.client_cert, self.client_key or None)
        return context

    def _password(self) -> str:
        with open(self.password_file, encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n")

    def send(self, outgoing: Outgoing) -> None:
        try:
            refused = self._send(outgoing)
        except DeliveryFailure:
            raise
        except smtplib.SMTPRecipientsRefused as exc:  # every recipient refused
            raise _refusal(exc.recipients, ()) from exc
        except smtplib.SMTPResponseException as exc:
            # 4xx: try again later; 5xx: this message will not be taken
            detail = (
                exc.smtp_error.decode("utf-8", "replace")
                if isinstance(exc.smtp_error, bytes)
                else str(exc.smtp_error)
            )
            failure = PermanentFailure if 500 <= exc.smtp_code < 600 else TemporaryFailure
            raise failure(f"{self.host}:{self.port} answered {exc.smtp_code} {detail}") from exc
        except (smtplib.SMTPException, ssl.SSLError, OSError) as exc:
            # connection refused or reset, time-out, TLS handshake refused
            # (a client certificate the server does not accept), STARTTLS missing
            raise TemporaryFailure(
                f"{self.host}:{self.port} ({self.security}): {type(exc).__name__}: {exc}"
            ) from exc
        if refused:
            accepted = [r for r in outgoing.recipients if r not in refused]
            raise _refusal(refused, accepted)

    def _send(self, outgoing: Outgoing) -> dict[str, tuple[int, bytes]]:
        context = self.tls_context() if self.security != "none" else None
        if self.security == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                self.host,
                self.port,
                local_hostname=self.local_hostname,
                timeout=self.timeout,
                context=context,
            )
        else:
            client = smtplib.SMTP(
                self.host, self.port, local_hostname=self.local_hostname, timeout=self.timeout
            )
        with client:
            client.ehlo()
            if self.security == "starttls":
                if not client.has_extn("starttls"):
                    raise TemporaryFailure(
                        f"{self.host}:{self.port} does not offer STARTTLS; nothing was sent"
                    )
                client.starttls(context=context)
                client.ehlo()
            if self.username:
                client.login(self.username, self._password())
            return client.sendmail(outgoing.sender, list(outgoing.recipients), outgoing.data)


def _refusal(refused: dict, accepted: tuple | list) -> DeliveryFailure:
    """Some or all recipients refused: permanent only when every refusal is a
    5xx (a 4xx one may be accepted later, with the others retried too)."""
    codes = {address: code for address, (code, _text) in refused.items()}
    text = "; ".join(
        f"{address}: {code} {_text(message)}" for address, (code, message) in refused.items()
    )
    failure = PermanentFailure if all(500 <= c < 600 for c in codes.values()) else TemporaryFailure
    return failure(f"recipients refused: {text}", accepted)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
