"""Prometheus metrics of the archive core, served at ``/metrics``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily

NODE = Gauge(
    "imag_node_info",
    "1, labelled with this process's node name (node.name), to join its series by node",
    ["node", "process"],
    multiprocess_mode="max",
)


def name_node(node: str, process: str) -> None:
    """Label this process's metrics page with its node (``serve`` or ``worker``)."""
    NODE.labels(node, process).set(1)


INGEST_INSTANCES = Counter(
    "imag_ingest_instances_total",
    "Instances offered to the ingest pipeline, by source and outcome",
    ["source", "outcome"],
)
INGEST_REJECTED = Counter(
    "imag_ingest_rejected_total", "Instances refused at ingest, by reason code", ["code"]
)
INGEST_BYTES = Counter("imag_ingest_bytes_total", "Bytes of newly stored objects", ["source"])
INGEST_SECONDS = Histogram(
    "imag_ingest_seconds",
    "Time from receiving an instance to its durable, indexed state",
    ["source"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INDEX_COMMIT_SECONDS = Histogram(
    "imag_index_commit_seconds",
    "Duration of one index transaction of the ingest writer (with the wait, before its"
    " COMMIT, for objects still being made durable)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
INDEX_BATCH_SIZE = Histogram(
    "imag_index_commit_batch_instances",
    "Instances per index transaction (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
TRANSCODE_SECONDS = Histogram(
    "imag_transcode_seconds",
    "Time to re-encode (and verify) one instance for storage, by target syntax",
    ["target"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# -- the job queue (archive/jobs.py) ---------------------------------------------------------

JOB_RUNS = Counter(
    "imag_job_runs_total",
    "Job runs by kind and outcome: done, retry (failed, will run again), dead (failed for "
    "good), lost (the lease was lost before the outcome was recorded)",
    ["kind", "outcome"],
)
JOB_SECONDS = Histogram(
    "imag_job_seconds",
    "Duration of one job run (its handler), by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
JOB_LATENCY = Histogram(
    "imag_job_latency_seconds",
    "Time from a job's due time to its claim by a worker, by kind",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)


class ClusterReporter:
    """Whether this process reports the cluster-wide gauges.

    The job queue is shared by every node: if each node exported its depth,
    a dashboard summing over nodes would count it once per node.  So exactly
    one process of the cluster reports it: the one holding a PostgreSQL
    session advisory lock, on a connection of its own kept for that purpose.
    When that process dies its connection closes, the lock is free, and the
    next process scraped takes it over.  On SQLite there is one node: it
    reports."""

    #: "IMAG" "METR" as one 63-bit key, distinct from the migrations' lock
    KEY = 0x494D4147_4D455452

    def __init__(self, url: str, dialect: str) -> None:
        self.url = url
        self.dialect = dialect
        self._conn: Any = None

    def reports(self) -> bool:
        if self.dialect != "postgresql":
            return True
        import psycopg

        conn = self._conn
        if conn is not None:
            try:
                conn.execute("SELECT 1")
                return True  # the lock lives as long as this session
            except Exception:  # noqa: BLE001 - a lost session lost the lock with it
                self.close()
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        except Exception:  # noqa: BLE001 - the index is down: report nothing
            return False
        try:
            held = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.KEY,)).fetchone()[0]
        except Exception:  # noqa: BLE001
            held = False
        if held:
            self._conn = conn
            return True
        conn.close()
        return False

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self._conn = None


class JobQueueCollector:
    """Queue gauges computed at scrape time from the index: ``imag_jobs{state}``
    (done jobs are not counted) and ``imag_jobs_oldest_due_seconds``.

    The queue is the cluster's, not this node's: only one process of the
    cluster exports these gauges (:class:`ClusterReporter`), so that summing
    ``/metrics`` over the nodes gives the true depth.  Two indexed queries per
    scrape, cached ``ttl`` seconds so frequent scrapes (or several Prometheus
    servers) cost no more; nothing is reported while the index does not answer.
    Registered in the default registry; with PROMETHEUS_MULTIPROC_DIR the
    /metrics handler must add it to its registry.
    """

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self.queue = None  # an archive.jobs.JobQueue, set by watch_job_queue
        self.reporter: ClusterReporter | None = None
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, int], float] | None = None

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = self.queue
        if queue is None:
            return
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.ttl:
                if self.reporter is not None and not self.reporter.reports():
                    self._cached = None
                    return
                try:
                    self._cached = (now, queue.depth(), queue.oldest_due_seconds())
                except Exception as exc:  # noqa: BLE001 - /metrics must answer anyway
                    logging.getLogger(__name__).debug("job queue depth unavailable: %s", exc)
                    self._cached = None
                    return
            _, depth, oldest = self._cached
        gauge = GaugeMetricFamily(
            "imag_jobs", "Jobs in the queue by state (done ones not counted)", labels=["state"]
        )
        for state, n in sorted(depth.items()):
            gauge.add_metric([state], n)
        yield gauge
        yield GaugeMetricFamily(
            "imag_jobs_oldest_due_seconds",
            "How long the longest-waiting due pending job has waited",
            value=oldest,
        )


JOB_QUEUE = JobQueueCollector()
REGISTRY.register(JOB_QUEUE)


def watch_job_queue(queue) -> None:  # noqa: ANN001 - archive.jobs.JobQueue (no import cycle)
    """Report this queue's depth in /metrics (replaces any queue watched before)."""
    with JOB_QUEUE._lock:
        JOB_QUEUE.queue = queue
        JOB_QUEUE._cached = None
        if JOB_QUEUE.reporter is not None:
            JOB_QUEUE.reporter.close()
        JOB_QUEUE.reporter = (
            None if queue is None else ClusterReporter(queue.db.url, queue.db.dialect)
        )


class _NodeCollector:
    """The node's metrics when ``imag serve`` runs listener processes
    (``dicom.processes`` > 1): the children's, which they write to the
    PROMETHEUS_MULTIPROC_DIR folder, added to the parent's own.

    The parent imports prometheus_client before it knows it will have
    children, so its metrics stay in memory and not in that folder: read
    from the folder alone, /metrics left out every HTTP request and every
    association the parent served.  Counters and histograms add up; a
    gauge follows its ``multiprocess_mode`` (``max`` / ``min``: the larger /
    smaller, else the sum, as ``livesum`` does)."""

    def __init__(self, folder: str) -> None:
        self._children = multiprocess.MultiProcessCollector(None, folder)

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        families = {f.name: f for f in self._children.collect()}
        # had prometheus_client been imported after the folder was set, the
        # parent's values would be in it too: only the computed ones then
        in_memory = values.ValueClass.__name__ != "MmapedValue"
        for own in REGISTRY.collect() if in_memory else JOB_QUEUE.collect():
            theirs = families.get(own.name)
            samples = [s for s in own.samples if not s.name.endswith("_created")]
            if theirs is None:
                own.samples = samples
                families[own.name] = own
                continue
            combine = _COMBINE.get(_gauge_mode(own.name) if own.type == "gauge" else "", _add)
            merged = {(s.name, tuple(sorted(s.labels.items()))): s for s in theirs.samples}
            for sample in samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in merged:
                    sample = sample._replace(value=combine(merged[key].value, sample.value))
                merged[key] = sample
            theirs.samples = list(merged.values())
        yield from families.values()


def _add(a: float, b: float) -> float:
    return a + b


_COMBINE = {"max": max, "livemax": max, "min": min, "livemin": min, "mostrecent": max}


def _gauge_mode(name: str) -> str:
    collector = REGISTRY._names_to_collectors.get(name)  # noqa: SLF001 - no public look-up
    return getattr(collector, "_multiprocess_mode", "")


def node_metrics(folder: str) -> bytes:
    """The /metrics page of a node whose listener processes share ``folder``."""
    registry = CollectorRegistry()
    registry.register(_NodeCollector(folder))
    return generate_latest(registry)
