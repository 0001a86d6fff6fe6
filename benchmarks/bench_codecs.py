"""Lossless codec throughput and compression ratio, per codec and per modality.

For each lossless target of :mod:`archive.codecs` (RLE, JPEG-LS, JPEG
2000, HTJ2K, HTJ2K RPCL) and each generated modality (CT, MR, CR, MG, US
multi-frame RGB), prints encode and decode MB/s (uncompressed pixel bytes per
second, best of a few runs, one thread: what one ingest worker does) and
the compression ratio (uncompressed / encapsulated bytes).  Encoding is
:func:`archive.codecs.encode_dataset` from native data; decoding is
:func:`archive.codecs.decoded_pixels` (pydicom's decoders, with the
codestream checks), the HTJ2K rows also show OpenJPH's own decoder, which
the archive does not use on received data.  Every round trip is checked
bit-exact.

    python -m benchmarks.bench_codecs            # preset sizes, MG 3328x2560
    python -m benchmarks.bench_codecs --quick    # small images, a few seconds
"""

from __future__ import annotations

import argparse
import io
import time
import warnings
from collections.abc import Callable

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.uid import (
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from archive import codecs as tc
from archive.synthetic import StudySpec, make_instance, modality_preset, render_pixels

try:
    import imagecodecs
except ImportError:  # pragma: no cover
    imagecodecs = None

CODECS = {
    "RLE": RLELossless,
    "JPEG-LS": JPEGLSLossless,
    "JPEG 2000": JPEG2000Lossless,
    "HTJ2K": HTJ2KLossless,
    "HTJ2K RPCL": HTJ2KLosslessRPCL,
}

# name -> (modality, preset overrides); --quick divides the sizes
MODALITIES = {
    "CT": ("CT", {}),  # 512x512 signed 16-bit
    "MR": ("MR", {}),  # 256x256, 12 bits stored
    "CR": ("CR", {}),  # 2048x2048, 12 bits stored
    "MG": ("MG", {"rows": 3328, "columns": 2560, "bits_stored": 16}),
    "US": ("US", {"frames": 10}),  # 640x480 RGB, 10 frames
}


def instance(modality: str, overrides: dict, quick: bool) -> tuple[bytes, np.ndarray, str]:
    overrides = dict(overrides)
    if quick:
        base = modality_preset(modality, **overrides)
        overrides["rows"] = max(base.rows // 4, 16)
        overrides["columns"] = max(base.columns // 4, 16)
        overrides["frames"] = min(base.frames, 3)
    series = modality_preset(modality, instances=1, **overrides)
    study = StudySpec(patient_id="BENCH", patient_name="CODEC^Bench", series=[series])
    rng = np.random.default_rng(1)
    arr = render_pixels(series, 0, rng)
    ds = make_instance(study, 0, 0, rng=rng, pixels=arr)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    frames = f" x{series.frames}" if series.frames > 1 else ""
    signed = "s" if series.pixel_representation else "u"
    kind = "RGB" if series.samples_per_pixel == 3 else f"{series.bits_stored}/{signed}"
    size = f"{series.columns}x{series.rows}{frames} {series.bits_allocated}-bit {kind}"
    return buffer.getvalue(), arr, size


def best(run: Callable[[], object], min_time: float, min_runs: int = 2) -> float:
    """Shortest wall time of ``run`` over at least ``min_runs`` runs and ``min_time`` s."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_time:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if len(times) >= 20:
            break
    return min(times)


def measure(data: bytes, arr: np.ndarray, target: str, min_time: float) -> dict:
    raw = arr.nbytes

    def timed_encode() -> float:  # reading the native object is not part of it
        ds = pydicom.dcmread(io.BytesIO(data))
        t0 = time.perf_counter()
        tc.encode_dataset(ds, target)
        return time.perf_counter() - t0

    encode_time = min(timed_encode() for _ in range(2 if raw > 8e6 else 3))
    out = tc.transcode(data, target)  # the verified path, as stored
    encoded = pydicom.dcmread(io.BytesIO(out))
    decoded = tc.decoded_pixels(encoded)
    if not np.array_equal(decoded.reshape(arr.shape), arr):
        raise SystemExit(f"{target}: round trip is not lossless")
    decode_time = best(lambda: tc.decoded_pixels(encoded), min_time)
    compressed = len(encoded.PixelData)
    result = {
        "enc": raw / encode_time / 1e6,
        "dec": raw / decode_time / 1e6,
        "ratio": raw / compressed,
        "alt": None,
    }
    if target in (HTJ2KLossless, HTJ2KLosslessRPCL) and imagecodecs is not None:
        count = int(encoded.get("NumberOfFrames", 1))
        frames = list(generate_frames(encoded.PixelData, number_of_frames=count))

        def openjph() -> None:
            for frame in frames:
                imagecodecs.htj2k_decode(frame, planar=False)

        result["alt"] = raw / best(openjph, min_time) / 1e6
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_codecs")
    parser.add_argument("--quick", action="store_true", help="quarter-size images")
    parser.add_argument(
        "--min-time", type=float, default=1.0, help="seconds spent per decode measure"
    )
    parser.add_argument("--codec", action="append", choices=list(CODECS), help="repeatable")
    parser.add_argument("--modality", action="append", choices=list(MODALITIES))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    codecs = args.codec or list(CODECS)
    modalities = args.modality or list(MODALITIES)
    print("Lossless codecs, one thread; MB/s = uncompressed pixel MB (1e6 bytes) per second.")
    print(
        "Images are archive.synthetic data: smooth modality-like patterns plus uniform noise\n"
        "(CT +/-12 HU, other grayscale +/-0.5% of the range, US speckle +/-4%); the noise\n"
        "sets the compression ratios, which are NOT those of clinical images."
    )
    header = (
        f"{'codec':<11} {'modality':<8} {'image (W x H)':<32} {'MB':>6} "
        f"{'enc MB/s':>9} {'dec MB/s':>9} {'ratio':>6}  {'OpenJPH dec MB/s':>16}"
    )
    print()
    print(header)
    print("-" * len(header))
    started = time.perf_counter()
    images = {m: instance(*MODALITIES[m], args.quick) for m in modalities}
    for codec in codecs:
        target = CODECS[codec]
        for modality in modalities:
            data, arr, size = images[modality]
            r = measure(data, arr, target, args.min_time)
            alt = f"{r['alt']:16.1f}" if r["alt"] is not None else f"{'-':>16}"
            print(
                f"{codec:<11} {modality:<8} {size:<32} {arr.nbytes / 1e6:6.1f} "
                f"{r['enc']:9.1f} {r['dec']:9.1f} {r['ratio']:6.2f}  {alt}",
                flush=True,
            )
    print()
    print(
        "decode = archive.codecs.decoded_pixels (pydicom: pylibjpeg-rle, pyjpegls/CharLS,\n"
        "OpenJPEG for JPEG 2000 and HTJ2K); encode = archive.codecs.encode_dataset\n"
        "(pylibjpeg-rle, pyjpegls, pylibjpeg-openjpeg, OpenJPH via imagecodecs).\n"
        f"total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
