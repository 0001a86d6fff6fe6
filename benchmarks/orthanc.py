"""Start a throwaway Orthanc (Debian package ``orthanc``) for side-by-side figures."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: the ports free_port handed out in this process: never handed out twice
_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now and that this
    process was not given before: the kernel may offer a port again once it
    is closed, and a server once got the same port for HTTP and DICOM (its
    HTTP listener then failed to start).  A tiny race with other processes
    remains."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


_free_port = free_port


@dataclass
class Orthanc:
    http_url: str
    dicom_port: int
    aet: str
    folder: Path
    pid: int = 0  #: the Orthanc process (for its CPU time)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of Orthanc's log (stdout and stderr)."""
        try:
            return (self.folder / "orthanc.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def available() -> bool:
    return shutil.which("Orthanc") is not None


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dicomweb_plugin() -> str:
    """The DICOMweb plugin's path (Debian ``orthanc-dicomweb``), or "" when absent."""
    return str(DICOMWEB_PLUGIN) if DICOMWEB_PLUGIN.exists() else ""


@contextmanager
def running_orthanc(extra: dict | None = None, auth: str = "") -> Iterator[Orthanc]:
    """An Orthanc on loopback with its own storage and SQLite index, removed after.
    ``auth``: the Authorization header to probe it with when authentication is on."""
    folder = Path(tempfile.mkdtemp(prefix="imag-bench-orthanc-"))
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "Plugins": [],
        "DicomCheckCalledAet": False,
        "UnknownSopClassAccepted": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "StableAge": 3600,
        # C-FIND answers whole, as IMAG's (0: no limit; a 1,000-row answer is timed)
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "SaveJobs": False,
        "LogLevel": "default",
    } | (extra or {})
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")  # noqa: SIM115 - open while Orthanc runs
    proc = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = urllib.request.Request(
                    url + "/system", headers={"Authorization": auth} if auth else {}
                )
                with urllib.request.urlopen(probe, timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "Orthanc did not start: " + (folder / "orthanc.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.1)
        yield Orthanc(url, dicom_port, "ORTHANC", folder, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
