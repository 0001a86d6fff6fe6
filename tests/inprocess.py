"""imag's HTTP application served from the test process, for HTTP behaviour
that needs no separate process: no interpreter start, no wait for /health, no
port chosen ahead and raced for.

The application is the one ``imag serve`` runs (``archive.server.serve_http``:
the same app, middlewares and TLS) on an :class:`~archive.runtime.Archive` over
a temporary data folder, with the admin token a first start writes.  It runs
on an event loop in a background thread, so that tests keep calling it
through ``requests`` and dicomweb-client exactly as they call a subprocess
(:class:`InProcessImag` answers to the attributes of
:class:`tests.httpserver.HttpImag` that such tests use).

Not here, by design: the DICOM listener, the job worker and the change
follower.  Tests of those, and of what a process does (signals, crashes,
memory, exit codes), keep using :func:`tests.httpserver.running_imag`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from aiohttp import web
from dicomweb_client.api import DICOMwebClient

from archive import eventloop
from archive.clock import Clock
from archive.config import Config, load_config
from archive.runtime import Archive
from archive.security.commands import ensure_admin_token
from archive.security.principals import Principals
from archive.server import serve_http
from tests.processes import HOST

T = TypeVar("T")
_LOOP_TIMEOUT = 60


class _LoopThread:
    """An asyncio loop running in a daemon thread; coroutines are submitted to
    it from the test's (synchronous) thread."""

    def __init__(self, kind: str) -> None:
        self.loop = eventloop.new_event_loop(kind)  # what imag serve runs on
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="imag-in-process", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(_LOOP_TIMEOUT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(_LOOP_TIMEOUT)
        self.loop.close()


@dataclass
class InProcessImag:
    """The HTTP side of one archive, served in this process on a loopback
    port the kernel chose.  ``settings`` are ``IMAG_*`` variables, as for
    :class:`tests.httpserver.HttpImag`; authentication is on, as in
    production, and :attr:`http` / :meth:`client` carry the admin token."""

    workdir: Path
    index_url: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    config: Config | None = None
    archive: Archive | None = None
    #: the archive's clock (a FakeClock where "now" matters); None: the real one
    clock: Clock | None = None
    http_port: int = 0
    token: str = ""
    http: requests.Session = field(default_factory=requests.Session)
    _loop: _LoopThread | None = None
    _log: io.StringIO = field(default_factory=io.StringIO)
    _log_handler: logging.Handler | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb base URL (QIDO-RS, WADO-RS and STOW-RS are under it)."""
        return self.url + "/dicom-web"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def token_file(self) -> Path:
        """Where the first start wrote the admin token (``auth.admin_token_file``)."""
        assert self.config is not None, "start() first"
        return Path(self.config["auth.admin_token_file"])

    def client(self, token: str | None = None) -> DICOMwebClient:
        """A dicomweb-client on our DICOMweb base, with the admin (or given) token."""
        return DICOMwebClient(
            self.dicomweb, headers={"Authorization": f"Bearer {token or self.token}"}
        )

    def log(self) -> str:
        """The warnings and errors logged (with their tracebacks) while it
        served: what ``imag serve`` would have written on stderr.  Everything
        this process logged in that time, in fact, the test's own code too."""
        return self._log.getvalue()

    def start(self) -> InProcessImag:
        if self.settings.get("IMAG_HTTP_TLS_CERT"):
            raise ValueError("TLS: use tests.httpserver.HttpImag (a real imag serve)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.StreamHandler(self._log)
        self._log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._log_handler)
        env = {"IMAG_LOG_FORMAT": "text", **self.settings}
        overrides: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "http.host": HOST,
            "dicom.enabled": False,
        }
        if self.index_url:
            overrides["index.url"] = self.index_url
        try:
            self.config = config = load_config(env=env, overrides=overrides)
            self.archive = Archive(config, clock=self.clock)
            token_file = ensure_admin_token(config, Principals(self.archive.db))
            if token_file is not None:
                self.token = token_file.read_text().strip()
                self.http.headers["Authorization"] = f"Bearer {self.token}"
            self._loop = _LoopThread(config["event_loop"])
            self._runner = self._loop.run(serve_http(self.archive, HOST, 0))
        except BaseException:
            self.stop()
            raise
        # the one listening socket, on the port the kernel gave it
        self.http_port = self._runner.addresses[0][1]
        return self

    def stop(self) -> None:
        """Stop serving (open requests are finished or cancelled by aiohttp's
        shutdown, as for ``imag serve`` on SIGTERM) and close the archive."""
        if self._loop is not None:
            if self._runner is not None:
                self._loop.run(self._runner.cleanup())
                self._runner = None
            self._loop.close()
            self._loop = None
        if self.archive is not None:
            self.archive.close()
            self.archive = None
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler = None
        self.http.close()


@contextmanager
def serving_in_process(workdir: Path, **kwargs: Any) -> Iterator[InProcessImag]:
    """An in-process imag HTTP server for the duration of the block."""
    server = InProcessImag(workdir, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def imag_in_process(tmp_path: Path) -> Iterator[InProcessImag]:
    """imag's HTTP application with default settings on a fresh SQLite archive
    in ``tmp_path``, served in the test process."""
    with serving_in_process(tmp_path / "imag") as server:
        yield server
