"""Job kinds and their handlers: who runs a job of each kind (see :mod:`archive.jobs`)."""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from archive.jobs.queue import Job
    from archive.runtime import Archive


Handler = Callable[["Archive", dict], None]
HANDLERS: dict[str, Handler] = {}


class JobError(Exception):
    """A queue operation cannot be done (unknown job, wrong state, ...)."""


class PermanentJobError(Exception):
    """Raised by a handler when retrying cannot help: the job becomes dead at once."""


def handler(kind: str, *, replace: bool = False) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of jobs of ``kind``."""

    def register(fn: Handler) -> Handler:
        current = HANDLERS.get(kind)
        if current is not None and current is not fn and not replace:
            raise ValueError(f"job kind {kind!r} already has a handler ({current.__qualname__})")
        HANDLERS[kind] = fn
        return fn

    return register


def load_handlers() -> list[str]:
    """Register the job kinds of every plugin (``imag_job_kinds``; the core's
    stability, routing and event deliveries included) and import the
    comma-separated module names in ``IMAG_WORKER_IMPORT`` (modules that use
    ``@handler`` directly).  Returns the kinds and modules loaded."""
    from archive import plugins

    loaded = []
    for kind, fn in plugins.merged("imag_job_kinds", "job kind").items():
        handler(kind, replace=True)(fn)
        loaded.append(kind)
    for name in os.environ.get("IMAG_WORKER_IMPORT", "").split(","):
        if name.strip():
            importlib.import_module(name.strip())
            loaded.append(name.strip())
    return loaded


_current = threading.local()


def current_job() -> Job | None:
    """The job the calling handler is running (None outside a handler)."""
    return getattr(_current, "job", None)
