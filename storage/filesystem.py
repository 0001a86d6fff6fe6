"""Object store on a local (or mounted) filesystem.

Objects live in two levels of hash-sharded folders so that no directory grows
to millions of entries, which many filesystems (and backup tools) handle badly.
Writes go to a temporary file that is fsynced and renamed into place, so a
reader never sees a partial object and a completed ``put`` survives a crash.
The writer holds an exclusive ``flock`` on its temporary file until the file
is renamed or deleted, so that what a killed process left (unlocked) can be
told from what a live one, in any process sharing the store, is writing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from storage.base import ObjectNotFound, ObjectStore, StagedPut, StorageError, validate_key
from storage.filelocks import lock_new, remove_if_unlocked

#: Name prefix of in-flight writes; iter_keys skips such files, cleanup_temp removes stale ones.
TEMP_PREFIX = ".tmp-"
_CHUNK = 1024 * 1024
# A missing file, or a key whose path runs through a file / ends on a folder
# (possible only when keys "a" and "a/b" both exist): the object is not there.
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created or renamed in it are durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        # Some platforms (Windows) cannot open directories; nothing more we can do there.
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # A few filesystems refuse fsync on directories; that is not a failed write.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class FilesystemStore(ObjectStore):
    """Durable key -> bytes store under a root directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    # -- paths -------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        """On-disk path of ``key``: ``root/<h0:2>/<h2:4>/<key>`` with h the sha1 of
        the key's first segment.

        Hashing the first segment only keeps keys that share it (for the
        archive: one study) in one folder, so storing a study's next instance
        creates no new folders, while the 65,536 shards still spread the
        first segments evenly."""
        validate_key(key)
        if key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
            # Such a file would be indistinguishable from an unfinished put.
            raise ValueError(
                f"invalid object key {key!r}: the last segment may not start with "
                f"{TEMP_PREFIX!r} in a filesystem store"
            )
        h = hashlib.sha1(key.split("/", 1)[0].encode()).hexdigest()
        return self.root.joinpath(h[0:2], h[2:4], *key.split("/"))

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` and missing parents, fsyncing each new entry's parent
        so that the folder holding a freshly put object survives a crash too."""
        missing: list[Path] = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            if d.parent == d:
                break
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue  # a concurrent put created it; its creator fsyncs it
            _fsync_dir(d.parent)

    # -- writing -----------------------------------------------------------

    def put(self, key: str, data: bytes | BinaryIO) -> int:
        final = self.path_for(key)
        try:
            staged = self._write_temp(final, data)
        except OSError as exc:
            raise StorageError(f"put {key!r}: writing {final} failed: {exc}") from exc
        return staged.commit(key)

    def _write_temp(self, final: Path, data: bytes | BinaryIO) -> _StagedFile:
        """``data`` written and fsynced to a new temporary file beside
        ``final``, removed again when that fails (the first half of
        :meth:`put`, and all of :meth:`stage`); the file stays locked until
        it is committed or aborted."""
        fd, tmp = self._create_temp(final)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                written = _copy_into(data, f)
                f.flush()
                os.fsync(fd)
        except BaseException:  # the source may fail too (a reader that raises)
            _unlink_quietly(tmp)
            os.close(fd)
            raise
        return _StagedFile(self, tmp, written, fd)

    def stage(self, data: bytes | BinaryIO, near: str) -> StagedPut:
        """Write ``data`` to a temporary file in ``near``'s folder and fsync it
        now; the commit renames it to its key and fsyncs the folder (what
        :meth:`put` does after its write).  Raises :class:`StorageError` when
        the write fails."""
        final = self.path_for(near)
        try:
            return self._write_temp(final, data)
        except OSError as exc:
            raise StorageError(
                f"stage near {near!r}: writing {final.parent} failed: {exc}"
            ) from exc

    def sweep_staging(self, near: str) -> int:
        """Delete the temporary files in ``near``'s folder that no process
        holds (those of a process killed between writing and committing
        them); return how many.  A live writer's files, locked, stay."""
        folder = self.path_for(near).parent
        try:
            names = [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)]
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StorageError(f"sweep of {folder}: listing failed: {exc}") from exc
        return sum(remove_if_unlocked(folder / name) for name in names)

    def _create_temp(self, final: Path) -> tuple[int, Path]:
        """Create the folders and an exclusive temp file beside ``final``,
        locked (``flock``) by the returned descriptor.

        Retried a few times because a concurrent delete may prune the (empty)
        folder between our mkdir and the open, and because a sweep may delete
        the file between its creation and the lock.
        """
        for attempt in range(5):
            tmp = final.parent / f"{TEMP_PREFIX}{final.name}-{secrets.token_hex(8)}"
            try:
                self._makedirs(final.parent)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                if attempt == 4:
                    raise
                continue
            if lock_new(fd):
                return fd, tmp
            os.close(fd)  # swept between its creation and our lock
        raise FileNotFoundError(f"temporary file in {final.parent} removed as it was created")

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            path.unlink()
        except _MISSING:
            return
        except OSError as exc:
            raise StorageError(f"delete {key!r}: removing {path} failed: {exc}") from exc
        self._prune(path.parent)

    def _prune(self, directory: Path) -> None:
        """Remove now-empty folders up to the root so deleted keys leave no litter.
        Best effort: a concurrent put may recreate (or be populating) a folder."""
        d = directory
        while d != self.root and self.root in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent

    # -- reading -----------------------------------------------------------

    def get(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            return path.read_bytes()
        except _MISSING as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StorageError(f"get {key!r}: reading {path} failed: {exc}") from exc

    def get_range(self, key: str, start: int, length: int) -> bytes:
        path = self.path_for(key)
        if start < 0 or length < 0:
            raise ValueError(f"get_range {key!r}: start and length must be >= 0")
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(length)
        except _MISSING as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StorageError(f"get_range {key!r}: reading {path} failed: {exc}") from exc

    def open(self, key: str) -> BinaryIO:
        path = self.path_for(key)
        try:
            return open(path, "rb")
        except _MISSING as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StorageError(f"open {key!r}: opening {path} failed: {exc}") from exc

    def size(self, key: str) -> int:
        path = self.path_for(key)
        try:
            st = path.stat()
        except _MISSING as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StorageError(f"size {key!r}: stat of {path} failed: {exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(key)
        return st.st_size

    def exists(self, key: str) -> bool:
        path = self.path_for(key)
        try:
            return path.is_file()
        except OSError as exc:
            raise StorageError(f"exists {key!r}: stat of {path} failed: {exc}") from exc

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        for _path, rel in self._walk():
            if rel.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                continue
            if rel.startswith(prefix):
                yield rel

    def _walk(self) -> Iterator[tuple[str, str]]:
        """Yield (path, key-relative-path) of every file below the shard folders.

        Iterative with a stack of directories so that neither a deep tree nor
        millions of objects are held in memory at once.
        """
        stack: list[tuple[str, str, int]] = [(str(self.root), "", 0)]
        while stack:
            directory, rel, depth = stack.pop()
            try:
                it = os.scandir(directory)
            except FileNotFoundError:
                continue  # vanished (pruned by a concurrent delete) or no root yet
            except OSError as exc:
                raise StorageError(f"iter_keys: listing {directory} failed: {exc}") from exc
            with it:
                for entry in it:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                        is_file = not is_dir and entry.is_file(follow_symlinks=False)
                    except OSError:
                        continue
                    if depth < 2:
                        # The two shard levels: only 2-hex-digit folders belong there.
                        if is_dir and len(entry.name) == 2:
                            stack.append((entry.path, "", depth + 1))
                        continue
                    sub = f"{rel}/{entry.name}" if rel else entry.name
                    if is_dir:
                        stack.append((entry.path, sub, depth + 1))
                    elif is_file:
                        yield entry.path, sub

    # -- maintenance -------------------------------------------------------

    def cleanup_temp(self, older_than_seconds: float = 3600) -> int:
        """Remove temporary files of puts that never finished (a crash between
        create and rename), if older than ``older_than_seconds``; return how many.

        The age threshold keeps us from deleting the temp file of a put that is
        still running in another process.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path, rel in self._walk():
            if not rel.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                continue
            try:
                if os.stat(path).st_mtime <= cutoff:
                    removed += remove_if_unlocked(Path(path))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cleanup_temp: removing {path} failed: {exc}") from exc
        return removed


class _StagedFile(StagedPut):
    """A durable temporary file waiting for its key."""

    def __init__(self, store: FilesystemStore, tmp: Path, written: int, fd: int) -> None:
        super().__init__(store, None)
        self.fs = store
        self.tmp: Path | None = tmp
        self.written = written
        #: holds the file's lock until it is renamed or deleted
        self.fd: int | None = fd

    def _unlock(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def commit(self, key: str) -> int:
        final = self.fs.path_for(key)
        tmp = self.tmp
        if tmp is None:
            raise StorageError(f"put {key!r}: the staged object was already committed or dropped")
        self.tmp = None
        try:
            if final.parent != tmp.parent:
                self.fs._makedirs(final.parent)
            os.replace(tmp, final)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise StorageError(f"put {key!r}: renaming to {final} failed: {exc}") from exc
        finally:
            self._unlock()
        try:
            _fsync_dir(final.parent)
        except OSError as exc:
            # as put: the object is in place but not known durable; the caller
            # does not index it (imag verify reports it as an orphan)
            raise StorageError(f"put {key!r}: syncing {final.parent} failed: {exc}") from exc
        return self.written

    def abort(self) -> None:
        if self.tmp is not None:
            _unlink_quietly(self.tmp)
            self.tmp = None
        self._unlock()


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _copy_into(data: bytes | bytearray | memoryview | BinaryIO, f: BinaryIO) -> int:
    """Write ``data`` (bytes-like, or a binary file read to its end in 1 MiB chunks
    so large objects never sit whole in memory) to ``f``; return the byte count."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        f.write(view)
        return view.nbytes
    if not hasattr(data, "read"):
        raise TypeError(f"data must be bytes-like or a binary file object, not {type(data)!r}")
    written = 0
    while True:
        chunk = data.read(_CHUNK)
        if not chunk:
            return written
        if isinstance(chunk, str):
            raise TypeError("data file object must be opened in binary mode")
        f.write(chunk)
        written += len(chunk)
