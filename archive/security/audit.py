"""The audit trail: one append-only row per access to patient data and per
security event, written before the answer leaves, optionally forwarded to
syslog (RFC 5424).

The table refuses UPDATE and DELETE (triggers, migrations 0006/0007), so an
entry once written stays as written.  When an entry cannot be written, the
access it records is refused (fail closed): :meth:`AuditLog.write` raises
:class:`AuditUnavailable`, which every service turns into a refusal (HTTP 503,
DICOM 0xA700-class) before any patient data leaves.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from prometheus_client import Counter

from archive.index.db import CountedWrite, Database, utcnow

log = logging.getLogger(__name__)

R = TypeVar("R")

OUTCOMES = ("allowed", "denied", "failed")

AUDIT_WRITE_FAILURES = Counter(
    "imag_audit_write_failures_total",
    "Audit entries that could not be written (the access they record was refused)",
    ["action"],
)

#: what a refused client is told
UNAVAILABLE_DETAIL = (
    "the audit trail cannot be written, so no patient data is served; "
    "the error is in the server log"
)


class AuditUnavailable(Exception):
    """The audit trail cannot be written: the access must be refused."""


@dataclass
class AuditEntry:
    """Who (actor, kind, role) did what (action) to which study and patient,
    from where (address or AE), with what outcome."""

    actor: str
    actor_kind: str
    action: str
    outcome: str  # allowed | denied | failed
    role: str | None = None
    status: int | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    source: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    at: str | None = None
    id: int | None = None
    #: the node that wrote it (``node.name``), when several share one index
    node: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = (
    "id, at, actor, actor_kind, role, action, outcome, status, study_uid, patient_id, "
    "source, detail, node"
)


_INSERT = (
    "INSERT INTO audit (at, actor, actor_kind, role, action, outcome, status, "
    "study_uid, patient_id, source, detail, node) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, {patient}, ?, {detail}, ?)"
)
#: the plain entry
_PLAIN_INSERT = _INSERT.format(patient="?", detail="?")
#: an entry a search carries: the detail's JSON around the count, joined to
#: it; the count at most a page when one is given (``least`` ignores a NULL)
_COUNTED_DETAIL = "? || least((SELECT count(*) FROM found), ?)::text || ?"
_COUNTED_INSERT = _INSERT.format(patient="?", detail=_COUNTED_DETAIL)
_PATIENT_OF_STUDY = (
    "(SELECT p.patient_id FROM studies st JOIN patients p ON p.id = st.patient_ref "
    "WHERE st.study_uid = ?)"
)
#: an entry a search carries, naming a study without its patient: the INSERT reads it
_COUNTED_PATIENT_INSERT = _INSERT.format(patient=_PATIENT_OF_STUDY, detail=_COUNTED_DETAIL)

#: an entry naming a study without its patient: the INSERT reads it
_PATIENT_INSERT = _INSERT.format(patient=_PATIENT_OF_STUDY, detail="?") + " RETURNING patient_id"


class AuditLog:
    """Writes and reads the ``audit`` table; forwards entries to syslog if asked."""

    def __init__(
        self, db: Database, syslog_url: str = "", app_name: str = "imag", node: str | None = None
    ) -> None:
        self.db = db
        #: this node's name, written on every entry it appends
        self.node = node
        self._syslog = _SyslogSender(syslog_url, app_name) if syslog_url else None

    def write(self, entry: AuditEntry) -> None:
        """Append ``entry`` (durably: the caller answers only afterwards).  The
        patient is looked up from the study when the caller did not name it.

        Raises :class:`AuditUnavailable` when the entry cannot be written
        (table unwritable, index down): logged as an error and counted in
        ``imag_audit_write_failures_total``; the caller refuses the access.

        In a pipelined transaction (the index writer's), the statements sent
        before are waited for first, so that their failure is not taken for
        the audit trail's, and the entry itself before returning."""
        self.db.settle()
        try:
            self._insert(entry)
            self.db.settle()
        except Exception as exc:
            AUDIT_WRITE_FAILURES.labels(entry.action).inc()
            log.error(
                "audit entry could not be written; the access is refused",
                extra={
                    "action": entry.action,
                    "actor": entry.actor,
                    "outcome": entry.outcome,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
            raise AuditUnavailable(str(exc)) from exc
        self.forward(entry)

    def counted(self, entry: AuditEntry, key: str, most: int | None = None) -> CountedWrite:
        """``entry`` as a write a search carries (:func:`archive.query.search`
        on PostgreSQL), its ``detail[key]`` the number of rows the search
        finds (at ``most``, when given): the search and its entry cost one
        round trip and one commit.
        The row is byte for byte what :meth:`write` appends for the same
        count.  When the statement succeeds, set ``detail[key]`` and call
        :meth:`forward`; when it fails, nothing was written: the caller
        writes the entry with :meth:`write`, which reports an unwritable
        trail.  An entry naming a study without its patient gets the
        study's patient read by the INSERT, as :meth:`write` does."""
        values = self._values(entry)
        marker = -7_160_917  # where the count goes, in the detail's JSON
        detail = json.dumps({**entry.detail, key: marker}, sort_keys=True)
        before, after = detail.split(f": {marker}", 1)
        values[10:11] = [before + ": ", most, after]
        if entry.study_uid and not entry.patient_id:
            values[8] = entry.study_uid
            return CountedWrite(_COUNTED_PATIENT_INSERT, tuple(values))
        return CountedWrite(_COUNTED_INSERT, tuple(values))

    def carried(
        self,
        search: Callable[[CountedWrite | None], list[R]],
        entry: AuditEntry,
        key: str,
        most: int | None = None,
    ) -> list[R] | None:
        """The rows of ``search`` (given the write it is to carry: see
        :meth:`counted`), ``entry`` written by the search's own statement,
        with ``detail[key]`` its count, and forwarded.  None when the
        statement failed without writing it: the caller then searches and
        writes the entry in two steps, which tells a failed search from an
        unwritable trail (and counts the trail's failure once).

        A statement may also commit and then fail (the connection lost
        before its rows came back): the entry is then looked up, and when it
        is in the trail the search alone runs again (``search(None)``), so
        that the request is audited once, not once more by the two-step path."""
        counted = self.counted(entry, key, most)
        try:
            rows = search(counted)
        except Exception:  # noqa: BLE001 - the two-step path reports what failed
            log.debug("a search with its audit entry in one statement failed", exc_info=True)
            written = self._written(entry, key, counted.params[0])  # _INSERT: at first
            if written is None:
                return None
            rows = search(None)
            entry.detail[key] = written
        else:
            entry.detail[key] = len(rows) if most is None else min(len(rows), most)
        if self._syslog is not None and entry.study_uid and not entry.patient_id:
            # the copy forwarded names the patient the INSERT read (a read
            # only when forwarding: the statement returns the search's rows)
            entry.patient_id = self.db.scalar(f"SELECT {_PATIENT_OF_STUDY}", (entry.study_uid,))
        self.forward(entry)
        return rows

    def _written(self, entry: AuditEntry, key: str, at: datetime) -> int | None:
        """``detail[key]`` of ``entry`` as a statement that failed may have
        written it (its time ``at``, actor, action and node are its own), or None
        when it is not in the trail or the trail cannot be read (then the
        caller writes it: a possible second entry rather than none)."""
        try:
            detail = self.db.scalar(
                "SELECT detail FROM audit WHERE actor = ? AND at = ? AND action = ? "
                "AND COALESCE(node, '') = ?",
                (entry.actor, at, entry.action, entry.node or ""),
            )
        except Exception as exc:  # noqa: BLE001 - unknown: the two-step path writes it
            log.warning(
                "could not check whether a failed search wrote its audit entry",
                extra={"action": entry.action, "error": f"{type(exc).__name__}: {exc}"},
            )
            return None
        if detail is None:
            return None
        log.info(
            "a search's statement wrote its audit entry and then failed; searched again",
            extra={"action": entry.action, "actor": entry.actor},
        )
        return json.loads(detail)[key]

    def forward(self, entry: AuditEntry) -> None:
        """Send an entry written to syslog, when forwarding is configured."""
        if self._syslog is not None:
            self._syslog.send(entry)

    def _values(self, entry: AuditEntry) -> list[Any]:
        """Stamp ``entry`` (its time, this node) and give its row's values, in
        the order of ``_INSERT``'s columns."""
        at = utcnow()
        entry.at = at.isoformat()
        entry.node = entry.node or self.node
        return [
            at,
            entry.actor,
            entry.actor_kind,
            entry.role,
            entry.action,
            entry.outcome,
            entry.status,
            entry.study_uid,
            entry.patient_id,
            entry.source,
            json.dumps(entry.detail, sort_keys=True) if entry.detail else None,
            entry.node,
        ]

    def _insert(self, entry: AuditEntry) -> None:
        values = self._values(entry)
        if not (entry.study_uid and not entry.patient_id):
            self.db.execute(_PLAIN_INSERT, values)
            return
        # the study's patient, looked up by the INSERT itself: one round trip
        # to the index instead of two (this is on every UID look-up's path)
        values[8] = entry.study_uid
        [(entry.patient_id,)] = self.db.query(_PATIENT_INSERT, values)

    def query(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        actor: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        study_uid: str | None = None,
        patient_id: str | None = None,
        after_id: int = 0,
        limit: int | None = 1000,
    ) -> list[AuditEntry]:
        """Entries matching every given filter, oldest first."""
        clauses, params = ["id > ?"], [after_id]
        for column, value in (
            ("actor", actor),
            ("action", action),
            ("outcome", outcome),
            ("study_uid", study_uid),
            ("patient_id", patient_id),
        ):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("at >= ?")
            params.append(since)
        if until is not None:
            clauses.append("at < ?")
            params.append(until)
        sql = f"SELECT {_COLUMNS} FROM audit WHERE {' AND '.join(clauses)} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_entry(row) for row in self.db.query(sql, params)]

    def iterate(self, batch: int = 5000, **filters: Any) -> Iterator[AuditEntry]:
        """Every matching entry, read in batches (for exports of any size)."""
        after = 0
        while True:
            rows = self.query(after_id=after, limit=batch, **filters)
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1].id or after


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or date-time (UTC when no offset is given)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date or date-time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _entry(row: tuple) -> AuditEntry:
    at = row[1]
    if isinstance(at, datetime):
        at = at.astimezone(UTC).isoformat()
    return AuditEntry(
        id=int(row[0]),
        at=str(at),
        actor=row[2],
        actor_kind=row[3],
        role=row[4],
        action=row[5],
        outcome=row[6],
        status=row[7],
        study_uid=row[8],
        patient_id=row[9],
        source=row[10],
        detail=json.loads(row[11]) if row[11] else {},
        node=row[12],
    )


# -- syslog forwarding (RFC 5424) ---------------------------------------------------

_FACILITY_AUTHPRIV = 10
_SEVERITY = {"allowed": 6, "failed": 4, "denied": 4}  # informational / warning


def rfc5424(entry: AuditEntry, app_name: str = "imag", hostname: str | None = None) -> bytes:
    """One RFC 5424 syslog message for ``entry``: the fields as structured data
    (SD-ID ``imag@32473``, the documentation enterprise number) and the whole
    entry as JSON in MSG."""
    pri = _FACILITY_AUTHPRIV * 8 + _SEVERITY.get(entry.outcome, 5)
    host = (hostname or socket.gethostname() or "-")[:255]
    params = {
        "actor": entry.actor,
        "kind": entry.actor_kind,
        "role": entry.role or "",
        "action": entry.action,
        "outcome": entry.outcome,
        "study": entry.study_uid or "",
        "patient": entry.patient_id or "",
        "source": entry.source or "",
    }
    sd = "[imag@32473" + "".join(f' {k}="{_sd_escape(v)}"' for k, v in params.items() if v) + "]"
    msg = json.dumps(entry.as_dict(), sort_keys=True, default=str)
    header = f"<{pri}>1 {entry.at or utcnow().isoformat()} {host} {app_name} {os.getpid()} audit"
    return f"{header} {sd} \ufeff{msg}".encode()


def _sd_escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


class _SyslogSender:
    """Send to ``udp://host:port`` (one datagram per entry) or ``tcp://host:port``
    (RFC 6587 octet counting).  A syslog outage never blocks or fails a request:
    the entry is in the table already; the failure is logged."""

    def __init__(self, url: str, app_name: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp") or not parts.hostname:
            raise ValueError(f"audit.syslog {url!r}: expected udp://host:port or tcp://host:port")
        self.scheme = parts.scheme
        self.address = (parts.hostname, parts.port or 514)
        self.app_name = app_name
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, entry: AuditEntry) -> None:
        message = rfc5424(entry, self.app_name, entry.node)
        with self._lock:
            self._send(message)

    def _send(self, message: bytes) -> None:
        try:
            if self.scheme == "udp":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.sendto(message, self.address)
                return
            if self._sock is None:
                self._sock = socket.create_connection(self.address, timeout=2)
            self._sock.sendall(f"{len(message)} ".encode() + message)
        except OSError as exc:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            log.warning("audit entry not forwarded to syslog", extra={"error": str(exc)})
