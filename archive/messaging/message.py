"""Messages: what is sent, how it is recorded, and the job that delivers it.

A message is validated and built into its final RFC 5322 bytes once, when it
is queued (:func:`send`), then recorded in the ``messages`` table together
with one ``message.deliver`` job and an audit entry, in one transaction: a
message that is accepted exists with its job or not at all.

Delivery (:func:`deliver`, the job's handler) runs at least once, like every
job.  It is made as idempotent as mail allows: the row's state is checked
before sending (a message already ``sent`` is not sent again), the bytes and
their Message-ID are the ones fixed at enqueue (a receiver, or the outbox's
file name, recognises a repeat), and recipients a server already accepted
are not sent to again.  Only the short window between a server's "250 OK"
and the row's update can repeat a delivery, with the same Message-ID.

Failures are classed by the transport: :class:`TemporaryFailure` (connection
refused, 4xx, time-outs) is retried with the job queue's back-off up to
``messaging.max_attempts``; :class:`PermanentFailure` (5xx) ends the message
at once.  A message that ends so is ``failed`` (its job ``dead``), with one
audit entry; :func:`retry` queues it again.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Protocol, runtime_checkable

from archive.index.db import Database
from archive.jobs import JobQueue, PermanentJobError, current_job
from archive.security.audit import AuditEntry

#: the job kind that delivers one message
KIND = "message.deliver"
#: queued: waiting for (another) delivery attempt; sent: accepted by the
#: transport for every recipient; failed: given up (the dead letter)
STATES = ("queued", "sent", "failed")
#: the system actor of audit entries written by the delivery job
SYSTEM_ACTOR = "imag-messaging"

# -- what a caller sends ---------------------------------------------------------------------


@dataclass
class Attachment:
    """One attached file: its name as the recipient sees it, its MIME type,
    its bytes."""

    filename: str
    content_type: str
    data: bytes


@dataclass
class Message:
    """A message to send: to one or more addresses, a plain-text body (and an
    optional HTML alternative), attachments (an IHE XDM package is one, see
    :mod:`archive.messaging.xdm`).

    ``sender`` defaults to the setting ``messaging.from``; ``headers`` adds
    extension headers (``X-...``, ``Disposition-Notification-To``);
    ``purpose`` is a label for the API and the audit trail (``report``,
    ``share-link``...); ``study_uid`` ties the message to a study in the
    audit trail."""

    to: list[str]
    subject: str
    text: str
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    sender: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    purpose: str = ""
    study_uid: str | None = None


# -- transports --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """What a transport delivers: the envelope and the final message bytes."""

    message_id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes


class DeliveryFailure(Exception):
    """A delivery did not reach every recipient.  ``accepted``: recipients the
    server did accept before refusing others (not sent to again)."""

    permanent = False

    def __init__(self, reason: str, accepted: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.accepted = tuple(accepted)


class TemporaryFailure(DeliveryFailure):
    """Retrying later may work: connection refused or reset, time-out, TLS
    handshake refused, a 4xx answer."""


class PermanentFailure(DeliveryFailure):
    """Retrying cannot help (a 5xx answer: recipient refused, message
    rejected): the message fails at once."""

    permanent = True


@runtime_checkable
class Transport(Protocol):
    """How a queued message leaves the archive (hook ``imag_messaging_provider``).

    ``send`` delivers ``outgoing.data`` to every address of
    ``outgoing.recipients`` or raises :class:`TemporaryFailure` /
    :class:`PermanentFailure`; any other exception counts as temporary.  It
    may be called again for the same message (jobs run at least once): use
    ``outgoing.message_id`` to make a repeat harmless where the medium allows.
    """

    name: str

    def send(self, outgoing: Outgoing) -> None: ...


# -- validation --------------------------------------------------------------------------------


class InvalidMessage(ValueError):
    """The message cannot be sent as given (HTTP 400): nothing was queued."""


class MessageTooLarge(InvalidMessage):
    """The message is larger than ``messaging.max_message_bytes`` (HTTP 413)."""


class MessageStateError(Exception):
    """The message is not in a state that allows this (retrying a sent one)."""


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*$")
_HEADER_NAME = re.compile(r"^(X-[A-Za-z0-9-]{1,70}|Disposition-Notification-To|Reply-To)$")
_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_address(address: str) -> str:
    """``address`` if it is a plain ``local@domain`` mailbox (no display name,
    no comments, no line breaks: nothing that could inject a header)."""
    if not isinstance(address, str) or len(address) > 254 or not _ADDRESS.match(address):
        raise InvalidMessage(f"{address!r} is not an e-mail address (local@domain)")
    return address


def _check_text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidMessage(f"{what} must be text")
    if _CONTROL.search(value):
        raise InvalidMessage(f"{what} must not contain line breaks or control characters")
    if len(value) > limit:
        raise InvalidMessage(f"{what} is longer than {limit} characters")
    return value


def check_attachment(attachment: Attachment) -> None:
    name = _check_text(attachment.filename, "an attachment's file name", 255)
    if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidMessage(f"attachment file name {name!r}: a plain file name, without folders")
    if not _CONTENT_TYPE.match(attachment.content_type or ""):
        raise InvalidMessage(
            f"attachment {name!r}: content type {attachment.content_type!r} is not type/subtype"
        )
    if not isinstance(attachment.data, bytes | bytearray):
        raise InvalidMessage(f"attachment {name!r}: data must be bytes")


def validate(message: Message, *, max_recipients: int, max_bytes: int) -> None:
    """Refuse what cannot be sent, before anything is recorded."""
    if not message.to:
        raise InvalidMessage("a message needs at least one recipient")
    if len(message.to) > max_recipients:
        raise InvalidMessage(
            f"{len(message.to)} recipients: at most {max_recipients} (messaging.max_recipients)"
        )
    for address in message.to:
        check_address(address)
    if len(set(a.lower() for a in message.to)) != len(message.to):
        raise InvalidMessage("a recipient is listed twice")
    if message.sender is not None:
        check_address(message.sender)
    _check_text(message.subject, "the subject", 900)
    if not isinstance(message.text, str) or (
        message.html is not None and not isinstance(message.html, str)
    ):
        raise InvalidMessage("the body must be text")
    _check_text(message.purpose, "the purpose", 64)
    if message.study_uid is not None:
        _check_text(message.study_uid, "the study UID", 64)
    for name, value in message.headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise InvalidMessage(
                f"header {name!r}: only X-... headers, Reply-To and "
                "Disposition-Notification-To may be added"
            )
        _check_text(value, f"header {name}", 900)
    for attachment in message.attachments:
        check_attachment(attachment)
    size = len(message.text.encode()) + len((message.html or "").encode())
    size += sum(len(a.data) for a in message.attachments)
    if size > max_bytes:
        raise MessageTooLarge(
            f"the message is {size} bytes (body and attachments): at most {max_bytes} "
            "(messaging.max_message_bytes)"
        )


# -- building ----------------------------------------------------------------------------------


def new_message_id(sender: str) -> str:
    """A globally unique Message-ID in the sender's domain."""
    return f"<{uuid.uuid4().hex}@{sender.rpartition('@')[2]}>"


