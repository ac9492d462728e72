"""What a reply answers, and what the pipeline still owes.

A user message is answered when a reply claims it (``messages.reply_id``), in the transaction
that stores the reply. The claim is conditional (``reply_id IS NULL``): of two answer runs that
overlap (a stale lease), only one can answer a message, so no question is answered twice and
no question is counted as answered by a reply that did not see it.

The same columns make the database the pipeline's outbox: a stored user message with no reply
(in an open conversation) and a stored reply still ``queued`` are work the queues owe; the
reconciler (``chat_pipeline.reconcile``) finds them by age and queues them again, so a message
the platform accepted is answered even if Redis lost its jobs.

No function here commits: the caller owns the transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain.conversations import InsertMessageResult, MessageView, insert_message
from chat_domain.errors import AlreadyAnsweredError
from chat_domain.models import Channel, Contact, Conversation, Message, utcnow
from chat_domain.types import ChannelKind, DeliveryStatus, MessageRole

__all__ = [
    "OwedMessage",
    "history_for_prompt",
    "note_requeued",
    "owed_questions",
    "owed_replies",
    "store_reply",
    "unanswered_messages",
]


async def unanswered_messages(
    session: AsyncSession, conversation_id: uuid.UUID, *, limit: int = 50
) -> list[MessageView]:
    """The conversation's user messages that no reply has answered yet, oldest first."""
    rows = await session.scalars(
        select(Message)
        .where(
            Message.conversation_id == conversation_id,
            Message.role == "user",
            Message.reply_id.is_(None),
        )
        .order_by(Message.seq)
        .limit(limit)
        .execution_options(populate_existing=True)
    )
    return [MessageView.of(row) for row in rows]


async def store_reply(
    session: AsyncSession,
    *,
    conversation_id: uuid.UUID,
    answers: Sequence[uuid.UUID],
    text: str,
    external_id: str,
    role: MessageRole = "assistant",
    status: DeliveryStatus = "queued",
) -> InsertMessageResult:
    """Store a reply and record that it answers the user messages `answers` (they become
    ``read``). Idempotent by `external_id`: a second call returns the stored reply and claims
    nothing. Raises `AlreadyAnsweredError` when another reply answered one of `answers` first;
    the caller must roll back (the reply row was inserted in its transaction)."""
    result = await insert_message(
        session,
        conversation_id=conversation_id,
        role=role,
        text=text,
        external_id=external_id,
        status=status,
    )
    if result.duplicate or not answers:
        return result
    now = utcnow()
    claimed = await session.execute(
        update(Message)
        .where(Message.id.in_(list(answers)), Message.reply_id.is_(None))
        .values(reply_id=result.message.id, status="read", status_updated_at=now)
        .returning(Message.id)
        .execution_options(synchronize_session=False)
    )
    if len(claimed.all()) != len(set(answers)):
        raise AlreadyAnsweredError(f"conversation {conversation_id}: answered meanwhile")
    return result


def history_for_prompt(messages: Sequence[MessageView]) -> list[MessageView]:
    """`messages` (in seq order) ordered as the conversation reads: each reply right after the
    last question it answered. A reply stored after a later question arrived (the user typed
    while the model was answering) has a higher seq than that question; the model must still
    see question 1, its answer, then question 2."""
    answered_up_to: dict[uuid.UUID, int] = {}
    for m in messages:
        if m.role == "user" and m.reply_id is not None:
            answered_up_to[m.reply_id] = max(answered_up_to.get(m.reply_id, 0), m.seq)

    def key(m: MessageView) -> tuple[float, int]:
        anchor = answered_up_to.get(m.id)
        return (anchor + 0.5 if anchor is not None else float(m.seq), m.seq)

    return sorted(messages, key=key)


# -- what the pipeline owes (the reconciler) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwedMessage:
    """A stored message the queues still owe work for, with what queueing it again needs."""

    message: MessageView
    tenant_id: uuid.UUID
    chatbot_id: uuid.UUID
    channel_kind: ChannelKind
    recipient: str  # the contact's external id on the channel


if TYPE_CHECKING:  # (subscripted like this only since SQLAlchemy 2.1)
    _Owed = Select[Message, uuid.UUID, ChannelKind, str]


def _owed(older_than: datetime, since: datetime, limit: int) -> _Owed:
    return (
        select(Message, Conversation.chatbot_id, Channel.kind, Contact.external_id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .join(Channel, Channel.id == Message.channel_id)
        .join(Contact, Contact.id == Conversation.contact_id)
        .where(Message.created_at < older_than, Message.created_at >= since)
        .order_by(Message.created_at)
        .limit(limit)
        .execution_options(populate_existing=True)
    )


async def _rows(session: AsyncSession, stmt: _Owed) -> list[OwedMessage]:
    rows = await session.execute(stmt)
    return [
        OwedMessage(MessageView.of(m), m.tenant_id, chatbot_id, kind, recipient)
        for m, chatbot_id, kind, recipient in rows
    ]


async def owed_questions(
    session: AsyncSession, *, older_than: datetime, since: datetime, limit: int = 500
) -> list[OwedMessage]:
    """User messages created in [since, older_than) that no reply answered, in conversations
    the bot answers (``open``: a human agent answers the others)."""
    stmt = _owed(older_than, since, limit).where(
        Message.role == "user", Message.reply_id.is_(None), Conversation.status == "open"
    )
    return await _rows(session, stmt)


async def owed_replies(
    session: AsyncSession, *, older_than: datetime, since: datetime, limit: int = 500
) -> list[OwedMessage]:
    """Bot and agent messages created in [since, older_than) still ``queued``: stored, never
    handed to their channel."""
    stmt = _owed(older_than, since, limit).where(Message.status == "queued", Message.role != "user")
    return await _rows(session, stmt)


async def note_requeued(session: AsyncSession, message_ids: Sequence[uuid.UUID]) -> None:
    """Count one more requeue of each message (the reconciler's give-up rule reads it)."""
    if message_ids:
        await session.execute(
            update(Message)
            .where(Message.id.in_(list(message_ids)))
            .values(requeues=Message.requeues + 1)
            .execution_options(synchronize_session=False)
        )
