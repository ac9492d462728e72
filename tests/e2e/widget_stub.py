"""An in-memory stub of the gateway's widget API (docs/architecture.md, "Widget API").

It serves ``/widget.js`` and ``/demo/{public_key}`` from the gateway's static folder and
implements the widget endpoints the way the real gateway must, with no Redis and no database:

- ``POST /v1/widget/{key}/messages`` stores the visitor's message (idempotent on
  ``client_message_id``), pushes it to the visitor's sockets, and answers with ``"echo: <text>"``
  after a short typing indicator;
- ``GET /v1/widget/{key}/messages?visitor_id=&after=`` pages through messages with
  ``seq > after``;

the signature of a signed visitor comes in the ``X-Visitor-Signature`` header (or, as older
widgets sent it, in the body or query; the WebSocket's only in its query);
- ``GET /v1/widget/{key}/ws`` pushes ``message`` / ``typing`` / ``status`` / ``resync`` frames and
  takes acks.

Every request is recorded, and tests steer it through a few hooks: ``fail_next_posts``,
``overload_next_posts``,
``reply_gate``, ``drop_sockets``, ``resync``, ``add_message``, ``resolve``, ``page_limit``,
``pages``. Use ``serve_stub`` (or the ``widget_stub`` / ``stub_url`` fixtures) to run it on a free
loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiohttp import WSMsgType, web

from chat_domain import verify_visitor_signature
from gateway.errors import ApiError  # the same error body as the real gateway

STATIC_DIR = Path(__file__).resolve().parents[2] / "services/gateway/src/gateway/static"
MAX_TEXT = 4000
MAX_ID = 200  # visitor ids and client message ids (chat_domain: external ids ≤ 200)
SIGNATURE_HEADER = "X-Visitor-Signature"
DELIVERY_RANK = {"received": 0, "queued": 1, "sent": 2, "failed": 3, "delivered": 4, "read": 5}

RecordKind = Literal["post", "get", "ws", "ack"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class KeyConfig:
    """A widget public key: its title, and the identity secret that makes signatures mandatory."""

    title: str = "Harbor & Pine"
    identity_secret: str | None = None


@dataclass
class StubMessage:
    id: str
    seq: int
    role: str
    text: str
    status: str
    created_at: str
    client_message_id: str | None = None

    def to_json(self, *, with_client_id: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "seq": self.seq,
            "role": self.role,
            "text": self.text,
            "status": self.status,
            "created_at": self.created_at,
        }
        if with_client_id and self.client_message_id is not None:
            data["client_message_id"] = self.client_message_id
        return data


@dataclass
class Conversation:
    id: str
    key: str
    visitor_id: str
    messages: list[StubMessage] = field(default_factory=list)
    resolved: bool = False  # the visitor's next message starts a new conversation (seq from 1)

    def by_client_id(self, client_message_id: str) -> StubMessage | None:
        return next((m for m in self.messages if m.client_message_id == client_message_id), None)


@dataclass(frozen=True)
class Record:
    kind: RecordKind
    key: str
    data: dict[str, Any]  # POST body, GET/WS query, or the ack frame
    signature_header: str | None = None


class WidgetStub:
    def __init__(
        self,
        keys: Mapping[str, KeyConfig] | None = None,
        *,
        typing_delay: float = 0.05,
        echo_client_ids: bool = True,
    ) -> None:
        self.keys = dict(keys if keys is not None else {"pk_demo": KeyConfig()})
        self.typing_delay = typing_delay
        # Message objects carry the sender's client_message_id (beyond the bare contract); with
        # False the widget must match its own messages by the message_id of the POST answer.
        self.echo_client_ids = echo_client_ids
        self.fail_next_posts = 0  # answer this many valid POSTs with 500, storing nothing
        self.overload_next_posts = 0  # ... with 503 + Retry-After: 1, as the gateway when busy
        self.reply_gate: asyncio.Event | None = None  # when set, replies wait for it (typing on)
        self.page_limit = 100  # GET returns at most this many messages (like messages_since)
        self.pages: dict[str, str] = {}  # extra HTML served at /pages/{name} (host pages)
        self.records: list[Record] = []
        self.http_log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.conversations: dict[tuple[str, str], Conversation] = {}  # the visitor's current one
        # Sockets belong to the visitor, not to a conversation: they outlive a resolved one.
        self.sockets: dict[tuple[str, str], list[web.WebSocketResponse]] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._changed = asyncio.Event()

    # ---- for tests ------------------------------------------------------------------------

    def recorded(self, kind: RecordKind) -> list[Record]:
        return [r for r in self.records if r.kind == kind]

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` is true, re-checking after every request the stub handles."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    changed = self._changed
                    await changed.wait()
        except TimeoutError:
            raise AssertionError(f"the stub waited {timeout} s in vain for {predicate}") from None

    def conversation(self, key: str, visitor_id: str) -> Conversation | None:
        return self.conversations.get((key, visitor_id))

    def drop_sockets(self, key: str, visitor_id: str) -> int:
        """Close the visitor's WebSockets (as a gateway restart would). They are detached at once,
        so nothing stored from now on is pushed to them: the widget has to fetch it."""
        sockets = self.sockets.pop((key, visitor_id), [])
        for ws in sockets:
            self._spawn(ws.close(code=1012, message=b"test: server restart"))
        return len(sockets)

    def resync(self, key: str, visitor_id: str) -> int:
        """Tell the visitor's sockets to fetch what they may have missed (as the gateway does
        after its pub/sub connection came back)."""
        sockets = self.sockets.get((key, visitor_id), [])
        for ws in sockets:
            self._spawn(self._send(ws, {"type": "resync"}))
        return len(sockets)

    def add_message(
        self, key: str, visitor_id: str, role: str, text: str, *, push: bool = True
    ) -> StubMessage:
        """Store a message (e.g. a human agent's) and push it to the visitor's live sockets
        (``push=False``: a push lost between the database and the socket)."""
        conv = self._conversation(key, visitor_id)
        msg = self._store(conv, role, text)
        if push:
            self._push(conv, {"type": "message", "message": self._json(msg)})
        return msg

    def resolve(self, key: str, visitor_id: str) -> None:
        """Resolve the visitor's conversation (as an agent would)."""
        conv = self.conversations.get((key, visitor_id))
        if conv is not None:
            conv.resolved = True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sockets in self.sockets.values():
            for ws in sockets:
                await ws.close()

    # ---- the application ------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/widget.js", self._widget_js)
        app.router.add_get("/demo/{key}", self._demo)
        app.router.add_get("/pages/{name}", self._page)
        app.router.add_post("/v1/widget/{key}/messages", self._post_message)
        app.router.add_get("/v1/widget/{key}/messages", self._get_messages)
        app.router.add_get("/v1/widget/{key}/ws", self._websocket)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        api = request.path.startswith("/v1/")
        if api and request.method == "OPTIONS":
            # CORS preflight: host pages live on other origins and POST JSON. No credentials are
            # used, so a wildcard origin is enough.
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = "Content-Type, X-Visitor-Signature"
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:  # 404/405 of the router, or a handler's
                self.http_log.append((request.method, request.path, exc.status))
                self._notify()
                raise
        if api and not response.prepared:  # (a WebSocket response is already sent)
            response.headers["Access-Control-Allow-Origin"] = "*"
        self.http_log.append((request.method, request.path, response.status))
        self._notify()
        return response

    async def _widget_js(self, request: web.Request) -> web.Response:
        body = (STATIC_DIR / "widget.js").read_text(encoding="utf-8")
        headers = {"Cache-Control": "no-cache"}
        return web.Response(text=body, content_type="application/javascript", headers=headers)

    async def _demo(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        config = self.keys.get(key)
        if config is None:
            raise web.HTTPNotFound(text="unknown widget key")
        page = (STATIC_DIR / "demo.html").read_text(encoding="utf-8")
        page = page.replace("{{PUBLIC_KEY}}", html.escape(key)).replace(
            "{{TITLE}}", html.escape(config.title)
        )
        return web.Response(text=page, content_type="text/html")

    async def _page(self, request: web.Request) -> web.Response:
        page = self.pages.get(request.match_info["name"])
        if page is None:
            raise web.HTTPNotFound()
        return web.Response(text=page, content_type="text/html")

    async def _post_message(self, request: web.Request) -> web.Response:
        key, config = self._key(request)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "invalid_json", "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        visitor_id = self._visitor_id(body.get("visitor_id"))
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "required", "text is required", "text")
        if len(text) > MAX_TEXT:
            raise ApiError(400, "too_long", f"text is longer than {MAX_TEXT} characters", "text")
        client_message_id = body.get("client_message_id")
        if not isinstance(client_message_id, str) or not 0 < len(client_message_id) <= MAX_ID:
            raise ApiError(400, "invalid", "client_message_id is required", "client_message_id")
        header = request.headers.get(SIGNATURE_HEADER)
        self._check_signature(config, visitor_id, header or body.get("signature"))
        self._record("post", key, body, header)
        if self.fail_next_posts > 0:
            self.fail_next_posts -= 1
            raise ApiError(500, "internal", "injected failure (test hook)")
        if self.overload_next_posts > 0:
            self.overload_next_posts -= 1
            raise ApiError(503, "overloaded", "busy (test hook)", headers={"Retry-After": "1"})

        # A retried POST is answered with the first one's message, and nothing new happens.
        current = self.conversations.get((key, visitor_id))
        msg = current.by_client_id(client_message_id) if current else None
        conv = current if current and msg else self._conversation(key, visitor_id, fresh=True)
        if msg is None:
            msg = self._store(conv, "user", text.strip(), client_message_id)
            # Every tab of this visitor shows it, so push it like any other message.
            self._push(conv, {"type": "message", "message": self._json(msg)})
            self._spawn(self._reply(conv, msg))
        answer = {"message_id": msg.id, "conversation_id": conv.id, "status": msg.status}
        return web.json_response(answer, status=202)

    async def _get_messages(self, request: web.Request) -> web.Response:
        key, config = self._key(request)
        query = request.query
        visitor_id = self._visitor_id(query.get("visitor_id"))
        try:
            after = int(query.get("after") or 0)
        except ValueError:
            raise ApiError(400, "invalid", "after must be an integer", "after") from None
        if after < 0:
            raise ApiError(400, "invalid", "after must not be negative", "after")
        header = request.headers.get(SIGNATURE_HEADER)
        self._check_signature(config, visitor_id, header or query.get("signature"))
        self._record("get", key, dict(query), header)
        conv = self.conversation(key, visitor_id)
        newer = [m for m in conv.messages if m.seq > after] if conv else []
        page = newer[: self.page_limit]
        cursor = page[-1].seq if page else after
        return web.json_response(
            {"messages": [self._json(m) for m in page], "cursor": cursor}, status=200
        )

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        key, config = self._key(request)
        visitor_id = self._visitor_id(request.query.get("visitor_id"))
        self._check_signature(config, visitor_id, request.query.get("signature"))
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        sockets = self.sockets.setdefault((key, visitor_id), [])
        sockets.append(ws)
        self._record("ws", key, dict(request.query))
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(frame.data)
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("type") == "ack":
                    self._record("ack", key, data)
                    conv = self.conversation(key, visitor_id)
                    messages = conv.messages if conv else []
                    acked = next((m for m in messages if m.id == data.get("message_id")), None)
                    if acked is not None:
                        self._advance(acked, "delivered")
        finally:
            if ws in sockets:
                sockets.remove(ws)
            self._notify()
        return ws

    # ---- behaviour --------------------------------------------------------------------------

    async def _reply(self, conv: Conversation, user_msg: StubMessage) -> None:
        """The "assistant": typing on, a pause (or the test's gate), the echo, typing off, and
        the user's message marked read."""
        self._push(conv, {"type": "typing", "on": True})
        if self.reply_gate is not None:
            await self.reply_gate.wait()
        else:
            await asyncio.sleep(self.typing_delay)
        reply = self._store(conv, "assistant", f"echo: {user_msg.text}", status="sent")
        self._push(conv, {"type": "message", "message": self._json(reply)})
        self._push(conv, {"type": "typing", "on": False})
        self._advance(user_msg, "read")
        self._push(conv, {"type": "status", "message_id": user_msg.id, "status": "read"})

    def _store(
        self,
        conv: Conversation,
        role: str,
        text: str,
        client_message_id: str | None = None,
        *,
        status: str | None = None,
    ) -> StubMessage:
        msg = StubMessage(
            id=str(uuid.uuid4()),
            seq=len(conv.messages) + 1,
            role=role,
            text=text,
            status=status or ("received" if role == "user" else "queued"),
            created_at=datetime.now(UTC).isoformat(),
            client_message_id=client_message_id,
        )
        conv.messages.append(msg)
        self._notify()
        return msg

    def _advance(self, msg: StubMessage, status: str) -> None:
        if DELIVERY_RANK[status] > DELIVERY_RANK[msg.status]:
            msg.status = status
            self._notify()

    def _push(self, conv: Conversation, frame: dict[str, Any]) -> None:
        for ws in list(self.sockets.get((conv.key, conv.visitor_id), [])):
            self._spawn(self._send(ws, frame))

    @staticmethod
    async def _send(ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):  # closed meanwhile
            await ws.send_json(frame)

    def _json(self, msg: StubMessage) -> dict[str, Any]:
        return msg.to_json(with_client_id=self.echo_client_ids)

    def _key(self, request: web.Request) -> tuple[str, KeyConfig]:
        key = request.match_info["key"]
        config = self.keys.get(key)
        if config is None:
            raise ApiError(404, "unknown_key", "no widget with this public key", "public_key")
        return key, config

    @staticmethod
    def _visitor_id(value: object) -> str:
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
            raise ApiError(400, "invalid", "visitor_id is required (1-200 chars)", "visitor_id")
        return value

    @staticmethod
    def _check_signature(config: KeyConfig, visitor_id: str, signature: object) -> None:
        # With an identity secret, every visitor must come signed by the host's backend.
        if config.identity_secret is None:
            return
        if not isinstance(signature, str) or not verify_visitor_signature(
            config.identity_secret, visitor_id, signature
        ):
            raise ApiError(403, "invalid_signature", "visitor signature is invalid", "signature")

    def _conversation(self, key: str, visitor_id: str, *, fresh: bool = False) -> Conversation:
        conv = self.conversations.get((key, visitor_id))
        if conv is None or (conv.resolved and fresh):
            conv = Conversation(id=str(uuid.uuid4()), key=key, visitor_id=visitor_id)
            self.conversations[key, visitor_id] = conv
        return conv

    def _record(
        self, kind: RecordKind, key: str, data: dict[str, Any], header: str | None = None
    ) -> None:
        self.records.append(Record(kind, key, data, header))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@contextlib.asynccontextmanager
async def serve_stub(stub: WidgetStub, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Run ``stub`` on a free port of ``host``; yields its base URL (``http://host:port``)."""
    runner = web.AppRunner(stub.app(), shutdown_timeout=2, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{host}:{port}"
    finally:
        await stub.close()
        await runner.cleanup()
