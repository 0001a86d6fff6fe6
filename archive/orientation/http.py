"""``/api/orientation``: the directory, the reading groups and the on-call rota
over HTTP.

Reads (``orientation.read``) answer from whichever provider is configured
(``plugins.orientation``): what ``Archive.orientation`` returns is what the
API shows.  Edits (``orientation.edit``) need an editable provider -- the
default one, whose groups and rota live in the index; a provider that keeps
them elsewhere gets 501 saying so.  Every request leaves one audit entry
(the security middleware's); an edit's entry carries what changed
(``detail.changed``), a refused one why.  Bad input is 400 problem details
and changes nothing.

Times: ``at`` is an ISO date-time; with an offset (``Z``, ``-04:00``) it is
that instant, without one it is the site's local wall clock (or the zone
named by ``tz``).  The answer gives both the UTC instant and the local time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from archive.orientation import (
    OrientationConflict,
    OrientationError,
    OrientationProvider,
    SiteInfo,
    UnknownGroup,
)
from archive.orientation.rota import instant, parse_week
from archive.security.http import audit_of, require
from archive.web import ARCHIVE, problem

READ = "orientation.read"
EDIT = "orientation.edit"
BASE = "/api/orientation"


class _Refused(Exception):
    """A request answered with problem details (raised by the helpers)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


