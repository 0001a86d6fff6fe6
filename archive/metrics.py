"""Prometheus metrics of the archive core, served at ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
    "Duration of one index transaction of the ingest writer",
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
