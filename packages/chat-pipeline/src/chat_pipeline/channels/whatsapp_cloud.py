"""WhatsApp Cloud API (Meta Graph API): webhook verification and parsing, error classification,
text splitting and the sender.

Contract and fixtures: /work/shared/reference/whatsapp.md (see docs/channels.md). Pure
functions plus `CloudSender`; no database, Redis or queue code here.

- `verify_signature` / `verify_subscription`: the webhook's POST signature and GET handshake.
- `parse_webhook`: a webhook body becomes `(phone_number_id, InboundMessage | StatusUpdate)`
  pairs; malformed items are skipped, it never raises.
- `classify_error`: a failed send becomes a typed `SendError` by Meta's `error.code` (the HTTP
  status for one code differs between observations, so it is only the fallback).
- `split_text`: long replies become parts of at most 4096 characters.
- `CloudSender`: the `Sender` for one phone number.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

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
    "DEFAULT_BASE_URL",
    "DEFAULT_GRAPH_VERSION",
    "TEXT_LIMIT",
    "CloudSender",
    "classify_error",
    "parse_webhook",
    "split_text",
    "verify_signature",
    "verify_subscription",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL: Final = "https://graph.facebook.com"
# v21.0 expires on 2027-01-21; v25.0 is supported until 2028-07-29 (Graph API changelog).
DEFAULT_GRAPH_VERSION: Final = "v25.0"
TEXT_LIMIT: Final = 4096  # a text message's body [M-text]
_ERROR_TEXT_CAP: Final = 300

# --- webhook verification ---------------------------------------------------------------------

_SIGNATURE_RE: Final = re.compile(r"sha256=([0-9a-fA-F]{64})")


def verify_signature(app_secret: str, raw_body: bytes, header: str | None) -> bool:
    """Whether `X-Hub-Signature-256` (`sha256=<hex HMAC-SHA256(app_secret, raw body)>`) signs
    `raw_body`. Always over the bytes as received: Meta signs its ASCII-escaped serialisation,
    so a re-serialised body (accents, emoji, `@`) would not match. A missing or malformed header,
    or an empty secret (an unconfigured channel), is False."""
    if not app_secret or not header:
        return False
    match = _SIGNATURE_RE.fullmatch(header.strip())
    if match is None:
        return False
    expected = hmac.new(app_secret.encode("utf-8"), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), match.group(1).lower().encode("ascii"))


def verify_subscription(query: Mapping[str, str], verify_token: str) -> str | None:
    """The GET handshake: the raw `hub.challenge` to answer with (HTTP 200, as the body) when
    `hub.mode=subscribe` and `hub.verify_token` is ours; otherwise None (answer 403)."""
    if not verify_token or query.get("hub.mode") != "subscribe":
        return None
    token = query.get("hub.verify_token")
    challenge = query.get("hub.challenge")
    if not isinstance(token, str) or not isinstance(challenge, str) or not challenge:
        return None
    if not hmac.compare_digest(token.encode("utf-8"), verify_token.encode("utf-8")):
        return None
    return challenge


# --- webhook parsing --------------------------------------------------------------------------

_MEDIA_TYPES: Final = frozenset({"image", "audio", "video", "document", "sticker"})
# `played` is a voice message's `read` (forward-only ladder in chat_domain.types).
_STATUSES: Final[Mapping[str, DeliveryStatus]] = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "played": "read",
    "failed": "failed",
}


def parse_webhook(body: Any) -> list[tuple[str, InboundMessage | StatusUpdate]]:
    """Every message and status in a webhook body (already decoded JSON), in body order, each
    with the `metadata.phone_number_id` it arrived on. One POST may batch several entries,
    changes and items. Malformed items are skipped, never raised: Meta
    retries a non-2xx for days, so one bad item must not hold back the rest. A body that is not
    a `whatsapp_business_account` object gives []."""
    out: list[tuple[str, InboundMessage | StatusUpdate]] = []
    if not isinstance(body, dict) or body.get("object") != "whatsapp_business_account":
        return out
    for entry in _dicts(body.get("entry")):
        for change in _dicts(entry.get("changes")):
            # other fields (templates, account updates, echoes) have other value shapes
            if change.get("field", "messages") != "messages":
                continue
            value = change.get("value")
            if not isinstance(value, dict):
                continue
            metadata = value.get("metadata")
            if not isinstance(metadata, dict):
                continue
            phone_number_id = _str(metadata.get("phone_number_id"))
            if phone_number_id is None:
                continue
            names = _contact_names(value.get("contacts"))
            for raw in _dicts(value.get("messages")):
                try:
                    message = _parse_message(raw, names)
                except (TypeError, ValueError, KeyError, AttributeError) as exc:  # defensive
                    log.debug("whatsapp cloud: skipped a malformed message: %r", exc)
                    message = None
                if message is not None:
                    out.append((phone_number_id, message))
            for raw in _dicts(value.get("statuses")):
                try:
                    status = _parse_status(raw)
                except (TypeError, ValueError, KeyError, AttributeError) as exc:  # defensive
                    log.debug("whatsapp cloud: skipped a malformed status: %r", exc)
                    status = None
                if status is not None:
                    out.append((phone_number_id, status))
    return out


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dict items of a list (anything else is skipped)."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _str(value: Any) -> str | None:
    """A non-empty string, or None."""
    return value if isinstance(value, str) and value else None


def _num_str(value: Any) -> str | None:
    """A number (Meta sends coordinates as numbers) or a non-empty string, as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return str(value)
    return _str(value)


