"""The stored transfer syntax policy (store_as, per site): lossless
re-encoding at ingest, verified, never for lossy data, and retrieval in any
syntax a receiver accepts."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from archive.codecs import convert_for, decoded_pixels, transcode
from archive.config import Config
from archive.identity import Source
from archive.index import StoreOutcome
from archive.retrieve import locate, read
from archive.runtime import Archive
from tests.dicomfiles import PYDICOM_TEST_FILES, make_instance

POLICIES = {
    "htj2k-lossless": HTJ2KLossless,
    "j2k-lossless": JPEG2000Lossless,
    "jpegls-lossless": JPEGLSLossless,
    "rle-lossless": RLELossless,
}


def pixels_of(data: bytes) -> np.ndarray:
    return decoded_pixels(pydicom.dcmread(io.BytesIO(data)))


@pytest.fixture
def policy_archive(make_config: Callable[..., Config], index_url: str):
    def open_with(**settings: object) -> Archive:
        return Archive(make_config(index_url=index_url, settings=settings))

    return open_with


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_lossless_policy_stores_re_encoded_pixels_bit_exact(policy_archive, policy: str) -> None:
    with policy_archive(store_as=policy) as archive:
        data = make_instance()
        result = archive.pipeline.ingest(data, Source("import", site="ANY"))
        assert result.ok and result.outcome is StoreOutcome.STORED
        stored = archive.store.get(result.object_key)
        ds = pydicom.dcmread(io.BytesIO(stored))
        assert ds.file_meta.TransferSyntaxUID == POLICIES[policy]
        assert np.array_equal(pixels_of(stored), pixels_of(data))
        row = archive.db.query_one("SELECT stored_ts, original_ts, size FROM instances")
        assert row == (POLICIES[policy], ExplicitVRLittleEndian, len(stored))
        # the same object sent again is recognised without a second object
        again = archive.pipeline.ingest(data, Source("import", site="ANY"))
        assert again.outcome is StoreOutcome.DUPLICATE
        assert list(archive.store.iter_keys()) == [result.object_key]


def test_a_site_policy_overrides_the_default(policy_archive) -> None:
    sites = [{"name": "RAW", "store_as": "as-received"}]
    with policy_archive(store_as="htj2k-lossless", sites=sites) as archive:
        raw = archive.pipeline.ingest(make_instance(), Source("import", site="RAW"))
        other = archive.pipeline.ingest(make_instance(), Source("import", site="OTHER"))
        ts = dict(archive.db.query("SELECT sop_instance_uid, stored_ts FROM instances"))
        assert ts[raw.sop_instance_uid] == ExplicitVRLittleEndian
        assert ts[other.sop_instance_uid] == HTJ2KLossless


def test_lossy_data_is_stored_as_received_whatever_the_policy(policy_archive) -> None:
    data = (PYDICOM_TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm").read_bytes()
    with policy_archive(store_as="htj2k-lossless") as archive:
        result = archive.pipeline.ingest(data, Source("import", site="X"))
        assert result.ok
        assert archive.store.get(result.object_key) == data


def test_corrupt_compressed_data_is_refused_under_a_re_encoding_policy(policy_archive) -> None:
    """A lossless JPEG 2000 object whose codestream is damaged (its end marker
    overwritten, lengths intact, so only decoding can tell) is refused with a
    reason when the policy re-encodes; nothing is written."""
    j2k = transcode(make_instance(), JPEG2000Lossless)
    end = j2k.rindex(b"\xff\xd9")
    damaged = j2k[:end] + b"\x00\x00" + j2k[end + 2 :]
    with policy_archive(store_as="htj2k-lossless") as archive:
        result = archive.pipeline.ingest(damaged, Source("import", site="X"))
        assert not result.ok
        assert result.code == "corrupt-pixel-data", result.reason
        assert "re-encoded" in result.reason
        assert archive.catalog.counts()["instances"] == 0
        assert list(archive.store.iter_keys()) == []


def test_an_htj2k_stored_instance_is_retrieved_uncompressed_with_equal_pixels(
    policy_archive,
) -> None:
    with policy_archive(store_as="htj2k-lossless") as archive:
        data = make_instance()
        result = archive.pipeline.ingest(data, Source("import", site="X"))
        [item] = locate(
            archive.db,
            "IMAGE",
            {
                "StudyInstanceUID": result.study_uid,
                "SeriesInstanceUID": result.series_uid,
                "SOPInstanceUID": result.sop_instance_uid,
            },
        )
        assert item.transfer_syntax == HTJ2KLossless
        ds = convert_for(read(archive.store, item), {ExplicitVRLittleEndian})
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        original = pydicom.dcmread(io.BytesIO(data))
        assert ds.PixelData == original.PixelData


@pytest.mark.s3_on_sqlite  # the store meets any index alike (PostgreSQL + S3: test_several_nodes)
@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.parametrize("store", ["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def test_imag_transcode_converts_what_is_stored_and_resumes_after_sigkill(
    tmp_path, index_url: str, store: str, request: pytest.FixtureRequest
) -> None:
    """Stored as received, then converted by `imag transcode`: killed part-way
    and run again, every instance ends converted once, counters follow, the
    store verifies, and the originals are still recognised as duplicates --
    in a folder and in an S3 bucket (conversion and verify read every object)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from archive.index import Catalog, open_database
    from archive.synthetic import generate_ct_series

    folder = tmp_path / "ct"
    files = generate_ct_series(folder, 60, seed=3)
    env = {
        "PATH": os.environ["PATH"],
        "IMAG_DATA_DIR": str(tmp_path / "data"),
        "IMAG_INDEX_URL": index_url,
        "IMAG_LOG_LEVEL": "WARNING",
    }
    if store == "s3":
        from tests.s3server import S3_CREDENTIALS

        bucket = request.getfixturevalue("s3_bucket")
        env |= {
            "IMAG_STORAGE_URL": f"s3://{bucket}/archive",
            "IMAG_S3_ENDPOINT_URL": request.getfixturevalue("s3_env"),
            **S3_CREDENTIALS,
        }

    def imag(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "archive.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert imag("import", "-q", str(folder)).returncode == 0
    db = open_database(index_url)
    before = Catalog(db).counts()["bytes"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "archive.cli",
            "transcode",
            "-q",
            "--to",
            "htj2k-lossless",
            "--workers",
            "2",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = db.scalar("SELECT COUNT(*) FROM instances WHERE stored_ts = ?", (HTJ2KLossless,))
        if done >= 5:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = db.scalar("SELECT COUNT(*) FROM instances WHERE stored_ts = ?", (HTJ2KLossless,))
    assert 0 < partial < len(files)

    run = imag("transcode", "--json", "-q", "--to", "htj2k-lossless")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["converted"] == len(files) - partial
    assert db.scalar("SELECT COUNT(*) FROM instances WHERE stored_ts = ?", (HTJ2KLossless,)) == len(
        files
    )
    after = Catalog(db).counts()["bytes"]
    assert after == db.scalar("SELECT SUM(size) FROM instances") < before
    repaired = imag("verify", "--repair", "--json", "-q")  # orphan copies of the killed run
    assert json.loads(repaired.stdout)["missing"] == []
    final = imag("verify", "--json", "-q")
    assert final.returncode == 0 and json.loads(final.stdout)["clean"]
    again = json.loads(imag("import", "--json", "-q", str(folder)).stdout)
    assert again["duplicate"] == len(files) and again["stored"] == 0
    db.close()
