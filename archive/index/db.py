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
    """A pool of connections to one index URL.

    Work is done on a connection borrowed for one statement, or for the whole
    of a :meth:`transaction` (statements issued inside it on the same thread
    use its connection).  Connections go back to the pool, so thousands of
    short-lived association threads share a handful of connections instead of
    each leaving one open.
    """

    def __init__(self, url: str, max_idle: int = 8) -> None:
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
        self.max_idle = max_idle
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._local = threading.local()

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
            return conn
        try:
            return psycopg.connect(self.url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise IndexError_(f"cannot connect to the index at {_safe(self.url)}: {exc}") from None

    def _usable(self, conn: Any) -> bool:
        return self.dialect == "sqlite" or not (conn.closed or conn.broken)

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """Borrow a connection (the transaction's own, inside a transaction)."""
        current = getattr(self._local, "conn", None)
        if current is not None:
            yield current
            return
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or not self._usable(conn):
            conn = self._connect()
        try:
            yield conn
        finally:
            self._release(conn)

    def _release(self, conn: Any) -> None:
        if self._usable(conn):
            with self._lock:
                if len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    return
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    # -- statements -------------------------------------------------------------

    def sql(self, text: str) -> str:
        """Translate ``?`` placeholders for this dialect."""
        if self.dialect == "postgresql":
            text = _PLACEHOLDER.sub("%s", text)
        return text

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self.connection() as conn:
            conn.execute(self.sql(sql), _adapt(params, self.dialect))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.connection() as conn:
            return list(conn.execute(self.sql(sql), _adapt(params, self.dialect)).fetchall())

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        with self.connection() as conn:
            return conn.execute(self.sql(sql), _adapt(params, self.dialect)).fetchone()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.query_one(sql, params)
        return None if row is None else row[0]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        adapted = [_adapt(r, self.dialect) for r in rows]
        with self.connection() as conn:
            if self.dialect == "sqlite":
                conn.executemany(self.sql(sql), adapted)
            else:
                with conn.cursor() as cur:
                    cur.executemany(self.sql(sql), adapted)

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """A write transaction: everything inside commits together or not at all."""
        if getattr(self._local, "conn", None) is not None:
            raise RuntimeError("transactions do not nest")
        with self.connection() as conn:
            self._local.conn = conn
            try:
                if self.dialect == "sqlite":
                    # IMMEDIATE takes the write lock up front, so two writers queue
                    # on busy_timeout instead of failing on lock upgrade.
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
            finally:
                self._local.conn = None


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
