"""Builders for the data the AI worker is given: stored messages and knowledge-base hits."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from ai_worker import ProviderConfig
from chat_domain import ChunkHit, MessageView
from chat_domain.types import MessageRole
from tests.fakes.openai_server import FakeOpenAIServer

TENANT = uuid.uuid4()
CONVERSATION = uuid.uuid4()
CHANNEL = uuid.uuid4()


def message(role: MessageRole, text: str, seq: int = 0) -> MessageView:
    now = datetime.now(UTC)
    return MessageView(
        id=uuid.uuid4(),
        tenant_id=TENANT,
        conversation_id=CONVERSATION,
        channel_id=CHANNEL,
        seq=seq,
        role=role,
        text=text,
        external_id=None,
        status="received",
        error_code=None,
        error_text=None,
        created_at=now,
        status_updated_at=now,
    )


def history(*turns: tuple[MessageRole, str]) -> list[MessageView]:
    return [message(role, text, seq) for seq, (role, text) in enumerate(turns, start=1)]


def hit(title: str, content: str, score: float = 1.0, ordinal: int = 0) -> ChunkHit:
    return ChunkHit(
        chunk_id=abs(hash((title, content))) % 10**9,
        document_id=uuid.uuid4(),
        document_title=title,
        ordinal=ordinal,
        content=content,
        score=score,
    )


def config(server: FakeOpenAIServer, **options: Any) -> ProviderConfig:
    options.setdefault("model", "test-model")
    options.setdefault("api_key", "sk-test-key-0123456789")
    options.setdefault("timeout_s", 5.0)
    return ProviderConfig(base_url=server.base_url, **options)
