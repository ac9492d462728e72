"""The widget API: post a message, read a conversation, a WebSocket for live updates.

Contract: docs/architecture.md ("Widget API"). Every refusal is a 4xx JSON error naming the
field; nothing is stored for a refused request.
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from chat_domain import (
    find_active_conversation,
    find_channel_by_widget_key,
    find_contact,
    get_chatbot_by_widget_key,
    get_chatbot_secrets,
    get_message,
    mark_delivered_for_visitor,
    messages_since,
    verify_visitor_signature,
)
from chat_pipeline import Runtime
from chat_pipeline.cache import CONFIG_TTL_S, TTLCache
from chat_pipeline.channels.base import InboundMessage
from chat_pipeline.events import status_data
from chat_pipeline.live import message_frame, message_json, publish, status_frame, visitor_channel
from chat_pipeline.receive import ChannelRoute, receive_message
from gateway.errors import DEPENDENCY_ERRORS, ApiError
from gateway.keys import hub_key, runtime_key
from gateway.live_hub import FrameBudget, HubClosing, TooManySockets
from gateway.net import client_ip, rate_key

__all__ = ["WidgetConfigCache", "routes"]

log = logging.getLogger("gateway.widget")

# A widget message's external id is "<visitor id>:<client message id>" in
# messages.external_id (VARCHAR 200): 128 + 1 + 64 = 193. The visitor id is also part of the
# incoming job's group, "<tenant>:<channel>:<visitor>" (74 + 128 <= queue-core's 256).
MAX_VISITOR_ID = 128
MAX_CLIENT_MESSAGE_ID = 64
_VISITOR_ID = re.compile(rf"[A-Za-z0-9._:@-]{{1,{MAX_VISITOR_ID}}}")
# No ':' in a client message id: the external id's last ':' separates it from the visitor id,
# so two (visitor, client id) pairs can never make the same external id.
_CLIENT_MESSAGE_ID = re.compile(rf"[A-Za-z0-9._@-]{{1,{MAX_CLIENT_MESSAGE_ID}}}")
# What widget.js generates for an anonymous visitor: a random (version 4) UUID.
_RANDOM_VISITOR_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.IGNORECASE
)
# chatbots.widget_public_key is VARCHAR(64) of token_urlsafe characters; anything else (a NUL
# that PostgreSQL would refuse, say) is an unknown key without asking the database.
_PUBLIC_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CURSOR = re.compile(r"[0-9]{1,19}")
_MAX_SEQ = 2**63 - 1  # messages.seq is a BIGINT
_SIGNATURE_HEADER = "X-Visitor-Signature"
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
        target = None
        if _PUBLIC_KEY.fullmatch(public_key):
            target = await self._cache.get(public_key, lambda: self._load(rt, public_key))
        if target is None:
            raise ApiError(404, "unknown_key", "no widget with this public key", "public_key")
        return target

    @staticmethod
    async def _load(rt: Runtime, public_key: str) -> WidgetTarget | None:
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
    if not isinstance(value, str) or not _VISITOR_ID.fullmatch(value):
        raise ApiError(
            400,
            "invalid",
            f"visitor_id is required: 1-{MAX_VISITOR_ID} characters of letters, digits and ._:@-",
            "visitor_id",
        )
    return value


def _client_message_id(value: object) -> str:
    if not isinstance(value, str) or not _CLIENT_MESSAGE_ID.fullmatch(value):
        raise ApiError(
            400,
            "invalid",
            f"client_message_id is required: 1-{MAX_CLIENT_MESSAGE_ID} characters of letters,"
            " digits and ._@-",
            "client_message_id",
        )
    return value


def _text(value: object, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "required", "text is required", "text")
    if len(value) > limit:
        raise ApiError(400, "too_long", f"text is longer than {limit} characters", "text")
    if "\x00" in value:
        # PostgreSQL cannot store it (and no keyboard types it)
        raise ApiError(400, "invalid", "text must not contain NUL characters", "text")
    return value.strip()


def _cursor(value: str | None) -> int:
    if value is None or value == "":
        return 0
    # int() would also take " 1", "1_0" and other scripts' digits
    if not _CURSOR.fullmatch(value) or int(value) > _MAX_SEQ:
        raise ApiError(400, "invalid", f"after must be an integer from 0 to {_MAX_SEQ}", "after")
    return int(value)


def _signature(request: web.Request, fallback: object) -> object:
    """The header wins; the body (POST) or query (GET) is where older widgets put it."""
    header = request.headers.get(_SIGNATURE_HEADER)
    return header if header is not None else fallback


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


def _check_visitor(target: WidgetTarget, visitor_id: str, signature: object) -> None:
    """May this request act as this visitor? With an identity secret, when the host signed the
    id. Without one the id is the conversation's only credential (a bearer token), so it must
    be one the widget drew at random: an id a host page made up ("customer-42") is guessable,
    and whoever guesses it reads the conversation."""
    if target.identity_secret is None and not _RANDOM_VISITOR_ID.fullmatch(visitor_id):
        raise ApiError(
            400,
            "invalid",
            "visitor_id must be the widget's random id (a version 4 UUID) unless the chatbot"
            " verifies visitor identities with a signature",
            "visitor_id",
        )
    _check_signature(target, visitor_id, signature)


# (key, (count, window ms), field named in the 429, what the 429 says)
Limit = tuple[str, tuple[int, int], str, str]


async def _rate_limits(rt: Runtime, checks: list[Limit]) -> None:
    """Fixed-window request limits shared by all replicas, all counted in one round trip.

    All or nothing: a request refused by one limit is taken back from all of them, so a
    visitor hammering beyond its own limit does not use up its chatbot's or tenant's budget
    (and lock everyone else out). The refund is a second round trip, on refusals only."""
    now_ms = int(time.time() * 1000)
    keys = [f"gw:rl:{key}:{now_ms // window}" for key, (_, window), _f, _m in checks]
    pipe = rt.redis.pipeline(transaction=False)
    for redis_key, (_key, (_, window), _f, _m) in zip(keys, checks, strict=True):
        pipe.incr(redis_key)
        pipe.pexpire(redis_key, window)
    replies = await pipe.execute()
    for i, (_key, (count, window), field, message) in enumerate(checks):
        if int(replies[2 * i]) > count:
            refund = rt.redis.pipeline(transaction=False)
            for redis_key, (_k, (_, w), _f, _m) in zip(keys, checks, strict=True):
                refund.decr(redis_key)
                refund.pexpire(redis_key, w)  # (never a key left without a TTL)
            await refund.execute()
            retry_after = math.ceil((window - now_ms % window) / 1000)
            raise ApiError(
                429, "rate_limited", message, field, headers={"Retry-After": str(retry_after)}
            )


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
    text = _text(body.get("text"), rt.settings.max_message_chars)
    client_id = _client_message_id(body.get("client_message_id"))
    _check_visitor(target, visitor_id, _signature(request, body.get("signature")))
    s = rt.settings
    slow_down = "too many messages, slow down"
    busy = "this chat is receiving too many messages; try again shortly"
    await _rate_limits(
        rt,
        [
            (f"v:{target.chatbot_id}:{visitor_id}", s.visitor_rate, "visitor_id", slow_down),
            (f"ip:{rate_key(client_ip(request))}", s.ip_rate, "ip", slow_down),
            (f"bot:{target.chatbot_id}", s.chatbot_rate, "public_key", busy),
            (f"tenant:{target.tenant_id}", s.tenant_rate, "public_key", busy),
        ],
    )

    # Stored at once (so the answer carries its ids and a reload shows it); the rest of the
    # work (quota, usage, the AI job) happens in the incoming-messages worker.
    route = ChannelRoute(target.tenant_id, target.chatbot_id, target.channel_id, "widget")
    inbound = InboundMessage(
        external_user_id=visitor_id,
        external_message_id=f"{visitor_id}:{client_id}",
        text=text,
    )
    result = await receive_message(rt, route, inbound)
    message = result.message
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
    after = _cursor(query.get("after"))
    _check_visitor(target, visitor_id, _signature(request, query.get("signature")))
    s = rt.settings
    slow_down = "too many requests, slow down"
    await _rate_limits(
        rt,
        [
            (f"rv:{target.chatbot_id}:{visitor_id}", s.visitor_read_rate, "visitor_id", slow_down),
            (f"rip:{rate_key(client_ip(request))}", s.ip_read_rate, "ip", slow_down),
        ],
    )
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
    _check_visitor(target, visitor_id, request.query.get("signature"))
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
    dispatches = []
    async with rt.sessions() as session, session.begin():
        changed = await mark_delivered_for_visitor(
            session, message_id, channel_id=target.channel_id, external_id=visitor_id
        )
        if changed and await rt.events.wants(session, target.tenant_id, "message.delivered"):
            message = await get_message(session, message_id)
            if message is not None:
                data = status_data(message.id, message.conversation_id, target.channel_id,
                                   "delivered")  # fmt: skip
                dispatches = await rt.events.emit(
                    session, target.tenant_id, "message.delivered", data
                )
    await rt.events.send(dispatches)
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
        response.headers["Access-Control-Allow-Headers"] = f"Content-Type, {_SIGNATURE_HEADER}"
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
