"""``imag rota``: view and edit the on-call rota, the reading groups and their
members from the command line, and ask who is on call.

Edits go through the same domain code as the HTTP API (same checks, same
messages) and each leaves one audit entry naming the operator (the system
user running the command) and what changed.  Times: ``--at`` without an
offset is the site's local wall clock (or ``--tz``'s); rota rules are always
written in the sites' local time.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from datetime import UTC, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from archive.commandline import load
from archive.orientation import OrientationError
from archive.orientation.rota import instant, parse_week
from archive.runtime import Archive
from archive.security.audit import AuditEntry, AuditUnavailable


def _fail(message: str) -> int:
    print(f"imag rota: {message}", file=sys.stderr)
    return 2


def _run(work: Callable[[Archive, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Open the archive, run ``work``, turn the domain's refusals into an exit
    status 2 with the message on stderr."""

    def handler(args: argparse.Namespace) -> int:
        with Archive(load(args)) as archive:
            try:
                return work(archive, args)
            except OrientationError as exc:
                return _fail(str(exc))
            except AuditUnavailable as exc:
                return _fail(f"the change is made but its audit entry could not be written: {exc}")
            finally:
                close = getattr(archive.orientation, "close", None)
                if close is not None:
                    close()

    return handler


def _editable(archive: Archive) -> Any:
    provider = archive.orientation
    if not (hasattr(provider, "directory") and hasattr(provider, "rota")):
        raise OrientationError(
            f"the orientation provider {archive.config['plugins.orientation']!r} keeps its groups "
            "and rota elsewhere: edit them there"
        )
    return provider


def _audited(archive: Archive, action: str, result: Any) -> Any:
    """Write the audit entry of a CLI edit; return the record (or the change)."""
    record, changed = result if isinstance(result, tuple) else (None, result)
    archive.audit.write(
        AuditEntry(
            getpass.getuser(),
            "operator",
            action,
            "allowed",
            source="imag rota",
            detail={"changed": changed},
        )
    )
    return record if record is not None else changed


def _print_rule(record: Any) -> None:
    if hasattr(record, "describe"):
        print(record.describe())
    else:
        print(json.dumps(record, sort_keys=True))


# -- reads -------------------------------------------------------------------------------------


def cmd_who(archive: Archive, args: argparse.Namespace) -> int:
    provider = archive.orientation
    site = provider.site(args.site)
    if site is None:
        known = ", ".join(s.name for s in provider.sites()) or "none"
        return _fail(f"unknown site {args.site!r} (sites: {known}; see 'imag rota sites')")
    at = instant(args.at, site, args.tz, archive.clock.now())
    answer = getattr(provider, "answer", None)
    if answer is not None:
        group, decision = answer(site.name, at)
        reason = decision.reason
    else:
        group, reason = provider.on_call(site.name, at), "answered by the provider"
    local = at.astimezone(site.zone).replace(tzinfo=None)
    if args.json:
        print(
            json.dumps(
                {
                    "site": site.name,
                    "local": local.isoformat(timespec="minutes"),
                    "time_zone": site.time_zone,
                    "at": at.astimezone(UTC).isoformat(),
                    "group": group.as_dict() if group else None,
                    "reason": reason,
                }
            )
        )
        return 0
    when = f"{local:%a %Y-%m-%d %H:%M} {site.time_zone} ({at.astimezone(UTC):%H:%M} UTC)"
    if group is None:
        print(f"{site.name} at {when}: nobody is on call")
    else:
        members = ", ".join(group.members) or "no members"
        print(f"{site.name} at {when}: {group.name} ({group.label or group.name}: {members})")
    print(f"  because {reason}")
    return 0


