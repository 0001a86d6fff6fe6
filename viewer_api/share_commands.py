"""``imag share``: create, list and revoke share links from the command line.

The operator acts as an administrator (it runs on the server): any study may
be shared.  Each change leaves one audit entry naming the operator (the system
user running the command).  The link's URL is printed once; only its hash is
kept.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from archive.commandline import load
from archive.runtime import Archive
from archive.security.audit import AuditEntry
from archive.security.roles import Principal
from viewer_api import shares
from viewer_api.share_events import public_url
from viewer_api.shares_http import mail_link


def _operator() -> Principal:
    return Principal(f"cli:{getpass.getuser()}", "admin", kind="operator")


def _fail(message: str) -> int:
    print(f"imag share: {message}", file=sys.stderr)
    return 2


def cmd_create(args: argparse.Namespace) -> int:
    operator = _operator()
    asked = shares.Request(
        study_uid=args.study,
        series=tuple(args.series) if args.series else None,
        permissions=("view", "download") if args.download else ("view",),
        audience=args.audience,
        days=args.days,
        second_factor=args.second_factor,
        recipient=args.to,
    )
    with Archive(load(args)) as archive:
        try:
            share, secret = shares.create(archive, operator, asked, site=args.site)
        except shares.ShareError as exc:
            return _fail(exc.detail)
        url = f"{public_url(archive.config)}/share/{secret}"
        detail: dict = {"share": share.id}
        if share.recipient:
            detail["message"] = mail_link(archive, share, url, operator)
        archive.audit.write(
            AuditEntry(
                operator.name,
                operator.kind,
                "share.create",
                "allowed",
                role="admin",
                study_uid=share.study_uid,
                detail=detail,
            )
        )
    print(json.dumps({**share.as_json(), "url": url}, indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with Archive(load(args)) as archive:
        for share in shares.listing(archive.db, _operator(), limit=args.limit):
            state = share.refusal(archive.db.clock.now())
            print(
                f"{share.id}\t{share.study_uid}\t{share.audience}\t{','.join(share.permissions)}\t"
                f"{share.expires_at:%Y-%m-%d}\t{state.reason if state else 'active'}\t"
                f"{share.created_by}"
            )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    operator = _operator()
    with Archive(load(args)) as archive:
        try:
            share = shares.revoke(archive.db, operator, args.id)
        except shares.ShareError as exc:
            return _fail(exc.detail)
        archive.audit.write(
            AuditEntry(
                operator.name,
                operator.kind,
                "share.revoke",
                "allowed",
                role="admin",
                study_uid=share.study_uid,
                detail={"share": share.id},
            )
        )
    print(f"share {share.id} revoked")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``imag share ...``."""
    share = subparsers.add_parser("share", help="share links for GPs and patients")
    sub = share.add_subparsers(dest="share_command", required=True, metavar="COMMAND")

    p = sub.add_parser("create", help="a link to a study (printed once)")
    p.add_argument("--study", required=True, help="StudyInstanceUID")
    p.add_argument("--series", action="append", help="only this series (repeat)")
    p.add_argument("--days", type=float, help="lifetime (default: by audience)")
    p.add_argument("--audience", choices=shares.AUDIENCES, default="gp")
    p.add_argument("--download", action="store_true", help="allow downloading the study")
    p.add_argument("--second-factor", choices=shares.FACTORS)
    p.add_argument("--to", help="mail the link to this address")
    p.add_argument("--site", help="the site the link is made for (whom to ask)")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("list", help="the links, newest first")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("revoke", help="revoke a link at once")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_revoke)
