"""The WhatsApp Cloud API channel module: webhook signature and handshake, parsing, splitting,
error classification and the sender. Fixtures are those of the reference note
(/work/shared/reference/whatsapp.md §6); Meta is faked with respx, nothing real is contacted."""

# ruff: noqa: E501  (the fixtures are the reference's JSON, verbatim)

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
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
from chat_pipeline.channels.whatsapp_cloud import (
    DEFAULT_GRAPH_VERSION,
    CloudSender,
    classify_error,
    parse_webhook,
    split_text,
    verify_signature,
    verify_subscription,
)

PNID = "109876543210987"
USER = "5511987654321"
TOKEN = "EAAG-test-token-never-logged"
URL = f"https://graph.facebook.com/{DEFAULT_GRAPH_VERSION}/{PNID}/messages"
METADATA = {"display_phone_number": "15550001111", "phone_number_id": PNID}
CONTACTS = [{"profile": {"name": "Ana Souza"}, "wa_id": USER}]
OUR_WAMID = "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEkE3QjJDOUQ0RTVGNkExQjhDMwA="
T0 = datetime(2024, 11, 22, 18, 26, 40, tzinfo=UTC)  # 1732300000


def envelope(*values: dict[str, Any]) -> dict[str, Any]:
    """One entry with one change per value (reference §3.3)."""
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "730012345678901",
                "changes": [{"field": "messages", "value": value} for value in values],
            }
        ],
    }


def messages_value(*messages: dict[str, Any], pnid: str = PNID) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "metadata": {**METADATA, "phone_number_id": pnid},
        "contacts": CONTACTS,
        "messages": list(messages),
    }


def statuses_value(*statuses: dict[str, Any]) -> dict[str, Any]:
    return {"messaging_product": "whatsapp", "metadata": METADATA, "statuses": list(statuses)}


# --- reference fixtures (§6) --------------------------------------------------------------------

# §6.1
TEXT_BODY = json.loads("""
{"object":"whatsapp_business_account","entry":[{"id":"730012345678901","changes":[{"field":"messages","value":{
  "messaging_product":"whatsapp",
  "metadata":{"display_phone_number":"15550001111","phone_number_id":"109876543210987"},
  "contacts":[{"profile":{"name":"Ana Souza"},"wa_id":"5511987654321"}],
  "messages":[{"from":"5511987654321","id":"wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFjNBNTU0RTIwRUNBQkYzRDQ1QkIyAA==",
               "timestamp":"1732300000","type":"text","text":{"body":"Oi, qual o prazo de entrega?"}}]}}]}]}
""")

# §6.2
BUTTON_REPLY_BODY = json.loads("""
{"object":"whatsapp_business_account","entry":[{"id":"730012345678901","changes":[{"field":"messages","value":{
  "messaging_product":"whatsapp",
  "metadata":{"display_phone_number":"15550001111","phone_number_id":"109876543210987"},
  "contacts":[{"profile":{"name":"Ana Souza"},"wa_id":"5511987654321"}],
  "messages":[{"context":{"from":"15550001111","id":"wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEkE3QjJDOUQ0RTVGNkExQjhDMwA="},
               "from":"5511987654321","id":"wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFjNFQjA3NzE5QUJDMTIzNDU2Nzg5AA==",
               "timestamp":"1732300060","type":"interactive",
               "interactive":{"type":"button_reply","button_reply":{"id":"track_order","title":"Rastrear pedido"}}}]}}]}]}
""")
LIST_REPLY = {
    "type": "interactive",
    "interactive": {
        "type": "list_reply",
        "list_reply": {"id": "faq_shipping", "title": "Frete", "description": "Prazos e valores"},
    },
}
TEMPLATE_BUTTON = {"type": "button", "button": {"payload": "CONFIRM_APPT", "text": "Confirmar"}}

# §6.3
STATUS_SENT = json.loads("""
{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550001111","phone_number_id":"109876543210987"},
 "statuses":[{"id":"wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEkE3QjJDOUQ0RTVGNkExQjhDMwA=","status":"sent","timestamp":"1732300006",
   "recipient_id":"5511987654321","biz_opaque_callback_data":"out_01JD8X6K2M3N",
   "pricing":{"billable":false,"pricing_model":"PMP","type":"free_customer_service","category":"service"}}]}
""")
STATUS_FAILED_131026 = json.loads("""
{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550001111","phone_number_id":"109876543210987"},
 "statuses":[{"id":"wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEkI5QzFEMkUzRjRBNUI2QzdEOAA=","status":"failed","timestamp":"1732300100",
   "recipient_id":"5511900000000",
   "errors":[{"code":131026,"title":"Message undeliverable","message":"Message undeliverable",
              "error_data":{"details":"Message Undeliverable."},
              "href":"https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"}]}]}
""")
ERRORS_131047 = json.loads("""
[{"code":131047,"title":"Re-engagement message","message":"Re-engagement message","error_data":{"details":"Message failed to send because more than 24 hours have passed since the customer last replied to this number."}}]
""")

# §6.4
SEND_OK = json.loads("""
{"messaging_product":"whatsapp","contacts":[{"input":"+55 11 98765-4321","wa_id":"5511987654321"}],
 "messages":[{"id":"wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEkE3QjJDOUQ0RTVGNkExQjhDMwA="}]}
""")
ERR_130429 = json.loads("""
{"error":{"message":"(#130429) Rate limit hit","type":"OAuthException","code":130429,
 "error_data":{"messaging_product":"whatsapp","details":"Cloud API message throughput has been reached."},
 "fbtrace_id":"AfK3x9Qm2LpR7tVb1NcZ0aQ"}}
""")
ERR_131047 = json.loads("""
{"error":{"message":"(#131047) Re-engagement message","type":"OAuthException","code":131047,
 "error_data":{"messaging_product":"whatsapp","details":"Message failed to send because more than 24 hours have passed since the customer last replied to this number."},
 "fbtrace_id":"AbQ7cD2eF9gH1iJ3kL5mN7o"}}
""")
ERR_131026 = json.loads("""
{"error":{"message":"(#131026) Message undeliverable","type":"OAuthException","code":131026,
 "error_data":{"messaging_product":"whatsapp","details":"Message Undeliverable."},"fbtrace_id":"Az1Yb2Xc3Wd4Ve5Uf6Tg7Sh"}}
""")
ERR_190 = json.loads("""
{"error":{"message":"Error validating access token: Session has expired on Friday, 22-Nov-24 10:00:00 PST. The current time is Friday, 22-Nov-24 11:12:13 PST.",
 "type":"OAuthException","code":190,"error_subcode":463,"fbtrace_id":"A8mZ0qR4sT6uV8wX0yZ2aB4"}}
""")


