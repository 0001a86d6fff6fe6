"""More DICOM listener processes on the same port (``dicom.processes``).

pynetdicom serves each association with Python threads in one interpreter,
so one process ingests on one core at most (~120 CT slices/s here, whatever
the number of associations).  Extra processes bind the same port with
SO_REUSEPORT and the kernel spreads new associations over them; each has its
own ingest pipeline and index writer, and all share the index and the object
store as the scale-out design has many processes do anyway.

Children die with their parent (PR_SET_PDEATHSIG), so a killed ``imag
serve`` never leaves listeners behind on the port.  :func:`start_listeners`
returns once every child listens: an association is held for a whole push
(one per sending modality or ``storescu``), so associations opened while a
child was still starting all stayed in the parent, and the processes shared
nothing of the work.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

from archive.config import Config
from archive.dimse.nodeslots import NodeAssociations

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the parent's shutdown still stops us
        pass


#: how long a listener process may take to start (imports, the index opened)
START_TIMEOUT = 120.0


class ListenerFailed(RuntimeError):
    """A listener process exited or did not listen within :data:`START_TIMEOUT`."""


def _listener(config: Config, port: int, listening: Event, node: NodeAssociations) -> None:
    _die_with_parent()
    from archive.dimse.server import DicomServer
    from archive.heap import freeze_startup_objects
    from archive.logs import setup_logging
    from archive.runtime import Archive

    setup_logging(config["log.level"], config["log.format"], config.node)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    archive = Archive(config, migrate=False)
    server = DicomServer(archive, node=node)
    server.start(config["dicom.host"], port, share=True)
    listening.set()
    freeze_startup_objects()
    stop.wait()
    server.stop()
    archive.close()


def start_listeners(
    config: Config, port: int, count: int, node: NodeAssociations
) -> list[BaseProcess]:
    """Start ``count`` extra listener processes on ``port``; return once each
    listens (:class:`ListenerFailed`, the others stopped, when one does not).
    ``node``: the associations of the node's ``count + 1`` processes, the
    parent's being process 0 (``dicom.max_associations`` bounds them all)."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    ready: list[Event] = []
    for i in range(count):
        listening = ctx.Event()
        proc = ctx.Process(
            target=_listener,
            args=(config, port, listening, node.for_process(i + 1)),
            name=f"imag-dicom-{i + 1}",
            daemon=False,
        )
        proc.start()
        procs.append(proc)
        ready.append(listening)
    deadline = time.monotonic() + START_TIMEOUT
    for proc, listening in zip(procs, ready, strict=True):
        while not listening.wait(0.2):
            if not proc.is_alive() or time.monotonic() > deadline:
                stop_listeners(procs)
                raise ListenerFailed(
                    f"DICOM listener process {proc.name} "
                    + (
                        f"exited with code {proc.exitcode}"
                        if proc.exitcode is not None
                        else f"did not listen within {START_TIMEOUT:.0f} s"
                    )
                    + " (its log lines above say why)"
                )
    log.info("DICOM listener processes started", extra={"processes": count + 1, "port": port})
    return procs


def stop_listeners(procs: list[BaseProcess], timeout: float = 20) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()


def metrics_dir(config: Config) -> str:
    """A fresh folder for the processes' shared Prometheus metrics."""
    path = os.path.join(config.data_dir, "metrics", str(os.getpid()))
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    return path
