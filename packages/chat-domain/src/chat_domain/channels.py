"""Chatbots and channels. Views never carry secrets; ``*_secrets`` functions decrypt them for
the workers that need them."""

from __future__ import annotations

import hashlib
import secrets as _secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain.crypto import SecretBox
from chat_domain.errors import NotFoundError
from chat_domain.models import Channel, Chatbot
from chat_domain.models.bots import (
    DEFAULT_FALLBACK_REPLY,
    DEFAULT_HANDOFF_PHRASES,
    DEFAULT_HANDOFF_REPLY,
    DEFAULT_LIMIT_REPLY,
)
from chat_domain.types import ChannelKind, QrService

# --- channel configuration (stored in clear) and secrets (stored encrypted) -------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WidgetConfig(_Model):
    kind: Literal["widget"] = "widget"


class WhatsAppCloudConfig(_Model):
    kind: Literal["whatsapp_cloud"] = "whatsapp_cloud"
    phone_number_id: str = Field(min_length=1, max_length=200)
    business_account_id: str | None = None
    display_phone_number: str | None = None


class WhatsAppQrConfig(_Model):
    kind: Literal["whatsapp_qr"] = "whatsapp_qr"
    service: QrService
    base_url: str = Field(min_length=1)
    session: str = Field(min_length=1, max_length=200)  # WAHA session / Evolution instance


ChannelConfig = Annotated[
    WidgetConfig | WhatsAppCloudConfig | WhatsAppQrConfig, Field(discriminator="kind")
]
_config_adapter: TypeAdapter[WidgetConfig | WhatsAppCloudConfig | WhatsAppQrConfig] = TypeAdapter(
    ChannelConfig
)


class WhatsAppCloudSecrets(_Model):
    kind: Literal["whatsapp_cloud"] = "whatsapp_cloud"
    access_token: str = Field(repr=False)
    app_secret: str = Field(repr=False)
    verify_token: str = Field(repr=False)


class WhatsAppQrSecrets(_Model):
    kind: Literal["whatsapp_qr"] = "whatsapp_qr"
    api_key: str | None = Field(default=None, repr=False)
    # authenticates the service's webhooks to us: WAHA's HMAC key, or the shared secret an
    # Evolution webhook carries (Evolution signs nothing)
    webhook_secret: str | None = Field(default=None, repr=False)


ChannelSecrets = Annotated[WhatsAppCloudSecrets | WhatsAppQrSecrets, Field(discriminator="kind")]
_secrets_adapter: TypeAdapter[WhatsAppCloudSecrets | WhatsAppQrSecrets] = TypeAdapter(
    ChannelSecrets
)


# --- views ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatbotView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    system_prompt: str
    model: str
    provider_base_url: str | None
    temperature: float
    max_tokens: int
    fallback_reply: str
    limit_reply: str
    kb_enabled: bool
    widget_public_key: str
    allowed_origins: tuple[str, ...]
    has_provider_api_key: bool
    has_identity_secret: bool
    created_at: datetime
    handoff_phrases: tuple[str, ...] = DEFAULT_HANDOFF_PHRASES
    handoff_reply: str = DEFAULT_HANDOFF_REPLY

    @classmethod
    def of(cls, row: Chatbot) -> ChatbotView:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            name=row.name,
            system_prompt=row.system_prompt,
            model=row.model,
            provider_base_url=row.provider_base_url,
            temperature=row.temperature,
            max_tokens=row.max_tokens,
            fallback_reply=row.fallback_reply,
            limit_reply=row.limit_reply,
            kb_enabled=row.kb_enabled,
            widget_public_key=row.widget_public_key,
            allowed_origins=tuple(row.allowed_origins),
            has_provider_api_key=row.provider_api_key_enc is not None,
            has_identity_secret=row.identity_secret_enc is not None,
            created_at=row.created_at,
            handoff_phrases=DEFAULT_HANDOFF_PHRASES
            if row.handoff_phrases is None
            else tuple(row.handoff_phrases),
            handoff_reply=row.handoff_reply or DEFAULT_HANDOFF_REPLY,
        )