def _guarded(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Turn the domain's refusals into problem details, noted in the audit entry."""

    async def run(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except _Refused as exc:
            audit_of(request).detail["error"] = exc.detail
            return problem(exc.status, exc.title, exc.detail)
        except UnknownGroup as exc:
            audit_of(request).detail["error"] = str(exc)
            status = 404 if request.method == "GET" or "group" in request.match_info else 400
            return problem(status, "Not Found" if status == 404 else "Bad Request", str(exc))
        except OrientationConflict as exc:
            audit_of(request).detail["error"] = str(exc)
            return problem(409, "Conflict", str(exc))
        except OrientationError as exc:
            audit_of(request).detail["error"] = str(exc)
            return problem(400, "Bad Request", str(exc))

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    for mark in ("imag_permission", "imag_action"):
        setattr(run, mark, getattr(handler, mark))
    return run


def _provider(request: web.Request) -> OrientationProvider:
    return request.config_dict[ARCHIVE].orientation


def _editable(request: web.Request) -> Any:
    """The provider, when its groups and rota are edited here."""
    provider = _provider(request)
    if not (hasattr(provider, "directory") and hasattr(provider, "rota")):
        name = request.config_dict[ARCHIVE].config["plugins.orientation"]
        raise _Refused(
            501,
            "Not Implemented",
            f"the orientation provider {name!r} (plugins.orientation) keeps its groups and rota "
            "elsewhere: edit them there",
        )
    return provider


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _Refused(400, "Bad Request", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _Refused(400, "Bad Request", "the body must be a JSON object")
    return body


def _text_field(body: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _Refused(400, "Bad Request", f"{key!r}: a non-empty string is required")
    return value


def _sites_field(body: dict[str, Any]) -> list[str] | None:
    sites = body.get("sites")
    if sites is None:
        return None
    if isinstance(sites, str):
        sites = [sites]
    if not isinstance(sites, list):
        raise _Refused(400, "Bad Request", "'sites': a list of site or region names")
    return sites


def _site(request: web.Request, name: str | None) -> SiteInfo:
    if not name:
        raise _Refused(400, "Bad Request", "the 'site' parameter is required")
    found = _provider(request).site(name)
    if found is None:
        known = ", ".join(s.name for s in _provider(request).sites()) or "none"
        raise _Refused(400, "Bad Request", f"unknown site {name!r} (sites: {known})")
    return found


# -- reads -------------------------------------------------------------------------------------


@require(READ, "orientation.sites")
async def list_sites(request: web.Request) -> web.Response:
    return web.json_response([s.as_dict() for s in _provider(request).sites()])


@require(READ, "orientation.groups")
async def list_groups(request: web.Request) -> web.Response:
    provider = _provider(request)
    member = request.query.get("member")
    found = await asyncio.to_thread(
        provider.groups_of if member else provider.groups, *([member] if member else [])
    )
    return web.json_response([g.as_dict() for g in found])


@require(READ, "orientation.members")
async def list_members(request: web.Request) -> web.Response:
    group = request.match_info["group"]
    members = await asyncio.to_thread(_provider(request).members, group)
    return web.json_response({"group": group, "members": members})


@require(READ, "orientation.on-call")
async def on_call(request: web.Request) -> web.Response:
    """Who handles a request from ``site`` at ``at`` (default: now)."""
    archive = request.config_dict[ARCHIVE]
    provider = _provider(request)
    site = _site(request, request.query.get("site"))
    at = instant(request.query.get("at"), site, request.query.get("tz"), archive.clock.now())
    audit_of(request).detail.update({"site": site.name, "at": at.astimezone(UTC).isoformat()})
    answer = getattr(provider, "answer", None)
    if answer is not None:  # the default provider says which rule decided
        group, decision = await asyncio.to_thread(answer, site.name, at)
        rule, reason = decision.rule, decision.reason
    else:
        group = await asyncio.to_thread(provider.on_call, site.name, at)
        rule = None
        reason = "answered by the orientation provider " + repr(
            archive.config["plugins.orientation"]
        )
    local = at.astimezone(site.zone)
    return web.json_response(
        {
            "site": site.name,
            "time_zone": site.time_zone,
            "at": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "local": local.replace(tzinfo=None).isoformat(timespec="minutes"),
            "on_call": group is not None,
            "group": group.as_dict() if group is not None else None,
            "rule": rule,
            "reason": reason if group is not None else f"nobody is on call: {reason}",
        }
    )


@require(READ, "orientation.rota")
async def show_rota(request: web.Request) -> web.Response:
    """A week of the rota (``week=2026-W49``, default this week), for one
    group (``group=``) and with a site's on-call timeline (``site=``)."""
    archive = request.config_dict[ARCHIVE]
    provider = _editable(request)
    site_name = request.query.get("site")
    site = _site(request, site_name) if site_name else None
    group = request.query.get("group") or None
    if group is not None:
        await asyncio.to_thread(provider.directory.require, group)
    week = request.query.get("week")
    if week:
        monday = parse_week(week)
    else:
        zone = site.zone if site else ZoneInfo(archive.config["orientation.time_zone"])
        today = archive.clock.now().astimezone(zone).date()
        monday = today - timedelta(days=today.weekday())
    view = await asyncio.to_thread(provider.rota.week, monday, group, site)
    return web.json_response(view)


# -- edits -------------------------------------------------------------------------------------


async def _edit(request: web.Request, change: Callable[[], Any], status: int = 200) -> web.Response:
    """Run an edit in a thread; its description is the audit entry's detail."""
    result = await asyncio.to_thread(change)
    record, changed = result if isinstance(result, tuple) else (None, result)
    audit_of(request).detail["changed"] = changed
    body = record.as_dict() if record is not None else changed
    return web.json_response(body, status=status)


@require(EDIT, "orientation.group.add")
async def add_group(request: web.Request) -> web.Response:
    provider = _editable(request)
    body = await _body(request)
    name = _text_field(body, "name")
    return await _edit(
        request,
        lambda: provider.directory.add_group(
            name, body.get("label") or "", body.get("address") or ""
        ),
        201,
    )


@require(EDIT, "orientation.group.remove")
async def remove_group(request: web.Request) -> web.Response:
    provider = _editable(request)
    return await _edit(
        request, lambda: provider.directory.remove_group(request.match_info["group"])
    )


@require(EDIT, "orientation.members.add")
async def add_members(request: web.Request) -> web.Response:
    provider = _editable(request)
    body = await _body(request)
    members = body.get("members")
    if isinstance(members, str):
        members = [members]
    if not isinstance(members, list) or not members:
        raise _Refused(400, "Bad Request", "'members': a non-empty list of user names")
    group = request.match_info["group"]
    return await _edit(request, lambda: provider.directory.add_members(group, members))


@require(EDIT, "orientation.members.remove")
async def remove_member(request: web.Request) -> web.Response:
    provider = _editable(request)
    group, member = request.match_info["group"], request.match_info["member"]
    return await _edit(request, lambda: provider.directory.remove_members(group, [member]))


@require(EDIT, "orientation.rota.add")
async def add_weekly(request: web.Request) -> web.Response:
    provider = _editable(request)
    body = await _body(request)
    group = _text_field(body, "group")
    day, start, end = (_text_field(body, key) for key in ("day", "start", "end"))
    sites = _sites_field(body)
    return await _edit(
        request, lambda: provider.rota.add_weekly(group, day, start, end, sites), 201
    )


@require(EDIT, "orientation.rota.except")
async def add_exception(request: web.Request) -> web.Response:
    """``{"from": ..., "to": ..., "group": G}`` or ``"nobody": true`` (said
    explicitly: a forgotten group must not empty the rota)."""
    provider = _editable(request)
    body = await _body(request)
    starts = _text_field(body, "from")
    ends = _text_field(body, "to", required=False)
    nobody = body.get("nobody") is True
    group = _text_field(body, "group", required=False)
    if nobody == (group is not None):
        raise _Refused(
            400, "Bad Request", "name the group on call ('group') or say 'nobody': true, not both"
        )
    replaces = _text_field(body, "replaces", required=False)
    note = body.get("note") or ""
    sites = _sites_field(body)
    return await _edit(
        request,
        lambda: provider.rota.add_exception(
            starts, ends, group, replaces=replaces, sites=sites, note=note
        ),
        201,
    )


@require(EDIT, "orientation.rota.holiday")
async def add_holiday(request: web.Request) -> web.Response:
    provider = _editable(request)
    body = await _body(request)
    day = _text_field(body, "date")
    name = body.get("name") or ""
    sites = _sites_field(body)
    return await _edit(request, lambda: provider.rota.add_holiday(day, name, sites), 201)


@require(EDIT, "orientation.rota.remove")
async def remove_rule(request: web.Request) -> web.Response:
    provider = _editable(request)
    kind = {"weekly": "weekly", "exceptions": "exception", "holidays": "holiday"}[
        request.match_info["kind"]
    ]
    number = request.match_info["id"]
    return await _edit(request, lambda: provider.rota.remove(f"{kind}#{number}"))


def add_routes(app: web.Application) -> None:
    """Mount the orientation API under ``/api/orientation``."""
    routes = [
        ("GET", "/sites", list_sites),
        ("GET", "/groups", list_groups),
        ("POST", "/groups", add_group),
        ("DELETE", "/groups/{group}", remove_group),
        ("GET", "/groups/{group}/members", list_members),
        ("POST", "/groups/{group}/members", add_members),
        ("DELETE", "/groups/{group}/members/{member}", remove_member),
        ("GET", "/on-call", on_call),
        ("GET", "/rota", show_rota),
        ("POST", "/rota/weekly", add_weekly),
        ("POST", "/rota/exceptions", add_exception),
        ("POST", "/rota/holidays", add_holiday),
        ("DELETE", "/rota/{kind:weekly|exceptions|holidays}/{id:[0-9]+}", remove_rule),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, BASE + path, _guarded(handler))
