"""The language-model client: chat completions against any OpenAI-compatible endpoint (OpenAI,
Azure OpenAI-compatible gateways, vLLM, Ollama, ...) through the official ``openai`` SDK, with
every failure classified as retryable or permanent.

One call of ``LLMClient.complete`` is one HTTP request: the SDK's own retries are off, because
the job queue retries with backoff (and honours ``RetryableLLMError.retry_after_s``).

Only ``ProviderConfig`` configures a call. The SDK's environment variables (``OPENAI_API_KEY``,
``OPENAI_BASE_URL``, ``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``, ``OPENAI_CUSTOM_HEADERS``) are
ignored on purpose: chatbots of different tenants call different providers, and the platform's
own organisation, project or headers must not reach a tenant's endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import openai
from openai import AsyncOpenAI, Omit
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from ai_worker.prompt import ChatMessage, estimate_prompt_tokens, estimate_tokens

if TYPE_CHECKING:
    import httpx2

log = logging.getLogger(__name__)

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
DEFAULT_TIMEOUT_S: Final = 30.0
DEFAULT_MAX_CONNECTIONS: Final = 32

MaxTokensParam = Literal["max_tokens", "max_completion_tokens"]

# Statuses worth another attempt later: timeouts, lock conflicts, "too early", rate limits and
# server errors (the same set the SDK itself would retry).
RETRYABLE_STATUSES: Final = frozenset({408, 409, 425, 429})
# A 429 with this error code is an exhausted billing quota, not a rate limit: retrying cannot
# help until someone pays.
PERMANENT_RATE_LIMIT_CODES: Final = frozenset({"insufficient_quota"})

_REDACTED: Final = "***"
# Header values and URL parts shorter than this ("1", "true") are not treated as secrets; the
# API key always is.
_MIN_SECRET_LENGTH: Final = 6
_MAX_DETAIL_CHARS: Final = 300
# The SDK refuses to build a client without a key; for keyless local servers it gets this
# placeholder, and every request removes the Authorization header again (``_request_headers``).
_NO_KEY_PLACEHOLDER: Final = "no-key"


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderConfig:
    """Where and how to call a model. ``api_key`` may be empty (local servers without
    authentication: no ``Authorization`` header is sent then). ``extra_headers`` are sent with
    every request (for example ``api-key`` for Azure-style gateways) and override the defaults,
    ``Authorization`` included. ``max_tokens_param`` names the length limit in the request:
    ``max_tokens`` is understood everywhere, OpenAI's reasoning models want
    ``max_completion_tokens``. ``repr()`` never shows the key or header values."""

    model: str
    base_url: str = DEFAULT_BASE_URL
    api_key: str = ""
    temperature: float = 0.3
    max_tokens: int = 512
    timeout_s: float = DEFAULT_TIMEOUT_S
    extra_headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    max_tokens_param: MaxTokensParam = "max_tokens"

    def __post_init__(self) -> None:
        base_url = self.base_url.strip().rstrip("/")
        if urlsplit(base_url).scheme not in ("http", "https") or not urlsplit(base_url).netloc:
            raise ValueError("base_url must be an http(s) URL")
        if not self.model.strip():
            raise ValueError("model must not be empty")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError("timeout_s must be a positive number of seconds")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be positive")
        if not 0 <= self.temperature <= 2:
            raise ValueError("temperature must be between 0 and 2")
        if self.max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise ValueError("max_tokens_param must be 'max_tokens' or 'max_completion_tokens'")
        for name, value in self.extra_headers.items():
            if any(c in f"{name}{value}" for c in "\r\n") or not name.strip():
                raise ValueError("extra_headers must be single-line names and values")
        object.__setattr__(self, "base_url", base_url)
        object.__setattr__(self, "model", self.model.strip())
        object.__setattr__(self, "api_key", self.api_key.strip())
        object.__setattr__(self, "extra_headers", MappingProxyType(dict(self.extra_headers)))

    def __repr__(self) -> str:
        return (
            f"ProviderConfig(model={self.model!r}, base_url={self.display_url!r}, "
            f"api_key={'<hidden>' if self.api_key else '<none>'}, "
            f"temperature={self.temperature!r}, max_tokens={self.max_tokens!r}, "
            f"timeout_s={self.timeout_s!r}, extra_headers={sorted(self.extra_headers)!r}, "
            f"max_tokens_param={self.max_tokens_param!r})"
        )

    @property
    def display_url(self) -> str:
        """``base_url`` without user info, query or fragment: safe for logs and errors."""
        parts = urlsplit(self.base_url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))

    def redact(self, text: str) -> str:
        """``text`` with the API key and secret-looking header values replaced by ``***``."""
        parts = urlsplit(self.base_url)
        maybe_secret = [
            *self.extra_headers.values(),
            parts.username or "",
            parts.password or "",
            *(value for _, value in parse_qsl(parts.query)),
        ]
        secrets = [s for s in maybe_secret if len(s) >= _MIN_SECRET_LENGTH]
        if self.api_key:
            secrets.append(self.api_key)
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, _REDACTED)
        return text


# --- results and errors -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    """A model's answer. ``usage_estimated`` is True when the token counts are estimates (the
    server sent no usage, or the answer is the offline responder's). ``text`` may be empty (for
    example ``finish_reason == "content_filter"``): the caller decides what to send then."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    finish_reason: str | None
    usage_estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class LLMError(Exception):
    """A failed model call. The message never contains the API key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RetryableLLMError(LLMError):
    """Worth another attempt later: rate limits (429), server errors (5xx), timeouts, connection
    failures. ``retry_after_s`` is the server's ``Retry-After`` in seconds when it sent one."""

    def __init__(
        self, message: str, retry_after_s: float | None = None, *, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status


class PermanentLLMError(LLMError):
    """Another attempt with the same input and configuration would fail the same way: other 4xx
    statuses (bad request, bad key, no access, unknown model) and malformed responses
    (``status`` is then the HTTP status of the unusable response, or None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LLMClientClosedError(RuntimeError):
    """The client (or its cache) was closed."""


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI's millisecond form) or ``Retry-After``
    (seconds or an HTTP-date; a date in the past gives 0). None when absent or unreadable.
    ``headers`` must be case-insensitive (``httpx2.Headers``) or use lower-case names."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT; RFC 850 forms may lack a zone
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# --- connections --------------------------------------------------------------------------------


def _ambient_header_names() -> list[str]:
    """Header names the SDK adds from ``OPENAI_CUSTOM_HEADERS`` (``Name: value`` lines)."""
    names = []
    for line in os.environ.get("OPENAI_CUSTOM_HEADERS", "").splitlines():
        name, colon, _ = line.partition(":")
        if colon and name.strip():
            names.append(name.strip())
    return names


class _Connection:
    """One SDK client, and so one HTTP connection pool, for one (base URL, API key)."""

    __slots__ = ("ambient_headers", "closed", "in_flight", "owns_http", "sdk")

    def __init__(
        self, config: ProviderConfig, http_client: httpx2.AsyncClient | None, *, owns_http: bool
    ) -> None:
        self.sdk = AsyncOpenAI(
            api_key=config.api_key or _NO_KEY_PLACEHOLDER,
            base_url=config.base_url,
            max_retries=0,
            timeout=config.timeout_s,
            http_client=http_client,
        )
        self.ambient_headers = _ambient_header_names()
        # Without an injected client the SDK built its own; a factory-made one is ours too.
        self.owns_http = owns_http
        self.in_flight = 0
        self.closed = False

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.owns_http:
            await self.sdk.close()


class _Pool:
    """Connections by (base URL, API key), least recently used evicted beyond ``max_size``.
    An evicted connection is closed once no call is using it (by the next call that ends, or
    by ``aclose``)."""

    def __init__(
        self,
        *,
        max_size: int,
        http_client: httpx2.AsyncClient | None = None,
        http_client_factory: Callable[[], httpx2.AsyncClient] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self._max_size = max_size
        self._http_client = http_client
        self._http_client_factory = http_client_factory
        self._connections: OrderedDict[tuple[str, str], _Connection] = OrderedDict()
        self._retired: list[_Connection] = []
        self.closed = False

    def __len__(self) -> int:
        return len(self._connections)

    def acquire(self, config: ProviderConfig) -> _Connection:
        """The connection for ``config``, counted as in use until ``release``."""
        if self.closed:
            raise LLMClientClosedError("the LLM client is closed")
        key = (config.base_url, config.api_key)
        connection = self._connections.get(key)
        if connection is None:
            if self._http_client is not None:  # injected: its owner closes it
                connection = _Connection(config, self._http_client, owns_http=False)
            elif self._http_client_factory is not None:
                connection = _Connection(config, self._http_client_factory(), owns_http=True)
            else:
                connection = _Connection(config, None, owns_http=True)
            self._connections[key] = connection
            while len(self._connections) > self._max_size:
                _, evicted = self._connections.popitem(last=False)
                self._retired.append(evicted)
        else:
            self._connections.move_to_end(key)
        connection.in_flight += 1
        return connection

    async def release(self, connection: _Connection) -> None:
        connection.in_flight -= 1
        idle = [c for c in self._retired if c.in_flight == 0]
        if idle:
            self._retired = [c for c in self._retired if c.in_flight > 0]
            for retired in idle:
                await retired.aclose()

    async def aclose(self) -> None:
        self.closed = True
        connections = [*self._connections.values(), *self._retired]
        self._connections.clear()
        self._retired.clear()
        for connection in connections:
            await connection.aclose()


# --- the client ---------------------------------------------------------------------------------


def _to_param(message: ChatMessage) -> ChatCompletionMessageParam:
    content = message["content"]
    if message["role"] == "system":
        return {"role": "system", "content": content}
    if message["role"] == "assistant":
        return {"role": "assistant", "content": content}
    return {"role": "user", "content": content}


class LLMClient:
    """Chat completions for one ``ProviderConfig``. Get one from ``create_llm_client`` (it owns
    its connection: close it with ``aclose``) or from ``LLMClientCache.get`` (the cache owns the
    connection; ``aclose`` on such a client does nothing)."""

    def __init__(self, config: ProviderConfig, pool: _Pool, *, owns_pool: bool) -> None:
        self._config = config
        self._pool = pool
        self._owns_pool = owns_pool

    @property
    def config(self) -> ProviderConfig:
        return self._config

    def __repr__(self) -> str:
        return f"LLMClient({self._config!r})"

    async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
        """One chat completion (one HTTP request). Raises ``RetryableLLMError`` or
        ``PermanentLLMError``; the whole call is bounded by ``config.timeout_s``."""
        if not messages:
            raise ValueError("messages must not be empty")
        connection = self._pool.acquire(self._config)
        started = time.monotonic()
        try:
            raw = await self._send(connection, [_to_param(m) for m in messages])
        finally:
            await self._pool.release(connection)
        completion = _parse_completion(raw, messages, self._config)
        log.debug(
            "llm: %s %s answered in %.2fs (%d+%d tokens, finish %s)",
            self._config.display_url,
            completion.model,
            time.monotonic() - started,
            completion.prompt_tokens,
            completion.completion_tokens,
            completion.finish_reason,
        )
        return completion

    async def _send(
        self, connection: _Connection, params: list[ChatCompletionMessageParam]
    ) -> object:
        config = self._config
        where = f"{config.display_url} (model {config.model})"
        try:
            async with asyncio.timeout(config.timeout_s):
                # The SDK's documented low-level call with the body as the API defines it:
                # `chat.completions.create` first runs a type-driven transform over its ~40
                # parameters, which was a fifth of this worker's CPU per answer.
                raw: object = await connection.sdk.post(
                    "/chat/completions",
                    cast_to=ChatCompletion,
                    body={
                        "model": config.model,
                        "messages": params,
                        "temperature": config.temperature,
                        config.max_tokens_param: config.max_tokens,
                    },
                    options={
                        "headers": self._request_headers(connection),
                        "timeout": config.timeout_s,
                        "security": {"bearer_auth": True},
                    },
                )
        except (TimeoutError, openai.APITimeoutError):
            raise RetryableLLMError(f"{where}: no response within {config.timeout_s:g}s") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            detail = f"{type(cause).__name__}: {cause}".rstrip(": ")
            raise RetryableLLMError(
                config.redact(f"{where}: connection failed ({detail})")
            ) from _safe_cause(exc, config)
        except openai.APIStatusError as exc:
            raise _status_error(exc, where, config) from _safe_cause(exc, config)
        except openai.OpenAIError as exc:  # response validation and other SDK-side failures
            raise PermanentLLMError(
                config.redact(f"{where}: unusable response ({type(exc).__name__}: {exc})")
            ) from _safe_cause(exc, config)
        except ValueError as exc:  # the SDK's JSON decoding of a broken body
            raise PermanentLLMError(
                f"{where}: malformed response body (not valid JSON: {type(exc).__name__})", 200
            ) from None
        return raw

    def _request_headers(self, connection: _Connection) -> dict[str, str | Omit]:
        """Headers of every request: the key (or none), no ambient organisation, project or
        custom headers from the environment, then the configured extra headers."""
        headers: dict[str, str | Omit] = dict.fromkeys(connection.ambient_headers, Omit())
        headers["OpenAI-Organization"] = Omit()
        headers["OpenAI-Project"] = Omit()
        api_key = self._config.api_key
        headers["Authorization"] = f"Bearer {api_key}" if api_key else Omit()
        # Case-insensitive override: drop defaults the configured headers replace.
        configured = {name.lower() for name in self._config.extra_headers}
        headers = {k: v for k, v in headers.items() if k.lower() not in configured}
        headers.update(self._config.extra_headers)
        return headers

    async def aclose(self) -> None:
        if self._owns_pool:
            await self._pool.aclose()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _safe_cause(exc: BaseException, config: ProviderConfig) -> BaseException | None:
    """``exc`` as the chained cause, unless its text (or its cause's) shows a secret."""
    for link in (exc, exc.__cause__):
        if link is not None and config.redact(str(link)) != str(link):
            return None
    return exc


def _status_error(exc: openai.APIStatusError, where: str, config: ProviderConfig) -> LLMError:
    status = exc.status_code
    code: object = None
    detail: object = exc.message
    if isinstance(exc.body, Mapping):
        error = exc.body.get("error", exc.body)
        if isinstance(error, Mapping):
            code = error.get("code")
            detail = error.get("message", detail)
        elif isinstance(error, str):
            detail = error
    text = " ".join(str(detail).split())[:_MAX_DETAIL_CHARS]
    request_id = exc.request_id
    message = config.redact(
        f"{where}: HTTP {status}: {text}" + (f" (request id {request_id})" if request_id else "")
    )
    if status == 429 and code in PERMANENT_RATE_LIMIT_CODES:
        return PermanentLLMError(message, status)
    if status in RETRYABLE_STATUSES or status >= 500:
        return RetryableLLMError(message, parse_retry_after(exc.response.headers), status=status)
    return PermanentLLMError(message, status)


def _parse_completion(
    raw: object, messages: Sequence[ChatMessage], config: ProviderConfig
) -> Completion:
    """A ``Completion`` from the SDK's result, which is lenient: it returns the body as text
    when it is not JSON, and models with missing fields when the JSON has the wrong shape."""
    where = f"{config.display_url} (model {config.model})"
    if not isinstance(raw, ChatCompletion):
        raise PermanentLLMError(f"{where}: malformed response (not a chat completion)", 200)
    choices: object = getattr(raw, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise PermanentLLMError(f"{where}: malformed response (no choices)", 200)
    message: object = getattr(choices[0], "message", None)
    content: object = getattr(message, "content", None)
    refusal: object = getattr(message, "refusal", None)
    if message is None or not isinstance(content, str | None):
        raise PermanentLLMError(f"{where}: malformed response (no message)", 200)
    text = (content if content is not None else refusal if isinstance(refusal, str) else "").strip()
    finish_reason: object = getattr(choices[0], "finish_reason", None)
    model: object = getattr(raw, "model", None)
    usage: object = getattr(raw, "usage", None)
    prompt_tokens: object = getattr(usage, "prompt_tokens", None)
    completion_tokens: object = getattr(usage, "completion_tokens", None)
    estimated = not (isinstance(prompt_tokens, int) and isinstance(completion_tokens, int))
    if not isinstance(prompt_tokens, int) or not isinstance(completion_tokens, int):
        prompt_tokens = estimate_prompt_tokens(messages)
        completion_tokens = estimate_tokens(text)
    return Completion(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        model=model if isinstance(model, str) and model else config.model,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        usage_estimated=estimated,
    )


def create_llm_client(
    config: ProviderConfig, *, http_client: httpx2.AsyncClient | None = None
) -> LLMClient:
    """A client that owns its connection. ``http_client`` (an ``httpx2.AsyncClient``, for
    example with a test transport, a proxy or custom TLS) is used as is and left open by
    ``aclose``; without one the SDK builds its default client, closed by ``aclose``."""
    return LLMClient(config, _Pool(max_size=1, http_client=http_client), owns_pool=True)


class LLMClientCache:
    """Clients by (base URL, API key), shared across jobs: clients for configs with the same
    endpoint and key share one connection pool, whatever their model or settings. At most
    ``max_size`` pools stay open (least recently used closed first, once idle).
    ``http_client_factory`` builds the HTTP client of each new pool (closed with it)."""

    def __init__(
        self,
        *,
        max_size: int = DEFAULT_MAX_CONNECTIONS,
        http_client_factory: Callable[[], httpx2.AsyncClient] | None = None,
    ) -> None:
        self._pool = _Pool(max_size=max_size, http_client_factory=http_client_factory)

    def get(self, config: ProviderConfig) -> LLMClient:
        """A client for ``config`` (cheap: the connection is looked up per call)."""
        if self._pool.closed:
            raise LLMClientClosedError("the LLM client cache is closed")
        return LLMClient(config, self._pool, owns_pool=False)

    def __len__(self) -> int:
        """Open connection pools."""
        return len(self._pool)

    @property
    def closed(self) -> bool:
        return self._pool.closed

    async def aclose(self) -> None:
        """Close every connection (idempotent); later calls raise ``LLMClientClosedError``."""
        await self._pool.aclose()

    async def __aenter__(self) -> LLMClientCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
