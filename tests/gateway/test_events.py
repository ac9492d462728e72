"""The pipeline's webhook events (the outbox): stored in the transaction of the change they
describe, queued for webhook-delivery after it, and only for tenants whose endpoints want them.
In-process gateway, real Redis and SQLite."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from chat_domain import (
    create_api_key,
    create_webhook_endpoint,
    get_chatbot,
    set_provider_id,
    store_reply,
)
from chat_domain.models.webhooks import WebhookEvent
from chat_pipeline import Runtime
from chat_pipeline.channels.base import StatusUpdate
from chat_pipeline.receive import apply_status
from chat_pipeline.webhooks import webhook_queue
from devstack import RedisServer
from gateway.app import create_app
from queue_core import JobState

from .conftest import settings_for, visitor
from .helpers import _tenant
from .test_message_integrity import _ask, _conversation


@pytest.fixture
async def client(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str
) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(
        settings_for(gateway_redis.url, gateway_db, secret_key, visitor_rate=(100, 60_000))
    )
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def _events(rt: Runtime, tenant: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
    async with rt.sessions() as s:
        rows = await s.scalars(
            select(WebhookEvent)
            .where(WebhookEvent.tenant_id == tenant)
            .order_by(WebhookEvent.created_at)
        )
        return [(r.event_type, r.payload) for r in rows]


async def _widget_key(rt: Runtime, bot: uuid.UUID) -> str:
    async with rt.sessions() as s:
        found = await get_chatbot(s, bot)
    assert found is not None
    return found.widget_public_key


async def test_a_tenants_endpoints_get_the_conversations_story(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    t = await _tenant(rt)
    async with rt.sessions() as s, s.begin():
        await create_webhook_endpoint(
            s, rt.box, tenant_id=t["tenant"], url="https://crm.example/hook", event_types=["*"]
        )
        admin = (await create_api_key(s, role="admin", tenant_id=t["tenant"])).plaintext
    key = await _widget_key(rt, t["bot"])
    v = visitor(f"events-{uuid.uuid4()}")
    r = await client.post(
        f"/v1/widget/{key}/messages",
        json={"visitor_id": v, "text": "Where is my order?", "client_message_id": "c1"},
    )
    assert r.status == 202
    posted = await r.json()
    events = await _events(rt, t["tenant"])
    assert [e for e, _ in events] == ["conversation.created", "message.received"]
    assert events[0][1]["contact"]["external_id"] == v
    data = events[1][1]
    assert data["text"] == "Where is my order?" and data["contact"]["external_id"] == v
    assert data["message_id"] == posted["message_id"]
    # queued for delivery after the commit, one job per endpoint
    queue = webhook_queue(rt.redis)
    assert len(await queue.list_jobs(JobState.WAITING)) == 2
    # an agent takes over: the status change is an event too
    conv = posted["conversation_id"]
    r = await client.post(
        f"/api/v1/conversations/{conv}/take-over", headers={"Authorization": f"Bearer {admin}"}
    )
    assert r.status == 200
    kinds = [e for e, _ in await _events(rt, t["tenant"])]
    assert kinds == ["conversation.created", "message.received", "conversation.status_changed"]
    status_event = (await _events(rt, t["tenant"]))[2][1]
    assert status_event == {
        "conversation_id": conv, "status": "pending_human", "previous": "open", "reason": "agent",
    }  # fmt: skip


async def test_a_tenant_without_endpoints_stores_no_events(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    t = await _tenant(rt)
    key = await _widget_key(rt, t["bot"])
    r = await client.post(
        f"/v1/widget/{key}/messages",
        json={
            "visitor_id": visitor(f"quiet-{uuid.uuid4()}"),
            "text": "hi",
            "client_message_id": "c1",
        },
    )
    assert r.status == 202
    assert await _events(rt, t["tenant"]) == []
    assert await webhook_queue(rt.redis).list_jobs(JobState.WAITING) == []


async def test_status_events_follow_the_reply_and_only_the_wanted_types(rt: Runtime) -> None:
    """An endpoint that wants `message.delivered` only gets that: not the `sent` before it."""
    t = await _tenant(rt)
    async with rt.sessions() as s, s.begin():
        await create_webhook_endpoint(
            s, rt.box, tenant_id=t["tenant"], url="https://crm.example/hook",
            event_types=["message.delivered"],
        )  # fmt: skip
    conv = await _conversation(rt, t, kind="wa")
    q = await _ask(rt, conv, "hi")
    async with rt.sessions() as s, s.begin():
        reply = (
            await store_reply(
                s, conversation_id=conv, answers=[q.id], text="hello", external_id="ai:ev"
            )
        ).message
        await set_provider_id(s, reply.id, "wamid.ev")
    update = StatusUpdate(external_message_id="wamid.ev", status="sent")
    assert await apply_status(rt, t["wa"], update, t["tenant"])
    update = StatusUpdate(external_message_id="wamid.ev", status="delivered")
    assert await apply_status(rt, t["wa"], update, t["tenant"])
    events = await _events(rt, t["tenant"])
    assert [(e, d["status"], d["message_id"]) for e, d in events] == [
        ("message.delivered", "delivered", str(reply.id))
    ]
