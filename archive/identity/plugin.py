"""The default identity provider, registered through the platform's hooks."""

from __future__ import annotations

from archive.hookspecs import hookimpl
from archive.identity import DefaultIdentity, IdentityPlugin


@hookimpl
def imag_identity_provider(name: str) -> IdentityPlugin | None:
    return DefaultIdentity() if name == "default" else None
