"""The stub gateway itself, over HTTP (no browser): the widget API contract the browser tests rely
on, which the real gateway must honour the same way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from chat_domain import sign_visitor_id
from tests.e2e.conftest import IDENTITY_SECRET
from tests.e2e.widget_stub import MAX_TEXT, KeyConfig, WidgetStub, serve_stub

pytestmark = pytest.mark.asyncio(loop_scope="session")

MESSAGES = "/v1/widget/pk_demo/messages"
TIMEOUT = aiohttp.ClientTimeout(total=5)


@pytest_asyncio.fixture(loop_scope="session")
async def http(stub_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=stub_url, timeout=TIMEOUT) as session:
        yield session


def message(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"visitor_id": "v1", "text": "hi", "client_message_id": "c1"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "field"),
    [
        (MESSAGES, message(text=None), 400, "required", "text"),
        (MESSAGES, message(text="  \n "), 400, "required", "text"),
        (MESSAGES, message(text="x" * (MAX_TEXT + 1)), 400, "too_long", "text"),
        (MESSAGES, message(client_message_id=None), 400, "invalid", "client_message_id"),
        (MESSAGES, message(visitor_id=""), 400, "invalid", "visitor_id"),
        ("/v1/widget/pk_nope/messages", message(), 404, "unknown_key", "public_key"),
        ("/v1/widget/pk_signed/messages", message(), 403, "invalid_signature", "signature"),
        (
            "/v1/widget/pk_signed/messages",
            message(signature=sign_visitor_id("wrong secret", "v1")),
            403,
            "invalid_signature",
            "signature",
        ),
    ],
)
async def test_post_rejects_invalid_input(
    http: aiohttp.ClientSession,
    widget_stub: WidgetStub,
    path: str,
    body: dict[str, Any],
    status: int,
    code: str,
    field: str,
) -> None:
    async with http.post(path, json=body) as response:
        assert response.status == status
        error = (await response.json())["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]
    assert widget_stub.recorded("post") == []


async def test_post_is_idempotent_per_client_message_id(
    http: aiohttp.ClientSession, widget_stub: WidgetStub
) -> None:
    answers = []
    for _ in range(2):
        async with http.post(MESSAGES, json=message(text="x" * MAX_TEXT)) as response:
            assert response.status == 202
            answers.append(await response.json())
    assert answers[0] == answers[1]
    assert answers[0]["status"] == "received"
    conv = widget_stub.conversation("pk_demo", "v1")
    assert conv is not None
    await widget_stub.wait_for(lambda: len(conv.messages) == 2)
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0].id == answers[0]["message_id"]
    assert conv.id == answers[0]["conversation_id"]


async def test_get_honours_after_and_cursor(
    http: aiohttp.ClientSession, widget_stub: WidgetStub
) -> None:
    for n in range(3):
        widget_stub.add_message("pk_demo", "v1", "agent", f"m{n}")
    query: dict[str, str] = {"visitor_id": "v1", "after": "1"}
    async with http.get(MESSAGES, params=query) as response:
        assert response.status == 200
        data = await response.json()
    assert [(m["seq"], m["text"]) for m in data["messages"]] == [(2, "m1"), (3, "m2")]
    assert data["cursor"] == 3
    assert set(data["messages"][0]) == {"id", "seq", "role", "text", "status", "created_at"}
    async with http.get(MESSAGES, params={"visitor_id": "v1", "after": "3"}) as response:
        assert await response.json() == {"messages": [], "cursor": 3}
    async with http.get(MESSAGES, params={"visitor_id": "nobody"}) as response:
        assert await response.json() == {"messages": [], "cursor": 0}
    async with http.get(MESSAGES, params={"visitor_id": "v1", "after": "x"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["field"] == "after"


async def test_websocket_pushes_typing_reply_and_status(
    http: aiohttp.ClientSession, widget_stub: WidgetStub
) -> None:
    async with http.ws_connect("/v1/widget/pk_demo/ws", params={"visitor_id": "v1"}) as ws:
        async with http.post(MESSAGES, json=message()) as response:
            user_id = (await response.json())["message_id"]
        frames = [await ws.receive_json(timeout=5) for _ in range(5)]
        reply = frames[2]["message"]
        await ws.send_json({"type": "ack", "message_id": reply["id"]})
        await widget_stub.wait_for(lambda: widget_stub.recorded("ack"))
    assert [f["type"] for f in frames] == ["message", "typing", "message", "typing", "status"]
    assert frames[0]["message"]["id"] == user_id
    assert frames[0]["message"]["client_message_id"] == "c1"
    assert (frames[1]["on"], frames[3]["on"]) == (True, False)
    assert (reply["role"], reply["text"], reply["seq"]) == ("assistant", "echo: hi", 2)
    assert frames[4] == {"type": "status", "message_id": user_id, "status": "read"}
    conv = widget_stub.conversation("pk_demo", "v1")
    assert conv is not None
    await widget_stub.wait_for(lambda: conv.messages[1].status == "delivered")


async def test_websocket_requires_a_valid_signature(http: aiohttp.ClientSession) -> None:
    path = "/v1/widget/pk_signed/ws"
    with pytest.raises(aiohttp.WSServerHandshakeError) as failure:
        await http.ws_connect(path, params={"visitor_id": "v1", "signature": "00"})
    assert failure.value.status == 403
    signed = {"visitor_id": "v1", "signature": sign_visitor_id(IDENTITY_SECRET, "v1")}
    async with http.ws_connect(path, params=signed) as ws:
        assert not ws.closed


async def test_cors_preflight_and_headers(http: aiohttp.ClientSession) -> None:
    headers = {
        "Origin": "http://shop.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with http.options(MESSAGES, headers=headers) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        allowed = response.headers["Access-Control-Allow-Headers"].lower()
        assert allowed == "content-type, x-visitor-signature"
    async with http.post("/v1/widget/pk_nope/messages", json=message()) as response:
        assert response.status == 404
        assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_demo_page_is_served_with_escaped_placeholders() -> None:
    stub = WidgetStub({"pk_<x>": KeyConfig(title='<b>"Bold" & Co</b>')})
    async with (
        serve_stub(stub) as url,
        aiohttp.ClientSession(base_url=url, timeout=TIMEOUT) as session,
    ):
        async with session.get("/demo/pk_<x>") as response:
            assert response.status == 200
            page = await response.text()
        async with session.get("/demo/unknown") as response:
            assert response.status == 404
        async with session.get("/widget.js") as response:
            assert response.status == 200
            assert response.content_type == "application/javascript"
            assert "window.ChatWidget" in await response.text()
    assert "{{" not in page
    assert 'data-key="pk_&lt;x&gt;"' in page
    assert 'data-title="&lt;b&gt;&quot;Bold&quot; &amp; Co&lt;/b&gt;"' in page


async def test_post_after_resolve_starts_a_new_conversation(
    http: aiohttp.ClientSession, widget_stub: WidgetStub
) -> None:
    async with http.post(MESSAGES, json=message()) as response:
        first = await response.json()
    widget_stub.resolve("pk_demo", "v1")
    async with http.post(MESSAGES, json=message()) as response:  # a late retry: same answer
        assert await response.json() == first
    async with http.post(MESSAGES, json=message(client_message_id="c2")) as response:
        second = await response.json()
    assert second["conversation_id"] != first["conversation_id"]
    async with http.get(MESSAGES, params={"visitor_id": "v1"}) as response:
        data = await response.json()
    assert [(m["seq"], m["id"]) for m in data["messages"]][:1] == [(1, second["message_id"])]
