"""The worklist's own Prometheus metrics, observed where things happen: the
process that claims or completes a request counts it, so the figures sum
correctly over the nodes of a cluster (the queue gauges, computed from the
index, are in :mod:`worklist.stats`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client import Counter, Histogram

_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 4 * 86400)
TIME_TO_CLAIM = Histogram(
    "imag_worklist_time_to_claim_seconds",
    "From a reading request's creation to its first claim, by priority",
    ["priority"],
    buckets=_BUCKETS,
)
TIME_TO_REPORT = Histogram(
    "imag_worklist_time_to_report_seconds",
    "From a reading request's creation to its validated report, by priority",
    ["priority"],
    buckets=_BUCKETS,
)
REPORTS = Counter("imag_worklist_reports", "Reading requests completed, by reader", ["reader"])
LEASES_EXPIRED = Counter(
    "imag_worklist_leases_expired", "Claims returned to the worklist after their lease passed"
)


def seconds_between(later: Any, earlier: Any) -> float:
    return (when(later) - when(earlier)).total_seconds()


def when(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def observe_claim(priority: str, created_at: datetime, claimed_at: datetime, first: bool) -> None:
    """Count a first claim's wait (a claim after a release or an expired
    lease is not a new wait)."""
    if first:
        TIME_TO_CLAIM.labels(priority).observe(max(0.0, seconds_between(claimed_at, created_at)))


def observe_completion(priority: str, reader: str, created_at: datetime, done_at: datetime) -> None:
    TIME_TO_REPORT.labels(priority).observe(max(0.0, seconds_between(done_at, created_at)))
    REPORTS.labels(reader or "").inc()
