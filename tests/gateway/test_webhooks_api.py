"""The tenant's webhook routes (in-process gateway, real Redis and SQLite). Isolation, roles and
odd input on these routes are also covered by test_admin_api's checks over the route table."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chat_domain import AttemptOutcome, create_api_key, finish_attempt
from chat_pipeline import Runtime
from chat_pipeline.webhooks import webhook_queue
from devstack import RedisServer
from gateway.app import create_app

from .conftest import settings_for
from .helpers import _tenant

Client = TestClient[Any, Any]
PUBLIC = "https://93.184.216.34/hooks"  # a literal public address: checked, never contacted


@pytest.fixture
async def client(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str
) -> AsyncIterator[Client]:
    app = create_app(settings_for(gateway_redis.url, gateway_db, secret_key))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def _keys(rt: Runtime) -> tuple[uuid.UUID, dict[str, str], dict[str, str]]:
    t = await _tenant(rt)
    async with rt.sessions() as s, s.begin():
        admin = await create_api_key(s, role="admin", tenant_id=t["tenant"])
        agent = await create_api_key(s, role="agent", tenant_id=t["tenant"])
    return (
        t["tenant"],
        {"Authorization": f"Bearer {admin.plaintext}"},
        {"Authorization": f"Bearer {agent.plaintext}"},
    )


async def test_endpoints_are_managed_with_the_secret_shown_once(
    client: Client, rt: Runtime
) -> None:
    _, h, agent = await _keys(rt)
    _, other, _ = await _keys(rt)
    resp = await client.post(
        "/api/v1/webhooks/endpoints", headers=h,
        json={"url": PUBLIC, "event_types": ["message.received", "message.sent"]},
    )  # fmt: skip
    assert resp.status == 201, await resp.text()
    made = await resp.json()
    secret = made["secret"]
    assert secret.startswith("whsec_") and made["health"]["consecutive_failures"] == 0
    listed = await (await client.get("/api/v1/webhooks/endpoints", headers=h)).text()
    assert made["id"] in listed and secret not in listed
    path = f"/api/v1/webhooks/endpoints/{made['id']}"
    assert (await client.get(path, headers=agent)).status == 403
    assert (await client.get(path, headers=other)).status == 404  # another tenant's
    resp = await client.patch(path, headers=h, json={"enabled": False})
    body = await resp.json()
    assert body["enabled"] is False and body["health"]["disabled_reason"] == "disabled by you"
    resp = await client.patch(path, headers=h, json={"enabled": True, "event_types": ["*"]})
    body = await resp.json()
    assert body["enabled"] is True and body["event_types"] == ["*"]
    assert body["health"]["disabled_reason"] is None
    rotated = await (await client.post(f"{path}/rotate-secret", headers=h, json={})).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != secret
    assert rotated["previous_secret_expires_at"] is not None
    assert (await client.delete(path, headers=h)).status == 204
    assert (await client.get(path, headers=h)).status == 404


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"url": "http://127.0.0.1:8080/x", "event_types": ["*"]}, "unsafe_url", "url"),
        ({"url": "http://169.254.169.254/latest", "event_types": ["*"]}, "unsafe_url", "url"),
        ({"url": "http://[::ffff:10.0.0.1]/", "event_types": ["*"]}, "unsafe_url", "url"),
        ({"url": "file:///etc/passwd", "event_types": ["*"]}, "unsafe_url", "url"),
        ({"url": PUBLIC, "event_types": ["message.exploded"]}, "invalid", "event_types.0"),
        ({"url": PUBLIC, "event_types": []}, "invalid", "event_types"),
    ],
)
async def test_unsafe_urls_and_unknown_types_are_refused(
    client: Client, rt: Runtime, body: dict[str, Any], code: str, field: str
) -> None:
    _, h, _ = await _keys(rt)
    resp = await client.post("/api/v1/webhooks/endpoints", headers=h, json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["field"]) == (code, field)


async def test_a_test_event_is_logged_queued_replayed_and_recovered(
    client: Client, rt: Runtime
) -> None:
    tenant, h, _ = await _keys(rt)
    made = await (
        await client.post(
            "/api/v1/webhooks/endpoints", headers=h,
            json={"url": PUBLIC, "event_types": ["message.received"]},
        )
    ).json()  # fmt: skip
    endpoint = uuid.UUID(made["id"])
    resp = await client.post(f"/api/v1/webhooks/endpoints/{endpoint}/test", headers=h)
    assert resp.status == 202
    event_id = (await resp.json())["event_id"]
    job = f"wh:{event_id}:{endpoint}:0"
    queue = webhook_queue(rt.redis)
    assert await queue.get_state(job) in ("waiting", "prioritized")
    events = await (await client.get("/api/v1/webhooks/events?type=webhook.test", headers=h)).json()
    assert [e["id"] for e in events["items"]] == [event_id]
    assert events["items"][0]["deliveries"][0]["status"] == "pending"

    # the worker's last attempt failed: the event is listed as failed and can be replayed
    async with rt.sessions() as s, s.begin():
        await finish_attempt(
            s, event_id=uuid.UUID(event_id), endpoint_id=endpoint,
            outcome=AttemptOutcome(1, 500, 30, None, "oops", False, None),
            disable_after=timedelta(days=5),
        )  # fmt: skip
    failed = await (await client.get("/api/v1/webhooks/events?status=failed", headers=h)).json()
    assert [e["id"] for e in failed["items"]] == [event_id]
    one = await (await client.get(f"/api/v1/webhooks/events/{event_id}", headers=h)).json()
    assert [a["status_code"] for a in one["attempts"]] == [500]
    assert one["attempts"][0]["response_excerpt"] == "oops"
    resp = await client.post(f"/api/v1/webhooks/events/{event_id}/replay", headers=h, json={})
    assert (await resp.json())["replayed"] == [str(endpoint)]
    assert await queue.get_state(f"wh:{event_id}:{endpoint}:1") in ("waiting", "prioritized")

    async with rt.sessions() as s, s.begin():
        await finish_attempt(
            s, event_id=uuid.UUID(event_id), endpoint_id=endpoint,
            outcome=AttemptOutcome(2, 500, 30, None, None, False, None),
            disable_after=timedelta(days=5),
        )  # fmt: skip
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    resp = await client.post("/api/v1/webhooks/recover", headers=h, json={"since": since})
    assert (await resp.json())["replayed"] == 1
    assert await queue.get_state(f"wh:{event_id}:{endpoint}:2") in ("waiting", "prioritized")
    resp = await client.post(
        "/api/v1/webhooks/recover", headers=h, json={"since": "2020-01-01T00:00:00Z"}
    )
    assert resp.status == 400  # more than the recovery window
    assert tenant is not None
