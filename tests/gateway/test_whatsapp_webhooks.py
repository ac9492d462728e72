"""WhatsApp Cloud webhooks through the gateway (in-process app, real Redis and SQLite): Meta's
subscription check, signatures over the exact bytes, messages stored once and queued, statuses
forward-only and found by our own id when the send never learned its wamid."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chat_domain import (
    WhatsAppCloudConfig,
    WhatsAppCloudSecrets,
    create_channel,
    get_message,
    get_or_create_contact,
    get_or_create_conversation,
    insert_message,
    messages_since,
)
from chat_pipeline import Runtime
from devstack import RedisServer
from gateway.app import create_app
from queue_core import JobState

from .conftest import settings_for
from .helpers import _tenant

APP_SECRET = "meta-app-secret"
VERIFY = "verify-me"


@pytest.fixture
async def cloud(rt: Runtime) -> dict[str, Any]:
    t = await _tenant(rt)
    number = f"pn-{uuid.uuid4().hex[:10]}"
    async with rt.sessions() as s, s.begin():
        channel = await create_channel(
            s,
            rt.box,
            chatbot_id=t["bot"],
            config=WhatsAppCloudConfig(phone_number_id=number),
            secrets=WhatsAppCloudSecrets(
                access_token="tok", app_secret=APP_SECRET, verify_token=VERIFY
            ),
        )
    return {**t, "channel": channel.id, "number": number}


@pytest.fixture
async def client(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str
) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(settings_for(gateway_redis.url, gateway_db, secret_key))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _sign(raw: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


def _envelope(number: str, value: dict[str, Any]) -> dict[str, Any]:
    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": number}, **value}
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "waba", "changes": [{"field": "messages", "value": value}]}],
    }


def _text(number: str, wamid: str, text: str, sender: str = "4915550001") -> dict[str, Any]:
    return _envelope(
        number,
        {
            "contacts": [{"profile": {"name": "Ana"}, "wa_id": sender}],
            "messages": [
                {
                    "from": sender,
                    "id": wamid,
                    "timestamp": "1732300000",
                    "type": "text",
                    "text": {"body": text},
                }
            ],
        },
    )


def _status(number: str, wamid: str, status: str, ours: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": wamid,
        "status": status,
        "timestamp": "1732300010",
        "recipient_id": "4915550001",
    }
    if ours:
        item["biz_opaque_callback_data"] = ours
    return _envelope(number, {"statuses": [item]})


async def _post(client: TestClient[Any, Any], channel: uuid.UUID, body: Any, **kw: Any) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": _sign(raw)}
    headers.update(kw.get("headers", {}))
    return await client.post(f"/v1/channels/{channel}/whatsapp-cloud", data=raw, headers=headers)


async def test_meta_verifies_the_callback_url(
    client: TestClient[Any, Any], cloud: dict[str, Any]
) -> None:
    url = f"/v1/channels/{cloud['channel']}/whatsapp-cloud"
    ok = await client.get(
        url,
        params={"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"},
    )
    assert ok.status == 200 and await ok.text() == "1158201444"
    wrong = await client.get(
        url, params={"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "1"}
    )
    assert wrong.status == 403
    unknown = await client.get(f"/v1/channels/{uuid.uuid4()}/whatsapp-cloud", params={})
    assert unknown.status == 404 and (await unknown.json())["error"]["field"] == "channel_id"


async def test_a_bad_or_missing_signature_stores_nothing(
    client: TestClient[Any, Any], cloud: dict[str, Any], rt: Runtime
) -> None:
    body = json.dumps(_text(cloud["number"], "wamid.bad", "hello")).encode()
    for header in ({"X-Hub-Signature-256": "sha256=" + "0" * 64}, {"X-Hub-Signature-256": ""}):
        r = await _post(client, cloud["channel"], body, headers=header)
        assert r.status == 401
    assert (await rt.pipeline.incoming.get_job_counts())["waiting"] == 0


async def test_a_user_message_is_stored_once_and_queued(
    client: TestClient[Any, Any], cloud: dict[str, Any], rt: Runtime
) -> None:
    # non-ASCII as Meta sends it (escaped): the signature covers these exact bytes
    raw = json.dumps(_text(cloud["number"], "wamid.1", "Olá, está aberto?"), ensure_ascii=True)
    assert "\\u00e1" in raw
    for _ in range(3):  # Meta retries and redelivers
        r = await _post(client, cloud["channel"], raw.encode())
        assert r.status == 200
    async with rt.sessions() as s:
        contact = await get_or_create_contact(
            s, tenant_id=cloud["tenant"], channel_id=cloud["channel"], external_id="4915550001"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=cloud["bot"])
        stored = await messages_since(s, conversation.id)
    assert [(m.role, m.text, m.external_id) for m in stored] == [
        ("user", "Olá, está aberto?", "wamid.1")
    ]
    assert contact.display_name == "Ana"
    (job,) = await rt.pipeline.incoming.list_jobs(JobState.WAITING)
    assert job.id == f"in:{stored[0].id}:0"


async def test_events_for_another_number_are_not_this_channels(
    client: TestClient[Any, Any], cloud: dict[str, Any], rt: Runtime
) -> None:
    r = await _post(client, cloud["channel"], _text("someone-else", "wamid.x", "hi"))
    assert r.status == 200 and (await r.json())["messages"] == 0
    assert (await r.json())["ignored"] == 1
    assert (await rt.pipeline.incoming.get_job_counts())["waiting"] == 0


async def test_a_sibling_number_of_the_same_app_reaches_its_own_channel(
    client: TestClient[Any, Any], cloud: dict[str, Any], rt: Runtime
) -> None:
    """A Meta app has one callback URL for all its numbers: the events of a second number of
    the same app, arriving at the first channel's URL, belong to the second channel; a number
    of another app (another app secret) gets nothing through this URL."""
    sibling_number, stranger_number = f"pn-{uuid.uuid4().hex[:10]}", f"pn-{uuid.uuid4().hex[:10]}"
    other = await _tenant(rt)
    async with rt.sessions() as s, s.begin():
        sibling = await create_channel(
            s,
            rt.box,
            chatbot_id=cloud["bot"],
            config=WhatsAppCloudConfig(phone_number_id=sibling_number),
            secrets=WhatsAppCloudSecrets(
                access_token="t2", app_secret=APP_SECRET, verify_token="v"
            ),
        )
        await create_channel(
            s,
            rt.box,
            chatbot_id=other["bot"],
            config=WhatsAppCloudConfig(phone_number_id=stranger_number),
            secrets=WhatsAppCloudSecrets(access_token="t3", app_secret="other", verify_token="v"),
        )
    r = await _post(client, cloud["channel"], _text(sibling_number, "wamid.sib", "oi"))
    assert r.status == 200 and (await r.json())["messages"] == 1
    r = await _post(client, cloud["channel"], _text(stranger_number, "wamid.str", "oi"))
    assert r.status == 200 and (await r.json())["ignored"] == 1
    async with rt.sessions() as s:
        contact = await get_or_create_contact(
            s, tenant_id=cloud["tenant"], channel_id=sibling.id, external_id="4915550001"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=cloud["bot"])
        stored = await messages_since(s, conversation.id)
    assert [m.external_id for m in stored] == ["wamid.sib"]
    assert (await rt.pipeline.incoming.get_job_counts())["waiting"] == 1


async def test_a_photo_keeps_its_media_reference_even_in_a_large_batch(
    client: TestClient[Any, Any], cloud: dict[str, Any], rt: Runtime
) -> None:
    """The bot reads a description; the message keeps what Meta sent (media id, type) so an agent
    or a later feature can fetch it. The batch is larger than the widget's 64 KiB body limit:
    provider webhooks have their own, larger one."""
    body = _envelope(
        cloud["number"],
        {
            "contacts": [{"profile": {"name": "Ana"}, "wa_id": "4915550001"}],
            "messages": [
                {
                    "from": "4915550001",
                    "id": "wamid.photo",
                    "timestamp": "1732300000",
                    "type": "image",
                    "image": {"id": "media-77", "mime_type": "image/jpeg", "caption": "my bill"},
                }
            ],
            "statuses": [
                {"id": f"wamid.unknown{i}", "status": "read", "timestamp": "1732300010"}
                for i in range(1500)
            ],
        },
    )
    raw = json.dumps(body).encode()
    assert len(raw) > 64 * 1024
    r = await _post(client, cloud["channel"], raw)
    assert r.status == 200 and (await r.json())["messages"] == 1
    async with rt.sessions() as s:
        contact = await get_or_create_contact(
            s, tenant_id=cloud["tenant"], channel_id=cloud["channel"], external_id="4915550001"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=cloud["bot"])
        (stored,) = await messages_since(s, conversation.id)
    assert stored.text == "[image] my bill"
    assert stored.attachment == {
        "kind": "media",
        "type": "image",
        "id": "media-77",
        "mime_type": "image/jpeg",
    }


async def test_statuses_move_forward_and_find_a_send_that_never_learned_its_wamid(
    client: TestClient[Any, Any], cloud: dict[str, Any], rt: Runtime
) -> None:
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=cloud["tenant"], channel_id=cloud["channel"], external_id="4915550001"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=cloud["bot"])
        reply = (
            await insert_message(s, conversation_id=conversation.id, role="assistant", text="hi")
        ).message
    # the send timed out before the wamid came back; Meta's statuses carry our id
    number, ours = cloud["number"], str(reply.id)
    for status in ("read", "delivered", "sent", "read"):  # out of order, and twice
        r = await _post(client, cloud["channel"], _status(number, "wamid.out", status, ours))
        assert r.status == 200
    async with rt.sessions() as s:
        final = await get_message(s, reply.id)
    assert final is not None and final.status == "read" and final.provider_id == "wamid.out"
    # later statuses by the wamid alone
    r = await _post(client, cloud["channel"], _status(number, "wamid.out", "delivered"))
    assert r.status == 200
    async with rt.sessions() as s:
        assert (await get_message(s, reply.id)).status == "read"  # type: ignore[union-attr]


async def test_a_contact_that_floods_is_handed_to_people(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str, cloud: dict[str, Any], rt: Runtime
) -> None:
    """Another bot answering ours turns every reply into a new question, for ever: beyond
    WHATSAPP_CONTACT_RATE a minute the conversation goes to the tenant's people (the bot stops);
    every message is still stored."""
    settings = settings_for(gateway_redis.url, gateway_db, secret_key, whatsapp_contact_rate=3)
    async with TestClient(TestServer(create_app(settings))) as client:
        for i in range(4):
            r = await _post(client, cloud["channel"], _text(cloud["number"], f"wamid.f{i}", "hi"))
            assert r.status == 200
    async with rt.sessions() as s:
        contact = await get_or_create_contact(
            s, tenant_id=cloud["tenant"], channel_id=cloud["channel"], external_id="4915550001"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=cloud["bot"])
        stored = await messages_since(s, conversation.id)
    assert len(stored) == 4 and conversation.status == "pending_human"
