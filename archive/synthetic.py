"""Realistic synthetic DICOM Part 10 files for tests, benchmarks and demos.

Everything here is deterministic: the same specs and the same ``seed`` give
byte-identical files. Pixel data is a smooth modality-like pattern (body
outline, organs, vessels, a breast, an ultrasound sector...) plus modest
noise, so lossless compression ratios look like real images rather than
like pure noise or flat fields.

Main entry points:

* :class:`SeriesSpec`, :class:`StudySpec` and :func:`modality_preset` describe
  what to generate;
* :func:`make_instance` builds one :class:`pydicom.dataset.FileDataset`;
* :func:`write_study` writes a whole study;
* :func:`generate_mixed_set` writes a multi-patient, multi-modality,
  multi-transfer-syntax, multi-charset set for import tests;
* :func:`generate_ct_series` writes one large CT series quickly for benchmarks;
* :func:`available_transfer_syntaxes` lists what this environment can write.

Transfer syntaxes: the uncompressed ones (explicit/implicit VR little endian,
explicit VR big endian, deflated) are always writable. Explicit VR big endian
is retired but pydicom 3 still writes it; pydicom does not swap pixel bytes
itself, so this module does. Encapsulated syntaxes go through pydicom's
``Dataset.compress`` and need an encoder plugin: RLE Lossless (pydicom's own
encoder or pylibjpeg-rle), JPEG 2000 (pylibjpeg-openjpeg), JPEG-LS (pyjpegls).
pydicom 3.0 has no encoder for HTJ2K or the JPEG processes (baseline,
lossless), so those are never available here.

Run ``python -m archive.synthetic OUTDIR --ct 200`` or ``--mixed``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    PYDICOM_ROOT_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
    XRayRadiofluoroscopicImageStorage,
    generate_uid,
)

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "LOSSLESS_TRANSFER_SYNTAXES",
    "SeriesSpec",
    "StudySpec",
    "assign_uids",
    "available_transfer_syntaxes",
    "ct_benchmark_study",
    "expected_pixels",
    "generate_ct_series",
    "generate_mixed_set",
    "instance_filename",
    "main",
    "make_instance",
    "modality_preset",
    "render_pixels",
    "sop_class_for",
    "write_study",
]

#: Identifies files written by this generator (deterministic, under pydicom's root).
IMPLEMENTATION_CLASS_UID = UID(
    generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["imag", "archive.synthetic", "1"])
)
IMPLEMENTATION_VERSION_NAME = "IMAG_SYNTH_1"

_UNCOMPRESSED = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
#: Every transfer syntax this module may write, lossless first.
_CANDIDATES = (*_UNCOMPRESSED, RLELossless, JPEG2000Lossless, JPEGLSLossless, HTJ2KLossless)
_LOSSY = (JPEG2000,)
#: Transfer syntaxes whose decoded pixels equal the generated array.
LOSSLESS_TRANSFER_SYNTAXES = frozenset(_CANDIDATES)

#: Compression ratio used for the lossy JPEG 2000 syntax.
_J2K_LOSSY_RATIO = 10.0

_CROSS_SECTIONAL = {"CT", "MR", "PT", "NM"}


# --------------------------------------------------------------------------- specs


@dataclass
class SeriesSpec:
    """What one series looks like; every instance of the series shares it.

    ``frames`` is the number of frames per instance: 1 means a single-frame
    instance without the *Number of Frames* attribute. ``bits_stored`` defaults
    to ``bits_allocated``. ``sop_class_uid`` defaults to :func:`sop_class_for`.
    ``series_uid`` is filled in by :func:`assign_uids` when left empty.
    """

    modality: str
    rows: int
    columns: int
    instances: int = 1
    frames: int = 1
    bits_allocated: int = 16
    bits_stored: int | None = None
    pixel_representation: int = 0
    samples_per_pixel: int = 1
    photometric: str = "MONOCHROME2"
    transfer_syntax: str = ExplicitVRLittleEndian
    series_description: str = ""
    body_part: str = ""
    series_number: int | None = None
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    sop_class_uid: str | None = None
    series_uid: str | None = None

    def __post_init__(self) -> None:
        self.modality = self.modality.upper()
        self.transfer_syntax = UID(self.transfer_syntax)
        if self.bits_stored is None:
            self.bits_stored = self.bits_allocated
        if self.bits_allocated not in (8, 16):
            raise ValueError(f"bits_allocated must be 8 or 16, not {self.bits_allocated}")
        if not 1 <= self.bits_stored <= self.bits_allocated:
            raise ValueError(f"bits_stored {self.bits_stored} not in 1..{self.bits_allocated}")
        if self.pixel_representation not in (0, 1):
            raise ValueError("pixel_representation must be 0 or 1")
        if self.samples_per_pixel not in (1, 3):
            raise ValueError("samples_per_pixel must be 1 or 3")
        if (self.samples_per_pixel == 3) != (self.photometric == "RGB"):
            raise ValueError("use photometric RGB with samples_per_pixel 3, and only then")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
            raise ValueError(f"unsupported photometric interpretation {self.photometric!r}")
        if self.rows < 1 or self.columns < 1 or self.instances < 0 or self.frames < 1:
            raise ValueError("rows, columns and frames must be >= 1, instances >= 0")

    @property
    def sop_class(self) -> UID:
        """The SOP Class UID written for this series."""
        if self.sop_class_uid:
            return UID(self.sop_class_uid)
        return sop_class_for(
            self.modality,
            self.frames,
            bits_allocated=self.bits_allocated,
            samples_per_pixel=self.samples_per_pixel,
        )

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of one sample (native, little-endian on usual hosts)."""
        kind = "i" if self.pixel_representation else "u"
        return np.dtype(f"{kind}{self.bits_allocated // 8}")

    @property
    def value_range(self) -> tuple[int, int]:
        """Smallest and largest stored value allowed by bits stored and signedness."""
        bits = int(self.bits_stored or self.bits_allocated)
        if self.pixel_representation:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1


