"""The default messaging transports, registered through the platform's hooks.

Providers ``outbox`` (default) and ``smtp`` for ``plugins.messaging``; the
``messaging.*`` settings; the ``messages`` table (migration component
``messaging``); the ``message.deliver`` job kind; the ``/api/messages``
routes and their permissions; the ``imag messages`` command.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archive.config import Setting, as_choice, as_int, as_size, as_text
from archive.hookspecs import hookimpl
from archive.index.migrate import Migrations
from archive.messaging import message as messages
from archive.messaging.outbox import OutboxTransport
from archive.messaging.smtp import SECURITY, SmtpTransport

if TYPE_CHECKING:
    from aiohttp import web

    from archive.runtime import Archive

PERMISSIONS = {
    "messaging.read": "see sent, queued and failed messages (GET /api/messages)",
    "messaging.send": "send messages and retry failed ones (POST /api/messages)",
}


@hookimpl
def imag_settings() -> list[Setting]:
    return [
        Setting("messaging.from", "imag@localhost", as_text, "sender address of messages"),
        Setting(
            "messaging.outbox_dir",
            "",
            as_text,
            "folder of the outbox transport's .eml files (default: <data_dir>/outbox)",
        ),
        Setting(
            "messaging.max_attempts",
            8,
            as_int(1, 100),
            "delivery attempts (with the job queue's back-off) before a message fails",
        ),
        Setting(
            "messaging.max_message_bytes",
            20 * 2**20,
            as_size,
            "largest message (body and attachments, before encoding); larger: HTTP 413",
        ),
        Setting("messaging.max_recipients", 50, as_int(1, 1000), "recipients of one message"),
        Setting("messaging.smtp.host", "", as_text, "SMTP server (plugins.messaging = smtp)"),
        Setting("messaging.smtp.port", 587, as_int(1, 65535), "SMTP port (587 starttls, 465 tls)"),
        Setting(
            "messaging.smtp.security",
            "starttls",
            as_choice(*SECURITY),
            "starttls, tls (implicit) or none (loopback relays only)",
        ),
        Setting(
            "messaging.smtp.ca_file",
            "",
            as_text,
            "PEM CA bundle the server's certificate is checked against (default: system CAs)",
        ),
        Setting(
            "messaging.smtp.client_cert",
            "",
            as_text,
            "PEM client certificate presented to the server (MSSanté applications)",
        ),
        Setting("messaging.smtp.client_key", "", as_text, "PEM private key of client_cert"),
        Setting("messaging.smtp.username", "", as_text, "SMTP login (optional)"),
        Setting(
            "messaging.smtp.password_file",
            "",
            as_text,
            "file whose first line is the SMTP password (read at each delivery)",
        ),
        Setting("messaging.smtp.timeout", 30, as_int(1, 600), "SMTP time-out, seconds"),
        Setting(
            "messaging.xdm.source_oid",
            "",
            as_text,
            "the OID of this system in XDM packages (sourceId; default: derived from node.name)",
        ),
    ]


@hookimpl
def imag_messaging_provider(name: str, config: Any) -> Any:
    if name == "outbox":
        return OutboxTransport.from_config(config)
    if name == "smtp":
        return SmtpTransport.from_config(config)
    return None


@hookimpl
def imag_migrations() -> Migrations:
    return Migrations("messaging", resources.files("archive.messaging").joinpath("migrations"))


@hookimpl
def imag_job_kinds() -> dict:
    return {messages.KIND: messages.deliver}


@hookimpl
def imag_permissions() -> dict[str, str]:
    return dict(PERMISSIONS)


@hookimpl
def imag_role_grants() -> dict[str, list[str]]:
    # radiologists deliver reports; a site's administrator follows its site's mail
    return {
        "radiologist": ["messaging.read", "messaging.send"],
        "site_admin": ["messaging.read", "messaging.send"],
    }


@hookimpl
def imag_routes(app: web.Application, archive: Archive) -> None:
    from archive.messaging.http import setup

    setup(app)


# -- imag messages ---------------------------------------------------------------------------


def _open(args: argparse.Namespace) -> Archive:
    from archive.commandline import load
    from archive.runtime import Archive

    return Archive(load(args))


def _operator() -> messages.Actor:
    import getpass

    return messages.Actor(f"cli:{getpass.getuser()}", kind="operator", role="admin")


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as archive:
        found, total = messages.listing(archive.db, state=args.state, limit=args.limit)
        for record in found:
            print(
                f"{record.id}\t{record.state}\t{record.created_at}\t"
                f"{','.join(record.recipients)}\t{record.subject}"
            )
        print(f"{len(found)} of {total} message(s)", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as archive:
        record = messages.get(archive.db, args.id)
        if record is None:
            print(f"no message {args.id}", file=sys.stderr)
            return 1
        print(json.dumps(record.as_dict(), indent=2))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with _open(args) as archive:
        try:
            messages.retry(archive, args.id, by=_operator())
        except messages.MessageStateError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        print(f"message {args.id} queued again")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from archive.messaging import xdm

    attachments = []
    for name in args.attach or []:
        path = Path(name)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        attachments.append(messages.Attachment(path.name, kind, path.read_bytes()))
    with _open(args) as archive:
        if args.xdm:
            if not attachments:
                print("--xdm needs at least one --attach", file=sys.stderr)
                return 2
            patient = xdm.Patient(ins=args.ins, local_id=args.patient_id, local_issuer=args.issuer)
            documents = [
                xdm.Document(a.data, a.content_type, a.filename, original_name=a.filename)
                for a in attachments
            ]
            try:
                attachments = [
                    xdm.package(
                        xdm.Submission(
                            patient,
                            documents,
                            title=args.subject,
                            recipients=args.to,
                            source_id=archive.config["messaging.xdm.source_oid"],
                            sender=archive.config.node,
                        ),
                        now=archive.clock.now(),
                    ),
                    *attachments,
                ]
            except xdm.XdmError as exc:
                print(str(exc), file=sys.stderr)
                return 2
        message = messages.Message(
            to=args.to,
            subject=args.subject,
            text=Path(args.text_file).read_text() if args.text_file else (args.text or ""),
            attachments=attachments,
            purpose=args.purpose,
        )
        try:
            ref = messages.send(archive, message, by=_operator())
        except messages.InvalidMessage as exc:
            print(str(exc), file=sys.stderr)
            return 2
        print(ref)
    return 0


@hookimpl
def imag_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("messages", help="messages: list, show, retry, send")
    sub = p.add_subparsers(dest="messages_command", required=True)
    ls = sub.add_parser("list", help="messages, newest first")
    ls.add_argument("--state", choices=messages.STATES)
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="one message (JSON, without its body)")
    show.add_argument("id", type=int)
    show.set_defaults(func=cmd_show)
    again = sub.add_parser("retry", help="queue a failed message again")
    again.add_argument("id", type=int)
    again.set_defaults(func=cmd_retry)
    send = sub.add_parser("send", help="send a message (through the job queue)")
    send.add_argument("--to", action="append", required=True, help="recipient (repeatable)")
    send.add_argument("--subject", required=True)
    send.add_argument("--text", help="the message text")
    send.add_argument("--text-file", help="a file holding the message text")
    send.add_argument("--attach", action="append", metavar="FILE", help="attach a file")
    send.add_argument(
        "--xdm", action="store_true", help="also package the attached files as IHE_XDM.ZIP"
    )
    send.add_argument("--ins", help="XDM: the patient's INS matricule (NIR)")
    send.add_argument("--patient-id", help="XDM: the patient's local identifier")
    send.add_argument("--issuer", help="XDM: the local identifier's assigning authority")
    send.add_argument("--purpose", default="operator", help="a label (report, share-link...)")
    send.set_defaults(func=cmd_send)
