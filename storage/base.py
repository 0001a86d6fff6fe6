"""The object store interface every backend implements."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import BinaryIO


class StorageError(Exception):
    """An object store operation failed (I/O, network, permissions)."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist in the store."""


# A key is one or more segments joined by "/": letters, digits, ".", "_", "-";
# no empty segment, no "." or ".." segment, at most 1024 characters.  That is
# enough for UID-derived keys and leaves no way to escape a folder or bucket prefix.
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe object key, else raise ValueError.

    Backends call this on every operation so that no caller, however careless,
    can reach outside the store with ``..`` or an absolute path.
    """
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise ValueError(f"invalid object key {key!r}: must be 1-1024 characters")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise ValueError(
                f"invalid object key {key!r}: segments must be non-empty and use only "
                "letters, digits, '.', '_' and '-'"
            )
    return key


class StagedPut:
    """An object written ahead of its key (see :meth:`ObjectStore.stage`).

    This default keeps the data and stores it at :meth:`commit`; a backend
    that can do better (the filesystem store writes and fsyncs it at once)
    overrides it."""

    def __init__(self, store: ObjectStore, data: bytes | BinaryIO | None) -> None:
        self.store = store
        self.data: bytes | BinaryIO | None = data

    def commit(self, key: str) -> int:
        """Store the object under ``key``, atomically and durably, as
        :meth:`ObjectStore.put` does; return the number of bytes stored.
        Once only, and never after :meth:`abort` (:class:`StorageError`)."""
        data, self.data = self.data, None
        if data is None:
            raise StorageError(f"put {key!r}: the staged object was already committed or dropped")
        return self.store.put(key, data)

    def abort(self) -> None:
        """Drop the staged object (it is never visible under any key)."""
        self.data = None


class ObjectStore(ABC):
    """Durable key → bytes store.

    ``put`` is atomic and durable: when it returns, the whole object is stored
    and survives a crash; a reader never sees a partly written object.
    Writing an existing key replaces it atomically.
    """

    #: URL this store was opened from (for logs and ``imag config show``).
    url: str

    @abstractmethod
    def put(self, key: str, data: bytes | BinaryIO) -> int:
        """Store ``data`` (bytes, or a binary file object read to its end) under
        ``key``; return the number of bytes written."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole object; raise ObjectNotFound when absent."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return up to ``length`` bytes from offset ``start`` (fewer at the end
        of the object); raise ObjectNotFound when absent."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Return a readable binary stream of the object, for objects too large
        to hold in memory; the caller closes it."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size of the object in bytes; raise ObjectNotFound when absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the key holds an object."""

    @abstractmethod
    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Yield every key starting with ``prefix`` (no particular order);
        temporary files of unfinished puts are never yielded."""

    def stage(self, data: bytes | BinaryIO, near: str) -> StagedPut:
        """Start storing ``data`` before its key is known, for a key in the
        same folder as ``near``; :meth:`StagedPut.commit` names it.

        The ingest pipeline names objects by their digest: staging lets the
        object be written (and made durable) while the digest is computed.
        Nothing is visible under any key before the commit, and the commit
        keeps :meth:`put`'s guarantees (atomic, durable when it returns)."""
        validate_key(near)
        return StagedPut(self, data)

    def sweep_staging(self, near: str) -> int:
        """Delete what processes killed between :meth:`stage` and the commit
        left beside ``near``; return how many objects.  Live stagings (this
        process's or another's) are kept.  The default has nothing to delete
        (nothing is written before the commit)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default does nothing."""
