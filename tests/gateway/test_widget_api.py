"""The widget API in-process: bad input at every endpoint gets a clear 4xx naming the field and
stores nothing; good input is stored once and enqueued once."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import WSServerHandshakeError
from aiohttp.test_utils import TestClient
from sqlalchemy import text

from chat_domain import create_engine, sign_visitor_id
from devstack import RedisServer
from queue_core import Queue, connect

from .conftest import IDENTITY_SECRET, SHOP, Bots, visitor

Client = TestClient[Any, Any]


async def _stored(db: str, redis_url: str) -> tuple[int, int, int]:
    engine = create_engine(db)
    try:
        async with engine.connect() as conn:
            messages = (await conn.execute(text("SELECT count(*) FROM messages"))).scalar_one()
            contacts = (await conn.execute(text("SELECT count(*) FROM contacts"))).scalar_one()
    finally:
        await engine.dispose()
    redis = connect(redis_url)
    try:
        counts = await Queue("incoming-messages", redis).get_job_counts()
    finally:
        await redis.aclose()
    return int(messages), int(contacts), counts["waiting"] + counts["prioritized"]


def _body(**fields: Any) -> dict[str, Any]:
    body = {"visitor_id": visitor("v1"), "text": "hello", "client_message_id": "c1"}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


BAD_POSTS = [
    pytest.param("not json", 400, "invalid_json", None, id="not-json"),
    pytest.param([1, 2], 400, "invalid_json", None, id="array"),
    pytest.param(_body(visitor_id=...), 400, "invalid", "visitor_id", id="no-visitor"),
    pytest.param(_body(visitor_id=42), 400, "invalid", "visitor_id", id="visitor-int"),
    pytest.param(_body(visitor_id="a b"), 400, "invalid", "visitor_id", id="visitor-space"),
    pytest.param(_body(visitor_id="x" * 201), 400, "invalid", "visitor_id", id="visitor-long"),
    pytest.param(_body(text=...), 400, "required", "text", id="no-text"),
    pytest.param(_body(text="   "), 400, "required", "text", id="blank-text"),
    pytest.param(_body(text=["hi"]), 400, "required", "text", id="text-list"),
    pytest.param(_body(text="x" * 201), 400, "too_long", "text", id="text-too-long"),
    pytest.param(_body(client_message_id=...), 400, "invalid", "client_message_id", id="no-cid"),
    pytest.param(_body(client_message_id=""), 400, "invalid", "client_message_id", id="empty-cid"),
]


@pytest.mark.parametrize(("body", "status", "code", "field"), BAD_POSTS)
async def test_bad_posts_are_refused_and_store_nothing(
    client: Client,
    bots: Bots,
    gateway_db: str,
    gateway_redis: RedisServer,
    body: Any,
    status: int,
    code: str,
    field: str | None,
) -> None:
    before = await _stored(gateway_db, gateway_redis.url)
    raw = body if isinstance(body, str) else json.dumps(body)
    response = await client.post(
        f"/v1/widget/{bots.plain}/messages", data=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status == status
    error = (await response.json())["error"]
    assert error["code"] == code and error["field"] == field and error["message"]
    assert await _stored(gateway_db, gateway_redis.url) == before


async def test_unknown_key_bad_origin_and_bad_signature(
    client: Client, bots: Bots, gateway_db: str, gateway_redis: RedisServer
) -> None:
    before = await _stored(gateway_db, gateway_redis.url)
    r = await client.post("/v1/widget/wpk_nope/messages", json=_body())
    assert r.status == 404 and (await r.json())["error"]["field"] == "public_key"
    r = await client.post(
        f"/v1/widget/{bots.restricted}/messages",
        json=_body(),
        headers={"Origin": "https://evil.example"},
    )
    assert r.status == 403 and (await r.json())["error"]["field"] == "origin"
    r = await client.post(f"/v1/widget/{bots.signed}/messages", json=_body())
    assert r.status == 403 and (await r.json())["error"]["field"] == "signature"
    r = await client.post(f"/v1/widget/{bots.signed}/messages", json=_body(signature="00ff"))
    assert r.status == 403 and (await r.json())["error"]["code"] == "invalid_signature"
    assert await _stored(gateway_db, gateway_redis.url) == before
    # the allowed origin and a valid signature pass
    r = await client.post(
        f"/v1/widget/{bots.restricted}/messages",
        json=_body(visitor_id=visitor("o1")),
        headers={"Origin": SHOP},
    )
    assert r.status == 202
    assert r.headers["Access-Control-Allow-Origin"] == SHOP
    sig = sign_visitor_id(IDENTITY_SECRET, "s1")
    r = await client.post(
        f"/v1/widget/{bots.signed}/messages", json=_body(visitor_id="s1", signature=sig)
    )
    assert r.status == 202


async def test_a_post_is_stored_and_enqueued_once(
    client: Client, bots: Bots, gateway_db: str, gateway_redis: RedisServer
) -> None:
    before = await _stored(gateway_db, gateway_redis.url)
    body = _body(visitor_id=visitor("once"), client_message_id="m-1", text="  Hi there  ")
    first = await client.post(f"/v1/widget/{bots.plain}/messages", json=body)
    second = await client.post(f"/v1/widget/{bots.plain}/messages", json=body)
    assert first.status == second.status == 202
    a, b = await first.json(), await second.json()
    assert a == b and a["status"] == "received" and a["seq"] == 1
    after = await _stored(gateway_db, gateway_redis.url)
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1)
    page = await (
        await client.get(f"/v1/widget/{bots.plain}/messages?visitor_id={visitor('once')}")
    ).json()
    assert [m["text"] for m in page["messages"]] == ["Hi there"]
    assert page["messages"][0]["client_message_id"] == "m-1"
    assert page["cursor"] == 1 and page["conversation_id"] == a["conversation_id"]


async def test_a_retried_post_queues_a_message_whose_first_try_was_not_queued(
    client: Client, bots: Bots, gateway_redis: RedisServer
) -> None:
    """The first try stored the message, then lost Redis before queueing it (the client saw a
    5xx and retries with the same client_message_id): the retry must queue it, or it is never
    answered."""
    body = _body(visitor_id=visitor("retrier"), client_message_id="r-1")
    redis = connect(gateway_redis.url)
    incoming = Queue("incoming-messages", redis)
    try:
        first = await client.post(f"/v1/widget/{bots.plain}/messages", json=body)
        assert first.status == 202
        ours = f"in:{(await first.json())['message_id']}:"
        ids = await incoming.list_job_ids("waiting", 0, 10_000)
        [job_id] = [i for i in ids if i.startswith(ours)]
        assert await incoming.remove(job_id)  # as if the first add never happened

        retry = await client.post(f"/v1/widget/{bots.plain}/messages", json=body)
        assert retry.status == 202 and (await retry.json()) == (await first.json())
        assert await incoming.get_state(job_id) == "waiting"
        # while that job exists, further retries add nothing
        again = await client.post(f"/v1/widget/{bots.plain}/messages", json=body)
        assert again.status == 202
        ids = await incoming.list_job_ids("waiting", 0, 10_000)
        assert [i for i in ids if i.startswith(ours)] == [job_id]
    finally:
        await redis.aclose()


async def test_an_overloaded_gateway_refuses_at_once_and_stores_nothing(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str, bots: Bots
) -> None:
    import asyncio

    from aiohttp.test_utils import TestServer

    from gateway.app import create_app

    from .conftest import settings_for

    settings = settings_for(
        gateway_redis.url, gateway_db, secret_key, max_pending_posts=1, visitor_rate=(100, 60_000)
    )
    async with TestClient(TestServer(create_app(settings))) as test_client:
        before = await _stored(gateway_db, gateway_redis.url)

        async def post(i: int) -> tuple[int, Any, str | None]:
            body = _body(visitor_id=visitor("crowd"), client_message_id=f"crowd-{i}")
            r = await test_client.post(f"/v1/widget/{bots.plain}/messages", json=body)
            return r.status, await r.json(), r.headers.get("Retry-After")

        results = await asyncio.gather(*(post(i) for i in range(20)))
        accepted = [r for r in results if r[0] == 202]
        refused = [r for r in results if r[0] != 202]
        assert accepted and refused, [r[0] for r in results]
        for status, body, retry_after in refused:
            assert status == 503 and body["error"]["code"] == "overloaded" and retry_after == "1"
        after = await _stored(gateway_db, gateway_redis.url)
        assert after[0] - before[0] == len(accepted), "a refused message was stored"
        assert after[2] - before[2] == len(accepted)


async def test_get_messages_validation_and_unknown_visitor(
    client: Client, bots: Bots, gateway_db: str, gateway_redis: RedisServer
) -> None:
    before = await _stored(gateway_db, gateway_redis.url)
    url = f"/v1/widget/{bots.plain}/messages"
    for query, field in (
        ("", "visitor_id"),
        ("visitor_id=v&after=-1", "after"),
        ("visitor_id=v&after=abc", "after"),
        ("visitor_id=a%20b", "visitor_id"),
    ):
        r = await client.get(f"{url}?{query}")
        assert r.status == 400 and (await r.json())["error"]["field"] == field, query
    r = await client.get(f"/v1/widget/{bots.signed}/messages?visitor_id=s9")
    assert r.status == 403
    r = await client.get(f"{url}?visitor_id={visitor('never-seen')}")
    assert r.status == 200
    assert await r.json() == {"messages": [], "cursor": 0, "conversation_id": None}
    assert await _stored(gateway_db, gateway_redis.url) == before, "reading creates nothing"


async def test_websocket_refused_before_upgrade(client: Client, bots: Bots) -> None:
    for path, status in (
        ("/v1/widget/wpk_nope/ws?visitor_id=v", 404),
        (f"/v1/widget/{bots.signed}/ws?visitor_id=v", 403),
        (f"/v1/widget/{bots.plain}/ws", 400),
    ):
        with pytest.raises(WSServerHandshakeError) as info:
            await client.ws_connect(path)
        assert info.value.status == status


async def test_websocket_ack_only_marks_the_visitors_own_messages(
    client: Client, bots: Bots, gateway_db: str
) -> None:
    r = await client.post(
        f"/v1/widget/{bots.plain}/messages", json=_body(visitor_id=visitor("ack-a"))
    )
    own = (await r.json())["message_id"]
    ws = await client.ws_connect(f"/v1/widget/{bots.plain}/ws?visitor_id={visitor('ack-b')}")
    await ws.send_json({"type": "ack", "message_id": own})  # someone else's message
    await ws.send_json({"type": "ack", "message_id": "not-a-uuid"})
    await ws.send_str("{broken json")
    await ws.close()
    page = await (
        await client.get(f"/v1/widget/{bots.plain}/messages?visitor_id={visitor('ack-a')}")
    ).json()
    assert page["messages"][0]["status"] == "received"


async def test_rate_limit_per_visitor(client: Client, bots: Bots) -> None:
    codes = []
    for i in range(7):
        r = await client.post(
            f"/v1/widget/{bots.plain}/messages",
            json=_body(visitor_id=visitor("chatty"), client_message_id=f"r{i}"),
        )
        codes.append(r.status)
    assert codes[:5] == [202] * 5 and codes[5:] == [429, 429]
    assert (await r.json())["error"]["field"] == "visitor_id"


async def test_oversize_body_and_unknown_routes_are_json(client: Client, bots: Bots) -> None:
    r = await client.post(
        f"/v1/widget/{bots.plain}/messages",
        data=b"x" * 100_000,
        headers={"Content-Type": "application/json"},
    )
    assert r.status == 413 and (await r.json())["error"]["code"] == "too_large"
    r = await client.get("/nope")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r = await client.delete(f"/v1/widget/{bots.plain}/messages")
    assert r.status == 405


async def test_cors_preflight_and_headers_on_errors(client: Client, bots: Bots) -> None:
    r = await client.options(
        f"/v1/widget/{bots.plain}/messages",
        headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    r = await client.post(
        "/v1/widget/wpk_nope/messages", json=_body(), headers={"Origin": "https://a.example"}
    )
    assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == "https://a.example"


async def test_health_widget_script_and_demo_page(client: Client, bots: Bots) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"redis": "ok", "database": "ok"}
    js = await client.get("/widget.js")
    assert js.status == 200 and js.content_type == "application/javascript"
    demo = await client.get(f"/demo/{bots.evil_name}")
    page = await demo.text()
    assert demo.status == 200 and "<script>alert" not in page and "&lt;script&gt;" in page
    assert (await client.get("/demo/wpk_nope")).status == 404


async def test_readyz_reports_an_unreachable_redis(
    gateway_db: str, secret_key: str, bots: Bots
) -> None:
    from aiohttp.test_utils import TestServer

    from devstack import free_port
    from gateway.app import create_app

    from .conftest import settings_for

    app = create_app(settings_for(f"redis://127.0.0.1:{free_port()}/0", gateway_db, secret_key))
    async with TestClient(TestServer(app)) as test_client:
        r = await test_client.get("/readyz")
        assert r.status == 503
        body = await r.json()
        assert body["checks"]["database"] == "ok" and body["checks"]["redis"].startswith("error")