def _timestamp(value: Any) -> datetime | None:
    """Unix seconds (Meta sends a string) as an aware UTC datetime; None when unreadable."""
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value) if isinstance(value, int | float | str) else math.nan
        if not math.isfinite(seconds) or seconds < 0:
            return None
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _contact_names(contacts: Any) -> dict[str, str]:
    """Profile names by `wa_id` and by `user_id` (business-scoped ids have no phone number)."""
    names: dict[str, str] = {}
    for contact in _dicts(contacts):
        profile = contact.get("profile")
        name = _str(profile.get("name")) if isinstance(profile, dict) else None
        if name is None:
            continue
        for key in ("wa_id", "user_id"):
            ident = _str(contact.get(key))
            if ident is not None:
                names[ident] = name
    return names


def _parse_message(raw: dict[str, Any], names: Mapping[str, str]) -> InboundMessage | None:
    message_id = _str(raw.get("id"))
    # `from` is the phone-based wa_id; users with a username may only have a business-scoped id
    phone = _str(raw.get("from"))
    user_id = _str(raw.get("from_user_id"))
    sender = phone or user_id
    kind_text_media = _content(raw)
    if message_id is None or sender is None or kind_text_media is None:
        return None
    kind, text, media = kind_text_media
    context = raw.get("context")
    reply_to = _str(context.get("id")) if isinstance(context, dict) else None
    if raw.get("type") == "reaction":
        reply_to = media.get("message_id") or reply_to
    return InboundMessage(
        external_user_id=sender,
        external_message_id=message_id,
        text=text,
        kind=kind,
        contact_name=(phone and names.get(phone)) or (user_id and names.get(user_id)) or None,
        received_at=_timestamp(raw.get("timestamp")),
        reply_to_external_id=reply_to,
        media=media,
    )


def _content(raw: dict[str, Any]) -> tuple[InboundKind, str, dict[str, str]] | None:
    """(kind, text for the bot, media) of one message, or None when malformed."""
    mtype = _str(raw.get("type"))
    if mtype is None:
        return None
    part = raw.get(mtype)
    if mtype == "text":
        body = part.get("body") if isinstance(part, dict) else None
        return None if not isinstance(body, str) else ("text", body, {})
    if mtype == "interactive":
        return _interactive(part)
    if mtype == "button":  # a template's quick-reply button
        if not isinstance(part, dict):
            return None
        label = _str(part.get("text"))
        if label is None:
            return None
        media = {"type": "button"}
        payload = _str(part.get("payload"))
        if payload is not None:
            media["id"] = payload
        return "interactive", label, media
    if mtype in _MEDIA_TYPES:
        return _media(mtype, part)
    if mtype == "location":
        return _location(part)
    if mtype == "contacts":
        return _shared_contacts(part)
    if mtype == "reaction":
        return _reaction(part)
    return _unsupported(mtype, raw)


