"""LLMClient against the fake OpenAI server: real HTTP on loopback, the real SDK, no mocks."""

from __future__ import annotations

import asyncio
import socket
import time
import traceback
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx2
import pytest

from ai_worker import (
    ChatMessage,
    LLMClientClosedError,
    LLMError,
    PermanentLLMError,
    ProviderConfig,
    RetryableLLMError,
    create_llm_client,
    estimate_prompt_tokens,
    parse_retry_after,
)
from tests.ai_worker.helpers import config
from tests.fakes.openai_server import (
    Behaviour,
    FakeOpenAIServer,
    delay,
    disconnect,
    malformed,
    reply,
    status,
)

KEY = "sk-test-key-0123456789"
QUESTION: list[ChatMessage] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What are your opening hours?"},
]


async def complete_error(
    server: FakeOpenAIServer, behaviour: Behaviour, **options: object
) -> LLMError:
    server.script(behaviour)
    async with create_llm_client(config(server, **options)) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(QUESTION)
    return info.value


# --- success ------------------------------------------------------------------------------------


async def test_success_reads_text_and_usage(fake_openai: FakeOpenAIServer) -> None:
    fake_openai.script(reply("We open at 9.", prompt_tokens=21, completion_tokens=5, model="m-2"))
    async with create_llm_client(config(fake_openai, temperature=0.7, max_tokens=99)) as client:
        completion = await client.complete(QUESTION)

    assert completion.text == "We open at 9."
    assert (completion.prompt_tokens, completion.completion_tokens) == (21, 5)
    assert completion.total_tokens == 26
    assert completion.model == "m-2"
    assert completion.finish_reason == "stop"
    assert completion.usage_estimated is False
    body = fake_openai.chat_requests[0].json
    assert body["model"] == "test-model"
    assert body["messages"] == QUESTION
    assert body["temperature"] == 0.7
    assert body["max_tokens"] == 99
    assert "max_completion_tokens" not in body
    assert body.get("stream") in (None, False)


async def test_missing_usage_is_estimated(fake_openai: FakeOpenAIServer) -> None:
    fake_openai.script(reply("Nine to five.", include_usage=False, finish_reason="length"))
    async with create_llm_client(config(fake_openai)) as client:
        completion = await client.complete(QUESTION)

    assert completion.usage_estimated is True
    assert completion.prompt_tokens == estimate_prompt_tokens(QUESTION)
    assert completion.completion_tokens > 0
    assert completion.finish_reason == "length"


async def test_max_completion_tokens_parameter(fake_openai: FakeOpenAIServer) -> None:
    cfg = config(fake_openai, max_tokens=64, max_tokens_param="max_completion_tokens")
    async with create_llm_client(cfg) as client:
        await client.complete(QUESTION)

    body = fake_openai.chat_requests[0].json
    assert body["max_completion_tokens"] == 64
    assert "max_tokens" not in body


# --- headers and URLs ---------------------------------------------------------------------------


async def test_authorization_carries_the_key(fake_openai: FakeOpenAIServer) -> None:
    fake_openai.api_key = KEY  # the fake answers 401 to anything else
    async with create_llm_client(config(fake_openai, api_key=KEY)) as client:
        completion = await client.complete(QUESTION)

    assert completion.text == "What are your opening hours?"  # echoed
    request = fake_openai.chat_requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.authorization == f"Bearer {KEY}"
    assert request.headers["x-stainless-retry-count"] == "0"


@pytest.mark.parametrize(
    ("suffix", "expected_path"),
    [("/v1", "/v1/chat/completions"), ("/v1/", "/v1/chat/completions"), ("", "/chat/completions")],
)
async def test_base_url_with_or_without_v1(
    fake_openai: FakeOpenAIServer, suffix: str, expected_path: str
) -> None:
    cfg = ProviderConfig(model="m", base_url=fake_openai.url + suffix, api_key=KEY)
    async with create_llm_client(cfg) as client:
        assert (await client.complete(QUESTION)).text == "What are your opening hours?"

    assert [r.path for r in fake_openai.requests] == [expected_path]


async def test_wrong_base_path_is_permanent_404(fake_openai: FakeOpenAIServer) -> None:
    cfg = ProviderConfig(model="m", base_url=fake_openai.url + "/api/v9", api_key=KEY)
    async with create_llm_client(cfg) as client:
        with pytest.raises(PermanentLLMError) as info:
            await client.complete(QUESTION)

    assert info.value.status == 404
    assert [r.path for r in fake_openai.requests] == ["/api/v9/chat/completions"]


async def test_empty_key_sends_no_authorization(fake_openai: FakeOpenAIServer) -> None:
    cfg = ProviderConfig(model="llama3", base_url=fake_openai.base_url)
    async with create_llm_client(cfg) as client:
        await client.complete(QUESTION)

    assert "authorization" not in fake_openai.chat_requests[0].headers


