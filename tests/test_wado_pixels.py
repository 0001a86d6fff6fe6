"""Pixels over the web and the network from an archive that stores HTJ2K:
WADO-RS frames, rendered frames and thumbnails (opened with Pillow), WADO-URI,
and the same study retrieved as Explicit VR Little Endian, pixel for pixel,
by dicomweb-client and by dcmtk's getscu."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless

from archive.synthetic import StudySpec, modality_preset, write_study
from tests.dcmtk import dcmtk
from tests.httpserver import HttpImag, running_imag
from tests.s3server import StoreUnderTest


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudySpec, list[Path]]:
    spec = StudySpec(
        patient_id="PIX1",
        patient_name="PIXEL^Test",
        study_description="pixels",
        accession_number="PIX-1",
        series=[
            modality_preset("CT", rows=64, columns=64, instances=3),
            modality_preset("XA", rows=48, columns=40, instances=1, frames=5),
            modality_preset("US", rows=40, columns=48, instances=1),
        ],
    )
    files = write_study(spec, tmp_path_factory.mktemp("pix"), seed=5)
    return spec, files


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, study, module_store: StoreUnderTest
) -> Iterator[HttpImag]:
    """One server per object store (a folder, an S3 bucket): every pixel path
    reads its objects through the store's own stream."""
    settings = {"IMAG_STORE_AS": "htj2k-lossless", **module_store.settings()}
    with running_imag(tmp_path_factory.mktemp("imag"), dicom=True, settings=settings) as imag:
        client = imag.client()
        client.store_instances([pydicom.dcmread(f) for f in study[1]])
        yield imag


def originals(study) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in study[1])}


def test_instances_are_stored_as_htj2k(server: HttpImag, study) -> None:
    client = server.client()
    spec = study[0]
    found = client.search_for_instances(str(spec.study_uid))
    # every stored instance is found: an empty search must not pass the loop below
    assert {inst["00080018"]["Value"][0] for inst in found} == set(originals(study))
    for inst in found:
        st, se, sop = (inst[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
        ds = client.retrieve_instance(st, se, sop, media_types=(("application/dicom", "*"),))
        assert ds.file_meta.TransferSyntaxUID == HTJ2KLossless


def test_dicomweb_client_retrieves_the_htj2k_study_uncompressed_pixel_for_pixel(
    server: HttpImag, study
) -> None:
    client = server.client()
    expected = originals(study)
    got = client.retrieve_study(str(study[0].study_uid))
    assert len(got) == len(expected)
    for ds in got:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, expected[str(ds.SOPInstanceUID)].pixel_array)


def test_getscu_retrieves_the_htj2k_study_uncompressed_pixel_for_pixel(
    server: HttpImag, study, tmp_path: Path
) -> None:
    out = tmp_path / "got"
    out.mkdir()
    run = subprocess.run(
        [
            dcmtk("getscu"),
            "-aec",
            server.aet,
            "-aet",
            "GETTER",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study[0].study_uid}",
            "127.0.0.1",
            str(server.dicom_port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"TCP_NODELAY": "1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    expected = originals(study)
    files = sorted(out.iterdir())
    assert len(files) == len(expected)
    for path in files:
        ds = pydicom.dcmread(path)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(ds.pixel_array, expected[str(ds.SOPInstanceUID)].pixel_array)


def _multiframe(server: HttpImag, study) -> tuple[str, str, str, pydicom.Dataset]:
    ds = next(d for d in originals(study).values() if int(d.get("NumberOfFrames", 1)) > 1)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), ds


def test_frames_come_uncompressed_by_default_and_as_stored_on_request(
    server: HttpImag, study
) -> None:
    client = server.client()
    st, se, sop, original = _multiframe(server, study)
    frames = client.retrieve_instance_frames(st, se, sop, [1, 3, 5])
    arr = original.pixel_array
    for got, index in zip(frames, (0, 2, 4), strict=True):
        assert got == arr[index].astype("<u1" if arr.dtype.itemsize == 1 else "<u2").tobytes()
    # as stored: HTJ2K frames are image/jphc (PS3.18), a media type dicomweb-client
    # 0.61 does not know yet, so this one is read with plain HTTP
    answer = server.http.get(
        f"{server.dicomweb}/studies/{st}/series/{se}/instances/{sop}/frames/2",
        timeout=30,
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    )
    assert answer.status_code == 200
    boundary = answer.headers["Content-Type"].split("boundary=")[1].strip('"')
    part = answer.content.split(f"--{boundary}".encode())[1]
    head, _, body = part.partition(b"\r\n\r\n")
    assert b"image/jphc" in head and HTJ2KLossless.encode() in head
    assert body[:2] == b"\xff\x4f"  # a JPEG 2000 codestream (SOC marker)


def test_rendered_frames_and_thumbnails_open_in_pillow(server: HttpImag, study) -> None:
    client = server.client()
    st, se, sop, original = _multiframe(server, study)
    jpeg = client.retrieve_instance_frames_rendered(st, se, sop, [2], media_types=("image/jpeg",))
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (original.Columns, original.Rows)
    png = client.retrieve_instance_rendered(
        st, se, sop, media_types=("image/png",), params={"viewport": "20,20"}
    )
    assert (
        Image.open(io.BytesIO(png)).size == (20, 24) or max(Image.open(io.BytesIO(png)).size) == 20
    )
    thumb = server.http.get(f"{server.dicomweb}/studies/{st}/series/{se}/thumbnail", timeout=30)
    assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    narrow = client.retrieve_instance_rendered(
        st, se, sop, media_types=("image/png",), params={"window": "100,10,linear"}
    )
    assert narrow != png


def test_an_out_of_range_frame_is_a_400_that_says_so(server: HttpImag, study) -> None:
    st, se, sop, _ = _multiframe(server, study)
    answer = server.http.get(
        f"{server.dicomweb}/studies/{st}/series/{se}/instances/{sop}/frames/9", timeout=30
    )
    assert answer.status_code == 400
    assert "frame 9" in answer.json()["detail"] and "5 frames" in answer.json()["detail"]


def test_wado_uri_returns_the_instance_and_a_jpeg(server: HttpImag, study) -> None:
    ds = next(iter(originals(study).values()))
    params = {
        "requestType": "WADO",
        "studyUID": str(ds.StudyInstanceUID),
        "seriesUID": str(ds.SeriesInstanceUID),
        "objectUID": str(ds.SOPInstanceUID),
    }
    jpeg = server.http.get(f"{server.dicomweb}/wado", params=params | {"rows": "32"}, timeout=30)
    assert jpeg.status_code == 200 and jpeg.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size[1] <= 32
    dicom = server.http.get(
        f"{server.dicomweb}/wado",
        timeout=30,
        params=params
        | {"contentType": "application/dicom", "transferSyntax": ExplicitVRLittleEndian},
    )
    assert dicom.status_code == 200
    got = pydicom.dcmread(io.BytesIO(dicom.content))
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    missing = server.http.get(f"{server.dicomweb}/wado", params={"requestType": "WADO"}, timeout=30)
    assert missing.status_code == 400 and "studyUID" in missing.json()["detail"]
