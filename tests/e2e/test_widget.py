"""The embeddable chat widget in a real (headless) Chromium against the stub gateway.

Every wait is bounded (Playwright's 5 s default, or the stub's ``wait_for``); nothing sleeps.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from playwright.async_api import Locator, Page, expect

from chat_domain import sign_visitor_id
from tests.e2e.conftest import IDENTITY_SECRET, PageLog
from tests.e2e.widget_stub import WidgetStub

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = "pk_demo"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class Widget:
    """Locators into the widget's (open) shadow root; Playwright's CSS selectors pierce it."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.host = page.locator("[data-chat-widget]")
        self.launcher = page.get_by_role("button", name=re.compile("^Open chat"))
        self.panel = page.locator("[data-chat-widget] .panel")
        self.input = page.get_by_role("textbox", name="Message")
        self.typing = page.locator("[data-chat-widget] .typing")
        self.mine = page.locator('[data-chat-widget] .msg[data-role="user"]')
        self.replies = page.locator('[data-chat-widget] .msg[data-role="assistant"] .text')
        self.all_texts = page.locator("[data-chat-widget] .msg .text")

    async def open(self) -> None:
        await self.launcher.click()
        await expect(self.panel).to_be_visible()
        await expect(self.input).to_be_focused()

    async def online(self) -> None:
        await expect(self.host).to_have_attribute("data-state", "online")

    async def send(self, text: str) -> None:
        await self.input.fill(text)
        await self.input.press("Enter")

    async def visitor_id(self) -> str:
        value = await self.page.evaluate("window.ChatWidget.visitorId")
        assert isinstance(value, str)
        return value


async def text_of(locator: Locator) -> str:
    """The exact textContent (expect().to_have_text normalises whitespace)."""
    value = await locator.evaluate("el => el.textContent")
    assert isinstance(value, str)
    return value


async def test_send_message_and_see_reply(
    page: Page, stub_url: str, widget_stub: WidgetStub, page_log: PageLog
) -> None:
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await expect(widget.launcher).to_be_visible()
    await expect(widget.panel).to_be_hidden()
    await widget.open()
    await expect(page.get_by_role("dialog", name="Harbor & Pine")).to_be_visible()

    # Shift+Enter is a newline, Enter sends.
    await widget.input.type("Hello")
    await widget.input.press("Shift+Enter")
    await widget.input.type("do you ship to Oslo?")
    await widget.input.press("Enter")
    await expect(widget.input).to_have_value("")
    await expect(widget.mine).to_have_count(1)
    assert await text_of(widget.mine.locator(".text")) == "Hello\ndo you ship to Oslo?"
    await expect(widget.replies).to_have_count(1)
    assert await text_of(widget.replies) == "echo: Hello\ndo you ship to Oslo?"
    # The user's message went sending → sent → read (the stub's status event).
    await expect(widget.mine.locator(".status")).to_have_text("Read")
    await expect(widget.all_texts).to_have_count(2)

    await widget_stub.wait_for(lambda: widget_stub.recorded("ack"))
    posts = widget_stub.recorded("post")
    assert len(posts) == 1
    body = posts[0].data
    assert UUID_RE.match(body["client_message_id"])
    assert body["visitor_id"] == await widget.visitor_id()
    assert UUID_RE.match(body["visitor_id"])
    assert "signature" not in body
    conv = widget_stub.conversation(KEY, body["visitor_id"])
    assert conv is not None
    assert [(m.role, m.client_message_id) for m in conv.messages] == [
        ("user", body["client_message_id"]),
        ("assistant", None),
    ]
    reply = conv.messages[1]
    assert [a.data for a in widget_stub.recorded("ack")] == [
        {"type": "ack", "message_id": reply.id}
    ]
    await widget_stub.wait_for(lambda: reply.status == "delivered")

    # Nothing left this machine's stub: no CDN, no fonts, no analytics.
    assert page_log.requests
    assert all(
        url.startswith((stub_url, stub_url.replace("http", "ws"))) for url in page_log.requests
    )


