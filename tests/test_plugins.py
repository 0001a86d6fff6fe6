"""A service plugs into IMAG without editing the core, and leaves with its package.

``tests/plugins/imag_example`` is a real plugin package: pip installs it into a
temporary folder (``--target``), the ``imag`` processes find it through the
``imag`` entry point group when that folder is on their PYTHONPATH, and
without it they have never heard of it.  It adds a route with its own
permission, a settings section, a migration, a CLI command, a job kind and a
``study.stable`` subscriber.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from tests.dicomfiles import make_instance
from tests.httpserver import HttpImag, running_imag
from tests.plugins import EXAMPLE, install
from tests.processes import eventually


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin installed by pip into a folder of its own."""
    site = install(EXAMPLE, tmp_path_factory.mktemp("plugin"))
    assert (site / "imag_example" / "__init__.py").exists()
    return site


def imag(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "archive.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def with_plugin(env: dict[str, str], site: Path) -> dict[str, str]:
    return env | {"PYTHONPATH": str(site)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, plugin_site: Path) -> Iterator[HttpImag]:
    workdir = tmp_path_factory.mktemp("imag")
    settings = {
        "PYTHONPATH": str(plugin_site),
        "IMAG_EXAMPLE_GREETING": "salut",
        "IMAG_STABLE_AFTER_SECONDS": "1",
    }
    with running_imag(workdir, settings=settings) as imag_server:
        yield imag_server


def new_token(server: HttpImag, user: str, role: str) -> str:
    added = imag(server.env, "user", "add", user, "--role", role, "--site", "A")
    assert added.returncode == 0, added.stderr
    made = imag(server.env, "token", "create", user)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_the_plugins_settings_are_shown_with_their_variables_and_overrides(
    plugin_site: Path, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin", "IMAG_DATA_DIR": str(tmp_path), "IMAG_EXAMPLE_REPEAT": "3"}
    shown = imag(with_plugin(env, plugin_site), "config", "show")
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line for line in shown.stdout.splitlines()}
    assert (
        "'bonjour'" in lines["example.greeting"]
        and "IMAG_EXAMPLE_GREETING" in lines["example.greeting"]
    )
    assert "3" in lines["example.repeat"] and "env" in lines["example.repeat"]


def test_a_bad_value_for_a_plugin_setting_stops_start_up_naming_it(
    plugin_site: Path, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin", "IMAG_DATA_DIR": str(tmp_path), "IMAG_EXAMPLE_REPEAT": "99"}
    shown = imag(with_plugin(env, plugin_site), "config", "show")
    assert shown.returncode == 78
    assert "example.repeat" in shown.stderr and "IMAG_EXAMPLE_REPEAT" in shown.stderr


def test_the_plugins_migration_is_versioned_as_its_own_component(
    plugin_site: Path, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin", "IMAG_DATA_DIR": str(tmp_path)}
    core_only = imag(env, "db", "upgrade")
    assert core_only.returncode == 0, core_only.stderr
    upgraded = imag(with_plugin(env, plugin_site), "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "example/0001_example_tables.sql" in upgraded.stdout + upgraded.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "index.db") as db:
        rows = db.execute(
            "SELECT component, MAX(version) FROM schema_migrations GROUP BY component"
        ).fetchall()
    versions = dict(rows)
    assert versions["example"] == 1
    assert versions["core"] >= 11  # the core's own sequence, untouched by the plugin's


def test_the_plugins_route_requires_its_permission_granted_to_a_role(
    server: HttpImag,
) -> None:
    url = server.url + "/example/hello"
    assert requests.get(url, timeout=10).status_code == 401
    radiologist = new_token(server, "dr-plugin", "radiologist")  # granted by the plugin
    technician = new_token(server, "tech-plugin", "technician")  # not granted
    answer = requests.get(url, headers={"Authorization": f"Bearer {radiologist}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["greeting"] == "salut"  # IMAG_EXAMPLE_GREETING
    refused = requests.get(url, headers={"Authorization": f"Bearer {technician}"}, timeout=10)
    assert refused.status_code == 403
    whoami = requests.get(
        server.url + "/whoami", headers={"Authorization": f"Bearer {radiologist}"}, timeout=10
    ).json()
    assert "example.read" in whoami["permissions"]


def test_the_plugins_command_enqueues_its_job_kind_which_the_server_runs(
    server: HttpImag,
) -> None:
    done = imag(server.env, "example", "--touch", "hello from the CLI")
    assert done.returncode == 0, done.stderr

    def touched() -> bool:
        shown = imag(server.env, "example")
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)["touches"] == ["hello from the CLI"]

    eventually(touched, what="the example.touch job run by imag serve")


def test_the_plugins_subscriber_runs_once_for_each_stable_study(server: HttpImag) -> None:
    studies = [generate_uid() for _ in range(3)]
    client = server.client()
    for study in studies:
        data = make_instance(study=study)
        client.store_instances([pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))])

    def delivered() -> dict[str, int] | None:
        answer = server.http.get(server.url + "/example/hello", timeout=10).json()["deliveries"]
        return answer if len(answer) >= len(studies) else None

    deliveries = eventually(delivered, what="a delivery for each study")
    assert sorted(deliveries.values()) == [1, 1, 1]
    jobs = imag(server.env, "jobs", "list", "--kind", "event:example-counter", "--json")
    assert jobs.returncode == 0, jobs.stderr
    listed = json.loads(jobs.stdout)["jobs"]
    assert len(listed) == len(studies)  # one delivery job per event, run by the queue
    assert {job["state"] for job in listed} == {"done"}


def test_without_the_package_the_plugin_is_gone(plugin_site: Path, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "IMAG_DATA_DIR": str(tmp_path)}
    assert imag(with_plugin(env, plugin_site), "db", "upgrade").returncode == 0
    shown = imag(env, "config", "show")
    assert shown.returncode == 0 and "example." not in shown.stdout
    unknown = imag(env, "example")
    assert unknown.returncode == 2 and "invalid choice: 'example'" in unknown.stderr
    config = tmp_path / "imag.toml"
    config.write_text('[example]\ngreeting = "hola"\n')
    refused = imag(env, "--config", str(config), "config", "show")
    assert refused.returncode == 78 and "example.greeting" in refused.stderr
    with running_imag(tmp_path / "serve") as bare:
        assert bare.http.get(bare.url + "/example/hello", timeout=10).status_code == 404


def test_imag_plugins_lists_the_core_then_the_installed_plugin_with_its_hooks(
    plugin_site: Path, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin", "IMAG_DATA_DIR": str(tmp_path)}
    shown = imag(with_plugin(env, plugin_site), "plugins", "--json")
    assert shown.returncode == 0, shown.stderr
    listed = json.loads(shown.stdout)
    names = list(listed)
    assert names[0] == "archive.events" and names[-1] == "example"
    assert listed["example"] == sorted(
        [
            "imag_commands",
            "imag_event_subscribers",
            "imag_job_kinds",
            "imag_migrations",
            "imag_permissions",
            "imag_role_grants",
            "imag_routes",
            "imag_settings",
        ]
    )
    bare = json.loads(imag(env, "plugins", "--json").stdout)
    assert "example" not in bare and "dicomweb.plugin" in bare
