"""TLS contexts for the DICOM listener (PS3.15 B.1, "basic TLS secure transport")
and for HTTPS."""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """A server context with our certificate; with ``ca``, clients must present
    a certificate that CA signed (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
    if ca:
        try:
            context.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the TLS CA bundle {ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
