"""Reading requests: what a site asks to be read, who holds it, in which order.

A :class:`Worklist` is the one place the request rows change.  The REST API
(``/api/worklist``), UPS-RS (``/dicom-web/workitems``), the route subscriber
and the reports all go through it, so the UPS rules hold whatever the door:

* **Exactly one claim.**  A claim is one conditional ``UPDATE ... WHERE state
  = 'SCHEDULED'``: of fifty concurrent claims the database lets one through;
  the others find the request IN PROGRESS (C302).
* **Leases.**  A claim holds the request for ``worklist.lease_seconds`` of
  inactivity; every change the holder makes (a draft saved, a heartbeat)
  extends it.  A passed lease returns the request to SCHEDULED and forgets the
  Transaction UID, so whatever the late holder sends next is refused (C301);
  :meth:`Worklist.expire_leases` runs before every read and change, so what a
  caller sees is never a stale claim, and each expiry is audited.
* **Who sees what.**  A request belongs to its site (the requester) and to the
  reading group on call for that site when it was created (the orientation
  plugin).  A :class:`Viewer` is the caller's sites and groups; the visibility
  is a SQL condition, so counts and pages are right and nothing else is read.
  Only a member of the request's group (or an admin) may claim it.
* **Order.**  Priority (STAT, URGENT, ROUTINE), then due time, then arrival.

Time comes from the archive's clock, so tests move it instead of sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydicom.uid import generate_uid

from archive.index.db import Database
from archive.messaging.message import InvalidMessage, check_address
from archive.security.audit import AuditEntry, AuditLog
from archive.uids import is_valid_uid
from worklist import metrics
from worklist.ups import (
    CANCELED,
    COMPLETED,
    FINAL,
    IN_PROGRESS,
    PRIORITIES,
    RANK,
    SCHEDULED,
    UpsError,
    UpsWarning,
)

if TYPE_CHECKING:
    from archive.clock import Clock

#: the clinical content of a request (the national teleradiology
#: specification's exam request), field -> what it holds
FIELDS = {
    "requesting_physician": "the physician who asks for the reading (name, RPPS if known)",
    "clinical_context": "clinical context: symptoms, history, what led to the exam",
    "question": "the question asked of the radiologist (purpose of the exam)",
    "anatomical_region": "the anatomical region examined",
    "contraindications": "contraindications (contrast agent, pregnancy...); 'none' if none",
    "previous_results": "relevant previous results (optional)",
    "exam_type": "the exam performed or to perform (e.g. 'CT head without contrast')",
    "patient_consent": "true: the requester attests the patient's informed consent",
    "gp_address": "the patient's GP's secure mailbox (optional): the validated report's "
    "images are shared with them by a link",
}
#: the fields a request cannot be made without (previous_results may be absent)
MANDATORY = (
    "requesting_physician",
    "clinical_context",
    "question",
    "anatomical_region",
    "contraindications",
    "exam_type",
    "patient_consent",
)
MAX_FIELD = 8000  # characters of one text field
#: read: a route asked for it; expertise: a site user did; screening: the
#: second reading of a screening mammogram (worklist.screening, its own record)
KINDS = ("read", "expertise", "screening")


class RequestInvalid(ValueError):
    """A request that cannot be made as sent (HTTP 400): ``problems`` lists
    every field at fault, each with what is expected."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.problems.items()))


class NotAllowed(Exception):
    """The caller sees the request but may not do this to it (HTTP 403)."""


class Duplicate(Exception):
    """A request with the UID the caller chose exists already (HTTP 409): a
    UPS-RS client may name the workitem it creates."""


@dataclass(frozen=True)
class Timings:
    """How long a reading may take by priority (``worklist.due_*``) and how
    long a claim lasts without activity (``worklist.lease_seconds``)."""

    lease: timedelta = timedelta(minutes=15)
    due: Mapping[str, timedelta] = field(
        default_factory=lambda: {
            "STAT": timedelta(hours=1),
            "URGENT": timedelta(hours=12),
            "ROUTINE": timedelta(days=4),
        }
    )

    @classmethod
    def from_config(cls, config: Any) -> Timings:
        return cls(
            lease=timedelta(seconds=config["worklist.lease_seconds"]),
            due={
                "STAT": timedelta(seconds=config["worklist.due_stat_seconds"]),
                "URGENT": timedelta(seconds=config["worklist.due_urgent_seconds"]),
                "ROUTINE": timedelta(seconds=config["worklist.due_routine_seconds"]),
            },
        )


