"""A fake OpenAI-compatible chat completions server, for tests and local end-to-end runs.

Real HTTP on a loopback port, so any client (the official SDK on httpx or httpx2, curl, another
process) talks to it exactly as it would to a provider.

Endpoints (each with and without the ``/v1`` prefix, since a configured base URL may or may not
end in ``/v1``):

- ``POST /v1/chat/completions``: answers with the next scripted behaviour, else the default one;
- ``GET /v1/models``: one model;
- anything else: ``404`` with an OpenAI-shaped error body.

Every request to these is recorded (method, path, headers, body) for assertions. A small control
API under ``/_fake/`` (not recorded) lets a test in another process script the server:
``POST /_fake/script`` (a behaviour or a list of them as JSON), ``PUT /_fake/default``,
``GET /_fake/requests``, ``POST /_fake/reset``.

In-process use::

    async with FakeOpenAIServer() as server:
        server.script(status(429, retry_after=2), reply("hello"))
        ... point the client at server.base_url ...
        assert server.chat_requests[0].headers["authorization"] == "Bearer sk-test"

As a process (prints ``fake-openai listening on <base url>`` once it accepts connections)::

    python -m tests.fakes.openai_server --port 8011 --reply-mode fixed --fixed-text "Hi!"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from aiohttp import web

MalformedKind = Literal["not_json", "truncated_json", "no_choices", "empty_choices"]
MALFORMED_KINDS: tuple[MalformedKind, ...] = (
    "not_json",
    "truncated_json",
    "no_choices",
    "empty_choices",
)

# --- behaviours ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """``200`` with a chat completion whose text is ``text``. Usage counts are computed from the
    request (whitespace-separated words, at least 1) unless given; ``include_usage=False``
    leaves the ``usage`` object out, as some servers do."""

    text: str
    finish_reason: str = "stop"
    include_usage: bool = True
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Echo:
    """``200`` whose text is ``prefix`` + the content of the last user message, or with
    ``all_pending`` of every user message after the last assistant message, one per line (a
    reply that answers a coalesced burst then names each of its questions)."""

    prefix: str = ""
    all_pending: bool = False


@dataclass(frozen=True, slots=True)
class Status:
    """An error status with an OpenAI-shaped body; ``retry_after`` becomes the ``Retry-After``
    header (seconds, or a string such as an HTTP-date, sent as is)."""

    status: int
    retry_after: float | str | None = None
    message: str | None = None
    code: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Delay:
    """Wait ``seconds`` (cut short when the server stops), then answer with ``then``, or the
    default behaviour when ``then`` is None."""

    seconds: float
    then: Behaviour | None = None


@dataclass(frozen=True, slots=True)
class Malformed:
    """``200`` with a body no client can use: ``not_json`` (an HTML page), ``truncated_json``
    (JSON content type, cut-off body), ``no_choices`` (valid JSON without ``choices``),
    ``empty_choices`` (``choices: []``)."""

    kind: MalformedKind = "not_json"


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the connection without answering."""


Behaviour = Reply | Echo | Status | Delay | Malformed | Disconnect


def reply(text: str, **options: Any) -> Reply:
    return Reply(text, **options)


def echo(prefix: str = "") -> Echo:
    return Echo(prefix)


def status(
    code: int,
    *,
    retry_after: float | str | None = None,
    message: str | None = None,
    error_code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Status:
    return Status(code, retry_after, message, error_code, tuple((headers or {}).items()))


def delay(seconds: float, then: Behaviour | None = None) -> Delay:
    return Delay(seconds, then)


def malformed(kind: MalformedKind = "not_json") -> Malformed:
    if kind not in MALFORMED_KINDS:
        raise ValueError(f"unknown malformed kind {kind!r}; one of {MALFORMED_KINDS}")
    return Malformed(kind)


def disconnect() -> Disconnect:
    return Disconnect()


_KINDS: dict[str, type[Behaviour]] = {
    "reply": Reply,
    "echo": Echo,
    "status": Status,
    "delay": Delay,
    "malformed": Malformed,
    "disconnect": Disconnect,
}


def behaviour_to_json(behaviour: Behaviour) -> dict[str, Any]:
    """``{"kind": "reply", "text": ...}``: the control API's form of a behaviour."""
    kind = next(name for name, cls in _KINDS.items() if isinstance(behaviour, cls))
    data: dict[str, Any] = {"kind": kind}
    for f in dataclasses.fields(behaviour):
        value = getattr(behaviour, f.name)
        if isinstance(value, Reply | Echo | Status | Delay | Malformed | Disconnect):
            value = behaviour_to_json(value)
        elif f.name == "headers":
            value = dict(value)
        data[f.name] = value
    return data


def behaviour_from_json(data: Mapping[str, Any]) -> Behaviour:
    """The inverse of ``behaviour_to_json``; raises ValueError on unknown kinds or fields."""
    fields = dict(data)
    cls = _KINDS.get(str(fields.pop("kind", "")))
    if cls is None:
        raise ValueError(f"unknown behaviour kind in {dict(data)!r}; one of {sorted(_KINDS)}")
    if isinstance(fields.get("then"), Mapping):
        fields["then"] = behaviour_from_json(fields["then"])
    if isinstance(fields.get("headers"), Mapping):
        fields["headers"] = tuple(fields["headers"].items())
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ValueError(f"bad fields for {cls.__name__}: {exc}") from exc


# --- recorded requests --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the server saw it. ``headers`` has lower-case names (repeated headers are
    joined with ``", "``); ``json`` is the parsed body, or None when it is not JSON."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    json: Any
    peer: str | None = None  # client "host:port": the same value means the same connection
    received_at: float = field(default_factory=time.monotonic)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": dict(self.headers),
            "body": self.body.decode("utf-8", "replace"),
            "json": self.json,
            "peer": self.peer,
        }


