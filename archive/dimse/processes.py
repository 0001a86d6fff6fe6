"""More DICOM listener processes on the same port (``dicom.processes``).

pynetdicom serves each association with Python threads in one interpreter,
so one process ingests on one core at most (~120 CT slices/s here, whatever
the number of associations).  Extra processes bind the same port with
SO_REUSEPORT and the kernel spreads new associations over them; each has its
own ingest pipeline and index writer, and all share the index and the object
store as the scale-out design has many processes do anyway.

Children die with their parent (PR_SET_PDEATHSIG), so a killed ``imag
serve`` never leaves listeners behind on the port.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess

from archive.config import Config

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the parent's shutdown still stops us
        pass


def _listener(config: Config, port: int) -> None:
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
    server = DicomServer(archive)
    server.start(config["dicom.host"], port, share=True)
    freeze_startup_objects()
    stop.wait()
    server.stop()
    archive.close()


def start_listeners(config: Config, port: int, count: int) -> list[BaseProcess]:
    """Start ``count`` extra listener processes on ``port``."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i in range(count):
        proc = ctx.Process(
            target=_listener, args=(config, port), name=f"imag-dicom-{i + 1}", daemon=False
        )
        proc.start()
        procs.append(proc)
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
