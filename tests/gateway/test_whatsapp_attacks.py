"""WhatsApp webhooks and sends under attack and chaos (in-process gateway, real Redis and SQLite,
PostgreSQL where its rules differ): forged or misdirected signatures, one tenant's webhook aimed
at another tenant's channel or message, odd and hostile bodies, redeliveries racing each other,
disabled channels, spoofed or stale QR session states, trickled bodies, and an open circuit's
probe."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chat_domain import (
    WhatsAppCloudConfig,
    WhatsAppCloudSecrets,
    WhatsAppQrConfig,
    WhatsAppQrSecrets,
    create_channel,
    get_message,
    get_or_create_contact,
    get_or_create_conversation,
    insert_message,
    messages_since,
    set_channel_active,
    set_provider_id,
)
from chat_pipeline import Runtime
from chat_pipeline.channels.base import ChannelFatalError, OutboundText, SendResult
from chat_pipeline.send import ChannelGate, SendProcessor
from devstack import RedisServer
from gateway import whatsapp
from gateway.app import create_app
from queue_core import DelayJob
from tests.domain.conftest import postgres_admin_url, run_blocking
from tests.domain.helpers import create_database, drop_database, migrate

from .conftest import settings_for
from .helpers import _job, _tenant

APP_SECRET = "victim-app-secret"
QR_SECRET = "victim-hook-secret"
USER = "4915550001"


# --- fixtures and helpers ------------------------------------------------------------------------


async def _cloud(rt: Runtime, app_secret: str = APP_SECRET) -> dict[str, Any]:
    t = await _tenant(rt)
    number = f"pn-{uuid.uuid4().hex[:10]}"
    async with rt.sessions() as s, s.begin():
        channel = await create_channel(
            s,
            rt.box,
            chatbot_id=t["bot"],
            config=WhatsAppCloudConfig(phone_number_id=number),
            secrets=WhatsAppCloudSecrets(
                access_token="tok", app_secret=app_secret, verify_token="v"
            ),
        )
    return {**t, "channel": channel.id, "number": number, "secret": app_secret}


async def _qr(
    rt: Runtime, service: str = "waha", session: str = "default", secret: str = QR_SECRET
) -> dict[str, Any]:
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
            secrets=WhatsAppQrSecrets(api_key="k", webhook_secret=secret),
        )
    return {**t, "channel": channel.id, "secret": secret}


@pytest.fixture
async def client(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str
) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(settings_for(gateway_redis.url, gateway_db, secret_key))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _sign(raw: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


def _text_body(number: str, wamid: str, text: str, name: str = "Ana") -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "waba",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"phone_number_id": number},
                            "contacts": [{"profile": {"name": name}, "wa_id": USER}],
                            "messages": [
                                {
                                    "from": USER,
                                    "id": wamid,
                                    "timestamp": "1732300000",
                                    "type": "text",
                                    "text": {"body": text},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }


def _status_body(number: str, wamid: str, status: str, ours: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": wamid, "status": status, "timestamp": "1732300010"}
    if ours:
        item["biz_opaque_callback_data"] = ours
    value = {"metadata": {"phone_number_id": number}, "statuses": [item]}
    return {
        "object": "whatsapp_business_account",
        "entry": [{"changes": [{"field": "messages", "value": value}]}],
    }


async def _post_cloud(
    client: TestClient[Any, Any],
    channel: uuid.UUID,
    raw: bytes,
    signature: str | None,
) -> Any:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    return await client.post(f"/v1/channels/{channel}/whatsapp-cloud", data=raw, headers=headers)


async def _post_qr(
    client: TestClient[Any, Any], channel: uuid.UUID, raw: bytes, headers: dict[str, str]
) -> Any:
    return await client.post(
        f"/v1/channels/{channel}/whatsapp-qr",
        data=raw,
        headers={"Content-Type": "application/json", **headers},
    )


def _waha(raw: bytes, secret: str = QR_SECRET) -> dict[str, str]:
    return {
        "X-Webhook-Hmac": hmac.new(secret.encode(), raw, hashlib.sha512).hexdigest(),
        "X-Webhook-Hmac-Algorithm": "sha512",
    }


def _session_status(session: str, status: str, at_ms: int = 1_732_300_000_000) -> bytes:
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "timestamp": at_ms,
            "event": "session.status",
            "session": session,
            "payload": {"name": session, "status": status},
        }
    ).encode()


async def _user_messages(rt: Runtime, ch: dict[str, Any], external_id: str = USER) -> list[Any]:
    async with rt.sessions() as s:
        contact = await get_or_create_contact(
            s, tenant_id=ch["tenant"], channel_id=ch["channel"], external_id=external_id
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=ch["bot"])
        return list(await messages_since(s, conversation.id))


async def _our_reply(rt: Runtime, ch: dict[str, Any], external_id: str | None) -> uuid.UUID:
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=ch["tenant"], channel_id=ch["channel"], external_id=USER
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=ch["bot"])
        reply = (
            await insert_message(s, conversation_id=conversation.id, role="assistant", text="hi")
        ).message
        if external_id is not None:
            await set_provider_id(s, reply.id, external_id)
    return reply.id


# --- Cloud: signatures -----------------------------------------------------------------------


async def test_cloud_signature_forgeries_are_refused_and_store_nothing(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    """Every near miss of `sha256=<hex HMAC-SHA256(app secret, raw bytes)>` is a 401."""
    ch = await _cloud(rt)
    body = _text_body(ch["number"], "wamid.forged", "Olá, ação 🎉")
    sent = json.dumps(body, ensure_ascii=True).encode()  # what Meta sends (and signs)
    digest = _sign(sent).removeprefix("sha256=")
    forgeries = {
        "missing": None,
        "empty": "",
        "no prefix": digest,
        "sha1 prefix": "sha1=" + digest,
        "upper-case prefix": "SHA256=" + digest,
        "prefix twice": "sha256=sha256=" + digest,
        "truncated": "sha256=" + digest[:-2],
        "another app's secret": _sign(sent, "attacker-secret"),
        "the parsed body re-serialised": _sign(json.dumps(body, ensure_ascii=False).encode()),
        "compact re-serialisation": _sign(json.dumps(body, separators=(",", ":")).encode()),
        "an empty body": _sign(b""),
    }
    for name, signature in forgeries.items():
        r = await _post_cloud(client, ch["channel"], sent, signature)
        assert r.status == 401, name
    assert await _user_messages(rt, ch) == []
    assert (await rt.pipeline.incoming.get_job_counts())["waiting"] == 0
    # the genuine article still works (upper-case hex is the same HMAC)
    ok = await _post_cloud(client, ch["channel"], sent, "sha256=" + digest.upper())
    assert ok.status == 200 and (await ok.json())["messages"] == 1


async def test_another_apps_signed_webhook_cannot_reach_a_victims_number(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    """A tenant signs with its own app secret and names another tenant's phone_number_id,
    through its own callback URL (the sibling-number route) or the victim's."""
    victim = await _cloud(rt)
    attacker = await _cloud(rt, app_secret="attacker-secret")
    raw = json.dumps(_text_body(victim["number"], "wamid.evil", "pay me")).encode()
    r = await _post_cloud(client, attacker["channel"], raw, _sign(raw, "attacker-secret"))
    assert r.status == 200 and (await r.json())["ignored"] == 1
    r = await _post_cloud(client, victim["channel"], raw, _sign(raw, "attacker-secret"))
    assert r.status == 401
    assert await _user_messages(rt, victim) == []
    assert (await rt.pipeline.incoming.get_job_counts())["waiting"] == 0


