"""The default orientation provider, registered through the platform's hooks:
the provider ``default``, the setting ``orientation.time_zone``, the tables
(component ``orientation``), the permissions and who has them, the routes
under ``/api/orientation`` and the ``imag rota`` commands."""

from __future__ import annotations

import argparse
from importlib import resources
from typing import TYPE_CHECKING

from archive.config import Setting
from archive.hookspecs import hookimpl
from archive.index.migrate import Migrations
from archive.orientation.directory import DEFAULT_TIME_ZONE
from archive.topology import time_zone

if TYPE_CHECKING:
    from aiohttp import web

    from archive.config import Config
    from archive.orientation.rota import DefaultOrientation
    from archive.runtime import Archive

READ = "orientation.read"
EDIT = "orientation.edit"


@hookimpl
def imag_orientation_provider(name: str, config: Config) -> DefaultOrientation | None:
    from archive.orientation.rota import DefaultOrientation

    return DefaultOrientation(config) if name == "default" else None


@hookimpl
def imag_settings() -> list[Setting]:
    return [
        Setting(
            "orientation.time_zone",
            DEFAULT_TIME_ZONE,
            time_zone,
            "time zone of sites whose [[sites]] entry names no time_zone (IANA name: "
            "Europe/Paris, America/Martinique, America/Guadeloupe, America/Cayenne)",
        )
    ]


@hookimpl
def imag_migrations() -> Migrations:
    return Migrations("orientation", resources.files("archive.orientation").joinpath("migrations"))


@hookimpl
def imag_permissions() -> dict[str, str]:
    return {
        READ: "see the sites, reading groups and on-call rota, and who is on call",
        EDIT: "edit reading groups, their members and the on-call rota",
    }


@hookimpl
def imag_role_grants() -> dict[str, list[str]]:
    readers = ("radiologist", "screening_reader", "site_admin", "technician")
    # "coordinator" is a role of its own (defined by this grant): the rota, no studies
    return {**{role: [READ] for role in readers}, "coordinator": [READ, EDIT]}


@hookimpl
def imag_routes(app: web.Application, archive: Archive) -> None:
    from archive.orientation.http import add_routes

    add_routes(app)


@hookimpl
def imag_commands(subparsers: argparse._SubParsersAction) -> None:
    from archive.orientation.commands import add_commands

    add_commands(subparsers)