def meta_error(code: int, title: str, details: str | None = None) -> dict[str, Any]:
    """An error body in the shape of §1.4 for codes the reference has no recorded body of."""
    error: dict[str, Any] = {
        "message": f"(#{code}) {title}",
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AtestTrace000000000000",
    }
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    return {"error": error}


# §6.5: exactly these bytes (ASCII-escaped, 505 bytes)
SIGNED_BODY = (
    rb'{"object":"whatsapp_business_account","entry":[{"id":"730012345678901","changes":[{"value":'
    rb'{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550001111",'
    rb'"phone_number_id":"109876543210987"},"contacts":[{"profile":{"name":"Jos\u00e9 Silva"},'
    rb'"wa_id":"5511987654321"}],"messages":[{"from":"5511987654321","id":"wamid.HBgNNTUxMTk4NzY1'
    rb'NDMyMRUCABIYFjNFQjBBMUIyQzNENEU1RjZBN0I4QzkA","timestamp":"1732300000","type":"text",'
    rb'"text":{"body":"Ol\u00e1, preciso de ajuda"}}]},"field":"messages"}]}]}'
)
SIGNED_HEADER = "sha256=d511a1cab75968a8e539522510aa1b08e8e39295172f52bb1f398db1cfc5f456"
APP_SECRET = "fake_app_secret_123"


# --- signature --------------------------------------------------------------------------------


def test_signature_reference_vector() -> None:
    assert len(SIGNED_BODY) == 505
    assert verify_signature(APP_SECRET, SIGNED_BODY, SIGNED_HEADER)
    assert verify_signature(APP_SECRET, SIGNED_BODY, SIGNED_HEADER.upper().replace("SHA", "sha"))


def test_signature_is_over_the_raw_bytes_not_a_reserialisation() -> None:
    reserialised = json.dumps(
        json.loads(SIGNED_BODY), ensure_ascii=False, separators=(",", ":")
    ).encode()
    assert "José".encode() in reserialised  # the same object, other bytes
    assert not verify_signature(APP_SECRET, reserialised, SIGNED_HEADER)
    own = "sha256=009951e0543284954a0470dcc89f0f3ec36eb9a09dfb296defe95b9eab971dc5"
    assert verify_signature(APP_SECRET, reserialised, own)
    assert not verify_signature(APP_SECRET, SIGNED_BODY, own)


@pytest.mark.parametrize(
    ("secret", "body", "header"),
    [
        (APP_SECRET, SIGNED_BODY, None),
        (APP_SECRET, SIGNED_BODY, ""),
        (APP_SECRET, SIGNED_BODY, "sha256="),
        (APP_SECRET, SIGNED_BODY, SIGNED_HEADER[len("sha256=") :]),  # no prefix
        (APP_SECRET, SIGNED_BODY, SIGNED_HEADER.replace("sha256=", "sha1=")),
        (APP_SECRET, SIGNED_BODY, SIGNED_HEADER[:-1]),  # one hex digit short
        (APP_SECRET, SIGNED_BODY, SIGNED_HEADER + "0"),
        (APP_SECRET, SIGNED_BODY, SIGNED_HEADER[:-1] + "g"),  # not hex
        (APP_SECRET, SIGNED_BODY, SIGNED_HEADER[:-1] + "é"),  # not ASCII
        (APP_SECRET, SIGNED_BODY, SIGNED_HEADER[:-1] + ("0" if SIGNED_HEADER[-1] != "0" else "1")),
        (APP_SECRET, SIGNED_BODY.replace(b"ajuda", b"ajudA"), SIGNED_HEADER),  # tampered body
        (APP_SECRET + "x", SIGNED_BODY, SIGNED_HEADER),
        ("", SIGNED_BODY, SIGNED_HEADER),  # an unconfigured secret verifies nothing
    ],
)
def test_signature_rejects(secret: str, body: bytes, header: str | None) -> None:
    assert verify_signature(secret, body, header) is False


# --- subscription handshake -------------------------------------------------------------------


def test_subscription_echoes_the_raw_challenge() -> None:
    query = {"hub.mode": "subscribe", "hub.verify_token": "vt-123", "hub.challenge": "1158201444"}
    assert verify_subscription(query, "vt-123") == "1158201444"


@pytest.mark.parametrize(
    ("query", "token"),
    [
        ({"hub.mode": "subscribe", "hub.verify_token": "other", "hub.challenge": "1"}, "vt-123"),
        ({"hub.mode": "unsubscribe", "hub.verify_token": "vt-123", "hub.challenge": "1"}, "vt-123"),
        ({"hub.verify_token": "vt-123", "hub.challenge": "1"}, "vt-123"),
        ({"hub.mode": "subscribe", "hub.verify_token": "vt-123"}, "vt-123"),
        ({"hub.mode": "subscribe", "hub.verify_token": "vt-123", "hub.challenge": ""}, "vt-123"),
        ({"hub.mode": "subscribe", "hub.challenge": "1"}, "vt-123"),
        ({"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"}, ""),
        ({"hub.mode": "subscribe", "hub.verify_token": "vt-é", "hub.challenge": "1"}, "vt-e"),
    ],
)
def test_subscription_refused(query: dict[str, str], token: str) -> None:
    assert verify_subscription(query, token) is None


# --- parsing ------------------------------------------------------------------------------------


