"""Fake WhatsApp providers for tests and local end-to-end runs: Meta's Graph API (Cloud API), WAHA
and Evolution API v2. Shapes, error bodies and webhook envelopes follow the providers' docs and
source (Meta's Cloud API reference, WAHA 2024.10 and its docs, Evolution API v2.3.6); the WAHA fake
also speaks our QR service's additions (an ``Idempotency-Key`` header, a ``code`` in errors).

Each is a real HTTP server on a loopback port, like ``tests/fakes/openai_server.py``:

- every provider request is recorded (method, path, headers, raw body, parsed JSON);
- the outcome of the next sends is scripted FIFO (``accept``, ``error`` / ``http_error``,
  ``delay``, ``hang``, ``disconnect``, ``timeout_after_send``), the default being ``accept``;
- webhooks go to a configured URL (statuses/acks for every accepted message, in a scriptable
  order with duplicates and delays; inbound user messages on demand; session state changes),
  signed the way the provider signs them, retried a few times on connection errors and 5xx/429
  with a short bounded backoff; every delivery and its attempts are recorded;
- a control API under ``/_fake/`` (never recorded) does all of the above from another process.

In-process use::

    async with FakeGraphServer(webhook_url=url, app_secret="s") as graph:
        graph.script(error(130429, retry_after=2))
        graph.script_statuses(["delivered", "sent"])
        ... point the sender at graph.url (it appends /v21.0/<phone_number_id>/messages) ...
        await graph.send_inbound_text("Oi")

As a process (prints ``fake-whatsapp-<kind> listening on <url>`` once it accepts connections)::

    python -m tests.fakes.whatsapp graph --port 0 --token T --webhook-url URL --app-secret S
    python -m tests.fakes.whatsapp waha --port 0 --api-key K --session tenant-42=WORKING
    python -m tests.fakes.whatsapp evolution --port 0 --api-key K --instance tenant-42=open

Control API (JSON; all kinds): ``POST /_fake/script[?target=send|read|typing]`` (a behaviour or
a list), ``PUT /_fake/webhook`` (``url``, ``secret``, ``headers``), ``GET /_fake/requests``,
``GET /_fake/sent``, ``GET /_fake/deliveries``, ``POST /_fake/reset``. Graph adds
``POST /_fake/statuses`` (status plans for the next messages), ``POST /_fake/status`` (emit one
now), ``POST /_fake/inbound``; WAHA ``PUT /_fake/sessions/{session}``, ``POST /_fake/acks``,
``POST /_fake/ack``, ``POST /_fake/inbound``; Evolution ``PUT /_fake/instances/{instance}``,
``POST /_fake/acks``, ``POST /_fake/ack``, ``POST /_fake/inbound``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import signal
import struct
import time
import uuid
import zlib
from collections import deque
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ClassVar, Literal, NoReturn, Self, TypeVar

import aiohttp
from aiohttp import web

from tests.fakes.openai_server import RecordedRequest

log = logging.getLogger(__name__)
T = TypeVar("T")

# Invented identities from the reference's fixtures (§6).
WABA_ID = "730012345678901"
PHONE_NUMBER_ID = "109876543210987"
DISPLAY_PHONE_NUMBER = "15550001111"
USER_WA_ID = "5511987654321"
USER_NAME = "Ana Souza"
QR_ME = "5511912345678"

# --- behaviours ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accept:
    """Accept the request: the message is sent (ids assigned, webhooks scheduled). Graph only:
    ``wa_id`` answers a ``contacts[0].wa_id`` other than the normalised ``to``, and
    ``message_status`` adds ``messages[0].message_status`` (e.g. ``held_for_quality_assessment``).
    """

    wa_id: str | None = None
    message_status: str | None = None


@dataclass(frozen=True, slots=True)
class GraphError:
    """A Meta error body ``{"error": {message, type, code, error_data, fbtrace_id}}`` (plus
    ``error_subcode`` when given: Meta stopped sending it in v16+ except for auth errors).
    ``http_status`` defaults to the status Meta is seen using for ``code``; ``retry_after``
    becomes a ``Retry-After`` header. Graph only."""

    code: int
    http_status: int | None = None
    message: str | None = None
    details: str | None = None
    subcode: int | None = None
    retry_after: float | str | None = None


@dataclass(frozen=True, slots=True)
class HttpError:
    """Any status with ``body`` as JSON, or ``text`` as is (e.g. a proxy's HTML page); with
    neither, the provider's own error shape for that status."""

    http_status: int
    body: Any = None
    text: str | None = None
    content_type: str = "text/html"
    retry_after: float | str | None = None


@dataclass(frozen=True, slots=True)
class Delay:
    """Wait ``seconds`` (cut short when the server stops), then behave as ``then`` (accept when
    None)."""

    seconds: float
    then: Behaviour | None = None


@dataclass(frozen=True, slots=True)
class Hang:
    """Read the request and never answer (the client times out); the message is not sent. The
    connection is dropped when the server stops or after its ``hang_limit``."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the connection at once without answering; the message is not sent."""


@dataclass(frozen=True, slots=True)
class TimeoutAfterSend:
    """The ambiguous case: the message is sent (recorded with ``answered=False``, its webhooks
    follow) but the answer never comes, as in ``Hang``."""


Behaviour = Accept | GraphError | HttpError | Delay | Hang | Disconnect | TimeoutAfterSend


def accept(wa_id: str | None = None, message_status: str | None = None) -> Accept:
    return Accept(wa_id, message_status)


def error(
    code: int,
    http_status: int | None = None,
    message: str | None = None,
    retry_after: float | str | None = None,
    *,
    details: str | None = None,
    subcode: int | None = None,
) -> GraphError:
    return GraphError(code, http_status, message, details, subcode, retry_after)


def http_error(
    http_status: int,
    body: Any = None,
    *,
    text: str | None = None,
    retry_after: float | str | None = None,
) -> HttpError:
    return HttpError(http_status, body, text, retry_after=retry_after)


def delay(seconds: float, then: Behaviour | None = None) -> Delay:
    return Delay(seconds, then)


def hang() -> Hang:
    return Hang()


def disconnect() -> Disconnect:
    return Disconnect()


def timeout_after_send() -> TimeoutAfterSend:
    return TimeoutAfterSend()


_KINDS: dict[str, type[Behaviour]] = {
    "accept": Accept,
    "error": GraphError,
    "http_error": HttpError,
    "delay": Delay,
    "hang": Hang,
    "disconnect": Disconnect,
    "timeout_after_send": TimeoutAfterSend,
}


def behaviour_to_json(behaviour: Behaviour) -> dict[str, Any]:
    """``{"kind": "error", "code": 130429, ...}``: the control API's form of a behaviour."""
    kind = next(name for name, cls in _KINDS.items() if isinstance(behaviour, cls))
    data: dict[str, Any] = {"kind": kind}
    for f in dataclasses.fields(behaviour):
        value = getattr(behaviour, f.name)
        if f.name == "then" and value is not None:
            value = behaviour_to_json(value)
        data[f.name] = value
    return data


def behaviour_from_json(data: Any) -> Behaviour:
    """The inverse of ``behaviour_to_json``; raises ValueError on unknown kinds or fields."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a behaviour is a JSON object, not {data!r}")
    fields = dict(data)
    cls = _KINDS.get(str(fields.pop("kind", "")))
    if cls is None:
        raise ValueError(f"unknown behaviour kind in {dict(data)!r}; one of {sorted(_KINDS)}")
    if fields.get("then") is not None:
        fields["then"] = behaviour_from_json(fields["then"])
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ValueError(f"bad fields for {cls.__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """One Graph status webhook for an accepted message, sent ``delay`` seconds after the
    previous one. ``timestamp`` defaults to the acceptance time plus the status's rank (sent 1,
    delivered 2, read 3), so the timestamps tell the true order whatever order they arrive in.
    ``failed`` carries ``errors[{code: error_code, ...}]`` (131026 by default)."""

    status: str
    delay: float = 0.0
    error_code: int | None = None
    details: str | None = None
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class AckEvent:
    """One ack webhook for an accepted message (WAHA ``message.ack`` with ``ack`` an int -1..4,
    Evolution ``messages.update`` with ``ack`` a status name), ``delay`` seconds after the
    previous one."""

    ack: int | str
    delay: float = 0.0


def failed(
    error_code: int = 131026, *, delay: float = 0.0, details: str | None = None
) -> StatusEvent:
    return StatusEvent("failed", delay, error_code, details)


def _status_event(item: Any) -> StatusEvent:
    if isinstance(item, StatusEvent):
        return item
    if isinstance(item, str):
        return StatusEvent(item)
    if isinstance(item, Mapping):
        try:
            return StatusEvent(**item)
        except TypeError as exc:
            raise ValueError(f"bad status event {dict(item)!r}: {exc}") from exc
    raise ValueError(f"a status event is a name or an object, not {item!r}")


def _ack_event(item: Any) -> AckEvent:
    if isinstance(item, AckEvent):
        return item
    if isinstance(item, int | str) and not isinstance(item, bool):
        return AckEvent(item)
    if isinstance(item, Mapping):
        try:
            return AckEvent(**item)
        except TypeError as exc:
            raise ValueError(f"bad ack event {dict(item)!r}: {exc}") from exc
    raise ValueError(f"an ack event is a level or an object, not {item!r}")


# --- signatures, ids, small helpers -------------------------------------------------------------


def meta_json(payload: Any) -> bytes:
    """The bytes Meta sends: compact, ASCII-escaped JSON (it signs an escaped-unicode body)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode()


def node_json(payload: Any) -> bytes:
    """``JSON.stringify`` bytes, as WAHA and Evolution (Node) send them: compact, raw UTF-8."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def meta_signature(app_secret: str, raw: bytes) -> str:
    """The ``X-Hub-Signature-256`` value for ``raw``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(app_secret.encode(), raw, hashlib.sha256).hexdigest()


def waha_signature(secret: str, raw: bytes) -> str:
    """The ``X-Webhook-Hmac`` value for ``raw``: hex HMAC-SHA512."""
    return hmac.new(secret.encode(), raw, hashlib.sha512).hexdigest()


def normalize_number(value: str) -> str:
    """E.164 digits without ``+``: spaces, dashes, parentheses and a leading ``00`` go."""
    stripped = value.strip()
    digits = re.sub(r"\D", "", stripped)
    if stripped.startswith("00"):
        digits = digits[2:]
    return digits


def new_wamid() -> str:
    return "wamid." + base64.b64encode(b"\x15\x02\x00\x11\x18\x12" + uuid.uuid4().bytes).decode()


def new_key_id() -> str:
    """A Baileys-style message key id: ``3EB0`` and 18 upper-case hex digits."""
    return "3EB0" + secrets.token_hex(9).upper()


def _event_id() -> str:
    return "evt_" + "".join(secrets.choice("0123456789abcdefghjkmnpqrstvwxyz") for _ in range(26))


def _fbtrace_id() -> str:
    return "A" + secrets.token_urlsafe(16)[:22].replace("-", "x").replace("_", "y")


