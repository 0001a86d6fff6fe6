"""Files a live process holds: an exclusive ``flock`` from creation until the
file is renamed or deleted, so that what a killed process left (unlocked) can
be told from what a live one, in this or another process sharing the folder,
is still writing.  Used by the filesystem store's temporary files and by the
archive's spool files (:mod:`archive.spoolfiles`).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def lock_new(fd: int) -> bool:
    """Lock the file just created on ``fd``; False when a sweep deleted it
    between its creation and the lock (the caller closes ``fd`` and creates
    another)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    return os.fstat(fd).st_nlink > 0


def remove_if_unlocked(path: Path) -> bool:
    """Delete ``path`` unless a process holds its lock; whether it was deleted.
    Raises OSError when it cannot be opened or deleted for another reason
    than being gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer's
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)
