"""HTJ2K as viewers ask for it (issue 19): the ``image/jphc`` media type on
WADO-RS frames and pixel data (the stored codestreams when stored as HTJ2K,
frames re-encoded one by one otherwise, 406 where neither can be), instances
retrieved in an HTJ2K transfer syntax, and HTJ2K codestreams of 12-bit data
that declare 12-bit precision in their SIZ marker (not the 16-bit container),
decoding bit-exact with both OpenJPEG and OpenJPH.

dicomweb-client 0.61 knows neither image/jphc nor the HTJ2K transfer
syntaxes for retrieval: it stores, and retrieves as stored, where it
applies; raw HTTP asks for HTJ2K."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    generate_uid,
)

from archive import codecs as tc
from archive.codecs import backend
from archive.codecs.codestream import j2k_coding_style, j2k_siz
from tests.inprocess import InProcessImag, serving_in_process
from tests.test_dicomweb_bulk import multipart_parts

pytestmark = pytest.mark.skipif(
    not backend.openjph_available(), reason="imagecodecs without OpenJPH: no HTJ2K encoder"
)

HTJ2K = UID("1.2.840.10008.1.2.4.203")  # HTJ2K, lossless or lossy
JPHC = "image/jphc"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
MG_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - Presentation
PROBLEM = "application/problem+json"


# --------------------------------------------------------------------------- objects


def image(
    study: str,
    *,
    bits_stored: int = 12,
    signed: bool = False,
    frames: int = 1,
    rows: int = 70,
    columns: int = 90,
    photometric: str = "MONOCHROME2",
    bits_allocated: int = 16,
    seed: int = 0,
) -> Dataset:
    """A native image whose values span the whole Bits Stored range (its
    smallest and largest value occur in every frame)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_CLASS if frames == 1 else SC_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.PatientName = "HTJ2K-1", "HIGH^Throughput"
    ds.StudyDate, ds.StudyTime = "20250301", "090000"
    ds.Modality = "MG" if frames == 1 else "OT"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored = bits_allocated, bits_stored
    ds.HighBit, ds.PixelRepresentation = bits_stored - 1, int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    if signed:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    shape = (frames, rows, columns) + ((samples,) if samples > 1 else ())
    kind = f"{'<i' if signed else '<u'}{bits_allocated // 8}"
    values = np.random.default_rng(seed).integers(low, high + 1, size=shape).astype(kind)
    values[:, 0, 0], values[:, -1, -1] = low, high
    ds.PixelData = values.tobytes()
    return ds


def as_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def frames_of(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))


