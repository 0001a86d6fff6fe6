"""The default identity provider -- the regional patient index -- registered
through the platform's hooks: the provider, its settings, its migrations
(component ``identity``), the commit hook and the subscriber that keep the
index, its permissions and the ``identity-vigilance`` role, the
``/api/identity/...`` routes and the ``imag identity`` commands."""

from __future__ import annotations

import argparse
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from archive.config import Config, Setting, as_bool, as_text
from archive.events import Event, Subscriber
from archive.hookspecs import hookimpl
from archive.identity import IdentityPlugin, load_identity_plugin
from archive.identity.regional import EVENT, RegionalIdentity, observation_hook
from archive.index.migrate import Migrations

if TYPE_CHECKING:
    from aiohttp import web

    from archive.runtime import Archive

#: the role of identity-vigilance officers: read the regional index and resolve its queue
ROLE = "identity-vigilance"
PERMISSIONS = {
    "identity.read": "read the regional patient index and its identity-vigilance queue",
    "identity.resolve": "accept or reject link proposals, resolve conflicts, merge and unmerge "
    "regional identities",
}


def _site_list(value: Any) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else text.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError('a list of site names, e.g. ["CHU-MARTINIQUE"]')
    return [v.strip() for v in value if v.strip()]


@hookimpl
def imag_identity_provider(name: str, config: Config | None = None) -> IdentityPlugin | None:
    return RegionalIdentity(config) if name == "default" else None


@hookimpl
def imag_settings() -> list[Setting]:
    return [
        Setting(
            "identity.accept_test_ins",
            False,
            as_bool,
            "accept the ANS test and demo INS OIDs (1.2.250.1.213.1.4.10/.11): test set-ups only",
        ),
        Setting(
            "identity.status_attribute",
            "",
            as_text,
            "attribute carrying the identity status PROV/VALI/RECUP/QUAL (keyword or "
            "gggg,eeee tag, private allowed); empty: none",
        ),
        Setting(
            "identity.birthplace_attribute",
            "",
            as_text,
            "attribute carrying the INSEE birthplace code (keyword or gggg,eeee tag); "
            "empty: derived from an INS-NIR",
        ),
        Setting(
            "identity.qualifying_sites",
            [],
            _site_list,
            "sites that send an INS only for qualified identities: their INS are QUAL",
        ),
        Setting(
            "identity.near_match",
            True,
            as_bool,
            "link proposals ignore accents, hyphens and case in names (false: exact names)",
        ),
        Setting(
            "identity.regional_issuer",
            "IMAG-RPI",
            as_text,
            "IssuerOfPatientID under which C-FIND and QIDO-RS search by regional identifier",
        ),
        Setting("identity.regional_prefix", "RPI", as_text, "prefix of regional identifiers"),
    ]


@hookimpl
def imag_migrations() -> Migrations:
    return Migrations("identity", resources.files("archive.identity").joinpath("migrations"))


@hookimpl
def imag_permissions() -> dict[str, str]:
    return dict(PERMISSIONS)


@hookimpl
def imag_role_grants() -> dict[str, list[str]]:
    return {ROLE: list(PERMISSIONS)}


@hookimpl
def imag_event_types() -> list[str]:
    return [EVENT]


@hookimpl
def imag_ingest_commit_hooks(config: Config) -> list:
    """Only when the regional index is the provider: a replacement provider
    keeps its own records."""
    provider = load_identity_plugin(config["plugins.identity"], config)
    if not isinstance(provider, RegionalIdentity):
        return []
    return [observation_hook(provider.settings)]


def _on_observed(archive: Archive, event: Event) -> None:
    provider = archive.identity
    if isinstance(provider, RegionalIdentity):
        provider.index(archive.db, archive.audit).observe(event.detail)


@hookimpl
def imag_event_subscribers() -> list[Subscriber]:
    # transactional: a link, a proposal or a conflict is written exactly once per event
    return [Subscriber("identity", (EVENT,), _on_observed)]


@hookimpl
def imag_routes(app: web.Application, archive: Archive) -> None:
    from archive.identity.http import add_routes

    add_routes(app)


@hookimpl
def imag_commands(subparsers: argparse._SubParsersAction) -> None:
    from archive.identity.commands import add_commands

    add_commands(subparsers)