def test_parse_text_reference_fixture() -> None:
    assert parse_webhook(TEXT_BODY) == [
        (
            PNID,
            InboundMessage(
                external_user_id=USER,
                external_message_id="wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFjNBNTU0RTIwRUNBQkYzRDQ1QkIyAA==",
                text="Oi, qual o prazo de entrega?",
                kind="text",
                contact_name="Ana Souza",
                received_at=T0,
                reply_to_external_id=None,
                media={},
            ),
        )
    ]


def test_parse_the_signed_body_keeps_escaped_accents() -> None:
    [(pnid, message)] = parse_webhook(json.loads(SIGNED_BODY))
    assert pnid == PNID
    assert isinstance(message, InboundMessage)
    assert message.text == "Olá, preciso de ajuda"
    assert message.contact_name == "José Silva"
    assert message.received_at is not None and message.received_at.tzinfo is not None
    assert message.received_at == T0


def test_parse_button_reply() -> None:
    [(pnid, message)] = parse_webhook(BUTTON_REPLY_BODY)
    assert pnid == PNID
    assert message == InboundMessage(
        external_user_id=USER,
        external_message_id="wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFjNFQjA3NzE5QUJDMTIzNDU2Nzg5AA==",
        text="Rastrear pedido",
        kind="interactive",
        contact_name="Ana Souza",
        received_at=T0 + timedelta(seconds=60),
        reply_to_external_id=OUR_WAMID,
        media={"type": "button_reply", "id": "track_order"},
    )


def _replace_first_message(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    message = body["entry"][0]["changes"][0]["value"]["messages"][0]
    for key in ("type", "interactive", "text"):
        message.pop(key, None)
    message.update(fields)
    return body


def test_parse_list_reply() -> None:
    [(_, message)] = parse_webhook(_replace_first_message(BUTTON_REPLY_BODY, **LIST_REPLY))
    assert isinstance(message, InboundMessage)
    assert (message.kind, message.text) == ("interactive", "Frete")
    assert message.media == {
        "type": "list_reply",
        "id": "faq_shipping",
        "description": "Prazos e valores",
    }
    assert message.reply_to_external_id == OUR_WAMID


def test_parse_template_quick_reply_button() -> None:
    [(_, message)] = parse_webhook(_replace_first_message(BUTTON_REPLY_BODY, **TEMPLATE_BUTTON))
    assert isinstance(message, InboundMessage)
    assert (message.kind, message.text) == ("interactive", "Confirmar")
    assert message.media == {"type": "button", "id": "CONFIRM_APPT"}


def _message(mtype: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {
        "from": USER,
        "id": f"wamid.{mtype}.{uuid.uuid4().hex}",
        "timestamp": "1732300000",
        "type": mtype,
        mtype: content,
        **extra,
    }


def _parse_one(raw: dict[str, Any]) -> InboundMessage:
    parsed = parse_webhook(envelope(messages_value(raw)))
    assert len(parsed) == 1, parsed
    assert parsed[0][0] == PNID
    message = parsed[0][1]
    assert isinstance(message, InboundMessage)
    assert message.external_message_id == raw["id"]
    assert message.external_user_id == USER
    return message


@pytest.mark.parametrize(
    ("mtype", "content", "text", "media"),
    [
        (
            "image",
            {"caption": "my order", "mime_type": "image/jpeg", "sha256": "abc=", "id": "9001"},
            "[image] my order",
            {"type": "image", "id": "9001", "mime_type": "image/jpeg"},
        ),
        (
            "video",
            {"mime_type": "video/mp4", "sha256": "abc=", "id": "9002"},
            "[video]",
            {"type": "video", "id": "9002", "mime_type": "video/mp4"},
        ),
        (
            "audio",
            {"mime_type": "audio/ogg; codecs=opus", "sha256": "abc=", "id": "9003", "voice": True},
            "[voice message]",
            {"type": "audio", "id": "9003", "mime_type": "audio/ogg; codecs=opus"},
        ),
        (
            "audio",
            {"mime_type": "audio/mpeg", "id": "9004"},
            "[audio]",
            {"type": "audio", "id": "9004", "mime_type": "audio/mpeg"},
        ),
        (
            "document",
            {
                "caption": "segunda via",
                "filename": "invoice.pdf",
                "mime_type": "application/pdf",
                "sha256": "abc=",
                "id": "9005",
            },
            "[document: invoice.pdf] segunda via",
            {
                "type": "document",
                "id": "9005",
                "mime_type": "application/pdf",
                "filename": "invoice.pdf",
            },
        ),
        (
            "sticker",
            {"mime_type": "image/webp", "sha256": "abc=", "id": "9006", "animated": False},
            "[sticker]",
            {"type": "sticker", "id": "9006", "mime_type": "image/webp"},
        ),
    ],
)
def test_parse_media(mtype: str, content: dict[str, Any], text: str, media: dict[str, str]) -> None:
    message = _parse_one(_message(mtype, content))
    assert (message.kind, message.text, message.media) == ("media", text, media)
    assert message.contact_name == "Ana Souza"
    assert message.received_at == T0


def test_parse_location() -> None:
    message = _parse_one(
        _message(
            "location",
            {
                "latitude": -23.5505,
                "longitude": -46.6333,
                "name": "Loja Centro",
                "address": "Praça da Sé, São Paulo",
            },
        )
    )
    assert message.kind == "location"
    assert message.text == "[location] Loja Centro, Praça da Sé, São Paulo (-23.5505, -46.6333)"
    assert message.media == {
        "type": "location",
        "latitude": "-23.5505",
        "longitude": "-46.6333",
        "name": "Loja Centro",
        "address": "Praça da Sé, São Paulo",
    }
    bare = _parse_one(_message("location", {"latitude": 1.5, "longitude": 2}))
    assert bare.text == "[location] (1.5, 2)"


def test_parse_contacts() -> None:
    message = _parse_one(
        _message(
            "contacts",
            [
                {
                    "name": {"formatted_name": "Bruno Lima", "first_name": "Bruno"},
                    "phones": [{"phone": "+55 11 91234-5678", "wa_id": "5511912345678"}],
                },
                {"name": {"formatted_name": "Carla"}},
            ],
        )
    )
    assert message.kind == "contacts"
    assert message.text == "[contacts] Bruno Lima +55 11 91234-5678; Carla"
    assert message.media == {"type": "contacts"}


def test_parse_unsupported() -> None:
    raw = {
        "from": USER,
        "id": "wamid.unsupported.1",
        "timestamp": "1732300000",
        "type": "unsupported",
        "unsupported": {"type": "video_note"},
        "errors": [
            {
                "code": 131051,
                "title": "Message type unknown",
                "message": "Message type unknown",
                "error_data": {"details": "Message type is currently not supported."},
            }
        ],
    }
    message = _parse_one(raw)
    assert message.kind == "unsupported"
    assert message.text == (
        "[unsupported message: video_note] "
        "(Message type unknown: Message type is currently not supported.)"
    )
    assert message.media == {"type": "video_note"}
    bare = _parse_one({**raw, "id": "wamid.unsupported.2", "unsupported": None, "errors": []})
    assert (bare.kind, bare.text) == ("unsupported", "[unsupported message]")


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (
            _message("order", {"catalog_id": "1", "product_items": []}),
            "[unsupported message type: order]",
        ),
        (_message("system", {"body": "changed number"}), "[unsupported message type: system]"),
        (
            _message("interactive", {"type": "nfm_reply", "nfm_reply": {"response_json": "{}"}}),
            "[unsupported message: interactive nfm_reply]",
        ),
        (_message("reaction", {"message_id": OUR_WAMID, "emoji": "👍"}), "[reaction 👍]"),
        (_message("reaction", {"message_id": OUR_WAMID}), "[reaction removed]"),
    ],
)
def test_parse_types_the_bot_cannot_read_say_what_arrived(raw: dict[str, Any], text: str) -> None:
    message = _parse_one(raw)
    assert (message.kind, message.text) == ("unsupported", text)
    if raw["type"] == "reaction":
        assert message.media["type"] == "reaction"
        assert message.reply_to_external_id == OUR_WAMID


