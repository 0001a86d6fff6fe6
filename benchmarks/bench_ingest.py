"""CPU and wall time of the ingest pipeline alone (no network), per instance.

What a C-STORE costs the server once its bytes are in memory: the one ingest
pipeline (:meth:`archive.ingest.IngestPipeline.ingest`: parse and validate the
header, the digests, the durable object write, the index commit with its
audit entry), on the data set of ``bench_dimse`` (512x512 16-bit CT slices,
explicit VR little endian, ~525 KB each), in one process, from 1 and from N
threads (as N associations hand instances to it), into a fresh archive
(filesystem store, SQLite by default).  The objects are read into memory
first, so only the pipeline is measured.  CPU is the process's (every thread:
``time.process_time``).

``--stages`` also times each step alone on the same objects (CPU of the
calling thread), to say where the time goes.

    python -m benchmarks.bench_ingest --count 1000
    python -m benchmarks.bench_ingest --count 300 --threads 1,4 --stages

Where the time went (issue 17; 2 cores, SHA-NI, ext4, SQLite; CPU ms per
instance of each step alone, best of rounds with fresh copies of the objects
as a receiver hands them, ``--stages``; the machine was shared with other
work, load 2-6, so only the smallest figures seen are given; py-spy agrees):

=========================================  ========  ======================
step                                       CPU ms    after this slice
=========================================  ========  ======================
parse_header (pydicom; 0.31 of it converts   0.73    the same
  the 24 attributes the pipeline reads)
second file meta read (dataset_offset)       0.07    gone (Header.dataset_start)
SHA-256 of the whole object                  0.29    in a spare thread (*)
SHA-256 of the data set                      0.29    the same
content digest (element walk + SHA-256)      0.38    the same
index_fields                                 0.02    the same
object write + fsync file, rename, fsync     0.44    write + fsync file in a
  folder (store.put)                                   spare thread (*), then
                                                       rename + fsync folder 0.15
index commit, writer thread (batch, audit)   0.65    the same
whole pipeline, serial (process CPU)         3.7     3.7 (within noise)
=========================================  ========  ======================

(*) only when fewer instances are in preparation than cores (a lone
sender): the work is the same, the wait for it overlaps the hashing.

The three SHA-256 passes are each required: the whole object's digest names
the object and is what ``imag verify`` checks, the data set digest and the
content digest decide duplicates and conflicts against rows already stored
(their definitions cannot change without turning stored duplicates into
conflicts), and SHA-256 states cannot be combined.  There is no second
parse for the index record (index_fields reads values the parse converted).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

from archive.config import load_config
from archive.contentdigest import content_digest
from archive.identity import Source
from archive.index.catalog import Origin
from archive.parse import Limits, dataset_offset, index_fields, parse_header
from archive.runtime import Archive
from archive.synthetic import generate_ct_series
from benchmarks.bench_dimse import CT_SEED


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def c_store_source() -> Source:
    """A source as a C-STORE peer's: its audit entry is committed with each
    instance's index row (the path bench_dimse measures)."""
    origin = Origin("BENCH", "peer", role=None, source="BENCH@127.0.0.1", site="")
    return Source(kind="dicom", site="", calling_aet="BENCH", address="127.0.0.1", origin=origin)


def run_pipeline(objects: list[bytes], threads: int, data_dir: Path) -> dict:
    """Ingest every object into a fresh archive from ``threads`` threads;
    return CPU and wall ms per instance and the rate."""
    if data_dir.exists():
        shutil.rmtree(data_dir)
    url = f"sqlite:///{data_dir / 'index.db'}"
    config = load_config(
        env={}, overrides={"data_dir": str(data_dir), "index.url": url, "log.level": "WARNING"}
    )
    source = c_store_source()
    with Archive(config) as archive:
        pipeline = archive.pipeline
        failures: list[str] = []

        def one(data: bytes) -> None:
            result = pipeline.ingest(data, source)
            if not result.ok:
                failures.append(f"{result.code}: {result.reason}")

        cpu0, wall0 = time.process_time(), time.perf_counter()
        if threads == 1:
            for data in objects:
                one(data)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, objects))
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
    if failures:
        raise SystemExit(f"{len(failures)} instances failed, e.g. {failures[0]}")
    n = len(objects)
    return {
        "threads": threads,
        "cpu_ms": 1000 * cpu / n,
        "wall_ms": 1000 * wall / n,
        "rate": n / wall,
    }


