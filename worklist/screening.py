"""Screening mammography second reading: the exams, their two readings, and
who may do what.

In the organised breast-cancer screening programme every mammogram the first
radiologist (L1, at the producing site) judges negative is read again by an
accredited second reader (L2).  Here the images never leave the archive:

* **Recognition.**  A study that becomes stable and matches a
  ``[[screening.rules]]`` rule (producing site, procedure code, study
  description, modality) becomes a screening exam, once per study, linked to
  the woman's local identity (her other rounds, at any site, are found
  through the regional identity).  A deadline job is queued for the day the
  result letter is due (``screening.letter_target_days`` after the exam).
* **L1.**  A radiologist of the producing site records the first reading
  (:mod:`worklist.screening_readings`).  Negative: the exam enters the L2
  queue; positive: it is closed at L1 with its outcome.
* **L2.**  The queue is a reading request of kind ``screening`` for the L2
  group (``screening.l2_group``): claims, leases, Transaction UIDs and
  releases are the worklist's own (:class:`worklist.requests.Worklist`), not
  a copy.  Only a user with ``screening.write`` whose accreditation is
  current claims, and never the exam's L1 reader.  The group is granted the
  exam and the woman's prior studies, so the reader can open and compare them.
* **Verdict.**  The holder's verdict completes the request and closes the
  exam in one transaction; a ``screening.result`` event (durable) makes the
  result letters.  There is no third reading.
* **Anonymity.**  The site sees its exams and their outcome, never who read
  them at L2: the L2 reading request is not the site's (``Viewer.clause``)
  and :meth:`Exam.as_dict` leaves the L2 reader out for the site.

Auditing: what a user does goes through the HTTP API, whose one audit
entry per request names the action, the study and the outcome; what the
archive does by itself (recognising an exam) is audited here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from archive.events import EventRow, record
from archive.index.db import Database
from archive.jobs import JobQueue
from archive.routing import matches
from archive.security.audit import AuditEntry, AuditLog
from archive.security.principals import Principals
from archive.security.roles import Principal
from worklist.requests import NotAllowed, ReadRequest, Viewer, Worklist
from worklist.screening_readings import (
    L1_NEGATIVE,
    check_l1,
    check_l2,
    final_outcome,
    l1_outcome,
)
from worklist.ups import UpsError

if TYPE_CHECKING:
    from archive.clock import Clock

AWAITING_L1 = "AWAITING L1"
AWAITING_L2 = "AWAITING L2"
CLOSED = "CLOSED"
STATES = (AWAITING_L1, AWAITING_L2, CLOSED)
KIND = "screening"  # the L2 reading requests' kind
RESULT_EVENT = "screening.result"
DEADLINE_JOB = "screening.deadline"
#: who records the first reading (a radiologist of the producing site)
FIRST_READ = "screening.first-read"
#: who sees every exam and the programme's indicators (the coordination centre)
COORDINATE = "screening.coordinate"
#: second readers (the core's screening_reader role has both)
SECOND_READ = "screening.write"
SEE_QUEUE = "screening.read"
RULE_KEYS = ("site", "procedure_code", "study_description", "modality")


class ScreeningError(Exception):
    """A change the exam's state refuses (HTTP 409), or no such exam the
    caller may see (HTTP 404: another site's exam is indistinguishable)."""

    def __init__(self, message: str, status: int = 409) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class Rule:
    """A ``[[screening.rules]]`` table: a stable study that matches every key
    given (exact, wildcards ``*`` ``?``, or ``re:...`` as routes match) is a
    screening exam.  ``procedure_code`` matches the code value of the
    study's Procedure Code Sequence (or Requested Procedure Code Sequence);
    ``modality`` defaults to MG."""

    name: str
    site: str = ""
    procedure_code: str = ""
    study_description: str = ""
    modality: str = "MG"

    def matches_index(self, attrs: Mapping[str, Any]) -> bool:
        """The keys the index answers (site, description, modality): a study
        that fails them needs no header read for its procedure code."""
        modalities = attrs.get("modality") or []
        return (
            matches(self.site, attrs.get("site") or "")
            and matches(self.study_description, attrs.get("study_description") or "")
            and (not self.modality or any(matches(self.modality, m) for m in modalities))
        )

    def matches(self, attrs: Mapping[str, Any], codes: list[str]) -> bool:
        return self.matches_index(attrs) and (
            not self.procedure_code or any(matches(self.procedure_code, c) for c in codes)
        )


def parse_rules(value: Any) -> list[Rule]:
    """The ``screening.rules`` setting: a list of tables (TOML) or a JSON
    array (``IMAG_SCREENING_RULES``); TypeError says what is expected."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            raise TypeError("a JSON array of rule objects") from None
    if not isinstance(value, list):
        raise TypeError("a list of [[screening.rules]] tables (name, site, procedure_code, ...)")
    rules, names = [], set()
    for n, table in enumerate(value, start=1):
        if not isinstance(table, Mapping):
            raise TypeError(f"rule {n}: a table")
        unknown = set(table) - {"name", *RULE_KEYS}
        if unknown:
            raise TypeError(
                f"rule {n}: unknown keys {sorted(unknown)} (expected name, {', '.join(RULE_KEYS)})"
            )
        if not all(isinstance(v, str) for v in table.values()):
            raise TypeError(f"rule {n}: every value is text")
        name = table.get("name") or f"screening-{n}"
        if name in names:
            raise TypeError(f"rule {n}: the name {name!r} is used twice")
        names.add(name)
        rules.append(Rule(name=name, **{k: table[k] for k in RULE_KEYS if k in table}))
    return rules


@dataclass(frozen=True)
class Settings:
    """The ``screening.*`` settings the domain needs."""

    rules: tuple[Rule, ...] = ()
    l2_group: str = "screening-l2"
    letter_target: timedelta = timedelta(days=15)

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        return cls(
            rules=tuple(config["screening.rules"]),
            l2_group=config["screening.l2_group"],
            letter_target=timedelta(days=config["screening.letter_target_days"]),
        )


@dataclass(frozen=True)
class Exam:
    """One screening exam as stored."""

    id: int
    study_uid: str
    site: str
    patient_ref: int | None
    rule: str
    exam_date: str
    recognised_at: datetime
    state: str
    l1_reader: str | None
    l1_at: datetime | None
    l1: dict[str, Any] | None
    l1_outcome: str | None
    request_uid: str | None
    l2_reader: str | None
    l2_at: datetime | None
    l2: dict[str, Any] | None
    l2_verdict: str | None
    outcome: str | None
    closed_at: datetime | None
    recipients: dict[str, str]
    letters_at: datetime | None
    late_alerted_at: datetime | None

    def due(self, target: timedelta) -> datetime:
        """When the result letter becomes late: the end of the exam day +
        ``target`` (UTC).  A letter sent on day 15 after the exam is within a
        15-day target; one sent on day 16 exceeds it."""
        day = date.fromisoformat(self.exam_date)
        return datetime(day.year, day.month, day.day, tzinfo=UTC) + target + timedelta(days=1)

    def as_dict(self, *, for_site: bool) -> dict[str, Any]:
        """The exam as the API shows it.  ``for_site``: the producing site's
        view, without the second reader's identity."""

        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        shown: dict[str, Any] = {
            "study_uid": self.study_uid,
            "site": self.site,
            "rule": self.rule,
            "exam_date": self.exam_date,
            "recognised_at": iso(self.recognised_at),
            "state": self.state,
            "l1": None
            if self.l1 is None
            else {
                "reader": self.l1_reader,
                "at": iso(self.l1_at),
                "outcome": self.l1_outcome,
                **{k: v for k, v in self.l1.items() if k != "recipients"},
            },
            "l2": None
            if self.l2 is None
            else {"at": iso(self.l2_at), **self.l2}
            | ({} if for_site else {"reader": self.l2_reader}),
            "outcome": self.outcome,
            "closed_at": iso(self.closed_at),
            "letters_at": iso(self.letters_at),
            "late_alerted_at": iso(self.late_alerted_at),
        }
        if not for_site:
            shown["request_uid"] = self.request_uid
        return shown


_COLUMNS = (
    "id, study_uid, site, patient_ref, rule, exam_date, recognised_at, state, l1_reader, "
    "l1_at, l1, l1_outcome, request_uid, l2_reader, l2_at, l2, l2_verdict, outcome, "
    "closed_at, recipients, letters_at, late_alerted_at"
)


def _exam(row: tuple) -> Exam:
    values = list(row)
    for i in (10, 15):  # l1, l2
        values[i] = json.loads(values[i]) if values[i] else None
    values[19] = json.loads(values[19] or "{}")
    for i in (6, 9, 14, 18, 20, 21):  # the times (text on SQLite)
        values[i] = _when(values[i])
    return Exam(*values)


def _when(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    found = datetime.fromisoformat(str(value))
    return found if found.tzinfo else found.replace(tzinfo=UTC)


def load_exam(db: Database, study_uid: str) -> Exam | None:
    """The exam of ``study_uid`` as stored, whoever asks (the callers check)."""
    row = db.query_one(
        f"SELECT {_COLUMNS} FROM screening_exams e WHERE e.study_uid = ?", (study_uid,)
    )
    return None if row is None else _exam(row)


def exam_date_of(study_date: str | None, fallback: datetime) -> str:
    """The exam's date (ISO) from the study's DICOM date, else ``fallback``'s day."""
    text = (study_date or "").strip()
    if len(text) == 8 and text.isdigit():
        try:
            return date(int(text[:4]), int(text[4:6]), int(text[6:])).isoformat()
        except ValueError:
            pass
    return fallback.date().isoformat()


class Screening:
    """The screening exams of one archive index."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        worklist: Worklist,
        audit: AuditLog | None = None,
        settings: Settings | None = None,
        prior_studies: Callable[[str], list[str]] | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.worklist = worklist
        self.audit = audit
        self.settings = settings or Settings()
        #: the woman's other studies, any site (granted to the L2 group with the exam)
        self.prior_studies = prior_studies or (lambda study_uid: [])

    # -- who may do what ---------------------------------------------------------------------

    def accredited(self, name: str, on: date | None = None) -> bool:
        """Whether ``name``'s second-reader accreditation is current on ``on``
        (today by the archive's clock)."""
        day = (on or self.clock.now().date()).isoformat()
        return bool(
            self.db.scalar(
                "SELECT 1 FROM screening_readers WHERE name = ? AND revoked_at IS NULL "
                "AND accredited_from <= ? AND (accredited_until IS NULL OR accredited_until >= ?)",
                (name, day, day),
            )
        )

    def second_reader(self, principal: Principal) -> Viewer:
        """``principal`` as an L2 reader of the queue, or :class:`NotAllowed`
        (HTTP 403) saying what is missing: the role, or a current accreditation."""
        if principal.role != "admin" and not principal.can(SECOND_READ):
            raise NotAllowed("second reading needs the screening reader role (screening.write)")
        if not self.accredited(principal.name):
            raise NotAllowed(
                f"{principal.name} has no current second-reader accreditation: the screening "
                "coordination centre records it (accreditation dates)"
            )
        return Viewer(principal.name, groups=frozenset({self.settings.l2_group}), screening=True)

    def _visibility(self, principal: Principal) -> tuple[str, list[Any], bool]:
        """SQL over ``e`` for the exams ``principal`` may see, and whether it
        sees them as the site (without the L2 reader)."""
        if principal.role == "admin" or principal.can(COORDINATE):
            return "1 = 1", [], False
        parts, params = [], []
        if principal.sites and principal.can("studies.read"):
            parts.append(f"e.site IN ({', '.join('?' * len(principal.sites))})")
            params.extend(principal.sites)
        as_site = bool(parts)
        if principal.can(SEE_QUEUE) and self.accredited(principal.name):
            parts.append("(e.state = ? OR e.l2_reader = ?)")
            params.extend([AWAITING_L2, principal.name])
            as_site = False if not principal.sites else as_site
        return ("(" + " OR ".join(parts) + ")" if parts else "1 = 0"), params, as_site

    # -- reading -----------------------------------------------------------------------------

    def get(self, study_uid: str, principal: Principal) -> tuple[Exam, bool]:
        """The exam of ``study_uid`` if ``principal`` may see it, and whether
        it is shown as to the site; otherwise 404."""
        where, params, as_site = self._visibility(principal)
        row = self.db.query_one(
            f"SELECT {_COLUMNS} FROM screening_exams e WHERE e.study_uid = ? AND {where}",
            (study_uid, *params),
        )
        if row is None:
            raise ScreeningError(f"no screening exam {study_uid} that you may see", 404)
        exam = _exam(row)
        return exam, as_site and exam.l2_reader != principal.name

    def listing(
        self,
        principal: Principal,
        *,
        state: str | None = None,
        site: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[Exam], int, bool]:
        """The exams ``principal`` may see, oldest exam first, the total, and
        whether they are shown as to the site."""
        where, params, as_site = self._visibility(principal)
        clauses, args = [where], list(params)
        for column, value in (("state", state), ("site", site)):
            if value is not None:
                clauses.append(f"e.{column} = ?")
                args.append(value)
        sql_where = " AND ".join(clauses)
        total = self.db.scalar(f"SELECT count(*) FROM screening_exams e WHERE {sql_where}", args)
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM screening_exams e WHERE {sql_where} "
            "ORDER BY e.exam_date, e.id LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return [_exam(r) for r in rows], int(total or 0), as_site

    def _row(self, db: Database, study_uid: str) -> Exam:
        found = load_exam(db, study_uid)
        if found is None:
            raise ScreeningError(f"no screening exam {study_uid}", 404)
        return found

    # -- recognition -------------------------------------------------------------------------

    def rule_for(self, attrs: Mapping[str, Any], codes: list[str]) -> Rule | None:
        return next((r for r in self.settings.rules if r.matches(attrs, codes)), None)

    def recognise(
        self,
        *,
        study_uid: str,
        site: str,
        patient_ref: int | None,
        study_date: str | None,
        rule: Rule,
        burst: int | None = None,
    ) -> Exam:
        """Record the study as a screening exam awaiting its first reading (a
        study already recognised is returned as it is) and queue its deadline."""
        now = self.clock.now()
        with self._transaction() as db:
            row = db.query_one(
                f"SELECT {_COLUMNS} FROM screening_exams e WHERE e.study_uid = ?", (study_uid,)
            )
            if row is not None:
                return _exam(row)
            db.execute(
                "INSERT INTO screening_exams (study_uid, site, patient_ref, rule, burst, "
                "exam_date, recognised_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    study_uid,
                    site,
                    patient_ref,
                    rule.name,
                    burst,
                    exam_date_of(study_date, now),
                    now,
                    AWAITING_L1,
                ),
            )
            exam = self._row(db, study_uid)
            JobQueue(db).enqueue(
                DEADLINE_JOB,
                {"study_uid": study_uid},
                due_at=exam.due(self.settings.letter_target),
                dedupe_key=f"screening-deadline:{study_uid}",
            )
            self._audit(
                "imag",
                "system",
                "screening.recognised",
                exam,
                {"rule": rule.name, "exam_date": exam.exam_date},
            )
        return exam

    # -- first reading -----------------------------------------------------------------------

    def record_l1(self, study_uid: str, principal: Principal, payload: Any) -> Exam:
        """The producing site's radiologist records the first reading.
        Negative: the exam enters the L2 queue; positive: it is closed at L1."""
        exam, _ = self.get(study_uid, principal)
        if principal.role != "admin" and not (
            principal.can(FIRST_READ) and exam.site in principal.sites
        ):
            raise NotAllowed("the first reading is recorded by a radiologist of the exam's site")
        reading = check_l1(payload)
        outcome = l1_outcome(reading)
        now = self.clock.now()
        with self._transaction() as db:
            changed = db.query_one(
                "UPDATE screening_exams SET l1_reader = ?, l1_at = ?, l1 = ?, l1_outcome = ?, "
                "recipients = ?, state = ? WHERE study_uid = ? AND state = ? RETURNING id",
                (
                    principal.name,
                    now,
                    json.dumps(reading, ensure_ascii=False),
                    outcome,
                    json.dumps(reading.get("recipients", {})),
                    AWAITING_L2 if outcome == L1_NEGATIVE else CLOSED,
                    study_uid,
                    AWAITING_L1,
                ),
            )
            if changed is None:
                raise ScreeningError("the first reading of this exam is recorded already")
            if outcome == L1_NEGATIVE:
                request = self._queue_for_l2(db, exam, principal.name)
                db.execute(
                    "UPDATE screening_exams SET request_uid = ? WHERE study_uid = ?",
                    (request.uid, study_uid),
                )
            else:
                db.execute(
                    "UPDATE screening_exams SET outcome = ?, closed_at = ? WHERE study_uid = ?",
                    ("POSITIVE_L1", now, study_uid),
                )
            done = self._row(db, study_uid)
            if done.state == CLOSED:
                self._result(db, done)
        return done

    def _queue_for_l2(self, db: Database, exam: Exam, by: str) -> ReadRequest:
        request = self.worklist.create(
            study_uid=exam.study_uid,
            site=exam.site,
            group=self.settings.l2_group,
            fields={
                "exam_type": "Screening mammography",
                "question": "Second reading (L2) of a mammogram negative at the first reading",
            },
            created_by=by,
            kind=KIND,
            origin="screening:l1-negative",
            priority="ROUTINE",
            due_at=exam.due(self.settings.letter_target),
            complete=False,
        )
        Principals(db).grant_group(
            self.settings.l2_group, [exam.study_uid, *self.prior_studies(exam.study_uid)]
        )
        return request

    # -- second reading ----------------------------------------------------------------------

    def queue(
        self, principal: Principal, *, limit: int = 100, offset: int = 0
    ) -> tuple[list[tuple[Exam, ReadRequest]], int]:
        """The L2 queue for an accredited reader, oldest exam first: exams
        waiting for a reader and those this reader holds; never their own L1s."""
        viewer = self.second_reader(principal)
        self.worklist.expire_leases()
        total = self.db.scalar(
            "SELECT count(*) FROM screening_exams e JOIN read_requests r "
            "ON r.uid = e.request_uid WHERE e.state = ? AND (e.l1_reader IS NULL OR "
            "e.l1_reader <> ?) AND (r.state = 'SCHEDULED' OR r.performer = ?)",
            (AWAITING_L2, viewer.name, viewer.name),
        )
        rows = self.db.query(
            f"SELECT {', '.join('e.' + c.strip() for c in _COLUMNS.split(','))} "
            "FROM screening_exams e JOIN read_requests r ON r.uid = e.request_uid "
            "WHERE e.state = ? AND (e.l1_reader IS NULL OR e.l1_reader <> ?) "
            "AND (r.state = 'SCHEDULED' OR r.performer = ?) "
            "ORDER BY e.exam_date, e.id LIMIT ? OFFSET ?",
            (AWAITING_L2, viewer.name, viewer.name, limit, offset),
        )
        exams = [_exam(r) for r in rows]
        requests = self.worklist.visible([e.request_uid or "" for e in exams], viewer)
        return [(e, requests[e.request_uid or ""]) for e in exams], int(total or 0)

    def _held(self, study_uid: str, principal: Principal) -> tuple[Exam, Viewer]:
        viewer = self.second_reader(principal)
        exam = self._row(self.db, study_uid)
        if exam.request_uid is None:
            raise ScreeningError(
                "this exam was closed at the first reading: it has no second reading"
                if exam.state == CLOSED
                else "this exam has no second reading yet: its first reading is not recorded"
            )
        if exam.l1_reader == principal.name:
            raise NotAllowed("the first reader of an exam never reads it again at L2")
        return exam, viewer

    def claim(self, study_uid: str, principal: Principal) -> tuple[Exam, ReadRequest]:
        """Take the exam's second reading (the worklist's claim: one winner,
        a lease, a Transaction UID the holder presents from then on)."""
        exam, viewer = self._held(study_uid, principal)
        if exam.state == CLOSED:
            raise UpsError("C300", "the second reading of this exam is done")
        request = self.worklist.claim(exam.request_uid or "", viewer)
        return exam, request

    def holding(
        self, study_uid: str, principal: Principal, transaction_uid: str | None
    ) -> tuple[Exam, ReadRequest]:
        """The holder is still reading (extends the lease)."""
        exam, viewer = self._held(study_uid, principal)
        return exam, self.worklist.holding(exam.request_uid or "", viewer, transaction_uid)

    def release(
        self, study_uid: str, principal: Principal, transaction_uid: str | None
    ) -> tuple[Exam, ReadRequest]:
        """The holder gives the exam back to the queue."""
        exam, viewer = self._held(study_uid, principal)
        request = self.worklist.release(exam.request_uid or "", viewer, transaction_uid)
        return exam, request

    def verdict(
        self, study_uid: str, principal: Principal, transaction_uid: str | None, payload: Any
    ) -> Exam:
        """The holder's verdict: the request is completed and the exam closed
        with its outcome in one transaction, and the result event recorded."""
        exam, viewer = self._held(study_uid, principal)
        reading = check_l2(payload)
        now = self.clock.now()
        with self._transaction() as db:
            self.worklist.complete(exam.request_uid or "", viewer, transaction_uid)
            changed = db.query_one(
                "UPDATE screening_exams SET l2_reader = ?, l2_at = ?, l2 = ?, l2_verdict = ?, "
                "outcome = ?, closed_at = ?, state = ? WHERE study_uid = ? AND state = ? "
                "RETURNING id",
                (
                    principal.name,
                    now,
                    json.dumps(reading, ensure_ascii=False),
                    reading["verdict"],
                    final_outcome(reading),
                    now,
                    CLOSED,
                    study_uid,
                    AWAITING_L2,
                ),
            )
            if changed is None:
                raise UpsError("C300", "the second reading of this exam is done")
            done = self._row(db, study_uid)
            self._result(db, done)
        return done

    # -- accreditation -----------------------------------------------------------------------

    def accredit(
        self,
        name: str,
        *,
        accredited_from: date,
        accredited_until: date | None,
        reference: str,
        by: Principal,
    ) -> dict[str, Any]:
        """Record (or renew) ``name``'s second-reader accreditation."""
        if not name or len(name) > 200:
            raise ValueError("name: the reader's account name")
        if accredited_until is not None and accredited_until < accredited_from:
            raise ValueError("accredited_until: on or after accredited_from")
        now = self.clock.now()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO screening_readers (name, accredited_from, accredited_until, "
                "reference, revoked_at, updated_by, updated_at) VALUES (?, ?, ?, ?, NULL, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET accredited_from = excluded.accredited_from, "
                "accredited_until = excluded.accredited_until, reference = excluded.reference, "
                "revoked_at = NULL, updated_by = excluded.updated_by, "
                "updated_at = excluded.updated_at",
                (
                    name,
                    accredited_from.isoformat(),
                    accredited_until.isoformat() if accredited_until else None,
                    reference,
                    by.name,
                    now,
                ),
            )
        return self.reader(name) or {}

    def revoke(self, name: str, by: Principal) -> dict[str, Any] | None:
        """End ``name``'s accreditation now."""
        with self._transaction() as db:
            db.execute(
                "UPDATE screening_readers SET revoked_at = ?, updated_by = ?, updated_at = ? "
                "WHERE name = ? AND revoked_at IS NULL",
                (self.clock.now(), by.name, self.clock.now(), name),
            )
        return self.reader(name)

    def reader(self, name: str) -> dict[str, Any] | None:
        rows = self.readers(name)
        return rows[0] if rows else None

    def readers(self, name: str | None = None) -> list[dict[str, Any]]:
        """The accreditations, with whether each is current today."""
        sql = (
            "SELECT name, accredited_from, accredited_until, reference, revoked_at, updated_by, "
            "updated_at FROM screening_readers"
        )
        rows = self.db.query(
            sql + (" WHERE name = ?" if name else "") + " ORDER BY name", (name,) if name else ()
        )
        keys = (
            "name",
            "accredited_from",
            "accredited_until",
            "reference",
            "revoked_at",
            "updated_by",
            "updated_at",
        )
        found = []
        for row in rows:
            entry = dict(zip(keys, row, strict=True))
            for key in ("revoked_at", "updated_at"):
                if isinstance(entry[key], datetime):
                    entry[key] = entry[key].isoformat()
            entry["current"] = self.accredited(entry["name"])
            found.append(entry)
        return found

    # -- helpers -----------------------------------------------------------------------------

    def _result(self, db: Database, exam: Exam) -> None:
        """The exam is closed: the durable ``screening.result`` event (the
        result letters are its subscriber's)."""
        record(
            db,
            [
                EventRow(
                    RESULT_EVENT,
                    site=exam.site,
                    study_uid=exam.study_uid,
                    detail={"outcome": exam.outcome, "exam_date": exam.exam_date},
                )
            ],
            at=self.clock.now(),
        )

    def _audit(
        self,
        actor: str,
        kind: str,
        action: str,
        exam: Exam,
        detail: dict[str, Any],
        *,
        role: str | None = None,
    ) -> None:
        self._write_audit(
            AuditEntry(
                actor,
                kind,
                action,
                "allowed",
                role=role,
                study_uid=exam.study_uid,
                detail={"site": exam.site, **detail},
            )
        )

    def _write_audit(self, entry: AuditEntry) -> None:
        if self.audit is not None:
            self.audit.write(entry)

    @contextmanager
    def _transaction(self) -> Iterator[Database]:
        if self.db.in_transaction():
            yield self.db
        else:
            with self.db.transaction() as db:
                yield db
