"""The mammography layout in a real headless Chromium (Playwright driving
Debian's chromium, as tests/test_share_browser.py does): a second reader
opens ``/share/view?layout=mammography&study=UID#token=...`` and sees the
current round and the most recent prior, each a row RCC LCC RMLO LMLO.

What is checked is what the reader sees: each of the eight cells holds the
image whose own attributes make it that view -- a screenshot of the cell
against the frame rendered here with numpy from the very pixels stored (the
DICOM linear window), mirrored when the image's Patient Orientation says
its chest wall is on the wrong side -- and not another view, nor the same
image unmirrored (asserted, so that the comparison means something); read
from the screenshot alone, each breast's chest wall faces the middle of its
pair (the test images draw the breast where their orientation says); the
labels; the prior chosen in the selector; an absent view's labelled empty
cell; a drag on a cell re-windows that cell (checked against numpy with the
window the drag makes) and no other.  The token leaves the address before
any request is made and is sent as a bearer, never in a URL.

The adversaries: a forged token in the fragment (the page says it cannot
be used, shows nothing, and the fragment is gone all the same); a share
link's session, which shows the study and no prior.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest
import requests
from PIL import Image

from tests.browser import PageWatch, launched_chromium
from tests.inprocess import serving_in_process
from tests.mammo_world import (
    COLUMNS,
    EXPECTED,
    IMAGES,
    ROUNDS,
    ROWS,
    SETTINGS,
    VIEWS,
    World,
    build,
    rendered,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

pytestmark = pytest.mark.slow

WAIT_MS = 60_000
#: mean absolute grey difference under which a cell shows the expected image
#: (JPEG quality 90 and the browser's enlargement stay well under it; any
#: other image of the world is far above: asserted in each comparison)
SAME = 4.0
PC = {"viewport": {"width": 1280, "height": 800}}
SECRET_FORM = re.compile(r"/share/([A-Za-z0-9_-]{43})$")
BY_KEY = {image.key: image for image in IMAGES}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serving_in_process(tmp_path_factory.mktemp("imag"), settings=SETTINGS) as server:
        yield build(server)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with launched_chromium() as browser:
        yield browser


def base(world: World) -> str:
    # localhost: a secure origin for Chromium, so a share's Secure cookie is kept
    return f"http://localhost:{world.server.http_port}"


def page_url(world: World, round_: str = "2026") -> str:
    return f"{base(world)}/share/view?layout=mammography&study={world.studies[round_]}"


# -- what a cell shows ---------------------------------------------------------------------------


def cell(page: Page, row: str, view: str) -> Locator:
    return page.locator(f'.cell[data-round="{row}"][data-view="{view}"]')


def cell_pixels(page: Page, row: str, view: str) -> np.ndarray:
    png = cell(page, row, view).locator("canvas").screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def difference(shot: np.ndarray, grey: np.ndarray, view: str) -> float:
    """The mean absolute difference between what the cell shows and ``grey``
    placed as the page places it: fitted, vertically centred, against the
    chest-wall side (the right edge for a right breast); a margin that is not
    black counts as the largest difference."""
    rows, columns = grey.shape
    height, width = shot.shape
    scale = min(width / columns, height / rows)
    w, h = round(columns * scale), round(rows * scale)
    left, top = (width - w if view.startswith("R") else 0), (height - h) // 2
    expected = np.asarray(Image.fromarray(grey).resize((w, h), Image.Resampling.BILINEAR))
    inside = shot[top + 1 : top + h - 1, left + 1 : left + w - 1]
    core = expected.astype(np.float64)[1:-1, 1:-1]
    size = (min(inside.shape[0], core.shape[0]), min(inside.shape[1], core.shape[1]))
    inside, core = inside[: size[0], : size[1]], core[: size[0], : size[1]]
    outside = shot.copy()
    outside[max(top - 1, 0) : top + h + 1, max(left - 1, 0) : left + w + 1] = 0
    return max(float(np.abs(inside - core).mean()), float(outside.mean()))


def assert_chest_wall_faces_the_middle(shot: np.ndarray, view: str) -> None:
    """Read from the pixels alone, whatever the API said: a right breast's
    chest wall (bright tissue up to the edge) is on the right of its image,
    its nipple side (air) on the left; a left breast the other way round."""
    height, width = shot.shape
    scale = min(width / COLUMNS, height / ROWS)
    w, h = round(COLUMNS * scale), round(ROWS * scale)
    left, top = (width - w if view.startswith("R") else 0), (height - h) // 2
    rows = slice(top + h // 4, top + 3 * h // 4)
    strips = {
        # the outer columns of the image, where the test images have no mark
        "left": shot[rows, left + 1 : left + 3].mean(),
        "right": shot[rows, left + w - 3 : left + w - 1].mean(),
    }
    chest, nipple = ("right", "left") if view.startswith("R") else ("left", "right")
    assert strips[chest] > 150 and strips[nipple] < 40, (view, strips)


def assert_round_shown(page: Page, row: str, round_: str) -> None:
    """Each cell of the row: its label, and the image expected there (mirrored
    as expected), not any other view of the round nor the image unmirrored."""
    expected = EXPECTED[round_]
    others = [v for v in expected.values() if v is not None]
    for view in VIEWS:
        here = cell(page, row, view)
        if expected[view] is None:
            assert here.get_attribute("data-state") == "absent"
            assert here.locator("figcaption").inner_text() == f"{view} — absent"
            continue
        key, flip = expected[view]
        assert here.get_attribute("data-state") == "drawn", (row, view)
        assert here.locator("figcaption").inner_text() == view
        shot = cell_pixels(page, row, view)
        assert_chest_wall_faces_the_middle(shot, view)
        assert difference(shot, rendered(BY_KEY[key], flip=flip), view) < SAME, (row, view)
        # the check tells images apart: the same image unmirrored (or wrongly
        # mirrored), and every other view of the round, are far from it
        assert difference(shot, rendered(BY_KEY[key], flip=not flip), view) > 2 * SAME
        for other, other_flip in others:
            if other != key:
                wrong = rendered(BY_KEY[other], flip=other_flip)
                assert difference(shot, wrong, view) > 2 * SAME, (row, view, other)


def assert_row_in_order(page: Page, row: str) -> None:
    """RCC LCC RMLO LMLO from left to right, each pair touching (back to back)."""
    boxes = [cell(page, row, view).bounding_box() for view in VIEWS]
    assert all(box is not None for box in boxes)
    xs = [box["x"] for box in boxes]  # type: ignore[index]
    assert xs == sorted(xs) and len(set(xs)) == 4
    rcc, lcc = boxes[0], boxes[1]
    assert abs(rcc["x"] + rcc["width"] - lcc["x"]) < 1  # type: ignore[index]


# -- 1. a reader with a token --------------------------------------------------------------------


def test_a_reader_sees_each_view_of_both_rounds_in_its_place_from_the_images_attributes(
    world: World, chromium: Browser
) -> None:
    token = world.tokens["l2"]
    context = chromium.new_context(locale="en-GB", **PC)
    watch = PageWatch().attach(context)
    sent: list[tuple[str, str]] = []
    context.on("request", lambda r: sent.append((r.url, r.headers.get("authorization", ""))))
    try:
        page = context.new_page()
        page.goto(page_url(world) + "#token=" + token, timeout=WAIT_MS)
        page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)

        # the token left the address at once and went only as a bearer
        assert page.url == page_url(world)
        assert page.evaluate("() => location.hash") == ""
        assert all(token not in url for url, _ in sent)
        api = [(url, auth) for url, auth in sent if "/api/view/" in url]
        assert len(api) == 1 + 8  # the layout, then one image per cell
        assert all(auth == f"Bearer {token}" for _, auth in api)
        assert page.evaluate("() => document.cookie") == ""

        assert page.locator("#patient-name").inner_text() == "DE VINCI RUTH"
        title = page.locator("#current-title").inner_text()
        assert title == f"10/03/2026 · {ROUNDS['2026'][0]} · {ROUNDS['2026'][4]}"
        assert ROUNDS["2024"][0] in page.locator("#prior-select").inner_text()
        assert_row_in_order(page, "current")
        assert_row_in_order(page, "prior")
        current_top = cell(page, "current", "RCC").bounding_box()["y"]  # type: ignore[index]
        assert cell(page, "prior", "RCC").bounding_box()["y"] > current_top  # type: ignore[index]

        assert_round_shown(page, "current", "2026")
        # the most recent prior by default: 2024, at the other site
        assert page.locator("#prior-select").input_value() == "0"
        assert_round_shown(page, "prior", "2024")

        # the older round, chosen in the selector: no LMLO, an empty labelled cell
        page.evaluate("() => { document.body.dataset.priorReady = 'waiting'; }")
        page.locator("#prior-select").select_option(index=1)
        page.wait_for_selector("body[data-prior-ready=true]", timeout=WAIT_MS)
        assert_round_shown(page, "prior", "2022")
        assert_round_shown(page, "current", "2026")  # the current row is left as it was
        assert [str(p) for p in watch.problems] == []
    finally:
        context.close()


def test_a_drag_on_a_cell_changes_that_cells_window_only(world: World, chromium: Browser) -> None:
    context = chromium.new_context(locale="en-GB", **PC)
    watch = PageWatch().attach(context)
    try:
        page = context.new_page()
        page.goto(page_url(world) + "#token=" + world.tokens["l2"], timeout=WAIT_MS)
        page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)
        untouched = cell_pixels(page, "current", "LCC")
        box = cell(page, "current", "RCC").locator("canvas").bounding_box()
        assert box is not None
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        # 128 pixels to the left: the window narrows by 128 x (4096 / 256) = 2048
        with page.expect_response(lambda r: "window=2048,2048" in r.url) as answer:
            page.mouse.move(x, y)
            page.mouse.down()
            page.mouse.move(x - 128, y, steps=1)
            page.mouse.up()
        assert answer.value.status == 200
        page.wait_for_selector(
            '.cell[data-round="current"][data-view="RCC"][data-window="2048,2048"]',
            timeout=WAIT_MS,
        )
        key, flip = EXPECTED["2026"]["RCC"]  # type: ignore[misc]
        shot = cell_pixels(page, "current", "RCC")
        narrow = rendered(BY_KEY[key], flip=flip, width=2048)
        assert difference(shot, narrow, "RCC") < SAME
        assert difference(shot, rendered(BY_KEY[key], flip=flip), "RCC") > 2 * SAME
        # the neighbour kept its own window
        assert np.abs(cell_pixels(page, "current", "LCC") - untouched).mean() < 1
        assert [str(p) for p in watch.problems] == []
    finally:
        context.close()


# -- 2. the adversaries --------------------------------------------------------------------------


def test_a_forged_token_shows_nothing_and_leaves_the_address_all_the_same(
    world: World, chromium: Browser
) -> None:
    context = chromium.new_context(locale="en-GB", **PC)
    watch = PageWatch().attach(context)
    try:
        page = context.new_page()
        forged = "imag_" + "A" * 43
        page.goto(page_url(world) + "#token=" + forged, timeout=WAIT_MS)
        page.wait_for_selector("#message:not([hidden])", timeout=WAIT_MS)
        assert "cannot be used" in page.locator("#message").inner_text()
        assert page.locator("#rounds").is_hidden()
        assert page.locator("canvas").count() == 0
        assert page.url == page_url(world) and forged not in page.url
        refused = [(p.url, p.status) for p in watch.problems if p.kind == "status"]
        layout = f"{base(world)}/api/view/mammography?study={world.studies['2026']}"
        assert refused == [(layout, 401)]
    finally:
        context.close()


def test_a_share_links_session_shows_the_study_and_no_prior(
    world: World, chromium: Browser
) -> None:
    made = requests.post(
        world.url + "/api/shares",
        json={"study_uid": world.studies["2026"]},
        headers={"Authorization": f"Bearer {world.tokens['manip.x']}"},
        timeout=30,
    )
    assert made.status_code == 201, made.text
    secret = SECRET_FORM.search(made.json()["url"]).group(1)  # type: ignore[union-attr]
    context = chromium.new_context(locale="en-GB", **PC)
    watch = PageWatch().attach(context)
    try:
        # the link exchanged for the session cookie (the context's own cookie jar)
        opened = context.request.get(f"{base(world)}/share/{secret}", max_redirects=0)
        assert opened.status == 303
        assert [c["name"] for c in context.cookies()] == ["imag_share"]
        page = context.new_page()
        page.goto(f"{base(world)}/share/view?layout=mammography", timeout=WAIT_MS)
        page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)
        assert_round_shown(page, "current", "2026")
        assert page.locator("#no-prior").is_visible()
        assert page.locator('.cell[data-round="prior"]').count() == 0
        assert [str(p) for p in watch.problems] == []
    finally:
        context.close()
