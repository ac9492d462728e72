"""The agent inbox in headless Chromium against the real platform (gateway, workers, AI worker
with the fake model, which answers "bot: <question>"): a visitor on the demo page and an agent in
the inbox, two pages of one browser. Every wait is a bounded Playwright expectation."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from playwright.async_api import BrowserContext, Locator, Page, Route, expect

from devstack.platform import Platform
from tests.e2e.conftest import PageLog
from tests.e2e.test_widget import Widget, text_of
from tests.pipeline.client import WidgetClient
from tests.platform_fixtures import fake_llm, platform

pytestmark = pytest.mark.asyncio(loop_scope="session")

__all__ = ["fake_llm", "platform"]

PIPELINE_MS = 15_000  # a message through debounce, the AI worker and the socket


class Inbox:
    def __init__(self, page: Page) -> None:
        self.page = page
        self.key = page.get_by_label("API key")
        self.sign_in = page.get_by_role("button", name="Sign in")
        self.sign_out = page.get_by_role("button", name="Sign out")
        self.signin_error = page.locator("#signin-error")
        self.pending = page.locator("#pending-list")
        self.open_list = page.locator("#open-list")
        self.status = page.locator("#conv-status")
        self.transcript = page.get_by_role("log", name="Messages")
        self.reply = page.get_by_label("Reply to the visitor")
        self.take_over = page.get_by_role("button", name="Take over")
        self.hand_back = page.get_by_role("button", name="Hand back to bot")
        self.resolve = page.get_by_role("button", name="Resolve")
        self.knowledge = page.locator("#kb-list li")

    def row(self, visitor: str, within: Locator | None = None) -> Locator:
        return (within or self.page).locator(f'button.conversation[data-external-id="{visitor}"]')

    def messages(self, role: str) -> Locator:
        return self.transcript.locator(f'.msg[data-role="{role}"]')

    async def signed_in_with(self, key: str) -> None:
        await self.key.fill(key)
        await self.key.press("Enter")
        await expect(self.sign_out).to_be_visible()


async def _inbox_page(context: BrowserContext, page_log: PageLog) -> Page:
    page = await context.new_page()
    page.on("pageerror", lambda exc: page_log.errors.append(f"inbox uncaught: {exc}"))
    page.on("request", lambda request: page_log.requests.append(request.url))
    return page


async def test_an_agent_takes_over_replies_and_hands_back_live(
    context: BrowserContext, page: Page, platform: Platform, page_log: PageLog
) -> None:
    # The agent signs in first; a wrong key shows the API's own message.
    agent_page = await _inbox_page(context, page_log)
    await agent_page.goto(f"{platform.url}/inbox")
    inbox = Inbox(agent_page)
    await expect(inbox.key).to_be_focused()
    await inbox.key.fill("cbk_not-a-key")
    await inbox.sign_in.click()
    await expect(inbox.signin_error).to_have_text("this API key is not valid or was revoked")
    await inbox.signed_in_with(platform.demo["admin_api_key"])

    # A visitor asks; the bot answers; the conversation appears in the inbox without a reload.
    await page.goto(f"{platform.url}/demo/{platform.demo['public_key']}")
    widget = Widget(page)
    await widget.open()
    await widget.send("Do you roast on Tuesdays?")
    await expect(widget.replies).to_have_text(
        ["bot: Do you roast on Tuesdays?"], timeout=PIPELINE_MS
    )
    visitor = await widget.visitor_id()
    row = inbox.row(visitor, within=inbox.open_list)
    await expect(row).to_be_visible(timeout=5_000)
    await row.click()
    await expect(inbox.status).to_have_text("Bot is answering")
    await expect(inbox.messages("user").locator(".text")).to_have_text(
        ["Do you roast on Tuesdays?"]
    )
    await expect(inbox.messages("assistant").locator(".text")).to_have_text(
        ["bot: Do you roast on Tuesdays?"]
    )
    await expect(inbox.knowledge.first).to_be_visible()  # the demo bot's knowledge base

    # Taken over: the conversation moves to "Needs a human"; the bot stays quiet.
    await inbox.take_over.click()
    await expect(inbox.status).to_have_text("A human is answering")
    await expect(inbox.take_over).to_be_disabled()
    await expect(inbox.row(visitor, within=inbox.pending)).to_be_visible(timeout=5_000)
    markup = "<b>Is anyone <i>there</i>?</b>"
    await widget.send(markup)
    question = inbox.messages("user").last.locator(".text")
    await expect(inbox.messages("user")).to_have_count(2, timeout=5_000)
    assert await text_of(question) == markup, "shown as text"
    assert await inbox.transcript.locator("b, i").count() == 0

    # The reply goes out through the pipeline to the visitor's widget; its ticks follow. The
    # first POST's answer is lost on the way back: the inbox retries with the same client id,
    # and the gateway stores and sends it once.
    client_ids: list[str] = []

    async def lose_the_first_answer(route: Route) -> None:
        client_ids.append(route.request.post_data_json["client_message_id"])
        response = await route.fetch()
        if len(client_ids) == 1:
            await route.abort("connectionreset")
        else:
            await route.fulfill(response=response)

    replies_url = re.compile(r"/api/v1/conversations/[^/]+/messages$")
    await agent_page.route(replies_url, lose_the_first_answer)
    await inbox.reply.fill("Hi, Ana here. Yes, every Tuesday.")
    await inbox.reply.press("Enter")
    await expect(inbox.reply).to_have_value("")
    await agent_page.unroute(replies_url)
    assert len(client_ids) == 2 and client_ids[0] == client_ids[1]
    assert re.fullmatch(r"[0-9a-f]{32}", client_ids[0])
    agent_said = page.locator('[data-chat-widget] .msg[data-role="agent"] .text')
    await expect(agent_said).to_have_text(
        ["Hi, Ana here. Yes, every Tuesday."], timeout=PIPELINE_MS
    )
    mine = inbox.messages("agent")
    await expect(mine).to_have_count(1)
    await expect(mine.locator(".tick")).to_have_attribute("data-status", "delivered", timeout=5_000)
    await expect(mine.locator(".tick")).to_contain_text("\u2713\u2713")
    assert await widget.replies.count() == 1, "the bot did not answer while a human had it"
    assert await agent_said.count() == 1, "the retried reply went out once"

    # Handed back: the bot answers the next question again, in the widget and in the inbox.
    await inbox.hand_back.click()
    await expect(inbox.status).to_have_text("Bot is answering")
    await expect(inbox.row(visitor, within=inbox.open_list)).to_be_visible(timeout=5_000)
    await widget.send("And decaf?")
    await expect(widget.replies).to_have_count(2, timeout=PIPELINE_MS)
    assert await text_of(widget.replies.last) == "bot: And decaf?"
    await expect(inbox.messages("assistant").locator(".text")).to_have_text(
        ["bot: Do you roast on Tuesdays?", "bot: And decaf?"], timeout=5_000
    )
    # keyed by id: nothing was drawn twice while polls overlapped the send
    ids = await inbox.transcript.locator(".msg").evaluate_all("els => els.map(e => e.dataset.id)")
    assert len(ids) == len(set(ids)) == 6  # 3 questions, 2 bot answers, 1 reply

    await inbox.resolve.click()
    await expect(inbox.status).to_have_text("Resolved")
    await expect(inbox.reply).to_be_disabled()

    # Signing out forgets the key; it never was in a URL.
    await inbox.sign_out.click()
    await expect(inbox.key).to_be_visible()
    assert await agent_page.evaluate("() => sessionStorage.length") == 0
    key = platform.demo["admin_api_key"]
    assert not [url for url in page_log.requests if key in url]
    assert not page_log.errors


async def test_the_inbox_is_one_column_on_a_phone(
    context: BrowserContext, platform: Platform, page_log: PageLog
) -> None:
    visitor = str(uuid.uuid4())
    async with aiohttp.ClientSession() as session:
        client = WidgetClient(platform.url, platform.demo["public_key"], session)
        status, _ = await client.post(visitor, "Is the shop open on Sunday?")
        assert status in (200, 201, 202)
    phone = await _inbox_page(context, page_log)
    await phone.set_viewport_size({"width": 390, "height": 780})
    await phone.goto(f"{platform.url}/inbox")
    inbox = Inbox(phone)
    await inbox.signed_in_with(platform.demo["admin_api_key"])
    first = inbox.row(visitor, within=inbox.open_list)
    await expect(first).to_be_visible(timeout=5_000)
    await first.focus()
    await first.press("Enter")
    back = phone.get_by_role("button", name=re.compile("Conversations"))
    await expect(back).to_be_visible()
    await expect(first).to_be_hidden()
    await expect(inbox.transcript).to_be_visible()
    box = await inbox.transcript.bounding_box()
    assert box is not None and box["width"] <= 390

    # A failing poll says so and backs off; the next good one clears it.
    polls = re.compile(r"/api/v1/conversations/[0-9a-f-]+\?after_seq=")
    await phone.route(polls, _answer(503, "unavailable", "the service is briefly unavailable"))
    trouble = phone.locator("#conv-error")
    await expect(trouble).to_contain_text("Updates paused (the service is briefly unavailable)")
    await phone.unroute(polls)
    await expect(trouble).to_be_empty(timeout=5_000)

    await phone.keyboard.press("Escape")
    await expect(first).to_be_visible()
    await expect(first).to_be_focused()

    # A key the API stops accepting signs the page out and forgets the key.
    revoked = "this API key is not valid or was revoked"
    await phone.route(re.compile(r"/api/v1/"), _answer(401, "unauthorized", revoked))
    await expect(inbox.signin_error).to_have_text(f"Signed out: {revoked}")
    await expect(inbox.key).to_be_focused()
    assert await phone.evaluate("() => sessionStorage.length") == 0
    await phone.unroute_all(behavior="wait")  # (no route handler outlives the test)
    assert not page_log.errors


def _answer(status: int, code: str, message: str) -> Callable[[Route], Awaitable[None]]:
    async def answer(route: Route) -> None:
        error = {"code": code, "message": message, "field": None}
        await route.fulfill(status=status, json={"error": error})

    return answer


async def test_an_admin_sees_webhook_health_and_an_agent_does_not(
    context: BrowserContext, platform: Platform, page_log: PageLog
) -> None:
    page = await _inbox_page(context, page_log)
    await page.goto(f"{platform.url}/inbox")
    inbox = Inbox(page)
    await inbox.signed_in_with(platform.demo["admin_api_key"])
    pane = page.get_by_role("region", name="Webhooks")
    await expect(pane).to_be_visible()
    await expect(page.locator("#wh-note")).to_have_text("No endpoints.")
    await expect(page.locator("#wh-failed li")).to_have_text(["None."])
    agent_key = await asyncio.to_thread(_agent_key, platform)
    await inbox.sign_out.click()
    await inbox.signed_in_with(agent_key)
    await expect(page.locator("#wh-pane")).to_be_hidden()
    assert page_log.errors == []


def _agent_key(platform: Platform) -> str:
    request = urllib.request.Request(
        f"{platform.url}/api/v1/api-keys",
        data=json.dumps({"role": "agent", "name": "inbox test"}).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {platform.demo['admin_api_key']}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["key"])
