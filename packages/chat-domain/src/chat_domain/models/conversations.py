"""Contacts, conversations and messages."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from chat_domain.models.base import Base, CreatedAt, UUIDPrimaryKey, utcnow
from chat_domain.types import (
    CONVERSATION_STATUSES,
    DELIVERY_STATUSES,
    MESSAGE_ROLES,
    ConversationStatus,
    DeliveryStatus,
    MessageRole,
    sql_in_list,
)


class Contact(UUIDPrimaryKey, CreatedAt, Base):
    """A person on one channel: a WhatsApp ``wa_id`` or a widget visitor id."""

    __tablename__ = "contacts"
    __table_args__ = (UniqueConstraint("channel_id", "external_id"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    channel_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(200))
    display_name: Mapped[str | None] = mapped_column(String(200))


class Conversation(UUIDPrimaryKey, CreatedAt, Base):
    """At most one active (``open`` or ``pending_human``) conversation per contact, enforced by
    a partial unique index. ``last_seq`` hands out the per-conversation message sequence."""

    __tablename__ = "conversations"
    __table_args__ = (
        CheckConstraint(f"status IN ({sql_in_list(CONVERSATION_STATUSES)})", name="status"),
        Index(
            "uq_conversations_active_contact",
            "contact_id",
            unique=True,
            sqlite_where=text("status <> 'resolved'"),
            postgresql_where=text("status <> 'resolved'"),
        ),
        Index("ix_conversations_tenant_id_last_activity_at", "tenant_id", "last_activity_at"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    chatbot_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("chatbots.id", ondelete="CASCADE"), index=True
    )
    channel_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("channels.id", ondelete="CASCADE"), index=True
    )
    contact_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[ConversationStatus] = mapped_column(String(20), default="open")
    last_activity_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)

    contact: Mapped[Contact] = relationship(lazy="raise")


_UNANSWERED = text("role = 'user' AND reply_id IS NULL")
_QUEUED = text("status = 'queued'")
_HAS_PROVIDER_ID = text("provider_id IS NOT NULL")


class Message(UUIDPrimaryKey, CreatedAt, Base):
    """One message. ``seq`` is strictly increasing within the conversation (in commit order), the
    cursor of ``messages_since``. ``external_id`` is the channel's message id (wamid, widget
    client id); unique per channel, NULL for messages without one.

    ``reply_id`` records which reply (bot, limit or fallback reply, or an agent's) answered a
    user message; NULL while it is unanswered. What a reply answers is this explicit record, not
    a comparison of sequence numbers assigned at different times. ``requeues`` counts how often
    the reconciler had to queue the message (or the reply) again."""

    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint(f"role IN ({sql_in_list(MESSAGE_ROLES)})", name="role"),
        CheckConstraint(f"status IN ({sql_in_list(DELIVERY_STATUSES)})", name="status"),
        UniqueConstraint("conversation_id", "seq"),
        UniqueConstraint("channel_id", "external_id"),
        Index("ix_messages_tenant_id_created_at", "tenant_id", "created_at"),
        # the conversation's unanswered questions (the AI job's input), and the reconciler's
        # scans: unanswered questions and undelivered replies by age (both stay small)
        Index(
            "ix_messages_unanswered_conversation",
            "conversation_id",
            "seq",
            sqlite_where=_UNANSWERED,
            postgresql_where=_UNANSWERED,
        ),
        Index(
            "ix_messages_unanswered_created_at",
            "created_at",
            sqlite_where=_UNANSWERED,
            postgresql_where=_UNANSWERED,
        ),
        Index(
            "ix_messages_queued_created_at",
            "created_at",
            sqlite_where=_QUEUED,
            postgresql_where=_QUEUED,
        ),
        # status callbacks find an outgoing message by the id its channel gave it
        Index(
            "uq_messages_channel_provider_id",
            "channel_id",
            "provider_id",
            unique=True,
            sqlite_where=_HAS_PROVIDER_ID,
            postgresql_where=_HAS_PROVIDER_ID,
        ),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    channel_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    role: Mapped[MessageRole] = mapped_column(String(20))
    text: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[DeliveryStatus] = mapped_column(String(20))
    status_updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_text: Mapped[str | None] = mapped_column(Text)
    reply_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    requeues: Mapped[int] = mapped_column(default=0, server_default="0")
    # what a non-text message carried, as the channel described it (media id and type, the
    # button's id, a location): a reference, never the bytes
    attachment: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # (outgoing) the id the channel gave it (wamid, a QR service's key id); `external_id` stays
    # our own key (`ai:…`, `agent:…`), which makes storing a reply idempotent
    provider_id: Mapped[str | None] = mapped_column(String(200), default=None)

    conversation: Mapped[Conversation] = relationship(lazy="raise")
