"""The sharing portal end to end, as the GP or the patient meets it: a user
creates a link with ``POST /api/shares``, the link is opened as it is in a
real headless Chromium (Playwright driving Debian's chromium, no request
rewritten), and the page shows the study.

What is checked is what the person sees: the first image (a screenshot of
the image area against the frame rendered here with numpy from the very file
stored, by the DICOM linear window formula, within a tolerance), the next
slices (wheel, arrow key), the lung preset, the report, the ZIP (opened with
zipfile and pydicom's FileSet), a session cookie that is HttpOnly, Secure and
SameSite=Strict with an address bar free of the secret; the second factor
and its lockout, the expired and revoked pages; the same on a phone.

The adversaries: wrong birth dates (tries left, then the locked page, and
the link stays locked), a link used after its expiry or its revocation (even
from a page already open), and the site's other study, never in the ZIP.

``localhost`` (not 127.0.0.1) is the address opened: Chromium treats it as a
secure origin, so it keeps the Secure cookie over plain HTTP.
"""

from __future__ import annotations

import io
import json
import re
import socket
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.fileset import FileSet

from archive.clock import FakeClock
from archive.identity import Source
from archive.synthetic import StudySpec, modality_preset, write_study
from tests.browser import PageWatch, launched_chromium
from tests.inprocess import serving_in_process
from tests.test_viewer_api import CONCLUSION, Viewer, _report_documents
from worklist.documents import to_bytes

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

pytestmark = pytest.mark.slow

X = "SITE-X"
MAX_ATTEMPTS = 3
SETTINGS = {
    "IMAG_SITES": json.dumps([{"name": X}, {"name": "SITE-Y"}]),
    "IMAG_LOG_LEVEL": "WARNING",
    "IMAG_SHARING_RATE_PER_MINUTE": "10000",
    "IMAG_SHARING_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
}
NOW = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)
BIRTH = "19580214"
SECRET_FORM = re.compile(r"/share/([A-Za-z0-9_-]{43})$")
#: generous: the machine may be busy (a page load, a render, a ZIP)
WAIT_MS = 60_000
#: mean absolute difference (grey levels, 0..255) under which a screenshot
#: is the expected rendering: JPEG (quality 90) and the browser's smoothing
#: when it enlarges the image stay well under it; another slice or another
#: window is far above (asserted below, so that the check means something)
SAME = 4.0

PC = {"viewport": {"width": 1280, "height": 800}}
PHONE = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}


def ct_study(patient: str) -> StudySpec:
    return StudySpec(
        patient_id=patient,
        patient_name="MARTIN^Louise",
        birth_date=BIRTH,
        study_description="SCANNER THORAX",
        study_date="20240301",
        series=[
            modality_preset("CT", rows=192, columns=256, instances=3, series_number=1),
            modality_preset("US", rows=48, columns=64, frames=3, series_number=2),
        ],
    )


def store(viewer: Viewer, spec: StudySpec, folder: Path) -> list[pydicom.Dataset]:
    """Write the study, mark each CT slice (a bright square that moves from
    slice to slice, as a lesion does, so that slices are told apart at a
    glance), store it with its report (an SR and an Encapsulated PDF made by
    the worklist): the CT slices as stored, in order."""
    slices = []
    for path in write_study(spec, folder):
        ds = pydicom.dcmread(path)
        if ds.Modality == "CT":
            pixels = ds.pixel_array.copy()
            left = 24 + 80 * (int(ds.InstanceNumber) - 1)
            pixels[72:120, left : left + 48] = 300 + 1024  # 300 HU, under the rescale
            ds.PixelData = pixels.tobytes()
            slices.append(ds)
        ds.save_as(path, enforce_file_format=True)
        assert viewer.archive.pipeline.ingest(path.read_bytes(), Source("import", site=X)).ok
    evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())[:2]]
    for ds in _report_documents(evidence):
        assert viewer.archive.pipeline.ingest(to_bytes(ds), Source("import", site=X)).ok
    return sorted(slices, key=lambda ds: int(ds.InstanceNumber))