async def test_history_survives_reload(page: Page, stub_url: str, widget_stub: WidgetStub) -> None:
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.send("Do you sell filters?")
    await expect(widget.replies).to_have_text(["echo: Do you sell filters?"])
    await widget_stub.wait_for(lambda: widget_stub.recorded("ack"))
    visitor = await widget.visitor_id()
    gets_before = len(widget_stub.recorded("get"))

    await page.reload()
    await expect(widget.launcher).to_be_visible()
    # A returning visitor loads history and connects at once, before opening the panel.
    await widget.online()
    await widget.open()
    await expect(widget.all_texts).to_have_text(
        ["Do you sell filters?", "echo: Do you sell filters?"]
    )
    await expect(widget.mine.locator(".status")).to_have_text("Read")
    assert await widget.visitor_id() == visitor
    stored = await page.evaluate(f"localStorage.getItem('chat-widget:{KEY}:visitor')")
    assert stored == visitor
    new_gets = widget_stub.recorded("get")[gets_before:]
    assert new_gets
    assert new_gets[0].data["after"] == "0"
    assert {g.data["visitor_id"] for g in new_gets} == {visitor}
    assert len(widget_stub.recorded("post")) == 1
    # Already delivered: not acknowledged a second time.
    assert len(widget_stub.recorded("ack")) == 1


async def test_typing_indicator(page: Page, stub_url: str, widget_stub: WidgetStub) -> None:
    gate = asyncio.Event()
    widget_stub.reply_gate = gate  # the stub "types" until the test lets it answer
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.online()
    await expect(widget.typing).to_be_hidden()

    await widget.send("Are you there?")
    await expect(widget.typing).to_be_visible()
    await expect(widget.typing).to_contain_text("typing")
    await expect(widget.replies).to_have_count(0)

    gate.set()
    await expect(widget.replies).to_have_text(["echo: Are you there?"])
    await expect(widget.typing).to_be_hidden()


async def test_reconnect_fetches_what_was_missed(
    page: Page, stub_url: str, widget_stub: WidgetStub
) -> None:
    widget_stub.page_limit = 1  # the catch-up must page through the history
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.send("Where is my order?")
    await expect(widget.replies).to_have_text(["echo: Where is my order?"])
    await widget.online()
    visitor = await widget.visitor_id()

    await page.evaluate("window.ChatWidget.close()")

    # The gateway "restarts": sockets close, and an agent answers while the widget is offline.
    assert widget_stub.drop_sockets(KEY, visitor) == 1
    widget_stub.add_message(KEY, visitor, "agent", "Hi, this is Maja from support.")
    widget_stub.add_message(KEY, visitor, "agent", "It shipped this morning.")
    gets_before = len(widget_stub.recorded("get"))

    # The panel is closed: the launcher counts what arrived.
    badge = page.locator("[data-chat-widget] .badge")
    await expect(badge).to_have_text("2", timeout=10_000)  # reconnect backoff: 0.25-0.5 s
    await expect(page.get_by_role("button", name="Open chat (2 unread)")).to_be_visible()
    await widget.open()
    await expect(badge).to_be_hidden()
    await expect(widget.all_texts).to_have_text(
        [
            "Where is my order?",
            "echo: Where is my order?",
            "Hi, this is Maja from support.",
            "It shipped this morning.",
        ]
    )
    await widget.online()
    assert len(widget_stub.recorded("ws")) == 2
    afters = [g.data["after"] for g in widget_stub.recorded("get")[gets_before:]]
    assert afters[:3] == ["2", "3", "4"]  # after the last seq seen, one page (of 1) at a time
    conv = widget_stub.conversation(KEY, visitor)
    assert conv is not None
    agent_ids = [m.id for m in conv.messages if m.role == "agent"]
    await widget_stub.wait_for(
        lambda: {a.data["message_id"] for a in widget_stub.recorded("ack")} >= set(agent_ids)
    )


async def test_gap_in_live_messages_is_filled_on_reconnect(
    page: Page, stub_url: str, widget_stub: WidgetStub
) -> None:
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.send("Hello")
    await expect(widget.replies).to_have_count(1)
    visitor = await widget.visitor_id()
    widget_stub.add_message(KEY, visitor, "agent", "(lost push)", push=False)  # seq 3
    widget_stub.add_message(KEY, visitor, "agent", "Shown live.")  # seq 4
    await expect(widget.all_texts).to_have_text(["Hello", "echo: Hello", "Shown live."])

    assert widget_stub.drop_sockets(KEY, visitor) == 1
    # The catch-up starts after the last contiguous seq (2), so the lost message shows, in order.
    await expect(widget.all_texts).to_have_text(
        ["Hello", "echo: Hello", "(lost push)", "Shown live."]
    )