@dataclass(frozen=True, slots=True)
class ChatbotSecrets:
    provider_api_key: str | None
    identity_secret: str | None

    def __repr__(self) -> str:
        return (
            f"ChatbotSecrets(provider_api_key={'<hidden>' if self.provider_api_key else None}, "
            f"identity_secret={'<hidden>' if self.identity_secret else None})"
        )


@dataclass(frozen=True, slots=True)
class ChannelView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    chatbot_id: uuid.UUID
    kind: ChannelKind
    config: WidgetConfig | WhatsAppCloudConfig | WhatsAppQrConfig
    active: bool
    created_at: datetime

    @classmethod
    def of(cls, row: Channel) -> ChannelView:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            chatbot_id=row.chatbot_id,
            kind=row.kind,
            config=_config_adapter.validate_python(row.config),
            active=row.active,
            created_at=row.created_at,
        )


# --- chatbots -----------------------------------------------------------------------------------


def new_widget_public_key() -> str:
    return "wpk_" + _secrets.token_urlsafe(24)


async def create_chatbot(
    session: AsyncSession,
    box: SecretBox,
    *,
    tenant_id: uuid.UUID,
    name: str,
    model: str,
    system_prompt: str = "",
    provider_base_url: str | None = None,
    provider_api_key: str | None = None,
    temperature: float = 0.3,
    max_tokens: int = 512,
    fallback_reply: str = DEFAULT_FALLBACK_REPLY,
    limit_reply: str = DEFAULT_LIMIT_REPLY,
    kb_enabled: bool = False,
    allowed_origins: Sequence[str] = (),
    identity_secret: str | None = None,
    handoff_phrases: Sequence[str] | None = None,
    handoff_reply: str | None = None,
) -> ChatbotView:
    row = Chatbot(
        tenant_id=tenant_id,
        name=name,
        model=model,
        system_prompt=system_prompt,
        provider_base_url=provider_base_url,
        provider_api_key_enc=None if provider_api_key is None else box.encrypt(provider_api_key),
        temperature=temperature,
        max_tokens=max_tokens,
        fallback_reply=fallback_reply,
        limit_reply=limit_reply,
        kb_enabled=kb_enabled,
        widget_public_key=new_widget_public_key(),
        allowed_origins=list(allowed_origins),
        identity_secret_enc=None if identity_secret is None else box.encrypt(identity_secret),
        handoff_phrases=None if handoff_phrases is None else list(handoff_phrases),
        handoff_reply=handoff_reply,
    )
    session.add(row)
    await session.flush()
    return ChatbotView.of(row)


async def get_chatbot(session: AsyncSession, chatbot_id: uuid.UUID) -> ChatbotView | None:
    row = await session.get(Chatbot, chatbot_id)
    return None if row is None else ChatbotView.of(row)


async def list_chatbots(session: AsyncSession, tenant_id: uuid.UUID) -> list[ChatbotView]:
    rows = await session.scalars(
        select(Chatbot).where(Chatbot.tenant_id == tenant_id).order_by(Chatbot.created_at)
    )
    return [ChatbotView.of(row) for row in rows]


async def get_chatbot_by_widget_key(
    session: AsyncSession, widget_public_key: str
) -> ChatbotView | None:
    row = await session.scalar(
        select(Chatbot).where(Chatbot.widget_public_key == widget_public_key)
    )
    return None if row is None else ChatbotView.of(row)


async def get_chatbot_secrets(
    session: AsyncSession, box: SecretBox, chatbot_id: uuid.UUID
) -> ChatbotSecrets:
    row = (
        await session.execute(
            select(Chatbot.provider_api_key_enc, Chatbot.identity_secret_enc).where(
                Chatbot.id == chatbot_id
            )
        )
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"chatbot {chatbot_id} does not exist")
    api_key_enc, identity_enc = row
    return ChatbotSecrets(
        provider_api_key=None if api_key_enc is None else box.decrypt(api_key_enc),
        identity_secret=None if identity_enc is None else box.decrypt(identity_enc),
    )


