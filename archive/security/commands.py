"""``imag user``, ``imag token``, ``imag group`` and ``imag audit``, and the
admin token written on first start."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from archive.config import Config
from archive.index import open_database, upgrade
from archive.index.db import Database
from archive.security.audit import AuditLog, parse_time
from archive.security.principals import PrincipalError, Principals
from archive.security.roles import role_names

Loader = Callable[[argparse.Namespace], Config]


FIRST_START_TOKEN = "first-start on "


def ensure_admin_token(config: Config, principals: Principals) -> Path | None:
    """On the first start (no principal yet) create the ``admin`` user and a
    token for it, written to ``auth.admin_token_file`` readable only by its
    owner.  Returns the file written, or None when there was nothing to do.

    Nodes started at the same moment on a fresh index race here: exactly one
    creates the account (see :meth:`Principals.create_first_admin`) and writes
    the file on its own disk; the token's name says which node that was
    (:func:`first_admin_node`)."""
    if not config["auth.enabled"] or principals.count():
        return None
    path = Path(config["auth.admin_token_file"])

    def keep(secret: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT

    created = principals.create_first_admin(FIRST_START_TOKEN + config.node, keep)
    if created is None:
        print(
            f"IMAG first start: node {first_admin_node(principals) or '(unknown)'} created the "
            "admin account at the same moment; its token is in auth.admin_token_file on that "
            "node",
            file=sys.stderr,
            flush=True,
        )
        return None
    return path


def first_admin_node(principals: Principals) -> str | None:
    """The node that created the first admin token, from the token's name."""
    for token in principals.tokens("admin"):
        if token.name.startswith(FIRST_START_TOKEN):
            return token.name[len(FIRST_START_TOKEN) :]
    return None


def _db(load: Loader, args: argparse.Namespace) -> Database:
    db = open_database(load(args).index_url)
    upgrade(db)
    return db


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _fail(message: str) -> int:
    print(f"imag: {message}", file=sys.stderr)
    return 1