def tiny_png(seed: str, size: int = 21) -> bytes:
    """A small valid grayscale PNG whose pixels derive from ``seed`` (a stand-in QR code)."""
    bits = hashlib.sha256(seed.encode()).digest()
    rows = bytearray()
    for y in range(size):
        rows.append(0)  # filter type: none
        for x in range(size):
            i = y * size + x
            rows.append(0 if bits[(i // 8) % len(bits)] >> (i % 8) & 1 else 255)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows)))
        + chunk(b"IEND", b"")
    )


def _retry_after_header(value: float | str | None) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return {"Retry-After": str(value)}


# --- records ------------------------------------------------------------------------------------


@dataclass(slots=True)
class SentMessage:
    """A message the fake accepted, i.e. one the provider would deliver. ``answered`` is False
    when the client never got the answer (``timeout_after_send``)."""

    id: str  # wamid, WAHA serialized id, Evolution key id
    channel: str  # phone_number_id, WAHA session, Evolution instance
    to: str  # as the client gave it (`to`, `chatId`, `number`)
    recipient: str  # what the provider resolved: wa_id, chatId, remoteJid
    text: str | None
    request: Mapping[str, Any]
    answered: bool = True
    idempotency_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # when the fake accepted it, on time.monotonic(): CLOCK_MONOTONIC is one clock for every
    # process of a Linux host, so another process (a benchmark) can subtract its own readings
    at: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel": self.channel,
            "to": self.to,
            "recipient": self.recipient,
            "text": self.text,
            "request": self.request,
            "answered": self.answered,
            "idempotency_key": self.idempotency_key,
            "extra": self.extra,
            "at": self.at,
        }


@dataclass(slots=True)
class DeliveryAttempt:
    status: int | None  # None: no HTTP answer (connection error, timeout)
    error: str | None
    seconds: float


DeliveryOutcome = Literal["pending", "delivered", "rejected", "failed"]


@dataclass(slots=True)
class Delivery:
    """One webhook the fake sent (with its retries). ``outcome``: ``delivered`` (2xx),
    ``rejected`` (last answer not 2xx), ``failed`` (no answer on the last attempt)."""

    event: str
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # of the last attempt
    attempts: list[DeliveryAttempt] = field(default_factory=list)
    outcome: DeliveryOutcome = "pending"
    response_text: str = ""

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def status(self) -> int | None:
        return self.attempts[-1].status if self.attempts else None

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "url": self.url,
            "body": self.body.decode("utf-8", "replace"),
            "headers": self.headers,
            "attempts": [dataclasses.asdict(a) for a in self.attempts],
            "outcome": self.outcome,
            "status": self.status,
            "response_text": self.response_text,
        }


class ControlError(ValueError):
    """Bad input to the control API (answered 400)."""


# --- the shared server machinery ----------------------------------------------------------------


class _FakeServer:
    """Lifecycle, recording, scripting, webhook delivery and the common control API."""

    kind: ClassVar[str] = "fake"
    script_targets: ClassVar[tuple[str, ...]] = ("send",)
    supported: ClassVar[tuple[type, ...]] = (
        Accept,
        HttpError,
        Delay,
        Hang,
        Disconnect,
        TimeoutAfterSend,
    )

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        webhook_url: str | None = None,
        hang_limit: float = 30.0,
        webhook_attempts: int = 3,
        webhook_backoff: float = 0.05,
        webhook_timeout: float = 5.0,
        control_api: bool = True,
    ) -> None:
        if webhook_attempts < 1:
            raise ValueError("webhook_attempts must be at least 1")
        self.host = host
        self.webhook_url = webhook_url
        self.hang_limit = hang_limit
        self.webhook_attempts = webhook_attempts
        self.webhook_backoff = webhook_backoff
        self.webhook_timeout = webhook_timeout
        self.default: Behaviour = Accept()
        self.requests: list[RecordedRequest] = []
        self.sent: list[SentMessage] = []
        self.deliveries: list[Delivery] = []
        self.errors: list[BaseException] = []  # background tasks that died (none expected)
        self._requested_port = port
        self._control_api = control_api
        self._scripts: dict[str, deque[Behaviour]] = {t: deque() for t in self.script_targets}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._port: int | None = None
        self._closing = asyncio.Event()
        self._changed = asyncio.Event()

    # --- scripting --------------------------------------------------------------------------

    def script(self, *behaviours: Behaviour, target: str = "send") -> None:
        """Queue behaviours for the next requests of ``target`` (``send``; Graph also ``read``
        for mark-as-read/typing, WAHA ``typing`` for startTyping/stopTyping/sendSeen)."""
        if target not in self._scripts:
            raise ValueError(f"unknown script target {target!r}; one of {self.script_targets}")
        for behaviour in behaviours:
            self._check_supported(behaviour)
        self._scripts[target].extend(behaviours)

    def _check_supported(self, behaviour: Behaviour) -> None:
        while True:
            if not isinstance(behaviour, self.supported):
                raise ValueError(
                    f"{type(behaviour).__name__} is not supported by the {self.kind} fake"
                )
            if not isinstance(behaviour, Delay) or behaviour.then is None:
                return
            behaviour = behaviour.then

    def pending(self, target: str = "send") -> int:
        """Scripted behaviours not used yet."""
        return len(self._scripts[target])

    def _next(self, target: str) -> Behaviour:
        script = self._scripts[target]
        return script.popleft() if script else self.default

    def reset(self) -> None:
        """Forget scripts, recorded requests, sent messages and deliveries, and cancel pending
        webhooks; the configuration (tokens, webhook URL, defaults) stays."""
        for script in self._scripts.values():
            script.clear()
        for task in list(self._tasks):
            task.cancel()
        self.requests.clear()
        self.sent.clear()
        self.deliveries.clear()
        self.errors.clear()
        self._notify()

    # --- waiting ----------------------------------------------------------------------------

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_for(
        self, predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition"
    ) -> T:
        """Wait until ``predicate()`` is truthy (re-checked on every request, send and delivery
        change) and return it; AssertionError after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._changed
                    result = predicate()
                    if result:
                        return result
                    await changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what} not reached within {timeout}s") from None

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        await self.wait_for(lambda: len(self.requests) >= count, timeout, f"{count} requests")
        return list(self.requests)

    async def wait_for_sent(self, count: int, timeout: float = 5.0) -> list[SentMessage]:
        await self.wait_for(lambda: len(self.sent) >= count, timeout, f"{count} sent messages")
        return list(self.sent)

    async def wait_for_deliveries(
        self, count: int = 1, *, event: str | None = None, timeout: float = 5.0
    ) -> list[Delivery]:
        """Wait until ``count`` finished deliveries (of ``event`` when given) exist; returns the
        finished ones (of that event), oldest first."""

        def done() -> list[Delivery]:
            return [
                d
                for d in self.deliveries
                if d.outcome != "pending" and (event is None or d.event == event)
            ]

        await self.wait_for(lambda: len(done()) >= count, timeout, f"{count} deliveries of {event}")
        return done()

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until no webhook is pending (scheduled statuses/acks all delivered)."""
        await self.wait_for(lambda: not self._tasks, timeout, "no pending webhooks")

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"the {self.kind} fake is not started")
        return self._port

    @property
    def url(self) -> str:
        """The root URL, e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self.host}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application()
        if self._control_api:
            app.router.add_post("/_fake/script", self._control_script)
            app.router.add_put("/_fake/webhook", self._control_webhook)
            app.router.add_get("/_fake/requests", self._control_requests)
            app.router.add_get("/_fake/sent", self._control_sent)
            app.router.add_get("/_fake/deliveries", self._control_deliveries)
            app.router.add_post("/_fake/reset", self._control_reset)
            self._add_control_routes(app)
        self._add_routes(app)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def _add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def _add_control_routes(self, app: web.Application) -> None:
        pass

    async def start(self) -> Self:
        if self._runner is not None:
            raise RuntimeError(f"the {self.kind} fake is already started")
        self._closing.clear()
        runner = web.AppRunner(self.make_app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._http = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        """Stop webhooks, end in-flight requests (delays and hangs are cut short), stop
        listening. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await runner.cleanup()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- request plumbing -------------------------------------------------------------------

    async def _record(self, request: web.Request) -> RecordedRequest:
        body = await request.read()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        peername = request.transport.get_extra_info("peername") if request.transport else None
        recorded = RecordedRequest(
            peer=f"{peername[0]}:{peername[1]}" if peername else None,
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=headers,
            body=body,
            json=parsed,
        )
        self.requests.append(recorded)
        self._notify()
        return recorded

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the server stops."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _drop(self, request: web.Request) -> NoReturn:
        if request.transport is not None:
            request.transport.close()
        raise asyncio.CancelledError  # aiohttp ends the handler quietly for a closed peer

    async def _perform(
        self,
        request: web.Request,
        target: str,
        on_accept: Callable[[Accept, bool], Awaitable[web.StreamResponse]],
        on_error: Callable[[GraphError | HttpError], web.StreamResponse],
    ) -> web.StreamResponse:
        """Run the next scripted behaviour of ``target``: ``on_accept(behaviour, answered)``
        performs the send and builds the success answer."""
        behaviour = self._next(target)
        while isinstance(behaviour, Delay):
            await self._pause(behaviour.seconds)
            behaviour = behaviour.then if behaviour.then is not None else Accept()
        if isinstance(behaviour, Accept):
            return await on_accept(behaviour, True)
        if isinstance(behaviour, GraphError | HttpError):
            return on_error(behaviour)
        if isinstance(behaviour, TimeoutAfterSend):
            await on_accept(Accept(), False)
            await self._pause(self.hang_limit)
        elif isinstance(behaviour, Hang):
            await self._pause(self.hang_limit)
        await self._drop(request)

    def _http_error(self, behaviour: HttpError) -> web.Response:
        headers = _retry_after_header(behaviour.retry_after)
        if behaviour.text is not None:
            return web.Response(
                status=behaviour.http_status,
                text=behaviour.text,
                content_type=behaviour.content_type,
                headers=headers,
            )
        body = behaviour.body
        if body is None:
            body = self._default_error_body(behaviour.http_status)
        return web.json_response(body, status=behaviour.http_status, headers=headers)

    def _default_error_body(self, http_status: int) -> Any:
        return {"error": f"HTTP {http_status}"}

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            self._default_error_body(404) | {"path": f"{request.method} {request.path}"},
            status=404,
        )

    # --- webhooks ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"fake-{self.kind}-{what}")
        self._tasks.add(task)

        def finished(done: asyncio.Task[Any]) -> None:
            self._tasks.discard(done)
            if not done.cancelled() and done.exception() is not None:
                exc = done.exception()
                assert exc is not None
                log.error("fake %s: %s died: %r", self.kind, what, exc)
                self.errors.append(exc)
            self._notify()

        task.add_done_callback(finished)
        return task

    async def _deliver(
        self,
        event: str,
        url: str,
        body: bytes,
        headers: Callable[[], dict[str, str]],
    ) -> Delivery:
        """POST ``body`` to ``url``; retried on connection errors, timeouts, 5xx and 429 with a
        short doubling backoff, ``webhook_attempts`` times in all. ``headers`` is called per
        attempt (a request id may change between attempts)."""
        if self._http is None:
            raise RuntimeError(f"the {self.kind} fake is not started")
        delivery = Delivery(event, url, body)
        self.deliveries.append(delivery)
        self._notify()
        try:
            for attempt in range(self.webhook_attempts):
                if attempt:
                    await self._pause(min(self.webhook_backoff * 2 ** (attempt - 1), 1.0))
                    if self._closing.is_set():
                        break
                delivery.headers = headers()
                started = time.monotonic()
                try:
                    async with self._http.post(
                        url,
                        data=body,
                        headers=delivery.headers,
                        timeout=aiohttp.ClientTimeout(total=self.webhook_timeout),
                        allow_redirects=False,  # Meta does not follow redirects
                    ) as response:
                        delivery.response_text = (await response.text())[:2000]
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    delivery.attempts.append(
                        DeliveryAttempt(None, repr(exc), time.monotonic() - started)
                    )
                    delivery.outcome = "failed"
                    continue
                delivery.attempts.append(DeliveryAttempt(status, None, time.monotonic() - started))
                if 200 <= status < 300:
                    delivery.outcome = "delivered"
                    break
                delivery.outcome = "rejected"
                if status < 500 and status != 429:
                    break
        finally:
            if delivery.outcome == "pending":  # cancelled before any attempt finished
                delivery.outcome = "failed"
            self._notify()
        return delivery

    # --- common control API -----------------------------------------------------------------

    @staticmethod
    async def _control_json(request: web.Request) -> Any:
        try:
            return await request.json()
        except ValueError as exc:
            raise ControlError(f"the body is not JSON: {exc}") from None

    @staticmethod
    def _control_error(exc: Exception) -> web.Response:
        return web.json_response({"error": str(exc)}, status=400)

    async def _control_script(self, request: web.Request) -> web.Response:
        target = request.query.get("target", "send")
        try:
            data = await self._control_json(request)
            items: Sequence[Any] = data if isinstance(data, list) else [data]
            self.script(*(behaviour_from_json(item) for item in items), target=target)
        except ValueError as exc:
            return self._control_error(exc)
        return web.json_response({"pending": self.pending(target)})

    async def _control_webhook(self, request: web.Request) -> web.Response:
        try:
            data = await self._control_json(request)
            if not isinstance(data, dict):
                raise ControlError("expected an object with url, secret, headers")
            self.configure_webhook(**data)
        except (ValueError, TypeError) as exc:
            return self._control_error(exc)
        return web.json_response({"url": self.webhook_url})

    def configure_webhook(self, url: str | None = None, **options: Any) -> None:
        """Set the webhook URL (None: no webhooks) and the kind's signing options."""
        if options:
            raise TypeError(f"unknown webhook options {sorted(options)}")
        self.webhook_url = url

    async def _control_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": [r.to_json() for r in self.requests]})

    async def _control_sent(self, request: web.Request) -> web.Response:
        return web.json_response({"sent": [m.to_json() for m in self.sent]})

    async def _control_deliveries(self, request: web.Request) -> web.Response:
        return web.json_response({"deliveries": [d.to_json() for d in self.deliveries]})

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})


