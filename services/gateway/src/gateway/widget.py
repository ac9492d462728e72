"""The widget API: post a message, read a conversation, a WebSocket for live updates.

Contract: docs/architecture.md ("Widget API"). Every refusal is a 4xx JSON error naming the
field; nothing is stored for a refused request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from chat_domain import (
    find_active_conversation,
    find_channel_by_widget_key,
    find_contact,
    get_chatbot_by_widget_key,
    get_chatbot_secrets,
    get_or_create_contact,
    get_or_create_conversation,
    get_queue_priority,
    insert_message,
    mark_delivered_for_visitor,
    messages_since,
    verify_visitor_signature,
)
from chat_domain.payloads import IncomingMessage
from chat_pipeline import Runtime
from chat_pipeline.cache import CONFIG_TTL_S, TTLCache
from chat_pipeline.live import message_frame, message_json, publish, status_frame, visitor_channel
from gateway.errors import DEPENDENCY_ERRORS, ApiError
from gateway.keys import hub_key, runtime_key
from gateway.live_hub import FrameBudget, HubClosing, TooManySockets
from gateway.net import client_ip

__all__ = ["WidgetConfigCache", "routes"]

log = logging.getLogger("gateway.widget")

MAX_ID = 200
_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,200}$")
_PAGE = 100


@dataclass(frozen=True, slots=True)
class WidgetTarget:
    """What a public key resolves to (cached briefly: every widget request needs it)."""

    tenant_id: uuid.UUID
    chatbot_id: uuid.UUID
    channel_id: uuid.UUID
    allowed_origins: tuple[str, ...]
    identity_secret: str | None


class WidgetConfigCache:
    def __init__(self, ttl: float = CONFIG_TTL_S) -> None:
        self._cache: TTLCache[str, WidgetTarget | None] = TTLCache(ttl)

    async def get(self, rt: Runtime, public_key: str) -> WidgetTarget:
        target = await self._cache.get(public_key, lambda: self._load(rt, public_key))
        if target is None:
            raise ApiError(404, "unknown_key", "no widget with this public key", "public_key")
        return target

    @staticmethod
    async def _load(rt: Runtime, public_key: str) -> WidgetTarget | None:
        if len(public_key) > MAX_ID:
            return None
        async with rt.sessions() as session:
            bot = await get_chatbot_by_widget_key(session, public_key)
            channel = await find_channel_by_widget_key(session, public_key)
            if bot is None or channel is None or not channel.active:
                return None
            secret = None
            if bot.has_identity_secret:
                secret = (await get_chatbot_secrets(session, rt.box, bot.id)).identity_secret
        return WidgetTarget(bot.tenant_id, bot.id, channel.id, bot.allowed_origins, secret)


# -- request checks ----------------------------------------------------------------------------


def _visitor_id(value: object) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ApiError(
            400,
            "invalid",
            "visitor_id is required: 1-200 characters of letters, digits and ._:@-",
            "visitor_id",
        )
    return value


def _check_origin(request: web.Request, target: WidgetTarget) -> None:
    if not target.allowed_origins:
        return
    origin = request.headers.get("Origin")
    # A browser always sends Origin on cross-origin requests; server-side callers may omit it.
    if origin is not None and origin not in target.allowed_origins:
        raise ApiError(403, "origin_not_allowed", "this site may not use this widget", "origin")


def _check_signature(target: WidgetTarget, visitor_id: str, signature: object) -> None:
    if target.identity_secret is None:
        return
    if not isinstance(signature, str) or not verify_visitor_signature(
        target.identity_secret, visitor_id, signature
    ):
        raise ApiError(403, "invalid_signature", "visitor signature is invalid", "signature")


async def _rate_limits(rt: Runtime, checks: list[tuple[str, tuple[int, int], str]]) -> None:
    """Fixed-window request limits shared by all replicas, all checked in one round trip.
    `checks` holds (key, (count, window ms), field named in the 429)."""
    now_ms = int(time.time() * 1000)
    pipe = rt.redis.pipeline(transaction=False)
    for key, (_, window), _field in checks:
        redis_key = f"gw:rl:{key}:{now_ms // window}"
        pipe.incr(redis_key)
        pipe.pexpire(redis_key, window)
    replies = await pipe.execute()
    for i, (_key, (count, _), field) in enumerate(checks):
        if int(replies[2 * i]) > count:
            raise ApiError(429, "rate_limited", "too many messages, slow down", field)


async def _target(request: web.Request) -> tuple[Runtime, WidgetTarget]:
    rt = request.app[runtime_key]
    target = await request.app[cache_key].get(rt, request.match_info["public_key"])
    _check_origin(request, target)
    return rt, target


# -- handlers -----------------------------------------------------------------------------------


class PendingPosts:
    """How many message POSTs this process is working on. Beyond the limit a POST is refused
    at once with 503 + Retry-After, before anything is stored: an overloaded gateway answers
    in milliseconds instead of queueing requests until they time out (and the database pool's
    30 s wait turns them into 500s)."""

    def __init__(self) -> None:
        self.count = 0


async def post_message(request: web.Request) -> web.Response:
    pending = request.app[pending_key]
    limit = request.app[runtime_key].settings.max_pending_posts
    if pending.count >= limit:
        raise ApiError(
            503,
            "overloaded",
            "too many messages at once; retry shortly",
            headers={"Retry-After": "1"},
        )
    pending.count += 1
    try:
        return await _post_message(request)
    finally:
        pending.count -= 1


async def _post_message(request: web.Request) -> web.Response:
    rt, target = await _target(request)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    visitor_id = _visitor_id(body.get("visitor_id"))
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "required", "text is required", "text")
    limit = rt.settings.max_message_chars
    if len(text) > limit:
        raise ApiError(400, "too_long", f"text is longer than {limit} characters", "text")
    client_id = body.get("client_message_id")
    if not isinstance(client_id, str) or not _ID.match(client_id):
        raise ApiError(
            400, "invalid", "client_message_id is required (1-200 characters)", "client_message_id"
        )
    _check_signature(target, visitor_id, body.get("signature"))
    await _rate_limits(
        rt,
        [
            (f"v:{target.chatbot_id}:{visitor_id}", rt.settings.visitor_rate, "visitor_id"),
            (f"ip:{request.remote}", rt.settings.ip_rate, "ip"),
        ],
    )

    # Stored at once (so the answer carries its ids and a reload shows it); the rest of the
    # work (quota, usage, the AI job) happens in the incoming-messages worker.
    async with rt.sessions() as session, session.begin():
        contact = await get_or_create_contact(
            session,
            tenant_id=target.tenant_id,
            channel_id=target.channel_id,
            external_id=visitor_id,
        )
        conversation = await get_or_create_conversation(
            session, contact, chatbot_id=target.chatbot_id
        )
        result = await insert_message(
            session,
            conversation_id=conversation.id,
            role="user",
            text=text.strip(),
            external_id=f"{visitor_id}:{client_id}",
            status="received",
        )
        plan = await get_queue_priority(session, target.tenant_id)
    message = result.message
    # A retry of a POST whose first try stored the message but failed before queueing it
    # must still queue it; while the first job exists the add is a no-op by its job id. Once
    # answered, the message is no longer "received".
    if not result.duplicate or (message.status == "received" and message.reply_id is None):
        incoming = IncomingMessage(
            tenant_id=target.tenant_id,
            chatbot_id=target.chatbot_id,
            channel_id=target.channel_id,
            channel_kind="widget",
            external_user_id=visitor_id,
            text=message.text,
            external_message_id=f"{visitor_id}:{client_id}",
            received_at=datetime.now(UTC),
            message_id=message.id,
            conversation_id=message.conversation_id,
        )
        try:
            await rt.pipeline.enqueue_incoming(incoming, plan, requeue=message.requeues)
        except DEPENDENCY_ERRORS as exc:
            # Stored is accepted: the reconciler queues a stored, unanswered message that has
            # no job (docs/architecture.md, "How a message travels"). Not a 5xx for the visitor.
            log.warning(
                "message %s stored but not queued (%s); the reconciler will", message.id, exc
            )
    if not result.duplicate:
        # other tabs of this visitor show it too (best effort: they also poll on reconnect)
        try:
            await publish(
                rt.redis, visitor_channel(target.channel_id, visitor_id), message_frame(message)
            )
        except DEPENDENCY_ERRORS as exc:
            log.warning("message %s not published to other tabs (%s)", message.id, exc)
    answer = {
        "message_id": str(message.id),
        "conversation_id": str(message.conversation_id),
        "status": message.status,
        "seq": message.seq,
    }
    return web.json_response(answer, status=202)


async def get_messages(request: web.Request) -> web.Response:
    rt, target = await _target(request)
    query = request.query
    visitor_id = _visitor_id(query.get("visitor_id"))
    try:
        after = int(query.get("after") or 0)
    except ValueError:
        raise ApiError(400, "invalid", "after must be an integer", "after") from None
    if after < 0:
        raise ApiError(400, "invalid", "after must not be negative", "after")
    _check_signature(target, visitor_id, query.get("signature"))
    async with rt.sessions() as session:
        contact = await find_contact(session, channel_id=target.channel_id, external_id=visitor_id)
        conversation = (
            None if contact is None else await find_active_conversation(session, contact.id)
        )
        messages = (
            []
            if conversation is None
            else await messages_since(session, conversation.id, after_seq=after, limit=_PAGE)
        )
    return web.json_response(
        {
            "messages": [message_json(m) for m in messages],
            "cursor": messages[-1].seq if messages else after,
            "conversation_id": str(conversation.id) if conversation else None,
        }
    )


async def websocket(request: web.Request) -> web.StreamResponse:
    rt, target = await _target(request)
    visitor_id = _visitor_id(request.query.get("visitor_id"))
    # refused before the upgrade: a plain 4xx JSON error
    _check_signature(target, visitor_id, request.query.get("signature"))
    settings = rt.settings
    ws = web.WebSocketResponse(heartbeat=25, max_msg_size=4096)
    hub = request.app[hub_key]
    try:
        # subscribed before the upgrade: what is published while the browser opens the socket
        # is queued for it (and sent after the 101), not missed
        sock = await hub.join(
            visitor_channel(target.channel_id, visitor_id), ws, request, client_ip(request)
        )
    except TooManySockets:
        raise ApiError(
            429, "too_many_sockets", "too many open connections from this address", "ip"
        ) from None
    except HubClosing:
        raise ApiError(
            503, "shutting_down", "this server is shutting down", headers={"Retry-After": "1"}
        ) from None
    try:
        await ws.prepare(request)
        sock.start()
        budget = FrameBudget(settings.ws_frame_rate, settings.ws_frame_burst)
        async for frame in ws:
            if not budget.take():
                # the widget sends one ack per message it shows; a flood is not the widget
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too many frames")
                break
            if frame.type != WSMsgType.TEXT:
                continue
            try:
                data = orjson.loads(frame.data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict) and data.get("type") == "ack":
                await _ack(rt, target, visitor_id, data.get("message_id"))
    finally:
        await hub.leave(sock)
    return ws


async def _ack(rt: Runtime, target: WidgetTarget, visitor_id: str, raw_id: object) -> None:
    """The browser showed a message: it is delivered (only the visitor's own conversation)."""
    try:
        message_id = uuid.UUID(str(raw_id))
    except ValueError:
        return
    async with rt.sessions() as session, session.begin():
        changed = await mark_delivered_for_visitor(
            session, message_id, channel_id=target.channel_id, external_id=visitor_id
        )
    if changed:
        await publish(
            rt.redis,
            visitor_channel(target.channel_id, visitor_id),
            status_frame(message_id, "delivered"),
        )


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204)


@web.middleware
async def cors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Host pages live on other origins: answer preflights and allow the widget's calls."""
    response: web.StreamResponse = await handler(request)
    if request.path.startswith("/v1/widget/") and not response.prepared:
        response.headers["Access-Control-Allow-Origin"] = request.headers.get("Origin", "*")
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
    return response


cache_key = web.AppKey("widget_cache", WidgetConfigCache)
pending_key = web.AppKey("pending_posts", PendingPosts)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/widget/{public_key}/messages", post_message),
        web.get("/v1/widget/{public_key}/messages", get_messages),
        web.options("/v1/widget/{public_key}/messages", preflight),
        web.get("/v1/widget/{public_key}/ws", websocket),
    ]
