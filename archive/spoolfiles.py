"""Spool files: large objects arriving over the network (C-STORE on the lean
path, STOW-RS parts) written to ``<data_dir>/tmp`` as they arrive rather than
held in memory, and what a killed process left of them.

Each spool file is ``flock``-ed by the process writing it for as long as it
exists, so :func:`sweep` can tell the files of a process killed while
receiving (unlocked: deleted) from those a live receiver, in this or another
process sharing the data folder, is writing or ingesting (locked: kept).
The receivers sweep their own prefix when they start.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from storage.filelocks import lock_new, remove_if_unlocked

log = logging.getLogger(__name__)


class Spool:
    """A spool file being written: its descriptor holds an exclusive
    ``flock`` until the file is deleted (:meth:`drop`), which tells
    :func:`sweep` the file is live."""

    def __init__(self, folder: Path, prefix: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd, name = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", dir=folder)
            if lock_new(fd):
                break
            os.close(fd)  # a sweep deleted it between its creation and our lock
        self.fd: int | None = fd
        self.path = Path(name)

    def write(self, data: bytes | memoryview) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def drop(self) -> None:
        """Delete the file (then release the lock)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(fd)


def sweep(folder: Path, prefix: str, what: str) -> int:
    """Delete the spool files starting with ``prefix`` that nobody holds:
    those of a process killed while receiving.  Returns how many were
    deleted (logged, naming ``what`` they held)."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return 0
    removed = 0
    for name in names:
        try:
            removed += remove_if_unlocked(folder / name)
        except OSError:  # unreadable: left for the operator
            continue
    if removed:
        log.info(f"left-over {what} spool files deleted", extra={"files": removed})
    return removed
