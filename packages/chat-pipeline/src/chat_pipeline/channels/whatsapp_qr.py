"""WhatsApp through a QR-paired session: WAHA and Evolution API v2.

Both services run a WhatsApp Web session (Baileys or a browser) that a tenant pairs by scanning
a QR code. This module is pure: it parses their webhooks, checks their webhook authentication,
sends text through their HTTP APIs and reads a session's state and pairing QR. No database,
Redis or queue code; the caller applies statuses forward-only and dedupes.

Ids. A message's external id is the WhatsApp message *key id* (``3EB0C5A1…``) for both services:
WAHA serialises ids as ``<fromMe>_<chatId>_<keyId>[_<participant>]`` and the chat part can change
between ``@c.us`` and ``@lid``, so inbound ids, send results and acks all use the trailing key id.
A contact's external id is the chat id exactly as the service gave it (WAHA ``…@c.us``/``…@lid``,
Evolution ``…@s.whatsapp.net``/``…@lid``); the senders turn it back into what each service
expects (`waha_chat_id`, `evolution_number`).

Groups, status broadcasts, newsletters and our own echoed sends (``fromMe``) are ignored: a bot
answering every message of a group is a ban risk, and replies are one-to-one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import quote

import httpx

from chat_domain.types import DeliveryStatus
from chat_pipeline.channels.base import (
    ChannelFatalError,
    InboundKind,
    InboundMessage,
    OutboundText,
    PermanentSendError,
    RetryableSendError,
    SendError,
    SendResult,
    StatusUpdate,
    ThrottledError,
)

__all__ = [
    "EVOLUTION_SECRET_HEADER",
    "MAX_TEXT_CHARS",
    "WAHA_HMAC_ALGORITHM_HEADER",
    "WAHA_HMAC_HEADER",
    "EvolutionSender",
    "QrEvent",
    "QrNotAvailableError",
    "SessionState",
    "SessionStatus",
    "WahaSender",
    "evolution_number",
    "parse_evolution_webhook",
    "parse_waha_webhook",
    "typing_delay_s",
    "verify_shared_secret",
    "verify_waha_hmac",
    "waha_chat_id",
]

log = logging.getLogger(__name__)

# Cloud API's limit; WhatsApp Web accepts more, but long bubbles read badly and a shared limit
# keeps replies identical across channel kinds.
MAX_TEXT_CHARS: Final = 4096

WAHA_HMAC_HEADER: Final = "X-Webhook-Hmac"
WAHA_HMAC_ALGORITHM_HEADER: Final = "X-Webhook-Hmac-Algorithm"
# Evolution signs nothing; its per-instance webhook config (`webhook.headers`) adds this header
# with the channel's secret to every call. A header, not the URL: URLs end up in access logs.
EVOLUTION_SECRET_HEADER: Final = "X-Webhook-Secret"

SessionState = Literal["working", "starting", "scan_qr", "failed", "stopped"]


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """A QR session's state. Only ``working`` can send; ``scan_qr`` and ``failed`` need the
    tenant (pair again); ``raw`` is the service's own word for it."""

    session: str
    status: SessionState
    raw: str
    at: datetime | None = None  # when the service saw it (WAHA's envelope), to order reports


QrEvent = InboundMessage | StatusUpdate | SessionStatus


class QrNotAvailableError(SendError):
    """No pairing QR right now: the session is already paired, not started, or still producing
    one. Ask for the session status and try again."""


# --- webhook authentication ---------------------------------------------------------------------


def verify_waha_hmac(
    secret: str | bytes | None,
    raw_body: bytes,
    header: str | None,
    *,
    algorithm: str | None = None,
) -> bool:
    """WAHA's ``X-Webhook-Hmac``: hex HMAC-SHA512 of the raw body with the session's
    ``hmac.key``. ``algorithm`` is ``X-Webhook-Hmac-Algorithm`` when the caller has it; anything
    but sha512 is refused rather than trusted."""
    if not secret or not header:
        return False
    if algorithm is not None and algorithm.strip().lower() != "sha512":
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    expected = hmac.new(key, raw_body, hashlib.sha512).hexdigest()
    return hmac.compare_digest(expected.encode(), header.strip().lower().encode())


def verify_shared_secret(expected: str | None, provided: str | None) -> bool:
    """Constant-time check of a per-channel secret (Evolution: the ``X-Webhook-Secret`` header).
    An unset secret never matches."""
    if not expected or not provided:
        return False
    return hmac.compare_digest(expected.encode(), provided.encode())


# --- chat ids -----------------------------------------------------------------------------------

_SKIPPED_CHAT_SUFFIXES: Final = ("@g.us", "@broadcast", "@newsletter")


def _is_direct_chat(chat_id: str) -> bool:
    return "@" in chat_id and not chat_id.endswith(_SKIPPED_CHAT_SUFFIXES)


def _digits(value: str) -> str:
    return "".join(ch for ch in value if ch.isdigit())


