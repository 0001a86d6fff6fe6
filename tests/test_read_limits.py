"""Reads that a hostile or careless client, or a bad stored object, must not
turn into a 500 or an exhausted server (issue 11, classes 5, 6 and the
integer overflow of 9), against a real ``imag serve`` on SQLite and on
PostgreSQL:

* response amplification: a frame list longer than
  ``dicomweb.max_frames_per_request`` is 400; a long one within it is
  streamed with the server's memory bounded (peak RSS measured);
* stored objects that fail on read (written straight into the store and the
  index, since ingest now refuses them): pixel data shorter than Rows x
  Columns x frames, a frame too large to decode within
  ``dicomweb.max_built_bytes``, sequences nested thousands deep, an
  unreadable header: each read answers a precise problem or, for metadata,
  the readable part with a ``Warning``, and never fails the other instances;
* integer query parameters past any SQL integer (offset, limit, IS matching
  values, frame numbers, WADO-URI parameters): 400 with a problem.

Every refusal is checked for its status and problem body, exactly one audit
row, the server still answering /health and a normal request, and the
stored instances unchanged.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from archive import pixels
from archive.config import load_config
from archive.index import Catalog, open_database
from archive.index.catalog import InstanceRecord
from archive.parse import index_fields
from archive.retrieve import StoredObject, open_header
from archive.uids import object_key
from tests.dicomfiles import pydicom_test_folders
from tests.httpserver import HttpImag, running_imag
from tests.s3server import StoreUnderTest, index_for_store
from tests.test_dicomweb import DICOM, assert_problem, multipart, parts_of

# the read paths meet the store alike on any index: S3 on SQLite only here
# (PostgreSQL + S3: test_dicomweb_s3, test_several_nodes)
pytestmark = pytest.mark.s3_on_sqlite

MB = 1 << 20
FRAME_LIMIT = 256  # dicomweb.max_frames_per_request, default
BUILT_LIMIT = 256 * MB  # dicomweb.max_built_bytes, default
DEPTH = 3000  # nesting of the deep object (pydicom's recursion fails near 200)


@pytest.fixture(scope="module")
def index_url(module_index_url: str, module_store: StoreUnderTest) -> str:
    """One index per backend and object store for the whole module (conftest's
    is per test): a server on S3 never sees rows of objects in a folder."""
    return index_for_store(module_index_url, module_store)


# --------------------------------------------------------------------------- objects


def _image(
    study: str,
    series: str,
    *,
    rows: int,
    columns: int,
    samples: int = 1,
    bits: int = 16,
    frames: int | None = None,
    pixel_data: bytes,
    syntax: str = ExplicitVRLittleEndian,
    number: int = 1,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = CTImageStorage if samples == 1 else "1.2.840.10008.5.1.4.1.1.7.4"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName = "LIMITS1", "LIMITS^Read"
    ds.Modality = "CT" if samples == 1 else "OT"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB" if bits == 8 or syntax != ExplicitVRLittleEndian else "OW"
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _nested(depth: int) -> bytes:
    """(0040,A730) Content Sequence nested ``depth`` deep, undefined lengths,
    Explicit VR Little Endian: the bytes a hostile sender builds by hand."""
    body = b"\x08\x00\x60\x00CS\x02\x00OT"
    for _ in range(depth):
        item = (
            struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + body
            + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        )
        body = (
            struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
            + item
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        )
    return body


def _with_deep_sequence(ds: Dataset) -> bytes:
    """``ds`` with the deep sequence inserted at its place in tag order
    (between (0040,A730)'s neighbours: after group 0028, before Pixel Data)."""
    data = _bytes(ds)
    at = data.index(b"\xe0\x7f\x10\x00")  # the Pixel Data tag
    return data[:at] + _nested(DEPTH) + data[at:]


def _unreadable(ds: Dataset) -> bytes:
    """A Part 10 object whose data set is labelled deflated but is not a
    deflate stream: nothing can parse its header."""
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + head.getvalue() + b"\xff" * 64


# --------------------------------------------------------------------------- the archive


@dataclass
class Stored:
    """The objects the module stores, by role."""

    study: str
    rgb: Dataset  # 2 frames of 512 x 512 RGB (786,432 bytes each), stored by STOW-RS
    normal: Dataset  # a sound CT slice in the bad objects' series
    short: str  # native pixel data shorter than its attributes declare
    huge: str  # RLE, 65535 x 65535 declared: too large to decode
    deep: str  # sequences nested DEPTH deep, pixel data sound
    unreadable: str  # a header nothing can parse
    bad_series: str
    broken_study: str  # a sound instance, then JPEG 2000 data that does not decode


@dataclass
class World:
    server: HttpImag
    index_url: str
    stored: Stored

    def get(self, path: str, **kwargs: object) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return self.server.http.get(self.server.dicomweb + path, **kwargs)  # type: ignore[arg-type]

    def instance(self, sop: str, series: str | None = None) -> str:
        return (
            f"/studies/{self.stored.study}/series/{series or self.stored.bad_series}"
            f"/instances/{sop}"
        )

    def last_audit(self) -> int:
        db = open_database(self.index_url)
        try:
            return int(db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))
        finally:
            db.close()

    def audit_since(self, last: int) -> list[tuple]:
        db = open_database(self.index_url)
        try:
            return db.query(
                "SELECT action, outcome, status, study_uid FROM audit WHERE id > ? ORDER BY id",
                (last,),
            )
        finally:
            db.close()

    def instances(self) -> list[tuple]:
        db = open_database(self.index_url)
        try:
            return db.query(
                "SELECT sop_instance_uid, object_key, size FROM instances ORDER BY sop_instance_uid"
            )
        finally:
            db.close()


