"""Receiving a user's message, whatever the channel: the one way a message enters the platform.

The message is stored first (the platform has accepted it once it is a row, see
docs/architecture.md), then queued for the incoming worker. Queueing is best effort: a stored,
unanswered message without a job is queued again by the reconciler. Receiving the same message
twice (a retried POST, a redelivered webhook) stores it once; a stored message that is still
unanswered is queued again (a no-op while its job exists).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from chat_domain import (
    MessageView,
    get_message,
    get_message_by_provider_id,
    get_or_create_contact,
    get_or_create_conversation,
    get_queue_priority,
    insert_message,
    set_conversation_status,
    set_provider_id,
    update_delivery_status,
    update_delivery_status_by_external_id,
)
from chat_domain.payloads import IncomingMessage
from chat_domain.types import ChannelKind
from chat_domain.webhooks import DispatchRef
from chat_pipeline.channels.base import InboundMessage, StatusUpdate
from chat_pipeline.errors import DEPENDENCY_ERRORS
from chat_pipeline.events import (
    STATUS_EVENTS,
    conversation_status_data,
    message_data,
    status_data,
)
from chat_pipeline.runtime import Runtime

__all__ = ["ChannelRoute", "Received", "apply_status", "receive_message"]

log = logging.getLogger("chat_pipeline.receive")


@dataclass(frozen=True, slots=True)
class ChannelRoute:
    """Where a channel's messages belong."""

    tenant_id: uuid.UUID
    chatbot_id: uuid.UUID
    channel_id: uuid.UUID
    kind: ChannelKind


@dataclass(frozen=True, slots=True)
class Received:
    message: MessageView
    duplicate: bool  # received before (same external id on this channel)
    queued: bool  # handed to the incoming worker now (else it was already, or the reconciler will)


def _no_nul(value: str) -> str:
    return value.replace("\x00", "")


def _without_nul(inbound: InboundMessage) -> InboundMessage:
    """PostgreSQL refuses U+0000 in text and jsonb, and a channel's text can hold it (Meta
    sends it escaped): the insert failed, the webhook answered 500, and the provider redelivered
    the whole batch for days. It carries no meaning, so it is dropped."""
    return dataclasses.replace(
        inbound,
        external_user_id=_no_nul(inbound.external_user_id),
        external_message_id=_no_nul(inbound.external_message_id),
        text=_no_nul(inbound.text),
        contact_name=None if inbound.contact_name is None else _no_nul(inbound.contact_name),
        reply_to_external_id=(
            None if inbound.reply_to_external_id is None else _no_nul(inbound.reply_to_external_id)
        ),
        media={_no_nul(k): _no_nul(v) for k, v in inbound.media.items()},
    )


async def _flooding(rt: Runtime, route: ChannelRoute, sender: str, limit: tuple[int, int]) -> bool:
    """More than `limit` (count, window ms) messages from one contact: another bot answering
    ours (each reply is a new question, for ever) or abuse. One round trip; a Redis error
    counts as not flooding (receiving matters more)."""
    count, window = limit
    now_ms = int(time.time() * 1000)
    digest = hashlib.blake2b(sender.encode(), digest_size=12).hexdigest()
    key = f"chan:flood:{route.channel_id}:{digest}:{now_ms // window}"
    try:
        pipe = rt.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.pexpire(key, window)
        seen, _ = await pipe.execute()
    except DEPENDENCY_ERRORS:
        return False
    return int(seen) > count