def time_stages(objects: list[bytes], data_dir: Path, rounds: int = 3) -> dict[str, float]:
    """CPU ms per instance of each step of the pipeline, alone, in the calling
    thread: the best of ``rounds`` rounds over the objects (other work on the
    machine only ever adds), each object a fresh copy as a receiver hands it
    (hashing an object that has sat in memory for long is slower).  The index
    commit is the writer thread's CPU per instance during a serial ingest."""
    limits = Limits()
    config = load_config(env={}, overrides={"data_dir": str(data_dir / "stages")})
    with Archive(config) as archive:
        store = archive.store
        header = parse_header(objects[0], limits)
        ts = header.transfer_syntax
        start = dataset_offset(BytesIO(objects[0]))
        keys = iter(range(10**9))
        staged: list = []
        stages: dict[str, Callable[[bytes], object]] = {
            "parse_header": lambda d: parse_header(d, limits),
            "dataset_offset (2nd file meta read)": lambda d: dataset_offset(BytesIO(d)),
            "SHA-256 whole object": lambda d: hashlib.sha256(d),
            "SHA-256 data set": lambda d: hashlib.sha256(memoryview(d)[start:]),
            "content digest (walk + SHA-256)": lambda d: content_digest(BytesIO(d), start, ts),
            "index_fields": lambda d: index_fields(header.dataset),
            "store.put: write, fsync file + folder": lambda d: store.put(f"a/{next(keys)}", d),
            "store.stage: write + fsync file": lambda d: staged.append(store.stage(d, "b/0.dcm")),
            "staged commit: rename + fsync folder": lambda d: staged.pop().commit(
                f"b/{next(keys)}.dcm"
            ),
        }
        out: dict[str, float] = {}
        for name, step in stages.items():
            best = float("inf")
            for _ in range(rounds):
                total = 0.0
                for data in objects:
                    fresh = bytes(bytearray(data))
                    t0 = time.thread_time()
                    step(fresh)
                    total += time.thread_time() - t0
                best = min(best, 1000 * total / len(objects))
            out[name] = best
    out["index commit (writer thread)"] = _writer_cpu(objects, data_dir / "writer")
    return out


def _writer_cpu(objects: list[bytes], data_dir: Path) -> float:
    """The index writer thread's CPU ms per instance over a serial ingest."""
    config = load_config(
        env={}, overrides={"data_dir": str(data_dir), "index.url": f"sqlite:///{data_dir}/i.db"}
    )
    spent: list[float] = []
    source = c_store_source()
    with Archive(config) as archive:
        writer = archive.pipeline.writer
        assert writer is not None
        commit = writer._commit

        def timed(batch: list) -> None:
            t0 = time.thread_time()
            try:
                commit(batch)
            finally:
                spent.append(time.thread_time() - t0)

        writer._commit = timed  # type: ignore[method-assign]
        for data in objects:
            archive.pipeline.ingest(data, source)
    return 1000 * sum(spent) / len(objects)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="CT slices (default 1000)")
    parser.add_argument("--threads", default="1,4", help="concurrent ingesting threads (1,4)")
    parser.add_argument("--stages", action="store_true", help="also time each step alone")
    parser.add_argument("--repeat", type=int, default=1, help="runs per thread count (best kept)")
    args = parser.parse_args()
    threads = sorted({int(n) for n in args.threads.split(",") if n.strip()})
    with tempfile.TemporaryDirectory(prefix="imag-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        progress(f"generating {args.count} CT slices 512x512 16-bit ...")
        files = generate_ct_series(tmp / "ct", args.count, seed=CT_SEED)
        objects = [f.read_bytes() for f in files]
        shutil.rmtree(tmp / "ct")
        mb = sum(map(len, objects)) / 1e6
        print(
            f"# bench_ingest: {args.count} CT slices, {mb:.1f} MB; {os.cpu_count()} CPUs; "
            f"load average at start {os.getloadavg()[0]:.2f}"
        )
        print("# index: fresh SQLite; filesystem store; C-STORE source (audited)")
        print(f"{'threads':>7}  {'CPU ms/inst':>11}  {'wall ms/inst':>12}  {'inst/s':>8}")
        for n in threads:
            runs = [run_pipeline(objects, n, tmp / "data") for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["cpu_ms"])
            print(
                f"{n:>7}  {best['cpu_ms']:>11.2f}  {best['wall_ms']:>12.2f}  {best['rate']:>8.0f}",
                flush=True,
            )
        if args.stages:
            print("\n# each step alone, CPU ms per instance (best of 3 rounds)")
            for name, ms in time_stages(objects, tmp).items():
                print(f"{name:>40}  {ms:6.2f}")
        print(f"# load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