def waha_chat_id(recipient: str) -> str:
    """WAHA wants ``<digits>@c.us`` (or an opaque ``@lid``/``@g.us`` id); it rejects
    ``@s.whatsapp.net``, which Evolution-style ids carry. A bare number gets ``@c.us``."""
    if recipient.endswith("@s.whatsapp.net"):
        return recipient.removesuffix("@s.whatsapp.net").split(":")[0] + "@c.us"
    if "@" in recipient:
        return recipient
    return _digits(recipient) + "@c.us"


def evolution_number(recipient: str) -> str:
    """Evolution takes a full JID (``@s.whatsapp.net``, ``@lid``, ``@g.us``) as is, so a chat id
    it gave us goes back unchanged; ``@c.us`` is WAHA's spelling of the same JID. A bare number
    is sent as digits and Evolution applies its own country fixes (BR 9th digit, MX, AR)."""
    if recipient.endswith("@c.us"):
        return recipient.removesuffix("@c.us") + "@s.whatsapp.net"
    if "@" in recipient:
        return recipient
    return _digits(recipient)


def _key_id(message_id: str) -> str:
    """The WhatsApp key id inside a WAHA serialised id (``true_<chat>_<keyId>[_<participant>]``);
    any other string is already a key id."""
    parts = message_id.split("_")
    if len(parts) >= 3 and parts[0] in ("true", "false") and "@" in parts[1]:
        return parts[2]
    return message_id


# --- small JSON helpers (webhook bodies are untrusted) ----------------------------------------


def _obj(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _load(body: Any) -> dict[str, Any] | None:
    if isinstance(body, bytes | bytearray | str):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
    return dict(body) if isinstance(body, Mapping) else None


def _from_epoch(value: Any, *, millis: bool = False) -> datetime | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value / 1000 if millis else value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


# --- message content (Baileys' proto as JSON: Evolution, and WAHA's NOWEB/GOWS `_data`) -------

_WRAPPERS: Final = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
)
# Not something a user wrote to the bot: edits, deletions, reactions, poll votes, key exchange.
_IGNORED_CONTENT: Final = frozenset(
    {
        "protocolMessage",
        "editedMessage",
        "reactionMessage",
        "pollUpdateMessage",
        "senderKeyDistributionMessage",
        "messageContextInfo",
        "keepInChatMessage",
        "pinInChatMessage",
    }
)
_MEDIA: Final = {
    "imageMessage": "image",
    "videoMessage": "video",
    "ptvMessage": "video",
    "audioMessage": "audio",
    "documentMessage": "document",
    "stickerMessage": "sticker",
}

_Content = tuple[InboundKind, str, dict[str, str]]


def _describe_media(media_type: str, caption: str | None) -> str:
    return f"[{media_type}] {caption}" if caption else f"[{media_type}]"


def _location_text(name: Any, address: Any, lat: Any, lng: Any) -> str:
    words = [w for w in (_text(name), _text(address)) if w]
    if isinstance(lat, int | float) and isinstance(lng, int | float):
        words.append(f"({lat}, {lng})")
    return " ".join(["[location]", *words])


def _baileys_content(message: dict[str, Any]) -> _Content | None:
    """What the bot reads from a Baileys message; None when it is nothing to answer."""
    for _ in range(3):  # wrappers nest at most a couple of levels
        inner = next(
            (
                wrapped["message"]
                for wrapper in _WRAPPERS
                if (wrapped := _obj(message.get(wrapper))) and _obj(wrapped.get("message"))
            ),
            None,
        )
        if inner is None:
            break
        message = inner
    keys = [k for k in message if message[k] is not None and k not in _IGNORED_CONTENT]
    if not keys:
        return None
    text = _text(message.get("conversation"))
    if text:
        return "text", text, {}
    ext = _obj(message.get("extendedTextMessage"))
    if ext and _text(ext.get("text")):
        return "text", ext["text"], {}
    buttons = _obj(message.get("buttonsResponseMessage"))
    if buttons:
        title = _text(buttons.get("selectedDisplayText")) or _text(buttons.get("selectedButtonId"))
        if title:
            return "interactive", title, {}
    listed = _obj(message.get("listResponseMessage"))
    if listed:
        row = _obj(listed.get("singleSelectReply")) or {}
        title = _text(listed.get("title")) or _text(row.get("selectedRowId"))
        if title:
            return "interactive", title, {}
    template = _obj(message.get("templateButtonReplyMessage"))
    if template:
        title = _text(template.get("selectedDisplayText")) or _text(template.get("selectedId"))
        if title:
            return "interactive", title, {}
    native = _obj(message.get("interactiveResponseMessage"))
    if native:
        title = _text((_obj(native.get("body")) or {}).get("text"))
        if title:
            return "interactive", title, {}
    for key, media_type in _MEDIA.items():
        media = _obj(message.get(key))
        if media is not None:
            info = {"type": media_type}
            for field_name, out in (("mimetype", "mimetype"), ("fileName", "filename")):
                if _text(media.get(field_name)):
                    info[out] = media[field_name]
            return "media", _describe_media(media_type, _text(media.get("caption"))), info
    for key in ("locationMessage", "liveLocationMessage"):
        loc = _obj(message.get(key))
        if loc is not None:
            text = _location_text(
                loc.get("name"), loc.get("address"), loc.get("degreesLatitude"),
                loc.get("degreesLongitude"),
            )  # fmt: skip
            return "location", text, {}
    contact = _obj(message.get("contactMessage"))
    if contact is not None:
        return "contacts", f"[contacts] {_text(contact.get('displayName')) or ''}".rstrip(), {}
    contacts = _obj(message.get("contactsArrayMessage"))
    if contacts is not None:
        listed_contacts = contacts.get("contacts")
        names = [
            c["displayName"]
            for c in (listed_contacts if isinstance(listed_contacts, list) else [])
            if isinstance(c, dict) and _text(c.get("displayName"))
        ]
        return "contacts", " ".join(["[contacts]", ", ".join(names)]).rstrip(), {}
    return "unsupported", "[unsupported]", {}


