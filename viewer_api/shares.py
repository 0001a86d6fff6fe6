"""Share links: a capability to open one study (or some of its series)
without an account, for a GP or a patient.

A share is a random secret of 256 bits (``secrets.token_urlsafe(32)``) shown
once, when it is created; the index keeps only its SHA-256, so a copy of the
index opens nothing.  The secret stands for a principal of its own (kind
``share``, role ``share-viewer`` or ``share-download``) whose scope is
narrowed to the shared study and series (:class:`archive.security.scope.Scope`):
every route that honours scopes honours shares, with no share-specific code.

A link may ask for a second factor (the patient's birth date as the index
has it, or a one-time code mailed to the link's recipient); wrong answers
count, and after ``sharing.max_attempts`` the link is locked for good (its
creator makes a new one).  Sessions (the browser's cookie) are what a link's
secret is exchanged for on first use; their ids are hashed too.

This module is the domain: rows, rules and their messages.  HTTP lives in
:mod:`viewer_api.shares_http` and :mod:`viewer_api.share_pages`, the
authenticators in :mod:`viewer_api.share_auth`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from archive.index.db import Database
from archive.retrieve import locate
from archive.security.roles import Principal
from archive.uids import is_valid_uid

AUDIENCES = ("gp", "patient", "other")
PERMISSIONS = ("view", "download")
FACTORS = ("birth_date", "code")
#: the role of a share principal, by whether it may download
VIEWER, DOWNLOADER = "share-viewer", "share-download"
#: the permission the ZIP download route requires
DOWNLOAD = "shares.download"
#: the permission to create (and list, revoke one's own) shares
CREATE = "shares.create"
#: the longest lifetime a link may be given
MAX_DAYS = 3 * 366
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")
_COLUMNS = (
    "id, study_uid, series, permissions, audience, not_before, expires_at, second_factor, "
    "recipient, failures, locked_at, revoked_at, revoked_by, last_used_at, uses, created_by, "
    "created_site, created_at"
)


class ShareError(Exception):
    """A request about shares that cannot be done; ``status`` for HTTP."""

    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidShare(ShareError):
    """Malformed input: nothing is stored."""


class ShareNotFound(ShareError):
    """No such share, or not one the caller may see (the same answer)."""

    status = 404


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like_secret(credential: str) -> bool:
    """The form of a share secret: 43 URL-safe characters, never an API token's
    ``imag_`` prefix nor a JWT's dots (how the bearer authenticator tells them apart)."""
    return bool(_SECRET.match(credential)) and not credential.startswith("imag_")