@dataclass
class Shared:
    """The study stored at site X (with its report), the other study of the
    same site, and the CT slices as stored, in order."""

    study: str
    other: str
    slices: list[pydicom.Dataset]
    instances: set[str]


@dataclass
class Portal:
    viewer: Viewer
    clock: FakeClock

    @property
    def url(self) -> str:
        return f"http://localhost:{self.viewer.server.http_port}"

    def call(self, method: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.viewer.tokens['manip.x']}"}
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def link(self, study: str, **body: object) -> tuple[int, str]:
        """A link a technician of the site creates: its id and its URL."""
        answer = self.call("POST", "/api/shares", json={"study_uid": study, **body})
        assert answer.status_code == 201, answer.text
        url = answer.json()["url"]
        assert url.startswith(self.url + "/share/") and SECRET_FORM.search(url)
        return answer.json()["id"], url


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    assert "127.0.0.1" in {a[4][0] for a in socket.getaddrinfo("localhost", None)}
    clock = FakeClock(NOW)
    workdir = tmp_path_factory.mktemp("imag")
    with serving_in_process(workdir, settings=SETTINGS, clock=clock) as server:
        yield Portal(Viewer(server), clock)


@pytest.fixture(scope="module")
def shared(portal: Portal, tmp_path_factory: pytest.TempPathFactory) -> Shared:
    folder = tmp_path_factory.mktemp("studies")
    spec, other_spec = ct_study("PSHARE"), ct_study("POTHER")
    slices = store(portal.viewer, spec, folder / "a")
    store(portal.viewer, other_spec, folder / "b")
    study, other = str(spec.study_uid), str(other_spec.study_uid)
    instances = {
        str(row[0])
        for row in portal.viewer.db.query(
            "SELECT i.sop_instance_uid FROM instances i JOIN series se ON se.id = i.series_ref "
            "JOIN studies st ON st.id = se.study_ref WHERE st.study_uid = ?",
            (study,),
        )
    }
    assert len(slices) == 3 and len(instances) == 3 + 1 + 2  # CT, US cine, SR and PDF
    return Shared(study, other, slices, instances)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with launched_chromium() as browser:
        yield browser


# -- the expected rendering ------------------------------------------------------------------