def _context_stanza(message: dict[str, Any] | None) -> str | None:
    """The quoted message's key id in a Baileys message (``contextInfo.stanzaId``)."""
    for content in (message or {}).values():
        ctx = _obj(content) and _obj(content.get("contextInfo"))
        if ctx and _text(ctx.get("stanzaId")):
            return str(ctx["stanzaId"])
    return None


# --- status mapping -------------------------------------------------------------------------

# WAHA ack: -1 ERROR, 0 PENDING, 1 SERVER, 2 DEVICE, 3 READ, 4 PLAYED (PENDING says nothing new).
_WAHA_ACK: Final[dict[int, DeliveryStatus]] = {
    -1: "failed",
    1: "sent",
    2: "delivered",
    3: "read",
    4: "read",
}
_WAHA_ACK_NAMES: Final = {
    "ERROR": -1,
    "PENDING": 0,
    "SERVER": 1,
    "DEVICE": 2,
    "READ": 3,
    "PLAYED": 4,
}
# Evolution renders Baileys' WebMessageInfo.Status by name (0 ERROR … 5 PLAYED).
_EVOLUTION_STATUS: Final[dict[str, DeliveryStatus]] = {
    "ERROR": "failed",
    "SERVER_ACK": "sent",
    "DELIVERY_ACK": "delivered",
    "READ": "read",
    "PLAYED": "read",
}
_BAILEYS_STATUS_NAMES: Final = ("ERROR", "PENDING", "SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED")

_WAHA_STATES: Final[dict[str, SessionState]] = {
    "WORKING": "working",
    "STARTING": "starting",
    "SCAN_QR_CODE": "scan_qr",
    # newer pairing steps: still waiting for the tenant's phone
    "PASSKEY_REQUIRED": "scan_qr",
    "PASSKEY_CONFIRMATION_REQUIRED": "scan_qr",
    "FAILED": "failed",
    "STOPPED": "stopped",
}
# Baileys close reasons after which Evolution does not reconnect: the phone logged the session
# out (401), the number is banned (403), or 402/406: only pairing again helps.
_EVOLUTION_FATAL_CLOSE: Final = frozenset({401, 402, 403, 406})


def _waha_state(raw: str) -> SessionState | None:
    return _WAHA_STATES.get(raw.upper())


def _evolution_state(raw: str, reason: Any) -> SessionState | None:
    state = raw.lower()
    if state == "open":
        return "working"
    if state == "connecting":
        return "starting"
    if state == "refused":  # the QR limit ran out: the session ended
        return "failed"
    if state == "close":
        return "failed" if reason in _EVOLUTION_FATAL_CLOSE else "stopped"
    return None


# --- WAHA webhooks ----------------------------------------------------------------------------


def parse_waha_webhook(body: Any) -> list[tuple[str, QrEvent]]:
    """A WAHA webhook (``{id, timestamp, event, session, payload, …}``, as bytes or decoded) as
    ``(session, event)`` pairs. ``message``/``message.any`` become `InboundMessage`s (our own
    sends, groups and broadcasts are dropped), ``message.ack`` a `StatusUpdate` for one of our
    messages, ``session.status`` a `SessionStatus`. Anything else or malformed yields []."""
    try:
        return _parse_waha(body)
    except Exception:  # a webhook must never crash its handler; the body is untrusted
        log.warning("unreadable WAHA webhook body skipped", exc_info=True)
        return []


