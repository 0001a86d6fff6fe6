"""Study stability and the change feed: a study with no new instance for
stable_after_seconds emits one study.stable per burst of arrivals, recorded in
the durable, ordered change feed that integrations and services follow."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pydicom
import pytest
from pydicom.uid import generate_uid

from archive import changes
from archive.config import Config
from archive.identity import Source
from archive.jobs import JobQueue, Worker
from archive.runtime import Archive
from tests.dicomfiles import make_instance
from tests.httpserver import running_imag

SOURCE = Source("dicom", site="A")


@pytest.fixture
def stable_archive(make_config: Callable[..., Config], index_url: str) -> Iterator[Archive]:
    """An archive whose studies are stable after 1 s, with a job worker running."""
    with Archive(make_config(index_url=index_url, settings={"stable_after_seconds": 1})) as a:
        worker = Worker(a, "test", queue=JobQueue(a.db), poll_interval=0.05).start()
        try:
            yield a
        finally:
            worker.stop()


def stable_events(archive: Archive, study: str) -> list[changes.Change]:
    return [c for c in changes.read(archive.db, 0, 1000, ["study.stable"]) if c.study_uid == study]


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def push(archive: Archive, study: str, count: int) -> None:
    series = generate_uid()
    for _ in range(count):
        assert archive.pipeline.ingest(make_instance(study=study, series=series), SOURCE).ok


def test_two_bursts_separated_by_more_than_stable_after_give_two_events(
    stable_archive: Archive,
) -> None:
    study = generate_uid()
    push(stable_archive, study, 3)
    wait_for(lambda: len(stable_events(stable_archive, study)) == 1, 10)
    push(stable_archive, study, 2)  # a new burst
    wait_for(lambda: len(stable_events(stable_archive, study)) == 2, 10)
    time.sleep(1.5)
    assert len(stable_events(stable_archive, study)) == 2


def test_a_study_pushed_continuously_gives_one_event_after_the_last_instance(
    stable_archive: Archive,
) -> None:
    study = generate_uid()
    series = generate_uid()
    started = time.monotonic()
    while time.monotonic() - started < 3:  # an instance every 0.3 s, for 3 s
        stable_archive.pipeline.ingest(make_instance(study=study, series=series), SOURCE)
        time.sleep(0.3)
    assert stable_events(stable_archive, study) == []
    wait_for(lambda: len(stable_events(stable_archive, study)) == 1, 10)
    time.sleep(1.5)
    assert len(stable_events(stable_archive, study)) == 1


def test_the_feed_lists_stored_instances_in_order_and_subscribers_hear_of_stability(
    stable_archive: Archive,
) -> None:
    heard: list[str] = []
    got = threading.Event()
    follower = changes.ChangeFollower(stable_archive.db, poll_interval=0.05)
    follower.subscribe("study.stable", lambda c: (heard.append(c.study_uid), got.set()))
    follower.start()
    try:
        study = generate_uid()
        push(stable_archive, study, 2)
        assert got.wait(10) and heard == [study]
    finally:
        follower.stop()
    feed = changes.read(stable_archive.db, 0, 100)
    assert [c.seq for c in feed] == sorted(c.seq for c in feed)
    stored = [c for c in feed if c.type == "instance.stored" and c.study_uid == study]
    assert len(stored) == 2 and all(c.site == "A" for c in stored)
    assert feed.index(stored[-1]) < feed.index(
        next(c for c in feed if c.type == "study.stable" and c.study_uid == study)
    )


def test_imag_serve_publishes_the_feed_over_http_with_stability(tmp_path, index_url) -> None:
    with running_imag(
        tmp_path / "imag", index_url=index_url, settings={"IMAG_STABLE_AFTER_SECONDS": "1"}
    ) as server:
        study = generate_uid()
        client = server.client()
        client.store_instances(
            [pydicom.dcmread(pydicom.filebase.DicomBytesIO(make_instance(study=study)))]
        )
        url = f"{server.url}/changes"

        def stable() -> bool:
            feed = server.http.get(url, params={"type": "study.stable"}, timeout=10).json()
            return any(c["study"] == study for c in feed["changes"])

        wait_for(stable, 15)
        first = server.http.get(url, params={"since": 0, "limit": 1}, timeout=10).json()
        assert first["changes"][0]["type"] == "instance.stored"
        assert first["changes"][0]["study"] == study
        rest = server.http.get(url, params={"since": first["last"]}, timeout=10).json()
        assert [c["type"] for c in rest["changes"]] == ["study.stable"]
        bad = server.http.get(url, params={"since": "x"}, timeout=10)
        assert bad.status_code == 400 and "since" in bad.json()["detail"]
