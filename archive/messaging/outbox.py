"""The default transport: one ``.eml`` file per message in an outbox folder.

The folder (``messaging.outbox_dir``, default ``<data_dir>/outbox``) is what a
site without a mail relay of its own hands to its mail system, a secure
messaging client that picks files up, or an operator.  Each file is the exact
RFC 5322 message, written under a temporary name, flushed and fsynced, then
renamed into place and the folder fsynced: a reader never sees half a file,
and a file that is there survives a crash.  The name comes from the
Message-ID, so a repeated delivery (jobs run at least once) rewrites the same
file instead of adding a second message.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from archive.messaging.message import Outgoing, PermanentFailure, TemporaryFailure

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def file_name(message_id: str) -> str:
    """The outbox file name of a message: its Message-ID, made safe."""
    safe = _UNSAFE.sub("_", message_id.strip("<>"))[:200].lstrip(".")
    if not safe:
        raise PermanentFailure(f"message id {message_id!r} gives no file name")
    return safe + ".eml"


class OutboxTransport:
    """Write each message to ``folder/<message id>.eml``, atomically."""

    name = "outbox"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def from_config(cls, config: Any) -> OutboxTransport:
        folder = config["messaging.outbox_dir"] or str(Path(config["data_dir"]) / "outbox")
        return cls(folder)

    def path_of(self, message_id: str) -> Path:
        return self.folder / file_name(message_id)

    def send(self, outgoing: Outgoing) -> None:
        target = self.path_of(outgoing.message_id)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".eml", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(outgoing.data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(temporary, target)
            except BaseException:
                try:
                    os.unlink(temporary)
                except FileNotFoundError:
                    pass
                raise
            folder_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(folder_fd)
            finally:
                os.close(folder_fd)
        except OSError as exc:  # a full disk, a folder not yet mounted: may heal
            raise TemporaryFailure(f"outbox {self.folder}: {exc}") from exc