@dataclass
class StudySpec:
    """One patient's study. Text is encoded in ``charset`` ("ISO_IR 100" = Latin-1,
    "ISO_IR 192" = UTF-8), which is written as *Specific Character Set*.

    ``study_uid`` and the series' ``series_uid`` are filled in by
    :func:`assign_uids` (called by :func:`write_study`) when left empty.
    """

    patient_id: str
    patient_name: str
    issuer_of_patient_id: str | None = None
    birth_date: str = ""
    sex: str = ""
    study_description: str = ""
    accession_number: str = ""
    study_date: str = "20240101"
    study_time: str = "120000"
    referring_physician: str = ""
    institution_name: str = ""
    charset: str = "ISO_IR 100"
    series: list[SeriesSpec] = field(default_factory=list)
    study_uid: str | None = None
    study_id: str = "1"

    @property
    def patient_key(self) -> tuple[str, str]:
        """(PatientID, IssuerOfPatientID or ""): what identifies the patient."""
        return self.patient_id, self.issuer_of_patient_id or ""

    @property
    def instance_count(self) -> int:
        """Number of instances (files) the study has."""
        return sum(s.instances for s in self.series)


# --------------------------------------------------------------------------- presets


def sop_class_for(
    modality: str, frames: int = 1, *, bits_allocated: int = 8, samples_per_pixel: int = 1
) -> UID:
    """The usual storage SOP Class for a modality (multi-frame aware).

    CT, MR, CR, DX and MG single-frame IODs cannot hold several frames: asking
    for ``frames > 1`` with them raises :class:`ValueError` (use XA, US or
    pass an explicit ``sop_class_uid``). Other modalities fall back to
    (multi-frame) Secondary Capture.
    """
    modality = modality.upper()
    single = {
        "CT": CTImageStorage,
        "MR": MRImageStorage,
        "CR": ComputedRadiographyImageStorage,
        "DX": DigitalXRayImageStorageForPresentation,
        "MG": DigitalMammographyXRayImageStorageForPresentation,
    }
    if modality in single:
        if frames > 1:
            raise ValueError(f"{modality} storage is single-frame; use XA/US or a sop_class_uid")
        return single[modality]
    if modality == "US":
        return UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    if modality == "XA":
        return XRayAngiographicImageStorage
    if modality == "RF":
        return XRayRadiofluoroscopicImageStorage
    if frames == 1:
        return SecondaryCaptureImageStorage
    if samples_per_pixel == 3:
        return MultiFrameTrueColorSecondaryCaptureImageStorage
    if bits_allocated == 8:
        return MultiFrameGrayscaleByteSecondaryCaptureImageStorage
    return MultiFrameGrayscaleWordSecondaryCaptureImageStorage


_PRESETS: dict[str, dict] = {
    "CT": dict(
        rows=512, columns=512, bits_allocated=16, bits_stored=16, pixel_representation=1,
        rescale_slope=1.0, rescale_intercept=-1024.0, series_description="CT THORAX",
        body_part="CHEST", instances=1,
    ),
    "MR": dict(
        rows=256, columns=256, bits_allocated=16, bits_stored=12, pixel_representation=0,
        series_description="T1 SE AX", body_part="HEAD",
    ),
    "CR": dict(
        rows=2048, columns=2048, bits_allocated=16, bits_stored=12, pixel_representation=0,
        series_description="THORAX PA", body_part="CHEST",
    ),
    "DX": dict(
        rows=2048, columns=1680, bits_allocated=16, bits_stored=14, pixel_representation=0,
        photometric="MONOCHROME1", series_description="THORAX PA", body_part="CHEST",
        rescale_slope=1.0, rescale_intercept=0.0,
    ),
    "MG": dict(
        rows=1024, columns=800, bits_allocated=16, bits_stored=12, pixel_representation=0,
        series_description="MAMMOGRAPHY SCREENING", body_part="BREAST", instances=4,
        rescale_slope=1.0, rescale_intercept=0.0,
    ),
    "US": dict(
        rows=480, columns=640, bits_allocated=8, bits_stored=8, samples_per_pixel=3,
        photometric="RGB", series_description="ABDOMEN", body_part="ABDOMEN",
    ),
    "XA": dict(
        rows=512, columns=512, bits_allocated=8, bits_stored=8, frames=15,
        series_description="CORONARY LCA", body_part="HEART",
    ),
    "RF": dict(
        rows=512, columns=512, bits_allocated=8, bits_stored=8, frames=10,
        series_description="FLUORO", body_part="ABDOMEN",
    ),
    "OT": dict(
        rows=256, columns=256, bits_allocated=8, bits_stored=8, series_description="SCREENSHOT",
    ),
}  # fmt: skip


def modality_preset(modality: str, **overrides) -> SeriesSpec:
    """A :class:`SeriesSpec` with sensible defaults for ``modality``.

    Presets: CT (512x512 signed 16-bit, HU rescale), MR (256x256, 12 bits
    stored), CR (2048x2048, 12 bits), DX (2048x1680, 14 bits, MONOCHROME1),
    MG (1024x800 by default to stay fast, 12 bits, 4 views), US (480x640 RGB
    8-bit; ``frames > 1`` gives Ultrasound Multi-frame), XA and RF (multi-frame
    8-bit), OT (secondary capture). Any :class:`SeriesSpec` field can be
    overridden, e.g. ``modality_preset("MG", rows=4096, columns=3328)``.
    """
    modality = modality.upper()
    if modality not in _PRESETS:
        raise ValueError(f"no preset for modality {modality!r}; known: {sorted(_PRESETS)}")
    values = dict(_PRESETS[modality])
    values.update(overrides)
    return SeriesSpec(modality=modality, **values)


# --------------------------------------------------------------------------- transfer syntaxes


