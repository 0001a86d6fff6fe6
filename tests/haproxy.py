"""A real HAProxy (Debian package ``haproxy``) started by a test, in the
foreground, with the configuration the test writes; ready when every frontend
port accepts connections, stopped with the test."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from tests.processes import HOST, eventually

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class Haproxy:
    """``haproxy -db -f <workdir>/haproxy.cfg``, its output in ``haproxy.log``.

    ``config`` is the whole configuration text; ``frontends`` the loopback
    ports it binds, waited for before :meth:`start` returns (a configuration
    error shows as the process exiting, with its log in the failure)."""

    def __init__(self, workdir: Path, config: str, frontends: list[int]) -> None:
        self.workdir, self.config, self.frontends = workdir, config, frontends
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> Haproxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "haproxy.cfg"
        path.write_text(self.config)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT
            )

        def listening() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            for port in self.frontends:
                with socket.socket() as probe:
                    if probe.connect_ex((HOST, port)) != 0:
                        return False
            return True

        eventually(listening, timeout=30, what="haproxy listening")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