async def test_extra_headers_are_sent_and_override(fake_openai: FakeOpenAIServer) -> None:
    cfg = config(
        fake_openai,
        api_key="",
        extra_headers={"api-key": "azure-style-secret", "authorization": "Token abc"},
    )
    async with create_llm_client(cfg) as client:
        await client.complete(QUESTION)

    headers = fake_openai.chat_requests[0].headers
    assert headers["api-key"] == "azure-style-secret"
    assert headers["authorization"] == "Token abc"


async def test_sdk_environment_does_not_leak(
    fake_openai: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The platform's OPENAI_* settings must not reach a tenant's endpoint."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-platform-key")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-platform")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-platform")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "X-Platform: yes\nAuthorization: Bearer ambient")
    async with create_llm_client(config(fake_openai, api_key="")) as keyless:
        await keyless.complete(QUESTION)
    async with create_llm_client(config(fake_openai, api_key=KEY)) as keyed:
        await keyed.complete(QUESTION)

    first, second = fake_openai.chat_requests
    for request in (first, second):
        for name in ("openai-organization", "openai-project", "x-platform"):
            assert name not in request.headers
    assert "authorization" not in first.headers
    assert second.authorization == f"Bearer {KEY}"


async def test_injected_http_client_is_used_and_left_open(fake_openai: FakeOpenAIServer) -> None:
    seen: list[str] = []

    async def on_request(request: httpx2.Request) -> None:
        seen.append(str(request.url))

    http = httpx2.AsyncClient(event_hooks={"request": [on_request]})
    try:
        async with create_llm_client(config(fake_openai), http_client=http) as client:
            await client.complete(QUESTION)
        assert seen == [f"{fake_openai.base_url}/chat/completions"]
        assert not http.is_closed
    finally:
        await http.aclose()


async def test_closed_client_refuses_calls(fake_openai: FakeOpenAIServer) -> None:
    client = create_llm_client(config(fake_openai))
    await client.aclose()
    with pytest.raises(LLMClientClosedError):
        await client.complete(QUESTION)
    assert fake_openai.requests == []


# --- error classification -----------------------------------------------------------------------


async def test_429_with_retry_after_seconds(fake_openai: FakeOpenAIServer) -> None:
    error = await complete_error(fake_openai, status(429, retry_after=2))
    assert isinstance(error, RetryableLLMError)
    assert error.retry_after_s == 2.0
    assert error.status == 429
    assert "429" in str(error)


async def test_429_with_retry_after_http_date(fake_openai: FakeOpenAIServer) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    error = await complete_error(fake_openai, status(429, retry_after=format_datetime(when, True)))
    assert isinstance(error, RetryableLLMError)
    assert error.retry_after_s is not None
    assert 25 <= error.retry_after_s <= 30


async def test_retry_after_ms_is_preferred(fake_openai: FakeOpenAIServer) -> None:
    behaviour = status(429, retry_after=20, headers={"retry-after-ms": "1500"})
    error = await complete_error(fake_openai, behaviour)
    assert isinstance(error, RetryableLLMError)
    assert error.retry_after_s == 1.5


async def test_429_without_retry_after(fake_openai: FakeOpenAIServer) -> None:
    error = await complete_error(fake_openai, status(429))
    assert isinstance(error, RetryableLLMError)
    assert error.retry_after_s is None


async def test_exhausted_quota_is_permanent(fake_openai: FakeOpenAIServer) -> None:
    behaviour = status(
        429, message="You exceeded your current quota.", error_code="insufficient_quota"
    )
    error = await complete_error(fake_openai, behaviour)
    assert isinstance(error, PermanentLLMError)
    assert error.status == 429
    assert "exceeded your current quota" in str(error)


@pytest.mark.parametrize("code", [500, 502, 503, 504, 408, 409])
async def test_server_errors_are_retryable(fake_openai: FakeOpenAIServer, code: int) -> None:
    error = await complete_error(fake_openai, status(code))
    assert isinstance(error, RetryableLLMError)
    assert error.status == code


async def test_503_with_retry_after(fake_openai: FakeOpenAIServer) -> None:
    error = await complete_error(fake_openai, status(503, retry_after=7))
    assert isinstance(error, RetryableLLMError)
    assert error.retry_after_s == 7


@pytest.mark.parametrize("code", [400, 401, 403, 404, 422])
async def test_client_errors_are_permanent(fake_openai: FakeOpenAIServer, code: int) -> None:
    error = await complete_error(fake_openai, status(code, message=f"problem {code}"))
    assert isinstance(error, PermanentLLMError)
    assert error.status == code
    assert f"HTTP {code}: problem {code}" in str(error)


@pytest.mark.parametrize("kind", ["not_json", "truncated_json", "no_choices", "empty_choices"])
async def test_malformed_body_is_permanent(fake_openai: FakeOpenAIServer, kind: str) -> None:
    error = await complete_error(fake_openai, malformed(kind))  # type: ignore[arg-type]
    assert isinstance(error, PermanentLLMError)
    assert "malformed" in str(error)


