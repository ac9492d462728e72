"""Contacts, conversations and messages: idempotent writes and the forward-only status rule.

No function here commits: the caller owns the transaction (``async with session.begin():``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import case, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain._sql import dialect_insert
from chat_domain.errors import NotFoundError
from chat_domain.models import Contact, Conversation, Message, utcnow
from chat_domain.types import (
    DELIVERY_STATUS_RANK,
    ConversationStatus,
    DeliveryStatus,
    MessageRole,
)


@dataclass(frozen=True, slots=True)
class ContactView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    channel_id: uuid.UUID
    external_id: str
    display_name: str | None

    @classmethod
    def of(cls, row: Contact) -> ContactView:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            channel_id=row.channel_id,
            external_id=row.external_id,
            display_name=row.display_name,
        )


@dataclass(frozen=True, slots=True)
class ConversationView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    chatbot_id: uuid.UUID
    channel_id: uuid.UUID
    contact_id: uuid.UUID
    status: ConversationStatus
    last_activity_at: datetime
    created_at: datetime

    @classmethod
    def of(cls, row: Conversation) -> ConversationView:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            chatbot_id=row.chatbot_id,
            channel_id=row.channel_id,
            contact_id=row.contact_id,
            status=row.status,
            last_activity_at=row.last_activity_at,
            created_at=row.created_at,
        )


@dataclass(frozen=True, slots=True)
class MessageView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    conversation_id: uuid.UUID
    channel_id: uuid.UUID
    seq: int
    role: MessageRole
    text: str
    external_id: str | None
    status: DeliveryStatus
    error_code: str | None
    error_text: str | None
    created_at: datetime
    status_updated_at: datetime
    reply_id: uuid.UUID | None = None  # (user messages) the reply that answered it
    requeues: int = 0
    attachment: dict[str, Any] | None = None  # media / button / location reference
    provider_id: str | None = None  # (outgoing) the channel's id for it

    @classmethod
    def of(cls, row: Message) -> MessageView:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            conversation_id=row.conversation_id,
            channel_id=row.channel_id,
            seq=row.seq,
            role=row.role,
            text=row.text,
            external_id=row.external_id,
            status=row.status,
            error_code=row.error_code,
            error_text=row.error_text,
            created_at=row.created_at,
            status_updated_at=row.status_updated_at,
            reply_id=row.reply_id,
            requeues=row.requeues or 0,
            attachment=row.attachment,
            provider_id=row.provider_id,
        )


@dataclass(frozen=True, slots=True)
class InsertMessageResult:
    """``outcome == "duplicate"`` when the channel already has a message with this external id;
    ``message`` is then the stored one."""

    outcome: Literal["inserted", "duplicate"]
    message: MessageView

    @property
    def duplicate(self) -> bool:
        return self.outcome == "duplicate"


# --- contacts -----------------------------------------------------------------------------------


async def get_or_create_contact(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    channel_id: uuid.UUID,
    external_id: str,
    display_name: str | None = None,
) -> ContactView:
    """The contact for (channel, external id), created when missing; safe when concurrent
    callers race (``INSERT ... ON CONFLICT DO NOTHING``, then read). A new non-empty
    ``display_name`` replaces the stored one."""
    lookup = select(Contact).where(
        Contact.channel_id == channel_id, Contact.external_id == external_id
    )
    row = await session.scalar(lookup)
    if row is None:
        stmt = dialect_insert(session, Contact).values(
            id=uuid.uuid4(),
            tenant_id=tenant_id,
            channel_id=channel_id,
            external_id=external_id,
            display_name=display_name,
            created_at=utcnow(),
        )
        await session.execute(
            stmt.on_conflict_do_nothing(index_elements=["channel_id", "external_id"])
        )
        row = (await session.execute(lookup.execution_options(populate_existing=True))).scalar_one()
    elif display_name and row.display_name != display_name:
        row.display_name = display_name
        await session.flush()
    return ContactView.of(row)


# --- conversations ------------------------------------------------------------------------------

_ACTIVE = text("status <> 'resolved'")


async def get_contact(session: AsyncSession, contact_id: uuid.UUID) -> ContactView | None:
    row = await session.get(Contact, contact_id)
    return None if row is None else ContactView.of(row)


async def find_contact(
    session: AsyncSession, *, channel_id: uuid.UUID, external_id: str
) -> ContactView | None:
    """The contact for (channel, external id), or None (never creates one)."""
    row = await session.scalar(
        select(Contact).where(Contact.channel_id == channel_id, Contact.external_id == external_id)
    )
    return None if row is None else ContactView.of(row)


async def find_active_conversation(
    session: AsyncSession, contact_id: uuid.UUID
) -> ConversationView | None:
    """The contact's conversation that is not resolved, or None (never creates one)."""
    row = await session.scalar(
        select(Conversation).where(
            Conversation.contact_id == contact_id, Conversation.status != "resolved"
        )
    )
    return None if row is None else ConversationView.of(row)