def test_parse_text_reply_keeps_the_quoted_id_and_business_scoped_sender() -> None:
    raw = _message("text", {"body": "sim"}, context={"from": "15550001111", "id": OUR_WAMID})
    assert _parse_one(raw).reply_to_external_id == OUR_WAMID
    # a user with a username: no phone number, only a business-scoped id (and the contact's name)
    value = messages_value(
        {k: v for k, v in raw.items() if k != "from"} | {"from_user_id": "BR.1502576394655843"}
    )
    value["contacts"] = [{"profile": {"name": "Maria"}, "user_id": "BR.1502576394655843"}]
    [(_, message)] = parse_webhook(envelope(value))
    assert isinstance(message, InboundMessage)
    assert (message.external_user_id, message.contact_name) == ("BR.1502576394655843", "Maria")


def _with_status(status: str, timestamp: str) -> dict[str, Any]:
    value: dict[str, Any] = copy.deepcopy(STATUS_SENT)
    value["statuses"][0].update(status=status, timestamp=timestamp)
    return value


def test_parse_statuses() -> None:
    body = envelope(
        STATUS_SENT,
        _with_status("delivered", "1732300007"),
        _with_status("read", "1732300042"),
        _with_status("played", "1732300043"),
        _with_status("deleted", "1732300044"),  # not a delivery status: skipped
    )
    parsed = parse_webhook(body)
    # the fixture carries our tracking tag (biz_opaque_callback_data): it comes back
    assert {update.callback_data for _, update in parsed} == {"out_01JD8X6K2M3N"}
    parsed = [(key, dataclasses.replace(u, callback_data=None)) for key, u in parsed]
    assert parsed == [
        (PNID, StatusUpdate(OUR_WAMID, "sent", at=T0 + timedelta(seconds=6))),
        (PNID, StatusUpdate(OUR_WAMID, "delivered", at=T0 + timedelta(seconds=7))),
        (PNID, StatusUpdate(OUR_WAMID, "read", at=T0 + timedelta(seconds=42))),
        (PNID, StatusUpdate(OUR_WAMID, "read", at=T0 + timedelta(seconds=43))),
    ]


def test_parse_failed_statuses() -> None:
    window = copy.deepcopy(STATUS_FAILED_131026)
    window["statuses"][0]["errors"] = ERRORS_131047
    [(_, undeliverable), (_, closed)] = parse_webhook(envelope(STATUS_FAILED_131026, window))
    assert undeliverable == StatusUpdate(
        external_message_id="wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEkI5QzFEMkUzRjRBNUI2QzdEOAA=",
        status="failed",
        error_code="131026",
        error_text="Message undeliverable",  # details only repeat the title
        at=T0 + timedelta(seconds=100),
    )
    assert isinstance(closed, StatusUpdate)
    assert closed.error_code == "131047"
    assert closed.error_text == (
        "Re-engagement message: Message failed to send because more than 24 hours have passed "
        "since the customer last replied to this number."
    )


def test_parse_several_entries_and_changes_in_body_order() -> None:
    other = "200000000000001"
    body = envelope(messages_value(_message("text", {"body": "first"})), STATUS_SENT)
    body["entry"].append(
        {
            "id": "730012345678902",
            "changes": [
                {"field": "message_template_status_update", "value": {"event": "APPROVED"}},
                {
                    "field": "messages",
                    "value": messages_value(
                        _message("text", {"body": "second"}),
                        _message("text", {"body": "third"}),
                        pnid=other,
                    ),
                },
            ],
        }
    )
    parsed = parse_webhook(body)
    summary = [
        (pnid, item.text if isinstance(item, InboundMessage) else item.status)
        for pnid, item in parsed
    ]
    assert summary == [
        (PNID, "first"),
        (PNID, "sent"),
        (other, "second"),
        (other, "third"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        None,
        "whatsapp_business_account",
        b"{}",
        [],
        [TEXT_BODY],
        {},
        {"object": "page", "entry": TEXT_BODY["entry"]},  # another product's webhook
        {"object": "whatsapp_business_account"},
        {"object": "whatsapp_business_account", "entry": {"id": "1"}},
        {"object": "whatsapp_business_account", "entry": [None, 1, "x", {"changes": None}]},
        envelope(None),  # type: ignore[arg-type]
        envelope({"messages": TEXT_BODY["entry"][0]["changes"][0]["value"]["messages"]}),
        envelope(
            {**messages_value(_message("text", {"body": "x"})), "metadata": {"phone_number_id": 5}}
        ),
        envelope({**messages_value(), "messages": {"id": "x"}}),
    ],
)
def test_parse_not_a_whatsapp_body_or_unroutable_gives_nothing(body: Any) -> None:
    assert parse_webhook(body) == []


