"""A bounded pool of worker processes for bulk work over a stream of items.

``imag import`` (millions of files) and ``imag transcode`` (every stored
instance) both feed an iterator of work to worker processes and handle each
result in the parent.  Submitting everything at once would hold every
pending item (and every finished, not yet handled result) in memory, so the
pool keeps at most ``workers * per_worker`` items in flight: :meth:`submit`
blocks, handling completed results, until there is room.  The iterator is
therefore only read as fast as the work completes.

Results are handed to the caller's ``then`` callback in the submitting
thread, one at a time: that is where callers write the index, count, and
report progress (a progress bar needs no lock).  Work that continues
elsewhere (the import's index commit, done by the writer thread) is counted
in flight too, through :meth:`follow`.

Workers are started with "spawn": the parent runs threads (the index writer),
which must not be forked.  They ignore SIGINT: Ctrl-C in a terminal reaches
the whole process group, and the parent alone decides what happens.  On
Ctrl-C or an error in the parent, work not yet started is cancelled, the
items being worked on finish (each is one file or instance), and the
workers exit; a second Ctrl-C while those finish terminates the workers.
Results completed but not yet handled are dropped: both commands are
idempotent and a re-run picks them up.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT blocked in this thread meanwhile (delivered after, not lost).

    The executor starts workers inside ``submit``; a signal mask is inherited
    across spawn's exec, so a worker cannot get a Ctrl-C while it imports,
    before :func:`_start_worker` ignores SIGINT (multiprocessing starts its
    resource tracker the same way)."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not POSIX
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_worker(initializer: Callable[..., object] | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


class BoundedPool:
    """Worker processes with a bound on the work in flight; see the module doc.

    Use as a context manager: leaving the block normally waits for every
    result to be handled; leaving it with an exception (KeyboardInterrupt
    included) cancels what has not started and shuts the workers down.
    """

    def __init__(
        self,
        workers: int,
        *,
        per_worker: int = 4,
        initializer: Callable[..., object] | None = None,
        initargs: tuple = (),
    ) -> None:
        if workers < 1 or per_worker < 1:
            raise ValueError("a pool needs at least one worker and one item in flight per worker")
        self.workers = workers
        self.limit = workers * per_worker
        self._initializer = initializer
        self._initargs = initargs
        self._executor: ProcessPoolExecutor | None = None
        self._in_flight: dict[Future, Callable[[Any], None]] = {}

    def __enter__(self) -> BoundedPool:
        self._executor = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self._initializer, self._initargs),
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failed = exc_type is not None
        try:
            if not failed:
                self.join()
        except BaseException:
            failed = True
            raise
        finally:
            self._close(cancel=failed)

    @property
    def in_flight(self) -> int:
        """Items submitted or followed whose result has not been handled yet."""
        return len(self._in_flight)

    def submit(self, fn: Callable[[T], R], item: T, then: Callable[[R], None]) -> None:
        """Run ``fn(item)`` in a worker; ``then(result)`` runs in this thread
        once it is done.  Blocks, handling results, while the pool is full.
        ``fn`` must be picklable (a module-level function).  An exception
        raised by ``fn`` is raised here (or by :meth:`join`) when its turn
        comes, as is one raised by ``then``."""
        if self._executor is None:
            raise RuntimeError("BoundedPool.submit outside its with block")
        while len(self._in_flight) >= self.limit:
            self._handle_completed()
        with _sigint_held():
            future = self._executor.submit(fn, item)
        self._in_flight[future] = then

    def follow(self, future: Future[R], then: Callable[[R], None]) -> None:
        """Count ``future`` (work done elsewhere, such as by a thread) as in
        flight, and run ``then(result)`` here when it is done.  Never blocks,
        so a ``then`` callback may call it to chain the next step."""
        self._in_flight[future] = then

    def join(self) -> None:
        """Handle every result still in flight."""
        while self._in_flight:
            self._handle_completed()

    def _handle_completed(self) -> None:
        done, _ = wait(list(self._in_flight), return_when=FIRST_COMPLETED)
        for future in done:
            then = self._in_flight.pop(future)
            then(future.result())

    def _close(self, cancel: bool) -> None:
        executor, self._executor = self._executor, None
        self._in_flight.clear()  # followed futures belong to others: never cancelled here
        if executor is None:
            return
        try:
            executor.shutdown(wait=True, cancel_futures=cancel)
        except KeyboardInterrupt:
            _terminate(executor)
            raise


def _terminate(executor: ProcessPoolExecutor) -> None:
    """Stop the workers now (a second Ctrl-C while their items finish)."""
    terminate = getattr(executor, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    # before 3.14 the executor offers no way to stop its workers but its
    # private process table
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        process.terminate()
    executor.shutdown(wait=False, cancel_futures=True)