async def test_timeout_is_retryable_within_configured_time(fake_openai: FakeOpenAIServer) -> None:
    started = time.monotonic()
    error = await complete_error(fake_openai, delay(10), timeout_s=0.3)
    elapsed = time.monotonic() - started
    assert isinstance(error, RetryableLLMError)
    assert "0.3s" in str(error)
    assert 0.25 <= elapsed < 1.5
    assert len(fake_openai.chat_requests) == 1


async def test_dropped_connection_is_retryable(fake_openai: FakeOpenAIServer) -> None:
    error = await complete_error(fake_openai, disconnect())
    assert isinstance(error, RetryableLLMError)
    assert "connection failed" in str(error)


async def test_refused_connection_is_retryable() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = ProviderConfig(model="m", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=5)
    async with create_llm_client(cfg) as client:
        with pytest.raises(RetryableLLMError, match="connection failed"):
            await client.complete(QUESTION)


@pytest.mark.parametrize(
    "behaviour",
    [status(500), status(429), status(503, retry_after=0), status(408), disconnect(), delay(3)],
    ids=["500", "429", "503", "408", "disconnect", "timeout"],
)
async def test_one_http_call_per_complete(
    fake_openai: FakeOpenAIServer, behaviour: Behaviour
) -> None:
    """The SDK would retry all of these itself; with retries off each call is one request."""
    fake_openai.script(behaviour)
    async with create_llm_client(config(fake_openai, timeout_s=0.5)) as client:
        with pytest.raises(RetryableLLMError):
            await client.complete(QUESTION)
        await asyncio.sleep(0.1)  # a hidden retry would have been sent by now
        assert len(fake_openai.chat_requests) == 1
        assert (await client.complete(QUESTION)).text  # the default echo
    assert len(fake_openai.chat_requests) == 2
    assert [r.headers["x-stainless-retry-count"] for r in fake_openai.chat_requests] == ["0", "0"]


async def test_errors_never_show_the_key(fake_openai: FakeOpenAIServer) -> None:
    """Some gateways echo the key they were given; it is redacted wherever a log could show it."""
    secret_header = "hdr-secret-987654"
    behaviours = [
        status(401, message=f"Incorrect API key provided: {KEY}."),
        status(500, message=f"upstream rejected Bearer {KEY} / {secret_header}"),
        status(429, message=f"key {KEY} is rate limited"),
    ]
    cfg = config(fake_openai, api_key=KEY, extra_headers={"x-gateway-key": secret_header})
    async with create_llm_client(cfg) as client:
        for behaviour in behaviours:
            fake_openai.script(behaviour)
            with pytest.raises(LLMError) as info:
                await client.complete(QUESTION)
            rendered = "".join(traceback.format_exception(info.value))
            for text in (str(info.value), repr(info.value), repr(info.value.args), rendered):
                assert KEY not in text
                assert secret_header not in text
            assert "***" in str(info.value)
    assert KEY not in repr(cfg)
    assert secret_header not in repr(cfg)
    assert "x-gateway-key" in repr(cfg)


# --- parse_retry_after --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "bad", "retry-after": "3"}, 3.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # in the past
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, tzinfo=UTC)
    assert parse_retry_after(headers, now=now) == expected


# --- configuration ------------------------------------------------------------------------------


def test_config_normalises_and_hides_the_key() -> None:
    cfg = ProviderConfig(
        model=" gpt-4o-mini ",
        base_url="https://user:pw-secret@gateway.example/v1/?key=q-secret-1 ",
        api_key=" sk-abcdefgh\n",
    )
    assert cfg.model == "gpt-4o-mini"
    assert cfg.api_key == "sk-abcdefgh"
    assert cfg.display_url == "https://gateway.example/v1"
    shown = repr(cfg)
    for secret in ("sk-abcdefgh", "pw-secret", "q-secret-1"):
        assert secret not in shown
        assert secret not in cfg.redact(f"failed with {secret}")
    assert ProviderConfig(model="m").base_url == "https://api.openai.com/v1"
    assert ProviderConfig(model="m") == ProviderConfig(model="m")
    assert hash(ProviderConfig(model="m")) == hash(ProviderConfig(model="m"))


@pytest.mark.parametrize(
    "options",
    [
        {"model": ""},
        {"model": "m", "base_url": "ftp://x"},
        {"model": "m", "base_url": "not a url"},
        {"model": "m", "timeout_s": 0},
        {"model": "m", "max_tokens": 0},
        {"model": "m", "temperature": 2.5},
        {"model": "m", "extra_headers": {"x": "a\r\nb"}},
    ],
)
def test_config_rejects_bad_values(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ProviderConfig(**options)  # type: ignore[arg-type]
