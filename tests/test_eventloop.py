"""The servers' event loop (setting ``event_loop``): uvloop by default, asyncio's
own when asked; on uvloop, WADO-RS reads stored objects instead of sending
them with sendfile(2), which uvloop's loop cannot do."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import uvloop

from archive import eventloop
from archive.config import load_config
from tests.httpserver import running_imag


def test_the_default_event_loop_is_uvloops_and_asyncio_can_be_asked_for() -> None:
    assert load_config(env={})["event_loop"] == "uvloop"
    assert load_config(env={"IMAG_EVENT_LOOP": "asyncio"})["event_loop"] == "asyncio"
    with pytest.raises(Exception, match="one of 'uvloop', 'asyncio'"):
        load_config(env={"IMAG_EVENT_LOOP": "trio"})
    for kind, expected in (("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = eventloop.new_event_loop(kind)
        try:
            assert isinstance(loop, expected)
        finally:
            loop.close()


def test_only_asyncios_loop_is_taken_to_send_files() -> None:
    for kind, sends in (("uvloop", False), ("asyncio", True)):
        loop = eventloop.new_event_loop(kind)
        try:
            assert eventloop.sends_files(loop) is sends
        finally:
            loop.close()


def test_without_uvloop_installed_asyncios_loop_is_used_and_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(eventloop, "uvloop", None)
    with caplog.at_level(logging.WARNING, logger="archive.eventloop"):
        loop = eventloop.new_event_loop("uvloop")
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()
    assert "uvloop is not installed" in caplog.text


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_imag_serve_runs_http_and_the_lean_dicom_path_on_the_loop_asked_for(
    tmp_path: Path, kind: str
) -> None:
    with running_imag(tmp_path, dicom=True, settings={"IMAG_EVENT_LOOP": kind}) as server:
        assert server.http.get(server.url + "/health", timeout=10).status_code == 200
        log = server.log()
    serving = next(line for line in log.splitlines() if "imag serving" in line)
    assert f"event_loop={kind}" in serving, serving
    listening = next(line for line in log.splitlines() if "DICOM listening" in line)
    assert f"lean_store={kind}" in listening, listening
