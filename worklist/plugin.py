"""The teleradiology worklist, registered through the platform's hooks: its
settings (``worklist.*``), tables (component ``worklist``), the permission to
ask for readings and who has it, the subscriber that turns stable studies
into requests (``[[routes]]`` of ``kind = "read"``), the event it records and
its HTTP routes (``/api/worklist``, UPS-RS under ``/dicom-web/workitems``)."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from archive.config import Setting, as_int
from archive.events import Subscriber
from archive.hookspecs import hookimpl
from archive.index.migrate import Migrations

if TYPE_CHECKING:
    from aiohttp import web

    from archive.runtime import Archive

READ = "worklist.read"  # the core's: see the reading worklist
WRITE = "worklist.write"  # the core's: claim and report reading requests
REQUEST = "worklist.request"
REPORT_VALIDATED = "report.validated"

HOUR = 3600


@hookimpl
def imag_settings() -> list[Setting]:
    return [
        Setting(
            "worklist.lease_seconds",
            15 * 60,
            as_int(30, 7 * 24 * HOUR),
            "a claim without activity for this long returns the request to the worklist",
            cluster=True,
        ),
        Setting(
            "worklist.due_stat_seconds",
            HOUR,
            as_int(60, 365 * 24 * HOUR),
            "default time to report a STAT request (UPS priority HIGH)",
            cluster=True,
        ),
        Setting(
            "worklist.due_urgent_seconds",
            12 * HOUR,
            as_int(60, 365 * 24 * HOUR),
            "default time to report an URGENT request (UPS priority MEDIUM)",
            cluster=True,
        ),
        Setting(
            "worklist.due_routine_seconds",
            4 * 24 * HOUR,
            as_int(60, 365 * 24 * HOUR),
            "default time to report a ROUTINE request (UPS priority LOW)",
            cluster=True,
        ),
    ]


@hookimpl
def imag_migrations() -> Migrations:
    return Migrations("worklist", resources.files("worklist").joinpath("migrations"))


@hookimpl
def imag_permissions() -> dict[str, str]:
    return {
        REQUEST: "ask for a reading (tele-expertise), complete or withdraw the requests of "
        "one's sites and read their reports",
    }


@hookimpl
def imag_role_grants() -> dict[str, list[str]]:
    return {role: [REQUEST] for role in ("site_admin", "technician", "radiologist")}


@hookimpl
def imag_event_types() -> list[str]:
    return [REPORT_VALIDATED]


@hookimpl
def imag_event_subscribers() -> list[Subscriber]:
    from worklist.service import on_stable

    # transactional: the request commits with the delivery, exactly once per burst
    return [Subscriber("worklist-read-routes", ("study.stable",), on_stable)]


@hookimpl
def imag_routes(app: web.Application, archive: Archive) -> None:
    from worklist.http import add_routes
    from worklist.stats_http import add_routes as add_stats

    add_routes(app)
    add_stats(app)