def _control(
    handler: Callable[[Any, web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[Any, web.Request], Awaitable[web.StreamResponse]]:
    """Control handlers answer 400 with the reason on bad input instead of a 500."""

    async def wrapped(self: Any, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except KeyError as exc:
            return web.json_response({"error": f"missing field {exc}"}, status=400)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)

    return wrapped


# --- Meta Graph API (Cloud API) -----------------------------------------------------------------

# code: (usual HTTP status, title, details); classification in the reference's §2.1.
_META_ERRORS: dict[int, tuple[int, str, str]] = {
    0: (401, "AuthException", "We were unable to authenticate the app user."),
    1: (400, "API Unknown", "Invalid request or possible server error."),
    2: (503, "API Service", "Temporary due to downtime or due to being overloaded."),
    3: (403, "API Method", "Capability or permissions issue."),
    4: (400, "Application request limit reached", "The app has reached its API call limit."),
    10: (403, "Permission Denied", "Permission is either not granted or has been removed."),
    100: (400, "Invalid parameter", "The request included one or more invalid parameters."),
    190: (401, "Access token has expired", "Your access token has expired."),
    200: (403, "API Permission", "Permission is either not granted or has been removed."),
    368: (403, "Temporarily blocked for policies violations", "Policy violation."),
    613: (400, "Calls to this api have exceeded the rate limit.", "Rate limit."),
    80007: (400, "Rate limit issues", "The WhatsApp Business Account has reached its rate limit."),
    130429: (400, "Rate limit hit", "Cloud API message throughput has been reached."),
    130497: (403, "Business account is restricted from messaging users in this country", ""),
    131000: (500, "Something went wrong", "Message failed to send due to an unknown error."),
    131008: (400, "Required parameter is missing", "The request is missing a required parameter."),
    131009: (400, "Parameter value is not valid", "One or more parameter values are invalid."),
    131016: (503, "Service unavailable", "A service is temporarily unavailable."),
    131021: (400, "Recipient cannot be sender", "Sender and recipient phone number is the same."),
    131026: (400, "Message undeliverable", "Message Undeliverable."),
    131030: (400, "Recipient phone number not in allowed list", "Add it to the allowed list."),
    131031: (403, "Account has been locked", "The business account was locked."),
    131042: (400, "Business eligibility payment issue", "Payment method issue."),
    131047: (
        400,
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer last "
        "replied to this number.",
    ),
    131048: (400, "Spam rate limit hit", "Too many previous messages were blocked or flagged."),
    131049: (400, "Meta chose not to deliver.", "Healthy ecosystem engagement."),
    131050: (400, "User has stopped marketing messages", "The user stopped marketing messages."),
    131051: (400, "Unsupported message type", "Message type is not currently supported."),
    131052: (400, "Media download error", "Unable to download the media sent by the user."),
    131053: (400, "Media upload error", "Unable to upload the media used in the message."),
    131056: (
        400,
        "(Business Account, Consumer Account) pair rate limit hit",
        "Too many messages sent from the sender phone number to the same recipient phone number "
        "in a short period of time.",
    ),
    132000: (400, "Number of parameters does not match", "Template parameter count mismatch."),
    132001: (404, "Template does not exist", "The template does not exist."),
}
_ERROR_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
_STATUS_RANK = {"sent": 1, "failed": 1, "delivered": 2, "read": 3, "played": 4}
_INVALID_TOKEN = "Invalid OAuth access token - Cannot parse access token"
_EXPIRED_TOKEN = (
    "Error validating access token: Session has expired on Friday, 22-Nov-24 10:00:00 PST. "
    "The current time is Friday, 22-Nov-24 11:12:13 PST."
)


def meta_error_body(
    code: int,
    message: str | None = None,
    *,
    details: str | None = None,
    subcode: int | None = None,
    type_: str = "OAuthException",
) -> dict[str, Any]:
    """Meta's error body: ``message`` defaults to ``(#<code>) <title>``, ``details`` to the
    code's usual explanation. Auth errors (0/190) carry no ``error_data``, as Meta's do."""
    _, title, default_details = _META_ERRORS.get(code, (400, "Error", ""))
    if message is None:
        message = _EXPIRED_TOKEN if code == 190 and subcode == 463 else f"(#{code}) {title}"
    body: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if code not in (0, 190):
        body["error_data"] = {
            "messaging_product": "whatsapp",
            "details": details if details is not None else default_details,
        }
    if subcode is not None:
        body["error_subcode"] = subcode
    body["fbtrace_id"] = _fbtrace_id()
    return {"error": body}


def _envelope(
    phone_number_id: str, display_phone_number: str, waba_id: str, value: dict[str, Any]
) -> dict[str, Any]:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": display_phone_number,
            "phone_number_id": phone_number_id,
        },
        **value,
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": waba_id, "changes": [{"value": value, "field": "messages"}]}],
    }


def text_message(
    text: str,
    *,
    from_: str = USER_WA_ID,
    wamid: str | None = None,
    timestamp: int | None = None,
    context_id: str | None = None,
    context_from: str = DISPLAY_PHONE_NUMBER,
) -> dict[str, Any]:
    """An inbound ``messages[]`` item of type text (a quoted reply with ``context_id``)."""
    message: dict[str, Any] = {
        "from": from_,
        "id": wamid or new_wamid(),
        "timestamp": str(timestamp if timestamp is not None else int(time.time())),
        "type": "text",
        "text": {"body": text},
    }
    if context_id is not None:
        message["context"] = {"from": context_from, "id": context_id}
    return message


def button_reply_message(
    button_id: str,
    title: str,
    *,
    from_: str = USER_WA_ID,
    context_id: str | None = None,
    wamid: str | None = None,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """An inbound interactive ``button_reply`` (``context_id``: our wamid that had the button)."""
    message: dict[str, Any] = {
        "from": from_,
        "id": wamid or new_wamid(),
        "timestamp": str(timestamp if timestamp is not None else int(time.time())),
        "type": "interactive",
        "interactive": {"type": "button_reply", "button_reply": {"id": button_id, "title": title}},
    }
    if context_id is not None:
        message["context"] = {"from": DISPLAY_PHONE_NUMBER, "id": context_id}
    return message


def list_reply_message(
    row_id: str,
    title: str,
    description: str | None = None,
    *,
    from_: str = USER_WA_ID,
    wamid: str | None = None,
) -> dict[str, Any]:
    reply: dict[str, Any] = {"id": row_id, "title": title}
    if description is not None:
        reply["description"] = description
    return {
        "from": from_,
        "id": wamid or new_wamid(),
        "timestamp": str(int(time.time())),
        "type": "interactive",
        "interactive": {"type": "list_reply", "list_reply": reply},
    }


def media_message(
    media_type: str,
    media_id: str,
    mime_type: str,
    *,
    from_: str = USER_WA_ID,
    caption: str | None = None,
    filename: str | None = None,
    wamid: str | None = None,
) -> dict[str, Any]:
    """An inbound image/video/audio/document/sticker message (media id, no bytes)."""
    media: dict[str, Any] = {
        "id": media_id,
        "mime_type": mime_type,
        "sha256": hashlib.sha256(media_id.encode()).hexdigest(),
    }
    if caption is not None:
        media["caption"] = caption
    if filename is not None:
        media["filename"] = filename
    return {
        "from": from_,
        "id": wamid or new_wamid(),
        "timestamp": str(int(time.time())),
        "type": media_type,
        media_type: media,
    }


_INBOUND_BUILDERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "text": lambda d: text_message(
        d.pop("text"), context_id=d.pop("context_id", None), wamid=d.pop("id", None), **d
    ),
    "button_reply": lambda d: button_reply_message(
        d.pop("button_id"), d.pop("title"), wamid=d.pop("id", None), **d
    ),
    "list_reply": lambda d: list_reply_message(
        d.pop("row_id"), d.pop("title"), d.pop("description", None), wamid=d.pop("id", None), **d
    ),
    "media": lambda d: media_message(
        d.pop("media_type"), d.pop("media_id"), d.pop("mime_type"), wamid=d.pop("id", None), **d
    ),
}