def _parse_waha(body: Any) -> list[tuple[str, QrEvent]]:
    envelope = _load(body)
    if envelope is None:
        return []
    session = _text(envelope.get("session"))
    event = envelope.get("event")
    payload = _obj(envelope.get("payload"))
    if session is None or payload is None or not isinstance(event, str):
        return []
    item: QrEvent | None = None
    if event in ("message", "message.any"):
        item = _waha_message(payload)
    elif event == "message.ack":
        item = _waha_ack(payload, _from_epoch(envelope.get("timestamp"), millis=True))
    elif event == "session.status":
        raw = _text(payload.get("status"))
        state = _waha_state(raw) if raw else None
        if raw and state:
            at = _from_epoch(envelope.get("timestamp"), millis=True)
            item = SessionStatus(session=session, status=state, raw=raw, at=at)
    return [] if item is None else [(session, item)]


def _waha_from_me(payload: dict[str, Any], message_id: str) -> bool:
    from_me = payload.get("fromMe")
    return from_me if isinstance(from_me, bool) else message_id.startswith("true_")


def _waha_message(payload: dict[str, Any]) -> InboundMessage | None:
    message_id = _text(payload.get("id"))
    chat = _text(payload.get("from"))
    if message_id is None or chat is None or _waha_from_me(payload, message_id):
        return None
    if not _is_direct_chat(chat):
        return None
    data = _obj(payload.get("_data")) or {}
    raw_message = _obj(data.get("message"))  # NOWEB/GOWS: Baileys' own message
    content: _Content | None
    if raw_message is not None:
        content = _baileys_content(raw_message)
        if content is None:
            return None
        if content[0] == "unsupported" and _text(payload.get("body")):
            content = "text", payload["body"], {}
    else:
        content = _waha_plain_content(payload, data)
    kind, text, media = content
    media_obj = _obj(payload.get("media"))
    if kind == "media" and media_obj:
        for key in ("url", "mimetype", "filename"):
            if _text(media_obj.get(key)) and key not in media:
                media = {**media, key: media_obj[key]}
    reply = _obj(payload.get("replyTo"))
    reply_id = _text(reply.get("id")) if reply else None
    if reply_id is None:
        reply_id = _context_stanza(raw_message)
    return InboundMessage(
        external_user_id=chat,
        external_message_id=_key_id(message_id),
        text=text,
        kind=kind,
        contact_name=_text(data.get("pushName")) or _text(data.get("notifyName")),
        received_at=_from_epoch(payload.get("timestamp")),
        reply_to_external_id=_key_id(reply_id) if reply_id else None,
        media=media,
    )


_WEBJS_INTERACTIVE: Final = frozenset(
    {"buttons_response", "list_response", "template_button_reply"}
)
_WEBJS_MEDIA: Final = {
    "image": "image",
    "video": "video",
    "audio": "audio",
    "ptt": "audio",
    "document": "document",
    "sticker": "sticker",
}


def _waha_plain_content(payload: dict[str, Any], data: dict[str, Any]) -> _Content:
    """WAHA's engine-neutral fields (WEBJS has no Baileys message in ``_data``)."""
    body = _text(payload.get("body"))
    webjs_type = _text(data.get("type")) or ""
    media_obj = _obj(payload.get("media")) or {}
    if payload.get("hasMedia") is True or webjs_type in _WEBJS_MEDIA:
        mimetype = _text(media_obj.get("mimetype")) or _text(data.get("mimetype")) or ""
        media_type = _WEBJS_MEDIA.get(webjs_type) or (mimetype.split("/")[0] or "file")
        caption = _text(data.get("caption")) or body
        if caption and len(caption) > 1024 and " " not in caption:
            caption = None  # whatsapp-web.js may put a base64 thumbnail in `body`
        return "media", _describe_media(media_type, caption), {"type": media_type}
    location = _obj(payload.get("location"))
    if location is not None:
        text = _location_text(
            location.get("description"), None, _num(location.get("latitude")),
            _num(location.get("longitude")),
        )  # fmt: skip
        return "location", text, {}
    vcards = payload.get("vCards")
    if isinstance(vcards, list) and vcards:
        names = [
            line[3:].strip()
            for card in vcards
            if isinstance(card, str)
            for line in card.splitlines()
            if line.upper().startswith("FN:")
        ]
        return "contacts", " ".join(["[contacts]", ", ".join(names)]).rstrip(), {}
    if body:
        return ("interactive" if webjs_type in _WEBJS_INTERACTIVE else "text"), body, {}
    return "unsupported", "[unsupported]", {}


def _num(value: Any) -> float | None:
    try:
        return float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _waha_ack(payload: dict[str, Any], at: datetime | None) -> StatusUpdate | None:
    message_id = _text(payload.get("id"))
    if message_id is None or not _waha_from_me(payload, message_id):
        return None  # acks of what others sent us (our own read receipts) are not ours to track
    chat = _text(payload.get("from")) or _text(payload.get("to")) or ""
    if chat and not _is_direct_chat(chat):
        return None
    ack = payload.get("ack")
    if not isinstance(ack, int) or isinstance(ack, bool):
        name = _text(payload.get("ackName"))
        ack = _WAHA_ACK_NAMES.get(name.upper()) if name else None
    status = _WAHA_ACK.get(ack) if isinstance(ack, int) else None
    if status is None:
        return None
    return StatusUpdate(
        external_message_id=_key_id(message_id),
        status=status,
        error_code="ERROR" if status == "failed" else None,
        at=at,
    )


