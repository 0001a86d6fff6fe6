"""Shared fixtures: real PostgreSQL, a real S3 endpoint (moto's server), and
archives opened on any combination of index and object store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from archive.config import Config, load_config
from archive.runtime import Archive

pytest_plugins = ["tests.s3server", "tests.pgserver"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The index URL for each backend: the same test runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def module_index_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Like ``index_url``, but one index per backend for a whole module (for
    modules that share one server across their tests)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('index') / 'index.db'}"
        return
    from tests.pgserver import fresh_database  # a plugin module: imported by pytest first

    with fresh_database(request.getfixturevalue("pg_admin_url"), "imag_module") as url:
        yield url


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a Config rooted in tmp_path; keyword arguments override settings
    (``index_url=``, ``storage_url=``, or any "section.key" via a dict)."""

    def make(
        index_url: str | None = None,
        storage_url: str | None = None,
        settings: dict | None = None,
        env: dict | None = None,
    ) -> Config:
        overrides = {"data_dir": str(tmp_path / "data"), "log.format": "text"}
        if index_url:
            overrides["index.url"] = index_url
        if storage_url:
            overrides["storage.url"] = storage_url
        overrides.update(settings or {})
        return load_config(env=env or {}, overrides=overrides)

    return make


@pytest.fixture
def archive(make_config: Callable[..., Config], index_url: str) -> Iterator[Archive]:
    """An archive with the filesystem store, on each index backend."""
    with Archive(make_config(index_url=index_url)) as arch:
        yield arch