async def update_chatbot(
    session: AsyncSession, chatbot_id: uuid.UUID, **changes: Any
) -> ChatbotView:
    """Change non-secret settings (name, system_prompt, model, provider_base_url, temperature,
    max_tokens, fallback_reply, limit_reply, kb_enabled, allowed_origins, handoff_phrases,
    handoff_reply)."""
    allowed = {
        "name",
        "system_prompt",
        "model",
        "provider_base_url",
        "temperature",
        "max_tokens",
        "fallback_reply",
        "limit_reply",
        "kb_enabled",
        "allowed_origins",
        "handoff_phrases",
        "handoff_reply",
    }
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"cannot update chatbot fields: {sorted(unknown)}")
    row = await session.get(Chatbot, chatbot_id)
    if row is None:
        raise NotFoundError(f"chatbot {chatbot_id} does not exist")
    for key, value in changes.items():
        listed = key in ("allowed_origins", "handoff_phrases") and value is not None
        setattr(row, key, list(value) if listed else value)
    await session.flush()
    return ChatbotView.of(row)


_KEEP: Any = object()


async def set_chatbot_secrets(
    session: AsyncSession,
    box: SecretBox,
    chatbot_id: uuid.UUID,
    *,
    provider_api_key: str | None = _KEEP,
    identity_secret: str | None = _KEEP,
) -> ChatbotView:
    """Replace (a string) or remove (None) the chatbot's provider key or identity secret; an
    argument left out is kept."""
    row = await session.get(Chatbot, chatbot_id)
    if row is None:
        raise NotFoundError(f"chatbot {chatbot_id} does not exist")
    if provider_api_key is not _KEEP:
        row.provider_api_key_enc = (
            None if provider_api_key is None else box.encrypt(provider_api_key)
        )
    if identity_secret is not _KEEP:
        row.identity_secret_enc = None if identity_secret is None else box.encrypt(identity_secret)
    await session.flush()
    return ChatbotView.of(row)


# --- channels -----------------------------------------------------------------------------------


def _lookup_key(
    chatbot_id: uuid.UUID, config: WidgetConfig | WhatsAppCloudConfig | WhatsAppQrConfig
) -> str:
    if isinstance(config, WhatsAppCloudConfig):
        return config.phone_number_id
    if isinstance(config, WhatsAppQrConfig):
        return qr_lookup_key(config.base_url, config.session)
    return str(chatbot_id)


def qr_lookup_key(base_url: str, session_name: str) -> str:
    """A QR session is unique per service, not globally: every WAHA Core install has one
    session and it is called ``default``."""
    service = base_url.strip().rstrip("/").lower()
    return "qr:" + hashlib.sha256(f"{service}\n{session_name}".encode()).hexdigest()[:40]


async def create_channel(
    session: AsyncSession,
    box: SecretBox,
    *,
    chatbot_id: uuid.UUID,
    config: WidgetConfig | WhatsAppCloudConfig | WhatsAppQrConfig,
    secrets: WhatsAppCloudSecrets | WhatsAppQrSecrets | None = None,
) -> ChannelView:
    """A channel for ``chatbot_id``. WhatsApp Cloud channels need ``WhatsAppCloudSecrets``; QR
    channels take ``WhatsAppQrSecrets`` (the API key may be None); widgets have no secrets.
    Raises ``IntegrityError`` when the phone number id / session is already routed, or the
    chatbot already has a widget channel."""
    if secrets is not None and secrets.kind != config.kind:
        raise ValueError(f"{secrets.kind} secrets do not fit a {config.kind} channel")
    if isinstance(config, WhatsAppCloudConfig) and secrets is None:
        raise ValueError("a whatsapp_cloud channel needs WhatsAppCloudSecrets")
    tenant_id = await session.scalar(select(Chatbot.tenant_id).where(Chatbot.id == chatbot_id))
    if tenant_id is None:
        raise NotFoundError(f"chatbot {chatbot_id} does not exist")
    row = Channel(
        tenant_id=tenant_id,
        chatbot_id=chatbot_id,
        kind=config.kind,
        lookup_key=_lookup_key(chatbot_id, config),
        config=config.model_dump(mode="json"),
        secrets_enc=None if secrets is None else box.encrypt_json(secrets.model_dump(mode="json")),
        active=True,
    )
    session.add(row)
    await session.flush()
    return ChannelView.of(row)