def _interactive(part: Any) -> tuple[InboundKind, str, dict[str, str]] | None:
    if not isinstance(part, dict):
        return None
    itype = _str(part.get("type"))
    if itype in ("button_reply", "list_reply"):
        reply = part.get(itype)
        if not isinstance(reply, dict):
            return None
        title = _str(reply.get("title"))
        if title is None:
            return None
        media = {"type": itype}
        reply_id = _str(reply.get("id"))
        if reply_id is not None:
            media["id"] = reply_id
        description = _str(reply.get("description"))
        if description is not None:
            media["description"] = description
        return "interactive", title, media
    # flow replies (nfm_reply) and future subtypes: tell the bot what arrived
    label = itype or "unknown"
    return "unsupported", f"[unsupported message: interactive {label}]", {"type": "interactive"}


def _media(mtype: str, part: Any) -> tuple[InboundKind, str, dict[str, str]] | None:
    if not isinstance(part, dict):
        return None
    media = {"type": mtype}
    for key in ("id", "mime_type", "filename"):
        value = _str(part.get(key))
        if value is not None:
            media[key] = value
    if "id" not in media:
        return None
    label = mtype
    if mtype == "audio" and part.get("voice") is True:
        label = "voice message"
    elif mtype == "document" and "filename" in media:
        label = f"document: {media['filename']}"
    caption = _str(part.get("caption"))
    text = f"[{label}] {caption}" if caption else f"[{label}]"
    return "media", text, media


def _location(part: Any) -> tuple[InboundKind, str, dict[str, str]] | None:
    if not isinstance(part, dict):
        return None
    latitude = _num_str(part.get("latitude"))
    longitude = _num_str(part.get("longitude"))
    if latitude is None or longitude is None:
        return None
    media = {"type": "location", "latitude": latitude, "longitude": longitude}
    described = []
    for key in ("name", "address"):
        value = _str(part.get(key))
        if value is not None:
            media[key] = value
            described.append(value)
    where = ", ".join(described)
    coordinates = f"({latitude}, {longitude})"
    text = f"[location] {where} {coordinates}" if where else f"[location] {coordinates}"
    return "location", text, media


def _shared_contacts(part: Any) -> tuple[InboundKind, str, dict[str, str]] | None:
    cards = _dicts(part)
    if not cards:
        return None
    described = []
    for card in cards:
        name = card.get("name")
        label = _str(name.get("formatted_name")) if isinstance(name, dict) else None
        phones = [
            phone
            for item in _dicts(card.get("phones"))
            if (phone := _str(item.get("phone")) or _str(item.get("wa_id"))) is not None
        ]
        pieces = [label or "(no name)", *phones]
        described.append(" ".join(pieces))
    return "contacts", "[contacts] " + "; ".join(described), {"type": "contacts"}


def _reaction(part: Any) -> tuple[InboundKind, str, dict[str, str]] | None:
    """A reaction is not a question: kind `unsupported` with media type `reaction` lets the
    caller tell it apart (and ignore it). An empty emoji removes an earlier reaction."""
    if not isinstance(part, dict):
        return None
    media = {"type": "reaction"}
    target = _str(part.get("message_id"))
    if target is not None:
        media["message_id"] = target
    emoji = _str(part.get("emoji"))
    if emoji is None:
        return "unsupported", "[reaction removed]", media
    media["emoji"] = emoji
    return "unsupported", f"[reaction {emoji}]", media


def _unsupported(mtype: str, raw: dict[str, Any]) -> tuple[InboundKind, str, dict[str, str]]:
    """`unsupported` (Meta could not render it: 131051) and types this module does not read
    (order, system, request_welcome, ...): the bot is told what arrived."""
    inner = raw.get("unsupported")
    actual = _str(inner.get("type")) if isinstance(inner, dict) else None
    if mtype == "unsupported":
        described = f"unsupported message: {actual}" if actual else "unsupported message"
        errors = _dicts(raw.get("errors"))
        detail = _error_text(errors[0]) if errors else None
        text = f"[{described}] ({detail})" if detail else f"[{described}]"
    else:
        text = f"[unsupported message type: {mtype}]"
    media = {"type": actual or mtype}
    return "unsupported", text, media


def _parse_status(raw: dict[str, Any]) -> StatusUpdate | None:
    message_id = _str(raw.get("id"))
    status = _STATUSES.get(_str(raw.get("status")) or "")
    if message_id is None or status is None:
        return None
    error_code: str | None = None
    error_text: str | None = None
    errors = _dicts(raw.get("errors"))
    if errors:
        code = errors[0].get("code")
        if isinstance(code, int | str) and not isinstance(code, bool):
            error_code = str(code)
        error_text = _error_text(errors[0])
    return StatusUpdate(
        external_message_id=message_id,
        status=status,
        error_code=error_code,
        error_text=error_text,
        at=_timestamp(raw.get("timestamp")),
        callback_data=_str(raw.get("biz_opaque_callback_data")),
    )