class FakeGraphServer(_FakeServer):
    """Meta's Cloud API: ``POST /v{X}.{Y}/{phone_number_id}/messages`` (sends, and
    ``status: read`` for mark-as-read/typing). Status webhooks go to ``webhook_url`` (Meta calls
    it the callback URL), signed with ``app_secret`` when set; by default ``sent`` then
    ``delivered`` for every accepted message (``statuses``; an empty tuple sends none)."""

    kind = "graph"
    script_targets = ("send", "read")
    supported = (*_FakeServer.supported, GraphError)

    def __init__(
        self,
        *,
        access_token: str = "fake-token",
        access_tokens: Mapping[str, str] | None = None,
        phone_number_ids: Collection[str] | None = None,
        waba_id: str = WABA_ID,
        display_phone_number: str = DISPLAY_PHONE_NUMBER,
        app_secret: str | None = None,
        statuses: Sequence[str | StatusEvent] = ("sent", "delivered"),
        wa_ids: Mapping[str, str] | None = None,
        max_text: int = 4096,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.access_token = access_token
        self.access_tokens = dict(access_tokens or {})  # per phone_number_id
        self.phone_number_ids = None if phone_number_ids is None else set(phone_number_ids)
        self.waba_id = waba_id
        self.display_phone_number = display_phone_number
        self.app_secret = app_secret
        self.default_statuses = tuple(_status_event(s) for s in statuses)
        self.wa_ids = dict(wa_ids or {})  # `to` (normalised) -> the wa_id Meta answers
        self.max_text = max_text
        self.reads: list[dict[str, Any]] = []  # mark-as-read / typing bodies that were accepted
        self._status_plans: deque[tuple[StatusEvent, ...]] = deque()

    # --- scripting --------------------------------------------------------------------------

    def script_statuses(self, *plans: Sequence[str | StatusEvent]) -> None:
        """Status webhooks for the next accepted messages, one plan each, in the order given
        (``["delivered", "sent"]``, ``["sent", "sent"]``, ``[failed(131047)]``, ``[]``)."""
        self._status_plans.extend(tuple(_status_event(s) for s in plan) for plan in plans)

    def reset(self) -> None:
        self._status_plans.clear()
        self.reads.clear()
        super().reset()

    def configure_webhook(self, url: str | None = None, **options: Any) -> None:
        secret = options.pop("secret", self.app_secret)
        super().configure_webhook(url, **options)
        self.app_secret = secret

    # --- webhooks ---------------------------------------------------------------------------

    async def post_webhook(
        self,
        payload: Mapping[str, Any] | bytes,
        *,
        event: str = "messages",
        signature: str | Literal[False] | None = None,
    ) -> Delivery:
        """POST ``payload`` (an object, serialised as Meta does, or exact bytes) to the callback
        URL, signed with the app secret; ``signature`` overrides the header value, ``False``
        leaves it out."""
        if self.webhook_url is None:
            raise RuntimeError("the graph fake has no webhook_url")
        raw = payload if isinstance(payload, bytes) else meta_json(payload)
        headers = {"Content-Type": "application/json", "User-Agent": "facebookexternalua"}
        if signature is None and self.app_secret is not None:
            headers["X-Hub-Signature-256"] = meta_signature(self.app_secret, raw)
            sha1 = hmac.new(self.app_secret.encode(), raw, hashlib.sha1).hexdigest()
            headers["X-Hub-Signature"] = "sha1=" + sha1
        elif signature:
            headers["X-Hub-Signature-256"] = signature
        return await self._deliver(event, self.webhook_url, raw, lambda: dict(headers))

    def _phone_number_id(self, phone_number_id: str | None) -> str:
        if phone_number_id is not None:
            return phone_number_id
        if self.phone_number_ids and len(self.phone_number_ids) == 1:
            return next(iter(self.phone_number_ids))
        return PHONE_NUMBER_ID

    async def send_inbound(
        self,
        message: Mapping[str, Any],
        *,
        contact_name: str | None = USER_NAME,
        phone_number_id: str | None = None,
        signature: str | Literal[False] | None = None,
    ) -> Delivery:
        """A user writes: POST a ``messages[]`` webhook with ``message`` (see ``text_message``,
        ``button_reply_message``, ``list_reply_message``, ``media_message``)."""
        value: dict[str, Any] = {}
        if "from" in message:
            contact: dict[str, Any] = {"wa_id": message["from"]}
            if contact_name is not None:
                contact = {"profile": {"name": contact_name}, **contact}
            value["contacts"] = [contact]
        value["messages"] = [dict(message)]
        payload = _envelope(
            self._phone_number_id(phone_number_id), self.display_phone_number, self.waba_id, value
        )
        return await self.post_webhook(payload, signature=signature)

    async def send_inbound_text(self, text: str, **options: Any) -> Delivery:
        """``send_inbound(text_message(text, ...))``; ``contact_name``, ``phone_number_id`` and
        ``signature`` go to ``send_inbound``, the rest to ``text_message``."""
        send_options = {
            k: options.pop(k)
            for k in ("contact_name", "phone_number_id", "signature")
            if k in options
        }
        return await self.send_inbound(text_message(text, **options), **send_options)

    async def emit_status(
        self,
        message_id: str,
        status: str | StatusEvent,
        *,
        recipient_id: str | None = None,
        phone_number_id: str | None = None,
    ) -> Delivery:
        """POST a status webhook for ``message_id`` now (also for ids the fake never sent,
        e.g. a status for a send whose answer was lost)."""
        step = _status_event(status)
        sent = next((m for m in self.sent if m.id == message_id), None)
        if sent is None:
            sent = SentMessage(
                message_id,
                self._phone_number_id(phone_number_id),
                recipient_id or USER_WA_ID,
                recipient_id or USER_WA_ID,
                None,
                {},
                extra={"accepted_at": int(time.time())},
            )
        return await self._deliver_status(sent, step)

    async def _deliver_status(self, sent: SentMessage, step: StatusEvent) -> Delivery:
        timestamp = step.timestamp
        if timestamp is None:
            timestamp = int(sent.extra.get("accepted_at", time.time())) + _STATUS_RANK.get(
                step.status, 1
            )
        item: dict[str, Any] = {
            "id": sent.id,
            "status": step.status,
            "timestamp": str(timestamp),
            "recipient_id": sent.recipient,
        }
        opaque = sent.request.get("biz_opaque_callback_data")
        if opaque is not None:
            item["biz_opaque_callback_data"] = opaque
        if step.status in ("sent", "delivered"):
            item["pricing"] = {
                "billable": False,
                "pricing_model": "PMP",
                "type": "free_customer_service",
                "category": "service",
            }
        if step.status == "failed":
            code = step.error_code if step.error_code is not None else 131026
            _, title, details = _META_ERRORS.get(code, (400, "Error", ""))
            item["errors"] = [
                {
                    "code": code,
                    "title": title,
                    "message": title,
                    "error_data": {
                        "details": step.details if step.details is not None else details
                    },
                    "href": _ERROR_HREF,
                }
            ]
        payload = _envelope(
            sent.channel, self.display_phone_number, self.waba_id, {"statuses": [item]}
        )
        return await self.post_webhook(payload, event=f"status:{step.status}")

    async def _run_statuses(self, sent: SentMessage, plan: tuple[StatusEvent, ...]) -> None:
        for step in plan:
            await self._pause(step.delay)
            if self._closing.is_set():
                return
            await self._deliver_status(sent, step)

    async def verify_webhook(
        self, verify_token: str, challenge: str = "1158201444"
    ) -> web.Response:
        """Meta's subscription check: ``GET <callback>?hub.mode=subscribe&hub.challenge=..
        &hub.verify_token=..``; returns the status and body the endpoint answered."""
        if self.webhook_url is None or self._http is None:
            raise RuntimeError("the graph fake has no webhook_url or is not started")
        params = {
            "hub.mode": "subscribe",
            "hub.challenge": challenge,
            "hub.verify_token": verify_token,
        }
        async with self._http.get(
            self.webhook_url,
            params=params,
            timeout=aiohttp.ClientTimeout(total=self.webhook_timeout),
        ) as response:
            return web.Response(status=response.status, text=await response.text())

    # --- the API ----------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post(r"/{version:v\d+\.\d+}/{phone_number_id}/messages", self._messages)

    def _default_error_body(self, http_status: int) -> Any:
        code = {401: 190, 429: 130429, 500: 131000, 503: 131016}.get(http_status, 100)
        body = meta_error_body(code)
        if http_status == 404:
            body["error"]["message"] = "Unknown path components"
        return body

    def _graph_error(self, behaviour: GraphError | HttpError) -> web.Response:
        if isinstance(behaviour, HttpError):
            return self._http_error(behaviour)
        status = behaviour.http_status or _META_ERRORS.get(behaviour.code, (400,))[0]
        return web.json_response(
            meta_error_body(
                behaviour.code,
                behaviour.message,
                details=behaviour.details,
                subcode=behaviour.subcode,
            ),
            status=status,
            headers=_retry_after_header(behaviour.retry_after),
        )

    @staticmethod
    def _invalid(message: str, status: int = 400) -> web.Response:
        return web.json_response(meta_error_body(100, message), status=status)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        pnid = request.match_info["phone_number_id"]
        token = self.access_tokens.get(pnid, self.access_token)
        if recorded.authorization != f"Bearer {token}":
            return web.json_response(meta_error_body(190, _INVALID_TOKEN), status=401)
        if self.phone_number_ids is not None and pnid not in self.phone_number_ids:
            body = meta_error_body(
                100,
                f"Unsupported post request. Object with ID '{pnid}' does not exist, cannot be "
                "loaded due to missing permissions, or does not support this operation.",
                subcode=33,
                type_="GraphMethodException",
            )
            return web.json_response(body, status=400)
        body = recorded.json
        if not isinstance(body, dict):
            return self._invalid("(#100) The request body must be a JSON object.")
        if body.get("messaging_product") != "whatsapp":
            return self._invalid("(#100) The parameter messaging_product is required.")
        if body.get("status") == "read":
            if not isinstance(body.get("message_id"), str):
                return self._invalid("(#100) The parameter message_id is required.")
            return await self._perform(
                request, "read", lambda b, answered: self._accept_read(body), self._graph_error
            )
        to = body.get("to", body.get("recipient"))
        if not isinstance(to, str) or not to:
            return self._invalid("(#100) The parameter to is required.")
        kind = body.get("type", "text")
        text: str | None = None
        if kind == "text":
            text_obj = body.get("text")
            text = text_obj.get("body") if isinstance(text_obj, dict) else None
            if not isinstance(text, str) or not text:
                return self._invalid("(#100) The parameter text['body'] is required.")
            if len(text) > self.max_text:
                return self._invalid(
                    f"(#100) Param text['body'] must be at most {self.max_text} characters long."
                )
        elif not isinstance(body.get(kind), dict):
            return self._invalid(f"(#100) The parameter {kind} is required.")

        async def on_accept(behaviour: Accept, answered: bool) -> web.StreamResponse:
            return self._accept_send(pnid, body, to, text, behaviour, answered)

        return await self._perform(request, "send", on_accept, self._graph_error)

    async def _accept_read(self, body: dict[str, Any]) -> web.StreamResponse:
        self.reads.append(body)
        self._notify()
        return web.json_response({"success": True})

    def _accept_send(
        self,
        pnid: str,
        body: dict[str, Any],
        to: str,
        text: str | None,
        behaviour: Accept,
        answered: bool,
    ) -> web.Response:
        normalized = normalize_number(to)
        wa_id = behaviour.wa_id or self.wa_ids.get(normalized, normalized)
        sent = SentMessage(
            new_wamid(),
            pnid,
            to,
            wa_id,
            text,
            body,
            answered=answered,
            extra={"accepted_at": int(time.time())},
        )
        self.sent.append(sent)
        self._notify()
        plan = self._status_plans.popleft() if self._status_plans else self.default_statuses
        if self.webhook_url is not None and plan:
            self._spawn(self._run_statuses(sent, plan), f"statuses-{sent.id}")
        message: dict[str, Any] = {"id": sent.id}
        if behaviour.message_status is not None:
            message["message_status"] = behaviour.message_status
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": wa_id}],
                "messages": [message],
            }
        )

    # --- control API ------------------------------------------------------------------------

    def _add_control_routes(self, app: web.Application) -> None:
        app.router.add_post("/_fake/statuses", self._control_statuses)
        app.router.add_post("/_fake/status", self._control_status)
        app.router.add_post("/_fake/inbound", self._control_inbound)

    @_control
    async def _control_statuses(self, request: web.Request) -> web.Response:
        """``{"plans": [[...], ...]}`` or ``{"plan": [...]}``; ``{"default": [...]}`` replaces
        the default plan."""
        data = await self._control_json(request)
        if not isinstance(data, dict):
            raise ControlError("expected {plan | plans | default}")
        plans = data.get("plans", [data["plan"]] if "plan" in data else [])
        self.script_statuses(*plans)
        if "default" in data:
            self.default_statuses = tuple(_status_event(s) for s in data["default"])
        return web.json_response({"pending": len(self._status_plans)})

    @_control
    async def _control_status(self, request: web.Request) -> web.Response:
        """``{"id": wamid, "status": "read" | {...}, "recipient_id"?, "phone_number_id"?}``."""
        data = await self._control_json(request)
        delivery = await self.emit_status(
            str(data["id"]),
            data["status"],
            recipient_id=data.get("recipient_id"),
            phone_number_id=data.get("phone_number_id"),
        )
        return web.json_response(delivery.to_json())

    @_control
    async def _control_inbound(self, request: web.Request) -> web.Response:
        """``{"type": "text", "text": ..., "from"?, "context_id"?}``, ``{"type":
        "button_reply", "button_id", "title"}``, ``{"type": "list_reply", "row_id", "title"}``,
        ``{"type": "media", "media_type", "media_id", "mime_type", "caption"?}``, ``{"message":
        {...}}`` (a raw messages[] item), ``{"payload": {...}}`` or ``{"raw": "..."}`` (sent as
        is); plus optional ``contact_name``, ``phone_number_id``, ``signature`` (false: none)."""
        data = await self._control_json(request)
        if not isinstance(data, dict):
            raise ControlError("expected an object")
        signature = data.pop("signature", None)
        if "raw" in data or "payload" in data:
            raw = data["raw"].encode() if "raw" in data else data["payload"]
            delivery = await self.post_webhook(raw, signature=signature)
            return web.json_response(delivery.to_json())
        options = {
            "contact_name": data.pop("contact_name", USER_NAME),
            "phone_number_id": data.pop("phone_number_id", None),
        }
        if "message" in data:
            message = data["message"]
        else:
            kind = data.pop("type", "text")
            builder = _INBOUND_BUILDERS.get(kind)
            if builder is None:
                raise ControlError(
                    f"unknown inbound type {kind!r}; one of {sorted(_INBOUND_BUILDERS)}"
                )
            if "from" in data:
                data["from_"] = data.pop("from")
            message = builder(data)
        delivery = await self.send_inbound(message, signature=signature, **options)
        return web.json_response(delivery.to_json())


