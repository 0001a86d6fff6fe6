"""What the tests' server wrappers share: free loopback ports, and stopping a
server process the way an administrator (SIGTERM) or a power cut (SIGKILL) would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

# a port never handed out twice in one process (also what the benchmarks use)
from benchmarks.orthanc import free_port as free_port

T = TypeVar("T")

HOST = "127.0.0.1"


def eventually(
    condition: Callable[[], T], *, timeout: float = 30, what: str = "", interval: float = 0.05
) -> T:
    """Poll what another *process* did until ``condition()`` is truthy and
    return it (no event crosses processes; time is not the point, so a test
    clock cannot help).  Fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(interval)


class ServerProcess:
    """Mixin for a wrapper with ``proc`` (the server's Popen, started in its own
    session) and ``log()`` (what it wrote so far)."""

    proc: subprocess.Popen | None

    def log(self) -> str:
        raise NotImplementedError

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait, return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"imag serve ignored SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL to the whole process group, as a power cut or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
