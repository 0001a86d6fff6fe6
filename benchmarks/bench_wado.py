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
  whole, MB/s, best and median of ``--repeats``.

Issue 17's targets: metadata <= 300 ms cached and <= 3 s cold; retrieval >= 1x
Orthanc's MB/s.

    .venv/bin/python -m benchmarks.bench_wado [--instances 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

from archive.synthetic import StudySpec, modality_preset, write_study
from benchmarks import orthanc
from benchmarks.bench_viewer import running_imag

ACCEPT_SERIES = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(call: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    size = call()
    return time.perf_counter() - started, size


def figures(http: requests.Session, base: str, study: str, series: str, repeats: int) -> dict:
    """Metadata cold and cached, series retrieval MB/s, from ``base`` (the
    DICOMweb root)."""

    def metadata() -> int:
        answer = http.get(f"{base}/studies/{study}/metadata", timeout=600,
                          headers={"Accept": "application/dicom+json"})  # fmt: skip
        answer.raise_for_status()
        return len(answer.json())

    def retrieve() -> int:
        answer = http.get(f"{base}/studies/{study}/series/{series}", timeout=600,
                          headers={"Accept": ACCEPT_SERIES}, stream=True)  # fmt: skip
        answer.raise_for_status()
        return sum(len(chunk) for chunk in answer.iter_content(1 << 20))

    cold, count = timed(metadata)
    cached = [timed(metadata)[0] for _ in range(repeats)]
    rates, size = [], 0
    for _ in range(repeats):
        seconds, size = timed(retrieve)
        rates.append(size / seconds / 1e6)
    return {
        "instances": count,
        "cold_ms": cold * 1000,
        "cached_ms": statistics.median(cached) * 1000,
        "mb": size / 1e6,
        "best_mbs": max(rates),
        "median_mbs": statistics.median(rates),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-orthanc", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imag-bench-wado-"))
    spec = StudySpec(
        patient_id="WADO-1",
        patient_name="BENCH^WADO",
        study_description="WADO BENCH",
        series=[modality_preset("CT", instances=args.instances)],
    )
    progress(f"writing {args.instances} CT slices ...")
    paths = write_study(spec, tmp / "study")
    study, series = spec.study_uid, spec.series[0].series_uid
    table: list[tuple[str, dict]] = []
    progress("IMAG: importing ...")
    with running_imag(tmp, {"study": tmp / "study"}, {"IMAG_STORE_AS": "as-received"}) as (
        url,
        token,
    ):
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        progress("IMAG: measuring ...")
        table.append(("IMAG", figures(http, url + "/dicom-web", study, series, args.repeats)))
    if not args.no_orthanc and orthanc.available() and orthanc.dicomweb_plugin():
        extra = {
            "Plugins": [orthanc.dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        with orthanc.running_orthanc(extra) as server:
            progress("Orthanc: uploading ...")
            http = requests.Session()
            for path in paths:
                http.post(server.http_url + "/instances", data=path.read_bytes(),
                          timeout=300).raise_for_status()  # fmt: skip
            progress("Orthanc: measuring ...")
            table.append(
                (
                    "Orthanc",
                    figures(http, server.http_url + "/dicom-web", study, series, args.repeats),
                )  # fmt: skip
            )
    else:
        print("Orthanc: not measured (install the Debian orthanc and orthanc-dicomweb packages)")
    print(f"\n{args.instances} CT slices in one series, {table[0][1]['mb']:.0f} MB")
    print(f"{'archive':8} {'metadata cold ms':>17} {'cached ms':>10} {'series MB/s best':>17} "
          f"{'median':>7}")  # fmt: skip
    for name, f in table:
        print(f"{name:8} {f['cold_ms']:>17.0f} {f['cached_ms']:>10.0f} {f['best_mbs']:>17.0f} "
              f"{f['median_mbs']:>7.0f}")  # fmt: skip
    if len(table) == 2:
        imag, other = table[0][1], table[1][1]
        print(
            f"IMAG/Orthanc: metadata cold {imag['cold_ms'] / other['cold_ms']:.2f}x the time, "
            f"cached {imag['cached_ms'] / other['cached_ms']:.2f}x; "
            f"retrieval {imag['median_mbs'] / other['median_mbs']:.2f}x the rate"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