async def test_a_status_cannot_touch_another_tenants_message(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    """Our message id echoed in `biz_opaque_callback_data`, and the wamid, are both guessable
    or leakable; neither lets one channel's webhook move another channel's message."""
    victim = await _cloud(rt)
    attacker = await _cloud(rt, app_secret="attacker-secret")
    target = await _our_reply(rt, victim, "wamid.victim")
    for ours in (str(target), None):
        raw = json.dumps(_status_body(attacker["number"], "wamid.victim", "failed", ours)).encode()
        r = await _post_cloud(client, attacker["channel"], raw, _sign(raw, "attacker-secret"))
        assert r.status == 200
    async with rt.sessions() as s:
        stored = await get_message(s, target)
    assert stored is not None and stored.status == "queued" and stored.provider_id == "wamid.victim"


# --- Cloud: hostile and odd bodies ------------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b'{"object":"whatsapp_business_account","entry":' + b"[" * depth + b"]" * depth + b"}"


_ODD_BODIES: dict[str, bytes] = {
    "not UTF-8": b'{"object":"whatsapp_business_account","entry":["\xff\xfe"]}',
    "not JSON": b"<xml/>",
    "NaN": b'{"object":"whatsapp_business_account","entry":NaN}',
    "lone surrogate": b'{"object":"whatsapp_business_account","x":"\\ud800"}',
    "nested 5000 deep": _nested(5000),
    "a list": b"[1,2,3]",
    "null": b"null",
    "entry is a string": b'{"object":"whatsapp_business_account","entry":"x"}',
    "entries of every type": json.dumps(
        {"object": "whatsapp_business_account", "entry": [1, "x", None, [], {"changes": 7}]}
    ).encode(),
    "numbers where strings belong": json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "changes": [
                        {
                            "value": {
                                "metadata": {"phone_number_id": 12345},
                                "messages": [{"from": 1, "id": 2, "type": "text", "text": 3}],
                            }
                        },
                        {
                            "value": {
                                "metadata": {"phone_number_id": "PN"},
                                "contacts": [{"profile": 5, "wa_id": 6}],
                                "messages": [
                                    {"from": USER, "id": "w1", "type": "text", "text": {"body": 1}},
                                    {"from": USER, "id": "w2", "type": 7},
                                    {"from": USER, "id": "w3", "type": "image", "image": []},
                                    {
                                        "from": USER,
                                        "id": "w4",
                                        "type": "location",
                                        "location": {"latitude": 1e400, "longitude": "x"},
                                    },
                                ],
                                "statuses": [{"id": 9, "status": "read"}, {"id": "s", "status": 1}],
                            }
                        },
                    ]
                }
            ],
        }
    ).encode(),
}


