"""What a tenant can do to its channels, once for both doors: `gateway-admin channels` and the
admin API call these. Inputs are plain values (already validated by the caller's parser);
refusals are `AdminError`s the caller turns into one line (CLI) or a JSON 4xx (API)."""

from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    ChannelView,
    NotFoundError,
    SecretBox,
    WhatsAppCloudConfig,
    WhatsAppCloudSecrets,
    WhatsAppQrConfig,
    WhatsAppQrSecrets,
    WidgetConfig,
    create_channel,
    get_channel,
    get_channel_secrets,
    list_channels,
    set_channel_active,
    update_channel,
)
from chat_domain.types import QrService
from chat_pipeline.channels import whatsapp_qr
from chat_pipeline.channels.base import SendError
from chat_pipeline.queues import Pipeline
from chat_pipeline.send import ChannelGate, CircuitState


class AdminError(Exception):
    """A refusal the tenant or operator can act on. `status` is the HTTP status the API answers
    with; `field` names the input at fault."""

    def __init__(
        self, message: str, *, status: int = 400, code: str = "invalid", field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field


ALREADY_ROUTED = "that phone number id or session is already routed to a channel"


def callback_url(base_url: str, channel: ChannelView) -> str | None:
    """Where the provider sends this channel's webhooks."""
    if channel.kind == "whatsapp_cloud":
        return f"{base_url}/v1/channels/{channel.id}/whatsapp-cloud"
    if channel.kind == "whatsapp_qr":
        return f"{base_url}/v1/channels/{channel.id}/whatsapp-qr"
    return None


def describe(channel: ChannelView, base_url: str, circuit: CircuitState | None) -> dict[str, Any]:
    """A channel as shown to its tenant: settings, never secrets; whether it sends."""
    out: dict[str, Any] = {
        "id": str(channel.id),
        "kind": channel.kind,
        "chatbot_id": str(channel.chatbot_id),
        "tenant_id": str(channel.tenant_id),
        "active": channel.active,
        "config": channel.config.model_dump(mode="json"),
        "callback_url": callback_url(base_url, channel),
    }
    if circuit is not None:
        out["sending"] = "stopped" if circuit.open else "ok"
        if circuit.open:
            out["stopped_because"] = {"code": circuit.code, "reason": circuit.reason}
    return out


@dataclass(frozen=True, slots=True)
class CloudUpdate:
    phone_number_id: str | None = None
    access_token: str | None = None
    app_secret: str | None = None


@dataclass(frozen=True, slots=True)
class QrUpdate:
    base_url: str | None = None
    session: str | None = None
    api_key: str | None = None


class ChannelOps:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        box: SecretBox,
        gate: ChannelGate,
        base_url: str,
    ) -> None:
        self.sessions = sessions
        self.box = box
        self.gate = gate
        self.base_url = base_url

    async def circuit(self, channel: ChannelView) -> CircuitState | None:
        if channel.kind == "widget":
            return None
        try:
            return await self.gate.state(channel.id)
        except RedisError:
            return None  # Redis unreachable: the listing still works

    async def show(self, channel: ChannelView) -> dict[str, Any]:
        return describe(channel, self.base_url, await self.circuit(channel))

    async def list(
        self, *, tenant_id: uuid.UUID | None = None, chatbot_id: uuid.UUID | None = None
    ) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            channels = await list_channels(session, tenant_id=tenant_id, chatbot_id=chatbot_id)
        return [await self.show(c) for c in channels]

    async def _create(
        self,
        chatbot_id: uuid.UUID,
        config: WidgetConfig | WhatsAppCloudConfig | WhatsAppQrConfig,
        secrets_: WhatsAppCloudSecrets | WhatsAppQrSecrets | None,
    ) -> ChannelView:
        try:
            async with self.sessions() as session, session.begin():
                return await create_channel(
                    session, self.box, chatbot_id=chatbot_id, config=config, secrets=secrets_
                )
        except IntegrityError:
            raise AdminError(ALREADY_ROUTED, status=409, code="conflict") from None
        except NotFoundError:
            raise AdminError(
                f"chatbot {chatbot_id} does not exist", status=404, code="not_found",
                field="chatbot_id",
            ) from None  # fmt: skip

    async def add_widget(self, chatbot_id: uuid.UUID) -> dict[str, Any]:
        try:
            channel = await self._create(chatbot_id, WidgetConfig(), None)
        except AdminError as exc:
            if exc.status == 409:
                raise AdminError(
                    "this chatbot already has a widget channel", status=409, code="conflict"
                ) from None
            raise
        return describe(channel, self.base_url, None)

    async def add_cloud(
        self,
        chatbot_id: uuid.UUID,
        *,
        phone_number_id: str,
        access_token: str,
        app_secret: str,
        verify_token: str | None = None,
    ) -> dict[str, Any]:
        verify = verify_token or secrets.token_urlsafe(24)
        channel = await self._create(
            chatbot_id,
            WhatsAppCloudConfig(phone_number_id=phone_number_id),
            WhatsAppCloudSecrets(
                access_token=access_token, app_secret=app_secret, verify_token=verify
            ),
        )
        # shown once: Meta's callback setup asks for it; stored encrypted, never shown again
        return {**describe(channel, self.base_url, None), "verify_token": verify}

    async def add_qr(
        self,
        chatbot_id: uuid.UUID,
        *,
        service: QrService,
        base_url: str,
        session: str,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        webhook_secret = secrets.token_urlsafe(24)
        channel = await self._create(
            chatbot_id,
            WhatsAppQrConfig(service=service, base_url=base_url.rstrip("/"), session=session),
            WhatsAppQrSecrets(api_key=api_key, webhook_secret=webhook_secret),
        )
        # shown once: the QR service's webhook configuration needs it
        return {**describe(channel, self.base_url, None), "webhook_secret": webhook_secret}

    async def get(self, channel_id: uuid.UUID) -> ChannelView:
        async with self.sessions() as session:
            channel = await get_channel(session, channel_id)
        if channel is None:
            raise AdminError(
                f"channel {channel_id} does not exist", status=404, code="not_found",
                field="channel_id",
            )  # fmt: skip
        return channel

    async def set_active(self, channel_id: uuid.UUID, active: bool) -> dict[str, Any]:
        async with self.sessions() as session, session.begin():
            try:
                await set_channel_active(session, channel_id, active)
            except NotFoundError:
                raise AdminError(
                    f"channel {channel_id} does not exist", status=404, code="not_found",
                    field="channel_id",
                ) from None  # fmt: skip
            updated = await get_channel(session, channel_id)
        assert updated is not None
        if active:
            await self._resume(updated)
        return await self.show(updated)

    async def update(self, channel_id: uuid.UUID, change: CloudUpdate | QrUpdate) -> dict[str, Any]:
        """New settings or secrets; a channel whose sends were stopped (an expired token) sends
        again at once."""
        try:
            async with self.sessions() as session, session.begin():
                current = await get_channel(session, channel_id)
                if current is None:
                    raise AdminError(
                        f"channel {channel_id} does not exist", status=404, code="not_found",
                        field="channel_id",
                    )  # fmt: skip
                updated = await self._apply(session, current, change)
        except IntegrityError:
            raise AdminError(ALREADY_ROUTED, status=409, code="conflict") from None
        await self._resume(updated)
        return await self.show(updated)

    async def _apply(
        self, session: AsyncSession, current: ChannelView, change: CloudUpdate | QrUpdate
    ) -> ChannelView:
        old = await get_channel_secrets(session, self.box, current.id)
        config: WhatsAppCloudConfig | WhatsAppQrConfig
        secrets_: WhatsAppCloudSecrets | WhatsAppQrSecrets
        if (
            isinstance(change, CloudUpdate)
            and isinstance(current.config, WhatsAppCloudConfig)
            and isinstance(old, WhatsAppCloudSecrets)
        ):
            config = current.config.model_copy(
                update={"phone_number_id": change.phone_number_id or current.config.phone_number_id}
            )
            secrets_ = old.model_copy(
                update={
                    "access_token": change.access_token or old.access_token,
                    "app_secret": change.app_secret or old.app_secret,
                }
            )
        elif (
            isinstance(change, QrUpdate)
            and isinstance(current.config, WhatsAppQrConfig)
            and isinstance(old, WhatsAppQrSecrets)
        ):
            config = current.config.model_copy(
                update={
                    "base_url": (change.base_url or current.config.base_url).rstrip("/"),
                    "session": change.session or current.config.session,
                }
            )
            secrets_ = old.model_copy(update={"api_key": change.api_key or old.api_key})
        else:
            raise AdminError(f"a {current.kind} channel has nothing to update here", field="kind")
        return await update_channel(session, self.box, current.id, config=config, secrets=secrets_)

    async def _resume(self, channel: ChannelView) -> None:
        queue = Pipeline.open(self.gate.redis).channel_queue(channel.kind)
        if queue is not None:
            await self.gate.resume(channel.id, queue)  # new settings: waiting sends go at once

    async def pairing(self, channel_id: uuid.UUID, *, timeout: float) -> PairingInfo:
        """A QR channel's session state and, while it waits for a scan, its pairing QR, asked of
        the service itself (WAHA/Evolution hold it; we never store it: it changes every ~20 s)."""
        async with self.sessions() as session:
            channel = await get_channel(session, channel_id)
            found = None
            if channel is not None:
                found = await get_channel_secrets(session, self.box, channel_id)
        if channel is None or not isinstance(channel.config, WhatsAppQrConfig):
            raise AdminError(
                f"channel {channel_id} is not a WhatsApp QR channel", status=404,
                code="not_found", field="channel_id",
            )  # fmt: skip
        api_key = found.api_key if isinstance(found, WhatsAppQrSecrets) else None
        config = channel.config
        make = whatsapp_qr.WahaSender if config.service == "waha" else whatsapp_qr.EvolutionSender
        sender = make(config.base_url, config.session, api_key, timeout=timeout)
        info = PairingInfo(channel_id=channel_id, service=config.service, session=config.session)
        try:
            status = await sender.session_status()
            info.state, info.raw = status.status, status.raw
            if status.status != "working":
                try:
                    info.image, info.content_type = await sender.qr_code()
                except whatsapp_qr.QrNotAvailableError as exc:
                    info.unavailable = str(exc)
        except SendError as exc:  # the service is down, or refuses our key: say which
            raise AdminError(
                f"{config.service} at {config.base_url}: {exc}", status=502, code="qr_service"
            ) from None
        finally:
            await sender.aclose()
        return info


@dataclass(slots=True)
class PairingInfo:
    channel_id: uuid.UUID
    service: str
    session: str
    state: str | None = None
    raw: Any = None
    image: bytes | None = None
    content_type: str | None = None
    unavailable: str | None = None  # why there is no QR now (e.g. the session is starting)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(self.channel_id),
            "service": self.service,
            "session": self.session,
            "state": self.state,
            "raw": self.raw,
        }
        if self.image is not None:
            encoded = base64.b64encode(self.image).decode()
            out["qr_data_url"] = f"data:{self.content_type};base64,{encoded}"
        elif self.unavailable is not None:
            out["qr"] = f"not available now: {self.unavailable}"
        return out
