"""WhatsApp webhooks: one callback URL per channel (`gateway-admin channels` prints it).

A webhook is answered 200 once what it carries is durable: user messages stored (and queued,
or left to the reconciler), statuses applied. Providers retry for hours or days when they get
anything else, and deliver the same event more than once and out of order: messages are
deduplicated by their channel id (`wamid`, a QR key id) when stored, statuses only move forward.
A request whose signature does not verify is refused (401) and nothing is stored.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from chat_domain import (
    ChannelView,
    WhatsAppCloudConfig,
    WhatsAppCloudSecrets,
    WhatsAppQrConfig,
    WhatsAppQrSecrets,
    find_channel_by_phone_number_id,
    get_channel,
    get_channel_secrets,
)
from chat_pipeline import Runtime
from chat_pipeline.cache import TTLCache
from chat_pipeline.channels import whatsapp_cloud, whatsapp_qr
from chat_pipeline.channels.base import InboundMessage, StatusUpdate
from chat_pipeline.receive import ChannelRoute, apply_status, receive_message
from chat_pipeline.send import ChannelGate
from gateway.errors import ApiError
from gateway.keys import runtime_key

__all__ = ["routes", "whatsapp_cache_key"]

log = logging.getLogger("gateway.whatsapp")


@dataclass(frozen=True, slots=True)
class _Channel:
    view: ChannelView
    secrets: Any


class WebhookChannels:
    """Channel settings and secrets by id, cached briefly (every webhook needs them)."""

    def __init__(self) -> None:
        self._cache: TTLCache[uuid.UUID, _Channel | None] = TTLCache()
        self._numbers: TTLCache[str, uuid.UUID | None] = TTLCache()

    async def get(self, rt: Runtime, raw_id: str, kind: str) -> _Channel:
        try:
            channel_id = uuid.UUID(raw_id)
        except ValueError:
            raise ApiError(404, "unknown_channel", "no such channel", "channel_id") from None

        async def load() -> _Channel | None:
            async with rt.sessions() as session:
                view = await get_channel(session, channel_id)
                if view is None:
                    return None
                return _Channel(view, await get_channel_secrets(session, rt.box, channel_id))

        found = await self._cache.get(channel_id, load)
        if found is None or found.view.kind != kind or not found.view.active:
            raise ApiError(404, "unknown_channel", "no such channel", "channel_id")
        return found

    async def by_number(self, rt: Runtime, phone_number_id: str) -> _Channel | None:
        """The active Cloud channel of a phone number id, if the platform has one."""

        async def load() -> uuid.UUID | None:
            async with rt.sessions() as session:
                view = await find_channel_by_phone_number_id(session, phone_number_id)
            return None if view is None else view.id

        channel_id = await self._numbers.get(phone_number_id, load)
        if channel_id is None:
            return None
        try:
            return await self.get(rt, str(channel_id), "whatsapp_cloud")
        except ApiError:
            return None  # disabled, or gone meanwhile


whatsapp_cache_key = web.AppKey("whatsapp_channels", WebhookChannels)


WEBHOOK_MAX_BYTES = 1024 * 1024  # a provider may batch many events in one call
# The body is read before its signature can be checked, so anyone who knows a callback URL
# could hold connections open by trickling bytes (slow loris); providers send 1 MiB in far less.
WEBHOOK_READ_TIMEOUT_S = 10.0


async def read_body(request: web.Request, limit: int = WEBHOOK_MAX_BYTES) -> bytes:
    """The raw body, up to `limit` bytes (the app's default limit is the widget's, smaller),
    within `WEBHOOK_READ_TIMEOUT_S` (else 408)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(WEBHOOK_READ_TIMEOUT_S):
            while chunk := await request.content.read(65536):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too_large", f"the body is larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408, "timeout", f"the body did not arrive within {WEBHOOK_READ_TIMEOUT_S:g} s"
        ) from None
    return b"".join(chunks)


def _route(channel: ChannelView) -> ChannelRoute:
    return ChannelRoute(channel.tenant_id, channel.chatbot_id, channel.id, channel.kind)