def when(value: Any) -> datetime | None:
    """A timestamp as the index returns it (text on SQLite), as a datetime."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


@dataclass(frozen=True)
class Share:
    """One share link (never its secret)."""

    id: int
    study_uid: str
    series: tuple[str, ...] | None
    permissions: tuple[str, ...]
    audience: str
    not_before: datetime
    expires_at: datetime
    second_factor: str | None
    recipient: str | None
    failures: int
    locked_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None
    last_used_at: datetime | None
    uses: int
    created_by: str
    created_site: str
    created_at: datetime

    @property
    def role(self) -> str:
        return DOWNLOADER if "download" in self.permissions else VIEWER

    @property
    def name(self) -> str:
        """The principal name the share acts as in the audit trail."""
        return f"share:{self.id}"

    @property
    def ask(self) -> str:
        """Whom to ask for a new link."""
        return f"{self.created_by} ({self.created_site})" if self.created_site else self.created_by

    def principal(self, via: str) -> Principal:
        """The capability as a principal: this study, only these series."""
        return Principal(
            self.name,
            self.role,
            kind="share",
            via=via,
            studies=(self.study_uid,),
            series=self.series or (),
        )

    def refusal(self, now: datetime) -> LinkRefused | None:
        """Why the link cannot be used now (None: it can)."""
        if self.revoked_at is not None:
            return LinkRefused(
                "revoked",
                410,
                f"this link was revoked on {self.revoked_at:%Y-%m-%d}; "
                f"ask {self.ask} for a new one",
            )
        if self.locked_at is not None:
            return LinkRefused(
                "locked",
                423,
                f"this link is locked after {self.failures} wrong answers; "
                f"ask {self.ask} for a new one",
            )
        if now >= self.expires_at:
            return LinkRefused(
                "expired",
                410,
                f"this link expired on {self.expires_at:%Y-%m-%d}; ask {self.ask} for a new one",
            )
        if now < self.not_before:
            return LinkRefused(
                "not-yet-valid",
                403,
                f"this link opens on {self.not_before:%Y-%m-%d %H:%M} UTC",
            )
        return None

    def as_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "id": self.id,
            "study_uid": self.study_uid,
            "series": list(self.series) if self.series is not None else None,
            "permissions": list(self.permissions),
            "audience": self.audience,
            "not_before": iso(self.not_before),
            "expires_at": iso(self.expires_at),
            "second_factor": self.second_factor,
            "recipient": self.recipient,
            "failures": self.failures,
            "locked_at": iso(self.locked_at),
            "revoked_at": iso(self.revoked_at),
            "revoked_by": self.revoked_by,
            "last_used_at": iso(self.last_used_at),
            "uses": self.uses,
            "created_by": self.created_by,
            "created_site": self.created_site,
            "created_at": iso(self.created_at),
        }


class LinkRefused(ShareError):
    """A link that exists but cannot be used: ``reason`` is revoked, locked,
    expired or not-yet-valid (or second-factor, for a bearer)."""

    def __init__(self, reason: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status


def _share(row: tuple) -> Share:
    return Share(
        id=int(row[0]),
        study_uid=row[1],
        series=tuple(json.loads(row[2])) if row[2] is not None else None,
        permissions=tuple(json.loads(row[3])),
        audience=row[4],
        not_before=when(row[5]),  # type: ignore[arg-type]
        expires_at=when(row[6]),  # type: ignore[arg-type]
        second_factor=row[7],
        recipient=row[8],
        failures=int(row[9]),
        locked_at=when(row[10]),
        revoked_at=when(row[11]),
        revoked_by=row[12],
        last_used_at=when(row[13]),
        uses=int(row[14]),
        created_by=row[15],
        created_site=row[16],
        created_at=when(row[17]),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Request:
    """What a creator asks for (validated by :func:`create`)."""

    study_uid: str
    series: tuple[str, ...] | None = None
    permissions: tuple[str, ...] = ("view",)
    audience: str = "gp"
    expires_at: datetime | None = None
    days: float | None = None
    not_before: datetime | None = None
    second_factor: str | None = None
    recipient: str | None = None


def _check(request: Request, config: Any, now: datetime) -> tuple[datetime, datetime]:
    """(not_before, expires_at) of a valid request; InvalidShare says what is wrong."""
    if not isinstance(request.study_uid, str) or not is_valid_uid(request.study_uid):
        raise InvalidShare("study_uid must be a valid UID")
    if request.series is not None:
        if not request.series or len(request.series) > 1000:
            raise InvalidShare("series must list 1 to 1000 series UIDs (or be left out)")
        for uid in request.series:
            if not isinstance(uid, str) or not is_valid_uid(uid):
                raise InvalidShare(f"series: {uid!r} is not a valid UID")
    if not request.permissions or set(request.permissions) - set(PERMISSIONS):
        raise InvalidShare(f"permissions must be among {list(PERMISSIONS)}")
    if "view" not in request.permissions:
        raise InvalidShare("permissions must include 'view'")
    if request.audience not in AUDIENCES:
        raise InvalidShare(f"audience must be one of {list(AUDIENCES)}")
    if request.second_factor is not None and request.second_factor not in FACTORS:
        raise InvalidShare(f"second_factor must be one of {list(FACTORS)}")
    if request.recipient is not None:
        from archive.messaging.message import InvalidMessage, check_address

        try:
            check_address(request.recipient)
        except InvalidMessage as exc:
            raise InvalidShare(f"recipient: {exc}") from exc
    if request.second_factor == "code" and not request.recipient:
        raise InvalidShare("a one-time code is mailed to the recipient: name one")
    not_before = request.not_before or now
    if request.expires_at is not None and request.days is not None:
        raise InvalidShare("give expires_at or days, not both")
    if request.expires_at is not None:
        expires = request.expires_at
    else:
        days = request.days
        if days is None:
            days = config[f"sharing.{request.audience}_days"]
        if not 0 < days <= MAX_DAYS:
            raise InvalidShare(f"days must be more than 0 and at most {MAX_DAYS}")
        expires = not_before + timedelta(days=days)
    for value, name in ((not_before, "not_before"), (expires, "expires_at")):
        if value.tzinfo is None:
            raise InvalidShare(f"{name} must carry a time zone offset")
    if expires <= not_before or expires <= now:
        raise InvalidShare("expires_at must be after not_before and in the future")
    if expires - now > timedelta(days=MAX_DAYS):
        raise InvalidShare(f"a link lives at most {MAX_DAYS} days")
    return not_before, expires


def create(
    archive: Any, creator: Principal, request: Request, *, site: str | None = None
) -> tuple[Share, str]:
    """A new share of what ``request`` names, made by ``creator``; returns it
    and its secret (which is not stored: show it once).

    Only what the creator can see may be shared: a study (or series) outside
    its scope is :class:`ShareNotFound`, as if it did not exist."""
    db: Database = archive.db
    now = db.clock.now()
    not_before, expires = _check(request, archive.config, now)
    keys = {"StudyInstanceUID": request.study_uid}
    if not locate(db, "STUDY", keys, creator.scope)[:1]:
        raise ShareNotFound(f"no study {request.study_uid} here")
    if request.series is not None:
        found = {
            str(row[0])
            for row in db.query(
                "SELECT se.series_uid FROM series se JOIN studies st ON st.id = se.study_ref "
                "WHERE st.study_uid = ?",
                (request.study_uid,),
            )
        }
        missing = sorted(set(request.series) - found)
        if missing:
            raise ShareNotFound(f"no series {missing[0]} in study {request.study_uid}")
    secret = secrets.token_urlsafe(32)
    while not looks_like_secret(secret):  # one in 2^30: an "imag_" start
        secret = secrets.token_urlsafe(32)
    if site is None:
        site = creator.sites[0] if creator.sites else ""
    with joined(db):
        row = db.query_one(
            "INSERT INTO shares (secret_hash, study_uid, series, permissions, audience, "
            "not_before, expires_at, second_factor, recipient, created_by, created_site, "
            "created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                digest(secret),
                request.study_uid,
                json.dumps(sorted(set(request.series))) if request.series is not None else None,
                json.dumps([p for p in PERMISSIONS if p in request.permissions]),
                request.audience,
                not_before,
                expires,
                request.second_factor,
                request.recipient,
                creator.name,
                site,
                now,
            ),
        )
    assert row is not None
    share = get(db, int(row[0]))
    assert share is not None
    return share, secret


@contextmanager
def joined(db: Database) -> Iterator[Database]:
    """A transaction, or the caller's when this thread is in one (a subscriber's)."""
    if db.in_transaction():
        yield db
        return
    with db.transaction():
        yield db


def get(db: Database, share_id: int) -> Share | None:
    row = db.query_one(f"SELECT {_COLUMNS} FROM shares WHERE id = ?", (share_id,))
    return _share(row) if row else None


def by_secret(db: Database, secret: str) -> Share | None:
    """The share a secret opens (None: no such link)."""
    if not looks_like_secret(secret):
        return None
    row = db.query_one(f"SELECT {_COLUMNS} FROM shares WHERE secret_hash = ?", (digest(secret),))
    return _share(row) if row else None


def visible(principal: Principal, share: Share) -> bool:
    """Whether ``principal`` may see (and revoke) ``share``: its creator, or an admin."""
    return principal.role == "admin" or share.created_by == principal.name


def of(db: Database, principal: Principal, share_id: int) -> Share:
    """The share ``principal`` may see; ShareNotFound otherwise (same answer)."""
    share = get(db, share_id)
    if share is None or not visible(principal, share):
        raise ShareNotFound(f"no share {share_id} of yours")
    return share


def listing(db: Database, principal: Principal, limit: int = 1000) -> list[Share]:
    """The creator's shares (an admin's: everyone's), newest first."""
    if principal.role == "admin":
        rows = db.query(f"SELECT {_COLUMNS} FROM shares ORDER BY id DESC LIMIT ?", (limit,))
    else:
        rows = db.query(
            f"SELECT {_COLUMNS} FROM shares WHERE created_by = ? ORDER BY id DESC LIMIT ?",
            (principal.name, limit),
        )
    return [_share(r) for r in rows]