def _encoder_available(uid: UID) -> bool:
    from pydicom.pixels.encoders.base import get_encoder

    try:
        return bool(get_encoder(uid).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


@lru_cache(maxsize=1)
def _available() -> tuple[UID, ...]:
    out = list(_UNCOMPRESSED)
    out += [uid for uid in (*_CANDIDATES[len(_UNCOMPRESSED) :], *_LOSSY) if _encoder_available(uid)]
    return tuple(out)


def available_transfer_syntaxes(*, lossless_only: bool = False) -> list[UID]:
    """Transfer syntaxes this environment can write pixel data in.

    The four uncompressed syntaxes are always there; RLE Lossless, JPEG 2000
    (lossless and lossy), JPEG-LS lossless and HTJ2K lossless only when pydicom
    has a working encoder plugin for them.
    """
    return [uid for uid in _available() if not lossless_only or uid in LOSSLESS_TRANSFER_SYNTAXES]


def _check_transfer_syntax(uid: UID) -> None:
    if uid in _available():
        return
    if uid in _CANDIDATES or uid in _LOSSY:
        hint = {
            JPEGLSLossless: " (install pyjpegls)",
            RLELossless: " (install pylibjpeg-rle, or use pydicom's own encoder)",
            JPEG2000Lossless: " (install pylibjpeg and pylibjpeg-openjpeg)",
            JPEG2000: " (install pylibjpeg and pylibjpeg-openjpeg)",
            HTJ2KLossless: " (pydicom 3.0 has no HTJ2K encoder)",
        }.get(uid, "")
        raise RuntimeError(f"no encoder available here for {uid.name} ({uid}){hint}")
    raise ValueError(f"transfer syntax {uid} ({uid.name}) is not supported by the generator")


# --------------------------------------------------------------------------- UIDs


def _uid(*parts: object) -> UID:
    """A deterministic, valid UID (<= 64 chars) from ``parts``, under pydicom's root."""
    return UID(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[str(p) for p in parts]))


def assign_uids(study: StudySpec, seed: int = 0) -> StudySpec:
    """Fill in the study's and each series' UID when missing (in place); return ``study``.

    The UIDs are derived from ``seed`` and the study's identifying fields, so
    they are stable between runs.
    """
    if not study.study_uid:
        study.study_uid = _uid(
            "study",
            seed,
            study.patient_id,
            study.issuer_of_patient_id or "",
            study.accession_number,
            study.study_date,
            study.study_time,
            study.study_description,
        )
    for index, series in enumerate(study.series):
        if not series.series_uid:
            series.series_uid = _uid("series", study.study_uid, index)
    return study


def _sop_instance_uid(series: SeriesSpec, instance_index: int) -> UID:
    return _uid("instance", series.series_uid, instance_index)


def _instance_rng(study: StudySpec, seed: int, series_index: int, instance_index: int):
    key = zlib.crc32((study.study_uid or "").encode())
    return np.random.default_rng([seed, key, series_index, instance_index])


def instance_filename(study: StudySpec, series_index: int, instance_index: int) -> str:
    """The file name :func:`write_study` uses: safe characters only, unique per instance."""
    digest = hashlib.sha1((study.study_uid or "").encode()).hexdigest()[:12]
    return f"{digest}_s{series_index + 1:03d}_i{instance_index + 1:05d}.dcm"


# --------------------------------------------------------------------------- pixels


@lru_cache(maxsize=16)
def _grid(rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, columns, dtype=np.float32)[None, :]
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _ellipse(y, x, cy, cx, ry, rx) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _paint(img, y, x, cy, cx, ry, rx, value, *, add: bool = False) -> None:
    """Set (or add) ``value`` inside an ellipse, touching only its bounding box.

    ``value`` may be a scalar or a callable ``f(y_window, x_window)``.
    """
    r0, r1 = np.searchsorted(y[:, 0], (cy - ry, cy + ry))
    c0, c1 = np.searchsorted(x[0], (cx - rx, cx + rx))
    if r0 >= r1 or c0 >= c1:
        return
    yw, xw = y[r0:r1], x[:, c0:c1]
    mask = ((yw - cy) / ry) ** 2 + ((xw - cx) / rx) ** 2 <= 1.0
    window = img[r0:r1, c0:c1]
    v = value(yw, xw) if callable(value) else value
    if add:
        window += mask * v
    else:
        window[mask] = np.broadcast_to(v, mask.shape)[mask] if callable(value) else v


def _ct_hu(y, x, t: float) -> np.ndarray:
    """A thorax-like slice in Hounsfield units; ``t`` in [0, 1] moves along z."""
    hu = np.full((y.shape[0], x.shape[1]), -1000.0, dtype=np.float32)
    _paint(hu, y, x, 0.0, 0.0, 0.62, 0.86, -90.0)  # subcutaneous fat
    _paint(hu, y, x, 0.0, 0.0, 0.56, 0.80, lambda yw, xw: 40.0 + 25.0 * yw)  # soft tissue
    lung_ry = 0.30 + 0.12 * np.sin(np.pi * t)
    for cx in (-0.38, 0.38):  # lungs, denser towards the back
        _paint(hu, y, x, -0.05, cx, lung_ry, 0.27, lambda yw, xw: -860.0 + 60.0 * yw)
    _paint(hu, y, x, 0.15, 0.05, 0.16 + 0.04 * t, 0.14, 10.0, add=True)  # heart
    _paint(hu, y, x, 0.42, 0.0, 0.10, 0.09, 700.0)  # vertebra
    _paint(hu, y, x, 0.42, 0.0, 0.05, 0.045, 60.0)  # spinal canal
    _paint(hu, y, x, 0.25, 0.10 + 0.02 * t, 0.055, 0.055, 180.0)  # contrast-filled aorta
    for k in range(5):  # ribs
        angle = np.pi * (0.15 + 0.7 * k / 4)
        cy = 0.55 * np.sin(angle) - 0.02
        for cx in (0.79 * np.cos(angle), -0.79 * np.cos(angle)):
            _paint(hu, y, x, cy, cx, 0.035, 0.035, 500.0)
    return hu


