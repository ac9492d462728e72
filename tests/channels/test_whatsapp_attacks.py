"""The WhatsApp channel modules under hostile input: webhook verification that never trusts a
near miss or raises on odd headers, parsers that never raise on any JSON, and senders whose
errors stay short and hold neither our credentials nor the text sent, whatever the provider
answers (Meta's Graph API and WAHA faked with respx)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
import respx

from chat_pipeline.channels import whatsapp_cloud, whatsapp_qr
from chat_pipeline.channels.base import OutboundText, SendError

TOKEN = "EAAG-secret-access-token"
API_KEY = "waha-secret-api-key"
TEXT = "the user's private question about their bill"


def test_verification_refuses_near_misses_and_never_raises_on_odd_headers() -> None:
    body = b'{"a":1}'
    good = whatsapp_cloud.verify_signature("s", body, None)
    assert good is False
    for header in ("sha256=é" + "0" * 63, "sha256=\x00", " " * 10_000, "sha256=" + "g" * 64):
        assert whatsapp_cloud.verify_signature("s", body, header) is False
    assert whatsapp_cloud.verify_signature("", body, "sha256=" + "0" * 64) is False
    for header in ("é" * 128, "\x00", "0" * 128):
        assert whatsapp_qr.verify_waha_hmac("s", body, header) is False
    assert whatsapp_qr.verify_waha_hmac("", body, "0" * 128) is False
    assert whatsapp_qr.verify_shared_secret("secret", "sécret") is False
    assert whatsapp_qr.verify_shared_secret(None, None) is False
    assert whatsapp_qr.verify_shared_secret("", "") is False
    assert whatsapp_cloud.verify_subscription(
        {"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"}, ""
    ) is None  # fmt: skip


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"message": {"ephemeralMessage": value}, "conversation": [value]}
    return value


_GARBAGE: list[Any] = [
    None, 0, -1.5, "x", b"\xff\xfe", [], [None], {"entry": None}, {"event": 5}, {"data": "x"},
    {"object": "whatsapp_business_account", "entry": [{"changes": [{"value": {"metadata": []}}]}]},
    {"event": "message", "session": "s", "payload": {"id": 7, "from": [], "_data": 5}},
    {"event": "message", "session": "s",
     "payload": {"id": "false_1@c.us_K", "from": "1@c.us", "fromMe": False,
                 "_data": {"message": _deep(50)}, "replyTo": "x", "media": 3}},
    {"event": "message", "session": "s",
     "payload": {"id": "false_1@c.us_K", "from": "1@c.us", "fromMe": False, "hasMedia": True,
                 "location": {"latitude": "nan"}, "vCards": [1, None], "timestamp": 1e300}},
    {"event": "message.ack", "session": "s",
     "payload": {"id": "true_1@c.us_K", "fromMe": True, "ack": 10**30, "ackName": 3}},
    {"event": "session.status", "session": "s", "payload": {"status": ["WORKING"]}},
    {"event": "MESSAGES_UPSERT", "instance": "i",
     "data": [None, 1, {"key": "k"}, {"key": {"id": 1, "remoteJid": {}, "fromMe": None},
                                     "message": {"conversation": 5}}]},
    {"event": "messages.update", "instance": "i",
     "data": {"keyId": "K", "fromMe": True, "status": 99, "remoteJid": 4}},
    {"event": "connection.update", "instance": "i", "data": {"state": 5, "statusReason": []}},
]  # fmt: skip


@pytest.mark.parametrize("index", range(len(_GARBAGE)))
def test_parsers_never_raise_on_any_json(index: int) -> None:
    body = _GARBAGE[index]
    for parse in (
        whatsapp_cloud.parse_webhook,
        whatsapp_qr.parse_waha_webhook,
        whatsapp_qr.parse_evolution_webhook,
    ):
        events = parse(body)
        assert isinstance(events, list)
        for key, _event in events:
            assert isinstance(key, str) and key


def _outbound() -> OutboundText:
    return OutboundText(
        message_id=uuid.uuid4(), conversation_id=uuid.uuid4(), recipient="4915550001", text=TEXT
    )


def _assert_short_and_clean(error: SendError, limit: int) -> None:
    words = str(error)
    assert len(words) <= limit, len(words)
    for secret in (TOKEN, API_KEY, TEXT):  # only our own code could have put them there
        assert secret not in words


@respx.mock
async def test_a_huge_or_hostile_graph_error_stays_short_and_secret_free() -> None:
    echo = "E" * 1_000_000
    respx.post(url__regex=r".*/messages").mock(
        return_value=httpx.Response(
            400,
            json={"error": {"code": 100, "message": echo, "error_data": {"details": echo}}},
        )
    )
    sender = whatsapp_cloud.CloudSender("pn-1", TOKEN, http=httpx.AsyncClient())
    try:
        with pytest.raises(SendError) as caught:
            await sender.send_text(_outbound())
    finally:
        await sender._http.aclose()
    assert caught.value.code == "100"
    _assert_short_and_clean(caught.value, 300)


@respx.mock
@pytest.mark.parametrize(
    "status",
    [
        400,
        422,
        500,
        503,
    ],
)
async def test_a_huge_or_hostile_qr_error_stays_short_and_secret_free(status: int) -> None:
    echo = "E" * 1_000_000
    respx.post("http://waha.test/api/sendText").mock(
        return_value=httpx.Response(
            status, content=json.dumps({"message": [echo], "error": echo, "status": echo})
        )
    )
    sender = whatsapp_qr.WahaSender("http://waha.test", "s", API_KEY, http=httpx.AsyncClient())
    try:
        with pytest.raises(SendError) as caught:
            await sender.send_text(_outbound())
    finally:
        await sender._http.aclose()
    _assert_short_and_clean(caught.value, 600)
