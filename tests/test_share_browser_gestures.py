"""The share viewer's gestures, in a real headless Chromium, on the study and
the server of :mod:`tests.test_share_browser` (its fixtures and helpers are
imported, so that both files check one page the same way).

What the person does and what they must see: a left-button drag sets a free
window (the image asked for carries the new ``window=`` and the screenshot is
the frame windowed so, by the DICOM formula computed here); Ctrl+wheel
enlarges the image about its centre and a right-button drag moves it (each
screenshot against the frame enlarged and shifted here); the multi-frame
ultrasound plays by itself after Play and stops on Pause (the page's clock is
Playwright's, advanced by the test: no sleep); on a phone, a one-finger
vertical swipe with the Pan tool goes to the next or previous slice.

The adversary of each check is the state before the gesture: every expected
image is also shown to be far from what the page would show had the gesture
done nothing, so that a gesture ignored fails.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from tests import test_share_browser as base
from tests.browser import PageWatch
from tests.test_share_browser import (
    PC,
    PHONE,
    SAME,
    WAIT_MS,
    Portal,
    Shared,
    canvas_sum,
    difference,
    image_area,
    open_link,
    server_problems,
    wait_for_slice,
    wait_ready,
    wait_redrawn,
    windowed,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

#: that file's module fixtures, under their names: one server, one stored study
portal, shared, chromium = base.portal, base.shared, base.chromium

pytestmark = pytest.mark.slow


def centre(page: Page) -> tuple[float, float]:
    """The middle of the image area, in CSS pixels of the page."""
    box = page.locator("#canvas").bounding_box()
    assert box is not None
    return round(box["x"] + box["width"] / 2), round(box["y"] + box["height"] / 2)


def shown(grey: np.ndarray, size: tuple[int, int], zoom: float, pan: tuple[int, int]) -> np.ndarray:
    """What a canvas of ``size`` (width, height) shows of ``grey`` fitted,
    enlarged ``zoom`` times about its centre and moved by ``pan`` pixels:
    viewer.js's ``draw``, computed independently with PIL."""
    (width, height), (rows, columns) = size, grey.shape
    scale = min(width / columns, height / rows) * zoom
    w, h = round(columns * scale), round(rows * scale)
    left, top = round((width - w) / 2 + pan[0]), round((height - h) / 2 + pan[1])
    canvas = Image.new("L", (width, height), 0)
    canvas.paste(Image.fromarray(grey).resize((w, h), Image.Resampling.BILINEAR), (left, top))
    return np.asarray(canvas, dtype=np.float64)


def apart(shot: np.ndarray, expected: np.ndarray) -> float:
    """Mean absolute difference over the whole canvas, its border pixels
    left out (the toolbar's line above it, the edge's antialiasing)."""
    return float(np.abs(shot[2:-2, 2:-2] - expected[2:-2, 2:-2]).mean())


# -- window/level by dragging ---------------------------------------------------------------


def test_a_left_button_drag_sets_a_free_window_that_the_server_renders(
    portal: Portal, shared: Shared, chromium: Browser
) -> None:
    _, url = portal.link(shared.study, audience="gp")
    context = chromium.new_context(locale="en-GB", **PC)
    watch = PageWatch().attach(context)
    try:
        page = open_link(context, url)
        wait_ready(page)
        ds = shared.slices[0]
        assert difference(image_area(page), windowed(ds)) < SAME
        # one move of (dx, dy): width += dx, centre += dy, each times width / 256
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        speed = max(1.0, width / 256)
        dx, dy = -128, -32  # narrower and lower: more contrast
        new_center, new_width = center + dy * speed, width + dx * speed
        expected_query = f"window={round(new_center)},{round(new_width)}"

        x, y = centre(page)
        before = canvas_sum(page)
        page.mouse.move(x, y)
        with page.expect_response(lambda r: expected_query in r.url, timeout=WAIT_MS) as answer:
            page.mouse.down()
            page.mouse.move(x + dx, y + dy)
            page.mouse.up()
        assert answer.value.status == 200
        wait_redrawn(page, before)
        shot = image_area(page)
        assert difference(shot, windowed(ds, new_center, new_width)) < SAME
        assert difference(shot, windowed(ds)) > 2 * SAME  # the drag did change the image
        assert (
            f"W {round(new_width)}  L {round(new_center)}"
            in page.locator("#overlay-right").inner_text()
        )
        assert page.locator("#canvas").get_attribute("data-drawn") == "1"  # same slice
        assert server_problems(watch) == []
    finally:
        context.close()


# -- zoom and pan ---------------------------------------------------------------------------