def windowed(ds: pydicom.Dataset, center: float | None = None, width: float | None = None):
    """The frame as 8-bit grey: rescale, then the DICOM linear VOI (PS3.3
    C.11.2.1.2) with the stored window unless one is given."""
    values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c = float(ds.WindowCenter if center is None else center)
    w = float(ds.WindowWidth if width is None else width)
    scaled = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def drawn_box(image: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where the page draws an image of ``image`` (columns, rows) in a canvas
    of ``size``: fitted, centred (left, top, width, height)."""
    (columns, rows), (width, height) = image, size
    scale = min(width / columns, height / rows)
    w, h = round(columns * scale), round(rows * scale)
    return (width - w) // 2, (height - h) // 2, w, h


def image_area(page: Page) -> np.ndarray:
    """A screenshot of the image area, in grey, without the text overlays
    (hidden through the DOM: the page's CSP allows no injected style)."""
    page.evaluate("document.querySelectorAll('.overlay').forEach((e) => { e.hidden = true; })")
    try:
        png = page.locator("#canvas").screenshot()
    finally:
        page.evaluate("document.querySelectorAll('.overlay').forEach((e) => { e.hidden = false; })")
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def difference(shot: np.ndarray, grey: np.ndarray) -> float:
    """The mean absolute difference between the image the screenshot shows
    and ``grey`` enlarged as the page enlarges it, over the image itself (the
    black margins around it would water the measure down); a margin that is
    not black counts too, as the largest difference."""
    rows, columns = grey.shape
    left, top, w, h = drawn_box((columns, rows), (shot.shape[1], shot.shape[0]))
    expected = Image.fromarray(grey).resize((w, h), Image.Resampling.BILINEAR)
    inside = shot[top + 1 : top + h - 1, left + 1 : left + w - 1]
    core = np.asarray(expected, dtype=np.float64)[1:-1, 1:-1]
    outside = shot.copy()
    outside[top : top + h, left : left + w] = 0
    outside[0, :] = 0  # the toolbar's border line above the canvas
    margin = float(np.abs(outside).mean())
    return max(float(np.abs(inside - core).mean()), margin)


def canvas_sum(page: Page) -> int:
    return int(page.evaluate(CANVAS_SUM))


CANVAS_SUM = """() => {
  const c = document.getElementById('canvas');
  if (!c.width || !c.height) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = 0;
  for (let i = 0; i < d.length; i += 4) s = (s + d[i] * (i % 9973 + 1)) % 2147483647;
  return s;
}"""


def wait_redrawn(page: Page, before: int) -> None:
    """Until the canvas holds other pixels than ``before`` (no sleep: the page
    is polled for the condition)."""
    page.wait_for_function(f"(before) => ({CANVAS_SUM})() !== before", arg=before, timeout=WAIT_MS)


def wait_for_slice(page: Page, number: int) -> None:
    # a function, not an expression: Playwright re-evaluates an expression
    # with eval() at each poll, which the page's CSP (no 'unsafe-eval') refuses
    page.wait_for_function(
        "(n) => document.getElementById('canvas').dataset.drawn === n",
        arg=str(number),
        timeout=WAIT_MS,
    )


def open_link(context: BrowserContext, url: str) -> Page:
    page = context.new_page()
    page.goto(url, timeout=WAIT_MS)
    return page


def wait_ready(page: Page) -> None:
    page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)
    wait_for_slice(page, 1)
    wait_for_fit(page)


def wait_for_fit(page: Page) -> None:
    """Until the image is drawn at the image area's current size: the area
    may change size once the thumbnails and the report have come (the page
    then redraws), and a screenshot taken between the two is stretched."""
    page.wait_for_function(
        """() => {
            const c = document.getElementById('canvas'), v = document.getElementById('view');
            const r = window.devicePixelRatio || 1;
            return c.dataset.size === Math.round(v.clientWidth * r) + 'x'
                + Math.round(v.clientHeight * r);
        }""",
        timeout=WAIT_MS,
    )


def server_problems(watch: PageWatch) -> list[str]:
    """Every console error, page error, failed request or answer >= 400 (the
    page names its icon, so the browser does not guess at a /favicon.ico)."""
    return [str(p) for p in watch.problems]


# -- 1. open a link: image, slices, preset, report, ZIP, cookie ------------------------------


def first_image_and_slices(page: Page, shared: Shared) -> None:
    """The first image is the first slice; the wheel and ArrowDown show the
    next ones, each the slice it should be."""
    rendered = [windowed(ds) for ds in shared.slices]
    # the tolerance tells slices apart (else the checks below would prove nothing)
    shot = image_area(page)
    assert difference(shot, rendered[0]) < SAME
    assert difference(shot, rendered[1]) > 2 * SAME

    before = canvas_sum(page)
    box = page.locator("#canvas").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)
    wait_for_slice(page, 2)
    wait_redrawn(page, before)
    shot = image_area(page)
    assert difference(shot, rendered[1]) < SAME
    assert difference(shot, rendered[0]) > 2 * SAME

    before = canvas_sum(page)
    page.locator("#canvas").focus()
    page.keyboard.press("ArrowDown")
    wait_for_slice(page, 3)
    wait_redrawn(page, before)
    shot = image_area(page)
    assert difference(shot, rendered[2]) < SAME
    assert difference(shot, rendered[1]) > 2 * SAME