def revoke(db: Database, principal: Principal, share_id: int) -> Share:
    """Revoke a share at once: its secret, its sessions and bearer uses stop
    working on their next request (each request checks the share)."""
    share = of(db, principal, share_id)
    if share.revoked_at is None:
        db.execute(
            "UPDATE shares SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL",
            (db.clock.now(), principal.name, share_id),
        )
    revoked = get(db, share_id)
    assert revoked is not None
    return revoked


# -- use -----------------------------------------------------------------------------------


def log_access(db: Database, share: Share, address: str, what: str, outcome: str) -> None:
    """One line of the link's access log (read by its creator)."""
    db.execute(
        "INSERT INTO share_accesses (share_ref, at, address, what, outcome) VALUES (?, ?, ?, ?, ?)",
        (share.id, db.clock.now(), address[:200], what, outcome),
    )


def accesses(db: Database, share: Share, limit: int = 1000) -> list[dict[str, Any]]:
    rows = db.query(
        "SELECT at, address, what, outcome FROM share_accesses WHERE share_ref = ? "
        "ORDER BY id DESC LIMIT ?",
        (share.id, limit),
    )
    return [
        {"at": when(r[0]).isoformat(), "address": r[1], "what": r[2], "outcome": r[3]}  # type: ignore[union-attr]
        for r in rows
    ]


