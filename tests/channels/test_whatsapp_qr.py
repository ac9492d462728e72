"""The WhatsApp QR channel (WAHA, Evolution API v2): webhook parsing and auth, the senders'
requests and error classes, session status and pairing QR. Providers are faked with respx."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import ssl
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import respx

from chat_pipeline.channels.base import (
    ChannelFatalError,
    InboundMessage,
    OutboundText,
    PermanentSendError,
    RetryableSendError,
    SendError,
    StatusUpdate,
    ThrottledError,
)
from chat_pipeline.channels.whatsapp_qr import (
    MAX_TEXT_CHARS,
    EvolutionSender,
    QrNotAvailableError,
    SessionStatus,
    WahaSender,
    _split_text,
    evolution_number,
    parse_evolution_webhook,
    parse_waha_webhook,
    typing_delay_s,
    verify_shared_secret,
    verify_waha_hmac,
    waha_chat_id,
)

WAHA = "http://waha.test"
EVO = "http://evolution.test"
API_KEY = "k3y-must-never-leak-0123456789"
SESSION = "tenant-42"
PNG = b"\x89PNG\r\n\x1a\nfake-qr-image"


def outbound(text: str = "Olá!", recipient: str = "5511987654321@c.us", **kw: Any) -> OutboundText:
    return OutboundText(
        message_id=uuid.uuid4(),
        conversation_id=uuid.uuid4(),
        recipient=recipient,
        text=text,
        **kw,
    )


@pytest.fixture(autouse=True)
def _test_cleanup() -> list[str]:
    """Overrides the suite's Redis cleanup: nothing here touches Redis or starts a worker, and
    the async cleanup fixture alone would cost an event loop per (mostly sync) test."""
    return []


# Loading the CA bundle for every client would be most of this module's run time.
_TLS = ssl.create_default_context()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=_TLS) as client:
        yield client


@pytest.fixture
def waha(http: httpx.AsyncClient) -> WahaSender:
    return WahaSender(WAHA + "/", SESSION, API_KEY, http)


@pytest.fixture
def evo(http: httpx.AsyncClient) -> EvolutionSender:
    return EvolutionSender(EVO, SESSION, API_KEY, http)


def sent_json(route: respx.Route, call: int = 0) -> Any:
    return json.loads(route.calls[call].request.content)


# --- webhook auth -------------------------------------------------------------------------------

# docs/whatsapp.md §6.6: these exact bytes and the header for secret "qr_webhook_secret"
WAHA_MESSAGE_BYTES = (
    b'{"id":"evt_01jd8x6k2m3n4p5q6r7s8t9v0w","timestamp":1732300000123,"event":"message",'
    b'"session":"tenant-42","engine":"NOWEB","payload":{"id":"false_5511987654321@c.us_'
    b'3A554E20ECABF3D45BB2","timestamp":1732300000,"from":"5511987654321@c.us","fromMe":false,'
    b'"to":"5511912345678@c.us","body":"Oi","hasMedia":false}}'
)
WAHA_MESSAGE_HMAC = (
    "0c28cd93b349fb5c73532aea85737da674cdcd540c961a7efd48b6357930cbf6"
    "30831b3092fec9d03a4a29f01fb676ae325887da641cd750e013cc576b9bd421"
)


def test_waha_hmac_matches_hashlib_and_the_published_vectors() -> None:
    secret = "s3cr3t-for-this-session"
    body = b'{"event":"message.ack","session":"tenant-42","payload":{"ack":3}}'
    computed = hmac.new(secret.encode(), body, hashlib.sha512).hexdigest()
    assert verify_waha_hmac(secret, body, computed)
    assert verify_waha_hmac(secret.encode(), body, computed.upper(), algorithm="SHA512")
    # the reference fixture, and WAHA's own documentation example
    assert verify_waha_hmac("qr_webhook_secret", WAHA_MESSAGE_BYTES, WAHA_MESSAGE_HMAC)
    assert verify_waha_hmac(
        "my-secret-key",
        b'{"event":"message","session":"default","engine":"WEBJS"}',
        "208f8a55dde9e05519e898b10b89bf0d0b3b0fdf11fdbf09b6b90476301b98d8"
        "097c462b2b17a6ce93b6b47a136cf2e78a33a63f6752c2c1631777076153fa89",
        algorithm="sha512",
    )


@pytest.mark.parametrize(
    ("secret", "body", "header", "algorithm"),
    [
        ("qr_webhook_secret", WAHA_MESSAGE_BYTES + b" ", WAHA_MESSAGE_HMAC, None),  # body changed
        ("other-secret", WAHA_MESSAGE_BYTES, WAHA_MESSAGE_HMAC, None),
        ("qr_webhook_secret", WAHA_MESSAGE_BYTES, WAHA_MESSAGE_HMAC[:-2], None),
        ("qr_webhook_secret", WAHA_MESSAGE_BYTES, WAHA_MESSAGE_HMAC, "sha256"),  # no downgrade
        ("qr_webhook_secret", WAHA_MESSAGE_BYTES, None, None),
        ("qr_webhook_secret", WAHA_MESSAGE_BYTES, "", None),
        ("", WAHA_MESSAGE_BYTES, WAHA_MESSAGE_HMAC, None),
        (None, WAHA_MESSAGE_BYTES, WAHA_MESSAGE_HMAC, None),
        ("qr_webhook_secret", WAHA_MESSAGE_BYTES, "zz-not-hex-ü", None),
    ],
)
def test_waha_hmac_rejects(
    secret: str | None, body: bytes, header: str | None, algorithm: str | None
) -> None:
    assert not verify_waha_hmac(secret, body, header, algorithm=algorithm)


def test_shared_secret() -> None:
    assert verify_shared_secret("per-channel-sécret", "per-channel-sécret")
    assert not verify_shared_secret("per-channel-sécret", "per-channel-secret")
    assert not verify_shared_secret("abc", "abcd")
    assert not verify_shared_secret("abc", None)
    assert not verify_shared_secret("abc", "")
    assert not verify_shared_secret(None, "abc")
    assert not verify_shared_secret("", "")


# --- WAHA webhooks ------------------------------------------------------------------------------


def waha_event(event: str, payload: Any, **extra: Any) -> dict[str, Any]:
    return {
        "id": "evt_01jd8x7a1b2c3d4e5f6g7h8j9k",
        "timestamp": 1732300042500,
        "event": event,
        "session": SESSION,
        "engine": "NOWEB",
        "payload": payload,
        **extra,
    }


def only_message(events: list[tuple[str, Any]]) -> InboundMessage:
    assert len(events) == 1
    session, item = events[0]
    assert session == SESSION
    assert isinstance(item, InboundMessage)
    return item


def test_waha_inbound_text_fixture_bytes() -> None:
    msg = only_message(parse_waha_webhook(WAHA_MESSAGE_BYTES))
    assert msg == InboundMessage(
        external_user_id="5511987654321@c.us",
        external_message_id="3A554E20ECABF3D45BB2",
        text="Oi",
        kind="text",
        received_at=datetime(2024, 11, 22, 18, 26, 40, tzinfo=UTC),
    )
    # the same body already decoded
    assert parse_waha_webhook(json.loads(WAHA_MESSAGE_BYTES)) == parse_waha_webhook(
        WAHA_MESSAGE_BYTES.decode()
    )


def noweb_payload(message: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": "false_5511987654321@c.us_3A0000000000000000AA",
        "timestamp": 1732300000,
        "from": "5511987654321@c.us",
        "fromMe": False,
        "to": "5511912345678@c.us",
        "body": None,
        "hasMedia": False,
        "_data": {"key": {"id": "3A0000000000000000AA"}, "pushName": "Ana", "message": message},
        **extra,
    }


@pytest.mark.parametrize(
    ("message", "extra", "kind", "text", "media"),
    [
        ({"conversation": "oi"}, {"body": "oi"}, "text", "oi", {}),
        ({"extendedTextMessage": {"text": "com link"}}, {}, "text", "com link", {}),
        (
            {"buttonsResponseMessage": {"selectedButtonId": "b1", "selectedDisplayText": "Sim"}},
            {},
            "interactive",
            "Sim",
            {},
        ),
        (
            {
                "listResponseMessage": {
                    "title": "Plano B",
                    "singleSelectReply": {"selectedRowId": "r2"},
                }
            },
            {},
            "interactive",
            "Plano B",
            {},
        ),
        (
            {"templateButtonReplyMessage": {"selectedId": "t1", "selectedDisplayText": "Quero"}},
            {},
            "interactive",
            "Quero",
            {},
        ),
        (
            {"imageMessage": {"mimetype": "image/jpeg", "caption": "meu recibo"}},
            {
                "body": "meu recibo",
                "hasMedia": True,
                "media": {"url": "http://waha.test/api/files/x.jpeg", "mimetype": "image/jpeg"},
            },
            "media",
            "[image] meu recibo",
            {"type": "image", "mimetype": "image/jpeg", "url": "http://waha.test/api/files/x.jpeg"},
        ),
        (
            {"audioMessage": {"mimetype": "audio/ogg; codecs=opus", "ptt": True}},
            {"hasMedia": True},
            "media",
            "[audio]",
            {"type": "audio", "mimetype": "audio/ogg; codecs=opus"},
        ),
        (
            {
                "locationMessage": {
                    "degreesLatitude": -23.5,
                    "degreesLongitude": -46.6,
                    "name": "Loja",
                }
            },
            {},
            "location",
            "[location] Loja (-23.5, -46.6)",
            {},
        ),
        (
            {"contactMessage": {"displayName": "Bruno", "vcard": "BEGIN:VCARD..."}},
            {},
            "contacts",
            "[contacts] Bruno",
            {},
        ),
        ({"pollCreationMessage": {"name": "?"}}, {}, "unsupported", "[unsupported]", {}),
    ],
)
def test_waha_noweb_content_kinds(
    message: dict[str, Any], extra: dict[str, Any], kind: str, text: str, media: dict[str, str]
) -> None:
    msg = only_message(parse_waha_webhook(waha_event("message", noweb_payload(message, **extra))))
    assert (msg.kind, msg.text, msg.media) == (kind, text, media)
    assert msg.contact_name == "Ana"
    assert msg.external_message_id == "3A0000000000000000AA"


def test_waha_reply_to_is_the_quoted_key_id() -> None:
    payload = noweb_payload(
        {"extendedTextMessage": {"text": "sim", "contextInfo": {"stanzaId": "3EB0AAAA"}}},
        replyTo={"id": "3EB0AAAA", "participant": "5511912345678@c.us", "body": "Confirma?"},
    )
    msg = only_message(parse_waha_webhook(waha_event("message", payload)))
    assert msg.reply_to_external_id == "3EB0AAAA"
    # without WAHA's replyTo, Baileys' contextInfo still says it
    del payload["replyTo"]
    msg = only_message(parse_waha_webhook(waha_event("message", payload)))
    assert msg.reply_to_external_id == "3EB0AAAA"


def test_waha_webjs_payloads() -> None:
    base = {
        "id": "false_5511987654321@c.us_AAAAAAAAAAAAAAAAAAAA",
        "timestamp": 1732300000,
        "from": "5511987654321@c.us",
        "fromMe": False,
        "to": "5511912345678@c.us",
        "hasMedia": False,
    }
    button = {**base, "body": "Sim", "_data": {"type": "buttons_response", "notifyName": "Ana"}}
    msg = only_message(parse_waha_webhook(waha_event("message", button, engine="WEBJS")))
    assert (msg.kind, msg.text, msg.contact_name) == ("interactive", "Sim", "Ana")
    media = {
        **base,
        "body": "",
        "hasMedia": True,
        "media": {"url": "http://waha.test/f.pdf", "mimetype": "application/pdf"},
        "_data": {"type": "document"},
    }
    msg = only_message(parse_waha_webhook(waha_event("message", media, engine="WEBJS")))
    assert (msg.kind, msg.text) == ("media", "[document]")
    assert msg.media["url"] == "http://waha.test/f.pdf"
    card = {**base, "body": "BEGIN:VCARD", "vCards": ["BEGIN:VCARD\nFN:Bruno Lima\nEND:VCARD"]}
    msg = only_message(parse_waha_webhook(waha_event("message", card, engine="WEBJS")))
    assert (msg.kind, msg.text) == ("contacts", "[contacts] Bruno Lima")


@pytest.mark.parametrize(
    "change",
    [
        {"fromMe": True, "id": "true_5511987654321@c.us_3EB0C5A1D2E3F4A5B6C7D8"},  # our echo
        {"from": "120363025555555555@g.us", "participant": "5511987654321@c.us"},  # group
        {"from": "status@broadcast"},
        {"from": "120363111111111111@newsletter"},
        {"_data": {"message": {"reactionMessage": {"text": "👍"}}}},
        {"_data": {"message": {"protocolMessage": {"type": 0}}}},
    ],
)
def test_waha_ignores_echoes_groups_broadcasts_and_non_messages(change: dict[str, Any]) -> None:
    payload = {**noweb_payload({"conversation": "oi"}, body="oi"), **change}
    assert parse_waha_webhook(waha_event("message.any", payload)) == []


def test_waha_message_any_from_a_user_is_inbound() -> None:
    payload = noweb_payload({"conversation": "oi"}, body="oi")
    assert only_message(parse_waha_webhook(waha_event("message.any", payload))).text == "oi"


def waha_ack(ack: Any, ack_name: str | None, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": "true_5511987654321@c.us_3EB0C5A1D2E3F4A5B6C7D8",
        "from": "5511987654321@c.us",
        "to": "5511912345678@c.us",
        "participant": None,
        "fromMe": True,
        "ack": ack,
        "ackName": ack_name,
        **extra,
    }
    return waha_event("message.ack", payload)


@pytest.mark.parametrize(
    ("ack", "name", "status"),
    [
        (-1, "ERROR", "failed"),
        (0, "PENDING", None),
        (1, "SERVER", "sent"),
        (2, "DEVICE", "delivered"),
        (3, "READ", "read"),
        (4, "PLAYED", "read"),
    ],
)
def test_waha_acks_every_level(ack: int, name: str, status: str | None) -> None:
    at = datetime(2024, 11, 22, 18, 27, 22, 500000, tzinfo=UTC)
    expected = (
        []
        if status is None
        else [
            (
                SESSION,
                StatusUpdate(
                    external_message_id="3EB0C5A1D2E3F4A5B6C7D8",
                    status=status,  # type: ignore[arg-type]
                    error_code="ERROR" if status == "failed" else None,
                    at=at,
                ),
            )
        ]
    )
    assert parse_waha_webhook(waha_ack(ack, name)) == expected
    # by name alone (an engine that leaves out the number)
    assert parse_waha_webhook(waha_ack(None, name)) == expected


def test_waha_acks_out_of_order_are_parsed_as_they_come() -> None:
    read = parse_waha_webhook(waha_ack(3, "READ"))
    sent = parse_waha_webhook(waha_ack(1, "SERVER"))
    assert [u.status for _, u in read + sent] == ["read", "sent"]  # type: ignore[union-attr]


def test_waha_ack_of_their_message_or_a_group_is_ignored() -> None:
    theirs = waha_ack(3, "READ", fromMe=False, id="false_5511987654321@c.us_3A55")
    assert parse_waha_webhook(theirs) == []
    group = waha_ack(
        3,
        "READ",
        id="true_120363025555555555@g.us_3EB0AAAA_9999@lid",
        **{"from": "120363025555555555@g.us"},
    )
    assert parse_waha_webhook(group) == []


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("WORKING", "working"),
        ("STARTING", "starting"),
        ("SCAN_QR_CODE", "scan_qr"),
        ("PASSKEY_REQUIRED", "scan_qr"),
        ("FAILED", "failed"),
        ("STOPPED", "stopped"),
    ],
)
def test_waha_session_status_events(raw: str, status: str) -> None:
    body = waha_event("session.status", {"name": SESSION, "status": raw})
    at = datetime.fromtimestamp(1732300042.5, tz=UTC)  # the envelope's time orders reports
    assert parse_waha_webhook(body) == [(SESSION, SessionStatus(SESSION, status, raw, at))]  # type: ignore[arg-type]


MALFORMED: list[Any] = [
    b"",
    b"not json",
    b"\xff\xfe",
    b"[]",
    b"null",
    "42",
    None,
    [],
    {},
    {"event": "message", "payload": {}},  # no session
    {"event": "message", "session": SESSION, "payload": []},
    {"event": 7, "session": SESSION, "payload": {}},
    {"event": "message", "session": SESSION, "payload": {"id": 5, "from": "x@c.us"}},
    {"event": "message", "session": SESSION, "payload": {"id": "x", "from": None}},
    {"event": "message", "session": SESSION, "payload": {"id": "x", "from": "5511@c.us",
                                                          "_data": {"message": {}}}},
    {"event": "message.ack", "session": SESSION, "payload": {"id": "true_a@c.us_B", "ack": "x"}},
    {"event": "message.ack", "session": SESSION, "payload": {"id": "true_a@c.us_B", "ack": 99}},
    {"event": "session.status", "session": SESSION, "payload": {"status": "NEW_THING"}},
    {"event": "session.status", "session": SESSION, "payload": {"status": None}},
    {"event": "message.reaction", "session": SESSION, "payload": {"id": "x"}},
]  # fmt: skip


@pytest.mark.parametrize("body", MALFORMED)
def test_waha_malformed_bodies_are_skipped(body: Any) -> None:
    assert parse_waha_webhook(body) == []


def test_waha_odd_field_types_never_raise() -> None:
    payload = noweb_payload(
        {"conversation": "oi"}, timestamp="soon", replyTo="not-an-object", media=[1]
    )
    payload["_data"]["pushName"] = 12
    msg = only_message(parse_waha_webhook(waha_event("message", payload)))
    assert (msg.text, msg.received_at, msg.reply_to_external_id, msg.contact_name) == (
        "oi",
        None,
        None,
        None,
    )


# --- Evolution webhooks -------------------------------------------------------------------------


def evo_event(event: str, data: Any) -> dict[str, Any]:
    return {
        "event": event,
        "instance": SESSION,
        "data": data,
        "destination": "https://gateway.test/webhooks/evolution",
        "date_time": "2024-11-22T15:26:40.000Z",
        "sender": "5511912345678@s.whatsapp.net",
        "server_url": "http://evolution.test",
        "apikey": None,
    }


def evo_upsert(message: dict[str, Any], **key: Any) -> dict[str, Any]:
    return evo_event(
        "messages.upsert",
        {
            "key": {
                "remoteJid": "5511987654321@s.whatsapp.net",
                "fromMe": False,
                "id": "3A554E20ECABF3D45BB2",
                **key,
            },
            "pushName": "Ana",
            "status": "DELIVERY_ACK",
            "message": message,
            "messageType": next(iter(message)),
            "messageTimestamp": 1732300000,
            "instanceId": "a1b2",
            "source": "android",
        },
    )


def test_evolution_inbound_text() -> None:
    msg = only_message(parse_evolution_webhook(evo_upsert({"conversation": "Oi"})))
    assert msg == InboundMessage(
        external_user_id="5511987654321@s.whatsapp.net",
        external_message_id="3A554E20ECABF3D45BB2",
        text="Oi",
        kind="text",
        contact_name="Ana",
        received_at=datetime(2024, 11, 22, 18, 26, 40, tzinfo=UTC),
    )
    raw = json.dumps(evo_upsert({"conversation": "Oi"})).encode()
    assert parse_evolution_webhook(raw) == parse_evolution_webhook(
        evo_upsert({"conversation": "Oi"})
    )


@pytest.mark.parametrize(
    ("message", "kind", "text"),
    [
        ({"extendedTextMessage": {"text": "ok"}}, "text", "ok"),
        ({"ephemeralMessage": {"message": {"extendedTextMessage": {"text": "sumindo"}}}}, "text",
         "sumindo"),
        ({"buttonsResponseMessage": {"selectedButtonId": "b2"}}, "interactive", "b2"),
        ({"listResponseMessage": {"singleSelectReply": {"selectedRowId": "row-9"}}}, "interactive",
         "row-9"),
        ({"interactiveResponseMessage": {"body": {"text": "Pagar"}}}, "interactive", "Pagar"),
        ({"imageMessage": {"caption": "foto", "mimetype": "image/jpeg"}}, "media", "[image] foto"),
        ({"documentWithCaptionMessage": {"message": {"documentMessage": {
            "fileName": "nota.pdf", "mimetype": "application/pdf", "caption": "segue"}}}},
         "media", "[document] segue"),
        ({"stickerMessage": {"mimetype": "image/webp"}}, "media", "[sticker]"),
        ({"contactsArrayMessage": {"contacts": [{"displayName": "A"}, {"displayName": "B"}]}},
         "contacts", "[contacts] A, B"),
        ({"liveLocationMessage": {"degreesLatitude": 1.5, "degreesLongitude": 2}}, "location",
         "[location] (1.5, 2)"),
        ({"eventMessage": {"name": "?"}}, "unsupported", "[unsupported]"),
    ],
)  # fmt: skip
def test_evolution_content_kinds(message: dict[str, Any], kind: str, text: str) -> None:
    msg = only_message(parse_evolution_webhook(evo_upsert(message)))
    assert (msg.kind, msg.text) == (kind, text)


def test_evolution_document_media_and_reply() -> None:
    body = evo_upsert({"documentMessage": {"fileName": "nota.pdf", "mimetype": "application/pdf"}})
    body["data"]["contextInfo"] = {"stanzaId": "3EB0C5A1D2E3F4A5B6C7D8", "quotedMessage": {}}
    msg = only_message(parse_evolution_webhook(body))
    assert msg.media == {"type": "document", "mimetype": "application/pdf", "filename": "nota.pdf"}
    assert msg.reply_to_external_id == "3EB0C5A1D2E3F4A5B6C7D8"


@pytest.mark.parametrize(
    "key",
    [
        {"fromMe": True},  # our own send, echoed as an upsert
        {"remoteJid": "120363025555555555@g.us", "participant": "5511987654321@s.whatsapp.net"},
        {"remoteJid": "status@broadcast"},
        {"id": None},
    ],
)
def test_evolution_ignores_echoes_groups_and_broadcasts(key: dict[str, Any]) -> None:
    assert parse_evolution_webhook(evo_upsert({"conversation": "oi"}, **key)) == []


def test_evolution_skips_edits_reactions_and_empty_messages() -> None:
    messages: list[dict[str, Any]] = [
        {"protocolMessage": {"type": "REVOKE"}},
        {"reactionMessage": {"text": "❤"}},
        {"editedMessage": {"message": {"protocolMessage": {}}}, "messageContextInfo": {}},
        {"x": None},
    ]
    for message in messages:
        assert parse_evolution_webhook(evo_upsert(message)) == []


def evo_update(status: Any, **extra: Any) -> dict[str, Any]:
    return evo_event(
        "messages.update",
        {
            "keyId": "3EB0C5A1D2E3F4A5B6C7D8",
            "remoteJid": "5511987654321@s.whatsapp.net",
            "fromMe": True,
            "participant": None,
            "status": status,
            "instanceId": "a1b2",
            "messageId": "cm3x",
            **extra,
        },
    )


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("ERROR", "failed"),
        ("PENDING", None),
        ("SERVER_ACK", "sent"),
        ("DELIVERY_ACK", "delivered"),
        ("READ", "read"),
        ("PLAYED", "read"),
        ("DELETED", None),
        (2, "sent"),  # Baileys' number, as older versions sent it
        (4, "read"),
    ],
)
def test_evolution_acks_every_level(raw: Any, status: str | None) -> None:
    got = parse_evolution_webhook(evo_update(raw))
    if status is None:
        assert got == []
    else:
        assert got == [
            (
                SESSION,
                StatusUpdate(
                    external_message_id="3EB0C5A1D2E3F4A5B6C7D8",
                    status=status,  # type: ignore[arg-type]
                    error_code="ERROR" if status == "failed" else None,
                ),
            )
        ]


def test_evolution_acks_out_of_order_list_data_and_upper_case_event() -> None:
    body = evo_update("READ")
    body["event"] = "MESSAGES_UPDATE"
    body["data"] = [body["data"], {**body["data"], "status": "SERVER_ACK"}, "junk"]
    assert [u.status for _, u in parse_evolution_webhook(body)] == ["read", "sent"]  # type: ignore[union-attr]


def test_evolution_ack_of_their_message_or_a_group_is_ignored() -> None:
    assert parse_evolution_webhook(evo_update("READ", fromMe=False)) == []
    assert parse_evolution_webhook(evo_update("READ", remoteJid="1203630@g.us")) == []


@pytest.mark.parametrize(
    ("data", "status"),
    [
        ({"state": "open", "statusReason": 200}, "working"),
        ({"state": "connecting", "statusReason": 200}, "starting"),
        ({"state": "close", "statusReason": 401}, "failed"),  # logged out on the phone
        ({"state": "close", "statusReason": 403}, "failed"),
        ({"state": "close", "statusReason": 428}, "stopped"),
        ({"state": "refused", "statusReason": 428}, "failed"),  # QR limit reached
    ],
)
def test_evolution_connection_update(data: dict[str, Any], status: str) -> None:
    body = evo_event("connection.update", {"instance": SESSION, **data})
    assert parse_evolution_webhook(body) == [
        (SESSION, SessionStatus(SESSION, status, data["state"]))  # type: ignore[arg-type]
    ]


def test_evolution_qrcode_updated_means_scan_qr() -> None:
    body = evo_event("qrcode.updated", {"qrcode": {"instance": SESSION, "base64": "data:..."}})
    assert parse_evolution_webhook(body) == [
        (SESSION, SessionStatus(SESSION, "scan_qr", "qrcode.updated"))
    ]


@pytest.mark.parametrize(
    "body",
    [
        *MALFORMED,
        {"event": "messages.upsert", "data": {}},  # no instance
        {"event": "messages.upsert", "instance": SESSION, "data": None},
        {"event": "messages.upsert", "instance": SESSION, "data": {"key": "x", "message": {}}},
        {"event": "messages.upsert", "instance": SESSION, "data": {"key": {"id": "A"},
                                                                   "message": {"conversation": 1}}},
        {"event": "messages.upsert", "instance": SESSION,
         "data": {"key": {"id": "A", "remoteJid": "1@s.whatsapp.net"}, "message": "text"}},
        {"event": "messages.update", "instance": SESSION, "data": {"keyId": "A", "fromMe": True}},
        {"event": "messages.update", "instance": SESSION,
         "data": {"keyId": "A", "fromMe": True, "status": 17}},
        {"event": "connection.update", "instance": SESSION, "data": {"state": "weird"}},
        {"event": "send.message", "instance": SESSION, "data": {"key": {"id": "A"}}},
    ],
)  # fmt: skip
def test_evolution_malformed_bodies_are_skipped(body: Any) -> None:
    assert parse_evolution_webhook(body) == []


# --- chat ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipient", "waha_form", "evolution_form"),
    [
        ("5511987654321@c.us", "5511987654321@c.us", "5511987654321@s.whatsapp.net"),
        ("5511987654321@s.whatsapp.net", "5511987654321@c.us", "5511987654321@s.whatsapp.net"),
        ("123456789012345@lid", "123456789012345@lid", "123456789012345@lid"),
        ("+55 (11) 98765-4321", "5511987654321@c.us", "5511987654321"),
    ],
)
def test_chat_ids_round_trip(recipient: str, waha_form: str, evolution_form: str) -> None:
    assert waha_chat_id(recipient) == waha_form
    assert evolution_number(recipient) == evolution_form


# --- WAHA sender --------------------------------------------------------------------------------


async def test_waha_send_text_request_shape(waha: WahaSender) -> None:
    with respx.mock(base_url=WAHA) as router:
        route = router.post("/api/sendText").respond(
            201,
            json={
                "id": "true_5511987654321@c.us_3EB0C5A1D2E3F4A5B6C7D8",
                "timestamp": 1732300005,
                "fromMe": True,
                "ack": 1,
                "ackName": "SERVER",
            },
        )
        result = await waha.send_text(outbound(recipient="5511987654321@s.whatsapp.net"))
    assert result.external_ids == ("3EB0C5A1D2E3F4A5B6C7D8",)
    request = route.calls[0].request
    assert request.headers["X-Api-Key"] == API_KEY
    assert request.headers["Content-Type"] == "application/json"
    assert sent_json(route) == {"session": SESSION, "chatId": "5511987654321@c.us", "text": "Olá!"}


@pytest.mark.parametrize(
    "answer",
    [
        {"key": {"remoteJid": "5511987654321@s.whatsapp.net", "fromMe": True,
                 "id": "3EB0C5A1D2E3F4A5B6C7D8"}, "status": "PENDING"},  # NOWEB: Baileys' message
        {"id": {"fromMe": True, "remote": "5511987654321@c.us", "id": "3EB0C5A1D2E3F4A5B6C7D8",
                "_serialized": "true_5511987654321@c.us_3EB0C5A1D2E3F4A5B6C7D8"}},  # WEBJS
        {"id": "true_5511987654321@c.us_3EB0C5A1D2E3F4A5B6C7D8"},  # WAMessage
    ],
)  # fmt: skip
async def test_waha_send_answer_shapes_of_each_engine(
    waha: WahaSender, answer: dict[str, Any]
) -> None:
    with respx.mock(base_url=WAHA) as router:
        router.post("/api/sendText").respond(200, json=answer)
        result = await waha.send_text(outbound())
    assert result.external_ids == ("3EB0C5A1D2E3F4A5B6C7D8",)


async def test_waha_send_accepted_without_an_id_is_not_an_error(waha: WahaSender) -> None:
    with respx.mock(base_url=WAHA) as router:
        router.post("/api/sendText").respond(201, text="ok")
        result = await waha.send_text(outbound())
    assert result.external_ids == ()


async def test_waha_reply_quotes_only_the_first_part_of_a_split_text(waha: WahaSender) -> None:
    paragraph = ("Lorem ipsum dolor sit amet. " * 60).strip()  # 1679 characters
    text = "\n\n".join([paragraph] * 6)
    ids = iter(["3EB0A1", "3EB0A2", "3EB0A3", "3EB0A4"])
    with respx.mock(base_url=WAHA) as router:
        route = router.post("/api/sendText").mock(
            side_effect=lambda request: httpx.Response(201, json={"key": {"id": next(ids)}})
        )
        result = await waha.send_text(outbound(text, reply_to_external_id="3A554E20ECABF3D45BB2"))
    bodies = [sent_json(route, i) for i in range(len(route.calls))]
    assert len(bodies) == 3
    assert result.external_ids == ("3EB0A1", "3EB0A2", "3EB0A3")
    assert bodies[0]["reply_to"] == "false_5511987654321@c.us_3A554E20ECABF3D45BB2"
    assert all("reply_to" not in b for b in bodies[1:])
    assert all(len(b["text"]) <= MAX_TEXT_CHARS for b in bodies)
    assert "\n\n".join(b["text"] for b in bodies) == text  # cut at paragraph boundaries


async def test_a_split_text_failing_midway_names_what_went_out_and_resumes_after_it(
    waha: WahaSender,
) -> None:
    paragraph = ("Lorem ipsum dolor sit amet. " * 60).strip()
    text = "\n\n".join([paragraph] * 6)  # three parts
    answers = iter(
        [httpx.Response(201, json={"key": {"id": "3EB0A1"}}), httpx.Response(503, json={})]
    )
    with respx.mock(base_url=WAHA) as router:
        router.post("/api/sendText").mock(side_effect=lambda request: next(answers))
        with pytest.raises(RetryableSendError) as err:
            await waha.send_text(outbound(text))
    assert err.value.sent_external_ids == ("3EB0A1",)  # type: ignore[attr-defined]
    assert err.value.sent_parts == 1  # type: ignore[attr-defined]
    with respx.mock(base_url=WAHA) as router:
        route = router.post("/api/sendText").mock(
            return_value=httpx.Response(201, json={"key": {"id": "3EB0A9"}})
        )
        retried = dataclasses.replace(outbound(text), skip_parts=1)
        result = await waha.send_text(retried)
    assert len(route.calls) == 2 and result.external_ids == ("3EB0A9", "3EB0A9")


async def test_waha_empty_text_is_permanent_without_a_request(waha: WahaSender) -> None:
    with respx.mock(base_url=WAHA, assert_all_called=False) as router:
        route = router.post("/api/sendText")
        with pytest.raises(PermanentSendError) as err:
            await waha.send_text(outbound(" \n "))
    assert err.value.code == "empty_text"
    assert not route.called


WAHA_422 = {
    "error": "Session status is not as expected. Try again later or restart the session",
    "session": SESSION,
    "status": "SCAN_QR_CODE",
    "expected": ["WORKING"],
}


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "code"),
    [
        (422, WAHA_422, {}, ChannelFatalError, "session_not_working"),
        (422, {"statusCode": 422, "code": "not_on_whatsapp", "message": "no"}, {},
         PermanentSendError, "not_on_whatsapp"),
        (404, {"message": "We didn't find a session with name 'tenant-42'."}, {},
         ChannelFatalError, "session_not_found"),
        (401, {"message": "Unauthorized", "statusCode": 401}, {}, ChannelFatalError,
         "unauthorized"),
        (429, {"message": "slow down"}, {"Retry-After": "7"}, ThrottledError, "rate_limited"),
        (500, {"message": "Connection Closed"}, {}, ChannelFatalError, "session_not_working"),
        (500, {"message": "boom"}, {}, RetryableSendError, "http_500"),
        (503, "upstream down", {"Retry-After": "3"}, RetryableSendError, "http_503"),
        (400, {"message": ["chatId must be a string"]}, {}, PermanentSendError, "bad_request"),
        (408, {"message": "Request Timeout"}, {}, RetryableSendError, "http_408"),
    ],
)  # fmt: skip
async def test_waha_send_errors(
    waha: WahaSender,
    status: int,
    body: Any,
    headers: dict[str, str],
    error: type[SendError],
    code: str,
) -> None:
    with respx.mock(base_url=WAHA) as router:
        kwargs: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"text": body}
        router.post("/api/sendText").respond(status, headers=headers, **kwargs)
        with pytest.raises(SendError) as err:
            await waha.send_text(outbound("segredo do cliente"))
    assert type(err.value) is error
    assert err.value.code == code
    assert API_KEY not in str(err.value) and "segredo" not in str(err.value)
    if isinstance(err.value, ThrottledError):
        assert err.value.delay_s == 7.0
    if isinstance(err.value, RetryableSendError):
        # a 5xx may come after WhatsApp got the message; a 408 says nothing was processed
        assert err.value.ambiguous is (status >= 500)
        assert err.value.retry_after_s == (3.0 if status == 503 else None)
    if code == "session_not_working" and status == 422:
        assert "SCAN_QR_CODE" in str(err.value)  # what the tenant is told to fix


@pytest.mark.parametrize(
    ("failure", "code", "ambiguous"),
    [
        (httpx.ConnectError("refused"), "connect_error", False),
        (httpx.ConnectTimeout("slow connect"), "connect_error", False),
        (httpx.ReadTimeout("slow answer"), "timeout", True),
        (httpx.RemoteProtocolError("closed mid-answer"), "transport_error", True),
    ],
)
async def test_transport_failures(
    waha: WahaSender, evo: EvolutionSender, failure: Exception, code: str, ambiguous: bool
) -> None:
    with respx.mock() as router:
        router.post(f"{WAHA}/api/sendText").mock(side_effect=failure)
        router.post(f"{EVO}/message/sendText/{SESSION}").mock(side_effect=failure)
        for sender in (waha, evo):
            with pytest.raises(RetryableSendError) as err:
                await sender.send_text(outbound())
            assert (err.value.code, err.value.ambiguous) == (code, ambiguous)
            assert API_KEY not in str(err.value)
            assert err.value.__cause__ is None and err.value.__suppress_context__


async def test_a_base_url_without_scheme_is_fatal(http: httpx.AsyncClient) -> None:
    for sender in (
        WahaSender("waha:3000", SESSION, API_KEY, http),
        EvolutionSender("evolution.internal:8080", SESSION, API_KEY, http),
    ):
        with pytest.raises(ChannelFatalError) as err:
            await sender.send_text(outbound())
        assert err.value.code == "invalid_base_url"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("WORKING", "working"),
        ("SCAN_QR_CODE", "scan_qr"),
        ("PASSKEY_CONFIRMATION_REQUIRED", "scan_qr"),
        ("FAILED", "failed"),
        ("STOPPED", "stopped"),
        ("STARTING", "starting"),
        ("SOMETHING_NEW", "starting"),
    ],
)
async def test_waha_session_status(waha: WahaSender, raw: str, status: str) -> None:
    with respx.mock(base_url=WAHA) as router:
        route = router.get(f"/api/sessions/{SESSION}").respond(
            200,
            json={
                "name": SESSION,
                "status": raw,
                "me": {"id": "5511912345678@c.us", "pushName": "Loja"},
                "engine": {"engine": "NOWEB"},
            },
        )
        got = await waha.session_status()
    assert got == SessionStatus(SESSION, status, raw)  # type: ignore[arg-type]
    assert route.calls[0].request.headers["X-Api-Key"] == API_KEY


async def test_waha_session_status_errors(waha: WahaSender) -> None:
    with respx.mock(base_url=WAHA) as router:
        route = router.get(f"/api/sessions/{SESSION}")
        route.respond(404, json={"message": "not found"})
        with pytest.raises(ChannelFatalError) as fatal:
            await waha.session_status()
        assert fatal.value.code == "session_not_found"
        route.respond(200, json={"name": SESSION})
        with pytest.raises(RetryableSendError) as bad:
            await waha.session_status()
        assert bad.value.code == "bad_response"
        route.respond(502, text="bad gateway")
        with pytest.raises(RetryableSendError):
            await waha.session_status()


async def test_waha_qr_code_png(waha: WahaSender) -> None:
    with respx.mock(base_url=WAHA) as router:
        route = router.get(f"/api/{SESSION}/auth/qr").respond(
            200, content=PNG, headers={"Content-Type": "image/png"}
        )
        assert await waha.qr_code() == (PNG, "image/png")
    request = route.calls[0].request
    assert request.headers["Accept"] == "image/png"
    assert request.headers["X-Api-Key"] == API_KEY
    assert request.url.params["format"] == "image"


async def test_waha_qr_code_json_and_errors(waha: WahaSender) -> None:
    with respx.mock(base_url=WAHA) as router:
        route = router.get(f"/api/{SESSION}/auth/qr")
        route.respond(200, json={"mimetype": "image/png", "data": base64.b64encode(PNG).decode()})
        assert await waha.qr_code() == (PNG, "image/png")
        route.respond(422, json={"message": "Session status is not as expected"})
        with pytest.raises(QrNotAvailableError) as none:
            await waha.qr_code()
        assert none.value.code == "qr_not_available"
        route.respond(200, json={"value": "2@abc"})
        with pytest.raises(QrNotAvailableError):
            await waha.qr_code()
        route.respond(401, json={"message": "Unauthorized"})
        with pytest.raises(ChannelFatalError) as fatal:
            await waha.qr_code()
        assert API_KEY not in str(fatal.value)


async def test_waha_typing_is_best_effort(waha: WahaSender) -> None:
    with respx.mock(base_url=WAHA) as router:
        start = router.post("/api/startTyping").respond(201)
        stop = router.post("/api/stopTyping").respond(500, json={"message": "boom"})
        assert await waha.start_typing("5511987654321@s.whatsapp.net") is True
        assert await waha.stop_typing("5511987654321@c.us") is False
        stop.mock(side_effect=httpx.ConnectError("down"))
        assert await waha.stop_typing("5511987654321@c.us") is False
    assert sent_json(start) == {"session": SESSION, "chatId": "5511987654321@c.us"}
    assert start.calls[0].request.headers["X-Api-Key"] == API_KEY


async def test_sender_without_api_key_sends_no_key_header(http: httpx.AsyncClient) -> None:
    waha = WahaSender(WAHA, SESSION, None, http)
    evo = EvolutionSender(EVO, SESSION, None, http)
    with respx.mock() as router:
        w = router.post(f"{WAHA}/api/sendText").respond(201, json={"id": "true_a@c.us_X1"})
        e = router.post(f"{EVO}/message/sendText/{SESSION}").respond(
            201, json={"key": {"id": "X2"}}
        )
        await waha.send_text(outbound())
        await evo.send_text(outbound())
    assert "X-Api-Key" not in w.calls[0].request.headers
    assert "apikey" not in e.calls[0].request.headers


async def test_aclose_closes_only_an_own_client(http: httpx.AsyncClient) -> None:
    shared = WahaSender(WAHA, SESSION, API_KEY, http)
    await shared.aclose()
    assert not http.is_closed
    own = EvolutionSender(EVO, SESSION, API_KEY)
    await own.aclose()
    assert own._http.is_closed


# --- Evolution sender ---------------------------------------------------------------------------


async def test_evolution_send_text_request_shape(evo: EvolutionSender) -> None:
    with respx.mock(base_url=EVO) as router:
        route = router.post(f"/message/sendText/{SESSION}").respond(
            201,
            json={
                "key": {
                    "remoteJid": "5511987654321@s.whatsapp.net",
                    "fromMe": True,
                    "id": "3EB0C5A1D2E3F4A5B6C7D8",
                },
                "pushName": "",
                "status": "PENDING",
                "message": {"conversation": "Olá!"},
                "messageType": "conversation",
                "messageTimestamp": 1732300005,
            },
        )
        result = await evo.send_text(outbound(recipient="5511987654321@s.whatsapp.net"))
    assert result.external_ids == ("3EB0C5A1D2E3F4A5B6C7D8",)
    request = route.calls[0].request
    assert request.headers["apikey"] == API_KEY
    assert sent_json(route) == {"number": "5511987654321@s.whatsapp.net", "text": "Olá!"}


async def test_evolution_reply_is_quoted_by_key_id(evo: EvolutionSender) -> None:
    with respx.mock(base_url=EVO) as router:
        route = router.post(f"/message/sendText/{SESSION}").respond(
            201, json={"key": {"id": "3EB0B"}}
        )
        await evo.send_text(outbound(reply_to_external_id="3A554E20ECABF3D45BB2"))
        await evo.send_text(
            outbound(reply_to_external_id="false_5511987654321@c.us_3A554E20ECABF3D45BB2")
        )
    for call in range(2):
        assert sent_json(route, call) == {
            "number": "5511987654321@s.whatsapp.net",
            "text": "Olá!",
            "quoted": {"key": {"id": "3A554E20ECABF3D45BB2"}},
        }


async def test_evolution_instance_name_is_escaped_in_paths(http: httpx.AsyncClient) -> None:
    evo = EvolutionSender(EVO, "loja da ana/1", API_KEY, http)
    with respx.mock() as router:
        route = router.get(f"{EVO}/instance/connectionState/loja%20da%20ana%2F1").respond(
            200, json={"instance": {"instanceName": "loja da ana/1", "state": "open"}}
        )
        assert (await evo.session_status()).status == "working"
    assert route.called


def evo_error(status: int, message: Any, error: str = "Bad Request") -> dict[str, Any]:
    return {"status": status, "error": error, "response": {"message": message}}


@pytest.mark.parametrize(
    ("status", "body", "error", "code"),
    [
        (400, evo_error(400, [{"jid": "5511000000000@s.whatsapp.net", "exists": False,
                               "number": "5511000000000"}]), PermanentSendError, "not_on_whatsapp"),
        (400, evo_error(400, ["Error: Connection Closed"]), ChannelFatalError,
         "session_not_working"),
        (500, evo_error(500, "Connection Closed", "Internal Server Error"), ChannelFatalError,
         "session_not_working"),
        (404, evo_error(404, ['The "tenant-42" instance does not exist'], "Not Found"),
         ChannelFatalError, "session_not_found"),
        (404, evo_error(404, ["Group not found"], "Not Found"), PermanentSendError, "http_404"),
        (401, evo_error(401, "Unauthorized", "Unauthorized"), ChannelFatalError, "unauthorized"),
        (403, evo_error(403, "Forbidden", "Forbidden"), ChannelFatalError, "unauthorized"),
        (429, {"message": "Too Many Requests"}, ThrottledError, "rate_limited"),
        (500, evo_error(500, "TypeError: cannot read x", "Internal Server Error"),
         RetryableSendError, "http_500"),
        (400, evo_error(400, ["number must be a string"]), PermanentSendError, "bad_request"),
    ],
)  # fmt: skip
async def test_evolution_send_errors(
    evo: EvolutionSender, status: int, body: Any, error: type[SendError], code: str
) -> None:
    with respx.mock(base_url=EVO) as router:
        router.post(f"/message/sendText/{SESSION}").respond(status, json=body)
        with pytest.raises(SendError) as err:
            await evo.send_text(outbound("segredo do cliente"))
    assert type(err.value) is error
    assert err.value.code == code
    assert API_KEY not in str(err.value) and "segredo" not in str(err.value)
    if isinstance(err.value, ThrottledError):
        assert err.value.delay_s == 5.0  # no Retry-After: a default pause


@pytest.mark.parametrize(
    ("state", "status"),
    [("open", "working"), ("connecting", "starting"), ("close", "stopped"), (None, "stopped")],
)
async def test_evolution_session_status(
    evo: EvolutionSender, state: str | None, status: str
) -> None:
    with respx.mock(base_url=EVO) as router:
        route = router.get(f"/instance/connectionState/{SESSION}").respond(
            200, json={"instance": {"instanceName": SESSION, "state": state}}
        )
        got = await evo.session_status()
    assert got == SessionStatus(SESSION, status, state or "")  # type: ignore[arg-type]
    assert route.calls[0].request.headers["apikey"] == API_KEY


async def test_evolution_qr_code(evo: EvolutionSender) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    with respx.mock(base_url=EVO) as router:
        route = router.get(f"/instance/connect/{SESSION}")
        route.respond(
            200, json={"pairingCode": None, "code": "2@abc", "base64": data_url, "count": 1}
        )
        assert await evo.qr_code() == (PNG, "image/png")
        assert route.calls[0].request.headers["apikey"] == API_KEY
        route.respond(200, json={"instance": {"instanceName": SESSION, "state": "open"}})
        with pytest.raises(QrNotAvailableError) as paired:
            await evo.qr_code()
        assert "open" in str(paired.value)
        route.respond(200, json={"count": 0})
        with pytest.raises(QrNotAvailableError):
            await evo.qr_code()
        route.respond(200, json={"base64": "data:image/png;base64,@@not base64@@"})
        with pytest.raises(QrNotAvailableError):
            await evo.qr_code()
        route.respond(404, json=evo_error(404, ['The "tenant-42" instance does not exist']))
        with pytest.raises(ChannelFatalError) as missing:
            await evo.qr_code()
        assert missing.value.code == "session_not_found"


# --- pacing and splitting -----------------------------------------------------------------------


def test_typing_delay() -> None:
    assert typing_delay_s("x" * 100, per_char_ms=30, max_s=8) == pytest.approx(3.0)
    assert typing_delay_s("x" * 1000, per_char_ms=30, max_s=8) == 8
    assert typing_delay_s("", per_char_ms=30, max_s=8) == 0
    assert typing_delay_s("abc", per_char_ms=-5, max_s=8) == 0


def test_split_text_boundaries() -> None:
    assert _split_text("  curto  ") == ["curto"]
    assert _split_text("") == []
    sentences = "Uma frase curta. " * 600  # no newline: cut after a sentence
    parts = _split_text(sentences, 1000)
    assert all(len(p) <= 1000 and p.endswith(".") for p in parts)
    assert " ".join(parts) == sentences.strip()
    solid = "x" * 2500  # no boundary at all: hard cuts
    assert _split_text(solid, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]
