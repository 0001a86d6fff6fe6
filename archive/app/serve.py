"""``imag serve``: the archive with its HTTP and DICOM servers and job workers.

The lifecycle in order: open the archive (migrations of the core and of every
plugin), create the first admin account when there is none, start the DICOM
listener(s), the job workers (every plugin's job kinds and event
subscribers), then HTTP; on SIGTERM / SIGINT stop them in the reverse order,
so that nothing acknowledged is left half done.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import sys
import time

from archive import cluster, eventloop
from archive.config import Config
from archive.dimse.processes import ListenerFailed

log = logging.getLogger("imag")


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; return the exit status (0)."""
    processes = config["dicom.processes"] if config["dicom.enabled"] else 1
    multiproc_dir = None
    if processes > 1:
        # Before prometheus_client is first imported: every process then writes
        # its metrics to this folder and /metrics adds them up.
        from archive.dimse.processes import metrics_dir

        multiproc_dir = metrics_dir(config)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    try:
        with asyncio.Runner(
            loop_factory=lambda: eventloop.new_event_loop(config["event_loop"])
        ) as runner:
            runner.run(_serve(config, processes))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.error("cannot listen", extra={"error": str(exc)})
        print(f"imag serve: {exc.strerror}", file=sys.stderr, flush=True)
        return 1
    except cluster.ClusterConfigError as exc:
        log.error("configuration differs from the cluster's", extra={"error": str(exc)})
        print(f"imag serve: {exc}", file=sys.stderr, flush=True)
        return 1
    except ListenerFailed as exc:
        log.error("a DICOM listener process did not start", extra={"error": str(exc)})
        print(f"imag serve: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
    return 0


def _first_start(config: Config, archive) -> None:  # noqa: ANN001 - Archive
    from archive.security.commands import ensure_admin_token
    from archive.security.principals import Principals

    token_file = ensure_admin_token(config, Principals(archive.db))
    if token_file is not None:
        log.warning("first start: admin token written", extra={"path": str(token_file)})
        print(
            f"IMAG first start: the admin API token is in {token_file} (readable only by "
            "you); send it as 'Authorization: Bearer <token>', and create users with "
            "'imag user add' and 'imag token create'",
            file=sys.stderr,
            flush=True,
        )
    if not config["auth.enabled"]:
        log.warning("authentication is OFF (auth.enabled = false): local development only")


async def _heartbeat(archive, node: str, stop: asyncio.Event) -> None:  # noqa: ANN001
    """Tell the other nodes this one is live (:mod:`archive.cluster`)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=cluster.HEARTBEAT_SECONDS)
        except TimeoutError:
            try:
                await asyncio.to_thread(cluster.heartbeat, archive.db, node)
            except Exception as exc:  # noqa: BLE001 - an index outage: retried next beat
                log.warning("heartbeat not recorded", extra={"error": str(exc)})


def _metrics_of_dead(pid: int) -> None:
    """A listener process exited: its live gauges leave /metrics' sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


async def _serve(config: Config, processes: int) -> None:
    from archive.heap import freeze_startup_objects
    from archive.jobs import JobQueue, Worker
    from archive.metrics import name_node, watch_job_queue
    from archive.runtime import Archive
    from archive.server import serve_http

    started = time.monotonic()
    # Signals are taken first: a SIGTERM that arrives while the plugins load
    # (a DICOM port already listening) stops the node cleanly once started,
    # rather than killing it half-built.
    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    archive = Archive(config)
    _first_start(config, archive)
    try:
        changed = await asyncio.to_thread(cluster.join, archive.db, config)
    except BaseException:
        archive.close()
        raise
    if changed:
        log.warning(
            "cluster-wide settings changed by this node (no other node was running)",
            extra={"settings": ", ".join(changed), "node": config.node},
        )
    dicom = None
    children = None
    if config["dicom.enabled"]:
        from archive.dimse.nodeslots import NodeAssociations
        from archive.dimse.processes import Listeners
        from archive.dimse.server import DicomServer

        # dicom.max_associations bounds the node: every process counts in it
        node = NodeAssociations(processes)
        dicom = DicomServer(archive, node=node.for_process(0))
        dicom.start(config["dicom.host"], config["dicom.port"])
        if processes > 1:
            try:
                children = await asyncio.to_thread(
                    Listeners(
                        config, dicom.share(), processes - 1, node, on_exit=_metrics_of_dead
                    ).start
                )
            except BaseException:
                dicom.stop()
                archive.close()
                raise
    queue = JobQueue(archive.db)
    watch_job_queue(queue)
    name_node(config.node, "serve")
    worker = (  # Worker.start loads every plugin's job kinds
        Worker(
            archive,
            f"{config.node}/serve-{os.getpid()}",
            queue=queue,
            concurrency=config["jobs.workers"],
            lease_seconds=config["jobs.lease_seconds"],
        ).start()
        if config["jobs.workers"]
        else None
    )
    runner = await serve_http(archive, config["http.host"], config["http.port"])
    if dicom is not None:
        from archive.server import READY_CHECKS

        runner.app[READY_CHECKS]["dicom"] = dicom.ensure_listening
        if children is not None:
            runner.app[READY_CHECKS]["dicom_processes"] = children.accepting
    scheme = "https" if config["http.tls_cert"] else "http"
    http = f"{scheme}://{config['http.host']}:{config['http.port']}"
    where = {"http": http, "index": config.masked()["index.url"], "storage": config.storage_url}
    if dicom is not None:
        where["dicom"] = f"{config['dicom.aet']}@{config['dicom.host']}:{dicom.port}" + (
            f" ({processes} processes)" if processes > 1 else ""
        )
    log.info(
        "imag serving",
        extra={**where, "event_loop": eventloop.loop_name(asyncio.get_running_loop())},
    )
    print(
        "IMAG listening: " + ", ".join(f"{k} {v}" for k, v in where.items()),
        file=sys.stderr,
        flush=True,
    )
    freeze_startup_objects()  # after the last module and plugin loaded (archive/heap.py)
    beating = asyncio.create_task(_heartbeat(archive, config.node, stop))
    await stop.wait()
    await beating
    if children is not None:
        await asyncio.to_thread(children.stop)
    if dicom is not None:
        dicom.stop()
    await runner.cleanup()
    if worker is not None:
        await asyncio.to_thread(worker.stop)
    try:
        cluster.leave(archive.db, config.node)
    except Exception as exc:  # noqa: BLE001 - the index is down: the heartbeat just ages
        log.warning("could not record this node's stop", extra={"error": str(exc)})
    archive.close()
    # the last line: an administrator reading the log knows the stop was clean
    log.info(
        "imag stopped",
        extra={
            "signal": received[0] if received else "",
            "uptime_seconds": round(time.monotonic() - started, 1),
        },
    )
