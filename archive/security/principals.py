"""Users, service accounts and their API tokens, kept in the index.

Tokens are ``imag_`` followed by 43 characters of a 256-bit random secret,
shown once when created.  Only their SHA-256 is stored: a stolen index does
not give working tokens, and a lookup is one indexed equality.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from archive.index.db import Database, utcnow
from archive.security.roles import KINDS, Principal, role_names

TOKEN_PREFIX = "imag_"


class AuthError(Exception):
    """A credential that does not authenticate; ``reason`` says why (for the
    audit trail and the 401 answer)."""

    def __init__(self, reason: str, subject: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.subject = subject


class PrincipalError(ValueError):
    """A user or token command that cannot be done as asked."""


@dataclass(frozen=True)
class Account:
    """A stored user or service account."""

    id: int
    name: str
    kind: str
    role: str
    sites: tuple[str, ...]
    groups: tuple[str, ...]
    disabled: bool
    created_at: str

    def principal(self, via: str) -> Principal:
        return Principal(self.name, self.role, self.kind, self.sites, self.groups, via=via)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "role": self.role,
            "sites": list(self.sites),
            "groups": list(self.groups),
            "disabled": self.disabled,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, without its secret."""

    id: int
    owner: str
    name: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _when(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


_COLUMNS = ("id", "name", "kind", "role", "sites", "groups", "disabled", "created_at")
_ACCOUNT = f"SELECT {', '.join(_COLUMNS)} FROM principals"


def _account(row: tuple) -> Account:
    return Account(
        int(row[0]),
        row[1],
        row[2],
        row[3],
        tuple(json.loads(row[4])),
        tuple(json.loads(row[5])),
        bool(row[6]),
        _text(row[7]) or "",
    )


class Principals:
    """Create, list, disable and authenticate users, service accounts and tokens."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- accounts -------------------------------------------------------------------

    def add(
        self,
        name: str,
        role: str,
        *,
        kind: str = "user",
        sites: tuple[str, ...] | list[str] = (),
        groups: tuple[str, ...] | list[str] = (),
    ) -> Account:
        name = name.strip()
        if not name or len(name) > 128:
            raise PrincipalError("a name of 1-128 characters is required")
        if role not in role_names():
            raise PrincipalError(f"unknown role {role!r}: one of {', '.join(role_names())}")
        if kind not in KINDS:
            raise PrincipalError(f"kind must be one of {', '.join(KINDS)}")
        if self.get(name) is not None:
            raise PrincipalError(f"{name!r} already exists")
        self.db.execute(
            "INSERT INTO principals (name, kind, role, sites, groups, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (name, kind, role, json.dumps(list(sites)), json.dumps(list(groups)), utcnow()),
        )
        account = self.get(name)
        assert account is not None
        return account

    def create_first_admin(self, token_name: str, keep: Callable[[str], None]) -> str | None:
        """Create the ``admin`` user and a token for it, atomically: when several
        nodes start at once on a fresh index exactly one creates it (a unique name
        and ``ON CONFLICT``, not check-then-insert).  ``keep(secret)`` runs inside
        the transaction (it writes the token file), so a failure to keep the
        secret leaves no admin behind whose token nobody has.  Returns the
        secret, or None when the account existed already."""
        with self.db.transaction():
            row = self.db.query_one(
                "INSERT INTO principals (name, kind, role, sites, groups, created_at) "
                "VALUES ('admin', 'user', 'admin', '[]', '[]', ?) "
                "ON CONFLICT (name) DO NOTHING RETURNING id",
                (utcnow(),),
            )
            if row is None:
                return None
            secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
            self.db.execute(
                "INSERT INTO tokens (principal_ref, name, token_hash, created_at) "
                "VALUES (?, ?, ?, ?)",
                (int(row[0]), token_name, hash_token(secret), utcnow()),
            )
            keep(secret)
        return secret

    def get(self, name: str) -> Account | None:
        row = self.db.query_one(_ACCOUNT + " WHERE name = ?", (name,))
        return _account(row) if row else None

    def list(self) -> list[Account]:
        return [_account(r) for r in self.db.query(_ACCOUNT + " ORDER BY name")]

    def count(self) -> int:
        return int(self.db.scalar("SELECT COUNT(*) FROM principals"))

    def set_disabled(self, name: str, disabled: bool) -> Account:
        if self.get(name) is None:
            raise PrincipalError(f"no user or service account named {name!r}")
        self.db.execute(
            "UPDATE principals SET disabled = ? WHERE name = ?", (1 if disabled else 0, name)
        )
        account = self.get(name)
        assert account is not None
        return account

    # -- tokens ---------------------------------------------------------------------

    def create_token(
        self, owner: str, name: str = "", expires_in: timedelta | None = None
    ) -> tuple[TokenInfo, str]:
        """A new token for ``owner``; returns its record and the secret (shown once)."""
        account = self.get(owner)
        if account is None:
            raise PrincipalError(f"no user or service account named {owner!r}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        expires = now + expires_in if expires_in else None
        with self.db.transaction():
            row = self.db.query_one(
                "INSERT INTO tokens (principal_ref, name, token_hash, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (account.id, name or "token", hash_token(secret), now, expires),
            )
        assert row is not None
        return self.token(int(row[0])), secret

    _TOKEN = (
        "SELECT t.id, p.name, t.name, t.created_at, t.expires_at, t.revoked_at, "
        "t.last_used_at FROM tokens t JOIN principals p ON p.id = t.principal_ref"
    )

    def token(self, token_id: int) -> TokenInfo:
        row = self.db.query_one(self._TOKEN + " WHERE t.id = ?", (token_id,))
        if row is None:
            raise PrincipalError(f"no token with id {token_id}")
        return TokenInfo(int(row[0]), row[1], row[2], *(_text(v) for v in row[3:]))

    def tokens(self, owner: str | None = None) -> list[TokenInfo]:
        sql, params = self._TOKEN, []
        if owner:
            sql += " WHERE p.name = ?"
            params.append(owner)
        rows = self.db.query(sql + " ORDER BY t.id", params)
        return [TokenInfo(int(r[0]), r[1], r[2], *(_text(v) for v in r[3:])) for r in rows]

    def revoke(self, token_id: int) -> TokenInfo:
        info = self.token(token_id)
        if info.revoked_at is None:
            self.db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", (utcnow(), token_id))
        return self.token(token_id)

    def authenticate(self, secret: str) -> Principal:
        """The principal an API token stands for; AuthError says why not."""
        # the token and its account in one read: a round trip to the index
        # per request fewer than two (every token-authenticated request pays it)
        row = self.db.query_one(
            "SELECT t.id, t.name, t.expires_at, t.revoked_at, t.last_used_at, "
            + ", ".join(f"p.{column}" for column in _COLUMNS)
            + " FROM tokens t JOIN principals p ON p.id = t.principal_ref WHERE t.token_hash = ?",
            (hash_token(secret),),
        )
        if row is None:
            raise AuthError("unknown API token")
        token_id, token_name, expires, revoked, last_used = row[:5]
        account = _account(row[5:])
        if revoked is not None:
            raise AuthError(f"token {token_name!r} was revoked", account.name)
        expiry = _when(expires)
        now = utcnow()
        if expiry is not None and expiry <= now:
            raise AuthError(f"token {token_name!r} expired at {expiry.isoformat()}", account.name)
        if account.disabled:
            raise AuthError(f"account {account.name!r} is disabled", account.name)
        used = _when(last_used)
        if used is None or now - used > timedelta(minutes=1):  # not a write per request
            self.db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, token_id))
        return account.principal(via=f"token:{token_name}")

    # -- reading groups ---------------------------------------------------------------

    def grant_group(self, group: str, study_uids: list[str]) -> int:
        """Route studies to a reading group: its members see them.  Returns how
        many grants are new."""
        added = 0
        for uid in study_uids:
            if self.db.scalar(
                "SELECT 1 FROM study_groups WHERE group_name = ? AND study_uid = ?", (group, uid)
            ):
                continue
            self.db.execute(
                "INSERT INTO study_groups (study_uid, group_name, granted_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (uid, group, utcnow()),
            )
            added += 1
        return added

    def revoke_group(self, group: str, study_uids: list[str]) -> None:
        for uid in study_uids:
            self.db.execute(
                "DELETE FROM study_groups WHERE group_name = ? AND study_uid = ?", (group, uid)
            )