# --- Evolution webhooks -------------------------------------------------------------------------


def parse_evolution_webhook(body: Any) -> list[tuple[str, QrEvent]]:
    """An Evolution API v2 webhook (``{event, instance, data, …}``, as bytes or decoded) as
    ``(instance, event)`` pairs: ``messages.upsert`` → `InboundMessage`, ``messages.update`` →
    `StatusUpdate` (our messages only), ``connection.update``/``qrcode.updated`` →
    `SessionStatus`. Event names are accepted dotted or upper-snake (``MESSAGES_UPSERT``);
    ``data`` may be one object or a list. Anything else or malformed yields []."""
    try:
        return _parse_evolution(body)
    except Exception:  # a webhook must never crash its handler; the body is untrusted
        log.warning("unreadable Evolution webhook body skipped", exc_info=True)
        return []


def _parse_evolution(body: Any) -> list[tuple[str, QrEvent]]:
    envelope = _load(body)
    if envelope is None:
        return []
    instance = _text(envelope.get("instance"))
    event = envelope.get("event")
    if instance is None or not isinstance(event, str):
        return []
    event = event.lower().replace("_", ".").replace("-", ".")
    raw_data = envelope.get("data")
    items = raw_data if isinstance(raw_data, list) else [raw_data]
    out: list[tuple[str, QrEvent]] = []
    for data in items:
        if not isinstance(data, dict):
            continue
        item: QrEvent | None = None
        if event == "messages.upsert":
            item = _evolution_message(data)
        elif event == "messages.update":
            item = _evolution_ack(data)
        elif event == "connection.update":
            raw = _text(data.get("state"))
            state = _evolution_state(raw, data.get("statusReason")) if raw else None
            if raw and state:
                item = SessionStatus(session=instance, status=state, raw=raw)
        elif event == "qrcode.updated":
            item = SessionStatus(session=instance, status="scan_qr", raw="qrcode.updated")
        if item is not None:
            out.append((instance, item))
    return out


def _evolution_message(data: dict[str, Any]) -> InboundMessage | None:
    key = _obj(data.get("key"))
    if key is None or key.get("fromMe") not in (False, None):
        return None  # our own sends come back as upserts too
    key_id = _text(key.get("id"))
    chat = _text(key.get("remoteJid"))
    if key_id is None or chat is None or not _is_direct_chat(chat):
        return None
    message = _obj(data.get("message"))
    if message is None:
        return None
    content = _baileys_content(message)
    if content is None:
        return None
    kind, text, media = content
    context = _obj(data.get("contextInfo"))
    reply_id = _text(context.get("stanzaId")) if context else None
    return InboundMessage(
        external_user_id=chat,
        external_message_id=key_id,
        text=text,
        kind=kind,
        contact_name=_text(data.get("pushName")),
        received_at=_from_epoch(data.get("messageTimestamp")),
        reply_to_external_id=reply_id or _context_stanza(message),
        media=media,
    )


def _evolution_ack(data: dict[str, Any]) -> StatusUpdate | None:
    key = _obj(data.get("key")) or {}
    key_id = _text(data.get("keyId")) or _text(key.get("id"))
    from_me = data.get("fromMe", key.get("fromMe"))
    chat = _text(data.get("remoteJid")) or _text(key.get("remoteJid")) or ""
    if key_id is None or from_me is not True or (chat and not _is_direct_chat(chat)):
        return None
    raw = data.get("status")
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 6:
        raw = _BAILEYS_STATUS_NAMES[raw]
    status = _EVOLUTION_STATUS.get(raw.upper()) if isinstance(raw, str) else None
    if status is None:
        return None
    # No `at`: Evolution's `date_time` is local time labelled UTC, so the caller's clock is better.
    return StatusUpdate(
        external_message_id=key_id,
        status=status,
        error_code="ERROR" if status == "failed" else None,
    )


# --- sending ------------------------------------------------------------------------------------


def typing_delay_s(text: str, *, per_char_ms: float, max_s: float) -> float:
    """How long to show "typing…" before sending ``text``: human pacing lowers the ban risk of
    an automated number. Capped at ``max_s``, never negative."""
    return max(0.0, min(max_s, len(text) * per_char_ms / 1000.0))


