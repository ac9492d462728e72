"""Tenant webhook events from the pipeline (docs/webhooks.md).

An event is stored in the same transaction as the change it describes (the outbox) and queued
for delivery after the commit; the webhook-delivery service's relay queues any event whose
enqueue was lost. Events are stored only for a tenant that has an enabled endpoint wanting
them: which types a tenant wants is read at most once per `ttl` seconds per process, so a
message of a tenant without webhooks costs no SQL statement, and an endpoint added or
changed takes effect within `ttl`."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain import MessageView
from chat_domain.webhooks import DispatchRef, emit_event, wanted_event_types
from chat_pipeline.cache import TTLCache
from chat_pipeline.errors import DEPENDENCY_ERRORS
from chat_pipeline.webhooks import enqueue_dispatches, webhook_queue

__all__ = [
    "STATUS_EVENTS",
    "Events",
    "conversation_status_data",
    "message_data",
    "status_data",
]

log = logging.getLogger("chat_pipeline.events")


def message_data(message: MessageView, **extra: Any) -> dict[str, Any]:
    return {
        "message_id": str(message.id),
        "conversation_id": str(message.conversation_id),
        "channel_id": str(message.channel_id),
        "role": message.role,
        "status": message.status,
        **extra,
    }


def status_data(
    message_id: uuid.UUID,
    conversation_id: uuid.UUID,
    channel_id: uuid.UUID,
    status: str,
    error_code: str | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "message_id": str(message_id),
        "conversation_id": str(conversation_id),
        "channel_id": str(channel_id),
        "status": status,
    }
    if error_code:
        data["error_code"] = error_code
    return data


STATUS_EVENTS = {
    "sent": "message.sent",
    "delivered": "message.delivered",
    "read": "message.read",
    "failed": "message.failed",
}


def conversation_status_data(
    conversation_id: uuid.UUID, status: str, previous: str, reason: str
) -> dict[str, Any]:
    return {
        "conversation_id": str(conversation_id),
        "status": status,
        "previous": previous,
        "reason": reason,  # agent, user_asked, bot_failing
    }


class Events:
    def __init__(self, redis: Any, *, ttl: float = 5.0) -> None:
        self.queue = webhook_queue(redis)
        # tenant -> the event types its enabled endpoints want ("*": every type)
        self._wanted: TTLCache[uuid.UUID, frozenset[str]] = TTLCache(ttl=ttl)

    async def _types(self, session: AsyncSession, tenant_id: uuid.UUID) -> frozenset[str]:
        return await self._wanted.get(tenant_id, lambda: wanted_event_types(session, tenant_id))

    async def wants(self, session: AsyncSession, tenant_id: uuid.UUID, event_type: str) -> bool:
        wanted = await self._types(session, tenant_id)
        return "*" in wanted or event_type in wanted

    async def emit(
        self,
        session: AsyncSession,
        tenant_id: uuid.UUID,
        event_type: str,
        data: dict[str, Any],
        dedupe_key: str | None = None,
    ) -> list[DispatchRef]:
        """Store the event in `session`'s transaction when the tenant wants it; queue the
        returned dispatches with `send` after the commit."""
        if not await self.wants(session, tenant_id, event_type):
            return []
        emitted = await emit_event(session, tenant_id, event_type, data, dedupe_key)
        return list(emitted.dispatches)

    async def send(self, dispatches: Sequence[DispatchRef]) -> None:
        """Queue after the commit. Redis being away loses nothing: the dispatch rows are
        stored, and the delivery service's relay queues what has no job."""
        if not dispatches:
            return
        try:
            await enqueue_dispatches(self.queue, dispatches)
        except DEPENDENCY_ERRORS as exc:
            log.warning("%d webhook dispatches left to the relay (%s)", len(dispatches), exc)
