"""Debian's chromium driven by Playwright: one browser per test module, a fresh context (viewport, language) per page."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
skip_without_chromium = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless chromium for the duration of the block."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def new_page(browser, url: str, width: int = 1366, height: int = 768, locale: str = "en-US") -> Iterator:
    """A page in its own context (own storage), at this size and language, with the app loaded."""
    ctx = browser.new_context(viewport={"width": width, "height": height}, locale=locale)
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url)
    pg.errors = errors
    try:
        yield pg
    finally:
        ctx.close()


@contextlib.contextmanager
def chromium_page(url: str, **kw) -> Iterator:
    """One browser and one page, for a test that needs nothing more."""
    with chromium() as browser, new_page(browser, url, **kw) as pg:
        yield pg
