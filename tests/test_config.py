"""Configuration: one TOML file, IMAG_* environment overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from archive.config import ConfigError, load_config


def test_defaults_put_index_and_objects_in_the_data_folder(tmp_path: Path) -> None:
    config = load_config(env={"IMAG_DATA_DIR": str(tmp_path / "d")})
    assert config.data_dir == tmp_path / "d"
    assert config.index_url == f"sqlite:///{tmp_path / 'd' / 'index.db'}"
    assert config.storage_url == (tmp_path / "d" / "objects").as_uri()
    assert (config["http.host"], config["http.port"]) == ("127.0.0.1", 8080)
    assert (config["dicom.host"], config["dicom.port"], config["dicom.aet"]) == (
        "0.0.0.0",
        11112,
        "IMAG",
    )


def test_default_data_dir_is_imag_data_in_the_working_folder() -> None:
    assert load_config(env={}).data_dir == Path("./imag-data").resolve()


def test_environment_overrides_the_file_which_overrides_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "imag.toml"
    toml.write_text('[http]\nport = 9000\nhost = "0.0.0.0"\n[dicom]\naet = "FILEAET"\n')
    config = load_config(toml, env={"IMAG_HTTP_PORT": "9100"})
    assert config["http.port"] == 9100
    assert config["http.host"] == "0.0.0.0"
    assert config["dicom.aet"] == "FILEAET"
    assert config.sources["http.port"] == "env"
    assert config.sources["http.host"] == "file"


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("IMAG_DATA_DIR", "/srv/imag", "data_dir"),
        ("IMAG_INDEX_URL", "postgresql://imag@db.example:5432/imag", "index.url"),
        ("IMAG_INDEX_URL", "sqlite:////var/lib/imag/index.db", "index.url"),
        ("IMAG_STORAGE_URL", "s3://bucket/prefix", "storage.url"),
        ("IMAG_STORAGE_URL", "file:///srv/objects", "storage.url"),
        ("IMAG_S3_ENDPOINT_URL", "http://127.0.0.1:9000", "s3.endpoint_url"),
        ("IMAG_S3_REGION", "eu-west-3", "s3.region"),
        ("IMAG_HTTP_HOST", "0.0.0.0", "http.host"),
        ("IMAG_HTTP_PORT", "8443", "http.port"),
        ("IMAG_DICOM_HOST", "127.0.0.1", "dicom.host"),
        ("IMAG_DICOM_PORT", "104", "dicom.port"),
        ("IMAG_DICOM_AET", "REGION_PACS", "dicom.aet"),
    ],
)
def test_public_environment_variables(variable: str, value: str, setting: str) -> None:
    config = load_config(env={variable: value})
    expected = int(value) if setting.endswith("port") else value
    assert config[setting] == expected


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"IMAG_HTTP_PORT": "eighty"}, ["http.port", "IMAG_HTTP_PORT", "integer"]),
        ({"IMAG_DICOM_PORT": "70000"}, ["dicom.port", "between 0 and 65535"]),
        ({"IMAG_INDEX_URL": "mysql://x"}, ["index.url", "sqlite:///", "postgresql://"]),
        ({"IMAG_STORAGE_URL": "ftp://x"}, ["storage.url", "file:///", "s3://"]),
        ({"IMAG_DICOM_AET": "A_TITLE_FAR_TOO_LONG"}, ["dicom.aet", "1-16"]),
        ({"IMAG_INGEST_ON_CONFLICT": "merge"}, ["ingest.on_conflict", "'keep'", "'replace'"]),
        ({"IMAG_INGEST_MAX_OBJECT_BYTES": "lots"}, ["ingest.max_object_bytes", "size"]),
        # a lease shorter than a renewal's round trip would hand running jobs to others
        ({"IMAG_JOBS_LEASE_SECONDS": "1"}, ["jobs.lease_seconds", "between 5 and 3600"]),
    ],
)
def test_bad_values_are_refused_naming_the_key_and_what_is_expected(
    env: dict, names: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    for name in names:
        assert name in str(err.value)


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    toml = tmp_path / "imag.toml"
    toml.write_text("[http]\nprot = 9000\n")
    with pytest.raises(ConfigError, match="http.prot"):
        load_config(toml, env={})


def test_sizes_accept_units() -> None:
    config = load_config(env={"IMAG_INGEST_MAX_OBJECT_BYTES": "2GiB"})
    assert config["ingest.max_object_bytes"] == 2 * 2**30


def test_config_show_masks_the_database_password(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "archive.cli", "config", "show"],
        env={"IMAG_INDEX_URL": "postgresql://imag:s3cret@db:5432/imag", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "s3cret" not in out
    assert "postgresql://imag:***@db:5432/imag" in out
    assert "IMAG_HTTP_PORT" in out


def test_a_bad_value_stops_the_command_with_a_clear_message(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "archive.cli", "stats"],
        env={"IMAG_HTTP_PORT": "x", "IMAG_DATA_DIR": str(tmp_path), "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 78
    assert "http.port" in run.stderr and "IMAG_HTTP_PORT" in run.stderr
