"""``imag serve`` in a subprocess for the HTTP tests: its own data folder and
free ports, configured through ``IMAG_*`` variables only, ready when /health
answers, stopped with SIGTERM as systemd stops it."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient

from tests.processes import HOST, ServerProcess, free_port


@dataclass
class HttpImag(ServerProcess):
    """One ``imag serve``.  ``dicom`` also opens the DICOM listener on loopback,
    accepting unknown AE titles; ``settings`` adds or overrides ``IMAG_*``
    variables.  Authentication is on, as in production: requests go through
    :attr:`http` and :meth:`client`, which carry the admin token the first
    start wrote.  With ``IMAG_HTTP_TLS_CERT`` in ``settings`` it serves HTTPS,
    trusted through ``tls_ca`` (the CA file that signed that certificate)."""

    workdir: Path
    index_url: str | None = None
    dicom: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    aet: str = "IMAG"
    proc: subprocess.Popen | None = None
    token: str = ""
    http: requests.Session = field(default_factory=requests.Session)
    tls_ca: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.settings.get("IMAG_HTTP_TLS_CERT") else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb base URL (QIDO-RS, WADO-RS and STOW-RS are under it)."""
        return self.url + "/dicom-web"

    @property
    def token_file(self) -> Path:
        return self.workdir / "data" / "admin-token"

    def client(self, token: str | None = None) -> DICOMwebClient:
        """A dicomweb-client on our DICOMweb base, with the admin (or given) token."""
        return DICOMwebClient(
            self.dicomweb, headers={"Authorization": f"Bearer {token or self.token}"}
        )

    @property
    def log_path(self) -> Path:
        return self.workdir / "serve.log"

    @property
    def env(self) -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"],
            "IMAG_DATA_DIR": str(self.workdir / "data"),
            "IMAG_HTTP_HOST": HOST,
            "IMAG_HTTP_PORT": str(self.http_port),
            "IMAG_DICOM_ENABLED": "true" if self.dicom else "false",
            "IMAG_LOG_FORMAT": "text",
        }
        if self.index_url:
            env["IMAG_INDEX_URL"] = self.index_url
        if self.dicom:
            env |= {
                "IMAG_DICOM_HOST": HOST,
                "IMAG_DICOM_PORT": str(self.dicom_port),
                "IMAG_DICOM_AET": self.aet,
                "IMAG_DICOM_ACCEPT_UNKNOWN": "true",
            }
        return env | self.settings

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 60) -> HttpImag:
        """Start and wait until /health says ok."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "archive.cli", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        tls = None
        if self.scheme == "https":
            tls = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_ca is not None:
                self.http.verify = str(self.tls_ca)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"imag serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2, context=tls) as answer:
                    if json.load(answer).get("status") == "ok":
                        if self.token_file.exists():
                            self.token = self.token_file.read_text().strip()
                            self.http.headers["Authorization"] = f"Bearer {self.token}"
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"imag serve did not answer /health:\n{self.log()}")
            time.sleep(0.05)


@contextmanager
def running_imag(workdir: Path, **kwargs: object) -> Iterator[HttpImag]:
    """An ``imag serve`` for the duration of the block; it must stop cleanly."""
    server = HttpImag(workdir, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    except BaseException:
        server.kill()
        raise
    code = server.stop()
    assert code == 0, f"imag serve exited {code} on SIGTERM:\n{server.log()}"