def build(message: Message, *, sender: str, message_id: str, date: datetime) -> bytes:
    """The RFC 5322 bytes of ``message`` (CRLF line ends, as sent by SMTP):
    text (and HTML alternative) then the attachments, base64-encoded."""
    mail = EmailMessage(policy=policy.SMTP)
    mail["Message-ID"] = message_id
    mail["Date"] = format_datetime(date)
    mail["From"] = sender
    mail["To"] = ", ".join(message.to)
    mail["Subject"] = message.subject
    for name, value in message.headers.items():
        mail[name] = value
    mail.set_content(message.text)
    if message.html is not None:
        mail.add_alternative(message.html, subtype="html")
    for attachment in message.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        mail.add_attachment(
            bytes(attachment.data), maintype=maintype, subtype=subtype, filename=attachment.filename
        )
    return mail.as_bytes()


# -- rows -------------------------------------------------------------------------------------


@dataclass
class MessageRecord:
    """One row of ``messages`` as the API shows it (never the body)."""

    id: int
    message_id: str
    state: str
    sender: str
    recipients: list[str]
    delivered_to: list[str]
    subject: str
    purpose: str
    study_uid: str | None
    site: str
    created_by: str
    attachments: list[dict]
    size: int
    attempts: int
    last_error: str | None
    transport: str | None
    created_at: str
    updated_at: str
    sent_at: str | None
    job_id: int | None
    #: the delivery job's state and next attempt, while it has one
    job_state: str | None = None
    next_attempt_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