# --- WAHA ---------------------------------------------------------------------------------------

WAHA_STATUSES = ("STOPPED", "STARTING", "SCAN_QR_CODE", "WORKING", "FAILED")
WAHA_ACK_NAMES = {-1: "ERROR", 0: "PENDING", 1: "SERVER", 2: "DEVICE", 3: "READ", 4: "PLAYED"}
_NOT_WORKING = "Session status is not as expected. Try again later or restart the session"
_CHAT_ID = re.compile(r"^[\w.+-]+@(c\.us|lid|g\.us|s\.whatsapp\.net|newsletter)$")


def _waha_body(http_status: int, code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"statusCode": http_status, "code": code, "message": message, **extra}


class FakeWahaServer(_FakeServer):
    """WAHA (and our QR service contract, §4.6): ``X-Api-Key`` auth, sessions with a status
    switchable from the test, ``POST /api/sendText`` (201; 422 unless the session is WORKING),
    ``startTyping``/``stopTyping``/``sendSeen``, the QR as PNG/base64/raw. Webhooks
    (``message``, ``message.ack``, ``session.status``, and ``fromMe`` echoes of our sends when
    ``echo_own_sends``) go to ``webhook_url``, HMAC-SHA512 signed when ``webhook_secret`` is set.
    Sends honour ``Idempotency-Key`` (the original 201 again; 409 while the first is in flight).
    """

    kind = "waha"
    script_targets = ("send", "typing")

    def __init__(
        self,
        *,
        api_key: str = "waha-key",
        sessions: Mapping[str, str] | None = None,
        me: str = QR_ME + "@c.us",
        push_name: str = "Loja",
        webhook_secret: str | None = None,
        acks: Sequence[int | AckEvent] = (1, 2),
        echo_own_sends: bool = False,
        echo_event: str = "message.any",
        session_wait: float = 0.0,
        not_on_whatsapp: Collection[str] = (),
        engine: str = "NOWEB",
        max_text: int = 4096,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.api_key = api_key
        initial = dict(sessions if sessions is not None else {"default": "WORKING"})
        for status in initial.values():
            self._check_status(status)
        self._initial_sessions = initial
        self.sessions: dict[str, str] = dict(initial)
        self.paired: dict[str, bool] = {
            s: st in ("WORKING", "STOPPED") for s, st in initial.items()
        }
        self.me = me
        self.push_name = push_name
        self.webhook_secret = webhook_secret
        self.default_acks = tuple(_ack_event(a) for a in acks)
        self.echo_own_sends = echo_own_sends
        self.echo_event = echo_event
        # Real WAHA waits up to 5 s for a session to become WORKING before answering 422.
        self.session_wait = session_wait
        self.not_on_whatsapp = set(not_on_whatsapp)
        self.engine = engine
        self.max_text = max_text
        self.typing: list[dict[str, Any]] = []  # {"action", "session", "chatId"}
        self._ack_plans: deque[tuple[AckEvent, ...]] = deque()
        self._idempotent: dict[str, dict[str, Any] | None] = {}  # None: first one in flight

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in WAHA_STATUSES:
            raise ValueError(f"unknown WAHA session status {status!r}; one of {WAHA_STATUSES}")

    # --- scripting and state ----------------------------------------------------------------

    def script_acks(self, *plans: Sequence[int | AckEvent]) -> None:
        """Acks for the next accepted messages, one plan each (``[3, 2]``, ``[1, 1]``, ``[-1]``,
        ``[]``)."""
        self._ack_plans.extend(tuple(_ack_event(a) for a in plan) for plan in plans)

    def set_session_status(self, session: str, status: str, *, notify: bool = True) -> None:
        """Switch a session (created when unknown) and send ``session.status`` (when
        ``notify`` and a webhook URL is set). WORKING marks it paired; FAILED unpairs it."""
        self._check_status(status)
        self.sessions[session] = status
        if status == "WORKING":
            self.paired[session] = True
        elif status == "FAILED":
            self.paired[session] = False
        else:
            self.paired.setdefault(session, False)
        self._notify()
        if notify and self.webhook_url is not None and self._runner is not None:
            payload = {"name": session, "status": status}
            self._spawn(self.post_webhook("session.status", session, payload), "session-status")

    def reset(self) -> None:
        self._ack_plans.clear()
        self.typing.clear()
        self._idempotent.clear()
        self.sessions = dict(self._initial_sessions)
        self.paired = {s: st in ("WORKING", "STOPPED") for s, st in self.sessions.items()}
        super().reset()

    def configure_webhook(self, url: str | None = None, **options: Any) -> None:
        secret = options.pop("secret", self.webhook_secret)
        super().configure_webhook(url, **options)
        self.webhook_secret = secret

    def _me(self, session: str) -> dict[str, Any] | None:
        if self.sessions.get(session) != "WORKING":
            return None
        return {"id": self.me, "pushName": self.push_name}

    def session_info(self, session: str) -> dict[str, Any]:
        return {
            "name": session,
            "status": self.sessions[session],
            "me": self._me(session),
            "engine": {"engine": self.engine},
        }

    # --- webhooks ---------------------------------------------------------------------------

    async def post_webhook(
        self,
        event: str,
        session: str,
        payload: Mapping[str, Any] | bytes,
        *,
        signature: str | Literal[False] | None = None,
    ) -> Delivery:
        """POST a WAHA envelope ``{id, timestamp, event, session, me, engine, payload}`` (or
        exact bytes) to the webhook URL. The envelope id stays the same across retries; the
        ``X-Webhook-Request-Id`` changes per attempt. ``signature`` overrides the HMAC header,
        ``False`` leaves it out."""
        if self.webhook_url is None:
            raise RuntimeError("the waha fake has no webhook_url")
        if isinstance(payload, bytes):
            raw = payload
        else:
            raw = node_json(
                {
                    "id": _event_id(),
                    "timestamp": int(time.time() * 1000),
                    "event": event,
                    "session": session,
                    "me": self._me(session),
                    "engine": self.engine,
                    "payload": payload,
                }
            )
        fixed = {"Content-Type": "application/json"}
        if signature is None and self.webhook_secret is not None:
            fixed["X-Webhook-Hmac"] = waha_signature(self.webhook_secret, raw)
            fixed["X-Webhook-Hmac-Algorithm"] = "sha512"
        elif signature:
            fixed["X-Webhook-Hmac"] = signature
            fixed["X-Webhook-Hmac-Algorithm"] = "sha512"

        def headers() -> dict[str, str]:
            return {
                **fixed,
                "X-Webhook-Request-Id": str(uuid.uuid4()),
                "X-Webhook-Timestamp": str(int(time.time() * 1000)),
            }

        return await self._deliver(event, self.webhook_url, raw, headers)

    async def send_inbound(
        self,
        body: str,
        *,
        session: str | None = None,
        from_: str = USER_WA_ID + "@c.us",
        key_id: str | None = None,
        reply_to: str | None = None,
        media: Mapping[str, Any] | None = None,
        participant: str | None = None,
        event: str = "message",
        signature: str | Literal[False] | None = None,
    ) -> Delivery:
        """A user writes: a ``message`` webhook (``fromMe: false``)."""
        session = session or next(iter(self.sessions), "default")
        payload: dict[str, Any] = {
            "id": f"false_{from_}_{key_id or new_key_id()}",
            "timestamp": int(time.time()),
            "from": from_,
            "fromMe": False,
            "to": self.me,
            "body": body,
            "hasMedia": media is not None,
            "replyTo": reply_to,
            "participant": participant,
        }
        if media is not None:
            payload["media"] = dict(media)
        return await self.post_webhook(event, session, payload, signature=signature)

    async def emit_ack(self, message_id: str, ack: int, *, session: str | None = None) -> Delivery:
        """A ``message.ack`` for ``message_id`` (a serialized ``true_<chat>_<key>``) now."""
        sent = next((m for m in self.sent if m.id == message_id), None)
        session = session or (sent.channel if sent else next(iter(self.sessions), "default"))
        chat = sent.recipient if sent else message_id.split("_")[1]
        return await self._deliver_ack(session, message_id, chat, ack)

    async def _deliver_ack(self, session: str, message_id: str, chat: str, ack: int) -> Delivery:
        payload = {
            "id": message_id,
            "from": chat,
            "to": self.me,
            "participant": None,
            "fromMe": True,
            "ack": ack,
            "ackName": WAHA_ACK_NAMES.get(ack, "UNKNOWN"),
        }
        return await self.post_webhook("message.ack", session, payload)

    async def _after_send(self, sent: SentMessage, plan: tuple[AckEvent, ...]) -> None:
        if self.echo_own_sends:
            payload = {
                "id": sent.id,
                "timestamp": int(time.time()),
                "from": self.me,
                "fromMe": True,
                "to": sent.recipient,
                "body": sent.text,
                "hasMedia": False,
                "replyTo": sent.request.get("reply_to"),
                "participant": None,
            }
            await self.post_webhook(self.echo_event, sent.channel, payload)
        for step in plan:
            await self._pause(step.delay)
            if self._closing.is_set():
                return
            await self._deliver_ack(sent.channel, sent.id, sent.recipient, int(step.ack))

    # --- the API ----------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/sendText", self._send_text)
        for action in ("startTyping", "stopTyping", "sendSeen"):
            app.router.add_post(f"/api/{action}", self._typing)
        app.router.add_get("/api/sessions", self._list_sessions)
        app.router.add_get("/api/sessions/{session}", self._get_session)
        for action in ("start", "stop", "restart", "logout"):
            app.router.add_post(f"/api/sessions/{{session}}/{action}", self._session_action)
        app.router.add_get("/api/{session}/auth/qr", self._qr)

    def _default_error_body(self, http_status: int) -> Any:
        code, message = {
            400: ("invalid_request", "Bad Request"),
            401: ("unauthorized", "Unauthorized"),
            404: ("not_found", "Not Found"),
            409: ("duplicate_in_flight", "A request with this Idempotency-Key is in flight"),
            422: ("session_not_working", _NOT_WORKING),
            429: ("rate_limited", "Too Many Requests"),
        }.get(http_status, ("upstream_error", "Connection Closed"))
        return _waha_body(http_status, code, message)

    def _authorized(self, recorded: RecordedRequest) -> bool:
        return recorded.headers.get("x-api-key") == self.api_key

    def _unauthorized(self) -> web.Response:
        return web.json_response(_waha_body(401, "unauthorized", "Unauthorized"), status=401)

    def _session_not_found(self, session: str) -> web.Response:
        body = _waha_body(404, "session_not_found", f"Session '{session}' does not exist")
        return web.json_response(body, status=404)

    @staticmethod
    def _bad_field(field_name: str, message: str) -> web.Response:
        body = _waha_body(400, "invalid_request", message, field=field_name)
        return web.json_response(body, status=400)

    async def _working(self, session: str) -> web.Response | None:
        """None when the session is WORKING (waiting up to ``session_wait``), else the 422."""
        if self.sessions.get(session) != "WORKING" and self.session_wait > 0:
            with contextlib.suppress(AssertionError):
                await self.wait_for(
                    lambda: self.sessions.get(session) == "WORKING" or self._closing.is_set(),
                    self.session_wait,
                )
        status = self.sessions.get(session)
        if status == "WORKING":
            return None
        body = _waha_body(
            422,
            "session_not_working",
            _NOT_WORKING,
            error=_NOT_WORKING,  # real WAHA's key; `message`/`code` are our contract's
            session=session,
            status=status,
            expected=["WORKING"],
        )
        return web.json_response(body, status=422)

    async def _send_text(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        if not self._authorized(recorded):
            return self._unauthorized()
        body = recorded.json
        if not isinstance(body, dict):
            return self._bad_field("body", "The body must be a JSON object")
        session = body.get("session", "default")
        chat_id = body.get("chatId")
        text = body.get("text")
        if not isinstance(session, str) or not session:
            return self._bad_field("session", "session must be a string")
        if not isinstance(chat_id, str) or not _CHAT_ID.match(chat_id):
            return self._bad_field("chatId", "chatId must look like <digits>@c.us")
        if not isinstance(text, str) or not text:
            return self._bad_field("text", "text must be a non-empty string")
        if len(text) > self.max_text:
            return self._bad_field("text", f"text must be at most {self.max_text} characters")
        if session not in self.sessions:
            return self._session_not_found(session)
        key = recorded.headers.get("idempotency-key")
        if key is not None and key in self._idempotent:
            original = self._idempotent[key]
            if original is None:
                return web.json_response(self._default_error_body(409), status=409)
            return web.json_response(original, status=201)
        not_working = await self._working(session)
        if not_working is not None:
            return not_working
        if chat_id in self.not_on_whatsapp:
            body_422 = _waha_body(
                422, "not_on_whatsapp", f"{chat_id} is not on WhatsApp", chatId=chat_id
            )
            return web.json_response(body_422, status=422)

        async def on_accept(behaviour: Accept, answered: bool) -> web.StreamResponse:
            sent = SentMessage(
                f"true_{chat_id}_{new_key_id()}",
                session,
                chat_id,
                chat_id,
                text,
                body,
                answered=answered,
                idempotency_key=key,
            )
            response = {
                "id": sent.id,
                "timestamp": int(time.time()),
                "to": chat_id,
                "fromMe": True,
                "body": text,
                "ack": 1,
                "ackName": "SERVER",
            }
            if key is not None:
                self._idempotent[key] = response
            self.sent.append(sent)
            self._notify()
            plan = self._ack_plans.popleft() if self._ack_plans else self.default_acks
            if self.webhook_url is not None and (plan or self.echo_own_sends):
                self._spawn(self._after_send(sent, plan), f"acks-{sent.id}")
            return web.json_response(response, status=201)

        if key is not None:
            self._idempotent[key] = None
        try:
            return await self._perform(request, "send", on_accept, self._http_error_any)
        finally:
            if key is not None and self._idempotent.get(key) is None:
                del self._idempotent[key]  # not sent: a retry with this key may send

    def _http_error_any(self, behaviour: GraphError | HttpError) -> web.Response:
        assert isinstance(behaviour, HttpError)  # script() refuses GraphError here
        return self._http_error(behaviour)

    async def _typing(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        if not self._authorized(recorded):
            return self._unauthorized()
        body = recorded.json
        if not isinstance(body, dict) or not isinstance(body.get("chatId"), str):
            return self._bad_field("chatId", "chatId must be a string")
        session = body.get("session", "default")
        if session not in self.sessions:
            return self._session_not_found(session)
        not_working = await self._working(session)
        if not_working is not None:
            return not_working
        action = request.path.rsplit("/", 1)[-1]

        async def on_accept(behaviour: Accept, answered: bool) -> web.StreamResponse:
            self.typing.append({"action": action, "session": session, "chatId": body["chatId"]})
            self._notify()
            return web.Response(status=201)  # NestJS: a void handler answers 201, no body

        return await self._perform(request, "typing", on_accept, self._http_error_any)

    async def _list_sessions(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        if not self._authorized(recorded):
            return self._unauthorized()
        return web.json_response([self.session_info(s) for s in self.sessions])

    async def _get_session(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        if not self._authorized(recorded):
            return self._unauthorized()
        session = request.match_info["session"]
        if session not in self.sessions:
            return self._session_not_found(session)
        return web.json_response(self.session_info(session))

    async def _session_action(self, request: web.Request) -> web.Response:
        """start/restart: WORKING when paired, else SCAN_QR_CODE; stop: STOPPED; logout:
        unpaired and STOPPED."""
        recorded = await self._record(request)
        if not self._authorized(recorded):
            return self._unauthorized()
        session = request.match_info["session"]
        if session not in self.sessions:
            return self._session_not_found(session)
        action = request.path.rsplit("/", 1)[-1]
        if action in ("start", "restart"):
            status = "WORKING" if self.paired.get(session) else "SCAN_QR_CODE"
        else:
            status = "STOPPED"
        if action == "logout":
            self.paired[session] = False
        self.set_session_status(session, status)
        return web.json_response(self.session_info(session), status=201)

    async def _qr(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        if not self._authorized(recorded):
            return self._unauthorized()
        session = request.match_info["session"]
        if session not in self.sessions:
            return self._session_not_found(session)
        status = self.sessions[session]
        if status != "SCAN_QR_CODE":
            body = _waha_body(
                422,
                "session_not_working",
                _NOT_WORKING,
                session=session,
                status=status,
                expected=["SCAN_QR_CODE"],
            )
            return web.json_response(body, status=422)
        value = f"2@{base64.b64encode(f'{session}:{int(time.time())}'.encode()).decode()}"
        if request.query.get("format") == "raw":
            return web.json_response({"value": value})
        png = tiny_png(value)
        if "application/json" in request.headers.get("Accept", ""):
            return web.json_response(
                {"mimetype": "image/png", "data": base64.b64encode(png).decode()}
            )
        return web.Response(body=png, content_type="image/png")

    # --- control API ------------------------------------------------------------------------

    def _add_control_routes(self, app: web.Application) -> None:
        app.router.add_put("/_fake/sessions/{session}", self._control_session)
        app.router.add_post("/_fake/acks", self._control_acks)
        app.router.add_post("/_fake/ack", self._control_ack)
        app.router.add_post("/_fake/inbound", self._control_inbound)

    @_control
    async def _control_session(self, request: web.Request) -> web.Response:
        """``{"status": "FAILED", "notify"?: true}``."""
        data = await self._control_json(request)
        session = request.match_info["session"]
        self.set_session_status(session, str(data["status"]), notify=bool(data.get("notify", True)))
        return web.json_response(self.session_info(session))

    @_control
    async def _control_acks(self, request: web.Request) -> web.Response:
        """``{"plan": [3, 2]}``, ``{"plans": [...]}``, ``{"default": [...]}``."""
        data = await self._control_json(request)
        self.script_acks(*data.get("plans", [data["plan"]] if "plan" in data else []))
        if "default" in data:
            self.default_acks = tuple(_ack_event(a) for a in data["default"])
        return web.json_response({"pending": len(self._ack_plans)})

    @_control
    async def _control_ack(self, request: web.Request) -> web.Response:
        """``{"id": "true_<chat>_<key>", "ack": 3, "session"?}``."""
        data = await self._control_json(request)
        delivery = await self.emit_ack(
            str(data["id"]), int(data["ack"]), session=data.get("session")
        )
        return web.json_response(delivery.to_json())

    @_control
    async def _control_inbound(self, request: web.Request) -> web.Response:
        """``{"body": "Oi", "session"?, "from"?, "key_id"?, "reply_to"?, "media"?, "event"?,
        "signature"?}`` or ``{"raw": "...", "event"?, "session"?}``."""
        data = await self._control_json(request)
        if "raw" in data:
            delivery = await self.post_webhook(
                data.get("event", "message"),
                data.get("session", "default"),
                str(data["raw"]).encode(),
                signature=data.get("signature"),
            )
        else:
            if "from" in data:
                data["from_"] = data.pop("from")
            delivery = await self.send_inbound(data.pop("body"), **data)
        return web.json_response(delivery.to_json())


# --- Evolution API v2 ---------------------------------------------------------------------------

EVOLUTION_STATES = ("open", "close", "connecting")
EVOLUTION_ACKS = ("ERROR", "PENDING", "SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED", "DELETED")


def _evolution_body(status: int, message: Any) -> dict[str, Any]:
    error = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not Found",
        500: "Internal Server Error",
    }.get(status, "Error")
    return {"status": status, "error": error, "response": {"message": message}}


class FakeEvolutionServer(_FakeServer):
    """Evolution API v2: ``apikey`` auth (the global key or the instance's token), instances with
    a connection state switchable from the test, ``POST /message/sendText/{instance}`` (201; a
    send while not ``open`` fails as Baileys' closed socket does: ``closed_status``, 400 in
    v2.3.6, with ``["Error: Connection Closed"]``), ``GET /instance/connectionState/{i}``,
    ``GET /instance/connect/{i}`` (a base64 QR). Webhooks ``messages.upsert`` (inbound, and our
    own sends with ``fromMe`` when ``echo_own_sends``), ``messages.update`` (acks) and
    ``connection.update`` go to ``webhook_url`` (plus ``/<event-name>`` with
    ``webhook_by_events``) with ``webhook_headers`` on every request; Evolution signs nothing,
    so a per-channel secret travels in a header or in the URL."""

    kind = "evolution"

    def __init__(
        self,
        *,
        api_key: str = "evo-key",
        instances: Mapping[str, str] | None = None,
        instance_tokens: Mapping[str, str] | None = None,
        owner: str = QR_ME,
        push_name: str = "Loja",
        webhook_headers: Mapping[str, str] | None = None,
        webhook_by_events: bool = False,
        acks: Sequence[str | AckEvent] = ("SERVER_ACK", "DELIVERY_ACK"),
        echo_own_sends: bool = False,
        echo_event: str = "messages.upsert",
        not_on_whatsapp: Collection[str] = (),
        closed_status: int = 400,
        max_delay: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.api_key = api_key
        initial = dict(instances if instances is not None else {"default": "open"})
        for state in initial.values():
            self._check_state(state)
        self._initial_instances = initial
        self.instances: dict[str, str] = dict(initial)
        self.instance_tokens = dict(instance_tokens or {})
        self.instance_ids = {name: str(uuid.uuid4()) for name in initial}
        self.owner = owner
        self.push_name = push_name
        self.webhook_headers = dict(webhook_headers or {})
        self.webhook_by_events = webhook_by_events
        self.default_acks = tuple(_ack_event(a) for a in acks)
        self.echo_own_sends = echo_own_sends
        self.echo_event = echo_event
        self.not_on_whatsapp = {normalize_number(n) for n in not_on_whatsapp}
        self.closed_status = closed_status
        self.max_delay = max_delay  # cap on the `delay` (ms of "composing") a send may ask for
        self.presences: list[dict[str, Any]] = []
        self.qr_count: dict[str, int] = {}
        self._ack_plans: deque[tuple[AckEvent, ...]] = deque()

    @staticmethod
    def _check_state(state: str) -> None:
        if state not in EVOLUTION_STATES:
            raise ValueError(f"unknown Evolution state {state!r}; one of {EVOLUTION_STATES}")

    @property
    def owner_jid(self) -> str:
        return f"{self.owner}@s.whatsapp.net"

    @staticmethod
    def jid(number: str) -> str:
        """``number`` as a JID: kept when it has an ``@``, else ``<digits>@s.whatsapp.net``."""
        return number if "@" in number else f"{normalize_number(number)}@s.whatsapp.net"

    # --- scripting and state ----------------------------------------------------------------

    def script_acks(self, *plans: Sequence[str | AckEvent]) -> None:
        """Acks for the next accepted messages, one plan each (``["READ", "DELIVERY_ACK"]``)."""
        self._ack_plans.extend(tuple(_ack_event(a) for a in plan) for plan in plans)

    def set_instance_state(
        self, instance: str, state: str, *, status_reason: int | None = None, notify: bool = True
    ) -> None:
        """Switch an instance (created when unknown) and send ``connection.update`` (when
        ``notify`` and a webhook URL is set); ``status_reason`` is Baileys' disconnect code
        (200 for open, e.g. 401 logged out, 428 connection closed)."""
        self._check_state(state)
        self.instances[instance] = state
        self.instance_ids.setdefault(instance, str(uuid.uuid4()))
        self._notify()
        if notify and self.webhook_url is not None and self._runner is not None:
            reason = (
                status_reason if status_reason is not None else (200 if state == "open" else 428)
            )
            data: dict[str, Any] = {"instance": instance, "state": state, "statusReason": reason}
            if state == "open":
                data |= {"wuid": self.owner_jid, "profileName": self.push_name}
            self._spawn(self.post_webhook("connection.update", instance, data), "connection-update")

    def reset(self) -> None:
        self._ack_plans.clear()
        self.presences.clear()
        self.qr_count.clear()
        self.instances = dict(self._initial_instances)
        super().reset()

    def configure_webhook(self, url: str | None = None, **options: Any) -> None:
        headers = options.pop("headers", self.webhook_headers)
        by_events = options.pop("by_events", self.webhook_by_events)
        if "secret" in options:
            raise TypeError("Evolution signs nothing: pass the secret in headers or the url")
        super().configure_webhook(url, **options)
        self.webhook_headers = dict(headers)
        self.webhook_by_events = bool(by_events)

    # --- webhooks ---------------------------------------------------------------------------

    async def post_webhook(self, event: str, instance: str, data: Any) -> Delivery:
        """POST Evolution's envelope ``{event, instance, data, destination, date_time, sender,
        server_url, apikey}``."""
        if self.webhook_url is None:
            raise RuntimeError("the evolution fake has no webhook_url")
        url = self.webhook_url
        if self.webhook_by_events:
            url = f"{url.rstrip('/')}/{event.replace('.', '-').replace('_', '-').lower()}"
        now = datetime.now(UTC)
        raw = node_json(
            {
                "event": event,
                "instance": instance,
                "data": data,
                "destination": self.webhook_url,
                "date_time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "sender": self.owner_jid,
                "server_url": self.url,
                "apikey": self.instance_tokens.get(instance, self.api_key),
            }
        )
        headers = {"Content-Type": "application/json", **self.webhook_headers}
        return await self._deliver(event, url, raw, lambda: dict(headers))

    def _message_data(
        self,
        instance: str,
        remote_jid: str,
        key_id: str,
        text: str | None,
        *,
        from_me: bool,
        push_name: str,
        status: str,
    ) -> dict[str, Any]:
        return {
            "key": {"remoteJid": remote_jid, "fromMe": from_me, "id": key_id},
            "pushName": push_name,
            "status": status,
            "message": {"conversation": text},
            "messageType": "conversation",
            "messageTimestamp": int(time.time()),
            "instanceId": self.instance_ids.setdefault(instance, str(uuid.uuid4())),
            "source": "android" if not from_me else "unknown",
        }

    async def send_inbound(
        self,
        text: str,
        *,
        instance: str | None = None,
        remote_jid: str = USER_WA_ID + "@s.whatsapp.net",
        push_name: str = USER_NAME,
        key_id: str | None = None,
    ) -> Delivery:
        """A user writes: ``messages.upsert`` with ``fromMe: false`` (``remote_jid`` may be an
        ``@lid``)."""
        instance = instance or next(iter(self.instances), "default")
        data = self._message_data(
            instance,
            remote_jid,
            key_id or new_key_id(),
            text,
            from_me=False,
            push_name=push_name,
            status="DELIVERY_ACK",
        )
        return await self.post_webhook("messages.upsert", instance, data)

    async def emit_ack(self, key_id: str, status: str, *, instance: str | None = None) -> Delivery:
        """A ``messages.update`` for our message ``key_id`` now."""
        sent = next((m for m in self.sent if m.id == key_id), None)
        instance = instance or (sent.channel if sent else next(iter(self.instances), "default"))
        remote_jid = sent.recipient if sent else USER_WA_ID + "@s.whatsapp.net"
        return await self._deliver_ack(instance, key_id, remote_jid, status)

    async def _deliver_ack(
        self, instance: str, key_id: str, remote_jid: str, status: str
    ) -> Delivery:
        data = {
            "keyId": key_id,
            "remoteJid": remote_jid,
            "fromMe": True,
            "participant": None,
            "status": status,
            "instanceId": self.instance_ids.setdefault(instance, str(uuid.uuid4())),
            "messageId": uuid.uuid4().hex[:25],
        }
        return await self.post_webhook("messages.update", instance, data)

    async def _after_send(self, sent: SentMessage, plan: tuple[AckEvent, ...]) -> None:
        if self.echo_own_sends:
            data = self._message_data(
                sent.channel,
                sent.recipient,
                sent.id,
                sent.text,
                from_me=True,
                push_name=self.push_name,
                status="SERVER_ACK",
            )
            await self.post_webhook(self.echo_event, sent.channel, data)
        for step in plan:
            await self._pause(step.delay)
            if self._closing.is_set():
                return
            await self._deliver_ack(sent.channel, sent.id, sent.recipient, str(step.ack))

    # --- the API ----------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/message/sendText/{instance}", self._send_text)
        app.router.add_post("/chat/sendPresence/{instance}", self._send_presence)
        app.router.add_get("/instance/connectionState/{instance}", self._connection_state)
        app.router.add_get("/instance/connect/{instance}", self._connect)

    def _default_error_body(self, http_status: int) -> Any:
        if http_status == 401:
            return _evolution_body(401, "Unauthorized")
        return _evolution_body(http_status, ["Error: Connection Closed"])

    async def _guard(
        self, request: web.Request
    ) -> tuple[RecordedRequest, str, web.Response | None]:
        """Record; then Evolution's guards: the api key (global or the instance's token), then
        the instance's existence."""
        recorded = await self._record(request)
        instance = request.match_info["instance"]
        key = recorded.headers.get("apikey")
        if key is None or key not in (self.api_key, self.instance_tokens.get(instance)):
            return (
                recorded,
                instance,
                web.json_response(_evolution_body(401, "Unauthorized"), status=401),
            )
        if instance not in self.instances:
            body = _evolution_body(404, [f'The "{instance}" instance does not exist'])
            return recorded, instance, web.json_response(body, status=404)
        return recorded, instance, None

    def _http_error_any(self, behaviour: GraphError | HttpError) -> web.Response:
        assert isinstance(behaviour, HttpError)  # script() refuses GraphError here
        return self._http_error(behaviour)

    async def _send_text(self, request: web.Request) -> web.StreamResponse:
        recorded, instance, refused = await self._guard(request)
        if refused is not None:
            return refused
        body = recorded.json
        if not isinstance(body, dict):
            return web.json_response(_evolution_body(400, ["body must be an object"]), status=400)
        for name in ("number", "text"):
            if not isinstance(body.get(name), str) or not body[name]:
                message = [f'instance requires property "{name}"']
                return web.json_response(_evolution_body(400, message), status=400)
        number: str = body["number"]
        text: str = body["text"]
        remote_jid = self.jid(number)
        wait = body.get("delay")
        if isinstance(wait, int | float) and wait > 0:
            await self._pause(min(wait / 1000, self.max_delay))  # "composing" first
        if self.instances[instance] != "open":
            body_closed = _evolution_body(self.closed_status, ["Error: Connection Closed"])
            return web.json_response(body_closed, status=self.closed_status)
        if normalize_number(remote_jid.split("@")[0]) in self.not_on_whatsapp:
            missing = [{"jid": remote_jid, "exists": False, "number": number}]
            return web.json_response(_evolution_body(400, missing), status=400)

        async def on_accept(behaviour: Accept, answered: bool) -> web.StreamResponse:
            sent = SentMessage(
                new_key_id(), instance, number, remote_jid, text, body, answered=answered
            )
            self.sent.append(sent)
            self._notify()
            plan = self._ack_plans.popleft() if self._ack_plans else self.default_acks
            if self.webhook_url is not None and (plan or self.echo_own_sends):
                self._spawn(self._after_send(sent, plan), f"acks-{sent.id}")
            response = self._message_data(
                instance,
                remote_jid,
                sent.id,
                text,
                from_me=True,
                push_name="",
                status="PENDING",
            )
            return web.json_response(response, status=201)

        return await self._perform(request, "send", on_accept, self._http_error_any)

    async def _send_presence(self, request: web.Request) -> web.StreamResponse:
        recorded, instance, refused = await self._guard(request)
        if refused is not None:
            return refused
        body = recorded.json if isinstance(recorded.json, dict) else {}
        if self.instances[instance] != "open":
            body_closed = _evolution_body(self.closed_status, ["Error: Connection Closed"])
            return web.json_response(body_closed, status=self.closed_status)
        self.presences.append({"instance": instance, **body})
        self._notify()
        return web.json_response({"presence": body.get("presence")}, status=201)

    async def _connection_state(self, request: web.Request) -> web.Response:
        _, instance, refused = await self._guard(request)
        if refused is not None:
            return refused
        return web.json_response(
            {"instance": {"instanceName": instance, "state": self.instances[instance]}}
        )

    async def _connect(self, request: web.Request) -> web.Response:
        """Open: the state. Otherwise a new QR (``code``, ``base64`` data URL, ``count``); a
        closed instance starts ``connecting``."""
        _, instance, refused = await self._guard(request)
        if refused is not None:
            return refused
        if self.instances[instance] == "open":
            return web.json_response({"instance": {"instanceName": instance, "state": "open"}})
        if self.instances[instance] == "close":
            self.set_instance_state(instance, "connecting")
        count = self.qr_count.get(instance, 0) + 1
        self.qr_count[instance] = count
        code = f"2@{base64.b64encode(f'{instance}:{count}:{time.time()}'.encode()).decode()}"
        png = base64.b64encode(tiny_png(code)).decode()
        return web.json_response(
            {
                "pairingCode": None,
                "code": code,
                "base64": f"data:image/png;base64,{png}",
                "count": count,
            }
        )

    # --- control API ------------------------------------------------------------------------

    def _add_control_routes(self, app: web.Application) -> None:
        app.router.add_put("/_fake/instances/{instance}", self._control_instance)
        app.router.add_post("/_fake/acks", self._control_acks)
        app.router.add_post("/_fake/ack", self._control_ack)
        app.router.add_post("/_fake/inbound", self._control_inbound)

    @_control
    async def _control_instance(self, request: web.Request) -> web.Response:
        """``{"state": "close", "status_reason"?: 401, "notify"?: true}``."""
        data = await self._control_json(request)
        instance = request.match_info["instance"]
        self.set_instance_state(
            instance,
            str(data["state"]),
            status_reason=data.get("status_reason"),
            notify=bool(data.get("notify", True)),
        )
        return web.json_response(
            {"instance": {"instanceName": instance, "state": self.instances[instance]}}
        )

    @_control
    async def _control_acks(self, request: web.Request) -> web.Response:
        """``{"plan": ["READ", "DELIVERY_ACK"]}``, ``{"plans": [...]}``, ``{"default": [...]}``."""
        data = await self._control_json(request)
        self.script_acks(*data.get("plans", [data["plan"]] if "plan" in data else []))
        if "default" in data:
            self.default_acks = tuple(_ack_event(a) for a in data["default"])
        return web.json_response({"pending": len(self._ack_plans)})

    @_control
    async def _control_ack(self, request: web.Request) -> web.Response:
        """``{"id": "<key id>", "status": "READ", "instance"?}``."""
        data = await self._control_json(request)
        delivery = await self.emit_ack(
            str(data["id"]), str(data["status"]), instance=data.get("instance")
        )
        return web.json_response(delivery.to_json())

    @_control
    async def _control_inbound(self, request: web.Request) -> web.Response:
        """``{"text": "Oi", "instance"?, "remote_jid"?, "push_name"?, "key_id"?}``."""
        data = await self._control_json(request)
        delivery = await self.send_inbound(data.pop("text"), **data)
        return web.json_response(delivery.to_json())


# --- process entry point ------------------------------------------------------------------------

FakeServer = FakeGraphServer | FakeWahaServer | FakeEvolutionServer
READY_PREFIX = "fake-whatsapp-{kind} listening on "


def _pairs(values: Sequence[str], default: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values:
        name, _, setting = value.partition("=")
        result[name] = setting or default
    return result


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.whatsapp",
        description="Fake WhatsApp provider servers (Meta Graph API, WAHA, Evolution API v2).",
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    graph = kinds.add_parser("graph", help="Meta's Cloud API")
    waha = kinds.add_parser("waha", help="WAHA / our QR service contract")
    evolution = kinds.add_parser("evolution", help="Evolution API v2")
    for sub in (graph, waha, evolution):
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
        sub.add_argument("--webhook-url", default=None)
        sub.add_argument("--hang-limit", type=float, default=30.0)
        sub.add_argument("--webhook-attempts", type=int, default=3)
    graph.add_argument("--token", default="fake-token", help="the accepted Bearer token")
    graph.add_argument("--app-secret", default=None, help="signs webhooks (X-Hub-Signature-256)")
    graph.add_argument(
        "--phone-number-id", action="append", default=[], help="accepted ids (default: any)"
    )
    graph.add_argument("--statuses", default="sent,delivered", help="default status plan")
    waha.add_argument("--api-key", default="waha-key")
    waha.add_argument(
        "--session", action="append", default=[], help="NAME[=STATUS] (default WORKING)"
    )
    waha.add_argument("--hmac-key", default=None, help="signs webhooks (X-Webhook-Hmac)")
    waha.add_argument("--acks", default="1,2", help="default ack plan")
    waha.add_argument("--echo-own-sends", action="store_true")
    waha.add_argument("--session-wait", type=float, default=0.0)
    evolution.add_argument("--api-key", default="evo-key")
    evolution.add_argument(
        "--instance", action="append", default=[], help="NAME[=STATE] (default open)"
    )
    evolution.add_argument("--webhook-header", action="append", default=[], help="NAME=VALUE")
    evolution.add_argument("--by-events", action="store_true")
    evolution.add_argument("--acks", default="SERVER_ACK,DELIVERY_ACK", help="default ack plan")
    evolution.add_argument("--echo-own-sends", action="store_true")
    args = parser.parse_args(argv)
    if args.port < 0 or args.port > 65535:
        parser.error("--port must be 0..65535")
    return args


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def build_server(args: argparse.Namespace) -> FakeServer:
    common: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "webhook_url": args.webhook_url,
        "hang_limit": args.hang_limit,
        "webhook_attempts": args.webhook_attempts,
    }
    if args.kind == "graph":
        return FakeGraphServer(
            access_token=args.token,
            app_secret=args.app_secret,
            phone_number_ids=args.phone_number_id or None,
            statuses=_split(args.statuses),
            **common,
        )
    if args.kind == "waha":
        return FakeWahaServer(
            api_key=args.api_key,
            sessions=_pairs(args.session, "WORKING") if args.session else None,
            webhook_secret=args.hmac_key,
            acks=[int(a) for a in _split(args.acks)],
            echo_own_sends=args.echo_own_sends,
            session_wait=args.session_wait,
            **common,
        )
    headers = _pairs(args.webhook_header, "")
    return FakeEvolutionServer(
        api_key=args.api_key,
        instances=_pairs(args.instance, "open") if args.instance else None,
        webhook_headers=headers,
        webhook_by_events=args.by_events,
        acks=_split(args.acks),
        echo_own_sends=args.echo_own_sends,
        **common,
    )


async def serve(args: argparse.Namespace) -> None:
    server = build_server(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with server:
            print(READY_PREFIX.format(kind=args.kind) + server.url, flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@contextmanager
def fake_whatsapp_process(
    kind: str, args: Sequence[str] = (), *, timeout: float = 15.0
) -> Iterator[str]:
    """Run ``python -m tests.fakes.whatsapp <kind> ...`` on a free port unless ``args`` has
    ``--port``; yields its root URL once it accepts connections; terminated on exit."""
    from tests.fakes.fixtures import fake_openai_process  # pytest-only import

    with fake_openai_process(
        [kind, *args],
        timeout=timeout,
        module="tests.fakes.whatsapp",
        ready_prefix=READY_PREFIX.format(kind=kind),
    ) as url:
        yield url


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
