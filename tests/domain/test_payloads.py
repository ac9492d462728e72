from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from chat_domain.payloads import AIRequest, IncomingMessage, OutgoingMessage, WebhookEventJob


def _incoming(**overrides: object) -> IncomingMessage:
    fields: dict[str, object] = {
        "tenant_id": uuid.uuid4(),
        "chatbot_id": uuid.uuid4(),
        "channel_id": uuid.uuid4(),
        "channel_kind": "whatsapp_cloud",
        "external_user_id": "4917000000",
        "text": "hello",
        "external_message_id": "wamid.1",
        "received_at": datetime(2026, 1, 2, 3, 4, tzinfo=UTC),
    }
    fields.update(overrides)
    return IncomingMessage.model_validate(fields)


def test_round_trip_and_version() -> None:
    message = _incoming(metadata={"profile": {"name": "Ada"}})
    assert message.v == 1
    assert IncomingMessage.model_validate_json(message.model_dump_json()) == message
    for payload in (
        AIRequest(
            tenant_id=uuid.uuid4(),
            chatbot_id=uuid.uuid4(),
            conversation_id=uuid.uuid4(),
            up_to_message_id=uuid.uuid4(),
            up_to_seq=7,
        ),
        OutgoingMessage(
            tenant_id=uuid.uuid4(),
            conversation_id=uuid.uuid4(),
            message_id=uuid.uuid4(),
            channel_id=uuid.uuid4(),
            channel_kind="widget",
            recipient_external_id="visitor-1",
            text="hi",
        ),
        WebhookEventJob(
            tenant_id=uuid.uuid4(),
            event_id=uuid.uuid4(),
            endpoint_id=uuid.uuid4(),
            event_type="message.received",
        ),
    ):
        assert type(payload).model_validate_json(payload.model_dump_json()) == payload


def test_strict_frozen_and_aware() -> None:
    with pytest.raises(ValidationError, match="extra"):
        _incoming(unexpected=1)
    with pytest.raises(ValidationError):
        _incoming(channel_kind="telegram")
    with pytest.raises(ValidationError):
        _incoming(received_at=datetime(2026, 1, 2, 3, 4))  # naive
    message = _incoming()
    with pytest.raises(ValidationError, match="frozen"):
        message.text = "changed"  # type: ignore[misc]