def cmd_show(archive: Archive, args: argparse.Namespace) -> int:
    provider = _editable(archive)
    site = None
    if args.site:
        site = provider.site(args.site)
        if site is None:
            return _fail(f"unknown site {args.site!r} (see 'imag rota sites')")
    if args.group:
        provider.directory.require(args.group)
    if args.week:
        monday = parse_week(args.week)
    else:
        zone = site.zone if site else ZoneInfo(archive.config["orientation.time_zone"])
        today = archive.clock.now().astimezone(zone).date()
        monday = today - timedelta(days=today.weekday())
    view = provider.rota.week(monday, args.group, site)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    title = f"rota, week {view['week']}" + (f", group {args.group}" if args.group else "")
    print(title)
    for day in view["days"]:
        names = "; ".join(
            f"holiday {h['name'] or ''} ({', '.join(h['sites']) or 'all sites'})".replace("  ", " ")
            for h in day["holidays"]
        )
        print(f"  {day['day']} {day['date']}" + (f"  {names}" if names else ""))
    print("weekly:" if view["weekly"] else "weekly: no entries (imag rota add ...)")
    for e in view["weekly"]:
        night = "  (crosses midnight)" if e["crosses_midnight"] else ""
        where = ", ".join(e["sites"]) or "all sites"
        print(
            f"  {e['id']:<12} {e['day']:<8} {e['start']}-{e['end']}  {e['group']:<16} "
            f"{where}{night}"
        )
    if view["exceptions"]:
        print("exceptions:")
        for x in view["exceptions"]:
            who = x["group"] or "NOBODY"
            instead = f" instead of {x['replaces']}" if x["replaces"] else ""
            where = ", ".join(x["sites"]) or "all sites"
            note = f"  -- {x['note']}" if x["note"] else ""
            print(f"  {x['id']:<12} {x['from']} -> {x['to']}  {who}{instead}  {where}{note}")
    if view["holidays"]:
        print("holidays:")
        for h in view["holidays"]:
            print(f"  {h['id']:<12} {h['date']}  {h['name']}  {', '.join(h['sites']) or 'all'}")
    if site is not None:
        print(f"on call for {site.name} ({site.time_zone}), local time:")
        for seg in view["timeline"]:
            print(f"  {seg['from']} -> {seg['to']}  {seg['group'] or 'NOBODY':<16} {seg['rule']}")
    return 0


def cmd_sites(archive: Archive, args: argparse.Namespace) -> int:
    for site in archive.orientation.sites():
        region = f"  region {site.region}" if site.region else ""
        print(f"{site.name:<16} {site.time_zone:<22} {site.label}{region}")
    return 0


def cmd_groups_list(archive: Archive, args: argparse.Namespace) -> int:
    provider = archive.orientation
    groups = provider.groups_of(args.member) if args.member else provider.groups()
    if args.json:
        print(json.dumps([g.as_dict() for g in groups], indent=2))
        return 0
    if not groups:
        print("no reading groups (imag rota groups add NAME)")
    for g in groups:
        print(f"{g.name:<16} {g.label:<30} {', '.join(g.members) or '(no members)'}")
    return 0


# -- edits -------------------------------------------------------------------------------------


def cmd_add(archive: Archive, args: argparse.Namespace) -> int:
    rota = _editable(archive).rota
    result = rota.add_weekly(args.group, args.day, args.start, args.end, _sites(args))
    _print_rule(_audited(archive, "orientation.rota.add", result))
    return 0


def cmd_remove(archive: Archive, args: argparse.Namespace) -> int:
    rota = _editable(archive).rota
    changed = _audited(archive, "orientation.rota.remove", rota.remove(args.rule))
    print(f"removed {args.rule}: {json.dumps(changed, sort_keys=True)}")
    return 0


def cmd_except(archive: Archive, args: argparse.Namespace) -> int:
    rota = _editable(archive).rota
    result = rota.add_exception(
        args.start,
        args.end,
        None if args.nobody else args.group,
        replaces=args.replaces,
        sites=_sites(args),
        note=args.note or "",
    )
    _print_rule(_audited(archive, "orientation.rota.except", result))
    return 0


def cmd_holiday(archive: Archive, args: argparse.Namespace) -> int:
    rota = _editable(archive).rota
    result = rota.add_holiday(args.date, args.name or "", _sites(args))
    _print_rule(_audited(archive, "orientation.rota.holiday", result))
    return 0


def cmd_group_add(archive: Archive, args: argparse.Namespace) -> int:
    directory = _editable(archive).directory
    changed = directory.add_group(args.name, args.label or "", args.address or "")
    _audited(archive, "orientation.group.add", changed)
    print(f"group {args.name} added")
    return 0


def cmd_group_remove(archive: Archive, args: argparse.Namespace) -> int:
    directory = _editable(archive).directory
    _audited(archive, "orientation.group.remove", directory.remove_group(args.name))
    print(f"group {args.name} removed")
    return 0


def cmd_group_join(archive: Archive, args: argparse.Namespace) -> int:
    directory = _editable(archive).directory
    changed = directory.add_members(args.name, args.users)
    _audited(archive, "orientation.members.add", changed)
    added = changed["members.added"]["members"]
    print(f"group {args.name}: added {', '.join(added) or 'nobody new'}")
    return 0


