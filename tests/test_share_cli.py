"""``imag share`` as an administrator runs it: a link to an imported study,
printed once, listed without its secret, revoked; a study that is not there
is refused with a message that says so."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from archive.index import open_database
from tests.dicomfiles import make_instance


def imag(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "archive.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict:
    return {
        "PATH": os.environ["PATH"],
        "IMAG_DATA_DIR": str(tmp_path / "data"),
        "IMAG_LOG_FORMAT": "text",
        "IMAG_LOG_LEVEL": "WARNING",
        "IMAG_HTTP_PUBLIC_URL": "https://imagerie.example.org",
    }


def test_a_link_is_created_printed_once_listed_without_its_secret_and_revoked(
    env: dict, tmp_path: Path
) -> None:
    study = generate_uid()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(make_instance(study=study))
    assert imag(env, "import", "-q", str(folder)).returncode == 0

    made = imag(env, "share", "create", "--study", study, "--audience", "patient", "--download")
    assert made.returncode == 0, made.stderr
    link = json.loads(made.stdout)
    assert link["url"].startswith("https://imagerie.example.org/share/")
    secret = link["url"].rsplit("/", 1)[1]
    assert len(secret) >= 43  # 256 bits, URL-safe base64

    listed = imag(env, "share", "list")
    assert listed.returncode == 0 and secret not in listed.stdout and study in listed.stdout
    db = open_database(f"sqlite:///{tmp_path / 'data' / 'index.db'}")
    try:
        stored = {str(v) for row in db.query("SELECT * FROM shares") for v in row}
    finally:
        db.close()
    assert secret not in stored
    assert hashlib.sha256(secret.encode()).hexdigest() in stored

    revoked = imag(env, "share", "revoke", str(link["id"]))
    assert revoked.returncode == 0 and "revoked" in revoked.stdout


def test_sharing_a_study_that_is_not_there_is_refused_with_what_to_do(env: dict) -> None:
    refused = imag(env, "share", "create", "--study", "1.2.3.4.5")
    assert refused.returncode == 2
    assert "1.2.3.4.5" in refused.stderr and refused.stdout == ""