async def _apply(
    rt: Runtime, channel: ChannelView, items: list[InboundMessage | StatusUpdate]
) -> dict[str, int]:
    counts = {"messages": 0, "duplicates": 0, "statuses": 0}
    route = _route(channel)
    for item in items:
        if isinstance(item, InboundMessage):
            received = await receive_message(
                rt, route, item, flood_limit=(rt.settings.whatsapp_contact_rate, 60_000)
            )
            counts["duplicates" if received.duplicate else "messages"] += 1
        else:
            await apply_status(rt, channel.id, item, channel.tenant_id)
            counts["statuses"] += 1
    return counts


# -- WhatsApp Cloud API ---------------------------------------------------------------------------


async def cloud_verify(request: web.Request) -> web.StreamResponse:
    """Meta's subscription check: echo `hub.challenge` when the verify token matches."""
    rt = request.app[runtime_key]
    found = await request.app[whatsapp_cache_key].get(
        rt, request.match_info["channel_id"], "whatsapp_cloud"
    )
    assert isinstance(found.secrets, WhatsAppCloudSecrets)
    challenge = whatsapp_cloud.verify_subscription(request.query, found.secrets.verify_token)
    if challenge is None:
        raise ApiError(403, "verification_failed", "verify token mismatch", "hub.verify_token")
    return web.Response(text=challenge, content_type="text/plain")


async def cloud_events(request: web.Request) -> web.StreamResponse:
    rt = request.app[runtime_key]
    found = await request.app[whatsapp_cache_key].get(
        rt, request.match_info["channel_id"], "whatsapp_cloud"
    )
    assert isinstance(found.secrets, WhatsAppCloudSecrets)
    assert isinstance(found.view.config, WhatsAppCloudConfig)
    raw = await read_body(request)  # the signature covers these exact bytes
    if not whatsapp_cloud.verify_signature(
        found.secrets.app_secret, raw, request.headers.get("X-Hub-Signature-256")
    ):
        raise ApiError(401, "invalid_signature", "signature does not verify", "signature")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "the body must be JSON") from None
    by_number: dict[str, list[InboundMessage | StatusUpdate]] = {}
    for key, item in whatsapp_cloud.parse_webhook(body):
        by_number.setdefault(key, []).append(item)
    counts = {"messages": 0, "duplicates": 0, "statuses": 0, "ignored": 0}
    for number, items in by_number.items():
        target = await _cloud_target(request, found, number)
        if target is None:
            counts["ignored"] += len(items)
            log.info("channel %s: events for number %s ignored", found.view.id, number)
            continue
        for name, count in (await _apply(rt, target.view, items)).items():
            counts[name] += count
    return web.json_response({"ok": True, **counts})


async def _cloud_target(request: web.Request, called: _Channel, number: str) -> _Channel | None:
    """Whose events these are. Meta sends every number of an app to the app's one callback URL,
    so a channel's URL also receives its sibling numbers' events: they go to the channel of that
    number when it belongs to the same app (the same app secret signed them), never elsewhere."""
    assert isinstance(called.view.config, WhatsAppCloudConfig)
    if number == called.view.config.phone_number_id:
        return called
    other = await request.app[whatsapp_cache_key].by_number(request.app[runtime_key], number)
    if other is None or not isinstance(other.secrets, WhatsAppCloudSecrets):
        return None
    assert isinstance(called.secrets, WhatsAppCloudSecrets)
    same_app = hmac.compare_digest(
        other.secrets.app_secret.encode(), called.secrets.app_secret.encode()
    )
    return other if same_app else None


# -- WhatsApp QR services (WAHA, Evolution API) ----------------------------------------------------


