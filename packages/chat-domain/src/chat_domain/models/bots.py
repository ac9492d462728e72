"""Chatbots and the channels they answer on."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from chat_domain.models.base import Base, CreatedAt, UUIDPrimaryKey
from chat_domain.models.tenancy import Tenant
from chat_domain.types import CHANNEL_KINDS, ChannelKind, sql_in_list

DEFAULT_FALLBACK_REPLY = "Sorry, I cannot answer right now. Please try again later."
DEFAULT_LIMIT_REPLY = "This assistant has reached its monthly limit. Please try again later."
DEFAULT_HANDOFF_PHRASES = ("human", "agent", "a person", "real person", "talk to someone")
DEFAULT_HANDOFF_REPLY = (
    "I'm passing you to a member of our team; they will answer here as soon as they can."
)


class Chatbot(UUIDPrimaryKey, CreatedAt, Base):
    __tablename__ = "chatbots"
    __table_args__ = (
        CheckConstraint("temperature >= 0 AND temperature <= 2", name="temperature_range"),
        CheckConstraint("max_tokens > 0", name="max_tokens_positive"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str] = mapped_column(String(200))
    provider_base_url: Mapped[str | None] = mapped_column(String(500))
    # Fernet token of the provider API key; None when the platform default key is used.
    provider_api_key_enc: Mapped[str | None] = mapped_column(Text)
    temperature: Mapped[float] = mapped_column(default=0.3)
    max_tokens: Mapped[int] = mapped_column(default=512)
    fallback_reply: Mapped[str] = mapped_column(Text, default=DEFAULT_FALLBACK_REPLY)
    limit_reply: Mapped[str] = mapped_column(Text, default=DEFAULT_LIMIT_REPLY)
    kb_enabled: Mapped[bool] = mapped_column(default=False)
    widget_public_key: Mapped[str] = mapped_column(String(64), unique=True)
    allowed_origins: Mapped[list[str]] = mapped_column(default=list)
    # Fernet token of the HMAC secret for widget visitor identity verification.
    identity_secret_enc: Mapped[str | None] = mapped_column(Text)
    # what a user says to reach a person, and the bot's words when it hands over; NULL: the
    # defaults above (an empty list turns asking off)
    handoff_phrases: Mapped[list[str] | None] = mapped_column(default=None)
    handoff_reply: Mapped[str | None] = mapped_column(Text, default=None)

    tenant: Mapped[Tenant] = relationship(lazy="raise")


class Channel(UUIDPrimaryKey, CreatedAt, Base):
    """Where a chatbot talks. ``lookup_key`` keeps routes unique: the chatbot id for ``widget``
    (one widget channel per chatbot), the phone number id for ``whatsapp_cloud``, a hash of the
    service's URL and the session (WAHA) or instance (Evolution) for ``whatsapp_qr``. Secrets
    live only in ``secrets_enc``, one Fernet-encrypted JSON object."""

    __tablename__ = "channels"
    __table_args__ = (
        CheckConstraint(f"kind IN ({sql_in_list(CHANNEL_KINDS)})", name="kind"),
        UniqueConstraint("kind", "lookup_key"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    chatbot_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("chatbots.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[ChannelKind] = mapped_column(String(20))
    lookup_key: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    secrets_enc: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(default=True)

    chatbot: Mapped[Chatbot] = relationship(lazy="raise")
