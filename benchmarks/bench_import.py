"""`imag import` throughput of generated CT slices (512x512, 16-bit).

Measures instances/s and MB/s of a full `imag import` (parse, validate, hash,
durable object write, index commit) on SQLite and on PostgreSQL with the
filesystem store, and, side by side, Orthanc ingesting the same files the way
its own bulk import does (concurrent REST uploads to /instances, as
ImportDicomFiles.py), printed as a ratio.

    python -m benchmarks.bench_import --count 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

from archive.synthetic import generate_ct_series
from benchmarks import orthanc

PG_URL = os.environ.get("IMAG_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def imag_import(
    folder: Path, index_url: str, data_dir: Path, workers: int, store_as: str = "as-received"
) -> dict:
    env = {
        "PATH": os.environ["PATH"],
        "IMAG_DATA_DIR": str(data_dir),
        "IMAG_INDEX_URL": index_url,
        "IMAG_LOG_LEVEL": "WARNING",
        "IMAG_STORE_AS": store_as,
    }
    started = time.perf_counter()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "archive.cli",
            "import",
            "--json",
            "-q",
            "--workers",
            str(workers),
            str(folder),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"imag import failed ({run.returncode}): {run.stderr[-2000:]}")
    return json.loads(run.stdout) | {"wall": elapsed}


def orthanc_upload(folder: Path, clients: int) -> float:
    files = sorted(folder.iterdir())
    with orthanc.running_orthanc() as server:

        def post(path: Path) -> None:
            req = urllib.request.Request(
                server.http_url + "/instances",
                data=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            with urllib.request.urlopen(req, timeout=120) as resp:
                resp.read()

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(post, files))
        elapsed = time.perf_counter() - started
        with urllib.request.urlopen(server.http_url + "/statistics") as resp:
            stats = json.load(resp)
        assert stats["CountInstances"] == len(files), stats
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="CT slices (default 1000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument(
        "--policies",
        default="",
        help="also import under these store_as policies (SQLite), e.g. "
        "htj2k-lossless,j2k-lossless,jpegls-lossless,rle-lossless",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="imag-bench-") as tmp:
        tmp = Path(tmp)
        print(f"generating {args.count} CT slices 512x512 16-bit ...", file=sys.stderr)
        files = generate_ct_series(tmp / "ct", args.count, seed=11)
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"{args.count} files, {total_mb:.1f} MB; {args.workers} workers; {os.cpu_count()} CPUs"
        )
        rows: list[tuple[str, float]] = []

        result = imag_import(
            tmp / "ct", f"sqlite:///{tmp / 'sq' / 'index.db'}", tmp / "sq", args.workers
        )
        rows.append(("imag import, SQLite + filesystem", result["wall"]))

        db = f"imag_bench_{uuid.uuid4().hex[:8]}"
        try:
            with psycopg.connect(PG_URL, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'CREATE DATABASE "{db}"')
            try:
                url = PG_URL.rsplit("/", 1)[0] + "/" + db
                result = imag_import(tmp / "ct", url, tmp / "pg", args.workers)
                rows.append(("imag import, PostgreSQL + filesystem", result["wall"]))
            finally:
                with psycopg.connect(PG_URL, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        except psycopg.OperationalError as exc:
            print(f"PostgreSQL at {PG_URL} not reachable, skipped: {exc}", file=sys.stderr)

        orthanc_s = None
        if not args.no_orthanc and orthanc.available():
            orthanc_s = orthanc_upload(tmp / "ct", clients=args.workers * 2)
            rows.append((f"Orthanc REST upload ({args.workers * 2} clients)", orthanc_s))
        elif not args.no_orthanc:
            print("Orthanc not installed (apt-get install orthanc): no comparison", file=sys.stderr)

        stored: dict[str, float] = {}
        for policy in [p for p in args.policies.split(",") if p]:
            data = tmp / f"policy-{policy}"
            result = imag_import(
                tmp / "ct", f"sqlite:///{data / 'index.db'}", data, args.workers, store_as=policy
            )
            rows.append((f"imag import, SQLite, store_as={policy}", result["wall"]))
            stored[policy] = result["bytes_stored"] / 1e6

        print(f"{'':48} {'inst/s':>8} {'MB/s':>8} {'vs Orthanc':>10}")
        for name, seconds in rows:
            ratio = f"{orthanc_s / seconds:9.2f}x" if orthanc_s else ""
            print(f"{name:48} {args.count / seconds:8.0f} {total_mb / seconds:8.1f} {ratio:>10}")
        if stored:
            print(
                f"\nstored size of the {total_mb:.0f} MB received (synthetic CT: the noise "
                "level sets the ratios, clinical CT compresses better):"
            )
            for policy, mb in stored.items():
                print(
                    f"  {policy:18} {mb:8.1f} MB  ({100 * (1 - mb / total_mb):4.1f}% saved, "
                    f"ratio {total_mb / mb:.2f})"
                )


if __name__ == "__main__":
    main()
