"""Durable, exactly-once event subscriptions.

An event is a row of the change feed (``changes``): what happened, when, to
which site / study / series / instance, and a JSON ``detail`` for events that
services add (``report.validated``).  :func:`record` writes the rows *and*, in
the same transaction, one job per subscriber whose types match, so an event
exists exactly when its deliveries do: nothing recorded while a process is down
is missed, and nothing is delivered for a change that was rolled back.

A subscriber's job (kind ``event:<name>``) is claimed by one worker of any
``imag serve`` / ``imag worker`` process, with the queue's leases, retries and
dead state (``imag jobs``).  Jobs run *at least once* (a worker killed after the
handler but before the job is marked done gets it re-run); for the database
effects of a **transactional** subscriber (the default) that becomes *exactly
once*: the handler runs inside a transaction that also records the delivery in
``event_deliveries`` (unique on subscriber and event), so a re-run finds the
delivery and does nothing.  A non-transactional subscriber (one that talks to
the outside world for long, like a forwarder) runs outside a transaction and
must be idempotent itself; ``event.delivery_key`` is a stable key for that.

The HTTP change feed (``GET /changes``) reads the same rows for integrations.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from archive import plugins
from archive.changes import TYPES
from archive.hookspecs import hookimpl
from archive.index.db import Database
from archive.jobs import JobQueue

if TYPE_CHECKING:
    from archive.runtime import Archive

log = logging.getLogger(__name__)

CORE_TYPES = TYPES
JOB_PREFIX = "event:"


@dataclass(frozen=True)
class Event:
    """One recorded event, as a subscriber receives it."""

    seq: int
    type: str
    at: str
    site: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def delivery_key(self) -> str:
        """Stable across re-runs: an idempotency key for outside effects."""
        return f"event-{self.seq}"

    def as_payload(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "type": self.type,
            "at": self.at,
            "site": self.site,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Subscriber:
    """A durable subscriber: ``handle(archive, event)`` runs once per event of
    one of ``types``.

    ``transactional``: the handler runs inside the transaction that records its
    delivery (its database writes commit with it: exactly once).  Keep such
    handlers short -- on SQLite they hold the write lock.  ``max_attempts``:
    failures before the job is dead (``imag jobs retry`` revives it).
    """

    name: str
    types: tuple[str, ...]
    handle: Callable[[Archive, Event], None]
    transactional: bool = True
    max_attempts: int = 10

    @property
    def job_kind(self) -> str:
        return JOB_PREFIX + self.name


@dataclass(frozen=True)
class EventRow:
    """What :func:`record` writes: the event without its sequence number."""

    type: str
    site: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    detail: dict[str, Any] | None = None


_cache: dict[tuple[str, ...], list[Subscriber]] = {}


def subscribers() -> list[Subscriber]:
    """Every registered subscriber (plugins' ``imag_event_subscribers``), checked:
    names unique, types known.  Computed once per set of plugins: it is asked on
    every commit of new instances."""
    key = tuple(plugins.plugin_names())
    found = _cache.get(key)
    if found is None:
        found = _subscribers()
        _cache.clear()
        _cache[key] = found
    return found


def _subscribers() -> list[Subscriber]:
    found = plugins.listed("imag_event_subscribers")
    known = set(event_types())
    names: set[str] = set()
    for s in found:
        if s.name in names:
            raise plugins.PluginError(f"event subscriber {s.name!r} is registered twice")
        names.add(s.name)
        unknown = set(s.types) - known
        if unknown:
            raise plugins.PluginError(
                f"event subscriber {s.name!r} names unknown event types {sorted(unknown)}; "
                "a plugin declares its own with imag_event_types"
            )
    return found


def event_types() -> list[str]:
    """The core's event types and those plugins declare."""
    return list(CORE_TYPES) + [t for t in plugins.listed("imag_event_types") if t not in CORE_TYPES]


def record(
    db: Database,
    rows: Iterable[EventRow | tuple],
    at: datetime | None = None,
) -> list[int]:
    """Append events and enqueue their deliveries; call inside the transaction
    that makes the change.  ``rows`` are :class:`EventRow` or (type, site,
    study, series, instance) tuples.  Returns the sequence numbers when any
    event has subscribers (else the rows are written in one batch: [])."""
    when = at or db.clock.now()
    by_type: dict[str, list[Subscriber]] = {}
    for s in subscribers():
        for t in s.types:
            by_type.setdefault(t, []).append(s)
    events = [row if isinstance(row, EventRow) else EventRow(*row) for row in rows]
    values = [
        (
            r.type,
            when,
            r.site,
            r.study_uid,
            r.series_uid,
            r.sop_instance_uid,
            json.dumps(r.detail, sort_keys=True) if r.detail else None,
        )
        for r in events
    ]
    insert = (
        "INSERT INTO changes (type, at, site, study_uid, series_uid, sop_instance_uid, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    if not any(r.type in by_type for r in events):
        db.executemany(insert, values)  # no subscriber: one round trip (the ingest path)
        return []
    queue = JobQueue(db)
    seqs = []
    for row, params in zip(events, values, strict=True):  # in order: deliveries need the seq
        seq = int(db.scalar(insert + " RETURNING seq", params))
        seqs.append(seq)
        event = Event(
            seq,
            row.type,
            when.isoformat(),
            row.site,
            row.study_uid,
            row.series_uid,
            row.sop_instance_uid,
            row.detail or {},
        )
        for s in by_type.get(row.type, ()):
            queue.enqueue(
                s.job_kind,
                {"subscriber": s.name, "event": event.as_payload()},
                max_attempts=s.max_attempts,
            )
    return seqs


def _deliver(subscriber: Subscriber) -> Callable[[Archive, dict], None]:
    def run(archive: Archive, payload: dict) -> None:
        event = Event(**payload["event"])
        if not subscriber.transactional:
            subscriber.handle(archive, event)
            return
        db = archive.db
        with db.transaction():
            first = db.scalar(
                "INSERT INTO event_deliveries (subscriber, seq, delivered_at) VALUES (?, ?, ?) "
                "ON CONFLICT (subscriber, seq) DO NOTHING RETURNING seq",
                (subscriber.name, event.seq, db.clock.now()),
            )
            if first is None:
                log.info(
                    "event already delivered",
                    extra={"subscriber": subscriber.name, "seq": event.seq},
                )
                return
            subscriber.handle(archive, event)

    run.__qualname__ = f"deliver[{subscriber.name}]"
    return run


@hookimpl
def imag_job_kinds() -> dict[str, Callable[[Archive, dict], None]]:
    return {s.job_kind: _deliver(s) for s in subscribers()}


def delivered(db: Database, subscriber: str) -> Sequence[int]:
    """Sequence numbers of the events delivered to a transactional subscriber."""
    return [
        int(r[0])
        for r in db.query(
            "SELECT seq FROM event_deliveries WHERE subscriber = ? ORDER BY seq", (subscriber,)
        )
    ]
