"""The viewer page (``/share/view``) and its own files: nothing from another
origin, no inline script (the CSP is ``default-src 'self'``), files found in
a table and never by path; and, in a real headless Chromium (Playwright with
Debian's chromium), the page shows a study the caller may see: the first
image, the next slice with the arrow key, the lung preset, the report's
text, on a PC-sized and a phone-sized screen, without a console error (a
CSP violation is one)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.browser import PageWatch, launched_chromium, screenshot_variance
from tests.inprocess import serving_in_process
from tests.test_viewer_api import SETTINGS, Viewer, X, ct_and_us

STATIC = Path(__file__).resolve().parent.parent / "viewer_api" / "static"


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    with serving_in_process(tmp_path_factory.mktemp("imag"), settings=SETTINGS) as server:
        yield Viewer(server)


@pytest.fixture(scope="module")
def study(viewer: Viewer, tmp_path_factory: pytest.TempPathFactory) -> str:
    return viewer.store(ct_and_us("PAGE"), X, tmp_path_factory.mktemp("s"), report=True)


def test_the_page_is_public_and_says_the_browser_may_load_from_this_origin_only(viewer) -> None:
    answer = requests.get(viewer.server.url + "/share/view", timeout=30)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    policy = answer.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    # every script has a src on this origin: no inline script to allow
    scripts = re.findall(r"<script\b[^>]*>", answer.text)
    assert scripts and all('src="/share/static/' in s for s in scripts)
    assert "style=" not in answer.text and "<style" not in answer.text


def test_the_page_and_its_files_name_no_other_origin(viewer) -> None:
    page = requests.get(viewer.server.url + "/share/view", timeout=30).text
    linked = re.findall(r'(?:src|href)="(/share/static/[^"]+)"', page)
    assert {Path(p).name for p in linked} == {"viewer.js", "viewer.css", "icon.svg"}
    bodies = [page] + [requests.get(viewer.server.url + p, timeout=30).text for p in linked]
    assert bodies[1:] == [(STATIC / Path(p).name).read_text() for p in linked]
    for body in bodies:
        body = body.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, never fetched
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", body, re.I)
        assert not re.search(r"@import|\burl\(", body)  # CSS fetching anything


@pytest.mark.parametrize(
    "path", ["/share/static/nothing.js", "/share/static/..%2Fpage.py", "/share/static/%2e%2e"]
)
def test_no_path_reaches_past_the_static_files(viewer, path) -> None:
    answer = requests.get(viewer.server.url + path, timeout=30)
    assert answer.status_code == 404
    assert b"import" not in answer.content


# -- a real browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    with launched_chromium() as browser:
        yield browser


def drawn_variance(page) -> float:
    return screenshot_variance(page.locator("#view").screenshot())


@pytest.mark.slow
@pytest.mark.parametrize(
    "screen", [{"width": 1280, "height": 800}, {"width": 390, "height": 844}], ids=["pc", "phone"]
)
def test_the_page_shows_the_study_scrolls_windows_and_reads_the_report(
    viewer, study, chromium, screen
) -> None:
    context = chromium.new_context(
        viewport=screen,
        extra_http_headers={"Authorization": f"Bearer {viewer.tokens['manip.x']}"},
        locale="fr-FR",
        has_touch=screen["width"] < 500,
    )
    watch = PageWatch().attach(context)
    page = context.new_page()
    # an ordinary user names the study to the API; a share link's session
    # does not need to (the page itself never reads it from its URL)
    page.route(
        "**/api/view/study",
        lambda route: route.continue_(url=route.request.url + f"?study={study}"),
    )
    try:
        page.goto(viewer.server.url + "/share/view")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        assert page.locator("#patient-name").inner_text() == "DUPONT Hélène"
        assert "SCANNER THORAX" in page.locator("#study-line").inner_text()
        assert page.locator("#download").is_hidden()  # a technician may not download
        assert page.locator(".thumb").count() == 2
        page.wait_for_function("document.getElementById('canvas').dataset.drawn === '1'")
        assert drawn_variance(page) > 20
        assert "Compte rendu" in page.locator("#report").inner_text()  # French UI
        assert "Examen sans anomalie" in page.locator("#report-body").inner_text()

        page.locator("#canvas").focus()
        page.keyboard.press("ArrowDown")
        page.wait_for_function("document.getElementById('canvas').dataset.drawn === '2'")

        with page.expect_response(lambda r: "window=-600,1500" in r.url) as lung:
            page.get_by_role("button", name="Poumon").click()
        assert lung.value.status == 200
        # the image is asked at the size it is shown (64-pixel buckets), not in full
        asked = [
            tuple(int(v) for v in re.search(r"viewport=(\d+),(\d+)", url).groups())  # type: ignore[union-attr]
            for url, _ in watch.responses
            if "/frames/" in url and "viewport=128,128" not in url
        ]
        assert asked and all(w <= screen["width"] + 64 and h <= screen["height"] for w, h in asked)

        page.locator("#lang").click()
        assert page.locator("#report h2").inner_text() == "Report"
        assert [str(p) for p in watch.problems] == []
    finally:
        context.close()


@pytest.mark.slow
def test_without_a_session_the_page_says_the_link_cannot_be_used(viewer, chromium) -> None:
    context = chromium.new_context(viewport={"width": 800, "height": 600}, locale="en-GB")
    page = context.new_page()
    try:
        page.goto(viewer.server.url + "/share/view")
        page.wait_for_selector("#message:not([hidden])", timeout=30_000)
        assert "cannot be used" in page.locator("#message").inner_text()
        assert page.locator("#main").is_hidden()
    finally:
        context.close()