def _plant(
    server: HttpImag, index_url: str, ds: Dataset, data: bytes, store: StoreUnderTest
) -> str:
    """Store ``data`` (the object made from ``ds``) straight into the object
    store and the index, past every ingest check, as objects stored by an
    older version were; return its SOP Instance UID."""
    config = load_config(env=server.env)
    digest = hashlib.sha256(data)
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    key = object_key(study, series, sop, digest.hexdigest())
    syntax = str(ds.file_meta.TransferSyntaxUID)
    objects = store.open(config.data_dir)
    db = open_database(index_url)
    try:
        objects.put(key, data)
        record = InstanceRecord(
            issuer="LIMITS",
            patient_id=str(ds.PatientID),
            site="LIMITS",
            study_uid=study,
            series_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=str(ds.SOPClassUID),
            stored_ts=syntax,
            original_ts=syntax,
            object_key=key,
            size=len(data),
            sha256=digest.digest(),
            **index_fields(ds),
        )
        Catalog(db).commit([record])
    finally:
        db.close()
        objects.close()
    return sop


@pytest.fixture(scope="module")
def world(
    index_url: str, module_store: StoreUnderTest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One server per index and per object store: the limits (and the memory
    bounds) hold when objects come from an S3 body that cannot seek."""
    with running_imag(
        tmp_path_factory.mktemp("imag"), index_url=index_url, settings=module_store.settings()
    ) as server:
        study, series, bad_series = generate_uid(), generate_uid(), generate_uid()
        rng = np.random.default_rng(11)
        rgb = _image(
            study,
            series,
            rows=512,
            columns=512,
            samples=3,
            bits=8,
            frames=2,
            pixel_data=rng.integers(0, 256, 2 * 512 * 512 * 3, dtype=np.uint8).tobytes(),
        )
        normal = _image(
            study,
            bad_series,
            rows=64,
            columns=64,
            pixel_data=rng.integers(0, 4096, 64 * 64, dtype=np.uint16).tobytes(),
        )
        answer = server.http.post(
            server.dicomweb + "/studies",
            data=multipart([(DICOM, _bytes(rgb)), (DICOM, _bytes(normal))]),
            headers={
                "Content-Type": f'multipart/related; type="{DICOM}"; boundary=imag-test-3f2a',
                "Accept": "application/dicom+json",
            },
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        short = _image(
            study, bad_series, rows=512, columns=512, frames=4, pixel_data=b"\0" * 1000, number=2
        )
        huge = _image(
            study,
            bad_series,
            rows=65535,
            columns=65535,
            pixel_data=encapsulate([b"\0" * 64]),
            syntax=RLELossless,
            number=3,
        )
        deep = _image(
            study,
            bad_series,
            rows=64,
            columns=64,
            pixel_data=rng.integers(0, 4096, 64 * 64, dtype=np.uint16).tobytes(),
            number=4,
        )
        broken = _image(study, bad_series, rows=8, columns=8, pixel_data=b"\0" * 128, number=5)
        broken_study, broken_series = generate_uid(), generate_uid()
        sound = _image(broken_study, broken_series, rows=64, columns=64, pixel_data=b"\0" * 8192)
        corrupt = _image(
            broken_study,
            broken_series,
            rows=64,
            columns=64,
            pixel_data=encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 100]),
            syntax=JPEG2000Lossless,
            number=2,
        )
        for ds in (sound, corrupt):
            _plant(server, index_url, ds, _bytes(ds), module_store)
        stored = Stored(
            study=study,
            rgb=rgb,
            normal=normal,
            short=_plant(server, index_url, short, _bytes(short), module_store),
            huge=_plant(server, index_url, huge, _bytes(huge), module_store),
            deep=_plant(server, index_url, deep, _with_deep_sequence(deep), module_store),
            unreadable=_plant(server, index_url, broken, _unreadable(broken), module_store),
            bad_series=bad_series,
            broken_study=broken_study,
        )
        yield World(server, index_url, stored)
    # no request failed with a 500 (pydicom logs its decoders' tracebacks itself)
    assert "request failed" not in server.log(), server.log()[-5000:]
    assert "Error handling request" not in server.log(), server.log()[-5000:]


# --------------------------------------------------------------------------- checks


def peak_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss(pid: int) -> None:
    """Reset the process's VmHWM to its current RSS (Linux clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture
def refused(world: World) -> Iterator[list[requests.Response]]:
    """Run the block's requests, then check what every refusal must leave:
    exactly one audit row per request, with its status; the stored instances
    as they were; /health and a normal request still answered."""
    before = world.instances()
    last = world.last_audit()
    answers: list[requests.Response] = []
    yield answers
    rows = world.audit_since(last)
    assert [row[2] for row in rows] == [a.status_code for a in answers], rows
    assert world.instances() == before
    health = requests.get(world.server.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    normal = world.get(world.instance(str(world.stored.normal.SOPInstanceUID)) + "/metadata")
    assert normal.status_code == 200
    assert normal.json()[0]["00080018"]["Value"] == [str(world.stored.normal.SOPInstanceUID)]


def _rgb_path(world: World) -> str:
    return world.instance(
        str(world.stored.rgb.SOPInstanceUID), str(world.stored.rgb.SeriesInstanceUID)
    )


# --------------------------------------------------------------------------- amplification


def test_a_long_frame_list_is_streamed_with_the_servers_memory_bounded(world: World) -> None:
    """The issue's example: frame 1 of a 512 x 512 RGB instance asked again
    and again.  At the limit (256 repeats, 201 MB of answer) the parts come
    one by one; the server's peak RSS during the request is measured."""
    pid = world.server.proc.pid  # type: ignore[union-attr]
    frame = bytes(world.stored.rgb.PixelData[: 512 * 512 * 3])
    path = _rgb_path(world) + "/frames/" + ",".join(["1"] * FRAME_LIMIT)
    reset_peak_rss(pid)
    rss_before, _ = peak_rss(pid)
    received = 0
    with world.server.http.get(world.server.dicomweb + path, stream=True, timeout=300) as answer:
        assert answer.status_code == 200, answer.text[:500]
        content = bytearray()
        for chunk in answer.iter_content(1 << 20):
            content += chunk
            received += len(chunk)
        answer._content = bytes(content)  # for parts_of
        parts = parts_of(answer)
    _, peak = peak_rss(pid)
    assert len(parts) == FRAME_LIMIT
    assert all(body == frame for _, body in parts)
    assert received > FRAME_LIMIT * len(frame)
    growth = peak - rss_before
    print(
        f"\nframes x{FRAME_LIMIT}: {received / MB:.0f} MB sent; server RSS before "
        f"{rss_before / MB:.0f} MB, peak {peak / MB:.0f} MB, growth {growth / MB:.1f} MB"
    )
    assert growth < 64 * MB, (rss_before, peak)
    assert peak < 500 * MB


def test_more_frame_numbers_than_the_limit_is_400_naming_the_setting(
    world: World, refused: list
) -> None:
    for numbers in (["1"] * (FRAME_LIMIT + 1), ["1", "2"] * 1000):
        answer = world.get(_rgb_path(world) + "/frames/" + ",".join(numbers))
        refused.append(answer)
        body = assert_problem(answer, 400, "dicomweb.max_frames_per_request", str(FRAME_LIMIT))
        assert f"{len(numbers)} frame numbers" in body["detail"]


# --------------------------------------------------------------------------- bad stored objects


def test_pixel_data_shorter_than_its_attributes_is_422_on_every_pixel_read(
    world: World, refused: list
) -> None:
    path = world.instance(world.stored.short)
    wado = {
        "requestType": "WADO",
        "studyUID": world.stored.study,
        "seriesUID": world.stored.bad_series,
        "objectUID": world.stored.short,
    }
    for answer in (
        world.get(path + "/rendered"),
        world.get(path + "/thumbnail"),
        world.get(path + "/frames/1/rendered"),
        world.get(path + "/frames/2"),
        world.get("/wado", params=wado),
    ):
        refused.append(answer)
        assert_problem(answer, 422, world.stored.short, "pixel data is truncated", "1000 bytes")


def test_the_inconsistent_instance_is_still_retrievable_as_stored_and_described(
    world: World,
) -> None:
    path = world.instance(world.stored.short)
    whole = world.get(
        path, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    )
    assert whole.status_code == 200
    (part,) = parts_of(whole)
    assert pydicom.dcmread(io.BytesIO(part[1])).SOPInstanceUID == world.stored.short
    described = world.get(path + "/metadata")
    assert described.status_code == 200
    assert described.json()[0]["00280010"]["Value"] == [512]


def test_a_frame_too_large_to_decode_is_422_naming_the_built_bytes_limit(
    world: World, refused: list
) -> None:
    path = world.instance(world.stored.huge)
    for answer in (
        world.get(path + "/rendered"),
        world.get(path + "/thumbnail"),
        world.get(path + "/frames/1"),  # uncompressed: decoded first
    ):
        refused.append(answer)
        assert_problem(answer, 422, "dicomweb.max_built_bytes", str(BUILT_LIMIT), "65535")
    # converting the whole instance (the default Accept) is refused before a byte is sent
    answer = world.get(path)
    refused.append(answer)
    assert_problem(answer, 422, world.stored.huge, "dicomweb.max_built_bytes", "transfer-syntax=*")
    # so is the study's retrieval in that syntax: nothing is left out silently
    answer = world.get(f"/studies/{world.stored.study}")
    refused.append(answer)
    assert_problem(answer, 422, world.stored.huge, "transfer-syntax=*")
    # as stored, nothing is built: the fragment comes back as it is
    stored = world.get(
        path + "/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    )
    refused.append(stored)
    assert stored.status_code == 200
    (part,) = parts_of(stored)
    assert part[1] == b"\0" * 64


def test_a_series_renders_the_instances_that_can_be_and_its_thumbnail_skips_the_others(
    world: World, refused: list
) -> None:
    s = world.stored
    series = f"/studies/{s.study}/series/{s.bad_series}"
    answer = world.get(series + "/rendered", headers={"Accept": "image/png"})
    refused.append(answer)
    assert answer.status_code == 200, answer.text[:500]
    images = [body for _, body in parts_of(answer)]
    assert len(images) == 2 and all(i[:4] == b"\x89PNG" for i in images)  # normal, deep
    # the middle instance (the huge one) cannot be rendered: the next one stands in
    thumb = world.get(series + "/thumbnail", headers={"Accept": "image/png"})
    refused.append(thumb)
    assert thumb.status_code == 200 and thumb.content[:4] == b"\x89PNG"


def test_a_conversion_failing_after_the_status_cuts_the_answer_short(world: World) -> None:
    """The second instance's JPEG 2000 data do not decode, which is found only
    when it is converted, after the first was sent: the answer is cut (the
    client sees it incomplete), never completed without that instance."""
    before = world.instances()
    last = world.last_audit()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        world.get(f"/studies/{world.stored.broken_study}")  # default: Explicit VR LE
    (row,) = world.audit_since(last)  # audited as it started, before the first byte
    assert row[:3] == ("wado.retrieve", "allowed", 200)
    assert world.instances() == before
    assert requests.get(world.server.url + "/health", timeout=30).json()["status"] == "ok"
    whole = world.get(
        f"/studies/{world.stored.broken_study}",
        headers={"Accept": f'multipart/related; type="{DICOM}"; transfer-syntax=*'},
    )
    assert whole.status_code == 200 and len(parts_of(whole)) == 2


def test_sequences_nested_thousands_deep_leave_metadata_answered_with_a_warning(
    world: World, refused: list
) -> None:
    deep = world.stored.deep
    answer = world.get(world.instance(deep) + "/metadata")
    refused.append(answer)
    assert answer.status_code == 200, answer.text[:500]
    (item,) = answer.json()
    assert item["00080018"]["Value"] == [deep]
    assert "0040A730" not in item and item["00280010"]["Value"] == [64]
    warning = answer.headers["Warning"]
    assert warning.startswith("299 ") and "(0040,A730)" in warning
    assert "dicomweb.max_metadata_depth" in warning and deep in warning
    # its pixels are sound: it renders
    image = world.get(world.instance(deep) + "/rendered", headers={"Accept": "image/png"})
    refused.append(image)
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"


def test_an_unreadable_header_is_422_alone_and_left_out_of_its_series_with_a_warning(
    world: World, refused: list
) -> None:
    s = world.stored
    alone = world.get(world.instance(s.unreadable) + "/metadata")
    refused.append(alone)
    assert_problem(alone, 422, s.unreadable, "cannot be inflated")
    for path in (
        f"/studies/{s.study}/series/{s.bad_series}/metadata",
        f"/studies/{s.study}/metadata",
    ):
        answer = world.get(path)
        refused.append(answer)
        assert answer.status_code == 200, answer.text[:500]
        found = {i["00080018"]["Value"][0] for i in answer.json()}
        # every other instance of the series is there, the deep one shortened
        assert found >= {str(s.normal.SOPInstanceUID), s.short, s.huge, s.deep}
        assert s.unreadable not in found
        text = answer.headers["Warning"]  # repeated headers, joined by requests
        assert s.unreadable in text and "cannot be read" in text
        assert s.deep in text and "(0040,A730)" in text


# --------------------------------------------------------------------------- integers


HUGE = "99999999999999999999999"
BAD_INTEGERS = [
    ("/studies?offset=" + HUGE, "offset"),
    ("/studies?limit=" + HUGE, "limit"),
    ("/instances?offset=-1", "offset"),
    ("/series?limit=-5", "limit"),
    ("/series?SeriesNumber=" + HUGE, "SeriesNumber"),
    ("/instances?InstanceNumber=-" + HUGE, "InstanceNumber"),
    ("/instances?NumberOfFrames=99999999999", "NumberOfFrames"),
]


@pytest.mark.parametrize(("target", "named"), BAD_INTEGERS, ids=[t for t, _ in BAD_INTEGERS])
def test_qido_integers_beyond_sql_integers_are_400(
    world: World, refused: list, target: str, named: str
) -> None:
    answer = world.get(target)
    refused.append(answer)
    assert_problem(answer, 400, named)


def test_qido_a_limit_above_the_maximum_is_lowered_not_refused(world: World) -> None:
    answer = world.get("/instances", params={"limit": "5000", "offset": "0"})
    assert answer.status_code == 200 and len(answer.json()) == len(world.instances())


def test_wado_frame_numbers_and_parameters_beyond_any_integer_are_400(
    world: World, refused: list
) -> None:
    path = _rgb_path(world)
    rgb = world.stored.rgb
    wado = {
        "requestType": "WADO",
        "studyUID": str(rgb.StudyInstanceUID),
        "seriesUID": str(rgb.SeriesInstanceUID),
        "objectUID": str(rgb.SOPInstanceUID),
    }
    cases = [
        (world.get(path + "/frames/" + HUGE), f"frame {HUGE} requested", "2 frames"),
        (world.get(path + "/frames/0"), "start at 1"),
        (world.get(path + "/frames/-3"), "start at 1"),
        (world.get(path + "/frames/" + HUGE + "/rendered"), f"frame {HUGE} requested"),
        (world.get(path + "/frames/" + HUGE + "/thumbnail"), f"frame {HUGE} requested"),
        (world.get(path + "/rendered", params={"quality": HUGE}), "quality"),
        (world.get("/wado", params=wado | {"frameNumber": HUGE}), "frameNumber"),
        (world.get("/wado", params=wado | {"rows": HUGE}), "rows"),
        (world.get("/wado", params=wado | {"imageQuality": "-" + HUGE}), "imageQuality"),
        (world.get(path + "/bulk/" + HUGE), "8-digit hex tag"),
    ]
    for answer, *words in cases:
        refused.append(answer)
        assert_problem(answer, 400, *words)


# --------------------------------------------------------------------------- frames from the file


def _pixel_files() -> list[Path]:
    """One bundled pydicom file per kind of pixel data: transfer syntax,
    photometric interpretation, bits allocated, single- or multi-frame."""
    kinds: dict[tuple, Path] = {}
    for folder in pydicom_test_folders():
        for path in sorted(folder.glob("*.dcm")):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                    kind = (
                        str(ds.file_meta.TransferSyntaxUID),
                        str(ds.get("PhotometricInterpretation")),
                        ds.get("BitsAllocated"),
                        int(ds.get("NumberOfFrames") or 1) > 1,
                    )
            except Exception:  # noqa: BLE001 - files pydicom cannot read are not ours to test
                continue
            if "Rows" in ds and "TransferSyntaxUID" in ds.file_meta:
                kinds.setdefault(kind, path)
    return sorted(kinds.values())


class _Folder:
    """A store over one file whose stream cannot seek, as S3's cannot."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, key: str) -> io.BufferedReader:
        class ForwardOnly(io.BufferedReader):
            def seekable(self) -> bool:
                return False

        return ForwardOnly(open(self.path, "rb"))  # noqa: SIM115 - closed by the reader


@pytest.mark.parametrize("path", _pixel_files(), ids=lambda p: p.name)
def test_frames_read_from_a_forward_only_stream_equal_those_of_the_whole_dataset(
    path: Path,
) -> None:
    """Frames, decoded frames and renderings read one frame at a time from
    the stored file (spooled from a stream that cannot seek) are exactly
    those of the dataset read whole, for every kind of pixel data pydicom
    ships a file of (big endian, 1-bit, YBR 4:2:2, JPEG, JPEG-LS, JPEG 2000,
    RLE, deflated...); or both fail, the file's way as a 422-class error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = pydicom.dcmread(path)
        item = StoredObject("1", "1", "1", "1", "", "key", path.stat().st_size)
        try:
            with open_header(_Folder(path), item) as header:  # type: ignore[arg-type]
                image = pixels.ImageFile(header.dataset, header.file, header.pixel_at)
                for n in sorted({1, pixels.frame_count(whole)}):
                    for get in (pixels.get_frame_bytes, pixels.decoded_frame, _png):
                        expected, got = _outcome(get, whole, n), _outcome(get, image, n)
                        if isinstance(expected, np.ndarray):
                            assert np.array_equal(got, expected), (get.__name__, n)
                        elif isinstance(expected, bytes):
                            assert got == expected, (get.__name__, n)
                        else:  # both refused; the stored file's refusal is the object's fault
                            assert isinstance(got, Exception), (get.__name__, n, got)
                            assert isinstance(got, pixels.FrameError | pixels.DecodeError)
        except pixels.InconsistentPixelData:
            with pytest.raises(Exception):  # noqa: B017 - the whole read fails too
                whole.pixel_array  # noqa: B018


def _png(src: object, n: int) -> bytes:
    return pixels.render(src, n, media_type="image/png")  # type: ignore[arg-type]


def _outcome(get: object, src: object, n: int) -> object:
    try:
        return get(src, n)  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001
        return exc
