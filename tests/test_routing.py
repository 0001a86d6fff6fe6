"""Routing rules: matching instances and stable studies are delivered, as
jobs, to a DICOM peer (dcmtk storescp) or a second IMAG over STOW-RS,
including after the receiver was down for a while."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from archive.config import Config
from archive.identity import Source
from archive.jobs import JobQueue, Worker
from archive.routing import matches, route_matches
from archive.runtime import Archive
from archive.topology import Route, RouteMatch
from tests.dcmtk import dcmtk
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag
from tests.processes import eventually, free_port


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        (None, "anything", True),
        ("CT", "CT", True),
        ("CT", "MR", False),
        ("C?", "CT", True),
        ("CT_*", "CT_NORD", True),
        ("CT_*", "MR_NORD", False),
        ("re:(?i)thorax", "CT THORAX", True),
        ("re:^abd", "thorax", False),
    ],
)
def test_match_keys_are_exact_wildcard_or_regular_expressions(pattern, value, expected) -> None:
    assert matches(pattern, value) is expected


def test_a_route_matches_when_every_key_does_and_lists_match_on_any_element() -> None:
    route = Route(
        "to-peer",
        to_dicom="PEER",
        match=RouteMatch(site="A", modality="CT", body_part="re:CHEST|THORAX"),
    )
    assert route_matches(route, {"site": "A", "modality": ["SR", "CT"], "body_part": "CHEST"})
    assert not route_matches(route, {"site": "B", "modality": "CT", "body_part": "CHEST"})


class StoreSCP:
    """A dcmtk storescp on loopback, started and stopped by the test."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port, self.proc = folder, port, None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "STORESCP", "+xa", "-od", str(self.folder), str(self.port)],
            env=os.environ | {"TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                [dcmtk("echoscu"), "-aec", "STORESCP", "127.0.0.1", str(self.port)],
                capture_output=True,
            ).returncode
            != 0
        ):
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def received(self) -> dict[str, pydicom.Dataset]:
        """The objects storescp has written whole (it writes a file in place:
        one it is still writing is not read yet -- once, the test read one
        half-written and failed on it)."""
        found = {}
        for path in self.folder.iterdir():
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # noqa: BLE001 - still being written: not received yet
                continue
            found[str(ds.SOPInstanceUID)] = ds
        return found


@pytest.fixture
def store_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """The object store routing reads deliveries from: the data dir's folder
    by default; tests that ask for ``store`` run on the filesystem and on S3."""
    if getattr(request, "param", "filesystem") == "filesystem":
        return {}
    endpoint = request.getfixturevalue("s3_env")  # credentials for this process
    bucket = request.getfixturevalue("s3_bucket")
    return {"storage.url": f"s3://{bucket}/archive", "s3.endpoint_url": endpoint}


#: routing deliveries read the stored object back: on the filesystem and on S3
on_each_store = pytest.mark.parametrize(
    "store_settings", ["filesystem", pytest.param("s3", marks=pytest.mark.s3)], indirect=True
)


@pytest.fixture
def routed(
    make_config: Callable[..., Config],
    index_url: str,
    store_settings: dict[str, str],
    tmp_path: Path,
):
    """An archive with the given routes and peers, a job worker running."""
    opened: list[tuple[Archive, Worker]] = []

    def open_with(routes: list[dict], peers: list[dict] | None = None, **settings) -> Archive:
        config = make_config(
            index_url=index_url,
            settings={
                "routes": routes,
                "dicom.peers": peers or [],
                **store_settings,
                **settings,
            },
        )
        archive = Archive(config)
        worker = Worker(
            archive, "test", queue=JobQueue(archive.db, backoff_base=0.5), poll_interval=0.05
        ).start()
        opened.append((archive, worker))
        return archive

    yield open_with
    for archive, worker in opened:
        worker.stop()
        archive.close()


def _sr(ds: pydicom.Dataset) -> None:
    ds.Modality = "SR"


@on_each_store
def test_matching_instances_reach_storescp_once_each_and_identical(routed, tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "scp", free_port()).start()
    try:
        archive = routed(
            [{"name": "ct-to-pacs", "modality": "CT", "to_dicom": "STORESCP"}],
            [{"aet": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
        )
        study, series = generate_uid(), generate_uid()
        sent = [make_instance(study=study, series=series) for _ in range(3)]
        for data in [*sent, make_instance(_sr, study=study)]:
            assert archive.pipeline.ingest(data, Source("dicom", site="A", calling_aet="CT1")).ok
        eventually(lambda: len(scp.received()) == 3, timeout=20)
        time.sleep(0.5)
        got = scp.received()
        assert len(got) == 3 and len(list(scp.folder.iterdir())) == 3  # the SR stayed home
        for data in sent:
            original = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
            delivered = got[str(original.SOPInstanceUID)]
            assert delivered.PixelData == original.PixelData
            assert delivered.StudyDescription == original.StudyDescription
        states = archive.db.query(
            "SELECT state, COUNT(*) FROM jobs WHERE kind = 'route.instance' GROUP BY state"
        )
        assert states == [("done", 3)]
    finally:
        scp.stop()


def test_deliveries_retry_until_the_receiver_comes_back(routed, tmp_path: Path) -> None:
    port = free_port()
    archive = routed(
        [{"name": "all", "to_dicom": "STORESCP"}],
        [{"aet": "STORESCP", "host": "127.0.0.1", "port": port}],
    )
    data = make_instance()
    assert archive.pipeline.ingest(data, Source("dicom", site="A")).ok
    eventually(
        lambda: archive.db.scalar("SELECT COUNT(*) FROM jobs WHERE last_error IS NOT NULL") >= 1,
        timeout=20,
    )
    error = archive.db.scalar("SELECT last_error FROM jobs WHERE kind = 'route.instance'")
    assert "could not associate" in error
    scp = StoreSCP(tmp_path / "scp", port).start()  # the receiver is back
    try:
        eventually(lambda: len(scp.received()) == 1, timeout=30)
        # the job is marked done just after the receiver answered
        eventually(
            lambda: (
                archive.db.scalar("SELECT state FROM jobs WHERE kind = 'route.instance'") == "done"
            ),
            timeout=10,
        )
    finally:
        scp.stop()


@on_each_store
def test_a_stable_study_is_forwarded_to_a_second_imag_over_stow_rs(
    routed, imag_in_process: InProcessImag
) -> None:
    second = imag_in_process
    archive = routed(
        [
            {
                "name": "to-region",
                "when": "stable",
                "site": "A",
                "to_stow": second.dicomweb,
                "stow_token_file": str(second.token_file),
            }
        ],
        stable_after_seconds=1,
    )
    study, series = generate_uid(), generate_uid()
    sent = [make_instance(study=study, series=series) for _ in range(2)]
    for data in sent:
        assert archive.pipeline.ingest(data, Source("dicom", site="A")).ok

    def there() -> list:
        answer = second.http.get(f"{second.dicomweb}/studies/{study}/instances", timeout=10)
        return answer.json() if answer.status_code == 200 else []

    eventually(lambda: len(there()) == 2, timeout=30)
    retrieved = second.http.get(
        f"{second.dicomweb}/studies/{study}",
        timeout=30,
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    for data in sent:  # bit-identical objects in the second archive
        assert data in retrieved.content

    # the route ran once, as one job for the study; it is marked done once
    # the second archive's answer is back, a moment after the objects are there
    def route_jobs() -> list[tuple]:
        return archive.db.query("SELECT state FROM jobs WHERE kind = 'route.study'")

    eventually(lambda: route_jobs() != [("running",)], timeout=30, what="the route job's end")
    assert route_jobs() == [("done",)]
