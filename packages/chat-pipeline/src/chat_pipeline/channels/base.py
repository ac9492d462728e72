"""The channel seam: what a channel receives and sends, and the typed failures of a send.

A channel kind (WhatsApp Cloud, a WhatsApp QR service) provides:

- inbound parsing: a webhook body becomes `InboundMessage`s (a user wrote) and `StatusUpdate`s
  (what happened to a message we sent), keyed by the channel's routing key (the Cloud API's
  `phone_number_id`, a QR session name);
- a `Sender`: sends one stored reply's text (split into parts when the channel limits length)
  and says what went wrong in a way the send processor can act on without knowing the channel:
  retry later, slow down, give up on this message, or stop the whole channel.

The send processor (`chat_pipeline.send`) owns the bookkeeping every channel would repeat:
secrets, the sent/failed status in the database, external ids, usage, the circuit breaker.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from chat_domain.types import DeliveryStatus

__all__ = [
    "ChannelFatalError",
    "InboundKind",
    "InboundMessage",
    "OutboundText",
    "PermanentSendError",
    "RetryableSendError",
    "SendError",
    "SendResult",
    "Sender",
    "StatusUpdate",
    "ThrottledError",
]

InboundKind = Literal["text", "interactive", "media", "location", "contacts", "unsupported"]


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message a user sent on a channel, as the platform stores it."""

    external_user_id: str  # the sender on the channel (a wa_id, a chat id)
    external_message_id: str  # the channel's message id (wamid, WAHA/Evolution key id)
    text: str  # what the bot reads: the text, a button's title, a description of media
    kind: InboundKind = "text"
    contact_name: str | None = None
    received_at: datetime | None = None
    reply_to_external_id: str | None = None  # the message it answers, when quoted
    media: dict[str, str] = field(default_factory=dict)  # e.g. {"type": "image", "id": "..."}


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """What the channel says happened to a message we sent (forward-only in the database)."""

    external_message_id: str
    status: DeliveryStatus  # sent, delivered, read or failed
    error_code: str | None = None
    error_text: str | None = None
    at: datetime | None = None
    # what we attached to the send (Meta echoes `biz_opaque_callback_data`): our message id,
    # so a status finds its message even when the send call timed out before naming the wamid
    callback_data: str | None = None


@dataclass(frozen=True, slots=True)
class OutboundText:
    """One stored reply to send."""

    message_id: uuid.UUID
    conversation_id: uuid.UUID
    recipient: str  # the contact's external id on the channel
    text: str
    reply_to_external_id: str | None = None
    # a long reply goes out in parts; after a failure at part k the parts before k are not
    # sent again (a sender's `SendError.sent_external_ids` says how many went out)
    skip_parts: int = 0


@dataclass(frozen=True, slots=True)
class SendResult:
    """The channel's ids of what was sent (one per part when the text was split)."""

    external_ids: tuple[str, ...]


class SendError(Exception):
    """A send did not succeed. `code` is the channel's own error code, when it gave one."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class RetryableSendError(SendError):
    """Try again later (5xx, a timeout, a transient error code). `ambiguous`: the request may
    have reached the channel (a timeout after sending), so a retry might send twice."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: float | None = None,
        ambiguous: bool = False,
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
        self.ambiguous = ambiguous


class ThrottledError(SendError):
    """Slow down, without using up the message's attempts. `scope`: the whole channel (its
    number's rate) or only this recipient (e.g. Meta's pair rate limit 131056)."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        delay_s: float = 1.0,
        scope: Literal["channel", "recipient"] = "channel",
    ) -> None:
        super().__init__(message, code=code)
        self.delay_s = delay_s
        self.scope = scope


class PermanentSendError(SendError):
    """This message cannot be sent (invalid recipient, outside the 24-hour window, ...): it is
    marked failed with the code; no retry."""


class ChannelFatalError(SendError):
    """The channel itself cannot send (an expired token, a banned number, a QR session that is
    not connected): stop its sends, keep its messages queued, tell the tenant."""


class Sender(Protocol):
    """Sends replies on one channel (built with the channel's config and secrets)."""

    async def send_text(self, message: OutboundText) -> SendResult: ...

    async def aclose(self) -> None: ...