def test_a_link_opens_the_study_in_the_browser_as_its_recipient_sees_it(
    portal: Portal, shared: Shared, chromium: Browser, tmp_path: Path
) -> None:
    _, url = portal.link(shared.study, permissions=["view", "download"], audience="gp")
    secret = SECRET_FORM.search(url).group(1)  # type: ignore[union-attr]
    context = chromium.new_context(locale="en-GB", accept_downloads=True, **PC)
    watch = PageWatch().attach(context)
    try:
        page = open_link(context, url)
        wait_ready(page)
        # the secret was exchanged: the address holds none, the cookie is the session
        assert page.url == portal.url + "/share/view"
        assert secret not in page.url and secret not in page.evaluate("document.referrer")
        [cookie] = context.cookies()
        assert cookie["name"] == "imag_share" and cookie["value"] != secret
        assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
        assert "imag_share" not in page.evaluate("document.cookie")  # no script reads it

        assert page.locator("#patient-name").inner_text() == "MARTIN Louise"
        assert "SCANNER THORAX" in page.locator("#study-line").inner_text()
        assert page.locator(".thumb").count() == 2
        first_image_and_slices(page, shared)

        # the lung preset: the server renders that window and the page shows it
        lung = windowed(shared.slices[2], -600, 1500)
        assert difference(image_area(page), lung) > 2 * SAME
        before = canvas_sum(page)
        with page.expect_response(lambda r: "window=-600,1500" in r.url) as answer:
            page.get_by_role("button", name="Lung").click()
        assert answer.value.status == 200
        wait_redrawn(page, before)
        assert difference(image_area(page), lung) < SAME

        # the report: the SR's text on the page, the PDF behind its link
        assert page.locator("#report h2").inner_text() == "Report"
        assert CONCLUSION in page.locator("#report-body").inner_text()
        pdf_link = page.get_by_role("link", name="Open the report (PDF)")
        pdf = context.request.get(portal.url + pdf_link.get_attribute("href"))
        assert pdf.status == 200 and pdf.headers["content-type"] == "application/pdf"
        assert pdf.body().startswith(b"%PDF-")

        # the ZIP, as the browser saves it
        with page.expect_download(timeout=WAIT_MS) as download:
            page.locator("#download").click()
        assert download.value.suggested_filename == "IMAG-20240301-SCANNER-THORAX.zip"
        saved = tmp_path / "study.zip"
        download.value.save_as(saved)
        with zipfile.ZipFile(saved) as archive:
            assert archive.testzip() is None
            archive.extractall(tmp_path / "zip")
        fileset = FileSet(tmp_path / "zip" / "DICOMDIR")
        assert {instance.SOPInstanceUID for instance in fileset} == shared.instances
        for instance in fileset:
            ds = instance.load()
            assert ds.StudyInstanceUID == shared.study  # nothing of the other study
        ct = [i.load() for i in fileset if i.Modality == "CT"]
        assert len(ct) == 3
        for ds in ct:  # the very pixels stored
            stored = shared.slices[int(ds.InstanceNumber) - 1]
            assert np.array_equal(ds.pixel_array, stored.pixel_array)
        assert server_problems(watch) == []
    finally:
        context.close()


def test_on_a_phone_the_first_image_shows_and_the_wheel_or_a_key_scrolls(
    portal: Portal, shared: Shared, chromium: Browser
) -> None:
    _, url = portal.link(shared.study, audience="patient")
    context = chromium.new_context(locale="fr-FR", **PHONE)
    watch = PageWatch().attach(context)
    try:
        page = open_link(context, url)
        wait_ready(page)
        assert page.url == portal.url + "/share/view"
        # the phone layout: the image spans the screen's width
        box = page.locator("#canvas").bounding_box()
        assert box is not None and box["width"] >= 380
        assert page.locator("#download").is_hidden()  # the link allows viewing only
        first_image_and_slices(page, shared)
        assert CONCLUSION in page.locator("#report-body").inner_text()
        assert server_problems(watch) == []
    finally:
        context.close()


# -- 2. the second factor, the lockout, the expired and revoked pages ------------------------