def _pattern(series: SeriesSpec, y, x, t: float, instance_index: int) -> np.ndarray:
    """A smooth modality-like gray pattern in [0, 1]."""
    m = series.modality
    shape = np.broadcast_shapes(y.shape, x.shape)
    if m in ("MR", "PT", "NM"):
        head = _ellipse(y, x, 0.0, 0.0, 0.85, 0.70)
        brain = _ellipse(y, x, 0.02, 0.0, 0.76, 0.61)
        img = head * 0.75 + brain * (-0.30 + 0.08 * np.cos(6 * x) * np.cos(5 * y))
        for cx in (-0.12, 0.12):
            img = img - _ellipse(y, x, -0.05, cx, 0.22 * (1 - 0.5 * t) + 0.02, 0.06) * 0.3
        img = img * (0.85 + 0.25 * x - 0.1 * y)  # coil bias field
        return np.clip(img, 0.0, 1.0)
    if m in ("CR", "DX"):
        img = np.full(shape, 0.15, dtype=np.float32)
        body = (np.abs(x) < 0.85) & (y > -0.9)
        img = img + body * (0.55 + 0.1 * y)
        for cx in (-0.42, 0.42):
            lung = _ellipse(y, x, 0.0, cx, 0.62, 0.30)
            img = img - lung * (0.35 - 0.05 * np.cos(28 * y + 3 * np.abs(x)))  # ribs
        img = img + (np.abs(x) < 0.07) * 0.25  # spine
        img = img + _ellipse(y, x, 0.25, 0.12, 0.3, 0.25) * 0.15  # heart
        return np.clip(img, 0.0, 1.0)
    if m == "MG":
        flip = instance_index % 2 == 1  # alternate R / L
        xx = -x if flip else x
        r2 = ((xx + 1.0) / 1.5) ** 2 + (y / 0.85) ** 2
        breast = r2 <= 1.0
        texture = 0.12 * np.sin(9 * xx + 4 * y) * np.cos(7 * y - 2 * xx) + 0.08 * np.cos(17 * y)
        img = breast * (0.35 + 0.25 * (1.0 - r2) + texture * (1.0 - r2))
        return np.clip(img + 0.02, 0.0, 1.0)
    if m in ("XA", "RF"):
        img = np.full(shape, 0.62, dtype=np.float32) + 0.08 * y
        contrast = 0.15 + 0.30 * np.sin(np.pi * t)
        for k, (a, b, p) in enumerate(((0.35, 3.0, 0.0), (0.25, 5.0, 1.3), (0.15, 7.0, 2.1))):
            curve = a * np.sin(b * x + p + 0.6 * t) + 0.3 * (k - 1)
            img = img - (np.abs(y - curve) < 0.03 / (k + 1) + 0.01) * contrast
        img = img - _ellipse(y, x, 0.6, -0.5, 0.25, 0.25) * 0.2  # diaphragm
        return np.clip(img, 0.0, 1.0)
    if m == "US":
        yy = y + 1.0
        radius = np.sqrt(x * x + yy * yy)
        angle = np.arctan2(x, yy)
        sector = (np.abs(angle) < 0.65) & (radius > 0.12) & (radius < 1.9)
        img = sector * (0.35 + 0.12 * np.sin(radius * 18.0) + 0.1 * np.cos(angle * 9.0))
        img = img - _ellipse(y, x, 0.2 + 0.05 * t, 0.1, 0.18, 0.15) * 0.3  # cyst / vessel
        return np.clip(img, 0.0, 1.0)
    # generic (OT and others): gradients and circles
    img = 0.3 + 0.2 * x + 0.15 * y
    for k in range(3):
        img = img + _ellipse(y, x, 0.3 * np.sin(k + t), 0.3 * np.cos(k + t), 0.2, 0.2) * 0.15
    return np.clip(img, 0.0, 1.0)


