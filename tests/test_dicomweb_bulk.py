"""WADO-RS bulk data as viewers use it (issue 19): binary values nested in
sequences (a 12-lead ECG's waveform items) each with its own bulk data URI,
served at any depth; single-part answers when a single-part media type is
asked (bulk data and frames); compressed pixel data through ``/bulk/7FE00010``
negotiated as frames are; binary values of a big endian object given little
endian.  A real dicomweb-client where a client exists for it, raw HTTP
where a header is the point, against the in-process server."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, RLELossless, generate_uid

from tests.inprocess import InProcessImag, serving_in_process
from tests.s3server import StoreUnderTest

ECG_CLASS = "1.2.840.10008.5.1.4.1.1.9.1.1"  # 12-Lead ECG Waveform Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
OCTETS = "application/octet-stream"
PROBLEM = "application/problem+json"


def _base(sop_class: str, modality: str, study: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BULK-1"
    ds.PatientName = "WAVE^Form"
    ds.StudyDate, ds.StudyTime = "20250102", "101500"
    ds.Modality = modality
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    return ds


def _multiplex(samples: np.ndarray, frequency: float, label: str) -> Dataset:
    """One multiplex group: 12 channels of 16-bit samples, interleaved."""
    group = Dataset()
    group.MultiplexGroupLabel = label
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = samples.shape[1]
    group.NumberOfWaveformSamples = samples.shape[0]
    group.SamplingFrequency = frequency
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    channels = []
    for lead in LEADS:
        channel = Dataset()
        source = Dataset()
        source.CodeValue, source.CodingSchemeDesignator = (
            f"5.6.3-9-{LEADS.index(lead) + 1}",
            "SCPECG",
        )
        source.CodeMeaning = f"Lead {lead}"
        channel.ChannelSourceSequence = [source]
        channel.ChannelSensitivity = 1
        unit = Dataset()
        unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "uV", "UCUM", "microvolt"
        channel.ChannelSensitivityUnitsSequence = [unit]
        channel.ChannelSensitivityCorrectionFactor = 1
        channel.ChannelBaseline = 0
        channel.WaveformBitsStored = 16
        channels.append(channel)
    group.ChannelDefinitionSequence = channels
    group.WaveformData = samples.astype("<i2").tobytes()
    return group


def twelve_lead_ecg(study: str) -> Dataset:
    """A 12-lead ECG: a 10 s rhythm group at 500 Hz and a 1.2 s median beat
    group, two WaveformSequence items of 12 channels each; and a source
    image icon two sequences deep, for a nested value deeper than one level."""
    ds = _base(ECG_CLASS, "ECG", study)
    rng = np.random.default_rng(19)
    t = np.arange(5000) / 500
    rhythm = np.stack([(800 * np.sin(2 * np.pi * 1.2 * t + k)).astype(int) for k in range(12)], 1)
    median = rng.integers(-2000, 2000, size=(600, 12))
    ds.WaveformSequence = [_multiplex(rhythm, 500, "RHYTHM"), _multiplex(median, 500, "MEDIAN")]
    icon = Dataset()
    icon.Rows = icon.Columns = 48
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = rng.integers(0, 255, size=48 * 48, dtype=np.uint8).tobytes()
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = SC_CLASS, generate_uid()
    source.IconImageSequence = [icon]
    ds.SourceImageSequence = [source]
    return ds


def rle_multiframe(study: str) -> Dataset:
    """Three 32x24 16-bit frames, RLE Lossless (pydicom's own encoder)."""
    ds = _base(SC_CLASS, "OT", study)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 24, 32, 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.random.default_rng(7).integers(0, 4095, size=(3, 24, 32), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.compress(RLELossless, encoding_plugin="pydicom")
    return ds


def native_multiframe(study: str) -> Dataset:
    ds = _base(SC_CLASS, "OT", study)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 8, 10, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(160, dtype="<u2").tobytes()
    return ds


def big_endian(study: str) -> Dataset:
    """An Explicit VR Big Endian object with OB, OW, FL and US values, small
    (inline in metadata) and large (bulk data)."""
    ds = _base(SC_CLASS, "OT", study)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.Rows, ds.Columns = 4, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(16, dtype=">u2").tobytes()
    ds.add_new(0x00281201, "OW", np.array([0x0102, 0x0304, 0x0506], dtype=">u2").tobytes())
    ds.add_new(0x00281202, "OW", np.arange(2000, dtype=">u2").tobytes())  # 4000 bytes: bulk
    ds.add_new(0x00420011, "OB", b"\x01\x02\x03\x04")
    ds.add_new(0x00189219, "FL", [1.5, -2.25])  # Tag Angle Second Axis: a float
    ds.add_new(0x00280106, "US", 513)  # SmallestImagePixelValue 0x0201
    return ds


def as_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class World:
    server: InProcessImag
    ecg: Dataset
    rle: Dataset
    native: Dataset
    big: Dataset

    def url(self, ds: Dataset, tail: str = "") -> str:
        return (
            f"{self.server.dicomweb}/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{tail}"
        )

    def get(self, url: str, accept: str | None = None) -> requests.Response:
        headers = {"Accept": accept} if accept is not None else {}
        return self.server.http.get(url, headers=headers, timeout=30)

    def metadata(self, ds: Dataset) -> dict:
        client = self.server.client()
        return client.retrieve_instance_metadata(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        )


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, module_store: StoreUnderTest
) -> Iterator[World]:
    """One in-process server per object store (a folder, an S3 bucket whose
    bodies cannot seek), the four objects stored once through STOW-RS."""
    with pytest.MonkeyPatch.context() as env:
        # boto3, in this process, takes the credentials from os.environ only
        for name, value in module_store.env.items():
            env.setenv(name, value)
        yield from _world(tmp_path_factory, module_store)


def _world(
    tmp_path_factory: pytest.TempPathFactory, module_store: StoreUnderTest
) -> Iterator[World]:
    study = generate_uid()
    data = World(
        None,  # type: ignore[arg-type]
        twelve_lead_ecg(study),
        rle_multiframe(study),
        native_multiframe(study),
        big_endian(study),
    )
    with serving_in_process(
        tmp_path_factory.mktemp("bulk") / "imag", settings=module_store.settings()
    ) as server:
        data.server = server
        parts = [as_bytes(d) for d in (data.ecg, data.rle, data.native, data.big)]
        boundary = "bulk-test-boundary"
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
                for p in parts
            )
            + f"--{boundary}--\r\n".encode()
        )
        stored = server.http.post(
            f"{server.dicomweb}/studies",
            data=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
            },
            timeout=60,
        )
        assert stored.status_code == 200, stored.text
        yield data
        assert "Traceback" not in server.log(), server.log()[-5000:]


