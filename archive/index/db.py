"""One thin layer over sqlite3 and psycopg 3 so the rest of the index is plain SQL.

SQL is written once with ``?`` placeholders; for PostgreSQL they become ``%s``.
Each thread gets its own connection (sqlite3 connections must not cross
threads; psycopg ones must not be used concurrently), and writes happen in
explicit transactions so that an instance's rows commit together or not at all.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

TYPES = {
    "sqlite": {
        "pk": "INTEGER PRIMARY KEY",
        "ref": "INTEGER",
        "bigint": "INTEGER",
        "blob": "BLOB",
        "timestamp": "TEXT",
    },
    "postgresql": {
        "pk": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "ref": "BIGINT",
        "bigint": "BIGINT",
        "blob": "BYTEA",
        "timestamp": "TIMESTAMPTZ",
    },
}

_PLACEHOLDER = re.compile(r"\?")


def utcnow() -> datetime:
    return datetime.now(UTC)


class IndexError_(Exception):
    """The index database failed or is unreachable."""


class Database:
    """A connection factory for one index URL, with per-thread connections."""

    def __init__(self, url: str) -> None:
        self.url = url
        scheme = urlsplit(url).scheme
        if scheme == "sqlite":
            self.dialect = "sqlite"
            if not url.startswith("sqlite:///") or url == "sqlite:///":
                raise ValueError(f"bad SQLite URL {url!r}: use sqlite:///absolute/path.db")
            self.path: Path | None = Path(url[len("sqlite://") :])
        elif scheme in ("postgresql", "postgres"):
            self.dialect = "postgresql"
            self.path = None
        else:
            raise ValueError(f"unsupported index URL {url!r}: use sqlite:/// or postgresql://")
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    # -- connections ------------------------------------------------------------

    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=60, check_same_thread=False
            )
            # WAL lets readers run during writes; synchronous=FULL makes every
            # commit durable before we tell a sender its instance is stored.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=60000")
            # LIKE is case-sensitive as DICOM wildcard matching is (names are
            # matched on an upper-cased column), and prefix LIKEs use indexes.
            conn.execute("PRAGMA case_sensitive_like=ON")
        else:
            try:
                conn = psycopg.connect(self.url, autocommit=True)
            except psycopg.OperationalError as exc:
                raise IndexError_(
                    f"cannot connect to the index at {_safe(self.url)}: {exc}"
                ) from None
        with self._lock:
            self._all.append(conn)
        return conn

    @property
    def conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or (self.dialect == "postgresql" and conn.closed):
            conn = self._connect()
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            self._all.clear()
        self._local = threading.local()

    # -- statements -------------------------------------------------------------

    def sql(self, text: str) -> str:
        """Translate ``?`` placeholders and type tokens for this dialect."""
        if self.dialect == "postgresql":
            text = _PLACEHOLDER.sub("%s", text)
        return text

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.sql(sql), _adapt(params, self.dialect))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return list(self.execute(sql, params).fetchall())

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        return self.execute(sql, params).fetchone()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.query_one(sql, params)
        return None if row is None else row[0]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        adapted = [_adapt(r, self.dialect) for r in rows]
        if self.dialect == "sqlite":
            self.conn.executemany(self.sql(sql), adapted)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self.sql(sql), adapted)

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """A write transaction: everything inside commits together or not at all."""
        conn = self.conn
        if self.dialect == "sqlite":
            # IMMEDIATE takes the write lock up front, so two writers queue on
            # busy_timeout instead of failing with a deadlock on lock upgrade.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        else:
            with conn.transaction():
                yield self


def _adapt(params: Sequence[Any], dialect: str) -> Sequence[Any]:
    if dialect != "sqlite":
        return params
    return [p.isoformat() if isinstance(p, datetime) else p for p in params]


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def open_database(url: str) -> Database:
    """Open (lazily connect to) the index database at ``url``."""
    return Database(url)
