"""Shared fixtures: real PostgreSQL, a real S3 endpoint (moto's server), and
archives opened on any combination of index and object store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from archive.config import Config, load_config
from archive.runtime import Archive
from archive.scu import close_reactor_race

# every pynetdicom SCU of the tests: see archive/scu.py
close_reactor_race()

pytest_plugins = ["tests.s3server", "tests.pgserver", "tests.inprocess", "tests.interop"]

#: fixtures of these scopes are built once per worker that runs one of their tests
_SHARED_SCOPES = frozenset({"package", "module", "class"})


def _shared_fixture_group(item: pytest.Item) -> str | None:
    """The xdist group of a test that uses a module-scoped fixture (a server,
    a pushed corpus): its module and the parameters of those fixtures (the
    index backend), so that each such fixture is built on one worker only,
    while the SQLite and the PostgreSQL halves of a module can still run side
    by side."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    shared = sorted(
        name
        for name, defs in info.name2fixturedefs.items()
        if defs and defs[-1].scope in _SHARED_SCOPES
    )
    if not shared:
        return None
    module = Path(item.nodeid.split("::", 1)[0]).stem
    params = getattr(getattr(item, "callspec", None), "params", {})
    variant = ",".join(str(params[name])[:24] for name in shared if name in params)
    # no "[", "]" or "@": xdist takes the text after the last "@" as the group
    # only when no "]" follows it
    group = f"{module}:{variant}" if variant else module
    return "".join(c if c not in "[]@" else "_" for c in group)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (scripts/test runs ``-n auto --dist loadgroup``): tests
    marked ``serial`` run one after the other on one worker; tests sharing a
    module-scoped fixture stay together on one worker; every other test goes
    wherever a worker is free.

    A test marked ``s3_on_sqlite`` runs its S3 variant on the SQLite index only:
    its PostgreSQL + S3 combination is deselected (reported as such, not as a
    skip), PostgreSQL with S3 being test_dicomweb_s3's and test_several_nodes'."""
    dropped = [
        item
        for item in items
        if item.get_closest_marker("s3_on_sqlite")
        and item.get_closest_marker("postgres")
        and item.get_closest_marker("s3")
    ]
    if dropped:
        gone = {id(item) for item in dropped}
        items[:] = [item for item in items if id(item) not in gone]
        config.hook.pytest_deselected(items=dropped)
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            if item.get_closest_marker("serial"):
                item.add_marker(pytest.mark.xdist_group("serial"))
            elif group := _shared_fixture_group(item):
                item.add_marker(pytest.mark.xdist_group(group))
        if config.getoption("loadgroup", False):
            _carry_group_in_node_id(item)


def _carry_group_in_node_id(item: pytest.Item) -> None:
    """What pytest-xdist's worker does for ``--dist loadgroup`` (the group after
    an ``@`` in the node id, which its scheduler splits on), done here because
    xdist 3.8 writes ``item._nodeid`` while pytest 9 reads the id from
    ``item._id``: without this every test would be scheduled on its own."""
    groups = sorted({str(mark.args[0]) for mark in item.iter_markers("xdist_group") if mark.args})
    node_id = getattr(item, "_id", None)
    if not groups or node_id is None or "@" in item.nodeid:
        return
    item._id = type(node_id).parse(f"{item.nodeid}@{'_'.join(groups)}")


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