async def get_or_create_conversation(
    session: AsyncSession,
    contact: ContactView,
    *,
    chatbot_id: uuid.UUID,
    now: datetime | None = None,
) -> ConversationView:
    """The contact's active conversation (``open`` or ``pending_human``), or a new ``open`` one.
    A partial unique index allows one active conversation per contact, so concurrent callers
    get the same row."""
    lookup = select(Conversation).where(
        Conversation.contact_id == contact.id, Conversation.status != "resolved"
    )
    row = await session.scalar(lookup)
    if row is None:
        now = now or utcnow()
        stmt = dialect_insert(session, Conversation).values(
            id=uuid.uuid4(),
            tenant_id=contact.tenant_id,
            chatbot_id=chatbot_id,
            channel_id=contact.channel_id,
            contact_id=contact.id,
            status="open",
            last_activity_at=now,
            last_seq=0,
            created_at=now,
        )
        await session.execute(
            stmt.on_conflict_do_nothing(index_elements=["contact_id"], index_where=_ACTIVE)
        )
        row = (await session.execute(lookup.execution_options(populate_existing=True))).scalar_one()
    return ConversationView.of(row)


async def get_conversation(
    session: AsyncSession, conversation_id: uuid.UUID
) -> ConversationView | None:
    row = await session.get(Conversation, conversation_id)
    return None if row is None else ConversationView.of(row)


async def set_conversation_status(
    session: AsyncSession, conversation_id: uuid.UUID, status: ConversationStatus
) -> None:
    """Change the status (``resolved`` frees the contact for a new conversation)."""
    result = await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(status=status)
        .returning(Conversation.id)
        .execution_options(synchronize_session=False)
    )
    if result.scalar_one_or_none() is None:
        raise NotFoundError(f"conversation {conversation_id} does not exist")


# --- messages -----------------------------------------------------------------------------------


async def _find_by_external_id(
    session: AsyncSession, channel_id: uuid.UUID, external_id: str
) -> Message | None:
    return await session.scalar(
        select(Message)
        .where(Message.channel_id == channel_id, Message.external_id == external_id)
        .execution_options(populate_existing=True)
    )


async def insert_message(
    session: AsyncSession,
    *,
    conversation_id: uuid.UUID,
    role: MessageRole,
    text: str,
    external_id: str | None = None,
    status: DeliveryStatus | None = None,
    now: datetime | None = None,
    attachment: dict[str, Any] | None = None,
) -> InsertMessageResult:
    """Append a message; a second insert with the same (channel, ``external_id``) is refused by
    the database and reported as ``"duplicate"`` (no exception, no side effects).

    The message gets the conversation's next ``seq`` (the conversation row is updated, which on
    PostgreSQL also serialises writers of one conversation until commit, so ``seq`` order is
    commit order). Status defaults to ``received`` for user messages, ``queued`` otherwise.
    """
    now = now or utcnow()
    if external_id is not None:
        existing = await session.scalar(
            select(Message)
            .join(Conversation, Conversation.channel_id == Message.channel_id)
            .where(Conversation.id == conversation_id, Message.external_id == external_id)
        )
        if existing is not None:
            return InsertMessageResult("duplicate", MessageView.of(existing))
    bumped = (
        await session.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(last_seq=Conversation.last_seq + 1, last_activity_at=now)
            .returning(Conversation.last_seq, Conversation.tenant_id, Conversation.channel_id)
            .execution_options(synchronize_session=False)
        )
    ).one_or_none()
    if bumped is None:
        raise NotFoundError(f"conversation {conversation_id} does not exist")
    seq, tenant_id, channel_id = bumped
    message_id = uuid.uuid4()
    stmt = (
        dialect_insert(session, Message)
        .values(
            id=message_id,
            tenant_id=tenant_id,
            conversation_id=conversation_id,
            channel_id=channel_id,
            seq=seq,
            role=role,
            text=text,
            external_id=external_id,
            status=status or ("received" if role == "user" else "queued"),
            status_updated_at=now,
            created_at=now,
            requeues=0,
            attachment=attachment,
        )
        .on_conflict_do_nothing(index_elements=["channel_id", "external_id"])
        .returning(Message)  # the stored row in the same statement (no SELECT after it)
    )
    inserted = (await session.execute(stmt)).scalar_one_or_none()
    if inserted is None:
        # Lost a race with a concurrent insert of the same external id (the seq stays unused).
        if external_id is None:
            raise RuntimeError("a message without external id conflicted")  # cannot happen
        winner = await _find_by_external_id(session, channel_id, external_id)
        if winner is None:
            raise NotFoundError("conflicting message vanished")  # deleted concurrently
        return InsertMessageResult("duplicate", MessageView.of(winner))
    return InsertMessageResult("inserted", MessageView.of(inserted))