def answer(page: Page, text: str) -> None:
    page.locator("#answer").fill(text)
    with page.expect_navigation(timeout=WAIT_MS):
        page.get_by_role("button", name="Valider / Submit").click()


def test_wrong_birth_dates_count_down_then_lock_the_link_for_good(
    portal: Portal, shared: Shared, chromium: Browser
) -> None:
    share_id, url = portal.link(shared.study, audience="patient", second_factor="birth_date")
    context = chromium.new_context(locale="en-GB", **PC)
    try:
        page = open_link(context, url)
        assert page.url == portal.url + "/share/verify"
        assert "Patient's birth date" in page.locator("label").inner_text()
        assert f"Tries left: {MAX_ATTEMPTS}" in page.content()
        for left in range(MAX_ATTEMPTS - 1, 0, -1):
            answer(page, "01/01/1970")
            assert "Wrong answer" in page.locator("h1").nth(1).inner_text()
            assert f"{left} try (tries) left" in page.inner_text("body")
        answer(page, "02/01/1970")
        body = page.inner_text("body")
        assert "This link is locked" in body
        assert "ask" in body and "for a new one" in body  # how to get a new link
        assert page.locator("#answer").count() == 0  # nothing more to try

        # the link stays locked, the right answer is no longer asked for
        page.goto(url, timeout=WAIT_MS)
        assert "This link is locked" in page.inner_text("body")
        # nothing of the study was shown meanwhile
        page.goto(portal.url + "/share/view", timeout=WAIT_MS)
        page.wait_for_selector("#message:not([hidden])", timeout=WAIT_MS)
        assert page.locator("#main").is_hidden()
        shown = portal.call("GET", f"/api/shares/{share_id}").json()
        assert shown["locked_at"] is not None
    finally:
        context.close()


def test_the_right_birth_date_on_a_fresh_link_opens_the_viewer(
    portal: Portal, shared: Shared, chromium: Browser
) -> None:
    _, url = portal.link(shared.study, audience="patient", second_factor="birth_date")
    context = chromium.new_context(locale="en-GB", **PC)
    try:
        page = open_link(context, url)
        # before the answer the session opens nothing
        assert context.request.get(portal.url + "/api/view/study").status == 401
        answer(page, "14/02/1958")
        assert page.url == portal.url + "/share/view"
        wait_ready(page)
        assert difference(image_area(page), windowed(shared.slices[0])) < SAME
    finally:
        context.close()


def test_an_expired_link_lands_on_a_page_that_says_so_and_whom_to_ask(
    portal: Portal, shared: Shared, chromium: Browser
) -> None:
    _, url = portal.link(shared.study, days=1)
    portal.clock.advance(2 * 24 * 3600)
    context = chromium.new_context(locale="en-GB", **PC)
    try:
        page = open_link(context, url)
        body = page.inner_text("body")
        assert "This link has expired" in body and "Ce lien a expiré" in body
        assert "for a new one" in body
        assert context.cookies() == []  # no session for an expired link
    finally:
        context.close()


def test_a_revoked_link_lands_on_its_page_and_an_open_viewer_stops(
    portal: Portal, shared: Shared, chromium: Browser
) -> None:
    share_id, url = portal.link(shared.study)
    context = chromium.new_context(locale="en-GB", **PC)
    try:
        page = open_link(context, url)
        wait_ready(page)
        assert portal.call("DELETE", f"/api/shares/{share_id}").status_code == 200
        # the page already open: a reload says the link cannot be used
        page.reload(timeout=WAIT_MS)
        page.wait_for_selector("#message:not([hidden])", timeout=WAIT_MS)
        assert "cannot be used" in page.locator("#message").inner_text()
        assert page.locator("#main").is_hidden()
        # the link itself: the revoked page
        page.goto(url, timeout=WAIT_MS)
        body = page.inner_text("body")
        assert "This link was revoked" in body and "for a new one" in body
    finally:
        context.close()