def multipart_parts(response: requests.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related answer."""
    content_type = response.headers["Content-Type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
    out = []
    for chunk in response.content.split(f"--{boundary}".encode())[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        kind = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-type")
        )
        out.append((kind, body[:-2]))  # the CRLF before the next delimiter
    return out


# -- nested bulk data ------------------------------------------------------------------------


def test_each_waveform_item_of_a_12_lead_ecg_has_its_own_uri_that_serves_its_samples(
    world: World,
) -> None:
    meta = world.metadata(world.ecg)
    items = meta["54000100"]["Value"]
    uris = [item["54001010"]["BulkDataURI"] for item in items]
    assert len(set(uris)) == 2, uris  # one URI per item, never the same for both
    assert uris[0].endswith("/bulk/54000100/0/54001010"), uris
    assert uris[1].endswith("/bulk/54000100/1/54001010"), uris
    client = world.server.client()
    for uri, group in zip(uris, world.ecg.WaveformSequence, strict=True):
        (samples,) = client.retrieve_bulkdata(uri)
        assert samples == group.WaveformData
        got = np.frombuffer(samples, "<i2").reshape(-1, 12)
        assert got.shape == (group.NumberOfWaveformSamples, 12)
    # the channel definitions stay inline: twelve per item, in order
    labels = [
        c["003A0208"]["Value"][0]["00080104"]["Value"][0] for c in items[0]["003A0200"]["Value"]
    ]
    assert labels == [f"Lead {lead}" for lead in LEADS]


def test_a_binary_value_two_sequences_deep_is_reachable_by_its_path(world: World) -> None:
    meta = world.metadata(world.ecg)
    icon = meta["00082112"]["Value"][0]["00880200"]["Value"][0]
    uri = icon["7FE00010"]["BulkDataURI"]
    assert uri.endswith("/bulk/00082112/0/00880200/0/7FE00010"), uri
    (value,) = world.server.client().retrieve_bulkdata(uri)
    assert value == world.ecg.SourceImageSequence[0].IconImageSequence[0].PixelData


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("54000100/2/54001010", ["2 item(s)", "no item 2"]),
        ("54000100/0/7FE00010", ["no binary value 54000100/0/7FE00010"]),
        ("00081140/0/54001010", ["no sequence 00081140"]),
        ("54000100/0/003A0200/0/54001010", ["no binary value"]),
        ("60003000", ["no binary value 60003000"]),
        ("00100010", ["no binary value 00100010"]),  # a text value is not bulk data
    ],
)
def test_a_bulk_path_that_leads_nowhere_is_a_404_problem_saying_where(
    world: World, path: str, words: list[str]
) -> None:
    answer = world.get(world.url(world.ecg, f"/bulk/{path}"))
    assert answer.status_code == 404, answer.text
    assert answer.headers["Content-Type"].startswith(PROBLEM)
    for word in words:
        assert word in answer.json()["detail"], answer.json()


@pytest.mark.parametrize(
    "path",
    [
        "54000100/x/54001010",
        "54000100/0",
        "5400010/0/54001010",
        "54000100/-1/54001010",
        "54000100//54001010",
        "54000100/0/54001010/",
    ],
)
def test_a_malformed_bulk_path_is_a_400_problem(world: World, path: str) -> None:
    answer = world.get(world.url(world.ecg, f"/bulk/{path}"))
    assert answer.status_code == 400, answer.text
    assert "0-based item indexes" in answer.json()["detail"]


def test_another_instance_path_gives_404_not_another_instances_value(world: World) -> None:
    """The path is resolved in the instance named, never in another one."""
    answer = world.get(world.url(world.rle, "/bulk/54000100/0/54001010"))
    assert answer.status_code == 404


# -- single part -----------------------------------------------------------------------------


def test_accept_octet_stream_on_bulk_data_gets_the_bare_value_never_an_envelope(
    world: World,
) -> None:
    url = world.url(world.ecg, "/bulk/54000100/1/54001010")
    single = world.get(url, OCTETS)
    assert single.status_code == 200
    assert single.headers["Content-Type"] == OCTETS
    assert single.content == world.ecg.WaveformSequence[1].WaveformData
    multi = world.get(url, 'multipart/related; type="application/octet-stream"')
    assert multipart_parts(multi) == [(OCTETS, world.ecg.WaveformSequence[1].WaveformData)]
    # no Accept at all: the PS3.18 default, multipart
    assert multipart_parts(world.get(url, None))[0][1] == single.content


@pytest.mark.parametrize("accept", ["image/jpeg", "application/dicom", "text/plain"])
def test_a_single_part_type_bulk_data_cannot_be_is_406(world: World, accept: str) -> None:
    answer = world.get(world.url(world.ecg, "/bulk/54000100/0/54001010"), accept)
    assert answer.status_code == 406, answer.text
    assert answer.headers["Content-Type"].startswith(PROBLEM)


def test_native_pixel_data_in_one_part_as_asked(world: World) -> None:
    answer = world.get(world.url(world.native, "/bulk/7FE00010"), OCTETS)
    assert answer.headers["Content-Type"] == OCTETS
    assert answer.content == world.native.PixelData


def test_one_frame_with_a_single_part_accept_is_the_bare_frame(world: World) -> None:
    frame2 = np.frombuffer(world.native.PixelData, "<u2")[80:].tobytes()
    answer = world.get(world.url(world.native, "/frames/2"), OCTETS)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == OCTETS
    assert answer.content == frame2
    # the stored RLE frame itself, single part, with its own media type
    stored = world.get(
        world.url(world.rle, "/frames/3"), f"image/dicom-rle; transfer-syntax={RLELossless}"
    )
    assert stored.headers["Content-Type"] == f"image/dicom-rle; transfer-syntax={RLELossless}"
    from pydicom.encaps import generate_frames

    frames = list(generate_frames(world.rle.PixelData, number_of_frames=3))
    assert stored.content == frames[2]


def test_two_frames_cannot_be_one_single_part_body_406(world: World) -> None:
    answer = world.get(world.url(world.native, "/frames/1,2"), OCTETS)
    assert answer.status_code == 406, answer.text
    # and the multipart ask still works
    both = world.get(world.url(world.native, "/frames/1,2"), f'multipart/related; type="{OCTETS}"')
    assert [body for _, body in multipart_parts(both)] == [
        world.native.PixelData[:160],
        world.native.PixelData[160:],
    ]


def test_a_single_part_accept_on_an_instance_is_served_single_part(world: World) -> None:
    answer = world.get(world.url(world.ecg), "application/dicom")
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].split(";")[0] == "application/dicom"
    assert answer.content[128:132] == b"DICM"
    from pydicom import dcmread

    assert dcmread(io.BytesIO(answer.content)).SOPInstanceUID == world.ecg.SOPInstanceUID


def test_a_single_part_accept_on_a_series_or_study_is_406_never_multipart(world: World) -> None:
    study = f"{world.server.dicomweb}/studies/{world.ecg.StudyInstanceUID}"
    for url in (study, f"{study}/series/{world.ecg.SeriesInstanceUID}"):
        answer = world.get(url, "application/dicom")
        assert answer.status_code == 406, answer.text
        assert answer.headers["Content-Type"].startswith(PROBLEM)


# -- compressed pixel data through /bulk -----------------------------------------------------


def test_compressed_pixel_data_through_bulk_is_decoded_unless_asked_as_stored(
    world: World,
) -> None:
    from pydicom.encaps import generate_frames

    url = world.url(world.rle, "/bulk/7FE00010")
    decoded = world.rle.pixel_array.astype("<u2").tobytes()
    client = world.server.client()
    # dicomweb-client's default: multipart octet-stream, uncompressed
    assert client.retrieve_bulkdata(url) == [decoded]
    # single part: the bare decoded value
    single = world.get(url, OCTETS)
    assert single.headers["Content-Type"] == OCTETS and single.content == decoded
    # as stored: one part per frame, each the stored RLE frame
    stored = list(generate_frames(world.rle.PixelData, number_of_frames=3))
    for accept in (
        'multipart/related; type="image/dicom-rle"',
        'multipart/related; type="application/octet-stream"; transfer-syntax=*',
    ):
        parts = multipart_parts(world.get(url, accept))
        assert [body for _, body in parts] == stored, accept
        assert {kind for kind, _ in parts} == {f"image/dicom-rle; transfer-syntax={RLELossless}"}
    # three stored frames cannot be one single-part body
    assert world.get(url, "image/dicom-rle").status_code == 406
    # a media type of another syntax is refused, not answered with RLE bytes
    assert world.get(url, 'multipart/related; type="image/jpeg"').status_code == 406


# -- big endian ------------------------------------------------------------------------------


def test_metadata_of_a_big_endian_object_gives_binary_values_little_endian(
    world: World,
) -> None:
    meta = world.metadata(world.big)
    assert world.big.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    small_ow = base64.b64decode(meta["00281201"]["InlineBinary"])
    assert small_ow == np.array([0x0102, 0x0304, 0x0506], dtype="<u2").tobytes()
    assert base64.b64decode(meta["00420011"]["InlineBinary"]) == b"\x01\x02\x03\x04"
    assert meta["00189219"]["Value"] == [1.5, -2.25]
    assert meta["00280106"]["Value"] == [513]
    (large,) = world.server.client().retrieve_bulkdata(meta["00281202"]["BulkDataURI"])
    assert large == np.arange(2000, dtype="<u2").tobytes()
    (pixels,) = world.server.client().retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert pixels == np.arange(16, dtype="<u2").tobytes()


def test_the_synthetic_objects_carry_the_values_the_tests_rely_on() -> None:
    """The synthetic objects round-trip through pydicom as built (a guard
    for the tests above: a value lost on writing would make them vacuous)."""
    from pydicom import dcmread

    ecg = dcmread(io.BytesIO(as_bytes(twelve_lead_ecg(generate_uid()))))
    assert len(ecg.WaveformSequence) == 2
    assert len(ecg.WaveformSequence[0].WaveformData) == 5000 * 12 * 2
    big = dcmread(io.BytesIO(as_bytes(big_endian(generate_uid()))))
    assert big.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    assert big[0x00281201].value == bytes([1, 2, 3, 4, 5, 6])
