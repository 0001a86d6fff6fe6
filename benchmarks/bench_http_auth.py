"""What security costs on the HTTP path: QIDO-RS latency with authentication,
scoping and the audit entry of every request, beside Orthanc with HTTP
authentication on (Debian ``orthanc`` + ``orthanc-dicomweb``).

1. ``imag import`` a mixed set of small studies (sites A and B), then ``imag
   serve`` on SQLite with authentication on.
2. Median and p95 of N QIDO-RS ``/studies?PatientID=..`` requests over one
   keep-alive connection: as the admin (no scope), as a site-A radiologist
   (scope clause in the SQL), and with authentication off (still audited).
3. The same query on Orthanc (basic authentication, same studies), as a ratio.

    python -m benchmarks.bench_http_auth --studies 200 --repeats 200
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from archive.synthetic import generate_mixed_set
from benchmarks import orthanc


def progress(message: str) -> None:
    print(f"[bench_http_auth] {message}", file=sys.stderr, flush=True)


def imag(env: dict[str, str], *args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "archive.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if run.returncode not in (0, 2):
        raise RuntimeError(f"imag {' '.join(args)} failed:\n{run.stderr[-2000:]}")
    return run.stdout


@contextmanager
def serving(env: dict[str, str]) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "archive.cli", "serve"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{env['IMAG_HTTP_PORT']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("imag serve did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def latency(call: Callable[[], requests.Response], repeats: int) -> tuple[float, float]:
    """Median and p95 in milliseconds (after 10 warm-up calls)."""
    for _ in range(10):
        call().raise_for_status()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        answer = call()
        times.append((time.perf_counter() - started) * 1000)
        answer.raise_for_status()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--no-orthanc", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="imag-bench-auth-"))
    try:
        progress(f"generating {args.studies} small studies (half site A, half site B)")
        specs = generate_mixed_set(tmp / "A", studies=args.studies // 2, seed=7)
        generate_mixed_set(tmp / "B", studies=args.studies - args.studies // 2, seed=8)
        patient = specs[len(specs) // 2].patient_id
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        env = {
            "PATH": os.environ["PATH"],
            "IMAG_DATA_DIR": str(tmp / "imag"),
            "IMAG_HTTP_PORT": str(orthanc.free_port()),
            "IMAG_DICOM_ENABLED": "false",
            "IMAG_LOG_LEVEL": "WARNING",
        }
        for site in ("A", "B"):
            imag(env, "import", str(tmp / site), "--site", site, "--quiet")
        imag(env, "user", "add", "bench-admin", "--role", "admin")
        admin = imag(env, "token", "create", "bench-admin").strip()
        imag(env, "user", "add", "rad-a", "--role", "radiologist", "--site", "A")
        radiologist = imag(env, "token", "create", "rad-a").strip()
        query = f"/dicom-web/studies?PatientID={patient}"
        figures: dict[str, tuple[float, float]] = {}
        with serving(env) as url:
            for name, token in (("admin token", admin), ("radiologist of site A", radiologist)):
                session = requests.Session()
                session.headers["Authorization"] = f"Bearer {token}"
                progress(f"IMAG QIDO-RS as {name}")
                figures[f"IMAG, {name}"] = latency(
                    lambda s=session: s.get(url + query, timeout=30), args.repeats
                )
        with serving(env | {"IMAG_AUTH_ENABLED": "false"}) as url:
            session = requests.Session()
            progress("IMAG QIDO-RS, authentication off")
            figures["IMAG, authentication off"] = latency(
                lambda: session.get(url + query, timeout=30), args.repeats
            )
        audited = imag(env, "audit", "--json").count("\n")
        if not args.no_orthanc and orthanc.available() and orthanc.dicomweb_plugin():
            figures["Orthanc, basic auth"] = orthanc_figure(files, query, args.repeats)
        print(f"QIDO-RS {query!r}, {args.studies} studies, SQLite, median / p95 ms:")
        base = figures.get("Orthanc, basic auth")
        for name, (median, p95) in figures.items():
            ratio = (
                f"  ({base[0] / median:.2f}x Orthanc's speed)" if base and "IMAG" in name else ""
            )
            print(f"  {name:<30} {median:7.2f} / {p95:7.2f}{ratio}")
        print(f"audit entries written: {audited}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def orthanc_figure(files: list[Path], query: str, repeats: int) -> tuple[float, float]:
    progress("Orthanc: import and QIDO-RS with basic authentication")
    auth = "Basic " + base64.b64encode(b"bench:bench-password").decode()
    extra = {
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"bench": "bench-password"},
        "Plugins": [orthanc.dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    with orthanc.running_orthanc(extra, auth=auth) as server:
        session = requests.Session()
        session.headers["Authorization"] = auth
        for path in files:
            session.post(server.http_url + "/instances", data=path.read_bytes(), timeout=60)
        return latency(lambda: session.get(server.http_url + query, timeout=30), repeats)


if __name__ == "__main__":
    sys.exit(main())
