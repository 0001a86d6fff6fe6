"""``imag identity ...``: the regional patient index from the command line.

``list`` / ``show`` / ``queue`` / ``merges`` read; ``accept`` / ``reject`` /
``resolve`` decide on the identity-vigilance queue; ``merge`` / ``unmerge``
change regional identities.  Changes are audited under the operator's name
(``--as``, default the system user, kind ``user``, source ``cli``) in the
transaction that makes them.  ``--json`` prints what the HTTP API answers.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any

from archive.commandline import load
from archive.identity import load_identity_plugin
from archive.identity.regional import Actor, IdentityError, RegionalIdentity, RegionalIndex
from archive.index import open_database, upgrade
from archive.security.audit import AuditLog


def _fail(message: str) -> int:
    print(f"imag identity: {message}", file=sys.stderr)
    return 1


def _print(args: argparse.Namespace, value: Any, text: Callable[[Any], str]) -> None:
    if args.json:
        print(json.dumps(value, indent=2, sort_keys=True, default=str))
    else:
        print(text(value))


def _identity_text(found: dict[str, Any]) -> str:
    t = found["traits"]
    lines = [
        f"{found['regional_id']}  INS {found['ins'] or '-'}  status {found['status']}"
        + (f"  (merged into {found['merged_into']})" if found.get("merged_into") else ""),
        f"  {t['birth_name']} {t['given_names'] or t['first_given_name']}  born {t['birth_date']}"
        f"  sex {t['sex'] or '-'}  birthplace {t['birthplace'] or '-'}",
    ]
    for local in found.get("local_identities", []):
        lines.append(
            f"  local {local['site']}/{local['issuer']}/{local['patient_id']}  "
            f"INS {local['ins'] or '-'}  {len(local['studies'])} studies"
        )
        lines += [f"    study {uid}" for uid in local["studies"]]
    return "\n".join(lines)


def _item_text(item: dict[str, Any]) -> str:
    pair = item["regional_a"] + (f" <-> {item['regional_b']}" if item["regional_b"] else "")
    decided = f" by {item['decided_by']}" if item["decided_by"] else ""
    note = f"  note: {item['note']}" if item["note"] else ""
    head = f"#{item['id']:<5} {item['kind']:<9} {item['reason']:<13} {item['state']}"
    return f"{head}{decided}  {pair}{note}"


def _run(fn: Callable[[RegionalIndex, Actor, argparse.Namespace], int]) -> Callable[..., int]:
    def command(args: argparse.Namespace) -> int:
        config = load(args)
        provider = load_identity_plugin(config["plugins.identity"], config)
        if not isinstance(provider, RegionalIdentity):
            return _fail(
                f"the identity provider is {config['plugins.identity']!r}, not the regional "
                "patient index: use that provider's own tools"
            )
        db = open_database(config.index_url)
        try:
            upgrade(db)
            index = provider.index(db, AuditLog(db, config["audit.syslog"], node=config.node))
            actor = Actor(args.actor or getpass.getuser(), "user", None, "cli")
            return fn(index, actor, args)
        except IdentityError as exc:
            return _fail(str(exc))
        finally:
            db.close()

    return command


def cmd_list(index: RegionalIndex, actor: Actor, args: argparse.Namespace) -> int:
    found = index.identities(None, ins=args.ins or "", limit=args.limit)
    _print(args, found, lambda v: "\n".join(_identity_text(f) for f in v) or "no identity")
    return 0


def cmd_show(index: RegionalIndex, actor: Actor, args: argparse.Namespace) -> int:
    found = index.show(args.regional_id, None)
    if found is None:
        return _fail(f"no regional identity {args.regional_id!r} (see 'imag identity list')")
    _print(args, found, _identity_text)
    return 0


def cmd_queue(index: RegionalIndex, actor: Actor, args: argparse.Namespace) -> int:
    items = index.queue(None if args.state == "all" else args.state, args.limit)
    _print(args, items, lambda v: "\n".join(_item_text(i) for i in v) or "the queue is empty")
    return 0


def cmd_merges(index: RegionalIndex, actor: Actor, args: argparse.Namespace) -> int:
    merges = index.merges()
    _print(
        args,
        merges,
        lambda v: (
            "\n".join(
                f"merge {m['id']}: {m['merged']} into {m['survivor']} by {m['merged_by']}"
                + (f" (undone by {m['undone_by']})" if m["undone_by"] else "")
                for m in v
            )
            or "no merge"
        ),
    )
    return 0


def _merge_text(m: dict[str, Any]) -> str:
    return (
        f"merge {m['id']}: {m['merged']} into {m['survivor']} ({m['links']} local identities); "
        f"'imag identity unmerge {m['id']}' undoes it"
    )


def cmd_accept(index: RegionalIndex, actor: Actor, args: argparse.Namespace) -> int:
    _print(args, index.accept(args.item, actor, args.note or ""), _merge_text)
    return 0


def cmd_reject(index: RegionalIndex, actor: Actor, args: argparse.Namespace) -> int:
    _print(args, index.reject(args.item, actor, args.note or ""), _item_text)
    return 0


def cmd_resolve(index: RegionalIndex, actor: Actor, args: argparse.Namespace) -> int:
    _print(args, index.resolve(args.item, actor, args.action, args.note or ""), _item_text)
    return 0


def cmd_merge(index: RegionalIndex, actor: Actor, args: argparse.Namespace) -> int:
    _print(args, index.merge(args.survivor, args.merged, actor, args.note or ""), _merge_text)
    return 0


def cmd_unmerge(index: RegionalIndex, actor: Actor, args: argparse.Namespace) -> int:
    done = index.unmerge(args.merge, actor, args.note or "")
    _print(
        args,
        done,
        lambda m: (
            f"merge {m['id']} undone: {m['merged']} and {m['survivor']} are apart again "
            f"({m['links']} local identities moved back)"
        ),
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``imag identity`` and its sub-commands."""
    top = sub.add_parser(
        "identity", help="the regional patient index: identities, vigilance queue, merges"
    )
    commands = top.add_subparsers(dest="identity_command", required=True)

    def command(name: str, fn: Callable, help_text: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--as", dest="actor", help="the name audited (default: the system user)")
        p.set_defaults(func=_run(fn))
        return p

    p = command("list", cmd_list, "regional identities, newest first")
    p.add_argument("--ins", help="only those carrying this INS")
    p.add_argument("--limit", type=int, default=100)
    p = command("show", cmd_show, "one regional identity, its local identities and studies")
    p.add_argument("regional_id")
    p = command("queue", cmd_queue, "the identity-vigilance queue: proposals and conflicts")
    p.add_argument(
        "--state", default="open", choices=["open", "accepted", "rejected", "resolved", "all"]
    )
    p.add_argument("--limit", type=int, default=100)
    command("merges", cmd_merges, "every merge, and whether it was undone")
    p = command("accept", cmd_accept, "accept a link proposal: merge its two identities")
    p.add_argument("item", type=int)
    p.add_argument("--note")
    p = command("reject", cmd_reject, "reject a link proposal: the identities stay apart")
    p.add_argument("item", type=int)
    p.add_argument("--note")
    p = command("resolve", cmd_resolve, "resolve a conflict by merging or dismissing it")
    p.add_argument("item", type=int)
    p.add_argument("action", choices=["merge", "dismiss"])
    p.add_argument("--note", help="why (required to dismiss)")
    p = command("merge", cmd_merge, "merge regional identity MERGED into SURVIVOR")
    p.add_argument("survivor")
    p.add_argument("merged")
    p.add_argument("--note")
    p = command("unmerge", cmd_unmerge, "undo a merge exactly (see 'imag identity merges')")
    p.add_argument("merge", type=int)
    p.add_argument("--note")