def add_commands(sub: argparse._SubParsersAction, load: Loader) -> None:
    """Register the security commands on the ``imag`` parser."""

    def run(fn: Callable[[Principals, argparse.Namespace], int]) -> Callable[..., int]:
        def command(args: argparse.Namespace) -> int:
            db = _db(load, args)
            try:
                return fn(Principals(db), args)
            except PrincipalError as exc:
                return _fail(str(exc))
            finally:
                db.close()

        return command

    user = sub.add_parser("user", help="users and service accounts: add, list, disable, enable")
    usub = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    p = usub.add_parser("add", help="add a user or service account")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=role_names())
    p.add_argument("--site", action="append", help="a site it belongs to (repeat or a,b)")
    p.add_argument("--group", action="append", help="a reading group (repeat or a,b)")
    p.add_argument("--service", action="store_true", help="a service account (integrations)")
    p.set_defaults(func=run(_user_add))
    p = usub.add_parser("list", help="list users and service accounts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run(_user_list))
    for name, disabled in (("disable", True), ("enable", False)):
        p = usub.add_parser(name, help=f"{name} an account (its tokens stop/start working)")
        p.add_argument("name")
        p.set_defaults(func=run(lambda pr, a, d=disabled: _user_disable(pr, a, d)))

    token = sub.add_parser("token", help="API tokens: create, list, revoke")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    p = tsub.add_parser("create", help="create a token (printed once, stored hashed)")
    p.add_argument("owner", help="user or service account")
    p.add_argument("--name", default="", help="what the token is for")
    p.add_argument("--expires-days", type=float, help="expire after this many days")
    p.set_defaults(func=run(_token_create))
    p = tsub.add_parser("list", help="list tokens (never their secrets)")
    p.add_argument("owner", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run(_token_list))
    p = tsub.add_parser("revoke", help="revoke a token by its id")
    p.add_argument("id", type=int)
    p.set_defaults(func=run(_token_revoke))

    group = sub.add_parser("group", help="route studies to a reading group (or take them back)")
    gsub = group.add_subparsers(dest="group_command", required=True, metavar="COMMAND")
    for name in ("grant", "revoke"):
        p = gsub.add_parser(name, help=f"{name} a reading group's access to studies")
        p.add_argument("group")
        p.add_argument("studies", nargs="+", metavar="STUDY_UID")
        p.set_defaults(func=run(lambda pr, a, n=name: _group(pr, a, n)))

    p = sub.add_parser("audit", help="query the audit trail; --json exports JSON lines")
    p.add_argument("--since", help="ISO date or date-time (UTC unless an offset is given)")
    p.add_argument("--until", help="ISO date or date-time, exclusive")
    p.add_argument("--actor")
    p.add_argument("--action")
    p.add_argument("--outcome", choices=["allowed", "denied", "failed"])
    p.add_argument("--study", help="Study Instance UID")
    p.add_argument("--patient", help="Patient ID")
    p.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    def audit(args: argparse.Namespace) -> int:
        db = _db(load, args)
        try:
            return _audit(AuditLog(db), args)
        finally:
            db.close()

    p.set_defaults(func=audit)


def _user_add(principals: Principals, args: argparse.Namespace) -> int:
    kind = "service" if args.service else "user"
    account = principals.add(
        args.name, args.role, kind=kind, sites=_split(args.site), groups=_split(args.group)
    )
    print(
        f"added {account.kind} {account.name!r} ({account.role}; sites: "
        f"{', '.join(account.sites) or 'none'}; groups: {', '.join(account.groups) or 'none'})\n"
        f"create a token with: imag token create {account.name}"
    )
    return 0


def _user_list(principals: Principals, args: argparse.Namespace) -> int:
    accounts = principals.list()
    if args.json:
        print(json.dumps([a.as_dict() for a in accounts], indent=2))
        return 0
    for a in accounts:
        state = "disabled" if a.disabled else "active"
        print(
            f"{a.name:<24} {a.kind:<8} {a.role:<17} {state:<8} "
            f"sites={','.join(a.sites) or '-'} groups={','.join(a.groups) or '-'}"
        )
    return 0


def _user_disable(principals: Principals, args: argparse.Namespace, disabled: bool) -> int:
    account = principals.set_disabled(args.name, disabled)
    print(f"{account.name}: {'disabled' if account.disabled else 'enabled'}")
    return 0


def _token_create(principals: Principals, args: argparse.Namespace) -> int:
    if args.expires_days is not None and args.expires_days <= 0:
        return _fail("--expires-days must be positive")
    expires = timedelta(days=args.expires_days) if args.expires_days else None
    info, secret = principals.create_token(args.owner, args.name, expires)
    print(secret)
    print(
        f"token {info.id} for {info.owner}"
        + (f", expires {info.expires_at}" if info.expires_at else "")
        + ": shown once, keep it safe; send it as 'Authorization: Bearer <token>'",
        file=sys.stderr,
    )
    return 0


def _token_list(principals: Principals, args: argparse.Namespace) -> int:
    tokens = principals.tokens(args.owner)
    if args.json:
        print(json.dumps([t.as_dict() for t in tokens], indent=2))
        return 0
    for t in tokens:
        state = "revoked" if t.revoked_at else "active"
        print(
            f"{t.id:>5} {t.owner:<24} {t.name:<20} {state:<8} created {t.created_at} "
            f"expires {t.expires_at or 'never'} last used {t.last_used_at or 'never'}"
        )
    return 0


def _token_revoke(principals: Principals, args: argparse.Namespace) -> int:
    info = principals.revoke(args.id)
    print(f"token {info.id} of {info.owner} revoked at {info.revoked_at}")
    return 0


def _group(principals: Principals, args: argparse.Namespace, action: str) -> int:
    if action == "grant":
        added = principals.grant_group(args.group, args.studies)
        print(f"group {args.group}: {added} new studies ({len(args.studies) - added} already)")
    else:
        principals.revoke_group(args.group, args.studies)
        print(f"group {args.group}: access to {len(args.studies)} studies taken back")
    return 0


def _audit(log: AuditLog, args: argparse.Namespace) -> int:
    try:
        filters = {
            "since": parse_time(args.since) if args.since else None,
            "until": parse_time(args.until) if args.until else None,
            "actor": args.actor,
            "action": args.action,
            "outcome": args.outcome,
            "study_uid": args.study,
            "patient_id": args.patient,
        }
    except ValueError as exc:
        return _fail(str(exc))
    for shown, entry in enumerate(log.iterate(**filters), start=1):
        if args.json:
            print(json.dumps(entry.as_dict(), sort_keys=True))
        else:
            print(
                f"{entry.at}  {entry.outcome:<7} {entry.actor}({entry.role or entry.actor_kind}) "
                f"{entry.action} study={entry.study_uid or '-'} patient={entry.patient_id or '-'} "
                f"from={entry.source or '-'} status={entry.status}"
            )
        if args.limit and shown >= args.limit:
            break
    return 0
