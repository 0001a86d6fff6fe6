"""A real browser for tests: Playwright driving Debian's Chromium.

``playwright install`` (a browser download) is neither needed nor wanted:
``scripts/test`` installs the ``chromium`` package and Playwright launches
that executable by its absolute path (``IMAG_TEST_CHROMIUM`` to use another).
Headless, software WebGL (SwiftShader), so that WebGL viewers render on a
machine with no GPU and no display.

:class:`PageWatch` records what a page did wrong: console errors, uncaught
exceptions, requests that failed or were answered >= 400; a test asserts on
the part it can attribute to the server.  :func:`screenshot_variance` tells a
rendered image from a blank or uniform canvas.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("IMAG_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",  # as root in a container the sandbox cannot start
    "--use-angle=swiftshader",  # WebGL without a GPU
    "--enable-unsafe-swiftshader",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
]

try:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Page,
        Request,
        Response,
        sync_playwright,
    )
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None  # type: ignore[assignment]


def chromium_missing() -> str | None:
    """Why no browser test can run here (None: they can)."""
    if sync_playwright is None:
        return "playwright is not installed (pip install -e '.[test]')"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} not found (apt-get install chromium; ./scripts/test does)"
    return None


@contextmanager
def launched_chromium() -> Iterator[Browser]:
    """Headless Chromium for a block; the test is skipped (with the reason)
    where there is none.  A module's fixture starts it once (a few hundred
    milliseconds) and each test opens its own context, e.g.::

        @pytest.fixture(scope="module")
        def chromium() -> Iterator[Browser]:
            with launched_chromium() as browser:
                yield browser
    """
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Problem:
    kind: str  # "console", "pageerror", "requestfailed", "status"
    text: str
    url: str = ""
    status: int = 0

    def __str__(self) -> str:
        where = f" {self.url}" if self.url else ""
        status = f" -> {self.status}" if self.status else ""
        return f"[{self.kind}]{where}{status}: {self.text}"[:600]


@dataclass
class PageWatch:
    """Everything that went wrong in one browser context, in order."""

    problems: list[Problem] = field(default_factory=list)
    #: every request URL and its status, for a test to check what was asked
    responses: list[tuple[str, int]] = field(default_factory=list)

    def attach(self, context: BrowserContext) -> PageWatch:
        context.on("page", self._watch_page)
        for page in context.pages:
            self._watch_page(page)
        context.on("response", self._on_response)
        context.on("requestfailed", self._on_request_failed)
        return self

    def _watch_page(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.problems.append(Problem("pageerror", str(error))))

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            location = message.location or {}
            self.problems.append(Problem("console", message.text, location.get("url", "")))

    def _on_response(self, response: Response) -> None:
        self.responses.append((response.url, response.status))
        if response.status >= 400:
            self.problems.append(
                Problem("status", response.status_text, response.url, response.status)
            )

    def _on_request_failed(self, request: Request) -> None:
        self.problems.append(Problem("requestfailed", request.failure or "", request.url))

    def clear(self) -> None:
        self.problems.clear()
        self.responses.clear()


def screenshot_variance(png: bytes) -> float:
    """The variance of the grey levels of a screenshot: near 0 for a blank or
    uniform area, large for an image with structure."""
    from PIL import Image

    grey = Image.open(io.BytesIO(png)).convert("L")
    values = list(grey.getdata())
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)
