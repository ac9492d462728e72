"""WAHA and Evolution webhooks through the gateway (in-process app, real Redis and SQLite), sent
by the fake services: authentication (WAHA's HMAC, Evolution's header secret), user messages
stored once, our own echoed sends ignored, acks forward-only by key id, and the session's state
pausing and resuming the channel's sends."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chat_domain import (
    WhatsAppQrConfig,
    WhatsAppQrSecrets,
    create_channel,
    get_message,
    get_or_create_contact,
    get_or_create_conversation,
    insert_message,
    messages_since,
    set_provider_id,
)
from chat_pipeline import Runtime
from chat_pipeline.send import ChannelGate
from devstack import RedisServer
from gateway.app import create_app
from tests.fakes.whatsapp import (
    USER_WA_ID,
    FakeEvolutionServer,
    FakeWahaServer,
    waha_signature,
)

from .conftest import settings_for
from .helpers import _tenant

SECRET = "hook-secret"


async def _qr_channel(rt: Runtime, service: str, session: str) -> dict[str, Any]:
    t = await _tenant(rt)
    async with rt.sessions() as s, s.begin():
        channel = await create_channel(
            s,
            rt.box,
            chatbot_id=t["bot"],
            config=WhatsAppQrConfig(
                service=service,  # type: ignore[arg-type]
                base_url=f"http://qr-{uuid.uuid4().hex[:8]}.test",
                session=session,
            ),
            secrets=WhatsAppQrSecrets(api_key="k", webhook_secret=SECRET),
        )
    return {**t, "channel": channel.id}


@pytest.fixture
async def client(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str
) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(settings_for(gateway_redis.url, gateway_db, secret_key))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _url(client: TestClient[Any, Any], channel: uuid.UUID) -> str:
    return str(client.make_url(f"/v1/channels/{channel}/whatsapp-qr"))


async def _stored(rt: Runtime, ch: dict[str, Any], external_id: str) -> list[Any]:
    async with rt.sessions() as s:
        contact = await get_or_create_contact(
            s, tenant_id=ch["tenant"], channel_id=ch["channel"], external_id=external_id
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=ch["bot"])
        return list(await messages_since(s, conversation.id))


async def _reply(rt: Runtime, ch: dict[str, Any], external_id: str, key: str) -> uuid.UUID:
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=ch["tenant"], channel_id=ch["channel"], external_id=external_id
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=ch["bot"])
        reply = (
            await insert_message(s, conversation_id=conversation.id, role="assistant", text="hi")
        ).message
        await set_provider_id(s, reply.id, key)
    return reply.id


async def test_waha_messages_are_authenticated_stored_once_and_echoes_ignored(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    ch = await _qr_channel(rt, "waha", "shop")
    async with FakeWahaServer(sessions={"shop": "WORKING"}, webhook_secret=SECRET) as waha:
        waha.configure_webhook(_url(client, ch["channel"]))
        first = await waha.send_inbound("Olá! Vocês abrem domingo?", session="shop", key_id="K1")
        again = await waha.send_inbound("Olá! Vocês abrem domingo?", session="shop", key_id="K1")
        assert (first.status, again.status) == (200, 200)
        assert json.loads(again.response_text)["duplicates"] == 1
        forged = await waha.send_inbound("hi", session="shop", signature="0" * 128)
        unsigned = await waha.send_inbound("hi", session="shop", signature=False)
        assert (forged.status, unsigned.status) == (401, 401)
        # our own send, echoed back (`message.any`), and another session's message
        echo = await waha.post_webhook(
            "message.any",
            "shop",
            {"id": f"true_{USER_WA_ID}@c.us_OURS", "fromMe": True, "body": "bot text"},
        )
        other = await waha.send_inbound("not ours", session="elsewhere")
        assert json.loads(echo.response_text)["messages"] == 0
        assert json.loads(other.response_text)["messages"] == 0
    stored = await _stored(rt, ch, f"{USER_WA_ID}@c.us")
    assert [(m.role, m.text) for m in stored] == [("user", "Olá! Vocês abrem domingo?")]
    assert (await rt.pipeline.incoming.get_job_counts())["waiting"] == 1


async def test_waha_hmac_covers_the_exact_bytes(client: TestClient[Any, Any], rt: Runtime) -> None:
    ch = await _qr_channel(rt, "waha", "shop")
    body = json.dumps(
        {"event": "message", "session": "shop", "payload": {"id": "false_1@c.us_X", "body": "é"}},
        ensure_ascii=True,
    ).encode()
    url = f"/v1/channels/{ch['channel']}/whatsapp-qr"
    ok = await client.post(url, data=body, headers={"X-Webhook-Hmac": waha_signature(SECRET, body)})
    assert ok.status == 200
    reserialised = json.dumps(json.loads(body), ensure_ascii=False).encode()
    bad = await client.post(
        url, data=reserialised, headers={"X-Webhook-Hmac": waha_signature(SECRET, body)}
    )
    assert bad.status == 401 and (await bad.json())["error"]["field"] == "signature"
    sha256 = await client.post(
        url,
        data=body,
        headers={
            "X-Webhook-Hmac": waha_signature(SECRET, body),
            "X-Webhook-Hmac-Algorithm": "sha256",
        },
    )
    assert sha256.status == 401


async def test_waha_acks_move_forward_by_key_id(client: TestClient[Any, Any], rt: Runtime) -> None:
    ch = await _qr_channel(rt, "waha", "shop")
    chat = f"{USER_WA_ID}@c.us"
    serialized = f"true_{chat}_3EB0ABC"
    reply = await _reply(rt, ch, chat, "3EB0ABC")  # the key id inside WAHA's serialized id
    async with FakeWahaServer(sessions={"shop": "WORKING"}, webhook_secret=SECRET) as waha:
        waha.configure_webhook(_url(client, ch["channel"]))
        for ack in (3, 2, 1, 3):  # read, delivered, sent: out of order and twice
            delivery = await waha.emit_ack(serialized, ack, session="shop")
            assert delivery.status == 200
    async with rt.sessions() as s:
        message = await get_message(s, reply)
    assert message is not None and message.status == "read"


async def test_a_waha_session_down_pauses_sends_until_it_works_again(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    ch = await _qr_channel(rt, "waha", "shop")
    gate = ChannelGate(rt.redis)
    async with FakeWahaServer(sessions={"shop": "WORKING"}, webhook_secret=SECRET) as waha:
        waha.configure_webhook(_url(client, ch["channel"]))
        waha.set_session_status("shop", "SCAN_QR_CODE")
        (down,) = await waha.wait_for_deliveries(1, event="session.status")
        assert down.status == 200
        state = await gate.state(ch["channel"])
        assert state.open and state.code == "session_scan_qr"
        assert await gate.wait_ms(ch["channel"]) > 0
        metrics = await (await client.get("/metrics")).text()
        stopped = f'chat_channel_stopped{{channel_id="{ch["channel"]}",code="session_scan_qr"}} 1'
        assert stopped in metrics  # what an operator alerts on
        waha.set_session_status("shop", "WORKING")
        await waha.wait_for_deliveries(2, event="session.status")
    assert not (await gate.state(ch["channel"])).open
    assert await gate.wait_ms(ch["channel"]) == 0
    assert str(ch["channel"]) not in await (await client.get("/metrics")).text()


async def test_evolution_needs_its_header_secret_and_follows_the_connection(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    ch = await _qr_channel(rt, "evolution", "loja")
    gate = ChannelGate(rt.redis)
    async with FakeEvolutionServer(instances={"loja": "open"}) as evo:
        evo.configure_webhook(_url(client, ch["channel"]))
        refused = await evo.send_inbound("sem segredo", instance="loja")
        assert refused.status == 401
        evo.configure_webhook(_url(client, ch["channel"]), headers={"X-Webhook-Secret": "wrong"})
        assert (await evo.send_inbound("errado", instance="loja")).status == 401
        evo.configure_webhook(_url(client, ch["channel"]), headers={"X-Webhook-Secret": SECRET})
        for _ in range(2):
            ok = await evo.send_inbound("Quero um café", instance="loja", key_id="EVO1")
            assert ok.status == 200
        evo.set_instance_state("loja", "close", status_reason=401)  # logged out on the phone
        await evo.wait_for_deliveries(1, event="connection.update")
        state = await gate.state(ch["channel"])
        assert state.open and state.code == "session_failed"
        evo.set_instance_state("loja", "open")
        await evo.wait_for_deliveries(2, event="connection.update")
        assert not (await gate.state(ch["channel"])).open
    stored = await _stored(rt, ch, f"{USER_WA_ID}@s.whatsapp.net")
    assert [(m.role, m.text, m.external_id) for m in stored] == [("user", "Quero um café", "EVO1")]