async def receive_message(
    rt: Runtime,
    route: ChannelRoute,
    inbound: InboundMessage,
    *,
    flood_limit: tuple[int, int] | None = None,
) -> Received:
    """Store a user's message once and queue it for the pipeline. With `flood_limit`, a contact
    beyond it has its conversation handed to the tenant's people (the bot stops answering):
    messages are still stored, nothing is lost, and a bot-to-bot loop ends."""
    inbound = _without_nul(inbound)
    flooding = flood_limit is not None and await _flooding(
        rt, route, inbound.external_user_id, flood_limit
    )
    async with rt.sessions() as session, session.begin():
        contact = await get_or_create_contact(
            session,
            tenant_id=route.tenant_id,
            channel_id=route.channel_id,
            external_id=inbound.external_user_id,
            display_name=inbound.contact_name,
        )
        conversation = await get_or_create_conversation(
            session, contact, chatbot_id=route.chatbot_id
        )
        result = await insert_message(
            session,
            conversation_id=conversation.id,
            role="user",
            text=inbound.text,
            external_id=inbound.external_message_id,
            status="received",
            attachment={"kind": inbound.kind, **inbound.media} if inbound.media else None,
        )
        plan = await get_queue_priority(session, route.tenant_id)
        dispatches: list[DispatchRef] = []
        if not result.duplicate:
            m = result.message
            data = message_data(m, text=m.text, channel_kind=route.kind)
            data |= {"contact": {"external_id": contact.external_id, "name": contact.display_name}}
            if m.attachment:
                data["attachment"] = m.attachment
            if m.seq == 1:  # the conversation's first message: it was created just now
                created = {
                    "conversation_id": str(conversation.id),
                    "chatbot_id": str(route.chatbot_id),
                    "channel_id": str(route.channel_id),
                    "channel_kind": route.kind,
                    "contact": data["contact"],
                }
                dispatches = await rt.events.emit(
                    session, route.tenant_id, "conversation.created", created,
                    dedupe_key=f"conversation.created:{conversation.id}",
                )  # fmt: skip
            dispatches += await rt.events.emit(session, route.tenant_id, "message.received", data)
            if flooding and conversation.status == "open":
                await set_conversation_status(session, conversation.id, "pending_human")
                log.warning("conversation %s: a contact floods; handed to people", conversation.id)
                status = conversation_status_data(conversation.id, "pending_human", "open", "flood")
                dispatches += await rt.events.emit(
                    session, route.tenant_id, "conversation.status_changed", status
                )
    await rt.events.send(dispatches)
    message = result.message
    if result.duplicate and (message.status != "received" or message.reply_id is not None):
        return Received(message, duplicate=True, queued=False)
    incoming = IncomingMessage(
        tenant_id=route.tenant_id,
        chatbot_id=route.chatbot_id,
        channel_id=route.channel_id,
        channel_kind=route.kind,
        external_user_id=inbound.external_user_id,
        contact_name=inbound.contact_name,
        text=message.text,
        external_message_id=inbound.external_message_id,
        received_at=inbound.received_at or datetime.now(UTC),
        message_id=message.id,
        conversation_id=message.conversation_id,
    )
    try:
        await rt.pipeline.enqueue_incoming(incoming, plan, requeue=message.requeues)
    except DEPENDENCY_ERRORS as exc:
        # Stored is accepted: the reconciler queues it. Not an error for the sender.
        log.warning("message %s stored but not queued (%s); the reconciler will", message.id, exc)
        return Received(message, duplicate=result.duplicate, queued=False)
    return Received(message, duplicate=result.duplicate, queued=True)


async def apply_status(
    rt: Runtime, channel_id: uuid.UUID, update: StatusUpdate, tenant_id: uuid.UUID | None = None
) -> bool:
    """What the channel says happened to a message we sent; forward-only (statuses arrive out
    of order and twice), True when it changed something. The message is found by our own id
    when the channel echoes it (`callback_data`: a send that timed out never learned its
    channel id), else by the channel's id. A change is a `message.<status>` event for the
    tenant (`tenant_id`) when it wants those."""
    update = dataclasses.replace(
        update,
        external_message_id=_no_nul(update.external_message_id),
        error_code=None if update.error_code is None else _no_nul(update.error_code),
        error_text=None if update.error_text is None else _no_nul(update.error_text),
    )
    ours: uuid.UUID | None = None
    if update.callback_data:
        try:
            ours = uuid.UUID(update.callback_data)
        except ValueError:
            ours = None  # not one of ours (another integration tagged it)
    dispatches = []
    async with rt.sessions() as session, session.begin():
        changed = False
        if ours is not None:
            message = await get_message(session, ours)
            if message is not None and message.channel_id == channel_id and message.role != "user":
                await set_provider_id(session, ours, update.external_message_id)
                changed = await update_delivery_status(
                    session,
                    ours,
                    update.status,
                    error_code=update.error_code,
                    error_text=update.error_text,
                )
            else:
                ours = None
        if ours is None:
            changed = await update_delivery_status_by_external_id(
                session,
                channel_id=channel_id,
                external_id=update.external_message_id,
                status=update.status,
                error_code=update.error_code,
                error_text=update.error_text,
            )
        event = STATUS_EVENTS.get(update.status)
        if changed and event and tenant_id and await rt.events.wants(session, tenant_id, event):
            found = (
                await get_message(session, ours)
                if ours is not None
                else await get_message_by_provider_id(
                    session, channel_id=channel_id, provider_id=update.external_message_id
                )
            )
            if found is not None:
                data = status_data(
                    found.id, found.conversation_id, channel_id, update.status, update.error_code
                )
                dispatches = await rt.events.emit(session, tenant_id, event, data)
    await rt.events.send(dispatches)
    return changed