@pytest.mark.parametrize("name", sorted(_ODD_BODIES))
async def test_odd_signed_bodies_are_a_4xx_or_ignored_never_a_500(
    client: TestClient[Any, Any], rt: Runtime, name: str
) -> None:
    """A signed body (Meta's own, or a proxy's mangling) that we cannot use must not be a 500:
    Meta retries a 5xx for days."""
    ch = await _cloud(rt)
    raw = _ODD_BODIES[name].replace(b'"PN"', json.dumps(ch["number"]).encode())
    r = await _post_cloud(client, ch["channel"], raw, _sign(raw))
    assert r.status in (200, 400), (r.status, await r.text())
    if r.status == 200:
        assert (await r.json())["messages"] == 0
    assert await _user_messages(rt, ch) == []


async def test_a_body_over_the_limit_is_413_even_without_a_content_length(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    ch = await _cloud(rt)
    big = b" " * (whatsapp.WEBHOOK_MAX_BYTES + 1)

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to check first
        for at in range(0, len(big), 256 * 1024):
            yield big[at : at + 256 * 1024]

    r = await client.post(
        f"/v1/channels/{ch['channel']}/whatsapp-cloud",
        data=chunks(),
        headers={"X-Hub-Signature-256": _sign(big)},
    )
    assert r.status == 413


async def test_a_trickled_body_is_cut_off_instead_of_holding_a_connection_forever(
    client: TestClient[Any, Any], rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow loris: the body is read before the signature can be checked, so anyone who knows a
    callback URL can open connections and send a byte now and then. The read has a deadline."""
    monkeypatch.setattr(whatsapp, "WEBHOOK_READ_TIMEOUT_S", 0.3)
    ch = await _cloud(rt)
    assert client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            f"POST /v1/channels/{ch['channel']}/whatsapp-cloud HTTP/1.1\r\n"
            f"Host: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            '{"object":'.encode()
        )
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
    finally:
        writer.close()
    assert status_line.split()[1:2] == [b"408"], status_line


async def test_beyond_the_pending_limit_a_webhook_is_a_503_read_no_further(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str, rt: Runtime
) -> None:
    """An overloaded gateway answers the provider at once (it delivers again later) instead of
    letting every webhook wait: one webhook in flight (its body still arriving) fills a limit
    of one; the next is refused with Retry-After; once it is done the next is taken."""
    settings = settings_for(gateway_redis.url, gateway_db, secret_key, max_pending_webhooks=1)
    ch = await _cloud(rt)
    raw = json.dumps(_text_body(ch["number"], "wamid.busy", "hello")).encode()
    async with TestClient(TestServer(create_app(settings))) as client:
        assert client.port is not None
        reader, writer = await asyncio.open_connection(client.host, client.port)
        try:
            writer.write(
                f"POST /v1/channels/{ch['channel']}/whatsapp-cloud HTTP/1.1\r\n"
                f"Host: x\r\nContent-Type: application/json\r\n"
                f"X-Hub-Signature-256: {_sign(raw)}\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
                + raw[:10]
            )
            await writer.drain()

            async def refused() -> Any:
                r = await _post_cloud(client, ch["channel"], raw, _sign(raw))
                return r if r.status == 503 else None

            async with asyncio.timeout(5):
                while (busy := await refused()) is None:
                    await asyncio.sleep(0.01)  # (until the first request holds its slot)
            assert busy.headers["Retry-After"] == "5"
            assert (await busy.json())["error"]["code"] == "overloaded"
            writer.write(raw[10:])  # the first webhook completes: it is accepted
            await writer.drain()
            async with asyncio.timeout(5):
                assert (await reader.readline()).split()[1:2] == [b"200"]
        finally:
            writer.close()
        again = await _post_cloud(client, ch["channel"], raw, _sign(raw))
        assert again.status == 200, "a redelivery after the rush is taken (and deduped)"
    assert [m.external_id for m in await _user_messages(rt, ch)] == ["wamid.busy"]


async def test_concurrent_redeliveries_store_and_queue_one_message(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    ch = await _cloud(rt)
    raw = json.dumps(_text_body(ch["number"], "wamid.race", "hello")).encode()
    answers = await asyncio.gather(
        *(_post_cloud(client, ch["channel"], raw, _sign(raw)) for _ in range(8))
    )
    assert [r.status for r in answers] == [200] * 8
    assert [m.external_id for m in await _user_messages(rt, ch)] == ["wamid.race"]
    assert (await rt.pipeline.incoming.get_job_counts())["waiting"] == 1


async def test_a_disabled_channel_accepts_no_webhook(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    cloud, qr = await _cloud(rt), await _qr(rt)
    async with rt.sessions() as s, s.begin():
        await set_channel_active(s, cloud["channel"], False)
        await set_channel_active(s, qr["channel"], False)
    raw = json.dumps(_text_body(cloud["number"], "wamid.off", "hello")).encode()
    assert (await _post_cloud(client, cloud["channel"], raw, _sign(raw))).status == 404
    status = _session_status("default", "WORKING")
    assert (await _post_qr(client, qr["channel"], status, _waha(status))).status == 404
    # nor through a sibling's URL (same app secret, routed by number)
    sibling = await _cloud(rt)
    r = await _post_cloud(client, sibling["channel"], raw, _sign(raw))
    assert r.status == 200 and (await r.json())["ignored"] == 1
    assert await _user_messages(rt, cloud) == []


# --- Cloud: NUL characters (PostgreSQL refuses them in text and jsonb) ---------------------------


@pytest.fixture(scope="module")
def postgres_db() -> Iterator[str]:
    server = postgres_admin_url()
    name = f"gateway_attacks_{uuid.uuid4().hex[:8]}"
    try:
        url = run_blocking(create_database(server, name))
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL not reachable: {type(exc).__name__}")
    except Exception as exc:  # asyncpg's own errors (no such role, ...)
        if os.environ.get("TEST_POSTGRES_URL"):
            raise
        pytest.skip(f"PostgreSQL not usable: {type(exc).__name__}")
    try:
        run_blocking(migrate(url, "upgrade", "head"))
        yield url.replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        run_blocking(drop_database(server, name))


@pytest.mark.postgres
async def test_nul_characters_in_a_message_do_not_poison_the_webhook(
    gateway_redis: RedisServer, postgres_db: str, secret_key: str
) -> None:
    """WhatsApp text can carry U+0000 (Meta escapes it as \\u0000). PostgreSQL refuses NUL in
    text and jsonb: the webhook failed with a 500, Meta redelivered the same batch for days,
    and every other message in it was lost with it."""
    settings = settings_for(gateway_redis.url, postgres_db, secret_key)
    rt = await Runtime.start(settings)
    try:
        ch = await _cloud(rt)
        body = _text_body(ch["number"], "wamid.nul", "hi\u0000there", name="A\u0000na")
        raw = json.dumps(body).encode()
        assert b"\\u0000" in raw
        async with TestClient(TestServer(create_app(settings))) as client:
            r = await _post_cloud(client, ch["channel"], raw, _sign(raw))
            assert r.status == 200, await r.text()
            photo = json.loads(raw)
            message = photo["entry"][0]["changes"][0]["value"]["messages"][0]
            message.update(id="wamid.nul2", type="image", image={"id": "m\u00001", "caption": "x"})
            raw = json.dumps(photo).encode()
            r = await _post_cloud(client, ch["channel"], raw, _sign(raw))
            assert r.status == 200, await r.text()
            reply = await _our_reply(rt, ch, "wamid.out")
            failed = _status_body(ch["number"], "wamid.out", "failed", None)
            item = failed["entry"][0]["changes"][0]["value"]["statuses"][0]
            item["errors"] = [{"code": 131026, "title": "Undeliverable\u0000"}]
            raw = json.dumps(failed).encode()
            r = await _post_cloud(client, ch["channel"], raw, _sign(raw))
            assert r.status == 200, await r.text()
        async with rt.sessions() as s:
            assert (await get_message(s, reply)).status == "failed"  # type: ignore[union-attr]
        stored = await _user_messages(rt, ch)
        assert [m.external_id or m.provider_id for m in stored] == [
            "wamid.nul",
            "wamid.nul2",
            "wamid.out",
        ]
        assert "\u0000" not in stored[0].text and stored[0].text.startswith("hi")
    finally:
        await rt.redis.flushdb()
        await rt.close()


# --- QR: authentication, session collisions, spoofed and stale session states -------------------


async def test_a_qr_working_state_cannot_be_spoofed_to_resume_a_stopped_channel(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    """Two channels with the same session name on different QR servers; the victim's circuit is
    open (its session FAILED). Nothing but the victim's own signed webhook resumes it."""
    victim = await _qr(rt, session="default")
    await _qr(rt, session="default", secret="neighbour-secret")  # same name, other server
    evolution = await _qr(rt, service="evolution", session="default", secret="evo-secret")
    gate = ChannelGate(rt.redis)
    await gate.open(victim["channel"], "session_failed", "session is FAILED")
    await gate.open(evolution["channel"], "session_failed", "session is close")
    working = _session_status("default", "WORKING")
    refused = {
        "unsigned": {},
        "neighbour's secret": _waha(working, "neighbour-secret"),
        "sha256 algorithm": {**_waha(working), "X-Webhook-Hmac-Algorithm": "sha256"},
        "the secret as a header": {"X-Webhook-Secret": QR_SECRET},
        "signature of another body": _waha(_session_status("default", "WORKING", 1)),
    }
    for name, headers in refused.items():
        r = await _post_qr(client, victim["channel"], working, headers)
        assert r.status == 401, name
    # the neighbour's genuine webhook, sent to the victim's URL
    r = await _post_qr(client, victim["channel"], working, _waha(working, "neighbour-secret"))
    assert r.status == 401
    # signed by the victim's secret but for another session name on its server: not this channel
    other = _session_status("other", "WORKING")
    r = await _post_qr(client, victim["channel"], other, _waha(other))
    assert r.status == 200 and (await r.json())["sessions"] == 0
    assert (await gate.state(victim["channel"])).open
    # Evolution: the shared secret header, exactly
    evo = json.dumps(
        {"event": "connection.update", "instance": "default", "data": {"state": "open"}}
    ).encode()
    for headers in ({}, {"X-Webhook-Secret": "evo-secre"}, {"X-Webhook-Secret": "EVO-SECRET"}):
        assert (await _post_qr(client, evolution["channel"], evo, headers)).status == 401
    assert (await gate.state(evolution["channel"])).open


async def test_a_stale_working_state_does_not_resume_a_session_that_failed_since(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    """WAHA retries a webhook it could not deliver, with backoff: a WORKING from before the
    session FAILED can arrive after the FAILED. Its envelope timestamp says it is older."""
    ch = await _qr(rt, session="shop")
    failed = _session_status("shop", "FAILED", at_ms=1_732_300_060_000)
    stale = _session_status("shop", "WORKING", at_ms=1_732_300_000_000)
    assert (await _post_qr(client, ch["channel"], failed, _waha(failed))).status == 200
    assert (await _post_qr(client, ch["channel"], stale, _waha(stale))).status == 200
    state = await ChannelGate(rt.redis).state(ch["channel"])
    assert state.open and state.code == "session_failed"
    # a newer WORKING does resume it
    fresh = _session_status("shop", "WORKING", at_ms=1_732_300_120_000)
    assert (await _post_qr(client, ch["channel"], fresh, _waha(fresh))).status == 200
    assert not (await ChannelGate(rt.redis).state(ch["channel"])).open


async def test_an_echo_of_our_own_send_is_never_answered(
    client: TestClient[Any, Any], rt: Runtime
) -> None:
    """A bot that answers its own echoed send talks to itself forever."""
    waha, evo = await _qr(rt, session="s1"), await _qr(rt, "evolution", "s2", secret="evo")
    echoes = [
        {"event": "message.any", "session": "s1",
         "payload": {"id": f"true_{USER}@c.us_E1", "from": f"{USER}@c.us", "fromMe": True,
                     "body": "bot text"}},
        {"event": "message.any", "session": "s1",  # fromMe missing: the id says it
         "payload": {"id": f"true_{USER}@c.us_E2", "from": f"{USER}@c.us", "body": "bot text"}},
    ]  # fmt: skip
    for envelope in echoes:
        raw = json.dumps(envelope).encode()
        r = await _post_qr(client, waha["channel"], raw, _waha(raw))
        assert r.status == 200 and (await r.json())["messages"] == 0
    for from_me in (True, "true", 1):
        raw = json.dumps(
            {
                "event": "messages.upsert",
                "instance": "s2",
                "data": {
                    "key": {"remoteJid": f"{USER}@s.whatsapp.net", "fromMe": from_me, "id": "E3"},
                    "message": {"conversation": "bot text"},
                },
            }
        ).encode()
        r = await _post_qr(client, evo["channel"], raw, {"X-Webhook-Secret": "evo"})
        assert r.status == 200 and (await r.json())["messages"] == 0, from_me
    assert (await rt.pipeline.incoming.get_job_counts())["waiting"] == 0


# --- the send processor's circuit -----------------------------------------------------------------


class _BlockingSender:
    """Fails like an expired token, but only when released: a real send takes a round trip,
    and that is the window in which other workers decide whether to send too."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def send_text(self, message: OutboundText) -> SendResult:
        self.calls += 1
        await self.release.wait()
        raise ChannelFatalError("HTTP 401, code 190: token expired", code="190")

    async def aclose(self) -> None:
        return None


async def _outgoing(rt: Runtime, t: dict[str, Any], text: str) -> dict[str, Any]:
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=t["tenant"], channel_id=t["wa"], external_id=USER
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=t["bot"])
        reply = (
            await insert_message(s, conversation_id=conversation.id, role="assistant", text=text)
        ).message
    return {
        "tenant_id": str(t["tenant"]),
        "conversation_id": str(conversation.id),
        "message_id": str(reply.id),
        "channel_id": str(t["wa"]),
        "channel_kind": "whatsapp_cloud",
        "recipient_external_id": USER,
        "text": text,
    }


async def test_an_open_circuit_lets_one_probe_through_not_every_waiting_message(
    rt: Runtime,
) -> None:
    """A channel whose token expired has many replies parked; they all wake when the probe
    interval ends. One of them is the probe; the rest wait for its outcome instead of
    hammering Meta (or a QR service) with the dead credentials all at once."""
    t = await _tenant(rt)
    sender = _BlockingSender()
    process = SendProcessor(rt, lambda channel, secrets, runtime: sender)
    queue = rt.pipeline.whatsapp_cloud
    sender.release.set()
    with pytest.raises(DelayJob):
        await process(_job(queue, await _outgoing(rt, t, "first")))
    assert sender.calls == 1
    sender.release.clear()
    parked = [await _outgoing(rt, t, f"reply {i}") for i in range(6)]
    await rt.redis.delete(f"chan:probe:{t['wa']}")  # the probe interval is over
    tasks = [asyncio.ensure_future(process(_job(queue, data))) for data in parked]
    async with asyncio.timeout(5):  # every job is either parked again or inside a send
        while sum(task.done() for task in tasks) + sender.calls - 1 < len(tasks):
            await asyncio.sleep(0.01)
    sender.release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, DelayJob) for o in outcomes), outcomes
    assert sender.calls == 2  # the first failure, then one probe
    await process.close()