def expected_frames(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array
    return arr if int(ds.get("NumberOfFrames", 1)) > 1 else arr[np.newaxis]


def assert_decodes_exactly(codestream: bytes, expected: np.ndarray, bits: int) -> None:
    """Both HTJ2K decoders here (OpenJPEG through pylibjpeg, OpenJPH through
    imagecodecs) give back exactly ``expected``, and the codestream declares
    ``bits`` of precision for every component, as the image is signed or not."""
    from openjpeg import decode as openjpeg_decode

    siz = j2k_siz(codestream)
    assert siz["precision"] == [bits] * len(siz["precision"]), siz
    assert siz["signed"] == [expected.dtype.kind == "i"] * len(siz["signed"]), siz
    assert (siz["rows"], siz["columns"]) == expected.shape[:2]
    by_openjpeg = openjpeg_decode(codestream)
    by_openjph = backend.decode_htj2k_frame(codestream, "test frame")
    for decoded in (by_openjpeg, by_openjph):
        assert decoded.shape == expected.shape
        assert np.array_equal(decoded.astype(np.int64), expected.astype(np.int64))


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("target", [HTJ2KLossless, HTJ2KLosslessRPCL], ids=["201", "202"])
@pytest.mark.parametrize(
    ("bits_allocated", "bits_stored", "signed"),
    [(16, 12, False), (16, 12, True), (16, 10, False), (16, 16, False), (8, 6, False)],
    ids=["u12", "s12", "u10", "u16", "u6-in-8"],
)
def test_an_htj2k_codestream_declares_bits_stored_as_its_precision_and_decodes_bit_exact(
    target: UID, bits_allocated: int, bits_stored: int, signed: bool
) -> None:
    original = image(
        generate_uid(),
        bits_stored=bits_stored,
        signed=signed,
        bits_allocated=bits_allocated,
        frames=2,
        seed=bits_stored,
    )
    out = pydicom.dcmread(io.BytesIO(tc.transcode(as_bytes(original), target)))
    assert out.file_meta.TransferSyntaxUID == target
    expected = expected_frames(original)
    for codestream, frame in zip(frames_of(out), expected, strict=True):
        assert_decodes_exactly(codestream, frame, bits_stored)
        assert j2k_coding_style(codestream)["reversible"]
    assert np.array_equal(expected_frames(out), expected)  # pydicom reads it as it was


def test_a_sample_above_bits_stored_keeps_the_container_precision_rather_than_being_clipped() -> (
    None
):
    frame = np.full((40, 40), 100, np.uint16)
    frame[3, 4] = 5000  # Bits Stored 12 says at most 4095: the value is kept, not clipped
    (codestream,) = backend.encode_htj2k([frame], HTJ2KLossless, 12)
    assert_decodes_exactly(codestream, frame, 16)


def test_without_bits_stored_the_container_size_is_the_precision() -> None:
    frame = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    (codestream,) = backend.encode_htj2k([frame], HTJ2KLossless)
    assert_decodes_exactly(codestream, frame, 16)


# --------------------------------------------------------------------------- the archive


@dataclass
class World:
    server: InProcessImag
    native12: Dataset  # 3 frames, 12 bits stored, native
    signed12: Dataset  # 1 frame, signed 12 bits, native
    stored201: Dataset  # the native12 image stored as HTJ2K .201
    stored202: Dataset  # stored as HTJ2K RPCL .202
    lossy203: Dataset  # an HTJ2K "lossy allowed" object
    ybr: Dataset  # native YBR_FULL: decoders hand back RGB, no frame re-encoding

    def url(self, ds: Dataset, tail: str = "") -> str:
        return (
            f"{self.server.dicomweb}/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{tail}"
        )

    def get(self, url: str, accept: str) -> requests.Response:
        return self.server.http.get(url, headers={"Accept": accept}, timeout=60)


def _encoded(ds: Dataset, target: UID) -> Dataset:
    out = pydicom.dcmread(io.BytesIO(tc.transcode(as_bytes(ds), target)))
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out.SeriesInstanceUID = generate_uid()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    study = generate_uid()
    native12 = image(study, frames=3, seed=1)
    lossy = _encoded(image(study, seed=2), HTJ2KLossless)
    lossy.file_meta.TransferSyntaxUID = HTJ2K
    lossy.LossyImageCompression = "01"
    ybr = image(study, bits_stored=8, bits_allocated=8, photometric="YBR_FULL", seed=3)
    data = World(
        None,  # type: ignore[arg-type]
        native12,
        image(study, signed=True, seed=4),
        _encoded(native12, HTJ2KLossless),
        _encoded(native12, HTJ2KLosslessRPCL),
        lossy,
        ybr,
    )
    with serving_in_process(tmp_path_factory.mktemp("htj2k") / "imag") as server:
        data.server = server
        objects = (
            data.native12,
            data.signed12,
            data.stored201,
            data.stored202,
            data.lossy203,
            data.ybr,
        )
        server.client().store_instances([pydicom.dcmread(io.BytesIO(as_bytes(d))) for d in objects])
        yield data
        assert "Traceback" not in server.log(), server.log()[-5000:]


def test_frames_stored_as_htj2k_are_sent_as_stored_on_image_jphc_with_or_without_syntax(
    world: World,
) -> None:
    stored = frames_of(world.stored201)
    for accept in (
        f'multipart/related; type="{JPHC}"',
        f'multipart/related; type="{JPHC}"; transfer-syntax={HTJ2KLossless}',
        f'multipart/related; type="{JPHC}"; transfer-syntax=*',
    ):
        answer = world.get(world.url(world.stored201, "/frames/3,1"), accept)
        assert answer.status_code == 200, (accept, answer.text)
        parts = multipart_parts(answer)
        assert [body for _, body in parts] == [stored[2], stored[0]], accept
        assert all(kind == f"{JPHC}; transfer-syntax={HTJ2KLossless}" for kind, _ in parts)
    # an RPCL (.202) codestream is an HTJ2K Lossless (.201) one: sent as it is
    rpcl = frames_of(world.stored202)
    answer = world.get(
        world.url(world.stored202, "/frames/2"),
        f'multipart/related; type="{JPHC}"; transfer-syntax={HTJ2KLossless}',
    )
    assert answer.status_code == 200, answer.text
    ((kind, body),) = multipart_parts(answer)
    assert (kind, body) == (f"{JPHC}; transfer-syntax={HTJ2KLossless}", rpcl[1])


def test_frames_of_native_12_bit_data_are_re_encoded_as_12_bit_htj2k_on_image_jphc(
    world: World,
) -> None:
    expected = expected_frames(world.native12)
    answer = world.get(
        world.url(world.native12, "/frames/1,2,3"), f'multipart/related; type="{JPHC}"'
    )
    assert answer.status_code == 200, answer.text
    parts = multipart_parts(answer)
    assert len(parts) == 3
    for (kind, body), frame in zip(parts, expected, strict=True):
        assert kind == f"{JPHC}; transfer-syntax={HTJ2KLossless}"
        assert_decodes_exactly(body, frame, 12)
    # the RPCL syntax gets RPCL codestreams with TLM markers (PS3.5 10.18)
    answer = world.get(
        world.url(world.native12, "/frames/2"),
        f'multipart/related; type="{JPHC}"; transfer-syntax={HTJ2KLosslessRPCL}',
    )
    ((kind, body),) = multipart_parts(answer)
    assert kind == f"{JPHC}; transfer-syntax={HTJ2KLosslessRPCL}"
    style = j2k_coding_style(body)
    assert style["progression"] == 2 and style["tlm"] and style["ht"], style
    assert_decodes_exactly(body, expected[1], 12)
    # one frame asked single part: the bare codestream
    single = world.get(world.url(world.signed12, "/frames/1"), JPHC)
    assert single.status_code == 200, single.text
    assert single.headers["Content-Type"] == f"{JPHC}; transfer-syntax={HTJ2KLossless}"
    assert_decodes_exactly(single.content, expected_frames(world.signed12)[0], 12)


def test_the_pixel_data_bulk_resource_gives_one_htj2k_part_per_frame_on_image_jphc(
    world: World,
) -> None:
    answer = world.get(
        world.url(world.native12, "/bulk/7FE00010"), f'multipart/related; type="{JPHC}"'
    )
    assert answer.status_code == 200, answer.text
    parts = multipart_parts(answer)
    for (kind, body), frame in zip(parts, expected_frames(world.native12), strict=True):
        assert kind.startswith(JPHC)
        assert_decodes_exactly(body, frame, 12)
    assert len(parts) == 3


def test_instances_are_retrieved_in_htj2k_as_stored_or_re_encoded_at_12_bits(
    world: World,
) -> None:
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={HTJ2KLossless}'
    as_stored = world.get(world.url(world.stored201), accept)
    assert as_stored.status_code == 200, as_stored.text
    ((kind, body),) = multipart_parts(as_stored)
    assert kind == f"application/dicom; transfer-syntax={HTJ2KLossless}"
    got = pydicom.dcmread(io.BytesIO(body))
    assert frames_of(got) == frames_of(world.stored201)  # the stored codestreams, untouched
    re_encoded = world.get(world.url(world.native12), accept)
    assert re_encoded.status_code == 200, re_encoded.text
    ((_, body),) = multipart_parts(re_encoded)
    got = pydicom.dcmread(io.BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == HTJ2KLossless
    for codestream, frame in zip(frames_of(got), expected_frames(world.native12), strict=True):
        assert_decodes_exactly(codestream, frame, 12)
    # dicomweb-client reads the HTJ2K instance as stored
    client = world.server.client()
    ds = client.retrieve_instance(
        str(world.stored202.StudyInstanceUID),
        str(world.stored202.SeriesInstanceUID),
        str(world.stored202.SOPInstanceUID),
        media_types=(("application/dicom", "*"),),
    )
    assert ds.file_meta.TransferSyntaxUID == HTJ2KLosslessRPCL
    assert np.array_equal(ds.pixel_array, world.native12.pixel_array)


@pytest.mark.parametrize(
    ("which", "tail", "accept", "why"),
    [
        (
            "lossy203",
            "/frames/1",
            f'multipart/related; type="{JPHC}"; transfer-syntax={HTJ2KLossless}',
            "lossy HTJ2K is never sent as HTJ2K Lossless",
        ),
        ("ybr", "/frames/1", f'multipart/related; type="{JPHC}"', "YBR decodes to RGB"),
        ("native12", "/frames/1,2", JPHC, "two frames are no single-part body"),
        (
            "native12",
            "/frames/1",
            f'multipart/related; type="{JPHC}"; transfer-syntax=3.2.840.10008.1.2.4.96',
            "a private pre-standard HTJ2K syntax is not produced",
        ),
        (
            "native12",
            "/frames/1",
            f'multipart/related; type="{JPHC}"; transfer-syntax={ExplicitVRLittleEndian}',
            "image/jphc cannot carry native data",
        ),
        ("native12", "/rendered", JPHC, "image/jphc is not a rendered media type"),
    ],
    ids=[
        "lossy-as-lossless",
        "ybr",
        "single-part-two-frames",
        "private-syntax",
        "native",
        "rendered",
    ],
)
def test_image_jphc_that_cannot_be_honoured_is_a_406_problem(
    world: World, which: str, tail: str, accept: str, why: str
) -> None:
    answer = world.get(world.url(getattr(world, which), tail), accept)
    assert answer.status_code == 406, (why, answer.status_code, answer.headers)
    assert answer.headers["Content-Type"].startswith(PROBLEM), why


def test_a_lossy_htj2k_instance_still_gives_its_own_frames_and_uncompressed_ones(
    world: World,
) -> None:
    stored = frames_of(world.lossy203)
    answer = world.get(world.url(world.lossy203, "/frames/1"), f'multipart/related; type="{JPHC}"')
    assert answer.status_code == 200, answer.text
    assert multipart_parts(answer) == [(f"{JPHC}; transfer-syntax={HTJ2K}", stored[0])]
    native = world.server.client().retrieve_instance_frames(
        str(world.lossy203.StudyInstanceUID),
        str(world.lossy203.SeriesInstanceUID),
        str(world.lossy203.SOPInstanceUID),
        [1],
    )
    assert len(native) == 1 and len(native[0]) == 70 * 90 * 2


# --------------------------------------------------------------------------- storage policy


def test_the_htj2k_storage_policy_writes_12_bit_codestreams_for_12_bit_images(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    study = generate_uid()
    unsigned, signed = image(study, seed=5), image(study, signed=True, seed=6)
    settings = {"IMAG_STORE_AS": "htj2k-lossless"}
    with serving_in_process(
        tmp_path_factory.mktemp("policy") / "imag", settings=settings
    ) as server:
        client = server.client()
        client.store_instances(
            [pydicom.dcmread(io.BytesIO(as_bytes(d))) for d in (unsigned, signed)]
        )
        for original in (unsigned, signed):
            got = client.retrieve_instance(
                study,
                str(original.SeriesInstanceUID),
                str(original.SOPInstanceUID),
                media_types=(("application/dicom", "*"),),
            )
            assert got.file_meta.TransferSyntaxUID == HTJ2KLossless
            (codestream,) = frames_of(got)
            assert_decodes_exactly(codestream, original.pixel_array, 12)
