"""One thin layer over sqlite3 and psycopg 3 so the rest of the index is plain SQL.

SQL is written once with ``?`` placeholders; for PostgreSQL they become ``%s``.
Each thread gets its own connection (sqlite3 connections must not cross
threads; psycopg ones must not be used concurrently), and writes happen in
explicit transactions so that an instance's rows commit together or not at all.

Pooled PostgreSQL connections heal: one whose backend is gone (terminated,
server restarted, fail-over) is found dead before it is used and replaced,
with every other idle one; a read that loses its connection is run once more;
BEGIN is sent again on a fresh connection.  Nothing that may have committed
is ever repeated (a write in autocommit mode, a COMMIT): its error goes to the
caller.
"""

from __future__ import annotations

import logging
import re
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from prometheus_client import Counter
from psycopg.pq import TransactionStatus

from archive.clock import Clock, SystemClock
from archive.index.names import fold

log = logging.getLogger(__name__)

INDEX_CONNECTIONS_REPLACED = Counter(
    "imag_index_connections_replaced_total",
    "Index connections found dead (server restart, terminated backend) and replaced",
    ["when"],
)
INDEX_READS_RETRIED = Counter(
    "imag_index_reads_retried_total",
    "Reads run again on a fresh connection after theirs was lost",
)

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


def _NOTHING(cursor: Any) -> None:  # noqa: N802 - a constant: the fetch of a statement not read
    return None