def test_parse_skips_malformed_items_and_keeps_the_rest() -> None:
    good = _message("text", {"body": "kept"})
    bad_timestamp = _message("text", {"body": "no time"}, timestamp="yesterday")
    huge_timestamp = _message("text", {"body": "far future"}, timestamp="1e300")
    body = envelope(
        messages_value(
            {**good, "id": None},
            {**good, "from": ""},
            _message("text", {"body": 42}),
            _message("text", "just a string"),
            {k: v for k, v in good.items() if k != "type"},
            _message("image", {"mime_type": "image/jpeg"}),  # no media id
            _message("interactive", {"type": "button_reply", "button_reply": {"id": "x"}}),
            _message("location", {"latitude": "1"}),
            _message("contacts", []),
            good,
            bad_timestamp,
            huge_timestamp,
        ),
        statuses_value(
            {"status": "read", "timestamp": "1"},  # no id
            {"id": "wamid.x", "status": 3},
            "not a status",  # type: ignore[arg-type]
            {"id": "wamid.y", "status": "failed", "errors": [{"code": True, "title": 7}]},
        ),
    )
    parsed = parse_webhook(body)
    assert [item.external_message_id for _, item in parsed] == [
        good["id"],
        bad_timestamp["id"],
        huge_timestamp["id"],
        "wamid.y",
    ]
    times = [item.received_at for _, item in parsed[:3] if isinstance(item, InboundMessage)]
    assert times == [T0, None, None]
    failed = parsed[3][1]
    assert isinstance(failed, StatusUpdate)
    assert (failed.status, failed.error_code, failed.error_text) == ("failed", None, None)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*path, index))


def _replaced(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    body = copy.deepcopy(body)
    node = body
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return body


def test_parse_never_raises_on_any_single_corruption_of_the_fixtures() -> None:
    fixtures = [
        TEXT_BODY,
        BUTTON_REPLY_BODY,
        _replace_first_message(BUTTON_REPLY_BODY, **LIST_REPLY),
        _replace_first_message(BUTTON_REPLY_BODY, **TEMPLATE_BUTTON),
        json.loads(SIGNED_BODY),
        envelope(STATUS_SENT, STATUS_FAILED_131026),
        envelope(
            messages_value(
                _message("image", {"id": "1", "caption": "c", "mime_type": "image/png"}),
                _message("location", {"latitude": 1, "longitude": 2, "name": "n"}),
                _message(
                    "contacts", [{"name": {"formatted_name": "A"}, "phones": [{"phone": "1"}]}]
                ),
                _message("reaction", {"message_id": "m", "emoji": "x"}),
                {
                    **_message("unsupported", {"type": "x"}),
                    "errors": [{"code": 131051, "title": "t", "error_data": {"details": "d"}}],
                },
            )
        ),
    ]
    weird: list[Any] = [None, 0, -1, 1e309, True, "", "x", [], {}, [None], {"": None}]
    calls = 0
    for body in fixtures:
        for path in _paths(body):
            for value in weird:
                result = parse_webhook(_replaced(body, path, value))
                assert isinstance(result, list)
                calls += 1
    assert calls > 1000


# --- splitting --------------------------------------------------------------------------------


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _assert_faithful(text: str, parts: list[str], limit: int) -> None:
    assert parts, "a non-blank text gives parts"
    assert all(0 < len(part) <= limit for part in parts), [len(p) for p in parts]
    assert _squash("".join(parts)) == _squash(text)
    position = 0  # in order, each one a piece of the original
    for part in parts:
        found = text.find(part, position)
        assert found >= position, part[:40]
        position = found + len(part)


def test_split_short_and_blank() -> None:
    assert split_text("Olá!") == ["Olá!"]
    assert split_text("  spaced  ") == ["  spaced  "]
    assert split_text("x" * 4096) == ["x" * 4096]
    assert split_text("") == []
    assert split_text(" \n\t ") == []
    with pytest.raises(ValueError, match="limit"):
        split_text("x", 0)


def test_split_on_sentence_boundaries() -> None:
    sentences = [f"Sentence number {i} says something useful about shipping." for i in range(200)]
    text = " ".join(sentences)  # about 11,000 characters
    parts = split_text(text)
    _assert_faithful(text, parts, 4096)
    assert len(parts) == 3
    assert " ".join(parts) == text  # every cut was at one space between sentences
    assert all(part.endswith("shipping.") for part in parts)
    assert all(len(part) > 4096 - 60 for part in parts[:-1])  # full parts: few messages


def test_split_prefers_a_paragraph_break_over_a_later_sentence_end() -> None:
    first = "A" * 2500 + "."
    second = " ".join(["Another sentence here."] * 150)
    text = f"{first}\n\n{second}"
    parts = split_text(text)
    assert parts[0] == first
    _assert_faithful(text, parts, 4096)


def test_split_sentence_end_with_closing_quote_and_other_scripts() -> None:
    text = "Ele disse: “já enviei.” " * 5
    parts = split_text(text, limit=40)
    _assert_faithful(text, parts, 40)
    assert all(part.endswith("enviei.”") for part in parts)
    cjk = "这是一个句子。" * 12  # no spaces between sentences
    parts = split_text(cjk, limit=30)
    assert "".join(parts) == cjk
    assert all(len(part) <= 30 and part.endswith("。") for part in parts)


def test_split_falls_back_to_whitespace_then_hard() -> None:
    words = " ".join(["palavra"] * 1500)  # no sentence ends
    parts = split_text(words)
    _assert_faithful(words, parts, 4096)
    assert all(not part.startswith(" ") and not part.endswith(" ") for part in parts)
    assert all(part.split() == ["palavra"] * len(part.split()) for part in parts)  # no word cut

    unbroken = "".join(chr(0x61 + i % 26) for i in range(10_000))
    parts = split_text(unbroken)
    assert [len(part) for part in parts] == [4096, 4096, 1808]
    assert "".join(parts) == unbroken


def test_split_randomised_texts_stay_faithful() -> None:
    rng = random.Random(1234)
    alphabet = ["a", "b", "é", "🙂", " ", " ", "\n", ".", "!", "?", "\n\n", "”"]
    for _ in range(300):
        limit = rng.randint(1, 120)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 600)))
        parts = split_text(text, limit=limit)
        if not text.strip():
            assert parts == []
        else:
            _assert_faithful(text, parts, limit)


