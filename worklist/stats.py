"""Worklist figures: how deep the queue is, how long requests wait to be
claimed and to be reported, what is overdue, who reads how much.

Two views of the same rows:

* :func:`stats` answers ``GET /api/worklist/stats`` for a period (requests
  created in ``[start, end)``), within what the caller may see: counts, time
  to claim and time to report (mean, median, 90th percentile, max) by
  priority, by group and by reader, and the queue as it stands now.
* :class:`WorklistCollector` exports the queue in ``/metrics`` as gauges
  computed from the index at scrape time (``imag_worklist_queue``,
  ``imag_worklist_overdue``); like the job queue's gauges it is the cluster's
  queue, so only one process of the cluster reports it
  (:class:`archive.metrics.ClusterReporter`).  The durations are histograms
  observed by the process that claims or completes (:mod:`worklist.metrics`):
  they sum correctly over nodes.

Times are the index's (the archive clock), so a scripted day on a test clock
gives exactly the figures its timestamps imply.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from archive.index.db import Database
from archive.metrics import ClusterReporter
from worklist.metrics import seconds_between as _seconds
from worklist.metrics import when as _when
from worklist.requests import Viewer
from worklist.ups import IN_PROGRESS, PRIORITIES, SCHEDULED

log = logging.getLogger(__name__)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """count, mean, median, p90 and max of durations in seconds (None when
    there are none).  Percentiles by the nearest-rank method: a value that
    was actually measured, as a person checking by hand would pick it."""
    if not values:
        return {"count": 0, "mean": None, "median": None, "p90": None, "max": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "median": rank(0.5),
        "p90": rank(0.9),
        "max": ordered[-1],
    }


def stats(
    db: Database, viewer: Viewer, now: datetime, start: datetime, end: datetime
) -> dict[str, Any]:
    """The figures of the requests ``viewer`` may see created in ``[start,
    end)``, and the queue at ``now``."""
    where, params = viewer.clause("r")
    rows = db.query(
        "SELECT r.priority, r.group_name, r.state, r.created_at, r.first_claimed_at, "
        "r.completed_at, r.completed_by, r.due_at FROM read_requests r "
        f"WHERE {where} AND r.created_at >= ? AND r.created_at < ?",
        (*params, start, end),
    )
    claim: dict[str, list[float]] = defaultdict(list)
    report: dict[str, list[float]] = defaultdict(list)
    by_group: dict[str, list[float]] = defaultdict(list)
    by_reader: dict[str, list[float]] = defaultdict(list)
    late: dict[str, int] = defaultdict(int)
    states: dict[str, int] = defaultdict(int)
    for priority, group, state, created, claimed, completed, reader, due in rows:
        states[state] += 1
        if claimed is not None:
            claim[priority].append(_seconds(claimed, created))
        if completed is not None:
            took = _seconds(completed, created)
            report[priority].append(took)
            by_group[group or ""].append(took)
            by_reader[reader or ""].append(took)
            if _when(completed) > _when(due):
                late[priority] += 1
    return {
        "period": {"start": start.isoformat(), "end": end.isoformat()},
        "created": len(rows),
        "states": dict(sorted(states.items())),
        "time_to_claim": {p: summary(claim[p]) for p in PRIORITIES},
        "time_to_report": {p: summary(report[p]) for p in PRIORITIES},
        "reported_late": {p: late[p] for p in PRIORITIES},
        "by_group": {g: summary(v) for g, v in sorted(by_group.items())},
        "by_reader": {r: summary(v) for r, v in sorted(by_reader.items())},
        "queue": queue(db, viewer, now),
    }


def queue(db: Database, viewer: Viewer, now: datetime) -> list[dict[str, Any]]:
    """The open requests now, by group, priority and state, with how many
    are overdue."""
    where, params = viewer.clause("r")
    rows = db.query(
        "SELECT r.group_name, r.priority, r.state, count(*), "
        "sum(CASE WHEN r.due_at < ? THEN 1 ELSE 0 END) FROM read_requests r "
        f"WHERE {where} AND r.state IN (?, ?) GROUP BY r.group_name, r.priority, r.state "
        "ORDER BY r.group_name, r.priority, r.state",
        (now, *params, SCHEDULED, IN_PROGRESS),
    )
    return [
        {"group": g, "priority": p, "state": s, "count": int(n), "overdue": int(o or 0)}
        for g, p, s, n, o in rows
    ]


class WorklistCollector:
    """``imag_worklist_queue{group,priority,state}`` and
    ``imag_worklist_overdue{group,priority}`` from the index at scrape time,
    cached ``ttl`` seconds, reported by one process of the cluster."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self.db: Database | None = None
        self.clock: Any = None
        self.reporter: ClusterReporter | None = None
        self._lock = threading.Lock()
        self._cached: tuple[float, list[dict[str, Any]]] | None = None

    def watch(self, db: Database | None, clock: Any = None) -> None:
        with self._lock:
            if self.reporter is not None:
                self.reporter.close()
            self.db, self.clock, self._cached = db, clock, None
            self.reporter = None if db is None else ClusterReporter(db.url, db.dialect)

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = self._rows()
        if rows is None:
            return
        depth = GaugeMetricFamily(
            "imag_worklist_queue",
            "Open reading requests by reading group, priority and state",
            labels=["group", "priority", "state"],
        )
        overdue = GaugeMetricFamily(
            "imag_worklist_overdue",
            "Open reading requests past their due time, by reading group and priority",
            labels=["group", "priority"],
        )
        late: dict[tuple[str, str], int] = defaultdict(int)
        for row in rows:
            depth.add_metric([row["group"] or "", row["priority"], row["state"]], row["count"])
            late[(row["group"] or "", row["priority"])] += row["overdue"]
        for (group, priority), n in sorted(late.items()):
            overdue.add_metric([group, priority], n)
        yield depth
        yield overdue

    def _rows(self) -> list[dict[str, Any]] | None:
        with self._lock:
            db = self.db
            if db is None:
                return None
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.ttl:
                if self.reporter is not None and not self.reporter.reports():
                    self._cached = None
                    return None
                try:
                    at = self.clock.now() if self.clock is not None else db.clock.now()
                    self._cached = (now, queue(db, Viewer.system(), at))
                except Exception as exc:  # noqa: BLE001 - /metrics must answer anyway
                    log.debug("worklist queue unavailable: %s", exc)
                    self._cached = None
                    return None
            return self._cached[1]


COLLECTOR = WorklistCollector()
REGISTRY.register(COLLECTOR)
