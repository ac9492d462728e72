"""Fixtures for the widget's browser tests: the stub gateway, and Debian's Chromium driven by
Playwright. Playwright never downloads a browser here (no internet): it runs /usr/bin/chromium
(or $CHROMIUM), installed by scripts/ensure-chromium.sh when missing; without it the browser tests
skip with the script's reason.

All async tests and fixtures here share the session's event loop, so one browser serves the whole
session; every test gets a fresh browser context (its own storage) and its own stub server.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Dialog, Page, async_playwright

from tests.e2e.widget_stub import KeyConfig, WidgetStub, serve_stub

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ENSURE_CHROMIUM = REPO / "scripts" / "ensure-chromium.sh"
INSTALL_TIMEOUT = 600  # seconds for apt-get on a fresh machine
IDENTITY_SECRET = "test-identity-secret"
# A host page on another origin than the gateway (CORS is exercised), still on loopback.
SHOP_HOST = "shop.test"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",  # we run as root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--host-resolver-rules=MAP {SHOP_HOST} 127.0.0.1",
]


def _chromium_usable() -> bool:
    return os.access(CHROMIUM, os.X_OK)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The browser test that installs Chromium needs longer than the suite's 60 s per test; only
    when it is missing, so a hang still fails fast on a machine that has it."""
    if _chromium_usable():
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents and "chromium_executable" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(INSTALL_TIMEOUT + 60))


@pytest.fixture(autouse=True)
def _test_cleanup() -> list[str]:
    """Replaces the suite-wide Redis cleanup: these tests use no Redis and must not start one."""
    return []


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """Debian's Chromium; installed once per session (under a lock: xdist workers) if missing."""
    if not _chromium_usable():
        lock_path = Path(tempfile.gettempdir()) / "chat-widget-ensure-chromium.lock"
        with lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            reason = "ensure-chromium.sh did not run"
            if not _chromium_usable():
                try:
                    result = subprocess.run(
                        [str(ENSURE_CHROMIUM)],
                        env={**os.environ, "CHROMIUM": CHROMIUM},
                        capture_output=True,
                        text=True,
                        timeout=INSTALL_TIMEOUT,
                        check=False,
                    )
                    lines = (result.stderr or result.stdout).strip().splitlines()
                    reason = lines[-1] if lines else f"exit status {result.returncode}"
                except (OSError, subprocess.TimeoutExpired) as exc:
                    reason = str(exc)
        if not _chromium_usable():
            pytest.skip(f"no Chromium at {CHROMIUM} for the browser tests: {reason}")
    return CHROMIUM


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser(chromium_executable: str) -> AsyncIterator[Browser]:
    # Playwright gives every launch a fresh temporary user-data-dir (removed on close).
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_executable, headless=True, args=LAUNCH_ARGS, timeout=30_000
        )
        yield browser
        await browser.close()


@pytest.fixture
def widget_stub() -> WidgetStub:
    return WidgetStub(
        {
            "pk_demo": KeyConfig(title="Harbor & Pine"),
            "pk_signed": KeyConfig(title="Account help", identity_secret=IDENTITY_SECRET),
        }
    )


@pytest_asyncio.fixture(loop_scope="session")
async def stub_url(widget_stub: WidgetStub) -> AsyncIterator[str]:
    """The running stub's base URL (``http://127.0.0.1:PORT``)."""
    async with serve_stub(widget_stub) as url:
        yield url


@dataclass
class PageLog:
    requests: list[str] = field(default_factory=list)  # every URL the page requested
    errors: list[str] = field(default_factory=list)  # uncaught exceptions (fail the test)
    console: list[str] = field(default_factory=list)  # console errors and warnings
    dialogs: list[str] = field(default_factory=list)  # alert/confirm/prompt (dismissed)


@pytest.fixture
def page_log() -> PageLog:
    return PageLog()


@pytest_asyncio.fixture(loop_scope="session")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(5_000)
    context.set_default_navigation_timeout(10_000)
    yield context
    await context.close()


@pytest_asyncio.fixture(loop_scope="session")
async def page(context: BrowserContext, page_log: PageLog) -> AsyncIterator[Page]:
    page = await context.new_page()
    page.on("request", lambda request: page_log.requests.append(request.url))
    page.on("pageerror", lambda exc: page_log.errors.append(f"uncaught: {exc}"))
    page.on(
        "console",
        lambda msg: page_log.console.append(msg.text) if msg.type in {"error", "warning"} else None,
    )

    async def on_dialog(dialog: Dialog) -> None:
        page_log.dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    yield page
    assert not page_log.errors, f"the page logged errors: {page_log.errors}"


@pytest.fixture
def shop_origin(stub_url: str) -> str:
    """The stub under another origin (``http://shop.test:PORT``) for cross-origin host pages."""
    return stub_url.replace("127.0.0.1", SHOP_HOST)