# --- error classification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "cls", "code", "extra"),
    [
        # recorded bodies (reference §6.4)
        (400, ERR_130429, ThrottledError, "130429", {"scope": "channel", "delay_s": 2.0}),
        (429, ERR_130429, ThrottledError, "130429", {"scope": "channel", "delay_s": 2.0}),
        (400, ERR_131047, PermanentSendError, "131047", {}),
        (400, ERR_131026, PermanentSendError, "131026", {}),
        (401, ERR_190, ChannelFatalError, "190", {}),
        (400, ERR_190, ChannelFatalError, "190", {}),  # by code, whatever the status
        # the classification table (§2.1)
        (
            400,
            meta_error(4, "Application request limit reached"),
            ThrottledError,
            "4",
            {"scope": "channel", "delay_s": 60.0},
        ),
        (
            400,
            meta_error(613, "Calls exceeded the rate limit"),
            ThrottledError,
            "613",
            {"scope": "channel", "delay_s": 60.0},
        ),
        (
            400,
            meta_error(80007, "Rate limit issues"),
            ThrottledError,
            "80007",
            {"scope": "channel", "delay_s": 120.0},
        ),
        (
            400,
            meta_error(131056, "(Business Account, Consumer Account) pair rate limit hit"),
            ThrottledError,
            "131056",
            {"scope": "recipient", "delay_s": 6.0},
        ),
        (
            500,
            meta_error(1, "An unknown error occurred"),
            RetryableSendError,
            "1",
            {"ambiguous": True},
        ),
        (
            503,
            meta_error(2, "Service temporarily unavailable"),
            RetryableSendError,
            "2",
            {"ambiguous": True},
        ),
        (
            500,
            meta_error(131000, "Something went wrong"),
            RetryableSendError,
            "131000",
            {"ambiguous": True},
        ),
        (
            503,
            meta_error(131016, "Service unavailable"),
            RetryableSendError,
            "131016",
            {"ambiguous": True},
        ),
        (400, meta_error(100, "Invalid parameter"), PermanentSendError, "100", {}),
        (
            400,
            meta_error(131008, "Required parameter is missing"),
            PermanentSendError,
            "131008",
            {},
        ),
        (400, meta_error(131009, "Parameter value is not valid"), PermanentSendError, "131009", {}),
        (
            400,
            meta_error(131030, "Recipient phone number not in allowed list"),
            PermanentSendError,
            "131030",
            {},
        ),
        (400, meta_error(131048, "Spam rate limit hit"), PermanentSendError, "131048", {}),
        (400, meta_error(131051, "Unsupported message type"), PermanentSendError, "131051", {}),
        (
            400,
            meta_error(132000, "Number of parameters does not match"),
            PermanentSendError,
            "132000",
            {},
        ),
        (400, meta_error(132001, "Template does not exist"), PermanentSendError, "132001", {}),
        (403, meta_error(10, "Permission denied"), ChannelFatalError, "10", {}),
        (403, meta_error(200, "Permission error"), ChannelFatalError, "200", {}),
        (403, meta_error(299, "Permission error"), ChannelFatalError, "299", {}),
        (
            400,
            meta_error(368, "Temporarily blocked for policies violations"),
            ChannelFatalError,
            "368",
            {},
        ),
        (400, meta_error(131031, "Account has been locked"), ChannelFatalError, "131031", {}),
        (
            400,
            meta_error(131042, "Business eligibility payment issue"),
            ChannelFatalError,
            "131042",
            {},
        ),
        (400, {"error": {"code": "190", "message": "string code"}}, ChannelFatalError, "190", {}),
        # unknown codes and bodies: by HTTP status
        (400, meta_error(999999, "Something new"), PermanentSendError, "999999", {}),
        (
            502,
            meta_error(999999, "Something new"),
            RetryableSendError,
            "999999",
            {"ambiguous": True},
        ),
        (429, None, ThrottledError, None, {"scope": "channel", "delay_s": 5.0}),
        (502, None, RetryableSendError, None, {"ambiguous": True}),
        (504, "<html>Gateway Timeout</html>", RetryableSendError, None, {"ambiguous": True}),
        (404, {"unexpected": True}, PermanentSendError, None, {}),
        (400, {"error": {"code": True}}, PermanentSendError, None, {}),
    ],
)
def test_classify_error(
    status: int, body: Any, cls: type[SendError], code: str | None, extra: dict[str, Any]
) -> None:
    error = classify_error(status, body, None)
    assert type(error) is cls
    assert error.code == code
    for name, value in extra.items():
        assert getattr(error, name) == value, name
    assert f"HTTP {status}" in str(error)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        assert str(body["error"].get("message", ""))[:40] in str(error)


def _throttled(status: int, body: Any, retry_after: str | None) -> ThrottledError:
    error = classify_error(status, body, retry_after)
    assert isinstance(error, ThrottledError)
    return error


