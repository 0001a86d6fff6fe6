"""A pytest plugin (loaded by tests/conftest.py): under CI, an
interoperability test that skips fails instead.

A test marked ``interop`` drives a real third-party program (Orthanc and its
DICOMweb plugin, dcmtk, a viewer in Chromium) and skips when it is not
installed.  On a developer's machine that is a fair skip; on CI (``CI=true``)
it means the machine was set up wrong (``./scripts/test`` installs them all),
and a suite that passes while silently leaving out the tests that matter most
tells nobody.  So under CI such a skip is reported as a failure naming what
was missing."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import pytest


def under_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this run is a CI run (``CI=true``, as CI services set it)."""
    return environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "interop: drives a real third-party client (a viewer, a DICOM toolkit) against IMAG; "
        "a skip fails under CI=true",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not under_ci():
        return
    if item.get_closest_marker("interop") is None:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (
        f"interoperability test skipped under CI=true: {reason} "
        "(./scripts/test installs what it needs)"
    )