@dataclass(frozen=True)
class Viewer:
    """Who asks: a user name, the sites they act for (requesters), the reading
    groups they read for; ``everything`` for admins and the system."""

    name: str
    sites: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    everything: bool = False
    #: a second reader checked by worklist.screening (role, accreditation, not
    #: the first reader): only such a viewer reads screening requests
    screening: bool = False

    @classmethod
    def system(cls, name: str = "imag") -> Viewer:
        return cls(name, everything=True)

    def clause(self, alias: str = "r") -> tuple[str, list[Any]]:
        """SQL true for the requests this viewer may see.  Screening second
        reads are seen by admins and checked second readers only: the site
        follows the exam (its L2 reader is anonymous to it), and a member of
        the L2 group who came through the teleradiology worklist or UPS-RS
        was not checked for accreditation."""
        if self.everything:
            return "1 = 1", []
        parts, params = [], []
        if self.sites:
            parts.append(f"{alias}.site IN ({', '.join('?' * len(self.sites))})")
            params.extend(sorted(self.sites))
        if self.groups:
            parts.append(f"{alias}.group_name IN ({', '.join('?' * len(self.groups))})")
            params.extend(sorted(self.groups))
        if not parts:
            return "1 = 0", params
        kind = f"{alias}.kind {'=' if self.screening else '<>'} 'screening'"
        return "((" + " OR ".join(parts) + f") AND {kind})", params

    def reads_for(self, group: str | None) -> bool:
        """May this viewer claim a request of ``group``?"""
        return self.everything or (group is not None and group in self.groups)

    def check_kind(self, request: ReadRequest) -> None:
        """A screening second read changes only through worklist.screening
        (which checks the reader), whoever the caller is; and a screening
        viewer changes nothing else."""
        if (request.kind == "screening") != self.screening:
            raise NotAllowed(
                "a screening second reading is claimed and read through /api/screening"
                if request.kind == "screening"
                else "not a screening second reading"
            )


@dataclass(frozen=True)
class ReadRequest:
    """One reading request as stored."""

    id: int
    uid: str
    study_uid: str
    site: str
    group: str | None
    kind: str
    origin: str
    created_by: str
    state: str
    priority: str
    due_at: datetime
    created_at: datetime
    updated_at: datetime
    fields: dict[str, Any]
    missing: list[str]
    reply_to: str
    transaction_uid: str | None
    performer: str | None
    claimed_at: datetime | None
    lease_until: datetime | None
    first_claimed_at: datetime | None
    claims: int
    completed_at: datetime | None
    completed_by: str | None
    canceled_at: datetime | None
    canceled_by: str | None
    cancel_requested_at: datetime | None
    cancel_requested_by: str | None
    cancel_reason: str

    def overdue(self, now: datetime) -> bool:
        """Not done and past its due time."""
        return self.state not in FINAL and self.due_at < now

    def as_dict(self, now: datetime, *, with_transaction: bool = False) -> dict[str, Any]:
        """The request as the API shows it; the Transaction UID only to its holder."""
        out: dict[str, Any] = {
            "uid": self.uid,
            "study_uid": self.study_uid,
            "site": self.site,
            "group": self.group,
            "kind": self.kind,
            "origin": self.origin,
            "created_by": self.created_by,
            "state": self.state,
            "priority": self.priority,
            "ups_priority": PRIORITIES[self.priority],
            "due_at": _iso(self.due_at),
            "overdue": self.overdue(now),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "fields": self.fields,
            "missing": self.missing,
            "reply_to": self.reply_to,
            "performer": self.performer,
            "claimed_at": _iso(self.claimed_at),
            "lease_until": _iso(self.lease_until),
            "first_claimed_at": _iso(self.first_claimed_at),
            "claims": self.claims,
            "completed_at": _iso(self.completed_at),
            "completed_by": self.completed_by,
            "canceled_at": _iso(self.canceled_at),
            "canceled_by": self.canceled_by,
            "cancel_requested_at": _iso(self.cancel_requested_at),
            "cancel_requested_by": self.cancel_requested_by,
            "cancel_reason": self.cancel_reason,
        }
        if with_transaction:
            out["transaction_uid"] = self.transaction_uid
        return out