async def get_message_by_external_id(
    session: AsyncSession, *, channel_id: uuid.UUID, external_id: str
) -> MessageView | None:
    row = await _find_by_external_id(session, channel_id, external_id)
    return None if row is None else MessageView.of(row)


async def get_message_by_provider_id(
    session: AsyncSession, *, channel_id: uuid.UUID, provider_id: str
) -> MessageView | None:
    row = await session.scalar(
        select(Message).where(Message.channel_id == channel_id, Message.provider_id == provider_id)
    )
    return None if row is None else MessageView.of(row)


async def get_message(session: AsyncSession, message_id: uuid.UUID) -> MessageView | None:
    row = await session.get(Message, message_id)
    return None if row is None else MessageView.of(row)


async def _advance_status(
    session: AsyncSession,
    where: list[object],
    status: DeliveryStatus,
    *,
    error_code: str | None,
    error_text: str | None,
    now: datetime | None,
) -> bool:
    rank = case(DELIVERY_STATUS_RANK, value=Message.status, else_=-1)
    failed = status == "failed"
    result = await session.execute(
        update(Message)
        .where(*where, rank < DELIVERY_STATUS_RANK[status])  # type: ignore[arg-type]
        .values(
            status=status,
            status_updated_at=now or utcnow(),
            error_code=error_code if failed else None,
            error_text=error_text if failed else None,
        )
        .returning(Message.id)
        .execution_options(synchronize_session=False)
    )
    return result.first() is not None


