"""Memory of `imag serve` while one large object arrives over C-STORE.

One synthetic multi-frame object of ``--mib`` MiB (default 2048: 4,096 frames
of 512x512 16-bit pixels, pseudo-random so no layer can shrink it; Multi-frame
Grayscale Word Secondary Capture, explicit VR little endian) is written to a
file once, then sent with dcmtk ``storescu`` to a fresh `imag serve` (lean
receive path by default).  Printed: the server's RSS before the push, its
peak RSS during it (VmHWM of the server and its listener processes, reset
through /proc/PID/clear_refs just before), the growth (peak - before: the
target is at most 100 MB), the RSS after, the wall time and MB/s.  The object
must be stored (``imag stats``) and the spool folder empty afterwards.

A warm-up object (``--warmup`` MiB, above ``ingest.stream_threshold`` by
default) is sent first so that what any first large C-STORE loads once
(codecs, the pipeline's file path) is not counted as growth.

    python -m benchmarks.bench_big_store
    python -m benchmarks.bench_big_store --mib 512 --receive pynetdicom
    python -m benchmarks.bench_big_store --imag-env IMAG_INGEST_STREAM_THRESHOLD=8MiB

Disk: the file, the spool copy and the stored object (about three times the
object) under --tmp (default: the system's temporary folder).
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from benchmarks.bench_dimse import (
    RECEIVE,
    _env_pairs,
    _raise_interrupt,
    memory_mib,
    progress,
    reset_peak_rss,
    running_imag,
)
from tests.dcmtk import dcmtk, have_dcmtk

MiB = 2**20
FRAME = 512 * 512 * 2
#: Multi-frame Grayscale Word Secondary Capture Image Storage
SC_MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"


def write_big_object(path: Path, mib: int, *, seed: int = 7) -> Path:
    """A Part 10 file of ``mib`` MiB of pixel data, written a frame block at a
    time (never whole in memory): the header by pydicom, then the Pixel Data
    element's header and its value streamed."""
    if not 1 <= mib < 4096:
        raise SystemExit("--mib must be between 1 and 4095 (a 32-bit element length)")
    frames = mib * MiB // FRAME
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SC_MULTIFRAME_WORD
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SC_MULTIFRAME_WORD
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BIGSTORE"
    ds.PatientName = "BIG^Store"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "BIG1"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 40
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.save_as(path, enforce_file_format=True)
    rng = np.random.default_rng(seed)
    with open(path, "ab") as fp:
        fp.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * FRAME))
        left = frames
        while left:  # 64 frames (32 MiB) at a time
            n = min(left, 64)
            fp.write(rng.bytes(n * FRAME))
            left -= n
    return path


def push(port: int, aet: str, path: Path) -> tuple[float, str]:
    """storescu of one file: wall seconds, and the output when it failed."""
    env = os.environ | {"TCP_NODELAY": "1"}
    started = time.perf_counter()
    run = subprocess.run(
        [dcmtk("storescu"), "-aec", aet, "-aet", "BENCH", "127.0.0.1", str(port), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.perf_counter() - started
    failed = run.returncode != 0 or "Store Failed" in run.stdout + run.stderr
    return wall, (run.stdout + run.stderr)[-3000:] if failed else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=2048, help="object size, MiB (2048)")
    parser.add_argument("--warmup", type=int, default=96, help="warm-up object, MiB (96)")
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--receive", default="lean", choices=sorted(RECEIVE))
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the files")
    parser.add_argument(
        "--imag-env",
        action="append",
        default=shlex.split(os.environ.get("IMAG_BENCH_IMAG_ENV", "")),
        metavar="IMAG_X=V",
        help="extra IMAG setting (repeatable; also IMAG_BENCH_IMAG_ENV)",
    )
    args = parser.parse_args()
    if not have_dcmtk("storescu"):
        raise SystemExit("dcmtk's storescu not found: apt-get install dcmtk")
    extra_env = {"IMAG_INGEST_MAX_OBJECT_BYTES": f"{args.mib + 64}MiB"}
    extra_env |= _env_pairs(args.imag_env)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="imag-bench-big-", dir=args.tmp) as tmp:
            return _run(Path(tmp), args, extra_env)
    except KeyboardInterrupt:
        progress("interrupted: server stopped, temporary data removed")
        return 130


def _run(tmp: Path, args: argparse.Namespace, extra_env: dict[str, str]) -> int:
    free = shutil.disk_usage(tmp).free
    if free < 3.2 * args.mib * MiB:
        raise SystemExit(f"{free / 2**30:.1f} GiB free in {tmp}: about 3x the object is needed")
    progress(f"writing a {args.mib} MiB object and a {args.warmup} MiB warm-up ...")
    big = write_big_object(tmp / "big.dcm", args.mib, seed=7)
    warm = write_big_object(tmp / "warm.dcm", args.warmup, seed=8)
    problems: list[str] = []
    with running_imag(tmp, args.backend, extra_env, args.receive) as target:
        wall, failed = push(target.port, target.aet, warm)
        if failed:
            problems.append(f"the warm-up C-STORE failed:\n{failed}")
        rss_before = memory_mib(target.pid, "VmRSS")
        reset_peak_rss(target.pid)
        progress(f"  {target.label}: C-STORE of {args.mib} MiB ...")
        wall, failed = push(target.port, target.aet, big)
        peak = memory_mib(target.pid, "VmHWM")
        rss_after = memory_mib(target.pid, "VmRSS")
        if failed:
            problems.append(f"the C-STORE failed:\n{failed}")
        if (held := target.instances()) != 2:
            problems.append(f"the archive holds {held} instances, not 2")
        # running_imag's data folder (the only one under tmp): its spool folder
        left = [p for p in tmp.glob(f"imag-{args.backend}-*/tmp/*")]
        if left:
            problems.append(f"spool files left: {left}")
        log_tail = target.log_tail()
    if "Traceback" in log_tail:
        problems.append("server log:\n" + log_tail)
    size_mb = big.stat().st_size / 1e6
    print(
        f"# bench_big_store: one {args.mib} MiB object ({size_mb:.0f} MB, {args.mib * MiB // FRAME}"
        f" frames 512x512 16-bit, explicit VR LE) by dcmtk storescu; {os.cpu_count()} CPUs; "
        f"IMAG {args.backend}, receive path {args.receive}"
    )
    print("# IMAG extra env: " + " ".join(f"{k}={v}" for k, v in extra_env.items()))
    assert rss_before is not None and peak is not None
    print(
        f"{'object MiB':>10} {'wall s':>8} {'MB/s':>8} {'RSS before':>10} {'peak RSS':>9} "
        f"{'growth MiB':>10} {'growth MB':>9} {'RSS after':>9}"
    )
    print(
        f"{args.mib:10} {wall:8.1f} {size_mb / wall:8.1f} {rss_before:10.0f} {peak:9.0f} "
        f"{peak - rss_before:10.1f} {(peak - rss_before) * MiB / 1e6:9.1f} {rss_after or 0:9.0f}"
    )
    print("(MiB of resident memory of the server and its listener processes; target: growth")
    print(" during the C-STORE of a 2 GB object at most 100 MB)")
    if problems:
        print("\nPROBLEMS")
        for line in problems:
            print("  " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
