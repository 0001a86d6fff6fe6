"""Plugin packages the tests install, and how they install them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent / "imag_example"


def install(source: Path, work: Path) -> Path:
    """pip-install the plugin package at ``source`` into ``work/site`` (offline,
    no dependencies) and return that folder: put it on PYTHONPATH to have the
    plugin, leave it off to be without it."""
    copy = shutil.copytree(source, work / "source")  # builds leave no trace in tests/
    site = work / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(copy),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return site
