"""``imag worker``: the process that runs jobs.

It assembles an :class:`~archive.runtime.Archive` and a
:class:`~archive.jobs.Worker` over it, with every plugin's job kinds; kept out
of :mod:`archive.jobs` so that the queue (a domain module, imported by
stability, routing and ingest) does not import the runtime.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from archive import cluster, metrics
from archive.config import Config
from archive.heap import freeze_startup_objects
from archive.jobs import HANDLERS, JobQueue, Worker, load_handlers
from archive.runtime import Archive

log = logging.getLogger("archive.jobs")  # the name its records had before the move


def run_worker_process(
    config: Config,
    *,
    kinds: Sequence[str] | None = None,
    concurrency: int = 1,
    poll_interval: float = 0.5,
    lease_seconds: float = 60,
    name: str | None = None,
    stop: threading.Event | None = None,
    metrics_port: int | None = None,
) -> int:
    """``imag worker``: run jobs until SIGTERM or SIGINT (or ``stop`` is set);
    return the exit status (0)."""
    loaded = load_handlers()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    name = name or f"{config.node}/worker-{os.getpid()}"
    archive = Archive(config, writer=True)
    try:
        cluster.check_worker(archive.db, config)
    except cluster.ClusterConfigError as exc:
        archive.close()
        log.error("configuration differs from the cluster's", extra={"error": str(exc)})
        print(f"imag worker: {exc}", file=sys.stderr, flush=True)
        return 1
    queue = JobQueue(archive.db)
    metrics.watch_job_queue(queue)
    metrics.name_node(config.node, "worker")
    exporter = None
    port = config["worker.metrics_port"] if metrics_port is None else metrics_port
    if port:
        from prometheus_client import start_http_server

        # a plain exporter, as node exporters are: bind it where only the
        # Prometheus server reaches (worker.metrics_host, loopback by default)
        exporter, _ = start_http_server(port, config["worker.metrics_host"])
    worker = Worker(
        archive,
        name,
        kinds=kinds,
        poll_interval=poll_interval,
        lease_seconds=lease_seconds,
        concurrency=concurrency,
        queue=queue,
    )
    worker.start()
    if threading.current_thread() is threading.main_thread():  # a process of its own
        freeze_startup_objects()
    log.info(
        "imag worker started",
        extra={
            "worker": name,
            "pid": os.getpid(),
            "kinds": ",".join(kinds) if kinds is not None else "*",
            "handlers": ",".join(sorted(HANDLERS)),
            "imported": ",".join(loaded),
            "concurrency": concurrency,
        },
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("imag worker stopping", extra={"worker": name})
        worker.stop(timeout=lease_seconds)
        if exporter is not None:
            exporter.shutdown()
        archive.close()
    log.info("imag worker stopped", extra={"worker": name})
    return 0
