"""``dicom.max_associations`` for a whole node, whatever its listener processes.

With ``dicom.processes`` above 1 associations are spread over processes
that accept from one listening socket, each with its own lean receiver and
pynetdicom server.  Counted per process, the limit of the
hardening work would be multiplied by the number of processes.  Each
process therefore publishes how many associations it has in progress in a
small array in shared memory, and admits one only when the node's total is
under the limit, under a lock all processes share (two processes admitting
at the same moment cannot both take the last slot).

A process publishes its own count, recounted from its live associations,
whenever one is admitted, refused or ends: a count it failed to lower at
some point is corrected at its next event, never left to accumulate.

The processes accept from one listening socket, and each also publishes
the connections it holds that have not associated yet: a process holding
more than another leaves a new connection to the quieter one
(:meth:`NodeAssociations.quieter_elsewhere`).  An association stays with the
process that accepted it for the whole push, so four modalities connecting
at once must end two and two in two processes, not as the kernel's hash of
their ports falls (with SO_REUSEPORT, two processes got 2+2 only 6 times in 16).
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from typing import Any

#: how long :meth:`NodeAssociations.admit` waits for the lock the processes share
LOCK_WAIT = 2.0
#: the pending count of a process not accepting (starting, or dead): never the quietest
ABSENT = 1 << 30


class NodeAssociations:
    """The associations in progress in each listener process of this node.

    Made by the parent before it starts its listener processes; each
    process gets its own view (:meth:`for_process`), passed to it when it
    is spawned.  With one process it is a plain counter, no shared memory."""

    def __init__(self, processes: int = 1) -> None:
        if processes > 1:
            ctx = multiprocessing.get_context("spawn")
            self._counts: Any = ctx.Array("i", processes, lock=False)
            self._pending: Any = ctx.Array("i", processes, lock=False)
            self._pending[1:] = [ABSENT] * (processes - 1)  # until each child accepts
            self._lock: Any = ctx.Lock()
        else:
            self._counts, self._pending = [0], [0]
            self._lock = threading.Lock()
        self.index = 0

    def for_process(self, index: int) -> NodeAssociations:
        """The view of process ``index`` (0: the parent)."""
        view = NodeAssociations.__new__(NodeAssociations)
        view._counts, view._pending = self._counts, self._pending
        view._lock, view.index = self._lock, index
        return view

    def others(self) -> int:
        """Associations in progress in the node's other processes."""
        return sum(n for i, n in enumerate(self._counts) if i != self.index)

    def publish(self, mine: int) -> None:
        """This process's associations in progress, recounted."""
        self._counts[self.index] = max(0, mine)

    def publish_pending(self, waiting: int) -> None:
        """This process's connections waiting for their A-ASSOCIATE-RQ (0
        once it accepts: until then it is :meth:`absent`)."""
        self._pending[self.index] = max(0, waiting)

    def absent(self) -> None:
        """This process accepts nothing (not started yet, or exited): the
        others do not leave connections to it."""
        self._pending[self.index] = ABSENT

    def accepting(self) -> bool:
        """Whether this process accepts connections (not :meth:`absent`)."""
        return self._pending[self.index] != ABSENT

    def quieter_elsewhere(self) -> bool:
        """Whether another process holds fewer connections (associations in
        progress and connections waiting to associate) than this one: then
        it, not this one, should accept the next.  Read without the lock: a
        count read a moment late costs one connection's placement, never a
        refusal (the caller accepts anyway after a short wait)."""
        held = [n + w for n, w in zip(self._counts, self._pending, strict=True)]
        mine = held[self.index]
        return any(n < mine for i, n in enumerate(held) if i != self.index)

    def admit(self, mine: Callable[[], int], limit: int) -> bool:
        """Whether one more association fits under ``limit`` for the node,
        ``mine()`` being this process's associations in progress; when it
        does, it is counted here at once (the caller publishes its recount
        once it ends, or is refused later for another reason)."""
        # two processes cannot both take the last slot; a process killed
        # while it held the lock (a shared semaphore: never given back) must
        # not stop the node admitting anyone, so past LOCK_WAIT it decides alone
        locked = self._lock.acquire(timeout=LOCK_WAIT)
        try:
            count = mine()
            if count + self.others() >= limit:
                self.publish(count)
                return False
            self.publish(count + 1)
            return True
        finally:
            if locked:
                self._lock.release()
