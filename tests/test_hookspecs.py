"""The extension contract: the core registers through it, and two plugins can
never silently override each other.

Each test registers a small plugin object on the process's plugin manager for
its own duration (what an installed package's entry point does at start-up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import evt

from archive import plugins
from archive.config import ConfigError, Setting, as_int, load_config
from archive.dimse.services import DicomService, bindings
from archive.events import Subscriber, subscribers
from archive.hookspecs import hookimpl
from archive.identity import DefaultIdentity, load_identity_plugin
from archive.index.migrate import Migrations, components
from archive.jobs import load_handlers
from archive.security.roles import Principal, permissions, role_permissions


@pytest.fixture
def register() -> Iterator[Callable[..., Any]]:
    """Register plugin objects for one test; they are gone afterwards."""
    added: list[Any] = []

    def add(name: str, **hooks: Callable[..., Any]) -> Any:
        plugin = SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})
        plugins.plugin_manager().register(plugin, name=name)
        added.append(plugin)
        return plugin

    yield add
    for plugin in added:
        plugins.plugin_manager().unregister(plugin)


def test_the_cores_own_features_are_plugins() -> None:
    names = plugins.plugin_names()
    for core in plugins.DEFAULT_PLUGINS:
        assert core in names
    assert "studies.read" in permissions()  # the security plugin's
    kinds = set(load_handlers())
    assert {"study.stability", "route.instance", "route.study", "event:routing"} <= kinds
    assert [s.name for s in subscribers()] == [
        "routing",
        "identity",
        "sharing-gp-links",
        "worklist-read-routes",
        "screening-exams",
        "screening-letters",
    ]
    assert isinstance(load_identity_plugin("default"), DefaultIdentity)


def test_a_plugin_setting_is_read_from_the_environment_and_validated(register, tmp_path) -> None:
    register("limits", imag_settings=lambda: [Setting("limits.max", 5, as_int(1, 10), "at most")])
    config = load_config(env={"IMAG_DATA_DIR": str(tmp_path), "IMAG_LIMITS_MAX": "7"})
    assert config["limits.max"] == 7
    with pytest.raises(ConfigError, match="limits.max.*IMAG_LIMITS_MAX"):
        load_config(env={"IMAG_DATA_DIR": str(tmp_path), "IMAG_LIMITS_MAX": "70"})


def test_a_setting_defined_twice_stops_start_up_naming_the_plugin(register, tmp_path) -> None:
    register("clash", imag_settings=lambda: [Setting("dicom.aet", "X", str, "again")])
    with pytest.raises(plugins.PluginError, match="dicom.aet.*clash"):
        load_config(env={"IMAG_DATA_DIR": str(tmp_path)})


def test_a_permission_defined_twice_names_both_plugins(register) -> None:
    register("one", imag_permissions=lambda: {"reports.sign": "sign reports"})
    register("two", imag_permissions=lambda: {"reports.sign": "sign them too"})
    with pytest.raises(plugins.PluginError, match="reports.sign.*one.*two"):
        permissions()


def test_a_role_grant_reaches_the_role_and_admin_gets_every_permission(register) -> None:
    register(
        "reports",
        imag_permissions=lambda: {"reports.sign": "sign reports"},
        imag_role_grants=lambda: {"radiologist": ["reports.sign"]},
    )
    assert "reports.sign" in role_permissions("radiologist")
    assert "reports.sign" not in role_permissions("technician")
    assert Principal("root", "admin").can("reports.sign")
    assert not Principal("t", "technician").can("reports.sign")


def test_a_job_kind_defined_twice_is_refused(register) -> None:
    register("first", imag_job_kinds=lambda: {"mail.send": lambda archive, payload: None})
    register("second", imag_job_kinds=lambda: {"mail.send": lambda archive, payload: None})
    with pytest.raises(plugins.PluginError, match="mail.send.*first.*second"):
        load_handlers()


def test_a_subscriber_of_an_undeclared_event_type_is_refused(register) -> None:
    register(
        "reports",
        imag_event_subscribers=lambda: [Subscriber("mailer", ("screening.recalled",), print)],
    )
    with pytest.raises(plugins.PluginError, match="screening.recalled"):
        subscribers()
    register("declares", imag_event_types=lambda: ["screening.recalled"])
    assert "mailer" in [s.name for s in subscribers()]


def test_two_subscribers_with_one_name_are_refused(register) -> None:
    register(
        "copy", imag_event_subscribers=lambda: [Subscriber("routing", ("study.stable",), print)]
    )
    with pytest.raises(plugins.PluginError, match="routing"):
        subscribers()


def test_a_migration_component_is_unique(register, tmp_path) -> None:
    register("a", imag_migrations=lambda: Migrations("reports", tmp_path))
    assert [m.component for m in components()][-1] == "reports"
    register("b", imag_migrations=lambda: Migrations("reports", tmp_path))
    with pytest.raises(plugins.PluginError, match="reports"):
        components()


def test_an_installed_provider_replaces_the_default_one(register) -> None:
    mine = object()
    register("regional-index", imag_identity_provider=lambda name: mine if name == "rpi" else None)
    assert load_identity_plugin("rpi") is mine
    assert isinstance(load_identity_plugin("default"), DefaultIdentity)
    with pytest.raises(ValueError, match="'nope' not found"):
        load_identity_plugin("nope")


def test_two_dicom_services_cannot_answer_the_same_request() -> None:
    def find(archive, peers, aet):  # noqa: ANN001, ANN202
        return [(evt.EVT_C_FIND, lambda event: None), (evt.EVT_CONN_OPEN, lambda event: None)]

    one, two = DicomService("one", [], find), DicomService("two", [], find)
    assert len(bindings([one], None, None, "IMAG")) == 2
    with pytest.raises(ValueError, match="EVT_C_FIND.*one.*two"):
        bindings([one, two], None, None, "IMAG")