def test_ctrl_wheel_enlarges_the_image_about_its_centre_and_a_right_drag_moves_it(
    portal: Portal, shared: Shared, chromium: Browser
) -> None:
    _, url = portal.link(shared.study, audience="gp")
    context = chromium.new_context(locale="en-GB", **PC)
    watch = PageWatch().attach(context)
    try:
        page = open_link(context, url)
        wait_ready(page)
        grey = windowed(shared.slices[0])
        first = image_area(page)
        size = (first.shape[1], first.shape[0])
        assert apart(first, shown(grey, size, 1, (0, 0))) < SAME

        # five notches towards the screen with Ctrl held: 1.1 each (viewer.js)
        notches = 5
        zoom = 1.1**notches
        client = page.evaluate(
            "[document.getElementById('view').clientWidth, "
            "document.getElementById('view').clientHeight]"
        )
        bucket = [min(max(64, math.ceil(n * zoom / 64) * 64), 4096) for n in client]
        sharper = f"viewport={bucket[0]},{bucket[1]}"
        x, y = centre(page)
        page.mouse.move(x, y)
        before = canvas_sum(page)
        with page.expect_response(lambda r: sharper in r.url, timeout=WAIT_MS) as answer:
            page.keyboard.down("Control")
            for _ in range(notches):
                page.mouse.wheel(0, -120)
            page.keyboard.up("Control")
        assert answer.value.status == 200  # an image asked for at the enlarged size
        wait_redrawn(page, before)
        zoomed = image_area(page)
        assert apart(zoomed, shown(grey, size, zoom, (0, 0))) < SAME
        assert apart(zoomed, first) > 2 * SAME
        assert page.locator("#canvas").get_attribute("data-drawn") == "1"  # no slice change

        # a right-button drag moves the enlarged image by as many pixels
        dx, dy = 150, -90
        before = canvas_sum(page)
        page.mouse.down(button="right")
        page.mouse.move(x + dx, y + dy)
        page.mouse.up(button="right")
        wait_redrawn(page, before)
        moved = image_area(page)
        assert apart(moved, shown(grey, size, zoom, (dx, dy))) < SAME
        assert apart(moved, zoomed) > 2 * SAME
        assert page.locator("#canvas").get_attribute("data-drawn") == "1"
        assert server_problems(watch) == []
    finally:
        context.close()


# -- cine -----------------------------------------------------------------------------------


def test_the_multiframe_ultrasound_plays_by_itself_and_stops_on_pause(
    portal: Portal, shared: Shared, chromium: Browser
) -> None:
    _, url = portal.link(shared.study, audience="gp")
    context = chromium.new_context(locale="en-GB", **PC)
    watch = PageWatch().attach(context)
    try:
        page = context.new_page()
        page.clock.install()  # the page's timers run when the test says so
        page.goto(url, timeout=WAIT_MS)
        wait_ready(page)
        study = context.request.get(portal.url + "/api/view/study").json()
        [us] = [s for s in study["series"] if s["modality"] == "US"]
        [cine] = context.request.get(portal.url + us["url"]).json()["instances"]
        assert cine["frames"] == 3
        tick = cine["frame_time_ms"]
        assert tick == pytest.approx(33.3)

        before = canvas_sum(page)  # the first CT slice
        page.locator(".thumb", has_text="US").click()
        page.wait_for_function(
            "() => document.getElementById('overlay-left').innerText.startsWith('US')",
            timeout=WAIT_MS,
        )
        wait_redrawn(page, before)  # the first frame (data-drawn was already 1)
        wait_for_slice(page, 1)
        play = page.locator("#play")
        assert play.is_visible()
        page.clock.pause_at(page.evaluate("Date.now()") + 1000)

        play.click()
        assert play.inner_text() == "Pause"
        first = image_area(page)
        sums = [canvas_sum(page)]
        for frame in (2, 3, 1):  # one frame time each, then back to the first
            page.clock.run_for(round(tick) + 1)
            wait_for_slice(page, frame)
            sums.append(canvas_sum(page))
            overlay = page.locator("#overlay-left").inner_text()
            assert f"Image {frame} / 3" in overlay
        assert len(set(sums[:3])) == 3  # three different frames were drawn
        # the first frame again: not compared pixel for pixel, as Chromium may
        # have moved the canvas from the GPU to the CPU (after reads) meanwhile
        assert apart(image_area(page), first) < SAME

        play.click()
        assert play.inner_text() == "Play"
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        page.clock.run_for(round(tick) * 30)  # a second of stillness
        assert page.locator("#overlay-left").inner_text().endswith("Image 1 / 3")
        assert page.locator("#canvas").get_attribute("data-drawn") == "1"
        assert canvas_sum(page) == sums[-1]  # not drawn again
        assert asked == []
        assert server_problems(watch) == []
    finally:
        context.close()


# -- touch ----------------------------------------------------------------------------------


def swipe(page: Page, steps: list[int]) -> None:
    """One finger down in the middle of the image, moved vertically by each
    of ``steps`` (CSS pixels) in turn, then lifted: Chromium turns the touch
    events into the pointer events viewer.js listens to (Playwright has no
    swipe of its own)."""
    cdp = page.context.new_cdp_session(page)
    try:
        x, y = centre(page)
        cdp.send(
            "Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]}
        )
        for step in steps:
            y += step
            cdp.send(
                "Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]}
            )
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    finally:
        cdp.detach()


def test_on_a_phone_a_vertical_swipe_with_the_pan_tool_changes_the_slice(
    portal: Portal, shared: Shared, chromium: Browser
) -> None:
    _, url = portal.link(shared.study, audience="patient")
    context = chromium.new_context(locale="en-GB", **PHONE)
    watch = PageWatch().attach(context)
    try:
        page = open_link(context, url)
        wait_ready(page)
        rendered = [windowed(ds) for ds in shared.slices]
        page.locator("[data-tool=pan]").tap()
        assert "active" in (page.locator("[data-tool=pan]").get_attribute("class") or "")

        before = canvas_sum(page)
        swipe(page, [-15, -15, -10])  # 40 pixels up: one slice on
        wait_for_slice(page, 2)
        wait_redrawn(page, before)
        shot = image_area(page)
        assert difference(shot, rendered[1]) < SAME  # the next slice, not moved
        assert difference(shot, rendered[0]) > 2 * SAME

        before = canvas_sum(page)
        swipe(page, [-30, -30])  # a longer swipe: two steps on, stops at the last
        wait_for_slice(page, 3)
        wait_redrawn(page, before)
        assert difference(image_area(page), rendered[2]) < SAME

        before = canvas_sum(page)
        swipe(page, [30])  # down: one slice back
        wait_for_slice(page, 2)
        wait_redrawn(page, before)
        assert difference(image_area(page), rendered[1]) < SAME
        assert server_problems(watch) == []
    finally:
        context.close()
