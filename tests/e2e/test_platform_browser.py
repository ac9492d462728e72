"""The widget in headless Chromium against the real platform (gateway, workers, AI worker with
the fake model): open the demo page, send a message, see the reply, reload, see the history."""

from __future__ import annotations

import pytest
from playwright.async_api import Page, expect

from devstack.platform import Platform
from tests.e2e.test_widget import Widget, text_of
from tests.platform_fixtures import fake_llm, platform

pytestmark = pytest.mark.asyncio(loop_scope="session")

__all__ = ["fake_llm", "platform"]


async def test_chat_on_the_demo_page_of_the_running_platform(
    page: Page, platform: Platform
) -> None:
    await page.goto(f"{platform.url}/demo/{platform.demo['public_key']}")
    widget = Widget(page)
    await widget.open()
    await widget.send("Do you have decaf?")
    await expect(widget.mine).to_have_count(1)
    await expect(widget.replies).to_have_count(1, timeout=15_000)
    assert await text_of(widget.replies.first) == "bot: Do you have decaf?"
    visitor = await widget.visitor_id()

    await page.reload()
    widget = Widget(page)
    await widget.open()
    await expect(widget.all_texts).to_have_count(2)
    assert [await text_of(t) for t in await widget.all_texts.all()] == [
        "Do you have decaf?",
        "bot: Do you have decaf?",
    ]
    assert await widget.visitor_id() == visitor