async def update_delivery_status(
    session: AsyncSession,
    message_id: uuid.UUID,
    status: DeliveryStatus,
    *,
    error_code: str | None = None,
    error_text: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Move the message's status forward; True when it changed.

    One conditional UPDATE: it applies only when the new status ranks strictly above the stored
    one (received < queued < sent < failed < delivered < read), so a late ``delivered`` never
    overwrites ``read``, even with concurrent writers. ``failed`` replaces received / queued /
    sent only; ``delivered`` and ``read`` still replace ``failed`` (the message did arrive) and
    clear the error fields.
    """
    return await _advance_status(
        session,
        [Message.id == message_id],
        status,
        error_code=error_code,
        error_text=error_text,
        now=now,
    )


async def mark_delivered_for_visitor(
    session: AsyncSession,
    message_id: uuid.UUID,
    *,
    channel_id: uuid.UUID,
    external_id: str,
    now: datetime | None = None,
) -> bool:
    """The visitor ``external_id`` of ``channel_id`` has shown the message: ``delivered``, in one
    UPDATE. Applies only to a bot or agent message of that visitor's active conversation (a
    visitor can never mark someone else's messages) and only forward; True when it changed."""
    visitors_conversation = (
        select(Conversation.id)
        .join(Contact, Contact.id == Conversation.contact_id)
        .where(
            Conversation.id == Message.conversation_id,
            Conversation.status != "resolved",
            Contact.channel_id == channel_id,
            Contact.external_id == external_id,
        )
        .exists()
    )
    return await _advance_status(
        session,
        [
            Message.id == message_id,
            Message.channel_id == channel_id,
            Message.role != "user",
            visitors_conversation,
        ],
        "delivered",
        error_code=None,
        error_text=None,
        now=now,
    )


async def update_delivery_status_by_external_id(
    session: AsyncSession,
    *,
    channel_id: uuid.UUID,
    external_id: str,
    status: DeliveryStatus,
    error_code: str | None = None,
    error_text: str | None = None,
    now: datetime | None = None,
) -> bool:
    """``update_delivery_status`` for a channel status callback, by the id the channel gave our
    message (a WhatsApp ``wamid``, a QR service's key id); never a user's message."""
    return await _advance_status(
        session,
        [
            Message.channel_id == channel_id,
            Message.provider_id == external_id,
            Message.role != "user",
        ],
        status,
        error_code=error_code,
        error_text=error_text,
        now=now,
    )


async def set_provider_id(session: AsyncSession, message_id: uuid.UUID, provider_id: str) -> bool:
    """Record the id the channel gave an outgoing message (once: never replaces another id)."""
    result = await session.execute(
        update(Message)
        .where(
            Message.id == message_id,
            or_(Message.provider_id.is_(None), Message.provider_id == provider_id),
        )
        .values(provider_id=provider_id)
        .returning(Message.id)
        .execution_options(synchronize_session=False)
    )
    return result.first() is not None


async def set_message_external_id(
    session: AsyncSession, message_id: uuid.UUID, external_id: str
) -> bool:
    """Record the id the channel gave an outgoing message (once: never replaces another id)."""
    result = await session.execute(
        update(Message)
        .where(
            Message.id == message_id,
            or_(Message.external_id.is_(None), Message.external_id == external_id),
        )
        .values(external_id=external_id)
        .returning(Message.id)
        .execution_options(synchronize_session=False)
    )
    return result.first() is not None


async def messages_since(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    *,
    after_seq: int = 0,
    limit: int = 100,
) -> list[MessageView]:
    """Messages with ``seq > after_seq`` in ``seq`` order; pass the last ``seq`` seen as the
    next cursor. ``seq`` only grows, so polling with the cursor never skips a message."""
    rows = await session.scalars(
        select(Message)
        .where(Message.conversation_id == conversation_id, Message.seq > after_seq)
        .order_by(Message.seq)
        .limit(limit)
        .execution_options(populate_existing=True)
    )
    return [MessageView.of(row) for row in rows]


async def recent_messages(
    session: AsyncSession, conversation_id: uuid.UUID, *, limit: int = 20
) -> list[MessageView]:
    """The last ``limit`` messages, oldest first (e.g. the AI prompt's history)."""
    rows = await session.scalars(
        select(Message)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.seq.desc())
        .limit(limit)
        .execution_options(populate_existing=True)
    )
    return [MessageView.of(row) for row in reversed(list(rows))]


# --- the agent inbox's listing ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    conversation: ConversationView
    contact_external_id: str
    contact_name: str | None


async def list_conversations(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    statuses: tuple[ConversationStatus, ...] = (),
    channel_id: uuid.UUID | None = None,
    chatbot_id: uuid.UUID | None = None,
    contains: str | None = None,
    before: tuple[datetime, uuid.UUID] | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[ConversationSummary]:
    """A tenant's conversations, most recently active first. ``before`` is the (last_activity_at,
    id) of the last row of the previous page: a keyset cursor, stable while rows are added.
    ``contains`` matches the contact's id or name, or any message's text (case-insensitive)."""
    stmt = (
        select(Conversation, Contact.external_id, Contact.display_name)
        .join(Contact, Contact.id == Conversation.contact_id)
        .where(Conversation.tenant_id == tenant_id)
        .order_by(Conversation.last_activity_at.desc(), Conversation.id.desc())
        .limit(limit)
    )
    if statuses:
        stmt = stmt.where(Conversation.status.in_(statuses))
    if channel_id is not None:
        stmt = stmt.where(Conversation.channel_id == channel_id)
    if chatbot_id is not None:
        stmt = stmt.where(Conversation.chatbot_id == chatbot_id)
    if since is not None:
        stmt = stmt.where(Conversation.last_activity_at >= since)
    if before is not None:
        at, last_id = before
        stmt = stmt.where(
            or_(
                Conversation.last_activity_at < at,
                (Conversation.last_activity_at == at) & (Conversation.id < last_id),
            )
        )
    if contains:
        pattern = "%" + contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        in_messages = (
            select(Message.id)
            .where(
                Message.conversation_id == Conversation.id,
                Message.text.ilike(pattern, escape="\\"),
            )
            .exists()
        )
        stmt = stmt.where(
            or_(
                Contact.external_id.ilike(pattern, escape="\\"),
                Contact.display_name.ilike(pattern, escape="\\"),
                in_messages,
            )
        )
    rows = await session.execute(stmt)
    return [
        ConversationSummary(ConversationView.of(c), external_id, name)
        for c, external_id, name in rows
    ]