async def test_resync_frame_fetches_what_the_socket_missed(
    page: Page, stub_url: str, widget_stub: WidgetStub
) -> None:
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.send("Hello")
    await expect(widget.replies).to_have_count(1)
    await widget.online()
    visitor = await widget.visitor_id()
    # published while the gateway's pub/sub connection was away: no later live message
    # reveals the gap
    widget_stub.add_message(KEY, visitor, "agent", "(lost push)", push=False)
    gets_before = len(widget_stub.recorded("get"))
    assert widget_stub.resync(KEY, visitor) == 1
    await expect(widget.all_texts).to_have_text(["Hello", "echo: Hello", "(lost push)"])
    # fetched on the same socket, after the last message seen
    assert len(widget_stub.recorded("ws")) == 1
    assert widget_stub.recorded("get")[gets_before].data["after"] == "2"


async def test_new_conversation_after_resolve(
    page: Page, stub_url: str, widget_stub: WidgetStub
) -> None:
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.send("first")
    await expect(widget.replies).to_have_count(1)
    visitor = await widget.visitor_id()
    widget_stub.add_message(KEY, visitor, "agent", "Anything else?")
    widget_stub.add_message(KEY, visitor, "agent", "Closing this chat now.")
    await expect(widget.all_texts).to_have_count(4)
    old = widget_stub.conversation(KEY, visitor)
    widget_stub.resolve(KEY, visitor)

    # The next message starts a new conversation, whose seq starts again at 1.
    await widget.send("second")
    await expect(widget.replies).to_have_count(2)
    new = widget_stub.conversation(KEY, visitor)
    assert new is not None
    assert new is not old
    assert [m.seq for m in new.messages] == [1, 2]
    # Missed while offline: fetched after the new conversation's cursor, not the old one's.
    await widget.online()
    assert widget_stub.drop_sockets(KEY, visitor) == 1
    widget_stub.add_message(KEY, visitor, "agent", "Hi again!")
    await expect(widget.all_texts).to_have_text(
        [
            "first",
            "echo: first",
            "Anything else?",
            "Closing this chat now.",
            "second",
            "echo: second",
            "Hi again!",
        ]
    )
    assert widget_stub.recorded("get")[-1].data["after"] == "3"


async def test_html_is_shown_literally(
    page: Page, stub_url: str, widget_stub: WidgetStub, page_log: PageLog
) -> None:
    payload = "<img src=x onerror=alert(1)>"
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.send(payload)
    await expect(widget.all_texts).to_have_text([payload, f"echo: {payload}"])
    assert await page.locator("[data-chat-widget] img").count() == 0
    assert page_log.dialogs == []
    assert not any(url.endswith("/x") for url in page_log.requests)
    assert not any(path.endswith("/x") for _, path, _ in widget_stub.http_log)


async def test_failed_send_is_retried_with_the_same_client_id(
    page: Page, stub_url: str, widget_stub: WidgetStub
) -> None:
    widget_stub.fail_next_posts = 1
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.send("Is the grinder in stock?")
    await expect(widget.mine).to_have_attribute("data-status", "error")
    status = widget.mine.locator(".status")
    await expect(status).to_have_text("Not sent. Tap to retry")
    await expect(status).to_be_enabled()  # a real button: reachable by keyboard
    await expect(widget.replies).to_have_count(0)
    visitor = await widget.visitor_id()
    conv = widget_stub.conversation(KEY, visitor)
    assert conv is None or conv.messages == []

    await widget.mine.click()
    await expect(widget.replies).to_have_text(["echo: Is the grinder in stock?"])
    await expect(widget.mine).to_have_count(1)
    await expect(widget.mine).to_have_attribute("data-status", "read")
    posts = widget_stub.recorded("post")
    assert len(posts) == 2
    assert posts[0].data == posts[1].data  # the same client_message_id, text and visitor
    conv = widget_stub.conversation(KEY, visitor)
    assert conv is not None
    assert [m.role for m in conv.messages] == ["user", "assistant"]  # answered once