async def get_channel(session: AsyncSession, channel_id: uuid.UUID) -> ChannelView | None:
    row = await session.get(Channel, channel_id)
    return None if row is None else ChannelView.of(row)


async def _by_lookup(session: AsyncSession, kind: ChannelKind, key: str) -> ChannelView | None:
    row = await session.scalar(
        select(Channel).where(Channel.kind == kind, Channel.lookup_key == key)
    )
    return None if row is None else ChannelView.of(row)


async def find_channel_by_widget_key(
    session: AsyncSession, widget_public_key: str
) -> ChannelView | None:
    """The widget channel of the chatbot with this public key."""
    row = await session.scalar(
        select(Channel)
        .join(Chatbot, Chatbot.id == Channel.chatbot_id)
        .where(Chatbot.widget_public_key == widget_public_key, Channel.kind == "widget")
    )
    return None if row is None else ChannelView.of(row)


async def find_channel_by_phone_number_id(
    session: AsyncSession, phone_number_id: str
) -> ChannelView | None:
    return await _by_lookup(session, "whatsapp_cloud", phone_number_id)


async def find_channel_by_qr_session(
    session: AsyncSession, base_url: str, session_name: str
) -> ChannelView | None:
    return await _by_lookup(session, "whatsapp_qr", qr_lookup_key(base_url, session_name))


async def get_channel_secrets(
    session: AsyncSession, box: SecretBox, channel_id: uuid.UUID
) -> WhatsAppCloudSecrets | WhatsAppQrSecrets | None:
    """Decrypted secrets of a channel (None for widget channels). For workers only: never log
    or return these to clients."""
    row = (
        await session.execute(select(Channel.secrets_enc).where(Channel.id == channel_id))
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"channel {channel_id} does not exist")
    if row[0] is None:
        return None
    return _secrets_adapter.validate_python(box.decrypt_json(row[0]))


async def list_channels(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID | None = None,
    chatbot_id: uuid.UUID | None = None,
    kind: ChannelKind | None = None,
) -> list[ChannelView]:
    """Channels, oldest first, filtered by tenant, chatbot and kind when given."""
    query = select(Channel).order_by(Channel.created_at, Channel.id)
    if tenant_id is not None:
        query = query.where(Channel.tenant_id == tenant_id)
    if chatbot_id is not None:
        query = query.where(Channel.chatbot_id == chatbot_id)
    if kind is not None:
        query = query.where(Channel.kind == kind)
    return [ChannelView.of(row) for row in await session.scalars(query)]


async def update_channel(
    session: AsyncSession,
    box: SecretBox,
    channel_id: uuid.UUID,
    *,
    config: WidgetConfig | WhatsAppCloudConfig | WhatsAppQrConfig | None = None,
    secrets: WhatsAppCloudSecrets | WhatsAppQrSecrets | None = None,
) -> ChannelView:
    """Replace a channel's configuration and/or secrets (a new token, a moved QR service). The
    kind cannot change; the routing key follows the configuration."""
    row = await session.get(Channel, channel_id)
    if row is None:
        raise NotFoundError(f"channel {channel_id} does not exist")
    if config is not None:
        if config.kind != row.kind:
            raise ValueError(f"a {row.kind} channel cannot become {config.kind}")
        row.config = config.model_dump(mode="json")
        row.lookup_key = _lookup_key(row.chatbot_id, config)
    if secrets is not None:
        if secrets.kind != row.kind:
            raise ValueError(f"{secrets.kind} secrets do not fit a {row.kind} channel")
        row.secrets_enc = box.encrypt_json(secrets.model_dump(mode="json"))
    await session.flush()
    return ChannelView.of(row)


async def set_channel_active(session: AsyncSession, channel_id: uuid.UUID, active: bool) -> None:
    row = await session.get(Channel, channel_id)
    if row is None:
        raise NotFoundError(f"channel {channel_id} does not exist")
    row.active = active
    await session.flush()