def test_classify_error_honours_retry_after() -> None:
    assert _throttled(400, ERR_130429, "17").delay_s == 17.0
    pair = _throttled(400, meta_error(131056, "pair"), "9.5")
    assert (pair.delay_s, pair.scope) == (9.5, "recipient")
    assert _throttled(429, None, "3").delay_s == 3.0
    retry = classify_error(503, meta_error(131016, "Service unavailable"), "30")
    assert isinstance(retry, RetryableSendError) and retry.retry_after_s == 30.0
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    dated = classify_error(503, None, when)
    assert isinstance(dated, RetryableSendError) and dated.retry_after_s is not None
    assert 100 < dated.retry_after_s <= 120
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    assert _throttled(429, None, past).delay_s == 0.0
    for junk in ("", "soon", "nan", "inf"):
        assert _throttled(400, ERR_130429, junk).delay_s == 2.0


def test_classify_error_caps_meta_text() -> None:
    error = classify_error(400, meta_error(100, "x" * 5000, "y" * 5000), None)
    assert len(str(error)) <= 300
    assert str(error).startswith("HTTP 400, code 100: (#100) xxx")
    detailed = classify_error(400, ERR_131047, None)
    assert "more than 24 hours" in str(detailed) and "AbQ7cD2eF9gH1iJ3kL5mN7o" in str(detailed)


# --- sender -----------------------------------------------------------------------------------


def outbound(text: str, reply_to: str | None = None, recipient: str = USER) -> OutboundText:
    return OutboundText(
        message_id=uuid.uuid4(),
        conversation_id=uuid.uuid4(),
        recipient=recipient,
        text=text,
        reply_to_external_id=reply_to,
    )


def sent_ids(error: SendError) -> tuple[str, ...]:
    """The documented extra attribute on errors raised by `send_text`."""
    ids = error.sent_external_ids  # type: ignore[attr-defined]
    assert isinstance(ids, tuple)
    return ids


def ok(wamid: str) -> httpx.Response:
    return httpx.Response(200, json={**SEND_OK, "messages": [{"id": wamid}]})


# Building a client's TLS context (loading the CA bundle) costs ~30 ms: build it once.
_TLS = ssl.create_default_context()


@pytest.fixture
async def sender() -> AsyncIterator[CloudSender]:
    async with httpx.AsyncClient(verify=_TLS) as http:
        cloud = CloudSender(PNID, TOKEN, http=http)
        yield cloud
        await cloud.aclose()


@pytest.fixture
def meta() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as router:
        yield router


def sent_json(route: respx.Route) -> list[Any]:
    return [json.loads(call.request.content) for call in route.calls]


async def test_send_text_payload_and_headers(sender: CloudSender, meta: respx.MockRouter) -> None:
    route = meta.post(URL).mock(return_value=httpx.Response(200, json=SEND_OK))
    message = outbound("Seu pedido sai amanhã.")
    result = await sender.send_text(message)
    assert result.external_ids == (OUR_WAMID,)
    request = route.calls.last.request
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": USER,
        "type": "text",
        "text": {"preview_url": False, "body": "Seu pedido sai amanhã."},
        # echoed in the status webhooks: an ambiguous send is settled by them
        "biz_opaque_callback_data": str(message.message_id),
    }
    assert request.extensions["timeout"]["read"] == 15.0


async def test_send_text_reply_to_goes_on_the_first_part_only(
    sender: CloudSender, meta: respx.MockRouter
) -> None:
    text = " ".join(f"Frase {i} da resposta longa." for i in range(600))  # ~16,000 chars
    expected = split_text(text)
    assert len(expected) >= 3
    ids = [f"wamid.part{i}" for i in range(len(expected))]
    route = meta.post(URL).mock(side_effect=[ok(wamid) for wamid in ids])
    result = await sender.send_text(outbound(text, reply_to="wamid.question"))
    assert result.external_ids == tuple(ids)
    bodies = sent_json(route)
    assert [body["text"]["body"] for body in bodies] == expected
    assert bodies[0]["context"] == {"message_id": "wamid.question"}
    assert all("context" not in body for body in bodies[1:])


async def test_send_text_skips_the_parts_an_earlier_attempt_sent(
    sender: CloudSender, meta: respx.MockRouter
) -> None:
    text = " ".join(f"Frase {i} da resposta longa." for i in range(600))
    expected = split_text(text)
    route = meta.post(URL).mock(side_effect=[ok(f"wamid.p{i}") for i in range(len(expected))])
    message = dataclasses.replace(outbound(text), skip_parts=2)
    result = await sender.send_text(message)
    assert [body["text"]["body"] for body in sent_json(route)] == expected[2:]
    assert len(result.external_ids) == len(expected) - 2


async def test_send_text_to_a_business_scoped_id_uses_recipient(
    sender: CloudSender, meta: respx.MockRouter
) -> None:
    route = meta.post(URL).mock(return_value=ok("wamid.bsuid"))
    await sender.send_text(outbound("oi", recipient="BR.1502576394655843"))
    body = sent_json(route)[0]
    assert body["recipient"] == "BR.1502576394655843" and "to" not in body


async def test_send_text_base_url_and_version(meta: respx.MockRouter) -> None:
    route = meta.post(f"http://127.0.0.1:9/graph/v21.0/{PNID}/messages").mock(
        return_value=ok("wamid.v21")
    )
    async with httpx.AsyncClient(verify=_TLS) as http:
        cloud = CloudSender(
            PNID, TOKEN, base_url="http://127.0.0.1:9/graph/", version="21.0", http=http
        )
        assert (await cloud.send_text(outbound("x"))).external_ids == ("wamid.v21",)
        await cloud.aclose()
        assert not http.is_closed  # the caller's client stays the caller's
    assert route.call_count == 1


