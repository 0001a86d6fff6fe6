"""Share links, registered through the platform's hooks: the settings
(``sharing.*``), the tables (component ``sharing``), the permissions
(``shares.create``, ``shares.download``) and the share roles, the
authenticators (the link's secret as a bearer, the browser session's cookie),
the routes (``/api/shares``, ``/share/...``), the ``imag share`` commands and
the subscriber that mails a GP a link when a report is validated."""

from __future__ import annotations

import argparse
from importlib import resources
from typing import TYPE_CHECKING

from archive.config import Setting, as_int
from archive.events import Subscriber
from archive.hookspecs import hookimpl
from archive.index.migrate import Migrations
from viewer_api.shares import CREATE, DOWNLOAD, DOWNLOADER, VIEWER

if TYPE_CHECKING:
    from aiohttp import web

    from archive.runtime import Archive

REPORT_VALIDATED = "report.validated"


@hookimpl
def imag_settings() -> list[Setting]:
    days = as_int(1, 3 * 366)
    return [
        Setting(
            "sharing.gp_days", 30, days, "default lifetime of a GP's link (days)", cluster=True
        ),
        Setting(
            "sharing.patient_days",
            365,
            days,
            "default lifetime of a patient's link (days)",
            cluster=True,
        ),
        Setting(
            "sharing.other_days", 30, days, "default lifetime of other links (days)", cluster=True
        ),
        Setting(
            "sharing.code_minutes",
            15,
            as_int(1, 24 * 60),
            "how long a mailed one-time code is valid (minutes)",
            cluster=True,
        ),
        Setting(
            "sharing.max_attempts",
            5,
            as_int(1, 100),
            "wrong second-factor answers after which a link is locked",
            cluster=True,
        ),
        Setting(
            "sharing.session_minutes",
            30,
            as_int(1, 24 * 60),
            "a share session unused for this long ends (minutes)",
            cluster=True,
        ),
        Setting(
            "sharing.session_max_hours",
            12,
            as_int(1, 7 * 24),
            "a share session ends this long after the link was opened (hours)",
            cluster=True,
        ),
        Setting(
            "sharing.rate_per_minute",
            30,
            as_int(1, 100_000),
            "requests per client address and minute on the public /share pages, for every "
            "process together (above: 429)",
            cluster=True,
        ),
    ]


@hookimpl
def imag_migrations() -> Migrations:
    return Migrations("sharing", resources.files("viewer_api").joinpath("migrations"))


@hookimpl
def imag_permissions() -> dict[str, str]:
    # shares.download (DOWNLOAD), which the share-download role is granted, is
    # defined by the module of the route that requires it (viewer_api.viewer_plugin)
    return {
        CREATE: "create share links for the studies in one's scope, list and revoke one's own",
    }


@hookimpl
def imag_role_grants() -> dict[str, list[str]]:
    return {
        **{role: [CREATE] for role in ("radiologist", "site_admin", "technician")},
        VIEWER: ["studies.read"],
        DOWNLOADER: ["studies.read", DOWNLOAD],
    }


@hookimpl
def imag_authenticators(archive: Archive) -> list:
    from viewer_api.share_auth import ShareBearerAuthenticator, ShareSessionAuthenticator

    return [ShareBearerAuthenticator(archive), ShareSessionAuthenticator(archive)]


@hookimpl
def imag_routes(app: web.Application, archive: Archive) -> None:
    from viewer_api import share_pages, shares_http

    shares_http.add_routes(app)
    share_pages.add_routes(app)


@hookimpl
def imag_commands(subparsers: argparse._SubParsersAction) -> None:
    from viewer_api.share_commands import add_commands

    add_commands(subparsers)


@hookimpl
def imag_event_subscribers() -> list[Subscriber]:
    from viewer_api.share_events import on_report_validated

    # transactional: the link and its message commit with the delivery, once per event
    return [Subscriber("sharing-gp-links", (REPORT_VALIDATED,), on_report_validated)]