def touch(db: Database, share: Share, *, opened: bool) -> None:
    """Record a use: ``opened`` (a link exchanged for a session, a factor
    passed) counts; other uses refresh last_used_at at most once a minute."""
    now = db.clock.now()
    if opened:
        db.execute(
            "UPDATE shares SET uses = uses + 1, last_used_at = ? WHERE id = ?", (now, share.id)
        )
    elif share.last_used_at is None or now - share.last_used_at > timedelta(minutes=1):
        db.execute("UPDATE shares SET last_used_at = ? WHERE id = ?", (now, share.id))


def open_session(db: Database, share: Share) -> str:
    """A new browser session on ``share``; returns its id (the cookie's value).
    It starts pending when the link asks for a second factor."""
    session = secrets.token_urlsafe(32)
    now = db.clock.now()
    db.execute(
        "INSERT INTO share_sessions (session_hash, share_ref, verified, created_at, last_seen_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (digest(session), share.id, 0 if share.second_factor else 1, now, now),
    )
    return session


@dataclass(frozen=True)
class Session:
    id: int
    share: Share
    verified: bool
    created_at: datetime
    last_seen_at: datetime


def session(db: Database, session_id: str, config: Any) -> Session | None:
    """The live session a cookie names (None: unknown, idle too long, or past
    its maximum age)."""
    if not _SECRET.match(session_id or ""):
        return None
    row = db.query_one(
        "SELECT id, share_ref, verified, created_at, last_seen_at FROM share_sessions "
        "WHERE session_hash = ?",
        (digest(session_id),),
    )
    if row is None:
        return None
    now = db.clock.now()
    created, seen = when(row[3]), when(row[4])
    assert created is not None and seen is not None
    if now - seen > timedelta(minutes=config["sharing.session_minutes"]):
        return None
    if now - created > timedelta(hours=config["sharing.session_max_hours"]):
        return None
    share = get(db, int(row[1]))
    assert share is not None
    if now - seen > timedelta(seconds=30):
        db.execute("UPDATE share_sessions SET last_seen_at = ? WHERE id = ?", (now, row[0]))
    return Session(int(row[0]), share, bool(row[2]), created, seen)


# -- second factor --------------------------------------------------------------------------


def _code_digest(share: Share, code: str) -> str:
    return digest(f"{share.id}:{code}")