def _split_text(text: str, limit: int = MAX_TEXT_CHARS) -> list[str]:
    """Parts of at most ``limit`` characters, cut at a paragraph, line, sentence or word
    boundary in the second half of the window, else hard."""
    rest = text.strip()
    parts: list[str] = []
    while len(rest) > limit:
        window = rest[:limit]
        cut = limit
        for sep in ("\n\n", "\n", ". ", "! ", "? ", " "):
            at = window.rfind(sep)
            if at >= limit // 2:
                cut = at + len(sep)
                break
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), 3600.0)
    except ValueError:
        return None  # an HTTP date: rare for these services, the default delay will do


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_words(body: Any) -> str:
    """The service's own error message (WAHA ``message``/``error``, Evolution
    ``response.message``), flattened and shortened for an exception message."""
    if not isinstance(body, dict):
        return ""
    found: Any = None
    response = _obj(body.get("response"))
    if response is not None:
        found = response.get("message")
    if found is None:
        found = body.get("message") if body.get("message") is not None else body.get("error")
    if isinstance(found, list):
        found = "; ".join(str(x) for x in found if not isinstance(x, dict))
    return str(found)[:200] if isinstance(found, str | int | float) else ""


_DISCONNECTED_WORDS: Final = ("connection closed", "connection failure", "connection lost",
                              "not connected")  # fmt: skip


def _says_disconnected(words: str) -> bool:
    lowered = words.lower()
    return any(w in lowered for w in _DISCONNECTED_WORDS)


def _not_on_whatsapp(body: Any) -> bool:
    """Evolution's ``{"response": {"message": [{"exists": false, …}]}}`` (or our contract's
    ``code: not_on_whatsapp``)."""
    if not isinstance(body, dict):
        return False
    if body.get("code") == "not_on_whatsapp":
        return True
    items = (_obj(body.get("response")) or {}).get("message")
    return isinstance(items, list) and any(
        isinstance(x, dict) and x.get("exists") is False for x in items
    )