def _render_frame(series: SeriesSpec, t: float, instance_index: int, rng) -> np.ndarray:
    y, x = _grid(series.rows, series.columns)
    lo, hi = series.value_range
    if series.modality == "CT":
        slope = series.rescale_slope or 1.0
        intercept = series.rescale_intercept if series.rescale_intercept is not None else 0.0
        stored = (_ct_hu(y, x, t) - intercept) / slope
        noise_amp = 12
    else:
        pattern = _pattern(series, y, x, t, instance_index)
        if series.photometric == "MONOCHROME1":
            pattern = 1.0 - pattern
        span = hi - lo
        stored = lo + span * (0.04 + 0.82 * pattern)
        noise_amp = max(1, span // 200)
    base = np.rint(stored).astype(np.int32)
    if series.samples_per_pixel == 3:
        base = np.repeat(base[:, :, None], 3, axis=2)
        if series.modality == "US":  # a colour-Doppler box: red and blue flow
            flow = _ellipse(y, x, 0.25 + 0.1 * t, -0.1, 0.08, 0.05)
            back = _ellipse(y, x, 0.45, -0.25, 0.06, 0.04)
            red = int(0.55 * (hi - lo))
            base[..., 0] += flow * red
            base[..., 2] += back * red
            base[..., 1] -= (flow | back) * red // 3
    if series.modality == "US":
        noise_amp = max(noise_amp, (hi - lo) // 25)  # speckle
    noise = rng.integers(-noise_amp, noise_amp + 1, size=base.shape[:2], dtype=np.int32)
    if base.ndim == 3:
        base += noise[:, :, None]
    else:
        base += noise
    np.clip(base, lo, hi, out=base)
    return base.astype(series.dtype)


def render_pixels(series: SeriesSpec, instance_index: int, rng: np.random.Generator) -> np.ndarray:
    """The pixel array of one instance, as pydicom's ``pixel_array`` returns it.

    Shape is ``(rows, columns)``, ``(rows, columns, 3)`` for RGB, with a
    leading frame axis when ``series.frames > 1``; values respect bits stored.
    """
    count = max(series.instances, 1)
    frames = []
    for f in range(series.frames):
        if series.frames > 1:
            t = f / (series.frames - 1)
        else:
            t = instance_index / max(count - 1, 1)
        frames.append(_render_frame(series, t, instance_index, rng))
    return frames[0] if series.frames == 1 else np.stack(frames)


def expected_pixels(
    study: StudySpec, series_index: int, instance_index: int, *, seed: int = 0
) -> np.ndarray:
    """The exact array :func:`write_study` (same ``seed``) stored for an instance."""
    assign_uids(study, seed)
    rng = _instance_rng(study, seed, series_index, instance_index)
    return render_pixels(study.series[series_index], instance_index, rng)


# --------------------------------------------------------------------------- datasets


def _codec(charset: str) -> str:
    return convert_encodings([charset])[0]


def _check_encodable(study: StudySpec) -> None:
    codec = _codec(study.charset)
    texts = {
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "issuer_of_patient_id": study.issuer_of_patient_id or "",
        "study_description": study.study_description,
        "referring_physician": study.referring_physician,
        "institution_name": study.institution_name,
        **{
            f"series[{i}].series_description": s.series_description
            for i, s in enumerate(study.series)
        },
    }
    for name, value in texts.items():
        try:
            value.encode(codec)
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{name}={value!r} cannot be encoded in {study.charset} ({codec})"
            ) from exc


def _ds_number(value: float) -> float:
    return float(f"{value:.6g}")


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _window(series: SeriesSpec) -> tuple[float, float]:
    if series.modality == "CT":
        return 40.0, 400.0
    lo, hi = series.value_range
    slope = series.rescale_slope or 1.0
    intercept = series.rescale_intercept or 0.0
    return _ds_number((lo + hi) / 2 * slope + intercept), _ds_number((hi - lo) * slope * 0.8)


def _set_geometry(
    ds: Dataset, study: StudySpec, series: SeriesSpec, series_index: int, instance_index: int
) -> None:
    """Cross-sectional plane geometry (CT, MR...)."""
    fov = 350.0 if series.modality == "CT" else 230.0
    spacing = _ds_number(fov / series.columns)
    thickness = 1.25 if series.modality == "CT" else 5.0
    z = _ds_number(-instance_index * thickness)
    ds.FrameOfReferenceUID = _uid("frame-of-reference", study.study_uid, series_index)
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [_ds_number(-fov / 2), _ds_number(-fov / 2), z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = z
    ds.SliceThickness = thickness
    ds.PixelSpacing = [spacing, spacing]


def _set_modality_attributes(
    ds: Dataset, study: StudySpec, series: SeriesSpec, series_index: int, instance_index: int
) -> None:
    m = series.modality
    if m in _CROSS_SECTIONAL:
        _set_geometry(ds, study, series, series_index, instance_index)
    else:
        ds.PatientOrientation = ""
    if m == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.XRayTubeCurrent = 250
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "STANDARD"
        ds.DataCollectionDiameter = 500
        ds.ReconstructionDiameter = 350
        ds.GantryDetectorTilt = 0
        ds.RescaleType = "HU"
    elif m == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500
        ds.EchoTime = 15
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
        ds.ImagingFrequency = 63.87
        ds.ImagedNucleus = "1H"
    elif m in ("CR", "DX", "MG"):
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        spacing = 0.07 if m == "MG" else 0.15
        ds.ImagerPixelSpacing = [spacing, spacing]
        ds.PixelSpacing = [spacing, spacing]
        ds.KVP = 28 if m == "MG" else 125
        ds.Exposure = 60 if m == "MG" else 4
        ds.ViewPosition = "PA"
        ds.PatientOrientation = ["P", "F"]
        if m in ("DX", "MG"):
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.DetectorType = "DIRECT"
            ds.PixelIntensityRelationship = "LOG"
            ds.PixelIntensityRelationshipSign = 1
            ds.RescaleType = "US"
            ds.BurnedInAnnotation = "NO"
            ds.ImageLaterality = "U"
        if m == "MG":
            views = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
            laterality, view = views[instance_index % 4]
            ds.ImageLaterality = laterality
            ds.ViewPosition = view
            ds.PatientOrientation = ["P", "L" if laterality == "R" else "R"]
            meaning = "cranio-caudal" if view == "CC" else "medio-lateral oblique"
            ds.ViewCodeSequence = Sequence(
                [_code_item("399162004" if view == "CC" else "399368009", "SCT", meaning)]
            )
            ds.AnatomicRegionSequence = Sequence([_code_item("76752008", "SCT", "Breast")])
            ds.BreastImplantPresent = "NO"
            ds.PartialView = "NO"
            ds.OrganExposed = "BREAST"
            ds.BodyPartThickness = 52
            ds.CompressionForce = 110
            ds.PositionerPrimaryAngle = 0 if view == "CC" else 45
    elif m == "US":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
        region = Dataset()
        region.RegionSpatialFormat = 1
        region.RegionDataType = 1
        region.RegionFlags = 0
        region.RegionLocationMinX0 = 0
        region.RegionLocationMinY0 = 0
        region.RegionLocationMaxX1 = series.columns - 1
        region.RegionLocationMaxY1 = series.rows - 1
        region.PhysicalUnitsXDirection = 3
        region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = _ds_number(16.0 / series.columns)
        region.PhysicalDeltaY = _ds_number(16.0 / series.columns)
        ds.SequenceOfUltrasoundRegions = Sequence([region])
        ds.TransducerData = ["C5-1", "", ""]
    elif m in ("XA", "RF"):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
        ds.KVP = 80
        ds.RadiationSetting = "GR"
        ds.PositionerMotion = "STATIC"
        ds.PositionerPrimaryAngle = -30
        ds.PositionerSecondaryAngle = 20
        ds.ImagerPixelSpacing = [0.2, 0.2]
        ds.DistanceSourceToDetector = 1100
        ds.DistanceSourceToPatient = 750
    else:
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ConversionType = "WSD"
    if series.frames > 1:
        ds.NumberOfFrames = series.frames
        ds.FrameTime = 33.3 if m == "US" else 66.7
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
        ds.CineRate = 30 if m == "US" else 15
    if series.samples_per_pixel == 1 and m not in ("US",):
        center, width = _window(series)
        ds.WindowCenter = center
        ds.WindowWidth = width


def make_instance(
    study: StudySpec,
    series_index: int,
    instance_index: int,
    *,
    rng: np.random.Generator,
    pixels: np.ndarray | None = None,
) -> FileDataset:
    """Build one instance of ``study.series[series_index]`` as a Part 10 dataset.

    The dataset carries file meta, patient / study / series / instance,
    equipment, modality-specific and image pixel attributes, with text in the
    study's character set, and pixel data already encoded in the series'
    transfer syntax. Missing UIDs are first filled in with
    :func:`assign_uids` (seed 0). ``pixels`` (as from :func:`render_pixels`)
    is drawn from ``rng`` when not given. Save with
    ``ds.save_as(path, enforce_file_format=True)``.
    """
    series = study.series[series_index]
    ts = UID(series.transfer_syntax)
    _check_transfer_syntax(ts)
    _check_encodable(study)
    assign_uids(study)
    sop_class = series.sop_class
    sop_uid = _sop_instance_uid(series, instance_index)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # updated by _set_pixel_data
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)

    ds.SpecificCharacterSet = study.charset
    # SOP common
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = study.study_time
    # patient
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    if study.issuer_of_patient_id:
        ds.IssuerOfPatientID = study.issuer_of_patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    # study
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.StudyDescription = study.study_description
    ds.ReferringPhysicianName = study.referring_physician
    # series and equipment
    ds.SeriesInstanceUID = series.series_uid
    ds.Modality = series.modality
    ds.SeriesNumber = series.series_number if series.series_number is not None else series_index + 1
    ds.SeriesDescription = series.series_description
    if series.body_part:
        ds.BodyPartExamined = series.body_part
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    ds.Manufacturer = "IMAG"
    ds.ManufacturerModelName = "Synthetic"
    ds.SoftwareVersions = IMPLEMENTATION_VERSION_NAME
    ds.InstitutionName = study.institution_name
    ds.StationName = f"SYN{series.modality}01"
    # image
    ds.InstanceNumber = instance_index + 1
    ds.AcquisitionNumber = 1
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    _set_modality_attributes(ds, study, series, series_index, instance_index)
    # image pixel
    ds.SamplesPerPixel = series.samples_per_pixel
    ds.PhotometricInterpretation = series.photometric
    if series.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    ds.Rows = series.rows
    ds.Columns = series.columns
    ds.BitsAllocated = series.bits_allocated
    ds.BitsStored = series.bits_stored
    ds.HighBit = int(series.bits_stored or series.bits_allocated) - 1
    ds.PixelRepresentation = series.pixel_representation
    if series.rescale_slope is not None or series.rescale_intercept is not None:
        ds.RescaleIntercept = series.rescale_intercept or 0
        ds.RescaleSlope = series.rescale_slope if series.rescale_slope is not None else 1
    ds.LossyImageCompression = "00"

    if pixels is None:
        pixels = render_pixels(series, instance_index, rng)
    _set_pixel_data(ds, series, pixels, ts)
    return ds


def _set_pixel_data(ds: FileDataset, series: SeriesSpec, arr: np.ndarray, ts: UID) -> None:
    """Encode ``arr`` into ``ds`` in transfer syntax ``ts`` (updates file meta)."""
    # save_as() refuses to change endianness relative to the "original" encoding
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian, ds.SpecificCharacterSet)
    if ts.is_compressed:
        kwargs = {}
        if ts == JPEG2000:
            kwargs["j2k_cr"] = [_J2K_LOSSY_RATIO]
        ds.compress(ts, arr, generate_instance_uid=False, **kwargs)
        if ts not in LOSSLESS_TRANSFER_SYNTAXES:
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = _J2K_LOSSY_RATIO
            ds.LossyImageCompressionMethod = "ISO_15444_1"
        return
    if ts == ExplicitVRBigEndian:
        data = arr.astype(arr.dtype.newbyteorder(">"), copy=False).tobytes()
    else:
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\0"
    ds.PixelData = data
    ds["PixelData"].VR = "OW" if series.bits_allocated > 8 else "OB"
    ds.file_meta.TransferSyntaxUID = ts


