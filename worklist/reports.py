"""Reports of reading requests: the draft the holder writes, its validation,
the addenda after it, and what each validation stores and sends.

The rules, whatever the door (REST today, a reporting tool tomorrow):

* **Only the holder writes.**  A draft is saved by the reader who holds the
  request (IN PROGRESS, its Transaction UID: :meth:`Worklist.holding` checks
  it and extends the lease).  A holder whose lease passed presents a
  Transaction UID the worklist has forgotten: refused with C301 -- also when
  nobody has claimed the request again yet (the worklist alone would say
  C310, "not in progress"; to the late holder it is their claim that is gone).
* **Validation is one transaction**: the report becomes immutable, the
  request COMPLETED (the worklist joins this transaction), the UIDs of the
  version's SR and PDF are fixed, their series listed in ``read_outputs`` (so
  the new series never ask for the study to be read again), the event
  ``report.validated`` recorded and the storage/delivery job queued.  Any
  failure leaves nothing behind.
* **After validation, addenda.**  A change to the report is refused
  (:class:`ReportConflict`, 409).  Any reader of the request's group may add
  an addendum -- the original reader may be off duty when the site calls back,
  and the group answers for the site -- and only its author validates it: a
  signature is personal.  One addendum draft at a time.  Each validated
  addendum is a new version: a new SR and PDF holding the report and every
  validated addendum, in new series, delivered again.
* **Who reads.**  Those who see the request (its site's users, its group's
  readers, admins: :meth:`Viewer.clause`); another site's user gets 404 as for
  a request that does not exist.  Drafts (the report's before validation, an
  addendum's) are shown to the readers only, never to the requesting site.

Sizes are refused before anything is written (:class:`RequestInvalid`, 400):
the limits are the documents' (:mod:`worklist.documents`), so a report that
is accepted can always be rendered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom.uid import generate_uid

from archive.events import EventRow, record
from archive.index.db import Database
from archive.jobs import JobQueue
from worklist.documents import (
    MAX_ADDENDA,
    MAX_NAME_CHARS,
    MAX_REPORT_CHARS,
    MAX_TEXT_CHARS,
    Addendum,
    ReportContent,
    Signed,
)
from worklist.requests import NotAllowed, ReadRequest, RequestInvalid, Viewer, Worklist
from worklist.ups import COMPLETED, UpsError

CHAPTERS = ("indications", "technique", "results", "conclusion")
DRAFT = "draft"
VALIDATED = "validated"
#: the job that stores a validated version and delivers it
JOB_KIND = "worklist.report"  # registered by worklist.plugin (REPORT_JOB)
REPORT_VALIDATED = "report.validated"


class ReportConflict(Exception):
    """The report's state refuses the change (HTTP 409): validated already,
    not validated yet, an addendum draft pending..."""


class NoReport(LookupError):
    """No report (or addendum) there that the caller may see (HTTP 404)."""


@dataclass(frozen=True)
class AddendumRow:
    number: int
    text: str
    author: str
    author_name: str
    state: str
    created_at: datetime
    validated_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "text": self.text,
            "author": self.author,
            "author_name": self.author_name,
            "state": self.state,
            "created_at": _iso(self.created_at),
            "validated_at": _iso(self.validated_at),
        }


@dataclass(frozen=True)
class Version:
    """What one validation stores and sends (0: the report; n: with addenda 1..n)."""

    version: int
    sr_series_uid: str
    sr_sop_uid: str
    pdf_series_uid: str
    pdf_sop_uid: str
    created_at: datetime
    stored_at: datetime | None
    message_ref: int | None
    delivery: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sr": {"series_uid": self.sr_series_uid, "sop_instance_uid": self.sr_sop_uid},
            "pdf": {"series_uid": self.pdf_series_uid, "sop_instance_uid": self.pdf_sop_uid},
            "created_at": _iso(self.created_at),
            "stored": self.stored_at is not None,
            "stored_at": _iso(self.stored_at),
            "message": self.message_ref,
            "delivery": self.delivery or "pending",
        }


@dataclass(frozen=True)
class Report:
    """A request's report with its addenda and versions, as stored."""

    request_uid: str
    study_uid: str
    site: str
    reader: str
    reader_name: str
    chapters: dict[str, str]
    state: str
    created_at: datetime
    updated_at: datetime
    validated_at: datetime | None
    addenda: list[AddendumRow] = field(default_factory=list)
    versions: list[Version] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "request": self.request_uid,
            "study_uid": self.study_uid,
            "site": self.site,
            "reader": self.reader,
            "reader_name": self.reader_name,
            **self.chapters,
            "state": self.state,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "validated_at": _iso(self.validated_at),
            "addenda": [a.as_dict() for a in self.addenda],
            "versions": [v.as_dict() for v in self.versions],
        }

    def visible_to_site(self) -> Report:
        """What the requesting site sees: validated texts only."""
        return Report(
            **{
                **self.__dict__,
                "addenda": [a for a in self.addenda if a.state == VALIDATED],
            }
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _when(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def check_chapters(chapters: Mapping[str, Any]) -> dict[str, str]:
    """The chapters sent, checked: known names, text, at most
    :data:`MAX_TEXT_CHARS` each (every fault listed at once)."""
    problems: dict[str, str] = {}
    clean: dict[str, str] = {}
    for key, value in chapters.items():
        if key not in CHAPTERS:
            problems[key] = f"unknown chapter (expected: {', '.join(CHAPTERS)})"
        elif value is None:
            clean[key] = ""
        elif not isinstance(value, str):
            problems[key] = "must be text"
        elif len(value) > MAX_TEXT_CHARS:
            problems[key] = f"{len(value)} characters: at most {MAX_TEXT_CHARS}"
        else:
            clean[key] = value
    if problems:
        raise RequestInvalid(problems)
    return clean


def check_name(name: str | None, default: str) -> str:
    """The display name a reader signs with (default: the account name)."""
    value = (name if name is not None else default).strip()
    if not value or len(value) > MAX_NAME_CHARS:
        raise RequestInvalid({"reader_name": f"1 to {MAX_NAME_CHARS} characters"})
    return value


_REPORT = (
    "request_uid, study_uid, site, reader, reader_name, indications, technique, results, "
    "conclusion, state, created_at, updated_at, validated_at"
)
_ADDENDUM = "number, text, author, author_name, state, created_at, validated_at"
_VERSION = (
    "version, sr_series_uid, sr_sop_uid, pdf_series_uid, pdf_sop_uid, created_at, stored_at, "
    "message_ref, delivery"
)


class Reports:
    """The reports of one archive index, beside its :class:`Worklist`."""

    def __init__(self, worklist: Worklist) -> None:
        self.worklist = worklist
        self.db: Database = worklist.db
        self.clock = worklist.clock

    # -- reading ----------------------------------------------------------------------------

    def get(self, uid: str, viewer: Viewer) -> Report:
        """The report of request ``uid`` as ``viewer`` may see it; C307 for a
        request they do not see, :class:`NoReport` when there is none (yet,
        for the requesting site: drafts are the readers')."""
        request = self.worklist.get(uid, viewer)
        report = self.load(uid)
        if report is None:
            raise NoReport(f"request {uid} has no report yet")
        if viewer.everything or viewer.reads_for(request.group):
            return report
        if report.state != VALIDATED:
            raise NoReport(f"request {uid} has no validated report yet")
        return report.visible_to_site()

    def load(self, uid: str, db: Database | None = None) -> Report | None:
        """The stored report of request ``uid``, whoever asks (for the job)."""
        db = db or self.db
        row = db.query_one(f"SELECT {_REPORT} FROM reports WHERE request_uid = ?", (uid,))
        if row is None:
            return None
        addenda = [
            AddendumRow(r[0], r[1], r[2], r[3], r[4], _when(r[5]), _when(r[6]))  # type: ignore[arg-type]
            for r in db.query(
                f"SELECT {_ADDENDUM} FROM report_addenda WHERE request_uid = ? ORDER BY number",
                (uid,),
            )
        ]
        versions = [
            Version(
                int(r[0]),
                r[1],
                r[2],
                r[3],
                r[4],
                _when(r[5]),
                _when(r[6]),  # type: ignore[arg-type]
                None if r[7] is None else int(r[7]),
                r[8],
            )
            for r in db.query(
                f"SELECT {_VERSION} FROM report_versions WHERE request_uid = ? ORDER BY version",
                (uid,),
            )
        ]
        return Report(
            request_uid=row[0],
            study_uid=row[1],
            site=row[2],
            reader=row[3],
            reader_name=row[4],
            chapters=dict(zip(CHAPTERS, row[5:9], strict=True)),
            state=row[9],
            created_at=_when(row[10]),  # type: ignore[arg-type]
            updated_at=_when(row[11]),  # type: ignore[arg-type]
            validated_at=_when(row[12]),
            addenda=addenda,
            versions=versions,
        )

    # -- the draft --------------------------------------------------------------------------

    def save_draft(
        self,
        uid: str,
        viewer: Viewer,
        transaction_uid: str | None,
        chapters: Mapping[str, Any],
        reader_name: str | None = None,
    ) -> Report:
        """The holder saves the draft: the chapters sent replace those stored
        (the others are kept); the lease is extended."""
        clean = check_chapters(chapters)
        name = check_name(reader_name, viewer.name)
        current = self.load(uid)
        if current is not None and current.state == VALIDATED:
            raise ReportConflict(
                f"the report of {uid} is validated: it cannot change; add an addendum"
            )
        merged = {**(current.chapters if current else dict.fromkeys(CHAPTERS, "")), **clean}
        total = sum(len(t) for t in merged.values())
        if total > MAX_REPORT_CHARS:
            raise RequestInvalid({"report": f"{total} characters: at most {MAX_REPORT_CHARS}"})
        now = self.clock.now()
        with self.db.transaction() as db:
            request = self._held(uid, viewer, transaction_uid)
            changed = db.query_one(
                "UPDATE reports SET indications = ?, technique = ?, results = ?, conclusion = ?, "
                "reader = ?, reader_name = ?, updated_at = ? "
                "WHERE request_uid = ? AND state = ? RETURNING id",
                (*(merged[c] for c in CHAPTERS), viewer.name, name, now, uid, DRAFT),
            )
            if changed is None:
                if db.scalar("SELECT 1 FROM reports WHERE request_uid = ?", (uid,)):
                    raise ReportConflict(f"the report of {uid} is validated: it cannot change")
                db.execute(
                    f"INSERT INTO reports ({_REPORT}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        uid,
                        request.study_uid,
                        request.site,
                        viewer.name,
                        name,
                        *(merged[c] for c in CHAPTERS),
                        DRAFT,
                        now,
                        now,
                        None,
                    ),
                )
            report = self.load(uid, db)
        assert report is not None
        return report

    def validate(
        self,
        uid: str,
        viewer: Viewer,
        transaction_uid: str | None,
        reader_name: str | None = None,
    ) -> Report:
        """The holder signs the draft: see the module's docstring for what
        happens in the same transaction.  Every chapter must be written."""
        with self.db.transaction() as db:
            current = self.load(uid, db)
            if current is not None and current.state == VALIDATED:
                raise ReportConflict(f"the report of {uid} is validated already")
            self._held(uid, viewer, transaction_uid)  # C301 for a late holder, before 400s
            if current is None:
                raise NoReport(f"request {uid} has no draft report to validate")
            empty = {
                c: "mandatory to validate" for c in CHAPTERS if not current.chapters[c].strip()
            }
            if empty:
                raise RequestInvalid(empty)
            name = check_name(
                reader_name, current.reader_name if current.reader == viewer.name else viewer.name
            )
            request = self.worklist.complete(uid, viewer, transaction_uid)
            now = self.clock.now()
            db.execute(
                "UPDATE reports SET state = ?, reader = ?, reader_name = ?, validated_at = ?, "
                "updated_at = ? WHERE request_uid = ?",
                (VALIDATED, viewer.name, name, now, now, uid),
            )
            self._new_version(db, request, 0, viewer.name)
            report = self.load(uid, db)
        assert report is not None
        return report

    def _held(self, uid: str, viewer: Viewer, transaction_uid: str | None) -> ReadRequest:
        try:
            return self.worklist.holding(uid, viewer, transaction_uid)
        except UpsError as exc:
            if exc.code == "C310" and transaction_uid:
                raise UpsError(
                    "C301",
                    "this Transaction UID is no longer valid: the claim's lease passed and the "
                    "request went back to the worklist; claim it again",
                ) from None
            raise

    # -- addenda ----------------------------------------------------------------------------

    def add_addendum(
        self, uid: str, viewer: Viewer, text: Any, author_name: str | None = None
    ) -> AddendumRow:
        """A reader of the request's group adds an addendum draft to the
        validated report."""
        request = self.worklist.get(uid, viewer)
        if not viewer.reads_for(request.group):
            raise NotAllowed("only the readers of the request's group add addenda")
        if not isinstance(text, str) or not text.strip():
            raise RequestInvalid({"text": "the addendum's text is required"})
        if len(text) > MAX_TEXT_CHARS:
            raise RequestInvalid({"text": f"{len(text)} characters: at most {MAX_TEXT_CHARS}"})
        name = check_name(author_name, viewer.name)
        now = self.clock.now()
        with self.db.transaction() as db:
            report = self.load(uid, db)
            if report is None or report.state != VALIDATED or request.state != COMPLETED:
                raise ReportConflict(
                    f"the report of {uid} is not validated: change the draft instead"
                )
            if any(a.state == DRAFT for a in report.addenda):
                raise ReportConflict("an addendum draft is pending: validate it first")
            if len(report.addenda) >= MAX_ADDENDA:
                raise ReportConflict(f"a report has at most {MAX_ADDENDA} addenda")
            total = sum(map(len, report.chapters.values())) + sum(
                len(a.text) for a in report.addenda
            )
            if total + len(text) > MAX_REPORT_CHARS:
                limit = f"the report with its addenda would exceed {MAX_REPORT_CHARS} characters"
                raise RequestInvalid({"text": limit})
            number = len(report.addenda) + 1
            db.execute(
                f"INSERT INTO report_addenda (request_uid, {_ADDENDUM}, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (uid, number, text, viewer.name, name, DRAFT, now, None, now),
            )
        return AddendumRow(number, text, viewer.name, name, DRAFT, now, None)

    def validate_addendum(self, uid: str, number: int, viewer: Viewer) -> Report:
        """The addendum's author signs it: a new version, stored and delivered."""
        request = self.worklist.get(uid, viewer)
        if not viewer.reads_for(request.group):
            raise NotAllowed("only the readers of the request's group validate addenda")
        now = self.clock.now()
        with self.db.transaction() as db:
            row = db.query_one(
                "SELECT author, state FROM report_addenda WHERE request_uid = ? AND number = ?",
                (uid, number),
            )
            if row is None:
                raise NoReport(f"request {uid} has no addendum {number}")
            author, state = row
            if state == VALIDATED:
                raise ReportConflict(f"addendum {number} is validated already")
            if author != viewer.name:
                raise NotAllowed(f"addendum {number} is {author}'s: only its author signs it")
            db.execute(
                "UPDATE report_addenda SET state = ?, validated_at = ?, updated_at = ? "
                "WHERE request_uid = ? AND number = ?",
                (VALIDATED, now, now, uid, number),
            )
            self._new_version(db, request, number, viewer.name)
            report = self.load(uid, db)
        assert report is not None
        return report

    # -- versions ---------------------------------------------------------------------------

    def _new_version(self, db: Database, request: ReadRequest, version: int, by: str) -> None:
        """Fix the version's UIDs, keep its series out of the read routes,
        record the event and queue the job -- in the caller's transaction."""
        now = self.clock.now()
        uids = [generate_uid() for _ in range(4)]
        db.execute(
            "INSERT INTO report_versions (request_uid, version, sr_series_uid, sr_sop_uid, "
            "pdf_series_uid, pdf_sop_uid, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (request.uid, version, *uids, now),
        )
        for series in (uids[0], uids[2]):
            db.execute(
                "INSERT INTO read_outputs (series_uid, request_uid, created_at) VALUES (?, ?, ?)",
                (series, request.uid, now),
            )
        record(
            db,
            [
                EventRow(
                    REPORT_VALIDATED,
                    site=request.site,
                    study_uid=request.study_uid,
                    detail={
                        "request": request.uid,
                        "version": version,
                        "validated_by": by,
                        "sr": {"series_uid": uids[0], "sop_instance_uid": uids[1]},
                        "pdf": {"series_uid": uids[2], "sop_instance_uid": uids[3]},
                        # whom the sharing portal gives the study to (the patient's GP)
                        "share_with": [a for a in [request.fields.get("gp_address")] if a],
                    },
                )
            ],
            at=now,
        )
        JobQueue(db).enqueue(
            JOB_KIND,
            {"request": request.uid, "version": version},
            dedupe_key=f"report:{request.uid}:{version}",
        )


def content_of(report: Report, request: ReadRequest, version: int) -> ReportContent:
    """The documents' view of ``version`` of ``report``: the chapters, the
    reader's signature, the validated addenda 1..version."""
    if report.validated_at is None:
        raise ValueError(f"the report of {report.request_uid} is not validated")
    addenda: Sequence[AddendumRow] = [
        a for a in report.addenda if a.number <= version and a.state == VALIDATED
    ]
    if len(addenda) != version:
        raise ValueError(f"version {version} of {report.request_uid} is not validated")
    fields = {**request.fields, "requesting_site": request.site, "priority": request.priority}
    return ReportContent(
        **report.chapters,
        signed=Signed(report.reader_name, report.reader, report.validated_at),
        request={k: v for k, v in fields.items() if isinstance(v, str)},
        addenda=tuple(
            Addendum(a.text, Signed(a.author_name, a.author, a.validated_at))  # type: ignore[arg-type]
            for a in addenda
        ),
        request_uid=request.uid,
    )