async def test_an_overloaded_gateway_is_retried_after_its_retry_after(
    page: Page, stub_url: str, widget_stub: WidgetStub
) -> None:
    widget_stub.overload_next_posts = 2
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.send("Do you roast on Mondays?")
    # no click: two 503s, each retried after Retry-After (1 s), then accepted and answered
    await expect(widget.replies).to_have_text(["echo: Do you roast on Mondays?"], timeout=10_000)
    await expect(widget.mine).to_have_count(1)
    posts = widget_stub.recorded("post")
    assert len(posts) == 3
    assert posts[0].data == posts[1].data == posts[2].data  # the same client_message_id
    conv = widget_stub.conversation(KEY, await widget.visitor_id())
    assert conv is not None
    assert [m.role for m in conv.messages] == ["user", "assistant"]


async def test_signed_visitor_identity_is_passed_through(
    page: Page, shop_origin: str, stub_url: str, widget_stub: WidgetStub
) -> None:
    visitor = "customer-42"
    signature = sign_visitor_id(IDENTITY_SECRET, visitor)
    # A host page on another origin (shop.test) than the gateway: the API calls are CORS.
    widget_stub.pages["account"] = f"""<!doctype html>
<html><head><title>My account</title></head><body><h1>My account</h1>
<script>const baseline = Object.getOwnPropertyNames(window);</script>
<script src="{stub_url}/widget.js" data-key="pk_signed" data-visitor-id="{visitor}"
  data-signature="{signature}" data-title="Account help" data-open="true" async></script>
</body></html>"""
    await page.goto(f"{shop_origin}/pages/account")
    widget = Widget(page)
    await expect(widget.launcher).to_be_visible()
    await widget.online()  # an identified visitor connects at once
    await expect(page.get_by_role("dialog", name="Account help")).to_be_visible()  # data-open
    await expect(widget.input).to_be_focused()
    await widget.send("Can I change my address?")
    await expect(widget.replies).to_have_text(["echo: Can I change my address?"])
    await widget_stub.wait_for(lambda: widget_stub.recorded("ack"))

    posts, gets, sockets = (widget_stub.recorded(k) for k in ("post", "get", "ws"))
    assert len(posts) == 1
    assert gets
    assert sockets
    # HTTP calls carry the signature in a header, never in a URL that proxies log; a browser
    # cannot set a WebSocket's headers, so the socket's query carries it.
    for record in (*posts, *gets):
        assert record.data["visitor_id"] == visitor and record.signature_header == signature
        assert "signature" not in record.data
    for record in sockets:
        assert (record.data["visitor_id"], record.data["signature"]) == (visitor, signature)
    assert await widget.visitor_id() == visitor
    # The host's id is not replaced by (or stored as) a random one.
    assert await page.evaluate("Object.keys(localStorage)") == []
    # The widget adds exactly one global.
    added = await page.evaluate(
        "Object.getOwnPropertyNames(window).filter((k) => !baseline.includes(k))"
    )
    assert added == ["ChatWidget"]


async def test_mobile_layout_and_keyboard(page: Page, stub_url: str) -> None:
    await page.set_viewport_size({"width": 375, "height": 667})
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    box = await widget.panel.bounding_box()
    assert box is not None
    assert (box["x"], box["y"], box["width"], box["height"]) == (0, 0, 375, 667)
    await expect(widget.launcher).to_have_attribute("aria-expanded", "true")

    await widget.input.press("Escape")
    await expect(widget.panel).to_be_hidden()
    await expect(widget.launcher).to_be_focused()  # focus goes back to the launcher
    await expect(widget.launcher).to_have_attribute("aria-expanded", "false")
    await page.evaluate("window.ChatWidget.open()")
    await expect(widget.panel).to_be_visible()
    await page.get_by_role("button", name="Close chat").click()
    await expect(widget.panel).to_be_hidden()


async def test_own_message_matched_by_id_without_client_id(
    page: Page, stub_url: str, widget_stub: WidgetStub
) -> None:
    # A gateway whose message objects omit client_message_id: the socket's copy of the user's
    # message may arrive before the POST answer; the widget must still show it once.
    widget_stub.echo_client_ids = False
    await page.goto(f"{stub_url}/demo/{KEY}")
    widget = Widget(page)
    await widget.open()
    await widget.online()
    for n, text in enumerate(("one", "two"), 1):
        await page.evaluate("(t) => window.ChatWidget.send(t)", text)
        await expect(widget.replies).to_have_count(n)
        await expect(widget.mine.nth(n - 1)).to_have_attribute("data-status", "read")
    await expect(widget.all_texts).to_have_text(["one", "echo: one", "two", "echo: two"])