def cmd_group_leave(archive: Archive, args: argparse.Namespace) -> int:
    directory = _editable(archive).directory
    _audited(archive, "orientation.members.remove", directory.remove_members(args.name, args.users))
    print(f"group {args.name}: removed {', '.join(args.users)}")
    return 0


def _sites(args: argparse.Namespace) -> list[str] | None:
    values = [v.strip() for item in args.site or [] for v in item.split(",") if v.strip()]
    return values or None


# -- the parser --------------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``imag rota ...``."""
    rota = subparsers.add_parser(
        "rota", help="the on-call rota, reading groups and sites: who handles a request"
    )
    sub = rota.add_subparsers(dest="rota_command", required=True, metavar="COMMAND")

    p = sub.add_parser("who", help="who is on call for a site at a time (default: now)")
    p.add_argument("--site", required=True)
    p.add_argument("--at", help="2026-12-05T23:00 (site's local time) or with an offset / Z")
    p.add_argument("--tz", help="read --at in this time zone instead of the site's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_who))

    p = sub.add_parser("show", help="a week of the rota (entries, exceptions, holidays)")
    p.add_argument("--week", help="ISO week, e.g. 2026-W49 (default: this week)")
    p.add_argument("--group", help="only this group's entries and exceptions")
    p.add_argument("--site", help="also the resolved on-call timeline of this site")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_show))

    p = sub.add_parser("sites", help="the sites of the directory and their time zones")
    p.set_defaults(func=_run(cmd_sites))

    site_help = "a site or region it covers (repeat or a,b; default: every site)"
    p = sub.add_parser("add", help="add a weekly entry: GROUP on DAY from START to END")
    p.add_argument("--group", required=True)
    p.add_argument("--day", required=True, help="mon..sun or holiday")
    p.add_argument("--start", required=True, help="HH:MM (site's local time)")
    p.add_argument("--end", required=True, help="HH:MM; before START: crosses midnight")
    p.add_argument("--site", action="append", help=site_help)
    p.set_defaults(func=_run(cmd_add))

    p = sub.add_parser("remove", help="remove a rule: weekly#N, exception#N or holiday#N")
    p.add_argument("rule", help="as 'imag rota show' lists it (a bare N: weekly#N)")
    p.set_defaults(func=_run(cmd_remove))

    p = sub.add_parser("except", help="an exception: another group, or nobody, on call")
    p.add_argument("--from", dest="start", required=True, help="2026-12-05 or 2026-12-05T20:00")
    p.add_argument("--to", dest="end", help="date (included) or date-time; default: end of --from")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--group", help="the group on call instead")
    who.add_argument("--nobody", action="store_true", help="nobody is on call")
    p.add_argument("--replaces", help="only where this group would otherwise be on call")
    p.add_argument("--site", action="append", help=site_help)
    p.add_argument("--note")
    p.set_defaults(func=_run(cmd_except))

    p = sub.add_parser("holiday", help="a holiday: the holiday (else Sunday) schedule applies")
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--name")
    p.add_argument("--site", action="append", help="a site or region (default: every site)")
    p.set_defaults(func=_run(cmd_holiday))

    groups = sub.add_parser("groups", help="reading groups and their members")
    gsub = groups.add_subparsers(dest="groups_command", metavar="COMMAND")
    groups.add_argument("--member", help="only the groups of this user")
    groups.add_argument("--json", action="store_true")
    groups.set_defaults(func=_run(cmd_groups_list))
    p = gsub.add_parser("add", help="add a reading group")
    p.add_argument("name")
    p.add_argument("--label")
    p.add_argument("--address", help="the group's (secure) mail address")
    p.set_defaults(func=_run(cmd_group_add))
    p = gsub.add_parser("remove", help="remove a reading group (no rota rule may name it)")
    p.add_argument("name")
    p.set_defaults(func=_run(cmd_group_remove))
    p = gsub.add_parser("join", help="add members to a group")
    p.add_argument("name")
    p.add_argument("users", nargs="+")
    p.set_defaults(func=_run(cmd_group_join))
    p = gsub.add_parser("leave", help="remove members from a group")
    p.add_argument("name")
    p.add_argument("users", nargs="+")
    p.set_defaults(func=_run(cmd_group_leave))
