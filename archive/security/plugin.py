"""The core's security features, registered as a plugin: its permissions, its
authenticators (API tokens, OIDC access tokens) and the ``imag user`` /
``token`` / ``group`` / ``audit`` commands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from archive.hookspecs import hookimpl
from archive.security.roles import PERMISSIONS

if TYPE_CHECKING:
    from archive.runtime import Archive


@hookimpl
def imag_permissions() -> dict[str, str]:
    return dict(PERMISSIONS)


@hookimpl
def imag_commands(subparsers: argparse._SubParsersAction) -> None:
    from archive.commandline import load
    from archive.security.commands import add_commands

    add_commands(subparsers, load)


@hookimpl
def imag_authenticators(archive: Archive) -> list:
    from archive.security.http import ApiTokenAuthenticator, OidcAuthenticator
    from archive.security.oidc import OidcVerifier
    from archive.security.principals import Principals

    return [
        OidcAuthenticator(OidcVerifier.from_config(archive.config)),
        ApiTokenAuthenticator(Principals(archive.db)),
    ]
