"""Viewer speed: time to the first image and to a whole series over loopback.

For a CT (100 slices of 512 x 512), a screening MG (4 views of 4096 x 3328,
12 bits: ~27 MB each uncompressed) and a DX (2 images of 2048 x 1680), this
starts ``imag serve`` on a fresh data folder storing HTJ2K lossless (the
region's policy), imports the studies, and times what the share viewer does:

* first image: ``/api/view/study``, the first series' instance list, then
  its first frame at the displayed size (``viewport``), on a cold server;
* full series: every frame of that series at that size, 4 requests at a
  time (the page's prefetch).

Twice: "before" (``viewer.reduced_decoding = false``, no render cache: every
frame decoded in full, as the WADO-RS rendered path does) and "after" (the
viewer's reduced-resolution decoding and cache, cold then warm).  Side by
side, the same frames from Orthanc's rendered endpoint (Debian ``orthanc``;
its DICOMweb plugin's ``/rendered?viewport=`` when installed, else
``/instances/{id}/frames/0/rendered?width=&height=``), loaded with the
uncompressed originals, which its core decodes without plugins.

    .venv/bin/python -m benchmarks.bench_viewer [--viewport 1024,1024] [--ct 100] [--no-orthanc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from archive.synthetic import StudySpec, modality_preset, write_study
from benchmarks import orthanc

REPO = Path(__file__).resolve().parent.parent
PARALLEL = 4


def studies(ct: int) -> dict[str, StudySpec]:
    def spec(name: str, series: object) -> StudySpec:
        return StudySpec(
            patient_id=f"VIEW-{name}",
            patient_name=f"BENCH^{name}",
            study_description=f"{name} VIEWER BENCH",
            series=[series],  # type: ignore[list-item]
        )

    return {
        "CT": spec("CT", modality_preset("CT", instances=ct)),
        "MG": spec("MG", modality_preset("MG", rows=4096, columns=3328, instances=4)),
        "DX": spec("DX", modality_preset("DX", instances=2)),
    }


@dataclass
class Figures:
    first: float
    series: float
    frames: int


@contextmanager
def running_imag(
    tmp: Path, folders: dict[str, Path], settings: dict[str, str]
) -> Iterator[tuple[str, str]]:
    """``imag serve`` on a fresh data folder holding the studies; its URL and
    the admin token its first start wrote."""
    data = Path(tempfile.mkdtemp(prefix="imag-view-", dir=tmp))
    port = orthanc.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAG_")}
    env |= {
        "IMAG_DATA_DIR": str(data),
        "IMAG_HTTP_PORT": str(port),
        "IMAG_DICOM_ENABLED": "false",
        "IMAG_STORE_AS": "htj2k-lossless",
        "IMAG_LOG_LEVEL": "WARNING",
    } | settings
    cli = [sys.executable, "-m", "archive.cli"]
    for folder in folders.values():
        subprocess.run([*cli, "import", "-q", str(folder)], env=env, cwd=REPO, check=True)
    log = open(data / "serve.log", "w")  # noqa: SIM115 - open while it runs
    proc = subprocess.Popen([*cli, "serve"], env=env, cwd=REPO, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((data / "serve.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        yield url, (data / "admin-token").read_text().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def imag_figures(url: str, token: str, study: str, viewport: str) -> Figures:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    start = time.perf_counter()
    body = http.get(f"{url}/api/view/study", params={"study": study}, timeout=120).json()
    series = body["series"][0]
    instances = http.get(url + series["url"], timeout=120).json()["instances"]
    frames = [(i["uid"], f) for i in instances for f in range(1, i["frames"] + 1)]

    def fetch(frame: tuple[str, int]) -> None:
        link = body["image_url"].format(instance=frame[0], frame=frame[1])
        answer = http.get(url + link, params={"viewport": viewport}, timeout=300)
        answer.raise_for_status()

    fetch(frames[0])
    first = time.perf_counter() - start
    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(fetch, frames))
    return Figures(first, time.perf_counter() - start, len(frames))


def orthanc_figures(server: orthanc.Orthanc, study: str, viewport: str, web: bool) -> Figures:
    http = requests.Session()
    width, height = viewport.split(",")
    start = time.perf_counter()
    found = http.post(
        server.http_url + "/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study}, "Expand": True},
        timeout=120,
    ).json()
    found.sort(key=lambda i: int(i["MainDicomTags"].get("InstanceNumber") or 0))

    def fetch(item: dict) -> None:
        if web:
            tags = item["MainDicomTags"]
            meta = http.get(f"{server.http_url}/instances/{item['ID']}/tags?simplify", timeout=60)
            info = meta.json()
            link = (
                f"{server.http_url}/dicom-web/studies/{study}/series/{info['SeriesInstanceUID']}"
                f"/instances/{tags['SOPInstanceUID']}/frames/1/rendered"
            )
            # the comma unescaped: Orthanc's plugin refuses viewport=W%2CH (400)
            answer = http.get(f"{link}?viewport={viewport}", timeout=300)
            if answer.status_code != 400:
                answer.raise_for_status()
                return
        # Orthanc's core rendering (also where its plugin refuses the viewport)
        answer = http.get(
            f"{server.http_url}/instances/{item['ID']}/frames/0/rendered",
            params={"width": width, "height": height, "smooth": "1"},
            headers={"Accept": "image/jpeg"},
            timeout=300,
        )
        answer.raise_for_status()

    fetch(found[0])
    first = time.perf_counter() - start
    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(fetch, found))
    return Figures(first, time.perf_counter() - start, len(found))


def measure(label: str, run: Callable[[], Figures], table: list[tuple[str, Figures]]) -> None:
    figures = run()
    table.append((label, figures))
    print(
        f"{label:<34} first image {figures.first * 1000:8.0f} ms   "
        f"series ({figures.frames} frames) {figures.series * 1000:8.0f} ms",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewport", default="1024,1024", help="displayed size (W,H)")
    parser.add_argument("--ct", type=int, default=100, help="CT slices")
    parser.add_argument("--no-orthanc", action="store_true", help="skip Orthanc")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imag-bench-viewer-"))
    table: list[tuple[str, Figures]] = []
    try:
        specs = studies(args.ct)
        folders = {}
        for name, spec in specs.items():
            folders[name] = tmp / name
            write_study(spec, folders[name])
        uids = {name: str(spec.study_uid) for name, spec in specs.items()}
        runs = {
            "before (full decode, no cache)": {
                "IMAG_VIEWER_REDUCED_DECODING": "false",
                "IMAG_VIEWER_RENDER_CACHE_BYTES": "0",
            },
            "after (reduced decode + cache)": {},
        }
        for label, settings in runs.items():
            with running_imag(tmp, folders, settings) as (url, token):
                for name, study in uids.items():
                    measure(
                        f"IMAG {name} {label}",
                        lambda s=study: imag_figures(url, token, s, args.viewport),
                        table,
                    )
                    if settings == {}:
                        measure(
                            f"IMAG {name} warm (cached)",
                            lambda s=study: imag_figures(url, token, s, args.viewport),
                            table,
                        )
        if not args.no_orthanc and orthanc.available():
            web = bool(orthanc.dicomweb_plugin())
            extra = {"Plugins": [orthanc.dicomweb_plugin()]} if web else {}
            with orthanc.running_orthanc(extra) as server:
                for folder in folders.values():
                    for path in sorted(folder.iterdir()):
                        requests.post(
                            server.http_url + "/instances", data=path.read_bytes(), timeout=300
                        ).raise_for_status()
                for name, study in uids.items():
                    measure(
                        f"Orthanc {name} rendered",
                        lambda s=study: orthanc_figures(server, s, args.viewport, web),
                        table,
                    )
        print(json.dumps({label: vars(f) for label, f in table}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