@dataclass(frozen=True)
class CountedWrite:
    """A write that a read carries in its own statement on PostgreSQL (a
    data-modifying ``WITH``): the CTE ``found`` has a row per row the read
    returns (its rows; for a page of a search, the page's ids), and ``sql``
    (an INSERT, ``?`` placeholders for ``params``) may use
    ``(SELECT count(*) FROM found)``.  Both commit together, durably, before
    the rows reach the caller: one round trip instead of the read and then
    the write (the audit entry of a search, which names its result count)."""

    sql: str
    params: tuple[Any, ...]


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

    def __init__(self, url: str, max_idle: int = 8, *, clock: Clock | None = None) -> None:
        self.url = url
        #: the time rows are stamped with and compared to (due times, leases,
        #: arrivals): one clock for everything that writes through this handle
        self.clock: Clock = clock or SystemClock()
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
        #: SQLite connections made before the last :meth:`renew_connections` are not pooled again
        self._generation = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    # -- connections ------------------------------------------------------------

    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                timeout=60,
                check_same_thread=False,
                factory=_SqliteConnection,
            )
            conn.generation = self._generation
            # WAL lets readers run during writes; synchronous=FULL makes every
            # commit durable before we tell a sender its instance is stored.
            _use_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=60000")
            # LIKE is case-sensitive as DICOM wildcard matching is (names are
            # matched on an upper-cased column), and prefix LIKEs use indexes.
            conn.execute("PRAGMA case_sensitive_like=ON")
            # the name fold of fuzzy matching, as the migrations' SQL calls it
            # (PostgreSQL has it as a SQL function, migration 0017)
            conn.create_function("imag_fold", 1, fold, deterministic=True)
            return conn
        try:
            return psycopg.connect(self.url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise IndexError_(f"cannot connect to the index at {_safe(self.url)}: {exc}") from None

    def _usable(self, conn: Any) -> bool:
        """Whether ``conn`` may go back to the pool: open, and not left inside a
        transaction."""
        if self.dialect == "sqlite":
            return not conn.in_transaction
        return not (conn.closed or conn.broken) and (
            conn.info.transaction_status == TransactionStatus.IDLE
        )

    def _lost(self, conn: Any) -> bool:
        """Whether the server side of ``conn`` is gone (psycopg marks a
        connection broken when an operation finds it so)."""
        return self.dialect == "postgresql" and bool(conn.closed or conn.broken)

    def _alive(self, conn: Any) -> bool:
        """Whether an idle pooled connection still has its server.

        A backend that was terminated (pg_terminate_backend, a server restart,
        a fail-over) sends its last error message and closes the socket, but
        psycopg only notices on the next use: a request would then fail on a
        connection that was dead before it was sent.  An idle connection in
        autocommit mode receives nothing, so a readable socket means the
        server has spoken its last; one poll() tells, without a round trip."""
        if self.dialect == "sqlite":
            return True
        if not self._usable(conn):
            return False
        try:
            poller = select.poll()
            poller.register(conn.pgconn.socket, select.POLLIN | select.POLLPRI)
            return not poller.poll(0)
        except (OSError, ValueError, psycopg.Error):
            return False

    def _checkout(self) -> Any:
        """A pooled connection that is alive, or a new one."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            return self._connect()
        if self._alive(conn):
            return conn
        self._close(conn)
        self._found_dead("checkout")
        return self._connect()

    def _found_dead(self, when: str) -> None:
        """One pooled connection turned out dead: the other idle ones were
        opened to the same server and are most likely dead too (every backend
        terminated, the server restarted): close them rather than let each
        fail a request in turn."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self._close(conn)
        INDEX_CONNECTIONS_REPLACED.labels(when).inc()
        log.warning(
            "index connection found dead; replaced by a new one",
            extra={"when": when, "idle_dropped": len(idle), "index": _safe(self.url)},
        )

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """Borrow a connection (the transaction's own, inside a transaction)."""
        current = getattr(self._local, "conn", None)
        if current is not None:
            yield current
            return
        conn = self._checkout()
        try:
            yield conn
        finally:
            self._release(conn)

    def renew_connections(self) -> None:
        """Close the idle SQLite connections, and those in use once they are
        released: SQLite reads the planner's statistics when a connection
        loads the schema, so only new connections plan with statistics
        gathered since (:mod:`archive.index.statistics`)."""
        if self.dialect != "sqlite":
            return
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
        for conn in idle:
            self._close(conn)

    def _release(self, conn: Any) -> None:
        if getattr(conn, "generation", self._generation) != self._generation:
            self._close(conn)
            return
        if self._usable(conn):
            with self._lock:
                if len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    return
        elif self._lost(conn):
            self._found_dead("in use")
        self._close(conn)

    @staticmethod
    def _close(conn: Any) -> None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self._close(conn)

    # -- statements -------------------------------------------------------------

    def sql(self, text: str) -> str:
        """Translate ``?`` placeholders for this dialect."""
        if self.dialect == "postgresql":
            text = _PLACEHOLDER.sub("%s", text)
        return text

    def _run(
        self,
        sql: str,
        params: Sequence[Any],
        fetch: Callable[[Any], Any],
        prepare: bool | None = None,
    ) -> Any:
        """Run one statement and ``fetch`` its result.

        ``prepare``: psycopg's (None: prepared once run five times on a
        connection; False: never, so that PostgreSQL plans it for its
        values each time -- see :meth:`query`).  SQLite ignores it.

        Outside a transaction, a read (SELECT) whose connection turns out to
        have been lost is run once more on a fresh connection: it changed
        nothing.  A write is not: in autocommit mode the statement is its own
        commit, and when the connection dies under it, whether it committed
        is unknown.  (A connection already dead when it was borrowed is
        replaced before anything is sent, see :meth:`_alive`.)"""
        text, values = self.sql(sql), _adapt(params, self.dialect)
        options = {} if prepare is None or self.dialect == "sqlite" else {"prepare": prepare}
        current = getattr(self._local, "conn", None)
        if current is not None:
            if getattr(self._local, "pipeline", None) is not None:
                # a read waits for everything sent before it; a write is pending
                self._local.unsettled = fetch is _NOTHING
            return fetch(current.execute(text, values, **options))
        with self.connection() as conn:
            try:
                return fetch(conn.execute(text, values, **options))
            except psycopg.OperationalError:
                if not (self._lost(conn) and _is_read(sql)):
                    raise
        INDEX_READS_RETRIED.inc()
        with self.connection() as conn:
            return fetch(conn.execute(text, values, **options))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._run(sql, params, _NOTHING)

    def query(
        self, sql: str, params: Sequence[Any] = (), *, prepare: bool | None = None
    ) -> list[tuple]:
        """The rows of a read.  ``prepare=False`` for a statement whose best
        plan depends on its values (a LIKE pattern: a rare name is best
        found from a trigram index, a common one by walking ids): psycopg
        prepares a statement run five times on a connection, and PostgreSQL
        may then keep one generic plan for every value."""
        return self._run(sql, params, lambda cur: list(cur.fetchall()), prepare)

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        return self._run(sql, params, lambda cur: cur.fetchone())

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.query_one(sql, params)
        return None if row is None else row[0]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        adapted = [_adapt(r, self.dialect) for r in rows]
        if getattr(self._local, "pipeline", None) is not None:
            self._local.unsettled = True
        with self.connection() as conn:
            if self.dialect == "sqlite":
                conn.executemany(self.sql(sql), adapted)
            else:
                with conn.cursor() as cur:
                    cur.executemany(self.sql(sql), adapted)

    def in_transaction(self) -> bool:
        """Whether this thread is inside :meth:`transaction` (whose body a
        function may then join instead of opening its own: they do not nest)."""
        return getattr(self._local, "conn", None) is not None

    @contextmanager
    def transaction(self, *, pipeline: bool = False) -> Iterator[Database]:
        """A write transaction: everything inside commits together or not at all.

        A connection that turns out dead at BEGIN is replaced and BEGIN sent
        again (nothing was done yet).  Once the body runs, a lost connection
        fails the transaction: the server rolls it back, the caller gets the
        error.  A COMMIT is never repeated: if the connection dies during it,
        the outcome is unknown and the error goes to the caller.

        ``pipeline`` (PostgreSQL; SQLite ignores it): a statement whose result
        is not read is sent without waiting for it, so the writes between two
        reads cost one round trip (the index writer's commit: each is a
        process wake-up on the server), and COMMIT goes with the last ones.
        An error is raised by the next read, by :meth:`settle`, or when the
        body ends; PostgreSQL then runs nothing after the failed statement,
        COMMIT included, and the transaction is rolled back."""
        if getattr(self._local, "conn", None) is not None:
            raise RuntimeError("transactions do not nest")
        conn = self._begin()
        self._local.conn = conn
        try:
            try:
                if pipeline and self.dialect == "postgresql":
                    with conn.pipeline() as self._local.pipeline:
                        self._local.unsettled = False
                        yield self
                        conn.execute("COMMIT")
                else:
                    yield self
            except BaseException:
                self._rollback(conn)
                raise
            finally:
                self._local.pipeline = None
            if not pipeline or self.dialect != "postgresql":
                conn.execute("COMMIT")
        finally:
            self._local.conn = None
            self._release(conn)

    def settle(self) -> None:
        """In a pipelined transaction, wait for the statements sent and not
        yet waited for: their errors are raised here (a caller that must tell
        its own statement's failure from an earlier one's settles before and
        after it).  Elsewhere, or with nothing pending, nothing to do."""
        pipeline = getattr(self._local, "pipeline", None)
        if pipeline is not None and self._local.unsettled:
            pipeline.sync()
            self._local.unsettled = False

    def _begin(self) -> Any:
        # SQLite: IMMEDIATE takes the write lock up front, so two writers queue
        # on busy_timeout instead of failing on lock upgrade.
        begin = "BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN"
        for attempt in (1, 2):
            conn = self._checkout()
            try:
                conn.execute(begin)
                return conn
            except psycopg.OperationalError:
                lost = self._lost(conn)
                self._release(conn)
                if attempt == 2 or not lost:
                    raise
            except BaseException:
                self._release(conn)
                raise
        raise AssertionError("unreachable")

    def _rollback(self, conn: Any) -> None:
        """Roll back after a failure inside a transaction.  On a lost
        connection there is nothing to roll back here: the server discards
        a transaction whose connection is gone."""
        if self._lost(conn):
            return
        try:
            conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - the body's error is the one to report
            log.warning("rollback failed", exc_info=True)


def _is_read(sql: str) -> bool:
    """A statement that changes nothing when run twice."""
    return sql.lstrip()[:6].upper() == "SELECT"


def _adapt(params: Sequence[Any], dialect: str) -> Sequence[Any]:
    if dialect != "sqlite":
        return params
    return [p.isoformat() if isinstance(p, datetime) else p for p in params]


class _SqliteConnection(sqlite3.Connection):
    """An SQLite connection that knows which pool generation made it."""

    generation = 0


def _use_wal(conn: sqlite3.Connection, patience: float = 60.0) -> None:
    """Put the database in WAL mode (it stays so: the mode is kept in the file).

    Switching a new file to WAL needs its exclusive lock, and SQLite answers
    "database is locked" at once, without its busy handler, when another
    connection holds the file at that moment: processes started together on a
    new data folder (``imag serve`` beside ``imag worker``) met it.  So the
    mode is read first, and the switch retried for as long as a busy writer
    would be waited for."""
    deadline = time.monotonic() + patience
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # extended codes too
            if not busy or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def open_database(url: str, *, clock: Clock | None = None) -> Database:
    """Open (lazily connect to) the index database at ``url``; ``clock`` stamps
    and compares its times (default: the system clock)."""
    return Database(url, clock=clock)
