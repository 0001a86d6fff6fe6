"""More DICOM listener processes on the same port (``dicom.processes``).

One Python process ingests on one core at most, whatever the number of
associations (the GIL).  Extra processes accept from the parent's listening
socket, which they inherit, each taking a new connection only when no other
holds fewer (:mod:`archive.dimse.nodeslots`); each has its own ingest
pipeline and index writer, and all share the index and the object store as
the scale-out design has many processes do anyway.

Children die with their parent (PR_SET_PDEATHSIG), so a killed ``imag
serve`` never leaves listeners behind on the port.  :meth:`Listeners.start`
returns once every child listens: an association is held for a whole push
(one per sending modality or ``storescu``), so associations opened while a
child was still starting all stayed in the parent, and the processes shared
nothing of the work.

A child that exits while the node runs (killed, out of memory, a crash in a
codec) is started again by the parent, after a pause that doubles while it
keeps failing (:func:`restart_delay`); the associations it had in progress
are no longer counted against ``dicom.max_associations`` (they died with it:
counted, they would have kept their slots for ever).  Until it is back the
processes still listening take every new connection.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

from archive.config import Config
from archive.dimse.nodeslots import NodeAssociations

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


@functools.cache
def _restarts() -> Any:
    # made on first use: prometheus_client must not be imported before
    # imag serve has set PROMETHEUS_MULTIPROC_DIR (it imports this module first)
    from prometheus_client import Counter

    return Counter(
        "imag_dicom_listener_restarts",
        "DICOM listener processes started again after they exited while the node ran",
    )


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the parent's shutdown still stops us
        pass


#: how long a listener process may take to start (imports, the index opened)
START_TIMEOUT = 120.0
#: a child that ran this long before exiting is restarted at once
STABLE_SECONDS = 60.0
#: the longest pause before restarting a child that keeps exiting
MAX_RESTART_DELAY = 60.0


class ListenerFailed(RuntimeError):
    """A listener process exited or did not listen within :data:`START_TIMEOUT`."""


def restart_delay(failures: int) -> float:
    """The pause before starting again a child that exited ``failures``
    times in a row, each within :data:`STABLE_SECONDS` of its start: none
    the first time (a one-off crash costs nothing), then 1, 2, 4 ... s up to
    :data:`MAX_RESTART_DELAY` (a child that cannot run -- its port taken by
    a stranger, the index refusing it -- is not restarted in a tight loop)."""
    if failures <= 1:
        return 0.0
    return min(MAX_RESTART_DELAY, 2.0 ** (failures - 2))


def _listener(
    config: Config, sock: socket.socket, listening: Event, node: NodeAssociations
) -> None:
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
    server.start(config["dicom.host"], sock.getsockname()[1], shared=sock)
    listening.set()
    freeze_startup_objects()
    stop.wait()
    server.stop()
    archive.close()


class Listeners:
    """The node's extra listener processes: started, watched, stopped.

    ``sock``: the parent's listening socket, which the children accept from
    too.  ``node``: the associations of the node's ``count + 1`` processes,
    the parent's being process 0 (``dicom.max_associations`` bounds them all).
    ``on_exit(pid)`` is called for each child that exits (its metrics in
    Prometheus's multiprocess folder are then marked dead)."""

    def __init__(
        self,
        config: Config,
        sock: socket.socket,
        count: int,
        node: NodeAssociations,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self._config, self._sock, self._node = config, sock, node
        self._on_exit = on_exit
        self._ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self._started: list[float] = [0.0] * count
        self._failures: list[int] = [0] * count
        self._count = count
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def _spawn(self, i: int) -> tuple[BaseProcess, Event]:
        listening = self._ctx.Event()
        child = self._node.for_process(i + 1)
        # a dead child's associations died with it; it is absent (no connection
        # left to it) from the start and from its exit (_restart) until it accepts
        child.publish(0)
        proc = self._ctx.Process(
            target=_listener,
            args=(self._config, self._sock, listening, child),
            name=f"imag-dicom-{i + 1}",
            daemon=False,
        )
        proc.start()
        self._started[i] = time.monotonic()
        return proc, listening

    def start(self) -> Listeners:
        """Start the children; return once each listens, then watch them
        (:class:`ListenerFailed`, the others stopped, when one does not)."""
        spawned = [self._spawn(i) for i in range(self._count)]
        self.procs = [proc for proc, _ in spawned]
        deadline = time.monotonic() + START_TIMEOUT
        for proc, listening in spawned:
            if not _wait_listening(proc, listening, deadline):
                self.stop()
                raise ListenerFailed(_failure(proc))
        log.info(
            "DICOM listener processes started",
            extra={"processes": self._count + 1, "port": self._sock.getsockname()[1]},
        )
        _restarts()  # exported as 0 from the start
        self._watcher = threading.Thread(target=self._watch, name="imag-dicom-watch", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        """Start again each child that exits, until :meth:`stop`."""
        while not self._stopping.is_set():
            multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=1.0)
            for i, proc in enumerate(self.procs):
                if proc.is_alive() or self._stopping.is_set():
                    continue
                try:
                    self._restart(i, proc)
                except Exception:  # noqa: BLE001 - not started: tried again, later
                    log.exception("DICOM listener process could not be started again")

    def _restart(self, i: int, proc: BaseProcess) -> None:
        ran = time.monotonic() - self._started[i]
        self._failures[i] = 1 if ran >= STABLE_SECONDS else self._failures[i] + 1
        delay = restart_delay(self._failures[i])
        log.error(
            "DICOM listener process exited; starting it again",
            extra={
                "listener": proc.name,
                "pid": proc.pid,
                "exit_code": proc.exitcode,
                "ran_seconds": round(ran, 1),
                "restart_in_seconds": delay,
            },
        )
        self._node.for_process(i + 1).absent()  # the others take every connection meanwhile
        if self._on_exit is not None and proc.pid is not None:
            self._on_exit(proc.pid)
        self._started[i] = time.monotonic()  # a failed start counts as a quick exit
        if self._stopping.wait(delay):
            return
        new, listening = self._spawn(i)
        self.procs[i] = new
        _restarts().inc()
        if _wait_listening(new, listening, time.monotonic() + START_TIMEOUT):
            log.info("DICOM listener process started again", extra={"listener": new.name})
        # else: the watch loop sees it exit (or stop) and tries again, later

    def accepting(self) -> str:
        """The readiness line of the node's listener processes: how many of
        them accept connections now, naming those that do not (exited and
        waiting to start again, or starting).  It reports, never fails the
        node's readiness: the processes still accepting take every
        connection meanwhile (:mod:`archive.dimse.nodeslots`)."""
        missing = [
            proc.name
            for i, proc in enumerate(self.procs)
            if not self._node.for_process(i + 1).accepting()
        ]
        line = f"{self._count + 1 - len(missing)} of {self._count + 1} accepting"
        if missing:
            line += f" ({', '.join(missing)} starting again)"
        return line

    def stop(self, timeout: float = 20) -> None:
        """Stop the children (SIGTERM, then SIGKILL after ``timeout``)."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
        stop_listeners(self.procs, timeout)


def _wait_listening(proc: BaseProcess, listening: Event, deadline: float) -> bool:
    while not listening.wait(0.2):
        if not proc.is_alive() or time.monotonic() > deadline:
            return False
    return True


def _failure(proc: BaseProcess) -> str:
    return (
        f"DICOM listener process {proc.name} "
        + (
            f"exited with code {proc.exitcode}"
            if proc.exitcode is not None
            else f"did not listen within {START_TIMEOUT:.0f} s"
        )
        + " (its log lines above say why)"
    )


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