def new_code(db: Database, share: Share, config: Any) -> str:
    """A fresh 8-digit one-time code for ``share`` (replacing any earlier
    one), valid ``sharing.code_minutes``; returns it to be mailed."""
    code = f"{secrets.randbelow(10**8):08d}"
    expires = db.clock.now() + timedelta(minutes=config["sharing.code_minutes"])
    db.execute(
        "UPDATE shares SET code_hash = ?, code_expires_at = ? WHERE id = ?",
        (_code_digest(share, code), expires, share.id),
    )
    return code


def birth_date_of(db: Database, study_uid: str) -> str | None:
    """The patient's birth date as the index has it (YYYYMMDD)."""
    value = db.scalar(
        "SELECT p.birth_date FROM studies st JOIN patients p ON p.id = st.patient_ref "
        "WHERE st.study_uid = ?",
        (study_uid,),
    )
    return str(value) if value else None


def normalise_date(answer: str) -> str:
    """YYYYMMDD from what a person types: 1961-03-07, 07/03/1961, 19610307."""
    text = answer.strip()
    for pattern, order in (
        (r"^(\d{4})-?(\d{2})-?(\d{2})$", (1, 2, 3)),
        (r"^(\d{1,2})[/.\- ](\d{1,2})[/.\- ](\d{4})$", (3, 2, 1)),
    ):
        found = re.match(pattern, text)
        if found:
            y, m, d = (found.group(i) for i in order)
            return f"{y}{int(m):02d}{int(d):02d}"
    return ""


@dataclass(frozen=True)
class Verdict:
    """The outcome of a second-factor answer."""

    ok: bool
    remaining: int
    locked: bool


def answer(db: Database, session_row: Session, given: str, config: Any) -> Verdict:
    """Check a second-factor answer for a pending session, in one transaction:
    right -> the session is verified (a code is spent); wrong -> one more
    failure, and the link locks at ``sharing.max_attempts``."""
    limit = config["sharing.max_attempts"]
    with db.transaction():
        share = get(db, session_row.share.id)
        assert share is not None
        now = db.clock.now()
        ok = False
        if share.second_factor == "birth_date":
            expected = birth_date_of(db, share.study_uid)
            ok = bool(expected) and normalise_date(given) == expected
        elif share.second_factor == "code":
            row = db.query_one(
                "SELECT code_hash, code_expires_at FROM shares WHERE id = ?", (share.id,)
            )
            assert row is not None
            expires = when(row[1])
            ok = (
                row[0] is not None
                and expires is not None
                and now < expires
                and secrets.compare_digest(row[0], _code_digest(share, given.strip()))
            )
            if ok:  # one use
                db.execute(
                    "UPDATE shares SET code_hash = NULL, code_expires_at = NULL WHERE id = ?",
                    (share.id,),
                )
        if ok:
            db.execute("UPDATE share_sessions SET verified = 1 WHERE id = ?", (session_row.id,))
            db.execute("UPDATE shares SET failures = 0 WHERE id = ?", (share.id,))
            return Verdict(True, limit, False)
        failures = share.failures + 1
        locked = failures >= limit
        db.execute(
            "UPDATE shares SET failures = ?, locked_at = ? WHERE id = ?",
            (failures, now if locked else None, share.id),
        )
        return Verdict(False, max(limit - failures, 0), locked)


# -- per-address rate --------------------------------------------------------------------


def hit(db: Database, address: str, limit: int) -> int:
    """Count one request from ``address`` in this minute, for every process
    on this index at once (an atomic upsert); returns the seconds to wait when
    it is over ``limit`` (0: go on)."""
    now = db.clock.now()
    stamp = int(now.timestamp())
    window = stamp - stamp % 60
    with joined(db):
        hits = db.scalar(
            "INSERT INTO share_rate (address, window_start, hits) VALUES (?, ?, 1) "
            "ON CONFLICT (address, window_start) DO UPDATE SET hits = share_rate.hits + 1 "
            "RETURNING hits",
            (address[:200], window),
        )
    if stamp % 60 == 0:  # now and then, forget past windows
        db.execute("DELETE FROM share_rate WHERE window_start < ?", (window - 120,))
    if int(hits) > limit:
        return window + 60 - stamp
    return 0
