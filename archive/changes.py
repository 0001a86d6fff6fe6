"""The change feed: an ordered, durable log of what happened to the archive.

Rows are written in the same transaction as the change itself (an instance's
index rows, a study's stability decision), so the feed never shows something
that did not happen nor misses something that did.  Integrations read it over
HTTP (``GET /changes?since=<seq>``); services inside IMAG subscribe through a
:class:`ChangeFollower`, which reads the same table and therefore also sees
changes made by other processes (``imag worker``, other ``imag serve``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from archive.index.db import Database, utcnow

log = logging.getLogger(__name__)

TYPES = ("instance.stored", "instance.replaced", "instance.deleted", "study.stable")


@dataclass(frozen=True)
class Change:
    seq: int
    type: str
    at: str
    site: str | None
    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None

    def as_dict(self) -> dict:
        return {
            "seq": self.seq,
            "type": self.type,
            "time": self.at,
            "site": self.site,
            "study": self.study_uid,
            "series": self.series_uid,
            "instance": self.sop_instance_uid,
        }


def record(
    db: Database,
    rows: Iterable[tuple[str, str | None, str | None, str | None, str | None]],
    at: datetime | None = None,
) -> None:
    """Append (type, site, study, series, instance) rows; call inside the
    transaction that makes the change."""
    when = at or utcnow()
    db.executemany(
        "INSERT INTO changes (type, at, site, study_uid, series_uid, sop_instance_uid) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(t, when, s, st, se, i) for t, s, st, se, i in rows],
    )


def read(
    db: Database, since: int = 0, limit: int = 100, types: Iterable[str] | None = None
) -> list[Change]:
    """Changes with a sequence number above ``since``, oldest first."""
    sql = (
        "SELECT seq, type, at, site, study_uid, series_uid, sop_instance_uid FROM changes "
        "WHERE seq > ?"
    )
    params: list[object] = [since]
    wanted = list(types or [])
    if wanted:
        sql += f" AND type IN ({', '.join('?' * len(wanted))})"
        params += wanted
    rows = db.query(sql + " ORDER BY seq LIMIT ?", [*params, limit])
    return [
        Change(r[0], r[1], r[2] if isinstance(r[2], str) else r[2].isoformat(), *r[3:])
        for r in rows
    ]


def last_seq(db: Database) -> int:
    return int(db.scalar("SELECT COALESCE(MAX(seq), 0) FROM changes"))


class ChangeFollower:
    """Calls subscribers for every new change, in order, from a thread.

    The in-process subscription interface: the worklists and the sharing
    portal subscribe to ``study.stable``.  It follows the durable feed, so a
    subscriber sees changes whichever process made them; it starts from the
    feed's end (what happened before start-up is for those services to
    reconcile from the feed with their own saved position).
    """

    def __init__(self, db: Database, poll_interval: float = 0.5) -> None:
        self.db = db
        self.poll_interval = poll_interval
        self._subscribers: dict[str, list[Callable[[Change], None]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.position = 0

    def subscribe(self, change_type: str, callback: Callable[[Change], None]) -> None:
        if change_type not in TYPES:
            raise ValueError(f"unknown change type {change_type!r}: one of {', '.join(TYPES)}")
        self._subscribers.setdefault(change_type, []).append(callback)

    def start(self, from_seq: int | None = None) -> None:
        self.position = last_seq(self.db) if from_seq is None else from_seq
        self._thread = threading.Thread(target=self._run, name="imag-change-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def poll(self) -> int:
        """Dispatch what arrived since the last call; return how many."""
        batch = read(self.db, self.position, 500, self._subscribers.keys() or None)
        for change in batch:
            for callback in self._subscribers.get(change.type, []):
                try:
                    callback(change)
                except Exception:  # noqa: BLE001 - one subscriber must not stop the others
                    log.exception(
                        "change subscriber failed", extra={"type": change.type, "seq": change.seq}
                    )
            self.position = change.seq
        return len(batch)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.poll() == 0:
                    self._stop.wait(self.poll_interval)
            except Exception:  # noqa: BLE001 - the index may be briefly unreachable
                log.exception("change follower failed; retrying")
                self._stop.wait(5)
