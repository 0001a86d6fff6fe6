"""A share link opens its study in a standard DICOMweb viewer: the OHIF
Viewer (``@ohif/app``, served by IMAG at ``/viewer/`` as in tests/test_ohif.py)
in a real headless Chromium, with nothing but the link's capability.

Two ways a recipient's browser holds it: the session cookie the link was
exchanged for (OHIF's DICOMweb requests go to the same origin and carry it),
or the secret as OHIF's own ``?token=``, which OHIF sends as a Bearer on each
DICOMweb request.  Either way the study list shows the shared study and
nothing else, the study displays, and the adversary -- another study's UID
typed into OHIF's address, a study of the same site and patient list -- shows
no image and gets no data of it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
import pytest

from archive import synthetic
from archive.clock import FakeClock
from archive.identity import Source
from tests.browser import PageWatch, launched_chromium
from tests.inprocess import serving_in_process
from tests.test_ohif import OHIF_DIR, RENDERED, viewport_variance, wait_for_rendering
from tests.test_ohif import server_problems as ohif_problems
from tests.test_share_browser import SECRET_FORM, SETTINGS, Portal, X
from tests.test_viewer_api import Viewer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Response

pytestmark = [
    pytest.mark.slow,
    pytest.mark.interop,
    pytest.mark.skipif(
        not (OHIF_DIR / "index.html").is_file(),
        reason=f"no OHIF build in {OHIF_DIR} (./scripts/test fetches @ohif/app)",
    ),
]

WAIT_MS = 60_000
NOW = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)


def ct_study(patient_id: str, name: str, description: str) -> synthetic.StudySpec:
    study = synthetic.StudySpec(
        patient_id=patient_id,
        patient_name=name,
        study_description=description,
        accession_number=f"ACC{patient_id}",
        series=[synthetic.modality_preset("CT", rows=256, columns=256, instances=4)],
    )
    synthetic.assign_uids(study, 0)
    return study


def store(viewer: Viewer, study: synthetic.StudySpec) -> str:
    rng = np.random.default_rng(7)
    for index in range(study.series[0].instances):
        ds = synthetic.make_instance(study, 0, index, rng=rng)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert viewer.archive.pipeline.ingest(buffer.getvalue(), Source("import", site=X)).ok
    return str(study.study_uid)


@dataclass
class Studies:
    shared: str
    other: str


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    settings = {**SETTINGS, "IMAG_VIEWER_OHIF_DIR": str(OHIF_DIR)}
    workdir = tmp_path_factory.mktemp("imag")
    clock = FakeClock(NOW)
    with serving_in_process(workdir, settings=settings, clock=clock) as server:
        yield Portal(Viewer(server), clock)


@pytest.fixture(scope="module")
def studies(portal: Portal) -> Studies:
    shared = store(portal.viewer, ct_study("PSHARED", "SHARED^Alice", "SHARED CT"))
    other = store(portal.viewer, ct_study("POTHER", "OTHER^Bruno", "OTHER CT"))
    # both are the site's: its technician's own list has the two
    answer = portal.call("GET", "/dicom-web/studies")
    assert answer.status_code == 200 and len(answer.json()) == 2
    return Studies(shared, other)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with launched_chromium() as browser:
        yield browser


def server_problems(watch: PageWatch, origin: str) -> list:
    """test_ohif's list, but the browser's guess at a /favicon.ico on the share
    page (which names no icon)."""
    return [p for p in ohif_problems(watch, origin) if not p.url.endswith("/favicon.ico")]


def qido_answers(context: BrowserContext) -> list[Response]:
    """The study-level QIDO answers the browser received, as they come."""
    found: list[Response] = []

    def keep(response: Response) -> None:
        path = response.url.split("?", 1)[0]
        if path.endswith("/dicom-web/studies"):
            found.append(response)

    context.on("response", keep)
    return found


def listed(answers: list[Response]) -> set[str]:
    """The study UIDs the QIDO answers named."""
    uids = set()
    for response in answers:
        assert response.status in (200, 204), (response.url, response.status)
        if response.status == 200 and response.body():
            uids |= {item["0020000D"]["Value"][0] for item in json.loads(response.body())}
    return uids


def data_of(watch: PageWatch, study: str) -> list[tuple[str, int]]:
    """What the browser received about ``study`` from DICOMweb with a 2xx."""
    return [
        (url, status)
        for url, status in watch.responses
        if "/dicom-web/" in url and study in url and 200 <= status < 300
    ]


def dicomweb_answers(context: BrowserContext, study: str) -> list[Response]:
    """Every DICOMweb answer about ``study`` the browser receives."""
    found: list[Response] = []
    context.on(
        "response", lambda r: found.append(r) if "/dicom-web/" in r.url and study in r.url else None
    )
    return found


def said_something(response: Response) -> bool:
    """A 2xx answer with content: anything but an empty match list."""
    if not 200 <= response.status < 300 or response.status == 204:
        return False
    body = response.body()
    return bool(body.strip()) and body.strip() != b"[]"


def show_list(page: Page, url: str) -> None:
    page.goto(url, timeout=WAIT_MS)
    page.get_by_text("SHARED").first.wait_for(timeout=WAIT_MS)
    page.wait_for_load_state("networkidle", timeout=WAIT_MS)


def test_with_the_links_session_ohif_lists_and_shows_the_shared_study_only(
    portal: Portal, studies: Studies, chromium: Browser
) -> None:
    _, link = portal.link(studies.shared)
    context = chromium.new_context(viewport={"width": 1400, "height": 900}, locale="en-GB")
    watch = PageWatch().attach(context)
    answers = qido_answers(context)
    try:
        page = context.new_page()
        page.goto(link, timeout=WAIT_MS)  # the exchange: a session cookie, the secret gone
        assert page.url == portal.url + "/share/view"
        show_list(page, portal.url + "/viewer/")
        assert listed(answers) == {studies.shared}
        assert page.get_by_text("OTHER").count() == 0

        page.goto(f"{portal.url}/viewer/viewer?StudyInstanceUIDs={studies.shared}")
        variance, _ = wait_for_rendering(page)
        assert variance > RENDERED, f"the shared study stayed blank ({variance:.0f})"
        assert data_of(watch, studies.shared)
        assert data_of(watch, studies.other) == []
        assert server_problems(watch, portal.url) == []
    finally:
        context.close()


def test_with_the_secret_as_ohifs_token_the_shared_study_displays_and_nothing_else_comes(
    portal: Portal, studies: Studies, chromium: Browser
) -> None:
    """OHIF reads ``?token=`` on its viewer route (not on its study list, which
    the test above covers with the session): the study shows, the address
    loses the secret, and whatever OHIF asked the archive named this study only."""
    _, link = portal.link(studies.shared)
    secret = SECRET_FORM.search(link).group(1)  # type: ignore[union-attr]
    context = chromium.new_context(viewport={"width": 1400, "height": 900}, locale="en-GB")
    watch = PageWatch().attach(context)
    answers = qido_answers(context)
    try:
        page = context.new_page()
        page.goto(f"{portal.url}/viewer/viewer?StudyInstanceUIDs={studies.shared}&token={secret}")
        variance, _ = wait_for_rendering(page)
        assert variance > RENDERED, f"the shared study stayed blank ({variance:.0f})"
        page.wait_for_load_state("networkidle", timeout=WAIT_MS)
        assert secret not in page.url, "OHIF keeps the credential in the address bar"
        assert listed(answers) <= {studies.shared}
        assert data_of(watch, studies.shared) and data_of(watch, studies.other) == []
        assert server_problems(watch, portal.url) == []
    finally:
        context.close()


@pytest.mark.parametrize("credential", ["session", "token"])
def test_another_studys_uid_in_the_ohif_address_shows_nothing(
    portal: Portal, studies: Studies, chromium: Browser, credential: str
) -> None:
    _, link = portal.link(studies.shared)
    secret = SECRET_FORM.search(link).group(1)  # type: ignore[union-attr]
    context = chromium.new_context(viewport={"width": 1400, "height": 900}, locale="en-GB")
    about_other = dicomweb_answers(context, studies.other)
    try:
        page = context.new_page()
        address = f"{portal.url}/viewer/viewer?StudyInstanceUIDs={studies.other}"
        if credential == "session":
            page.goto(link, timeout=WAIT_MS)
        else:
            address += f"&token={secret}"
        with page.expect_response(
            lambda r: "/dicom-web/" in r.url and studies.other in r.url, timeout=WAIT_MS
        ):
            page.goto(address, timeout=WAIT_MS)
        page.wait_for_load_state("networkidle", timeout=WAIT_MS)
        assert about_other  # OHIF did ask for it
        assert [r.url for r in about_other if said_something(r)] == []
        variance, _ = viewport_variance(page)
        assert variance <= RENDERED
        assert page.get_by_text("OTHER").count() == 0
    finally:
        context.close()
