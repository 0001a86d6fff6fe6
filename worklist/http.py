"""``/api/worklist``: the reading worklist over HTTP (being written)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Mount the worklist's routes on the archive's application."""
