"""WADO-RS figures beside Orthanc: a large study's metadata, cold and cached,
and the retrieval rate of a whole series.

One synthetic CT study of ``--instances`` slices (512 x 512, 16 bits: about
512 KB each; 1,000 by default, the issue's "1,000-instance study") in one
series is imported into a fresh ``imag serve`` (stored as received, the
embedded default) and posted to a fresh Orthanc (Debian ``orthanc`` +
``orthanc-dicomweb``) through its REST API.  Then, over one keep-alive HTTP
connection to each:

* study metadata (``GET /dicom-web/studies/{uid}/metadata``): the first
  request after the server started (cold: nothing cached), then the median
  of ``--repeats`` more (cached);
* series retrieval (``GET .../series/{uid}``, ``multipart/related;
  type="application/dicom"``, the stored transfer syntax): the body read
  whole, MB/s, best and median of ``--repeats``, and the server's CPU time
  per GB sent (user + system, from /proc: less sensitive than the rate to
  what else the machine runs).

Both servers run side by side and their requests alternate (IMAG, Orthanc,
IMAG, ...), so a burst of other work on a shared machine weighs on both
rather than on whichever was measured during it.

Issue 17's targets: metadata <= 300 ms cached and <= 3 s cold; retrieval >= 1x
Orthanc's MB/s.

    .venv/bin/python -m benchmarks.bench_wado [--instances 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from archive.synthetic import StudySpec, modality_preset, write_study
from benchmarks import orthanc
from benchmarks.bench_dimse import cpu_seconds
from benchmarks.bench_viewer import running_imag

ACCEPT_SERIES = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def server_pid(port: int) -> int:
    """The process listening on ``port`` on loopback (0: not found)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid or 0
    return 0


@dataclass
class Server:
    """One archive under test: its DICOMweb root, an HTTP session, its process."""

    name: str
    base: str
    http: requests.Session
    pid: int
    cold_ms: float = 0.0
    cached: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    cpu_per_gb: list[float] = field(default_factory=list)
    mb: float = 0.0


def metadata(server: Server, study: str) -> float:
    started = time.perf_counter()
    answer = server.http.get(f"{server.base}/studies/{study}/metadata", timeout=600,
                             headers={"Accept": "application/dicom+json"})  # fmt: skip
    answer.raise_for_status()
    answer.json()
    return time.perf_counter() - started


def retrieve(server: Server, study: str, series: str) -> None:
    """One series retrieval: its rate, and the server's CPU time per GB."""
    cpu = cpu_seconds(server.pid) if server.pid else None
    started = time.perf_counter()
    answer = server.http.get(f"{server.base}/studies/{study}/series/{series}", timeout=600,
                             headers={"Accept": ACCEPT_SERIES}, stream=True)  # fmt: skip
    answer.raise_for_status()
    size = sum(len(chunk) for chunk in answer.iter_content(1 << 20))
    seconds = time.perf_counter() - started
    server.mb = size / 1e6
    server.rates.append(size / seconds / 1e6)
    after = cpu_seconds(server.pid) if server.pid else None
    if cpu is not None and after is not None:
        server.cpu_per_gb.append((after - cpu) / (size / 1e9))


def measure(servers: list[Server], study: str, series: str, repeats: int) -> None:
    """Metadata cold (each server's first request) and cached, then the
    series retrieval, the servers' requests alternating."""
    for server in servers:
        server.cold_ms = metadata(server, study) * 1000
    for _ in range(repeats):
        for server in servers:
            server.cached.append(metadata(server, study) * 1000)
    for _ in range(repeats):
        for server in servers:
            retrieve(server, study, series)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-orthanc", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imag-bench-wado-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the study: 526 MB by default
    return 0


def run(args: argparse.Namespace, tmp: Path) -> None:
    spec = StudySpec(
        patient_id="WADO-1",
        patient_name="BENCH^WADO",
        study_description="WADO BENCH",
        series=[modality_preset("CT", instances=args.instances)],
    )
    progress(f"writing {args.instances} CT slices ...")
    paths = write_study(spec, tmp / "study")
    study, series = spec.study_uid, spec.series[0].series_uid
    progress("IMAG: importing ...")
    with ExitStack() as stack:
        url, token = stack.enter_context(
            running_imag(tmp, {"study": tmp / "study"}, {"IMAG_STORE_AS": "as-received"})
        )
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        port = int(url.rsplit(":", 1)[1])
        servers = [Server("IMAG", url + "/dicom-web", http, server_pid(port))]
        if not args.no_orthanc and orthanc.available() and orthanc.dicomweb_plugin():
            extra = {
                "Plugins": [orthanc.dicomweb_plugin()],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            }
            other = stack.enter_context(orthanc.running_orthanc(extra))
            progress("Orthanc: uploading ...")
            http = requests.Session()
            for path in paths:
                http.post(other.http_url + "/instances", data=path.read_bytes(),
                          timeout=300).raise_for_status()  # fmt: skip
            servers.append(Server("Orthanc", other.http_url + "/dicom-web", http, other.pid))
        else:
            print(
                "Orthanc: not measured (install the Debian orthanc and orthanc-dicomweb packages)"
            )
        progress("measuring ...")
        measure(servers, study, series, args.repeats)
    print(f"\n{args.instances} CT slices in one series, {servers[0].mb:.0f} MB")
    print(f"{'archive':8} {'metadata cold ms':>17} {'cached ms':>10} {'series MB/s best':>17} "
          f"{'median':>7} {'CPU s/GB':>9}")  # fmt: skip
    for f in servers:
        cpu = f"{statistics.median(f.cpu_per_gb):9.2f}" if f.cpu_per_gb else f"{'-':>9}"
        print(f"{f.name:8} {f.cold_ms:>17.0f} {statistics.median(f.cached):>10.0f} "
              f"{max(f.rates):>17.0f} {statistics.median(f.rates):>7.0f} {cpu}")  # fmt: skip
    if len(servers) == 2:
        imag, other = servers
        ratio = statistics.median(imag.rates) / statistics.median(other.rates)
        print(
            f"IMAG/Orthanc: metadata cold {imag.cold_ms / other.cold_ms:.2f}x the time, "
            f"cached {statistics.median(imag.cached) / statistics.median(other.cached):.2f}x; "
            f"retrieval {ratio:.2f}x the rate"
        )
    print(f"load average: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    sys.exit(main())