# --------------------------------------------------------------------------- writing


def write_study(study: StudySpec, folder: Path, *, seed: int = 0) -> list[Path]:
    """Write every instance of ``study`` into ``folder`` (created if needed).

    Files are named by :func:`instance_filename` and saved with
    ``enforce_file_format=True``. Missing UIDs are filled in on ``study``
    (see :func:`assign_uids`). Returns the paths in series / instance order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    assign_uids(study, seed)
    paths = []
    for si, series in enumerate(study.series):
        for ii in range(series.instances):
            ds = make_instance(study, si, ii, rng=_instance_rng(study, seed, si, ii))
            path = folder / instance_filename(study, si, ii)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def ct_benchmark_study(
    count: int, *, seed: int = 0, transfer_syntax: str = ExplicitVRLittleEndian
) -> StudySpec:
    """The one-study, one-series CT spec that :func:`generate_ct_series` writes.

    Its UIDs depend on ``seed``, ``count`` and ``transfer_syntax``, so two
    benchmark sets of different shape never collide in one archive.
    """
    series = modality_preset(
        "CT", instances=count, transfer_syntax=transfer_syntax, series_description="CT BENCH 1.25"
    )
    study = StudySpec(
        patient_id=f"BENCH{seed:06d}",
        patient_name="BENCHMARK^Ct",
        issuer_of_patient_id="IMAG_BENCH",
        birth_date="19700101",
        sex="O",
        study_description="CT THORAX BENCHMARK",
        accession_number=f"BCT{seed:06d}",
        study_date="20240610",
        study_time="083000",
        referring_physician="REF^Bench",
        institution_name="IMAG Benchmark",
        charset="ISO_IR 100",
        series=[series],
        # distinct sets (count, syntax) never share SOP Instance UIDs
        study_uid=_uid("ct-benchmark", seed, count, series.transfer_syntax),
    )
    return assign_uids(study, seed)


def generate_ct_series(
    folder: Path,
    count: int,
    *,
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Path]:
    """Write ``count`` 512x512 signed 16-bit CT slices of one study / series.

    Built for throughput: the dataset is built once, then only the
    per-instance UIDs, instance number, position and pixel data change. The
    files are byte-identical to ``write_study(ct_benchmark_study(count, ...))``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study = ct_benchmark_study(count, seed=seed, transfer_syntax=transfer_syntax)
    series = study.series[0]
    ts = series.transfer_syntax
    paths: list[Path] = []
    ds: FileDataset | None = None
    for i in range(count):
        rng = _instance_rng(study, seed, 0, i)
        pixels = render_pixels(series, i, rng)
        if ds is None:
            ds = make_instance(study, 0, 0, rng=rng, pixels=pixels)
        else:
            sop_uid = _sop_instance_uid(series, i)
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.InstanceNumber = i + 1
            _set_geometry(ds, study, series, 0, i)
            _set_pixel_data(ds, series, pixels, ts)
        path = folder / instance_filename(study, 0, i)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _pick(ts: UID) -> UID:
    """``ts`` when writable here, else explicit VR little endian."""
    return ts if ts in _available() else ExplicitVRLittleEndian


