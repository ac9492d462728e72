"""Job payloads that cross queues. Frozen, strict (``extra="forbid"``) and versioned (``v``).

Serialise with ``model.model_dump_json()`` and read with ``Model.model_validate_json(raw)``.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from chat_domain.types import ChannelKind


class Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = 1


class IncomingMessage(Payload):
    """A message received on a channel, before it is stored (gateway / channel -> pipeline)."""

    tenant_id: uuid.UUID
    chatbot_id: uuid.UUID
    channel_id: uuid.UUID
    channel_kind: ChannelKind
    external_user_id: str = Field(min_length=1, max_length=200)
    contact_name: str | None = None
    text: str
    external_message_id: str | None = Field(default=None, max_length=200)
    received_at: AwareDatetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Set when the receiving side already stored the message (the widget API does, to answer
    # with its ids at once); the incoming worker then skips storing it again.
    message_id: uuid.UUID | None = None
    conversation_id: uuid.UUID | None = None


class AIRequest(Payload):
    """Answer the conversation's unanswered user messages (those no reply has claimed when the
    job runs). ``up_to_message_id`` is the message that asked for this answer (for tracing).
    ``request_id`` names the answer: its reply is stored under ``ai:<request_id>``, so a run
    that stored the reply and died before handing it on is recognised when the job runs again.
    """

    tenant_id: uuid.UUID
    chatbot_id: uuid.UUID
    conversation_id: uuid.UUID
    up_to_message_id: uuid.UUID
    up_to_seq: int | None = None
    trigger_message_ids: tuple[uuid.UUID, ...] = ()
    request_id: uuid.UUID | None = None


class OutgoingMessage(Payload):
    """Send a stored message on its channel (pipeline / AI worker -> channel sender)."""

    tenant_id: uuid.UUID
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    channel_id: uuid.UUID
    channel_kind: ChannelKind
    recipient_external_id: str = Field(min_length=1, max_length=200)
    text: str
    # the channel's id of the message this reply quotes (WhatsApp shows it above the reply)
    reply_to_external_id: str | None = Field(default=None, max_length=200)


class WebhookEventJob(Payload):
    """Deliver one stored webhook event to one endpoint."""

    tenant_id: uuid.UUID
    event_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_type: str


__all__ = [
    "AIRequest",
    "IncomingMessage",
    "OutgoingMessage",
    "Payload",
    "WebhookEventJob",
]