class _QrClient:
    """HTTP plumbing shared by both services: one client, the API key header, and transport
    failures mapped to the seam's errors. Error messages name the service, the operation and the
    HTTP status, never a header (the API key) or the text sent."""

    service: str = ""

    def __init__(
        self,
        base_url: str,
        session: str,
        api_key: str | None,
        http: httpx.AsyncClient | None,
        key_header: str,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self._headers = {key_header: api_key} if api_key else {}
        self._own_http = http is None
        # WAHA holds a send up to 5 s waiting for its session; Baileys itself can take seconds.
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0))

    @property
    def _quoted_session(self) -> str:
        return quote(self.session, safe="")

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def _request(
        self,
        what: str,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        accept: str = "application/json",
    ) -> httpx.Response:
        headers = {**self._headers, "Accept": accept}
        try:
            return await self._http.request(
                method, self.base_url + path, json=json_body, params=params, headers=headers
            )
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            # the channel's base_url is wrong: no retry will fix it
            raise ChannelFatalError(
                f"{self.service} {what}: unusable base_url ({type(exc).__name__})",
                code="invalid_base_url",
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # nothing reached the service: a retry cannot send twice
            raise RetryableSendError(
                f"{self.service} {what}: cannot connect ({type(exc).__name__})",
                code="connect_error",
            ) from None
        except httpx.TimeoutException as exc:
            raise RetryableSendError(
                f"{self.service} {what}: no answer in time ({type(exc).__name__})",
                code="timeout",
                ambiguous=True,
            ) from None
        except httpx.HTTPError as exc:
            raise RetryableSendError(
                f"{self.service} {what}: transport error ({type(exc).__name__})",
                code="transport_error",
                ambiguous=True,
            ) from None

    def _classify(self, what: str, response: httpx.Response) -> SendError:
        """The seam's error for a non-2xx answer; `_specific` adds what differs per service."""
        status = response.status_code
        body = _json(response)
        words = _error_words(body)
        label = f"{self.service} {what}: HTTP {status}" + (f" ({words})" if words else "")
        if status in (401, 403):
            return ChannelFatalError(label, code="unauthorized")
        if status == 429:
            return ThrottledError(label, code="rate_limited", delay_s=_retry_after(response) or 5.0)
        if status == 408:  # the server gave up waiting for our request: nothing was processed
            return RetryableSendError(label, code="http_408", retry_after_s=_retry_after(response))
        specific = self._specific(label, status, body, words)
        if specific is not None:
            return specific
        if _says_disconnected(words):
            return ChannelFatalError(label, code="session_not_working")
        if status >= 500:
            # the service may have handed the message to WhatsApp before failing
            return RetryableSendError(
                label,
                code=f"http_{status}",
                retry_after_s=_retry_after(response),
                ambiguous=True,
            )
        if _not_on_whatsapp(body):
            return PermanentSendError(label, code="not_on_whatsapp")
        return PermanentSendError(label, code="bad_request" if status == 400 else f"http_{status}")

    def _specific(self, label: str, status: int, body: Any, words: str) -> SendError | None:
        return None

    def _chat(self, recipient: str) -> str:
        raise NotImplementedError

    async def _send_one(self, chat: str, text: str, reply_to: str | None) -> str | None:
        raise NotImplementedError

    async def send_text(self, message: OutboundText) -> SendResult:
        """Sends the parts in order (skipping `message.skip_parts` an earlier attempt sent).
        When a part fails, the raised `SendError` carries `sent_external_ids` (the ids of the
        parts this call sent before it, as the Cloud sender does) and `sent_parts` (how many
        went out: a service may accept a part without naming its id); they are never sent
        again."""
        parts = _split_text(message.text)
        if not parts:
            error = PermanentSendError(f"{self.service} sendText: empty text", code="empty_text")
            error.sent_external_ids = ()  # type: ignore[attr-defined]
            raise error
        chat = self._chat(message.recipient)
        ids: list[str] = []
        sent = 0
        for index, part in enumerate(parts):
            if index < message.skip_parts:
                continue
            # only the first part quotes the message it answers
            reply_to = message.reply_to_external_id if index == 0 else None
            try:
                sent_id = await self._send_one(chat, part, reply_to)
            except SendError as error:
                error.sent_external_ids = tuple(ids)  # type: ignore[attr-defined]
                error.sent_parts = sent  # type: ignore[attr-defined]
                raise
            sent += 1
            if sent_id is None:
                # sent, but we cannot tell its id: no status will match it; never resend for that
                log.warning(
                    "%s accepted part %d of message %s without a message id",
                    self.service,
                    index + 1,
                    message.message_id,
                )
            else:
                ids.append(sent_id)
        return SendResult(external_ids=tuple(ids))


def _waha_sent_id(body: Any) -> str | None:
    """The key id of a WAHA send answer. Engines differ: NOWEB returns Baileys' message
    (``key.id``), WEBJS whatsapp-web.js' (``id._serialized``/``id.id``), newer engines a
    ``WAMessage`` (``id`` = ``true_<chat>_<keyId>``)."""
    if not isinstance(body, dict):
        return None
    raw = body.get("id")
    if isinstance(raw, str) and raw:
        return _key_id(raw)
    if isinstance(raw, dict):
        found = _text(raw.get("_serialized")) or _text(raw.get("id"))
        if found:
            return _key_id(found)
    key = _obj(body.get("key"))
    found = _text(key.get("id")) if key else None
    return found


class WahaSender(_QrClient):
    """Sends on a WAHA session: ``POST /api/sendText`` with ``X-Api-Key``."""

    service = "WAHA"

    def __init__(
        self,
        base_url: str,
        session: str,
        api_key: str | None,
        http: httpx.AsyncClient | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(base_url, session, api_key, http, "X-Api-Key", timeout)

    def _chat(self, recipient: str) -> str:
        return waha_chat_id(recipient)

    def _specific(self, label: str, status: int, body: Any, words: str) -> SendError | None:
        if status == 404:  # the only 404 of these routes: no such session on this server
            return ChannelFatalError(label, code="session_not_found")
        if status == 422:
            if _not_on_whatsapp(body):
                return PermanentSendError(label, code="not_on_whatsapp")
            # the session is not WORKING (WAHA waited 5 s for it): hold the channel, re-pair
            state = _text(body.get("status")) if isinstance(body, dict) else None
            label += f" [session {state[:40]}]" if state else ""  # the service's words: capped
            return ChannelFatalError(label, code="session_not_working")
        return None

    async def _send_one(self, chat: str, text: str, reply_to: str | None) -> str | None:
        body: dict[str, Any] = {"session": self.session, "chatId": chat, "text": text}
        if reply_to:
            # WAHA wants the serialised id; we keep key ids, and a reply quotes their message
            body["reply_to"] = reply_to if "_" in reply_to else f"false_{chat}_{reply_to}"
        response = await self._request("sendText", "POST", "/api/sendText", json_body=body)
        if not response.is_success:
            raise self._classify("sendText", response)
        return _waha_sent_id(_json(response))

    async def session_status(self) -> SessionStatus:
        """``GET /api/sessions/{session}`` → ``{name, status, …}``."""
        what = "session status"
        response = await self._request(what, "GET", f"/api/sessions/{self._quoted_session}")
        if not response.is_success:
            raise self._classify(what, response)
        body = _json(response)
        raw = _text(body.get("status")) if isinstance(body, dict) else None
        if raw is None:
            raise RetryableSendError(f"WAHA {what}: answer without a status", code="bad_response")
        # an unknown (newer) state is treated as not ready rather than broken
        return SessionStatus(session=self.session, status=_waha_state(raw) or "starting", raw=raw)

    async def qr_code(self) -> tuple[bytes, str]:
        """The pairing QR as (image bytes, content type): ``GET /api/{session}/auth/qr`` with
        ``Accept: image/png`` (a JSON ``{mimetype, data}`` answer is decoded too)."""
        what = "pairing QR"
        response = await self._request(
            what,
            "GET",
            f"/api/{self._quoted_session}/auth/qr",
            params={"format": "image"},
            accept="image/png",
        )
        if response.status_code == 422:  # WAHA: the session is not waiting for a scan
            raise QrNotAvailableError(
                f"WAHA {what}: the session is not waiting for a QR scan", code="qr_not_available"
            )
        if not response.is_success:
            raise self._classify(what, response)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type.startswith("image/"):
            return response.content, content_type
        body = _json(response)
        if isinstance(body, dict) and _text(body.get("data")):
            image = _b64(body["data"])
            if image is not None:
                return image, _text(body.get("mimetype")) or "image/png"
        raise QrNotAvailableError(f"WAHA {what}: the answer holds no image", code="bad_response")

    async def start_typing(self, chat_id: str) -> bool:
        """Best effort ``POST /api/startTyping``; False (never an exception) when it failed."""
        return await self._presence("/api/startTyping", chat_id)

    async def stop_typing(self, chat_id: str) -> bool:
        """Best effort ``POST /api/stopTyping``; False (never an exception) when it failed."""
        return await self._presence("/api/stopTyping", chat_id)

    async def _presence(self, path: str, chat_id: str) -> bool:
        body = {"session": self.session, "chatId": waha_chat_id(chat_id)}
        try:
            response = await self._request("typing", "POST", path, json_body=body)
        except SendError as exc:
            log.debug("WAHA %s failed: %s", path, exc)
            return False
        if not response.is_success:
            log.debug("WAHA %s answered HTTP %d", path, response.status_code)
            return False
        return True


def _b64(value: str) -> bytes | None:
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


class EvolutionSender(_QrClient):
    """Sends on an Evolution API v2 instance: ``POST /message/sendText/{instance}`` with the
    ``apikey`` header (the global key or the instance's token)."""

    service = "Evolution"

    def __init__(
        self,
        base_url: str,
        instance: str,
        api_key: str | None,
        http: httpx.AsyncClient | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(base_url, instance, api_key, http, "apikey", timeout)

    @property
    def instance(self) -> str:
        return self.session

    def _chat(self, recipient: str) -> str:
        return evolution_number(recipient)

    def _specific(self, label: str, status: int, body: Any, words: str) -> SendError | None:
        # Evolution says so with 404 on most routes and 400 on a few (`/instance/connect`)
        if status in (400, 404) and "does not exist" in words and "instance" in words:
            return ChannelFatalError(label, code="session_not_found")
        return None

    async def _send_one(self, chat: str, text: str, reply_to: str | None) -> str | None:
        body: dict[str, Any] = {"number": chat, "text": text}
        if reply_to:
            # Evolution loads the quoted message from its store by key id
            body["quoted"] = {"key": {"id": _key_id(reply_to)}}
        response = await self._request(
            "sendText", "POST", f"/message/sendText/{self._quoted_session}", json_body=body
        )
        if not response.is_success:
            raise self._classify("sendText", response)
        answer = _json(response)  # the stored message: {key: {remoteJid, fromMe, id}, …}
        key = _obj(answer.get("key")) if isinstance(answer, dict) else None
        return _text(key.get("id")) if key else None

    async def session_status(self) -> SessionStatus:
        """``GET /instance/connectionState/{instance}`` → ``{instance: {instanceName, state}}``
        (state open/connecting/close; none when the instance is not loaded)."""
        what = "connection state"
        response = await self._request(
            what, "GET", f"/instance/connectionState/{self._quoted_session}"
        )
        if not response.is_success:
            raise self._classify(what, response)
        body = _json(response)
        inner = _obj(body.get("instance")) if isinstance(body, dict) else None
        if inner is None:
            raise RetryableSendError(
                f"Evolution {what}: answer without an instance", code="bad_response"
            )
        raw = _text(inner.get("state")) or ""
        return SessionStatus(
            session=self.session, status=_evolution_state(raw, None) or "stopped", raw=raw
        )

    async def qr_code(self) -> tuple[bytes, str]:
        """The pairing QR: ``GET /instance/connect/{instance}`` answers ``{pairingCode, code,
        base64: "data:image/png;base64,…", count}`` while pairing (and starts a closed instance),
        or the connection state when already paired."""
        what = "pairing QR"
        response = await self._request(what, "GET", f"/instance/connect/{self._quoted_session}")
        if not response.is_success:
            raise self._classify(what, response)
        body = _json(response)
        data_url = _text(body.get("base64")) if isinstance(body, dict) else None
        if data_url is None:
            state = ""
            if isinstance(body, dict):
                state = str((_obj(body.get("instance")) or {}).get("state") or "")
            raise QrNotAvailableError(
                f"Evolution {what}: no QR" + (f" (state {state})" if state else ""),
                code="qr_not_available",
            )
        content_type = "image/png"
        if data_url.startswith("data:"):
            content_type = data_url[5:].split(";")[0].split(",")[0] or content_type
        image = _b64(data_url)
        if image is None:
            raise QrNotAvailableError(
                f"Evolution {what}: the QR is not base64", code="bad_response"
            )
        return image, content_type
