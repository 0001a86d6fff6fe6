"""Sites, DICOM peers and routes are read into typed records (archive.topology):
validated once at start-up with messages naming the setting, looked up by
attribute, and shown by `imag config show` as the tables they were read from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archive import cli
from archive.config import ConfigError, load_config
from archive.routing import route_matches
from archive.topology import ROUTE_MATCH, STORE_AS, Peer, Route, RouteMatch, Site

TOML = """
store_as = "htj2k-lossless"
stable_after_seconds = 90

[[sites]]
name = "NORD"
store_as = "as-received"
stable_after_seconds = 30

[[sites]]
name = "SUD"

[[dicom.peers]]
aet = "CT_NORD"
host = "10.0.0.7"
port = 11112
site = "NORD"

[[dicom.peers]]
aet = "REGION"
regional = true

[[routes]]
name = "ct-to-region"
when = "stable"
site = "NORD"
modality = "re:CT|MR"
to_dicom = "REGION"

[[routes]]
to_stow = "https://other.example/dicomweb"
stow_token_file = "/etc/imag/other-token"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "imag.toml"
    path.write_text(TOML, encoding="utf-8")
    return path


def test_the_three_tables_are_read_into_records_with_their_defaults(config_file: Path) -> None:
    config = load_config(config_file, env={})
    assert config.sites == [
        Site("NORD", store_as="as-received", stable_after_seconds=30),
        Site("SUD"),
    ]
    assert config.peers == [
        Peer("CT_NORD", host="10.0.0.7", port=11112, site="NORD"),
        Peer("REGION", host="*", port=104, site="", regional=True),
    ]
    assert config.routes == [
        Route(
            "ct-to-region",
            when="stable",
            to_dicom="REGION",
            match=RouteMatch(site="NORD", modality="re:CT|MR"),
        ),
        Route(
            "route-2",
            to_stow="https://other.example/dicomweb",
            stow_token_file="/etc/imag/other-token",
        ),
    ]
    # the item access of every other setting gives the same records
    assert config["dicom.peers"] is config.peers


def test_lookups_by_name_and_per_site_policies_fall_back_to_the_archive_wide_ones(
    config_file: Path,
) -> None:
    config = load_config(config_file, env={})
    assert config.peer("CT_NORD").site == "NORD" and config.peer("NOBODY") is None
    assert config.route("route-2").to_stow == "https://other.example/dicomweb"
    assert config.route("gone") is None
    assert config.site("SUD") == Site("SUD") and config.site("EST") is None
    assert [config.store_as_for(s) for s in ("NORD", "SUD", "EST")] == [
        "as-received",
        "htj2k-lossless",
        "htj2k-lossless",
    ]
    assert [config.stable_after_for(s) for s in ("NORD", "SUD", "EST")] == [30, 90, 90]


def test_a_regional_peer_sees_everything_and_a_site_peer_only_its_site(config_file: Path) -> None:
    config = load_config(config_file, env={})
    assert config.peer("REGION").scope is None
    assert config.peer("CT_NORD").scope.sites == frozenset({"NORD"})


def test_peers_given_as_a_json_array_in_the_environment_read_as_from_the_file(
    config_file: Path,
) -> None:
    tables = [
        {"aet": "CT_NORD", "host": "10.0.0.7", "port": 11112, "site": "NORD"},
        {"aet": "REGION", "regional": True},
    ]
    from_env = load_config(env={"IMAG_DICOM_PEERS": json.dumps(tables)})
    assert from_env.peers == load_config(config_file, env={}).peers
    assert from_env.sources["dicom.peers"] == "env"