def _mixed_catalogue(small: bool) -> list[StudySpec]:
    def p(modality: str, small_size: tuple[int, int], **kw) -> SeriesSpec:
        if small:
            kw.setdefault("rows", small_size[0])
            kw.setdefault("columns", small_size[1])
        kw["transfer_syntax"] = _pick(UID(kw.get("transfer_syntax", ExplicitVRLittleEndian)))
        return modality_preset(modality, **kw)

    mueller = dict(
        patient_id="IMAG0001",
        patient_name="MÜLLER^Hans",
        issuer_of_patient_id="HOSP_NORD",
        birth_date="19560312",
        sex="M",
        charset="ISO_IR 100",
    )
    return [
        StudySpec(
            **mueller,
            study_description="CT Thorax mit KM",
            accession_number="ACC1001",
            study_date="20240115",
            study_time="091500",
            referring_physician="SCHÄFER^Jürgen^^Dr.",
            institution_name="Hôpital Nord",
            series=[
                p("CT", (64, 64), instances=5, series_description="Thorax 1.25 Weichteil"),
                p(
                    "CT",
                    (64, 64),
                    instances=3,
                    series_description="Thorax 1.25 Lunge",
                    transfer_syntax=JPEG2000Lossless,
                ),
            ],
        ),
        StudySpec(
            **mueller,
            study_description="MRT Schädel",
            accession_number="ACC1002",
            study_date="20240320",
            study_time="143000",
            referring_physician="SCHÄFER^Jürgen^^Dr.",
            institution_name="Hôpital Nord",
            series=[
                p(
                    "MR",
                    (64, 64),
                    instances=4,
                    series_description="T1 SE axial",
                    transfer_syntax=ImplicitVRLittleEndian,
                ),
                p(
                    "MR",
                    (64, 64),
                    instances=3,
                    series_description="T2 TSE axial",
                    transfer_syntax=DeflatedExplicitVRLittleEndian,
                ),
            ],
        ),
        StudySpec(
            patient_id="IMAG0002",
            patient_name="CÔTÉ^Zoé",
            issuer_of_patient_id="HOSP_NORD",
            birth_date="19710605",
            sex="F",
            study_description="Mammographie de dépistage",
            accession_number="ACC2001",
            study_date="20240402",
            study_time="101000",
            referring_physician="LEFÈVRE^Hélène",
            institution_name="Hôpital Nord",
            charset="ISO_IR 192",
            series=[p("MG", (128, 96), instances=4, transfer_syntax=RLELossless)],
        ),
        StudySpec(
            patient_id="IMAG0002",
            patient_name="NGUYỄN^Thị Thu",
            issuer_of_patient_id="CLINIQUE_SUD",
            birth_date="19880917",
            sex="F",
            study_description="Échographie abdominale",
            accession_number="ACC3001",
            study_date="20240415",
            study_time="160500",
            referring_physician="TRẦN^Văn",
            institution_name="Clinique Sud",
            charset="ISO_IR 192",
            series=[
                p("US", (64, 80), instances=2, series_description="Foie"),
                p(
                    "US",
                    (64, 80),
                    instances=1,
                    frames=6,
                    series_description="Foie ciné",
                    transfer_syntax=RLELossless,
                ),
            ],
        ),
        StudySpec(
            patient_id="IMAG0004",
            patient_name="GARCÍA^José",
            issuer_of_patient_id=None,
            birth_date="19450201",
            sex="M",
            study_description="Radiografía de tórax",
            accession_number="ACC4001",
            study_date="20240501",
            study_time="074500",
            referring_physician="PEÑA^Inés",
            institution_name="Clínica Santa María",
            charset="ISO_IR 100",
            series=[
                p("CR", (128, 128), instances=1, transfer_syntax=ExplicitVRBigEndian),
                p(
                    "DX",
                    (128, 104),
                    instances=2,
                    series_description="Tórax lateral",
                    transfer_syntax=DeflatedExplicitVRLittleEndian,
                ),
            ],
        ),
        StudySpec(
            patient_id="IMAG0005",
            patient_name="ØSTERGÅRD^Søren",
            issuer_of_patient_id="HOSP_NORD",
            birth_date="19620722",
            sex="M",
            study_description="Coronarografia",
            accession_number="ACC5001",
            study_date="20240612",
            study_time="111500",
            referring_physician="ÅBERG^Åsa",
            institution_name="Hôpital Nord",
            charset="ISO_IR 100",
            series=[
                p("XA", (64, 64), instances=1, frames=8, transfer_syntax=JPEG2000Lossless),
                p(
                    "OT",
                    (64, 64),
                    instances=1,
                    series_description="Capture d'écran",
                    transfer_syntax=ImplicitVRLittleEndian,
                ),
            ],
        ),
    ]


