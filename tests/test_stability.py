"""Study stability and the change feed: a study with no new instance for
stable_after_seconds emits one study.stable per burst of arrivals, recorded in
the durable, ordered change feed that integrations and services follow.

The archive's clock is a FakeClock: "stable_after_seconds later" is an
advance of it, then the job worker is waited for (bounded, on a condition).
Only the end-to-end test of a real ``imag serve`` waits its 1 s in real time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.uid import generate_uid

from archive import changes, plugins
from archive.clock import FakeClock
from archive.config import Config
from archive.events import Event, Subscriber
from archive.hookspecs import hookimpl
from archive.identity import Source
from archive.jobs import JobQueue, Worker, load_handlers
from archive.runtime import Archive
from tests.dicomfiles import make_instance
from tests.httpserver import running_imag
from tests.processes import eventually

SOURCE = Source("dicom", site="A")


@dataclass
class Stable:
    """An archive whose studies are stable after 1 s of its fake clock, with a
    job worker running."""

    archive: Archive
    clock: FakeClock
    worker: Worker

    def let_pass(self, seconds: float) -> None:
        """``seconds`` pass; the worker runs what became due."""
        self.clock.advance(seconds)
        assert self.worker.wait_idle(), "the worker did not finish the due jobs"

    def events(self, study: str) -> list[changes.Change]:
        return stable_events(self.archive, study)


@pytest.fixture
def stable(make_config: Callable[..., Config], index_url: str) -> Iterator[Stable]:
    clock = FakeClock()
    config = make_config(index_url=index_url, settings={"stable_after_seconds": 1})
    with Archive(config, clock=clock) as a:
        worker = Worker(a, "test", queue=JobQueue(a.db), poll_interval=0.05).start()
        try:
            yield Stable(a, clock, worker)
        finally:
            worker.stop()


def stable_events(archive: Archive, study: str) -> list[changes.Change]:
    return [c for c in changes.read(archive.db, 0, 1000, ["study.stable"]) if c.study_uid == study]


def push(archive: Archive, study: str, count: int) -> None:
    series = generate_uid()
    for _ in range(count):
        assert archive.pipeline.ingest(make_instance(study=study, series=series), SOURCE).ok


def test_two_bursts_separated_by_more_than_stable_after_give_two_events(stable: Stable) -> None:
    study = generate_uid()
    push(stable.archive, study, 3)
    stable.let_pass(0.9)
    assert stable.events(study) == []  # not stable yet
    stable.let_pass(0.2)
    assert len(stable.events(study)) == 1
    push(stable.archive, study, 2)  # a new burst
    stable.let_pass(1.1)
    assert len(stable.events(study)) == 2
    stable.let_pass(1.5)
    assert len(stable.events(study)) == 2


def test_a_study_pushed_continuously_gives_one_event_after_the_last_instance(
    stable: Stable,
) -> None:
    study = generate_uid()
    series = generate_uid()
    for _ in range(10):  # an instance every 0.3 s, for 3 s
        assert stable.archive.pipeline.ingest(make_instance(study=study, series=series), SOURCE).ok
        stable.let_pass(0.3)
    assert stable.events(study) == []
    stable.let_pass(1)
    assert len(stable.events(study)) == 1
    stable.let_pass(1.5)
    assert len(stable.events(study)) == 1


def test_the_feed_lists_stored_instances_in_order_and_subscribers_hear_of_stability(
    stable: Stable,
) -> None:
    heard: list[str] = []
    got = threading.Event()

    def hear(archive: Archive, event: Event) -> None:
        heard.append(event.study_uid)
        got.set()

    # a durable subscriber, as a plugin registers it (run as a job by the worker)
    listener = SimpleNamespace(
        imag_event_subscribers=hookimpl(lambda: [Subscriber("test-heard", ("study.stable",), hear)])
    )
    plugins.plugin_manager().register(listener, name="test-heard")
    load_handlers()
    try:
        study = generate_uid()
        push(stable.archive, study, 2)
        stable.let_pass(1.1)
        assert got.wait(10) and heard == [study]
    finally:
        plugins.plugin_manager().unregister(listener)
    feed = changes.read(stable.archive.db, 0, 100)
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

        eventually(stable, timeout=15)
        first = server.http.get(url, params={"since": 0, "limit": 1}, timeout=10).json()
        assert first["changes"][0]["type"] == "instance.stored"
        assert first["changes"][0]["study"] == study
        rest = server.http.get(url, params={"since": first["last"]}, timeout=10).json()
        # plugins' events are in the feed too (the identity index's), but no
        # patient demographics: an observation is named by its fingerprint only
        assert [c["type"] for c in rest["changes"] if c["type"] != "identity.observed"] == [
            "study.stable"
        ]
        for change in rest["changes"]:
            if change["type"] == "identity.observed":
                assert set(change["detail"]) == {"fingerprint"}
        bad = server.http.get(url, params={"since": "x"}, timeout=10)
        assert bad.status_code == 400 and "since" in bad.json()["detail"]