_COLUMNS = (
    "m.id, m.message_id, m.state, m.sender, m.recipients, m.delivered_to, m.subject, m.purpose, "
    "m.study_uid, m.site, m.created_by, m.attachments, m.size, m.attempts, m.last_error, "
    "m.transport, m.created_at, m.updated_at, m.sent_at, m.job_id, j.state, j.due_at"
)
_FROM = "messages m LEFT JOIN jobs j ON j.id = m.job_id"


def _time(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _record(row: tuple) -> MessageRecord:
    r = list(row)
    job_state, due = r[20], r[21]
    return MessageRecord(
        id=int(r[0]),
        message_id=r[1],
        state=r[2],
        sender=r[3],
        recipients=json.loads(r[4]),
        delivered_to=json.loads(r[5]),
        subject=r[6],
        purpose=r[7],
        study_uid=r[8],
        site=r[9],
        created_by=r[10],
        attachments=json.loads(r[11]),
        size=int(r[12]),
        attempts=int(r[13]),
        last_error=r[14],
        transport=r[15],
        created_at=_time(r[16]) or "",
        updated_at=_time(r[17]) or "",
        sent_at=_time(r[18]),
        job_id=r[19],
        job_state=job_state,
        next_attempt_at=_time(due) if job_state == "pending" else None,
    )


@dataclass(frozen=True)
class Visibility:
    """Whose messages a caller may see: ``sites`` None is everyone's (admins);
    otherwise the messages of those sites and the caller's own."""

    sites: frozenset[str] | None = None
    actor: str | None = None

    def clause(self) -> tuple[str, list[Any]]:
        if self.sites is None:
            return "1 = 1", []
        parts, params = [], []
        if self.sites:
            parts.append(f"m.site IN ({', '.join('?' * len(self.sites))})")
            params.extend(sorted(self.sites))
        if self.actor:
            parts.append("m.created_by = ?")
            params.append(self.actor)
        return ("(" + " OR ".join(parts) + ")", params) if parts else ("1 = 0", [])


EVERYONE = Visibility()


def get(db: Database, message: int, visible: Visibility = EVERYONE) -> MessageRecord | None:
    """The message with this id, if the caller may see it."""
    where, params = visible.clause()
    row = db.query_one(
        f"SELECT {_COLUMNS} FROM {_FROM} WHERE m.id = ? AND {where}",
        [
            message,
            *params,
        ],
    )
    return None if row is None else _record(row)


def exists(db: Database, message: int) -> bool:
    return db.scalar("SELECT 1 FROM messages WHERE id = ?", (message,)) is not None


def listing(
    db: Database,
    *,
    state: str | None = None,
    visible: Visibility = EVERYONE,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[MessageRecord], int]:
    """Messages newest first (one page) and how many match in all."""
    where, params = visible.clause()
    if state is not None:
        if state not in STATES:
            raise InvalidMessage(f"state {state!r}: one of {', '.join(STATES)}")
        where += " AND m.state = ?"
        params.append(state)
    total = int(db.scalar(f"SELECT COUNT(*) FROM messages m WHERE {where}", params) or 0)
    rows = db.query(
        f"SELECT {_COLUMNS} FROM {_FROM} WHERE {where} ORDER BY m.id DESC LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )
    return [_record(r) for r in rows], total


# -- queueing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """Who sends: the audit trail's actor, and the site the message belongs
    to (empty: regional, seen by admins only)."""

    name: str
    kind: str = "user"
    role: str | None = None
    site: str = ""
    source: str | None = None


def send(archive: Any, message: Message, *, by: Actor | str) -> int:
    """Queue ``message`` for delivery; return its id (``/api/messages/{id}``).

    ``archive`` is the running :class:`~archive.runtime.Archive` (its index,
    audit trail and the ``messaging.*`` settings).  The message is validated
    (:class:`InvalidMessage`, :class:`MessageTooLarge`), built into its final
    bytes, then its row, its delivery job and an audit entry are written in
    one transaction: it is never lost, and never queued twice by the queue's
    own doing.  Call it inside your own ``archive.db.transaction()`` to tie
    the message to your own rows (a report marked delivered)."""
    actor = Actor(by) if isinstance(by, str) else by
    config = archive.config
    validate(
        message,
        max_recipients=config["messaging.max_recipients"],
        max_bytes=config["messaging.max_message_bytes"],
    )
    db: Database = archive.db
    sender = message.sender or config["messaging.from"]
    check_address(sender)
    now = db.clock.now()
    message_id = new_message_id(sender)
    body = build(message, sender=sender, message_id=message_id, date=now)
    summary = [
        {"filename": a.filename, "content_type": a.content_type, "size": len(a.data)}
        for a in message.attachments
    ]
    with _transaction(db):
        row = db.query_one(
            "INSERT INTO messages (message_id, state, sender, recipients, subject, purpose, "
            "study_uid, site, created_by, attachments, size, body, created_at, updated_at) "
            "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                message_id,
                sender,
                json.dumps(message.to),
                message.subject,
                message.purpose,
                message.study_uid,
                actor.site,
                actor.name,
                json.dumps(summary),
                len(body),
                body,
                now,
                now,
            ),
        )
        assert row is not None
        message_ref = int(row[0])
        _enqueue(archive, message_ref)
        archive.audit.write(
            AuditEntry(
                actor.name,
                actor.kind,
                "message.queue",
                "allowed",
                role=actor.role,
                study_uid=message.study_uid,
                source=actor.source,
                detail={
                    "message": message_ref,
                    "message_id": message_id,
                    "to": message.to,
                    "purpose": message.purpose,
                    "attachments": [a["filename"] for a in summary],
                },
            )
        )
    return message_ref


@contextmanager
def _transaction(db: Database) -> Iterator[Database]:
    """A new transaction, or the caller's own when this thread is inside one
    (transactions do not nest): the message then commits with the caller's rows."""
    if db.in_transaction():
        yield db
        return
    with db.transaction():
        yield db


def _enqueue(archive: Any, message_ref: int) -> int:
    job = JobQueue(archive.db).enqueue(
        KIND,
        {"message": message_ref},
        dedupe_key=f"message:{message_ref}",
        max_attempts=archive.config["messaging.max_attempts"],
    )
    archive.db.execute("UPDATE messages SET job_id = ? WHERE id = ?", (job, message_ref))
    return job


def retry(archive: Any, message: int, *, by: Actor | str) -> None:
    """Queue a ``failed`` message again (a fresh delivery job, attempts from
    zero), audited.  :class:`MessageStateError` for any other state."""
    actor = Actor(by) if isinstance(by, str) else by
    db: Database = archive.db
    now = db.clock.now()
    with db.transaction():
        row = db.query_one(
            "UPDATE messages SET state = 'queued', attempts = 0, updated_at = ? "
            "WHERE id = ? AND state = 'failed' RETURNING study_uid, message_id",
            (now, message),
        )
        if row is None:
            state = db.scalar("SELECT state FROM messages WHERE id = ?", (message,))
            raise MessageStateError(
                f"message {message} does not exist"
                if state is None
                else f"message {message} is {state}: only failed messages are retried"
            )
        _enqueue(archive, message)
        archive.audit.write(
            AuditEntry(
                actor.name,
                actor.kind,
                "message.requeue",
                "allowed",
                role=actor.role,
                study_uid=row[0],
                source=actor.source,
                detail={"message": message, "message_id": row[1]},
            )
        )


# -- delivery (the job) ---------------------------------------------------------------------


def deliver(archive: Any, payload: dict) -> None:
    """The ``message.deliver`` job: send the message through the configured
    transport (``plugins.messaging``), once per recipient as far as the
    medium allows (see the module's docstring)."""
    db: Database = archive.db
    message = int(payload["message"])
    row = db.query_one(
        "SELECT state, sender, recipients, delivered_to, message_id, body, study_uid "
        "FROM messages WHERE id = ?",
        (message,),
    )
    if row is None:
        raise PermanentJobError(f"message {message} no longer exists")
    state, sender, recipients, delivered, message_id, body, study_uid = row
    if state != "queued":
        return  # sent by an earlier run of this job, or given up: nothing to do
    delivered = json.loads(delivered)
    remaining = tuple(r for r in json.loads(recipients) if r not in delivered)
    name = archive.config["plugins.messaging"]
    if remaining:
        try:
            # inside the try: a transport that cannot be built (settings that
            # do not work together) fails the attempt, recorded on the message
            transport = archive.messaging
            name = getattr(transport, "name", name)
            transport.send(Outgoing(message_id, sender, remaining, bytes(body)))
        except Exception as exc:  # noqa: BLE001 - classed below; the queue keeps the error
            failure = _failed(archive, message, name, exc, delivered, study_uid, message_id)
            if failure is exc:
                raise  # retried by the queue after its back-off
            raise failure from exc
    now = db.clock.now()
    with db.transaction():
        done = db.query_one(
            "UPDATE messages SET state = 'sent', delivered_to = ?, attempts = attempts + 1, "
            "transport = ?, last_error = NULL, sent_at = ?, updated_at = ? "
            "WHERE id = ? AND state = 'queued' RETURNING id",
            (json.dumps([*delivered, *remaining]), name, now, now, message),
        )
        if done is not None:
            archive.audit.write(
                AuditEntry(
                    SYSTEM_ACTOR,
                    "service",
                    "message.sent",
                    "allowed",
                    study_uid=study_uid,
                    detail={
                        "message": message,
                        "message_id": message_id,
                        "to": list(remaining),
                        "transport": name,
                    },
                )
            )


def _failed(
    archive: Any,
    message: int,
    transport: str,
    exc: Exception,
    delivered: list[str],
    study_uid: str | None,
    message_id: str,
) -> Exception:
    """Record a failed attempt, and end the message when it was permanent or
    the last allowed one; return what the job queue is to see raised
    (:class:`PermanentJobError` makes the job dead at once)."""
    db: Database = archive.db
    job = current_job()
    permanent = isinstance(exc, DeliveryFailure) and exc.permanent
    last = job is None or job.attempts >= job.max_attempts
    final = permanent or last
    accepted = [a for a in getattr(exc, "accepted", ()) if a not in delivered]
    reason = f"{type(exc).__name__}: {exc}"[:2000]
    now = db.clock.now()
    with db.transaction():
        changed = db.query_one(
            "UPDATE messages SET state = ?, delivered_to = ?, attempts = attempts + 1, "
            "last_error = ?, transport = ?, updated_at = ? "
            "WHERE id = ? AND state = 'queued' RETURNING attempts",
            (
                "failed" if final else "queued",
                json.dumps([*delivered, *accepted]),
                reason,
                transport,
                now,
                message,
            ),
        )
        if final and changed is not None:
            archive.audit.write(
                AuditEntry(
                    SYSTEM_ACTOR,
                    "service",
                    "message.failed",
                    "failed",
                    study_uid=study_uid,
                    detail={
                        "message": message,
                        "message_id": message_id,
                        "attempts": int(changed[0]),
                        "permanent": permanent,
                        "error": reason,
                        "transport": transport,
                    },
                )
            )
    return PermanentJobError(reason) if final else exc