_EXTRA_NAMES = [
    ("DUPONT^Marie", "F", "ISO_IR 100"),
    ("WÓJCIK^Łukasz", "M", "ISO_IR 192"),
    ("JÄRVINEN^Aino", "F", "ISO_IR 100"),
    ("ÇELİK^Mehmet", "M", "ISO_IR 192"),
    ("O'NEILL^Seán", "M", "ISO_IR 100"),
]


def generate_mixed_set(
    folder: Path, *, studies: int = 6, seed: int = 0, small: bool = True
) -> list[StudySpec]:
    """Write a multi-patient, multi-modality set into ``folder``; return its specs.

    With ``studies >= 6`` (default) the set covers CT, MR, CR, DX, MG, US
    (RGB single- and multi-frame), XA (multi-frame) and OT; explicit and
    implicit VR little endian, explicit VR big endian, deflated, RLE and JPEG
    2000 lossless (falling back to explicit VR little endian where an encoder
    is missing); Latin-1 and UTF-8 accented names; two patients sharing
    PatientID "IMAG0002" under different issuers (and names); one patient
    (IMAG0001 / HOSP_NORD) with two studies; one patient without issuer.
    Fewer studies take the first ones of that list; more add extra patients
    cycling through the modalities. ``small`` keeps images around 64-128
    pixels; ``small=False`` uses the preset sizes. The returned specs have
    their UIDs filled in.
    """
    specs = _mixed_catalogue(small)[:studies]
    rng = np.random.default_rng([seed, 7])
    extra_modalities = ["CT", "MR", "CR", "MG", "US", "DX"]
    syntaxes = [ts for ts in available_transfer_syntaxes(lossless_only=True)]
    small_sizes = {
        "CT": (64, 64),
        "MR": (64, 64),
        "CR": (96, 96),
        "MG": (128, 96),
        "US": (64, 80),
        "DX": (96, 80),
    }
    for n in range(len(specs), studies):
        name, sex, charset = _EXTRA_NAMES[n % len(_EXTRA_NAMES)]
        modality = extra_modalities[n % len(extra_modalities)]
        size = dict(zip(("rows", "columns"), small_sizes[modality], strict=True)) if small else {}
        ts = syntaxes[int(rng.integers(len(syntaxes)))]
        instances = 4 if modality == "MG" else int(rng.integers(1, 4))
        specs.append(
            StudySpec(
                patient_id=f"IMAG{n + 1:04d}",
                patient_name=name,
                issuer_of_patient_id="HOSP_NORD" if n % 2 else "CLINIQUE_SUD",
                birth_date=f"19{50 + n % 40:02d}0{1 + n % 9}15",
                sex=sex,
                study_description=f"{modality} examen {n + 1}",
                accession_number=f"ACC{9000 + n}",
                study_date=f"2024{1 + n % 12:02d}{1 + n % 28:02d}",
                study_time=f"{8 + n % 10:02d}{n % 60:02d}00",
                referring_physician="MARTIN^Paul",
                institution_name="Hôpital Nord",
                charset=charset,
                series=[modality_preset(modality, instances=instances, transfer_syntax=ts, **size)],
            )
        )
    folder = Path(folder)
    for spec in specs:
        write_study(spec, folder, seed=seed)
    return specs


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m archive.synthetic OUTDIR (--ct N | --mixed) [--seed S] ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m archive.synthetic", description="Write synthetic DICOM files."
    )
    parser.add_argument("outdir", type=Path)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ct", type=int, metavar="N", help="N 512x512 CT slices in one series")
    what.add_argument("--mixed", action="store_true", help="a mixed multi-patient set")
    what.add_argument("--list-syntaxes", action="store_true", help="print writable syntaxes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--studies", type=int, default=6, help="studies in --mixed (default 6)")
    parser.add_argument("--large", action="store_true", help="--mixed with preset image sizes")
    parser.add_argument(
        "--transfer-syntax",
        default=ExplicitVRLittleEndian,
        help="UID for --ct (default: explicit LE)",
    )
    args = parser.parse_args(argv)

    if args.list_syntaxes:
        for uid in available_transfer_syntaxes():
            print(f"{uid}  {uid.name}")
        return 0
    start = time.perf_counter()
    if args.ct is not None:
        paths = generate_ct_series(
            args.outdir, args.ct, seed=args.seed, transfer_syntax=args.transfer_syntax
        )
        size = sum(p.stat().st_size for p in paths)
        elapsed = time.perf_counter() - start
        print(
            f"wrote {len(paths)} CT slices ({size / 1e6:.1f} MB, "
            f"{UID(args.transfer_syntax).name}) to {args.outdir} in {elapsed:.2f} s"
        )
        return 0
    specs = generate_mixed_set(
        args.outdir, studies=args.studies, seed=args.seed, small=not args.large
    )
    elapsed = time.perf_counter() - start
    total = 0
    for spec in specs:
        total += spec.instance_count
        issuer = spec.issuer_of_patient_id or "-"
        print(
            f"{spec.patient_id:10} {issuer:13} {spec.patient_name:20} {spec.charset:11} "
            f"{spec.accession_number:8} {spec.instance_count:3} files"
        )
        for s in spec.series:
            frames = f" x{s.frames} frames" if s.frames > 1 else ""
            print(
                f"    {s.modality:3} {s.rows}x{s.columns} {s.instances} inst{frames}  "
                f"{s.transfer_syntax.name}"
            )
    print(f"wrote {total} files, {len(specs)} studies to {args.outdir} in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