def test_config_show_prints_the_tables_as_they_were_written(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("IMAG_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(["--config", str(config_file), "config", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sites"][0] == {
        "name": "NORD",
        "store_as": "as-received",
        "stable_after_seconds": 30,
    }
    assert shown["dicom.peers"][1] == {
        "aet": "REGION",
        "host": "*",
        "port": 104,
        "site": "",
        "regional": True,
    }
    route = shown["routes"][0]
    assert (route["name"], route["when"], route["to_dicom"]) == ("ct-to-region", "stable", "REGION")
    assert (route["site"], route["modality"], route["body_part"]) == ("NORD", "re:CT|MR", None)
    # what is shown is a configuration that reads back into the same records
    again = load_config(
        env={
            "IMAG_SITES": json.dumps(shown["sites"]),
            "IMAG_DICOM_PEERS": json.dumps(shown["dicom.peers"]),
            "IMAG_ROUTES": json.dumps(shown["routes"]),
        }
    )
    original = load_config(config_file, env={})
    assert (again.sites, again.peers, again.routes) == (
        original.sites,
        original.peers,
        original.routes,
    )

    assert cli.main(["--config", str(config_file), "config", "show"]) == 0
    text = capsys.readouterr().out
    assert "'aet': 'CT_NORD'" in text and "'name': 'ct-to-region'" in text


@pytest.mark.parametrize(
    ("variable", "value", "names"),
    [
        ("IMAG_DICOM_PEERS", "not json", ["dicom.peers", "JSON array"]),
        ("IMAG_DICOM_PEERS", '[{"aet": "A", "port": 70000}]', ["peer #1", "'A'", "65535"]),
        ("IMAG_DICOM_PEERS", '[{"aet": "A", "hots": "x"}]', ["peer #1", "unknown: hots"]),
        ("IMAG_DICOM_PEERS", '[{"aet": "A_TITLE_FAR_TOO_LONG"}]', ["peer #1", "1-16"]),
        ("IMAG_DICOM_PEERS", '[{"aet": "A"}, {"aet": "A"}]', ["distinct AE titles"]),
        ("IMAG_SITES", '[{"store_as": "htj2k-lossless"}]', ["site #1", "at least a name"]),
        ("IMAG_SITES", '[{"name": "N", "store_as": "jpeg"}]', ["site 'N'", *STORE_AS]),
        ("IMAG_SITES", '[{"name": "N", "stable_after_seconds": 0}]', ["site 'N'", "between 1"]),
        ("IMAG_SITES", '[{"name": "N", "stable": 5}]', ["site #1", "unknown: stable"]),
        ("IMAG_SITES", '[{"name": "N"}, {"name": "N"}]', ["sites with distinct names"]),
        ("IMAG_ROUTES", '[{"to_dicom": "A", "to_stow": "http://b"}]', ["'route-1'", "exactly"]),
        ("IMAG_ROUTES", '[{"name": "r", "to_dicom": "A", "when": "daily"}]', ["'r'", "when ="]),
        ("IMAG_ROUTES", '[{"name": "r", "to_dicom": "A", "site": "re:("}]', ["'r'", "site"]),
        ("IMAG_ROUTES", '[{"name": "r", "to_dicom": "A", "modality": 5}]', ["modality a string"]),
        ("IMAG_ROUTES", '[{"name": "r", "to_dicom": "A", "aet": "X"}]', ["unknown key(s) aet"]),
        ("IMAG_ROUTES", '[{"to_dicom": "A"}, {"to_dicom": "A", "name": "route-1"}]', ["distinct"]),
    ],
)
def test_bad_tables_are_refused_naming_the_setting_the_entry_and_what_is_expected(
    variable: str, value: str, names: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={variable: value})
    assert variable in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_every_route_match_key_is_allowed_in_a_table_and_takes_part_in_matching() -> None:
    for key in ROUTE_MATCH:
        route = Route.from_toml({"name": "r", "to_dicom": "A", key: "X"})
        assert dict(route.match.items())[key] == "X"
        assert route.as_toml()[key] == "X"
        assert route_matches(route, {key: "X"})
        assert not route_matches(route, {key: "Y"})


def test_records_given_in_code_are_kept_as_they_are(make_config) -> None:
    route = Route("r", to_dicom="A", match=RouteMatch(modality="CT"))
    site = Site("N", store_as="j2k-lossless")
    config = make_config(settings={"routes": [route], "sites": [site]})
    assert config.routes == [route] and config.store_as_for("N") == "j2k-lossless"