# --- the server ---------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("invalid_request_error", "Incorrect API key provided."),
    403: ("invalid_request_error", "You are not allowed to sample from this model."),
    404: ("invalid_request_error", "The model does not exist or you do not have access to it."),
    408: ("server_error", "Request timed out."),
    409: ("invalid_request_error", "Conflict."),
    422: ("invalid_request_error", "Unprocessable entity."),
    429: ("rate_limit_error", "Rate limit reached for requests."),
    500: ("server_error", "The server had an error while processing your request."),
    502: ("server_error", "Bad gateway."),
    503: ("server_error", "The engine is currently overloaded, please try again later."),
}
_CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
_MODELS_PATHS = ("/v1/models", "/models")


def count_tokens(text: str) -> int:
    """The fake's token count: whitespace-separated words, at least 1 for non-empty text."""
    return len(text.split()) or (1 if text else 0)


def _content_text(content: Any) -> str:
    """The text of a message ``content``: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _error_body(status_code: int, message: str | None, code: str | None) -> dict[str, Any]:
    kind, default_message = _ERROR_TYPES.get(status_code, ("invalid_request_error", "Error."))
    return {
        "error": {
            "message": message or default_message,
            "type": kind,
            "param": None,
            "code": code,
        }
    }


class FakeOpenAIServer:
    """See the module docstring. Not thread-safe: use it from the event loop that started it."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default: Behaviour | None = None,
        model: str = "fake-model",
        api_key: str | None = None,
        control_api: bool = True,
    ) -> None:
        self.host = host
        self.model = model
        # When set, chat requests without ``Authorization: Bearer <api_key>`` get a 401.
        self.api_key = api_key
        self.default: Behaviour = default if default is not None else Echo()
        self.requests: list[RecordedRequest] = []
        self._requested_port = port
        self._control_api = control_api
        self._script: deque[Behaviour] = deque()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = asyncio.Event()
        self._request_seen = asyncio.Event()

    # --- control --------------------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next chat requests, one each, in order."""
        self._script.extend(behaviours)

    @property
    def pending(self) -> int:
        """Scripted behaviours not used yet."""
        return len(self._script)

    def reset(self) -> None:
        """Forget scripted behaviours and recorded requests (the default behaviour stays)."""
        self._script.clear()
        self.requests.clear()

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path in _CHAT_PATHS]

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests were recorded (AssertionError after
        ``timeout`` seconds); returns all recorded requests."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.requests) < count:
                    self._request_seen.clear()
                    await self._request_seen.wait()
        except TimeoutError:
            raise AssertionError(
                f"{len(self.requests)} of {count} requests arrived within {timeout}s"
            ) from None
        return list(self.requests)

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeOpenAIServer is not started")
        return self._port

    @property
    def url(self) -> str:
        """The root URL, e.g. ``http://127.0.0.1:54321`` (no ``/v1``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``: ``<url>/v1``."""
        return f"{self.url}/v1"

    def make_app(self) -> web.Application:
        app = web.Application()
        if self._control_api:
            app.router.add_post("/_fake/script", self._control_script)
            app.router.add_put("/_fake/default", self._control_default)
            app.router.add_get("/_fake/requests", self._control_requests)
            app.router.add_post("/_fake/reset", self._control_reset)
        for path in _CHAT_PATHS:
            app.router.add_post(path, self._chat)
        for path in _MODELS_PATHS:
            app.router.add_get(path, self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self) -> FakeOpenAIServer:
        if self._runner is not None:
            raise RuntimeError("FakeOpenAIServer is already started")
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
        return self

    async def stop(self) -> None:
        """Stop listening and end in-flight requests (delays are cut short). Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> FakeOpenAIServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- handlers -------------------------------------------------------------------------

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
        self._request_seen.set()
        return recorded

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        if self.api_key is not None and recorded.authorization != f"Bearer {self.api_key}":
            return web.json_response(_error_body(401, None, "invalid_api_key"), status=401)
        body = recorded.json
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("model"), str)
            or not isinstance(body.get("messages"), list)
            or not body["messages"]
        ):
            return web.json_response(
                _error_body(400, "'model' and a non-empty 'messages' list are required.", None),
                status=400,
            )
        if body.get("stream"):
            return web.json_response(
                _error_body(400, "The fake server does not stream.", None), status=400
            )
        behaviour = self._script.popleft() if self._script else self.default
        return await self._respond(request, behaviour, body)

    async def _respond(
        self, request: web.Request, behaviour: Behaviour, body: dict[str, Any]
    ) -> web.StreamResponse:
        if isinstance(behaviour, Delay):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), behaviour.seconds)
            then = behaviour.then
            if then is None:
                then = self.default
                if isinstance(then, Delay):  # a delayed default: do not wait twice
                    then = then.then if then.then is not None else Echo()
            return await self._respond(request, then, body)
        if isinstance(behaviour, Reply):
            return web.json_response(self._completion(behaviour, body))
        if isinstance(behaviour, Echo):
            messages = [m for m in body["messages"] if isinstance(m, dict)]
            users = [_content_text(m.get("content")) for m in messages if m.get("role") == "user"]
            if behaviour.all_pending:
                users = []
                for m in reversed(messages):
                    if m.get("role") == "assistant":
                        break
                    if m.get("role") == "user":
                        users.insert(0, _content_text(m.get("content")))
            text = behaviour.prefix + (
                "\n".join(users) if behaviour.all_pending else users[-1] if users else ""
            )
            return web.json_response(self._completion(Reply(text), body))
        if isinstance(behaviour, Status):
            headers = dict(behaviour.headers)
            if behaviour.retry_after is not None:
                value = behaviour.retry_after
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                headers["Retry-After"] = str(value)
            return web.json_response(
                _error_body(behaviour.status, behaviour.message, behaviour.code),
                status=behaviour.status,
                headers=headers,
            )
        if isinstance(behaviour, Malformed):
            return self._malformed(behaviour.kind, body)
        # Disconnect: drop the connection; the client sees it closed without a response.
        if request.transport is not None:
            request.transport.close()
        raise asyncio.CancelledError  # aiohttp ends the handler quietly for a closed peer

    def _completion(self, behaviour: Reply, body: dict[str, Any]) -> dict[str, Any]:
        prompt_tokens = behaviour.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = sum(
                count_tokens(_content_text(m.get("content")))
                for m in body["messages"]
                if isinstance(m, dict)
            )
        completion_tokens = behaviour.completion_tokens
        if completion_tokens is None:
            completion_tokens = count_tokens(behaviour.text)
        data: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": behaviour.model or str(body.get("model") or self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": behaviour.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": behaviour.finish_reason,
                }
            ],
            "system_fingerprint": None,
        }
        if behaviour.include_usage:
            data["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        return data

    def _malformed(self, kind: MalformedKind, body: dict[str, Any]) -> web.Response:
        if kind == "not_json":
            return web.Response(
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        if kind == "truncated_json":
            return web.Response(
                text='{"id": "chatcmpl-broken", "object": "chat.completion", "choi',
                content_type="application/json",
            )
        data = self._completion(Reply("unused"), body)
        if kind == "no_choices":
            del data["choices"]
        else:
            data["choices"] = []
        return web.json_response(data)

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}],
            }
        )

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            _error_body(404, f"Unknown path {request.method} {request.path}.", "unknown_url"),
            status=404,
        )

    # --- control API ----------------------------------------------------------------------

    async def _control_script(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            items: Sequence[Any] = data if isinstance(data, list) else [data]
            behaviours = [behaviour_from_json(item) for item in items]
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.script(*behaviours)
        return web.json_response({"pending": self.pending})

    async def _control_default(self, request: web.Request) -> web.Response:
        try:
            self.default = behaviour_from_json(await request.json())
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"default": behaviour_to_json(self.default)})

    async def _control_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": [r.to_json() for r in self.requests]})

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"pending": 0})


# --- process entry point ------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.openai_server",
        description="Fake OpenAI-compatible chat completions server (tests, local runs).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--reply-mode", choices=("echo", "echo-all", "fixed"), default="echo")
    parser.add_argument("--fixed-text", default="This is a reply from the fake model.")
    parser.add_argument("--echo-prefix", default="", help="prepended to echoed text")
    parser.add_argument(
        "--fail-status", type=int, default=None, help="answer every chat request with this status"
    )
    parser.add_argument(
        "--retry-after", type=float, default=None, help="Retry-After with --fail-status"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (else 401)"
    )
    args = parser.parse_args(argv)
    if args.port < 0 or args.port > 65535:
        parser.error("--port must be 0..65535")
    return args


def default_behaviour(args: argparse.Namespace) -> Behaviour:
    behaviour: Behaviour
    if args.fail_status is not None:
        behaviour = Status(args.fail_status, retry_after=args.retry_after)
    elif args.reply_mode == "fixed":
        behaviour = Reply(args.fixed_text)
    else:
        behaviour = Echo(args.echo_prefix, all_pending=args.reply_mode == "echo-all")
    if args.latency > 0:
        behaviour = Delay(args.latency, behaviour)
    return behaviour


async def serve(args: argparse.Namespace) -> None:
    server = FakeOpenAIServer(
        host=args.host,
        port=args.port,
        default=default_behaviour(args),
        model=args.model,
        api_key=args.api_key,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with server:
            print(f"fake-openai listening on {server.base_url}", flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
