"""Real DICOM network parts for the tests: an ``imag serve`` subprocess, dcmtk's
command-line tools, a dcmtk storescp, and comparisons of what was sent with
what came back.  Every part is a real process talking DICOM over TCP."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import evt

from tests.dcmtk import dcmtk
from tests.processes import HOST, ServerProcess, free_port

#: dcmtk's tools without Nagle's algorithm (each round trip would otherwise
#: wait ~40 ms for a delayed ACK).
TOOL_ENV = {**os.environ, "TCP_NODELAY": "1"}
SERVER_AET = "IMAG"


def run_tool(
    tool: str, *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run a dcmtk tool (by name, or by path); its output (stdout + stderr) is in
    ``.stdout``."""
    return subprocess.run(
        [tool if os.path.isabs(tool) else dcmtk(tool), *args],
        env=TOOL_ENV,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )


def echo(port: int, aet: str, called: str = SERVER_AET) -> subprocess.CompletedProcess:
    return run_tool("echoscu", "-aec", called, "-aet", aet, HOST, str(port), timeout=30)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a TOML basic string


@dataclass
class ImagServer(ServerProcess):
    """``imag serve`` in a subprocess with its own data folder, config file and
    free ports; ``peers`` become ``[[dicom.peers]]`` tables, ``settings`` other
    TOML tables (``{"ingest": {"max_object_bytes": "100KB"}}``)."""

    workdir: Path
    index_url: str
    peers: list[dict]
    settings: dict[str, dict] = field(default_factory=dict)
    probe_aet: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. S3 credentials
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.config = self.workdir / "imag.toml"
        lines = [f"data_dir = {_toml_value(self.data_dir)}", "", "[index]"]
        lines.append(f"url = {_toml_value(self.index_url)}")
        for section, values in self.settings.items():
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        for peer in self.peers:
            lines += ["", "[[dicom.peers]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in peer.items()]
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.probe_aet = self.probe_aet or self.peers[0]["aet"]

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "IMAG_HTTP_PORT": str(self.http_port),
            "IMAG_DICOM_PORT": str(self.dicom_port),
            "IMAG_LOG_FORMAT": "text",
            **self.extra_env,
        }

    @property
    def log_path(self) -> Path:
        return self.workdir / f"serve-{self.starts}.log"

    def log(self) -> str:
        """Everything every run of the server wrote on stderr so far."""
        return "".join(
            (self.workdir / f"serve-{n}.log").read_text(encoding="utf-8", errors="replace")
            for n in range(1, self.starts + 1)
        )

    def start(self, timeout: float = 60) -> ImagServer:
        """Start and wait until the DICOM port answers a C-ECHO and the HTTP
        port accepts connections (the DICOM listener opens first, while the
        plugins' routes still load)."""
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "archive.cli", "--config", str(self.config), "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"imag serve exited {self.proc.returncode}:\n{self.log()}")
            # echoscu, not a bare TCP connect: a connection that never sends an
            # A-ASSOCIATE-RQ holds an association slot until the ACSE timeout
            if echo(self.dicom_port, self.probe_aet).returncode == 0 and self._http_up():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"imag serve did not answer C-ECHO:\n{self.log()}")
            time.sleep(0.1)

    def _http_up(self) -> bool:
        try:
            socket.create_connection((HOST, self.http_port), timeout=1).close()
        except OSError:
            return False
        return True

    def imag(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run another ``imag`` command on the same configuration."""
        return subprocess.run(
            [sys.executable, "-m", "archive.cli", "--config", str(self.config), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # -- dcmtk tools against this server ----------------------------------------------

    def echoscu(self, aet: str, called: str = SERVER_AET) -> subprocess.CompletedProcess:
        return echo(self.dicom_port, aet, called)

    def storescu(self, aet: str, files: Sequence[Path], profile: Path) -> subprocess.Popen:
        """Start storescu proposing ``profile`` (see :func:`storescu_profile`)."""
        return subprocess.Popen(
            [dcmtk("storescu"), "-xf", str(profile), "Push", "-aec", SERVER_AET, "-aet", aet, HOST]
            + [str(self.dicom_port), *map(str, files)],
            env=TOOL_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            encoding="utf-8",
            errors="replace",
        )

    def findscu(
        self, aet: str, model: str, keys: dict[str, str], *extra: str
    ) -> tuple[subprocess.CompletedProcess, list[Dataset]]:
        """C-FIND with ``-P`` (patient root) or ``-S`` (study root); the answers
        are the response identifiers findscu extracted, in order."""
        with tempfile.TemporaryDirectory() as out:
            run = run_tool(
                "findscu",
                model,
                "-X",
                "-od",
                out,
                "-aec",
                SERVER_AET,
                "-aet",
                aet,
                *extra,
                *_keys(keys),
                HOST,
                str(self.dicom_port),
            )
            answers = [pydicom.dcmread(p) for p in sorted(Path(out).glob("rsp*.dcm"))]
        return run, answers

    def getscu(
        self, aet: str, keys: dict[str, str], outdir: Path, *extra: str
    ) -> tuple[subprocess.CompletedProcess, dict[str, Path]]:
        """C-GET (study root) into ``outdir``; the files received by SOP Instance UID."""
        outdir.mkdir(parents=True, exist_ok=True)
        run = run_tool(
            "getscu",
            "-S",
            "+B",
            "-od",
            str(outdir),
            "-aec",
            SERVER_AET,
            "-aet",
            aet,
            *extra,
            *_keys(keys),
            HOST,
            str(self.dicom_port),
        )
        return run, by_sop_instance(outdir.iterdir())

    def movescu(
        self, aet: str, destination: str, keys: dict[str, str]
    ) -> subprocess.CompletedProcess:
        return run_tool(
            "movescu",
            "-S",
            "-v",
            "-aec",
            SERVER_AET,
            "-aet",
            aet,
            "-aem",
            destination,
            *_keys(keys),
            HOST,
            str(self.dicom_port),
        )


def _keys(keys: dict[str, str]) -> list[str]:
    out = []
    for keyword, value in keys.items():
        out += ["-k", f"{keyword}={value}" if value is not None else keyword]
    return out


class StoreSCP:
    """dcmtk's storescp accepting every transfer syntax, writing what it
    receives bit for bit (``+B``) into ``outdir``."""

    def __init__(self, aet: str, outdir: Path) -> None:
        self.aet = aet
        self.outdir = outdir
        self.port = free_port()
        outdir.mkdir(parents=True, exist_ok=True)
        self.log = outdir.parent / f"{aet.lower()}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [dcmtk("storescp"), "-aet", aet, "+xa", "+B", "-od", str(outdir), str(self.port)],
                env=TOOL_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while echo(self.port, "PROBE", called=aet).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("storescp did not start: " + self.log.read_text())
            time.sleep(0.05)

    def received(self) -> dict[str, Path]:
        return by_sop_instance(self.outdir.iterdir())

    def clear(self) -> None:
        for path in self.outdir.iterdir():
            path.unlink()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def storescu_profile(files: Iterable[Path], path: Path) -> Path:
    """A storescu association profile proposing, for each SOP class of
    ``files``, each of their transfer syntaxes (and the two little endian
    ones) in a presentation context of its own, so that storescu sends every
    file in the syntax it is stored in."""
    pairs: dict[str, set[str]] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        pairs.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    little = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}
    syntaxes = sorted(set().union(*pairs.values()) | little)
    lines = ["[[TransferSyntaxes]]"]
    for n, ts in enumerate(syntaxes):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    n = 0
    for sop_class, ts_set in sorted(pairs.items()):
        for ts in sorted(ts_set | little):
            n += 1
            lines.append(f"PresentationContext{n} = {sop_class}\\TS{syntaxes.index(ts)}")
    assert n <= 128, "too many presentation contexts for one association"
    lines += ["[[Profiles]]", "[Push]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- comparing what was sent with what came back -------------------------------------------


def by_sop_instance(paths: Iterable[Path]) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in paths
        if p.is_file()
    }


def split_part10(data: bytes) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of a Part 10 file; a deflated data set
    is inflated, so that two encodings of the same data set compare equal."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    ts = str(meta.TransferSyntaxUID)
    body = data[fp.tell() :]
    if ts == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    return ts, body


def assert_same_instance(sent: Path, received: Path | bytes) -> None:
    """The received object holds the same attributes and the same pixel values
    as the file sent (in whatever transfer syntax it arrived)."""
    a = pydicom.dcmread(sent)
    b = pydicom.dcmread(io.BytesIO(received) if isinstance(received, bytes) else received)
    skip = {0x7FE00010}
    differing = [
        str(elem.tag) + " " + elem.keyword
        for elem in a
        if elem.tag not in skip and (elem.tag not in b or b[elem.tag] != elem)
    ]
    extra = [
        str(e.tag) for e in b if e.tag not in a and e.tag.group != 0x0002 and e.tag not in skip
    ]
    assert not differing, f"elements differ: {differing}"
    assert not extra, f"unexpected elements {extra}"
    assert np.array_equal(a.pixel_array, b.pixel_array), "pixel values differ"


# -- raw sockets, for the hostile tests -----------------------------------------------------


def capture_associate_rq(calling: str, contexts: list, called: str = SERVER_AET) -> bytes:
    """The bytes of the A-ASSOCIATE-RQ pynetdicom sends for ``contexts``
    (captured by a listening socket that answers nothing)."""
    from pynetdicom import AE

    captured: dict[str, bytes] = {}
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def take() -> None:
            conn, _ = listener.accept()
            with conn:
                header = recv_exactly(conn, 6)
                captured["pdu"] = header + recv_exactly(conn, int.from_bytes(header[2:], "big"))

        thread = threading.Thread(target=take)
        thread.start()
        ae = AE(ae_title=calling)
        ae.acse_timeout = 1
        ae.requested_contexts = contexts
        assoc = ae.associate(HOST, port, ae_title=called)
        thread.join(10)
        if assoc.is_established:
            assoc.abort()
        ae.shutdown()
    return captured["pdu"]


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_pdu(conn: socket.socket) -> bytes:
    header = recv_exactly(conn, 6)
    return header + recv_exactly(conn, int.from_bytes(header[2:], "big"))


def nodelay(event: object) -> None:
    """EVT_CONN_OPEN handler for pynetdicom clients: no Nagle delay (each
    C-STORE would otherwise wait ~40 ms for a delayed ACK)."""
    sock = event.assoc.dul.socket.socket  # type: ignore[attr-defined]
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: pass as ``evt_handlers`` to ``AE.associate``
CLIENT_HANDLERS = [(evt.EVT_CONN_OPEN, nodelay)]
