"""Pytest plugin: a real moto S3 server in a subprocess.

The S3 backend is tested over real HTTP rather than with in-process mocks so
that signing, multipart uploads, ranged reads and error mapping all run
through botocore exactly as they would against AWS or MinIO.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import free_port

_START_TIMEOUT = 20.0


@dataclass(frozen=True)
class S3Server:
    """A running moto server; tests only need its endpoint."""

    endpoint_url: str
    process: subprocess.Popen[bytes]
    log_path: Path


def _answers_http(url: str) -> bool:
    """True as soon as anything answers HTTP on ``url``, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _start(log_path: Path) -> S3Server:
    """Start moto on a free port and wait until it answers; raise with its log if not."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Keep the server's environment free of real AWS settings (it needs none).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # A log file, not a pipe: moto logs every request and a full pipe would block it.
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _answers_http(endpoint + "/moto-api/"):
            return S3Server(endpoint_url=endpoint, process=process, log_path=log_path)
        time.sleep(0.1)
    _stop(process)
    output = log_path.read_text(errors="replace")
    raise RuntimeError(
        f"moto server on {endpoint} did not answer within {_START_TIMEOUT:.0f} s "
        f"(exit code {process.returncode}); its output:\n{output}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto S3 server for the whole session; stopped at session end."""
    log_dir = tmp_path_factory.mktemp("moto")
    error: RuntimeError | None = None
    for attempt in range(3):  # the free port may be taken before moto binds it
        try:
            server = _start(log_dir / f"moto-{attempt}.log")
            break
        except RuntimeError as exc:
            error = exc
    else:
        assert error is not None
        raise error
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> str:
    """Dummy AWS credentials for the boto3 default chain; returns the endpoint URL."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    return s3_server.endpoint_url


@pytest.fixture
def s3_bucket(s3_env: str) -> Iterator[str]:
    """A fresh, uniquely named bucket; emptied and removed afterwards."""
    import boto3

    name = f"imag-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        try:
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=name, Key=obj["Key"])
            client.delete_bucket(Bucket=name)
        except Exception:  # noqa: BLE001 - cleanup of a throwaway server, never fail a test
            pass
        client.close()