async def test_owned_client_is_closed() -> None:
    cloud = CloudSender(PNID, TOKEN)
    await cloud.aclose()
    assert cloud._http.is_closed


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (400, ERR_130429, ThrottledError, "130429"),
        (429, ERR_130429, ThrottledError, "130429"),
        (400, ERR_131047, PermanentSendError, "131047"),
        (400, ERR_131026, PermanentSendError, "131026"),
        (401, ERR_190, ChannelFatalError, "190"),
        (500, meta_error(131000, "Something went wrong"), RetryableSendError, "131000"),
    ],
)
async def test_send_text_raises_the_classified_error(
    sender: CloudSender,
    meta: respx.MockRouter,
    status: int,
    body: dict[str, Any],
    cls: type[SendError],
    code: str,
) -> None:
    meta.post(URL).mock(return_value=httpx.Response(status, json=body))
    with pytest.raises(cls) as caught:
        await sender.send_text(outbound("oi"))
    assert caught.value.code == code
    assert sent_ids(caught.value) == ()


async def test_send_text_retry_after_header(sender: CloudSender, meta: respx.MockRouter) -> None:
    meta.post(URL).mock(
        return_value=httpx.Response(429, json=ERR_130429, headers={"Retry-After": "11"})
    )
    with pytest.raises(ThrottledError) as caught:
        await sender.send_text(outbound("oi"))
    assert (caught.value.delay_s, caught.value.scope) == (11.0, "channel")


async def test_part_two_of_three_fails_keeps_the_sent_ids(
    sender: CloudSender, meta: respx.MockRouter
) -> None:
    text = " ".join(["Uma frase curta."] * 600)  # ~10,200 chars: three parts
    assert len(split_text(text)) == 3
    route = meta.post(URL).mock(
        side_effect=[
            ok("wamid.p1"),
            httpx.Response(400, json=meta_error(131056, "pair rate limit hit")),
            ok("wamid.p3"),
        ]
    )
    with pytest.raises(ThrottledError) as caught:
        await sender.send_text(outbound(text, reply_to="wamid.q"))
    assert caught.value.scope == "recipient"
    assert sent_ids(caught.value) == ("wamid.p1",)
    assert route.call_count == 2  # part 3 was not attempted


@pytest.mark.parametrize(
    ("exc", "ambiguous"),
    [
        (httpx.ConnectError("refused"), False),
        (httpx.ConnectTimeout("slow connect"), False),
        (httpx.PoolTimeout("no free connection"), False),
        (httpx.ReadTimeout("no answer"), True),
        (httpx.WriteTimeout("half written"), True),
        (httpx.RemoteProtocolError("server disconnected without sending a response"), True),
        (httpx.ReadError("connection reset"), True),
    ],
)
async def test_transport_failures(
    sender: CloudSender, meta: respx.MockRouter, exc: Exception, ambiguous: bool
) -> None:
    meta.post(URL).mock(side_effect=exc)
    with pytest.raises(RetryableSendError) as caught:
        await sender.send_text(outbound("oi"))
    assert caught.value.ambiguous is ambiguous
    assert sent_ids(caught.value) == ()


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json={"messaging_product": "whatsapp", "messages": []}),
        httpx.Response(200, text="<html>ok</html>"),
        httpx.Response(200, json={"messages": [{"id": ""}]}),
    ],
)
async def test_accepted_without_an_id_is_ambiguous(
    sender: CloudSender, meta: respx.MockRouter, response: httpx.Response
) -> None:
    meta.post(URL).mock(return_value=response)
    with pytest.raises(RetryableSendError) as caught:
        await sender.send_text(outbound("oi"))
    assert caught.value.ambiguous is True


async def test_empty_reply_is_permanent_without_a_request(
    sender: CloudSender, meta: respx.MockRouter
) -> None:
    route = meta.post(URL).mock(return_value=ok("never"))
    with pytest.raises(PermanentSendError) as caught:
        await sender.send_text(outbound("   \n"))
    assert sent_ids(caught.value) == ()
    assert route.call_count == 0


async def test_logs_hold_neither_the_token_nor_the_text(
    sender: CloudSender, meta: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    secret_text = "my card number is 4111 1111 1111 1111"
    meta.post(URL).mock(
        side_effect=[
            httpx.Response(401, json=ERR_190),
            httpx.ReadTimeout("timeout"),
            httpx.Response(500, json=meta_error(131000, "Something went wrong")),
        ]
    )
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        with pytest.raises(SendError):
            await sender.send_text(outbound(secret_text))
    assert await sender.mark_read("wamid.in") is False  # the mock has no response left
    assert "send on" in caplog.text  # the failures were logged
    assert TOKEN not in caplog.text and "4111" not in caplog.text
    assert TOKEN not in repr(sender)


async def test_mark_read_and_typing_payloads(sender: CloudSender, meta: respx.MockRouter) -> None:
    route = meta.post(URL).mock(return_value=httpx.Response(200, json={"success": True}))
    assert await sender.mark_read("wamid.in") is True
    assert await sender.typing("wamid.in") is True
    assert sent_json(route) == [
        {"messaging_product": "whatsapp", "status": "read", "message_id": "wamid.in"},
        {
            "messaging_product": "whatsapp",
            "status": "read",
            "message_id": "wamid.in",
            "typing_indicator": {"type": "text"},
        },
    ]
    assert all(c.request.headers["Authorization"] == f"Bearer {TOKEN}" for c in route.calls)


@pytest.mark.parametrize(
    "outcome",
    [
        httpx.Response(401, json=ERR_190),
        httpx.Response(400, json=meta_error(100, "Invalid parameter")),
        httpx.Response(200, json={"success": False}),
        httpx.Response(200, text="not json"),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        RuntimeError("anything else"),
    ],
)
async def test_mark_read_and_typing_never_raise(
    sender: CloudSender, meta: respx.MockRouter, outcome: httpx.Response | Exception
) -> None:
    meta.post(URL).mock(side_effect=[outcome, outcome])
    assert await sender.mark_read("wamid.in") is False
    assert await sender.typing("wamid.in") is False


def test_sender_requires_its_ids() -> None:
    with pytest.raises(ValueError, match="phone_number_id"):
        CloudSender("", TOKEN)
    with pytest.raises(ValueError, match="access_token"):
        CloudSender(PNID, "")
