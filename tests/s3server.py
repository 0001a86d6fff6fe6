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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storage.base import ObjectStore
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


# -- one object store per kind, for modules that share one server across their tests ----------

#: boto3's default chain reads these; moto accepts any value.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class StoreUnderTest:
    """The object store a module's server writes to: the default folder in its
    data directory (``filesystem``) or a fresh moto bucket (``s3``).

    A server is pointed at it with :meth:`toml` (``[storage]`` / ``[s3]`` tables)
    or :meth:`settings` (``IMAG_*`` variables) plus :attr:`env` (the credentials,
    which boto3 only takes from its default chain); a test reads back what was
    stored with :meth:`open`, whatever the kind."""

    kind: str
    url: str | None = None  # None: the filesystem store in the server's data dir
    endpoint_url: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.kind == "s3"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables the server processes need (the S3 credentials)."""
        return dict(S3_CREDENTIALS) if self.is_s3 else {}

    def toml(self) -> dict[str, dict]:
        """``ImagServer(settings=...)`` tables naming this store."""
        if not self.is_s3:
            return {}
        return {
            "storage": {"url": self.url},
            "s3": {
                "endpoint_url": self.endpoint_url,
                "region": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
            },
        }

    def settings(self) -> dict[str, str]:
        """``IMAG_*`` variables (and credentials) naming this store."""
        if not self.is_s3:
            return {}
        assert self.url and self.endpoint_url
        return {
            "IMAG_STORAGE_URL": self.url,
            "IMAG_S3_ENDPOINT_URL": self.endpoint_url,
            "IMAG_S3_REGION": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
            **S3_CREDENTIALS,
        }

    def overrides(self) -> dict[str, str]:
        """``load_config`` overrides (``make_config(settings=...)``) naming this
        store, for an :class:`~archive.runtime.Archive` opened in the test
        process (whose boto3 then needs :attr:`env` in ``os.environ``)."""
        if not self.is_s3:
            return {}
        assert self.url and self.endpoint_url
        return {
            "storage.url": self.url,
            "s3.endpoint_url": self.endpoint_url,
            "s3.region": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
        }

    def open(self, data_dir: Path) -> ObjectStore:
        """The store itself, as the server of ``data_dir`` sees it (close it after use)."""
        from storage import open_store

        if not self.is_s3:
            return open_store((data_dir / "objects").as_uri())
        from storage.s3 import S3Store

        assert self.url
        bucket, _, prefix = self.url.removeprefix("s3://").partition("/")
        store = S3Store(bucket, prefix, endpoint_url=self.endpoint_url, region="us-east-1")
        # S3Store reads credentials from the environment: give it moto's explicitly
        store._client = _client(self.endpoint_url)  # noqa: SLF001 - a test's own reader
        return store

    def keys(self, data_dir: Path) -> list[str]:
        """Every object key stored, below the store's prefix."""
        store = self.open(data_dir)
        try:
            return sorted(store.iter_keys())
        finally:
            store.close()


def _client(endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}),
    )


@contextmanager
def s3_store_under_test(server: S3Server) -> Iterator[StoreUnderTest]:
    """A fresh bucket on ``server`` as a :class:`StoreUnderTest`; emptied and removed after."""
    name = f"imag-store-{uuid.uuid4().hex[:16]}"
    client = _client(server.endpoint_url)
    client.create_bucket(Bucket=name)
    try:
        yield StoreUnderTest("s3", f"s3://{name}/archive", server.endpoint_url)
    finally:
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=name, Key=obj["Key"])
            client.delete_bucket(Bucket=name)
        except Exception:  # noqa: BLE001 - cleanup of a throwaway server, never fail a test
            pass
        client.close()


@pytest.fixture(scope="module", params=["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def module_store(request: pytest.FixtureRequest) -> Iterator[StoreUnderTest]:
    """Each object store once per module: the module's shared server is built
    once per store, so every test of it runs on the filesystem and on S3."""
    if request.param == "filesystem":
        yield StoreUnderTest("filesystem")
        return
    with s3_store_under_test(request.getfixturevalue("s3_server")) as store:
        yield store


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def store_under_test(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StoreUnderTest]:
    """Each object store once per test (a fresh bucket for S3), for archives
    opened in the test process: the S3 credentials are put in ``os.environ``
    for the test's duration, where boto3's default chain finds them."""
    if request.param == "filesystem":
        yield StoreUnderTest("filesystem")
        return
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    with s3_store_under_test(request.getfixturevalue("s3_server")) as store:
        yield store


def index_for_store(index_url: str, store: StoreUnderTest) -> str:
    """The module's index for this object store: rows indexed beside the objects
    of one store must never be read through another, so an S3 server gets its
    own SQLite file next to the module's (PostgreSQL + S3 is deselected in the
    modules that share an index this way: ``s3_on_sqlite``)."""
    if store.kind != "filesystem" and index_url.startswith("sqlite:///"):
        return index_url.removesuffix(".db") + f"-{store.kind}.db"
    return index_url