def _error_text(error: Mapping[str, Any]) -> str | None:
    """`title: details` of a webhook error (or `message`), capped."""
    title = _str(error.get("title")) or _str(error.get("message"))
    data = error.get("error_data")
    details = _str(data.get("details")) if isinstance(data, dict) else None
    if title and details and details.rstrip(".").lower() != title.rstrip(".").lower():
        return _cap(f"{title}: {details}")
    text = title or details
    return None if text is None else _cap(text)


def _cap(text: str, limit: int = _ERROR_TEXT_CAP) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- splitting --------------------------------------------------------------------------------

# A cut index i (part = text[:i]) at a sentence end: after . ! ? … (and closing quotes or
# brackets) before whitespace, or after CJK full stops, which are not followed by spaces.
_SENTENCE_END_RE: Final = re.compile(r"[.!?…][\"'”’»)\]]*(?=\s)|[。！？][”’」』)）]*")


def split_text(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """`text` in parts of at most `limit` characters, in order, cut at the last paragraph
    break, then line break, then sentence end, then whitespace that leaves the part at least
    half full (fewer parts: each one is a message, and Meta limits messages per recipient);
    otherwise at any such boundary; otherwise hard at `limit`. The whitespace at a cut is
    dropped; the parts joined reproduce everything else. Blank text gives []."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if not text.strip():
        return []
    if len(text) <= limit:
        return [text]
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = _cut_index(rest, limit)
        part = rest[:cut].rstrip()
        rest = rest[cut:].lstrip()
        if part:
            parts.append(part)
    if rest:
        parts.append(rest)
    return parts


def _cut_index(text: str, limit: int) -> int:
    """Where to end the next part of `text` (len(text) > limit): an index in 1..limit."""
    window = text[: limit + 1]  # a boundary right at `limit` still leaves a full part
    candidates = (
        _last_before(window, "\n\n", limit),
        _last_before(window, "\n", limit),
        _last_sentence_end(window, limit),
        _last_whitespace(window, limit),
    )
    for minimum in (limit // 2, 1):
        for cut in candidates:
            if cut is not None and cut >= minimum:
                return cut
    return limit


def _last_before(window: str, sep: str, limit: int) -> int | None:
    index = window.rfind(sep, 0, limit + len(sep))
    return index if index > 0 else None


def _last_sentence_end(window: str, limit: int) -> int | None:
    last = None
    for match in _SENTENCE_END_RE.finditer(window):
        if match.end() <= limit:
            last = match.end()
    return last


def _last_whitespace(window: str, limit: int) -> int | None:
    for index in range(min(limit, len(window) - 1), 0, -1):
        if window[index].isspace():
            return index
    return None


# --- error classification ---------------------------------------------------------------------

# reference §2.1; the delays are the "recommended handling" there
_CHANNEL_THROTTLE_DELAY: Final[Mapping[int, float]] = {
    4: 60.0,  # the app's Graph call limit
    613: 60.0,  # Graph "calls exceeded the rate limit", as 4
    80007: 120.0,  # the WABA's rate limit: minutes
    130429: 2.0,  # the number's throughput: ~1-5 s (the caller adds jitter)
}
_PAIR_RATE_LIMIT: Final = 131056
_PAIR_RATE_DELAY: Final = 6.0  # about one message per 6 s to the same recipient
_HTTP_429_DELAY: Final = 5.0
# "A": may have been processed; retry with backoff knowing it might send twice
_TRANSIENT: Final = frozenset({1, 2, 131000, 131016})
_FATAL: Final = frozenset({0, 3, 10, 190, 368, 131031, 131042})
_PERMANENT: Final = frozenset(
    {
        100,
        130497,  # restricted from messaging this country: only those recipients fail
        131008,
        131009,
        131021,
        131026,
        131030,
        131047,
        131048,  # spam rate limit: a chat reply deferred for hours is worthless; see docs
        131049,
        131050,
        131051,
        131052,
        131053,
        *range(132000, 132017),
        132068,
        132069,
    }
)


def classify_error(status_code: int, body: Any, retry_after: str | None) -> SendError:
    """The typed failure of a Graph API call that did not succeed, from Meta's `error.code`
    (reference §2.1), the HTTP status only when there is no known code: 429 throttles the
    channel, an unknown code under 5xx (or no body) is retryable, under 4xx permanent.
    `Retry-After` (seconds or an HTTP date), when present, replaces the default delay."""
    code, message = _graph_error(status_code, body)
    code_str = None if code is None else str(code)
    after = _retry_after_seconds(retry_after)

    if code == _PAIR_RATE_LIMIT:
        return ThrottledError(
            message,
            code=code_str,
            delay_s=after if after is not None else _PAIR_RATE_DELAY,
            scope="recipient",
        )
    if code is not None and code in _CHANNEL_THROTTLE_DELAY:
        delay = after if after is not None else _CHANNEL_THROTTLE_DELAY[code]
        return ThrottledError(message, code=code_str, delay_s=delay, scope="channel")
    if code is not None and (code in _FATAL or 200 <= code <= 299):
        return ChannelFatalError(message, code=code_str)
    if code is not None and code in _TRANSIENT:
        return RetryableSendError(message, code=code_str, retry_after_s=after, ambiguous=True)
    if code is not None and code in _PERMANENT:
        return PermanentSendError(message, code=code_str)
    if status_code == 429:
        delay = after if after is not None else _HTTP_429_DELAY
        return ThrottledError(message, code=code_str, delay_s=delay, scope="channel")
    if status_code >= 500:
        # the request reached Meta and it failed while handling it: maybe after sending
        return RetryableSendError(message, code=code_str, retry_after_s=after, ambiguous=True)
    return PermanentSendError(message, code=code_str)


def _graph_error(status_code: int, body: Any) -> tuple[int | None, str]:
    """Meta's `error.code` (None when absent) and a short message for logs and the failed
    message's record: Meta's own words, capped. They never hold our token."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {}
    raw_code = error.get("code")
    code: int | None = None
    if isinstance(raw_code, int) and not isinstance(raw_code, bool):
        code = raw_code
    elif isinstance(raw_code, str) and raw_code.strip().isdigit():
        code = int(raw_code)
    words = _str(error.get("message")) or ""
    data = error.get("error_data")
    details = _str(data.get("details")) if isinstance(data, dict) else None
    if details and details not in words:
        words = f"{words}: {details}" if words else details
    trace = _str(error.get("fbtrace_id"))
    head = f"HTTP {status_code}" + ("" if code is None else f", code {code}")
    text = f"{head}: {words}" if words else head
    if trace:
        text = f"{text} (fbtrace_id {trace})"
    return code, _cap(text)


def _retry_after_seconds(value: str | None) -> float | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# --- sender -----------------------------------------------------------------------------------

_BSUID_RE: Final = re.compile(r"[A-Z]{2}\.[A-Za-z0-9.]+")


class CloudSender:
    """Sends text on one WhatsApp Cloud API phone number (implements `Sender`).

    A reply longer than 4096 characters goes out as `split_text` parts, in order, each after
    the previous one was accepted. When part k fails, the raised `SendError` carries
    `sent_external_ids`: the wamids of parts 0..k-1, which were accepted and must not be sent
    again (the Cloud API has no idempotency key); the remaining parts are
    `split_text(text)[len(sent_external_ids):]`. Every `SendError` raised by `send_text`
    has the attribute (an empty tuple when nothing went out).

    HTTP 200 means accepted, not delivered: delivery arrives as status webhooks.
    """

    def __init__(
        self,
        phone_number_id: str,
        access_token: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        version: str = DEFAULT_GRAPH_VERSION,
        http: httpx.AsyncClient | None = None,
        timeout: float = 15.0,
    ) -> None:
        if not phone_number_id:
            raise ValueError("phone_number_id is required")
        if not access_token:
            raise ValueError("access_token is required")
        version = version if version.startswith("v") else f"v{version}"
        self.phone_number_id = phone_number_id
        self.url = f"{base_url.rstrip('/')}/{version}/{phone_number_id}/messages"
        self._headers = {"Authorization": f"Bearer {access_token}"}
        self._timeout = httpx.Timeout(timeout)
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=self._timeout)

    def __repr__(self) -> str:  # never the token
        return f"CloudSender(phone_number_id={self.phone_number_id!r}, url={self.url!r})"

    async def send_text(self, message: OutboundText) -> SendResult:
        parts = split_text(message.text)
        if not parts:
            error = PermanentSendError("the reply is empty: nothing to send")
            error.sent_external_ids = ()  # type: ignore[attr-defined]
            raise error
        sent: list[str] = []
        for index, part in enumerate(parts):
            if index < message.skip_parts:
                continue  # went out in an earlier attempt
            payload = self._text_payload(message.recipient, part)
            if index == 0 and message.reply_to_external_id:
                payload["context"] = {"message_id": message.reply_to_external_id}
            # echoed in this message's status webhooks: they find our message even when this
            # call times out before it learns the wamid
            payload["biz_opaque_callback_data"] = str(message.message_id)
            try:
                sent.append(await self._post_message(payload))
            except SendError as error:
                error.sent_external_ids = tuple(sent)  # type: ignore[attr-defined]
                log.log(
                    logging.INFO if isinstance(error, ThrottledError) else logging.WARNING,
                    "whatsapp cloud: send on %s failed at part %d of %d (%s): %s",
                    self.phone_number_id,
                    index + 1,
                    len(parts),
                    type(error).__name__,
                    error,
                )
                raise
        return SendResult(external_ids=tuple(sent))

    def _text_payload(self, recipient: str, body: str) -> dict[str, Any]:
        payload: dict[str, Any] = {"messaging_product": "whatsapp", "recipient_type": "individual"}
        # a user with a username may be known only by a business-scoped id (`CC.<digits>`),
        # which the API takes as `recipient` instead of `to`
        if _BSUID_RE.fullmatch(recipient):
            payload["recipient"] = recipient
        else:
            payload["to"] = recipient
        payload["type"] = "text"
        payload["text"] = {"preview_url": False, "body": body}
        return payload

    async def _post_message(self, payload: dict[str, Any]) -> str:
        """POST one message; its wamid, or a typed `SendError`."""
        try:
            response = await self._http.post(
                self.url, json=payload, headers=self._headers, timeout=self._timeout
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # no connection was made: Meta never saw the request
            raise RetryableSendError(
                f"could not connect to the Graph API: {type(exc).__name__}", ambiguous=False
            ) from exc
        except httpx.TransportError as exc:
            # a timeout or a broken connection once the request may have been written
            raise RetryableSendError(
                f"no answer from the Graph API: {type(exc).__name__}", ambiguous=True
            ) from exc
        body = _json_or_none(response)
        if response.status_code == 200:
            wamid = _wamid(body)
            if wamid is None:
                # accepted, but we cannot tell which message: retrying may send it twice
                raise RetryableSendError(
                    "HTTP 200 without messages[0].id from the Graph API", ambiguous=True
                )
            return wamid
        raise classify_error(response.status_code, body, response.headers.get("Retry-After"))

    async def mark_read(self, message_id: str) -> bool:
        """Mark an inbound message (and the earlier ones) read. Best effort: False on any
        failure, never raises."""
        return await self._post_status(
            "mark_read",
            {"messaging_product": "whatsapp", "status": "read", "message_id": message_id},
        )

    async def typing(self, message_id: str) -> bool:
        """Show "typing…" to the sender of `message_id` (also marks it read); it disappears with
        our reply or after 25 s. Best effort: False on any failure, never raises."""
        return await self._post_status(
            "typing",
            {
                "messaging_product": "whatsapp",
                "status": "read",
                "message_id": message_id,
                "typing_indicator": {"type": "text"},
            },
        )

    async def _post_status(self, what: str, payload: dict[str, Any]) -> bool:
        try:
            response = await self._http.post(
                self.url, json=payload, headers=self._headers, timeout=self._timeout
            )
            body = _json_or_none(response)
        except Exception as exc:  # best effort by contract: a receipt must never fail a reply
            log.info(
                "whatsapp cloud: %s on %s failed: %s", what, self.phone_number_id, repr(exc)[:200]
            )
            return False
        if response.status_code == 200 and isinstance(body, dict) and body.get("success") is True:
            return True
        log.info(
            "whatsapp cloud: %s on %s was refused: %s",
            what,
            self.phone_number_id,
            _graph_error(response.status_code, body)[1],
        )
        return False

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:  # not JSON (an HTML error page from a proxy, an empty body)
        return None


def _wamid(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    messages = _dicts(body.get("messages"))
    return _str(messages[0].get("id")) if messages else None