_COLUMNS = (
    "id, uid, study_uid, site, group_name, kind, origin, created_by, state, priority, due_at, "
    "created_at, updated_at, fields, missing, reply_to, transaction_uid, performer, claimed_at, "
    "lease_until, first_claimed_at, claims, completed_at, completed_by, canceled_at, "
    "canceled_by, cancel_requested_at, cancel_requested_by, cancel_reason"
)
_TIMES = {
    "due_at",
    "created_at",
    "updated_at",
    "claimed_at",
    "lease_until",
    "first_claimed_at",
    "completed_at",
    "canceled_at",
    "cancel_requested_at",
}


def _when(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _request(row: Sequence[Any]) -> ReadRequest:
    names = [c.strip() for c in _COLUMNS.split(",")]
    raw = dict(zip(names, row, strict=True))
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _TIMES:
            value = _when(value)
        elif name in ("fields", "missing"):
            value = json.loads(value)
        values["group" if name == "group_name" else name] = value
    return ReadRequest(**values)


def check_fields(
    fields: Mapping[str, Any], *, complete: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """The clinical fields, checked: unknown keys and wrong types are refused;
    with ``complete``, every mandatory field missing is refused too (listed
    one by one).  Without, the missing ones are returned instead (a request a
    route creates from what the images say, to be completed by the site)."""
    problems: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in FIELDS:
            problems[key] = f"unknown field (expected: {', '.join(FIELDS)})"
        elif key == "patient_consent":
            if value is not True:
                problems[key] = "must be true: the requester attests the patient's consent"
            else:
                clean[key] = True
        elif value is None:
            continue
        elif not isinstance(value, str):
            problems[key] = "must be text"
        elif len(value) > MAX_FIELD:
            problems[key] = f"longer than {MAX_FIELD} characters"
        elif key == "gp_address" and value.strip() and not _mailbox(value.strip()):
            problems[key] = "an e-mail address (local@domain)"
        elif value.strip():
            clean[key] = value.strip()
    missing = [key for key in MANDATORY if key not in clean and key not in problems]
    if complete:
        for key in missing:
            problems[key] = f"mandatory: {FIELDS[key]}"
        missing = []
    if problems:
        raise RequestInvalid(problems)
    return clean, missing


def _mailbox(text: str) -> bool:
    try:
        check_address(text)
    except InvalidMessage:
        return False
    return True


def check_priority(priority: Any) -> str:
    name = str(priority or "ROUTINE").upper()
    if name not in PRIORITIES:
        raise RequestInvalid({"priority": f"one of {', '.join(PRIORITIES)}"})
    return name


class Worklist:
    """The reading requests of one archive index."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        timings: Timings | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.timings = timings or Timings()
        self.audit = audit

    # -- reading ----------------------------------------------------------------------------

    def get(self, uid: str, viewer: Viewer) -> ReadRequest:
        """The request ``uid`` if ``viewer`` may see it, else C307 (a request
        of another site or group is indistinguishable from none)."""
        self.expire_leases()
        return self._visible(uid, viewer)

    def _visible(self, uid: str, viewer: Viewer) -> ReadRequest:
        where, params = viewer.clause()
        row = self.db.query_one(
            f"SELECT {_COLUMNS} FROM read_requests r WHERE r.uid = ? AND {where}", (uid, *params)
        )
        if row is None:
            raise UpsError("C307", f"no reading request {uid} that you may see")
        return _request(row)

    def visible(self, uids: Sequence[str], viewer: Viewer) -> dict[str, ReadRequest]:
        """The requests among ``uids`` that ``viewer`` may see, in one query
        (leases are not swept: the caller has just done so)."""
        if not uids:
            return {}
        where, params = viewer.clause()
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM read_requests r WHERE r.uid IN "
            f"({', '.join('?' * len(uids))}) AND {where}",
            (*uids, *params),
        )
        return {found.uid: found for found in map(_request, rows)}

    def listing(
        self,
        viewer: Viewer,
        *,
        states: Iterable[str] = (SCHEDULED, IN_PROGRESS),
        group: str | None = None,
        site: str | None = None,
        study_uid: str | None = None,
        overdue: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[ReadRequest], int]:
        """The requests ``viewer`` may see, in reading order (priority, due
        time, arrival), and how many there are in all."""
        self.expire_leases()
        where, params = viewer.clause()
        clauses, args = [where], list(params)
        states = list(states)
        if states:
            clauses.append(f"r.state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        for column, value in (("group_name", group), ("site", site), ("study_uid", study_uid)):
            if value is not None:
                clauses.append(f"r.{column} = ?")
                args.append(value)
        if overdue is not None:
            clauses.append(
                "r.state NOT IN ('COMPLETED', 'CANCELED') AND r.due_at < ?"
                if overdue
                else "(r.state IN ('COMPLETED', 'CANCELED') OR r.due_at >= ?)"
            )
            args.append(self.clock.now())
        sql_where = " AND ".join(clauses)
        total = self.db.scalar(f"SELECT count(*) FROM read_requests r WHERE {sql_where}", args)
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM read_requests r WHERE {sql_where} "
            "ORDER BY r.priority_rank, r.due_at, r.created_at, r.id LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return [_request(r) for r in rows], int(total or 0)

    def search(
        self,
        viewer: Viewer,
        conditions: Sequence[tuple[str, Sequence[Any]]] = (),
        *,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[ReadRequest], int]:
        """The requests ``viewer`` may see that meet every one of
        ``conditions`` -- SQL over ``r`` (the request), ``st`` (its study)
        and ``p`` (its patient), each with its parameters: the matching of
        UPS-RS (:mod:`worklist.upsrs`), whose keys include the patient's --
        in reading order, and how many there are in all."""
        self.expire_leases()
        where, params = viewer.clause()
        clauses, args = [where], list(params)
        for sql, values in conditions:
            clauses.append(f"({sql})")
            args.extend(values)
        tables = (
            "read_requests r LEFT JOIN studies st ON st.study_uid = r.study_uid "
            "LEFT JOIN patients p ON p.id = st.patient_ref"
        )
        sql_where = " AND ".join(clauses)
        total = self.db.scalar(f"SELECT count(*) FROM {tables} WHERE {sql_where}", args)
        columns = ", ".join(f"r.{c.strip()}" for c in _COLUMNS.split(","))
        rows = self.db.query(
            f"SELECT {columns} FROM {tables} WHERE {sql_where} "
            "ORDER BY r.priority_rank, r.due_at, r.created_at, r.id LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return [_request(r) for r in rows], int(total or 0)

    # -- creating ---------------------------------------------------------------------------

    def create(
        self,
        *,
        study_uid: str,
        site: str,
        group: str | None,
        fields: Mapping[str, Any],
        created_by: str,
        kind: str = "expertise",
        origin: str = "",
        priority: str = "ROUTINE",
        due_at: datetime | None = None,
        reply_to: str = "",
        burst: int | None = None,
        complete: bool = True,
        uid: str | None = None,
    ) -> ReadRequest:
        """Record a new SCHEDULED request.  ``complete``: every mandatory
        field must be there (a user's request); a route's request may lack
        some, listed in ``missing`` for the site to fill in.  ``burst``: the
        study.stable event it comes from (one request per burst: a second
        call for the same burst returns the first request).  ``uid``: the
        UID the caller chose (UPS-RS lets the client name its workitem; one
        already used is :class:`Duplicate`); otherwise a new one."""
        problems: dict[str, str] = {}
        if uid is not None and not is_valid_uid(uid):
            problems["uid"] = "a DICOM UID: digits and dots, at most 64 characters"
        if kind not in KINDS:
            problems["kind"] = f"one of {', '.join(KINDS)}"
        if due_at is not None and due_at.tzinfo is None:
            problems["due_at"] = "a date-time with its offset (Z or +01:00)"
        try:
            priority = check_priority(priority)
        except RequestInvalid as exc:
            problems.update(exc.problems)
        try:
            clean, missing = check_fields(fields, complete=complete)
            if kind == "screening":
                missing = []  # the exam request's fields are teleradiology's, not screening's
        except RequestInvalid as exc:
            problems.update(exc.problems)
        if problems:  # every fault at once, so the sender fixes them in one go
            raise RequestInvalid(problems)
        now = self.clock.now()
        due = due_at or now + self.timings.due[priority]
        with self._transaction() as db:
            if burst is not None:
                row = db.query_one(
                    f"SELECT {_COLUMNS} FROM read_requests WHERE burst = ?", (burst,)
                )
                if row is not None:
                    return _request(row)
            if uid is None:
                uid = generate_uid()
            # ON CONFLICT: two clients naming the same UID at once (UPS-RS), or
            # two deliveries of one burst, meet here rather than in a check
            # made before the insert
            inserted = db.query_one(
                "INSERT INTO read_requests (uid, study_uid, site, group_name, kind, origin, "
                "created_by, state, priority, priority_rank, due_at, created_at, updated_at, "
                "fields, missing, reply_to, burst) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                (
                    uid,
                    study_uid,
                    site,
                    group,
                    kind,
                    origin or f"user:{created_by}",
                    created_by,
                    SCHEDULED,
                    priority,
                    RANK[priority],
                    due,
                    now,
                    now,
                    json.dumps(clean, ensure_ascii=False),
                    json.dumps(missing),
                    reply_to,
                    burst,
                ),
            )
            if inserted is None:
                if burst is not None:
                    row = db.query_one(
                        f"SELECT {_COLUMNS} FROM read_requests WHERE burst = ?", (burst,)
                    )
                    if row is not None:
                        return _request(row)
                raise Duplicate(f"a reading request {uid} exists already")
            return self._row(db, uid)

    def complete_fields(self, uid: str, viewer: Viewer, fields: Mapping[str, Any]) -> ReadRequest:
        """The requesting site fills in what a route-created request lacks
        (or corrects it while nobody reads it yet)."""
        current = self.get(uid, viewer)
        viewer.check_kind(current)
        if not (viewer.everything or current.site in viewer.sites):
            raise NotAllowed("only the requesting site completes its request")
        if current.state != SCHEDULED:
            raise UpsError("C302" if current.state == IN_PROGRESS else "C300")
        merged = {**current.fields, **dict(fields)}
        clean, missing = check_fields(merged, complete=False)
        now = self.clock.now()
        with self._transaction() as db:
            changed = db.query_one(
                "UPDATE read_requests SET fields = ?, missing = ?, updated_at = ? "
                "WHERE uid = ? AND state = ? RETURNING id",
                (json.dumps(clean, ensure_ascii=False), json.dumps(missing), now, uid, SCHEDULED),
            )
            if changed is None:
                raise UpsError("C302")
            return self._row(db, uid)

    # -- claims -----------------------------------------------------------------------------

    def claim(self, uid: str, viewer: Viewer, transaction_uid: str | None = None) -> ReadRequest:
        """Take the request: IN PROGRESS, held by ``viewer`` for the lease
        time under a Transaction UID (returned in the record): a new one, or
        ``transaction_uid`` when the caller made it (in UPS the performer
        generates it: a UPS-RS client sends it with the claim)."""
        if transaction_uid is not None and not is_valid_uid(transaction_uid):
            raise RequestInvalid(
                {"transaction_uid": "a DICOM UID: digits and dots, at most 64 characters"}
            )
        current = self.get(uid, viewer)
        viewer.check_kind(current)
        if not viewer.reads_for(current.group):
            raise NotAllowed(
                f"request {uid} is for the reading group {current.group!r}: only its members "
                "claim it"
            )
        if current.state in FINAL:
            raise UpsError("C300")
        now = self.clock.now()
        transaction = transaction_uid or generate_uid()
        with self._transaction() as db:
            won = db.query_one(
                "UPDATE read_requests SET state = ?, transaction_uid = ?, performer = ?, "
                "claimed_at = ?, lease_until = ?, updated_at = ?, claims = claims + 1, "
                "first_claimed_at = COALESCE(first_claimed_at, ?) "
                "WHERE uid = ? AND state = ? RETURNING id",
                (
                    IN_PROGRESS,
                    transaction,
                    viewer.name,
                    now,
                    now + self.timings.lease,
                    now,
                    now,
                    uid,
                    SCHEDULED,
                ),
            )
            if won is None:
                state = db.scalar("SELECT state FROM read_requests WHERE uid = ?", (uid,))
                raise UpsError("C300" if state in FINAL else "C302")
            claimed = self._row(db, uid)
        metrics.observe_claim(claimed.priority, claimed.created_at, now, claimed.claims == 1)
        return claimed

    def holding(self, uid: str, viewer: Viewer, transaction_uid: str | None) -> ReadRequest:
        """The request, checked to be IN PROGRESS under ``transaction_uid``
        (C307, C300, C310, C301 otherwise); the lease is extended."""
        current = self.get(uid, viewer)
        viewer.check_kind(current)
        self._check_holder(current, transaction_uid)
        now = self.clock.now()
        with self._transaction() as db:
            held = db.query_one(
                "UPDATE read_requests SET lease_until = ?, updated_at = ? "
                "WHERE uid = ? AND state = ? AND transaction_uid = ? RETURNING id",
                (now + self.timings.lease, now, uid, IN_PROGRESS, transaction_uid),
            )
            if held is None:
                raise UpsError("C301")
            return self._row(db, uid)

    @staticmethod
    def _check_holder(current: ReadRequest, transaction_uid: str | None) -> None:
        if current.state in FINAL:
            raise UpsError("C300")
        if current.state != IN_PROGRESS:
            raise UpsError("C310")
        if not transaction_uid or transaction_uid != current.transaction_uid:
            raise UpsError("C301")

    def release(self, uid: str, viewer: Viewer, transaction_uid: str | None) -> ReadRequest:
        """The holder gives the request back: SCHEDULED, for anyone of the group."""
        return self._end_claim(uid, viewer, transaction_uid, SCHEDULED)

    def complete(self, uid: str, viewer: Viewer, transaction_uid: str | None) -> ReadRequest:
        """The holder is done (the report is validated): COMPLETED.  Already
        completed: :class:`UpsWarning` B306."""
        return self._end_claim(uid, viewer, transaction_uid, COMPLETED)

    def cancel(self, uid: str, viewer: Viewer, transaction_uid: str | None) -> ReadRequest:
        """The holder cancels (the exam cannot be read): CANCELED."""
        return self._end_claim(uid, viewer, transaction_uid, CANCELED)

    def _end_claim(
        self, uid: str, viewer: Viewer, transaction_uid: str | None, state: str
    ) -> ReadRequest:
        current = self.get(uid, viewer)
        viewer.check_kind(current)
        if current.state == state and state in FINAL:
            raise UpsWarning("B306" if state == COMPLETED else "B304", current)
        self._check_holder(current, transaction_uid)
        now = self.clock.now()
        sets = {
            SCHEDULED: "transaction_uid = NULL, performer = NULL, lease_until = NULL",
            COMPLETED: "completed_at = ?, completed_by = performer, lease_until = NULL",
            CANCELED: "canceled_at = ?, canceled_by = performer, lease_until = NULL",
        }[state]
        params: list[Any] = [state] + ([now] if state in FINAL else []) + [now]
        with self._transaction() as db:
            done = db.query_one(
                f"UPDATE read_requests SET state = ?, {sets}, updated_at = ? "
                "WHERE uid = ? AND state = ? AND transaction_uid = ? RETURNING id",
                (*params, uid, IN_PROGRESS, transaction_uid),
            )
            if done is None:
                raise UpsError("C301")
            ended = self._row(db, uid)
        if state == COMPLETED:
            metrics.observe_completion(
                ended.priority, ended.completed_by or "", ended.created_at, now
            )
        return ended

    def request_cancel(self, uid: str, viewer: Viewer, reason: str = "") -> ReadRequest:
        """The requester withdraws the request: a SCHEDULED request is
        canceled at once; an IN PROGRESS one keeps its reader, who is told
        (``cancel_requested_*``; the caller notifies them) and decides.
        COMPLETED: C311; already canceled: :class:`UpsWarning` B304."""
        current = self.get(uid, viewer)
        viewer.check_kind(current)
        if not (viewer.everything or current.site in viewer.sites):
            raise NotAllowed("only the requesting site cancels its request")
        if current.state == CANCELED:
            raise UpsWarning("B304", current)
        if current.state == COMPLETED:
            raise UpsError("C311")
        if len(reason) > MAX_FIELD:
            raise RequestInvalid({"reason": f"longer than {MAX_FIELD} characters"})
        now = self.clock.now()
        with self._transaction() as db:
            direct = db.query_one(
                "UPDATE read_requests SET state = ?, canceled_at = ?, canceled_by = ?, "
                "cancel_requested_at = ?, cancel_requested_by = ?, cancel_reason = ?, "
                "updated_at = ? WHERE uid = ? AND state = ? RETURNING id",
                (CANCELED, now, viewer.name, now, viewer.name, reason, now, uid, SCHEDULED),
            )
            if direct is None:
                asked = db.query_one(
                    "UPDATE read_requests SET cancel_requested_at = ?, cancel_requested_by = ?, "
                    "cancel_reason = ?, updated_at = ? WHERE uid = ? AND state = ? RETURNING id",
                    (now, viewer.name, reason, now, uid, IN_PROGRESS),
                )
                if asked is None:  # completed or canceled meanwhile
                    state = db.scalar("SELECT state FROM read_requests WHERE uid = ?", (uid,))
                    if state == CANCELED:
                        raise UpsWarning("B304", self._row(db, uid))
                    raise UpsError("C311")
            return self._row(db, uid)

    # -- leases -----------------------------------------------------------------------------

    def expire_leases(self) -> list[tuple[str, str]]:
        """Return to SCHEDULED every claim whose lease has passed; audit each.
        (uid, former holder) of those returned."""
        now = self.clock.now()
        if not self.db.scalar(
            "SELECT 1 FROM read_requests WHERE state = ? AND lease_until < ? LIMIT 1",
            (IN_PROGRESS, now),
        ):
            return []
        with self._transaction() as db:
            holders = {
                uid: (performer, study_uid)
                for uid, performer, study_uid in db.query(
                    "SELECT uid, performer, study_uid FROM read_requests "
                    "WHERE state = ? AND lease_until < ?",
                    (IN_PROGRESS, now),
                )
            }
            returned = db.query(  # a concurrent sweep may have returned some already
                "UPDATE read_requests SET state = ?, transaction_uid = NULL, performer = NULL, "
                "lease_until = NULL, updated_at = ? WHERE state = ? AND lease_until < ? "
                "RETURNING uid",
                (SCHEDULED, now, IN_PROGRESS, now),
            )
            rows = [(uid, *holders.get(uid, (None, None))) for (uid,) in returned]
            metrics.LEASES_EXPIRED.inc(len(rows))
            if self.audit is not None:
                for uid, performer, study_uid in rows:
                    self.audit.write(
                        AuditEntry(
                            actor="imag",
                            actor_kind="system",
                            action="worklist.lease-expired",
                            outcome="allowed",
                            study_uid=study_uid,
                            detail={"request": uid, "holder": performer},
                        )
                    )
        return [(uid, performer) for uid, performer, _study in rows]

    # -- helpers ----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Database]:
        """A transaction of its own, or the caller's when it is inside one (a
        transactional event subscriber, a report validated with its request)."""
        if self.db.in_transaction():
            yield self.db
        else:
            with self.db.transaction() as db:
                yield db

    def _row(self, db: Database, uid: str) -> ReadRequest:
        row = db.query_one(f"SELECT {_COLUMNS} FROM read_requests WHERE uid = ?", (uid,))
        if row is None:
            raise UpsError("C307")
        return _request(row)