async def qr_events(request: web.Request) -> web.StreamResponse:
    """A WAHA or Evolution webhook. WAHA signs its body (`X-Webhook-Hmac`, SHA-512 with the
    channel's webhook secret as the session's HMAC key); Evolution signs nothing, so its
    webhook carries the channel's secret in `X-Webhook-Secret` (set in the instance's webhook
    headers; see docs/channels.md)."""
    rt = request.app[runtime_key]
    found = await request.app[whatsapp_cache_key].get(
        rt, request.match_info["channel_id"], "whatsapp_qr"
    )
    config = found.view.config
    assert isinstance(config, WhatsAppQrConfig)
    secret = found.secrets.webhook_secret if isinstance(found.secrets, WhatsAppQrSecrets) else None
    raw = await read_body(request)
    if config.service == "waha":
        trusted = whatsapp_qr.verify_waha_hmac(
            secret,
            raw,
            request.headers.get("X-Webhook-Hmac"),
            algorithm=request.headers.get("X-Webhook-Hmac-Algorithm"),
        )
    else:
        trusted = whatsapp_qr.verify_shared_secret(secret, request.headers.get("X-Webhook-Secret"))
    if not trusted:
        raise ApiError(401, "invalid_signature", "the webhook is not authenticated", "signature")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "the body must be JSON") from None
    parse = (
        whatsapp_qr.parse_waha_webhook
        if config.service == "waha"
        else whatsapp_qr.parse_evolution_webhook
    )
    items: list[InboundMessage | StatusUpdate] = []
    sessions = 0
    for key, item in parse(body):
        if key != config.session:
            log.info("channel %s: event for session %s ignored", found.view.id, key)
        elif isinstance(item, whatsapp_qr.SessionStatus):
            sessions += 1
            await _session_changed(rt, found.view, item)
        else:
            items.append(item)
    counts = await _apply(rt, found.view, items)
    return web.json_response({"ok": True, **counts, "sessions": sessions})


async def _session_changed(
    rt: Runtime, channel: ChannelView, status: whatsapp_qr.SessionStatus
) -> None:
    """A working session sends at once; any other state stops the channel's sends (they wait,
    no attempt used) until it works again. The tenant sees why in `gateway-admin channels`."""
    gate = ChannelGate(rt.redis)
    if status.at is not None:
        at_ms = int(status.at.timestamp() * 1000)
        if not await gate.session_state_is_newest(channel.id, at_ms):
            log.info("channel %s: an older session state (%s) ignored", channel.id, status.raw)
            return
    if status.status == "working":
        queue = rt.pipeline.channel_queue(channel.kind)
        assert queue is not None
        was_stopped = (await gate.state(channel.id)).open
        started = await gate.resume(channel.id, queue)
        log.info("channel %s: session working; %d waiting sends start", channel.id, started)
        if was_stopped:
            await _channel_event(rt, channel, "sending")
    elif status.status != "starting":
        code = f"session_{status.status}"
        if await gate.open(channel.id, code, f"session is {status.raw}"):
            await _channel_event(rt, channel, "stopped", code)
        log.warning("channel %s: session %s; sends wait", channel.id, status.raw)


async def _channel_event(
    rt: Runtime, channel: ChannelView, status: str, code: str | None = None
) -> None:
    data = {"channel_id": str(channel.id), "kind": channel.kind, "status": status}
    if code:
        data["code"] = code
    async with rt.sessions() as session, session.begin():
        dispatches = await rt.events.emit(
            session, channel.tenant_id, "channel.status_changed", data
        )
    await rt.events.send(dispatches)


@dataclass
class PendingWebhooks:
    """Provider webhooks this process is working on. Beyond the limit one is refused at once
    with 503 + Retry-After, before its body is read: Meta, WAHA and Evolution deliver it again
    later, so nothing is lost, and an overloaded gateway answers in milliseconds instead of
    letting every webhook wait seconds (measured: 100 webhooks/s against ~27 answered/s)."""

    count: int = 0


pending_webhooks_key = web.AppKey("pending_webhooks", PendingWebhooks)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bounded(handler: Handler) -> Handler:
    async def bounded(request: web.Request) -> web.StreamResponse:
        pending = request.app[pending_webhooks_key]
        if pending.count >= request.app[runtime_key].settings.max_pending_webhooks:
            raise ApiError(
                503, "overloaded", "too many webhooks at once; deliver again shortly",
                headers={"Retry-After": "5"},
            )  # fmt: skip
        pending.count += 1
        try:
            return await handler(request)
        finally:
            pending.count -= 1

    return bounded


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/channels/{channel_id}/whatsapp-cloud", cloud_verify),
        web.post("/v1/channels/{channel_id}/whatsapp-cloud", _bounded(cloud_events)),
        web.post("/v1/channels/{channel_id}/whatsapp-qr", _bounded(qr_events)),
    ]
