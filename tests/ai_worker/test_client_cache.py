"""LLMClientCache: one connection pool per (base URL, API key), shared, bounded, closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx2
import pytest

from ai_worker import ChatMessage, LLMClientCache, LLMClientClosedError
from tests.ai_worker.helpers import config
from tests.fakes.openai_server import FakeOpenAIServer, delay

HELLO: list[ChatMessage] = [{"role": "user", "content": "hello"}]


class TrackingFactory:
    """An ``http_client_factory`` that remembers the clients it made."""

    def __init__(self) -> None:
        self.made: list[httpx2.AsyncClient] = []

    def __call__(self) -> httpx2.AsyncClient:
        client = httpx2.AsyncClient()
        self.made.append(client)
        return client


@pytest.fixture
async def factory() -> AsyncIterator[TrackingFactory]:
    tracking = TrackingFactory()
    yield tracking
    for client in tracking.made:  # whatever a failing test left open
        await client.aclose()


async def test_same_endpoint_and_key_share_one_pool(
    fake_openai: FakeOpenAIServer, factory: TrackingFactory
) -> None:
    async with LLMClientCache(http_client_factory=factory) as cache:
        first = cache.get(config(fake_openai, model="small", temperature=0.1))
        second = cache.get(config(fake_openai, model="large", max_tokens=50))
        await first.complete(HELLO)
        await second.complete(HELLO)
        await first.complete(HELLO)
        assert len(cache) == 1
        assert len(factory.made) == 1

    requests = fake_openai.chat_requests
    assert [r.json["model"] for r in requests] == ["small", "large", "small"]
    assert requests[1].json["max_tokens"] == 50
    assert len({r.peer for r in requests}) == 1  # one kept-alive TCP connection


async def test_different_keys_get_different_pools(
    fake_openai: FakeOpenAIServer, factory: TrackingFactory
) -> None:
    async with LLMClientCache(http_client_factory=factory) as cache:
        await cache.get(config(fake_openai, api_key="sk-tenant-a-000")).complete(HELLO)
        await cache.get(config(fake_openai, api_key="sk-tenant-b-000")).complete(HELLO)
        await cache.get(config(fake_openai, api_key="sk-tenant-a-000")).complete(HELLO)
        assert len(cache) == 2

    a1, b, a2 = fake_openai.chat_requests
    assert a1.authorization == a2.authorization == "Bearer sk-tenant-a-000"
    assert b.authorization == "Bearer sk-tenant-b-000"
    assert a1.peer == a2.peer != b.peer


async def test_aclose_closes_every_pool_and_refuses_later_calls(
    fake_openai: FakeOpenAIServer, factory: TrackingFactory
) -> None:
    cache = LLMClientCache(http_client_factory=factory)
    client = cache.get(config(fake_openai, api_key="sk-tenant-a-000"))
    await client.complete(HELLO)
    await cache.get(config(fake_openai, api_key="sk-tenant-b-000")).complete(HELLO)
    await client.aclose()  # a cache's client does not close the shared pool
    await client.complete(HELLO)
    assert not any(c.is_closed for c in factory.made)

    await cache.aclose()
    await cache.aclose()  # idempotent

    assert cache.closed
    assert len(factory.made) == 2
    assert all(c.is_closed for c in factory.made)
    with pytest.raises(LLMClientClosedError):
        await client.complete(HELLO)
    with pytest.raises(LLMClientClosedError):
        cache.get(config(fake_openai))
    assert len(fake_openai.chat_requests) == 3


async def test_least_recently_used_pool_is_closed_beyond_max_size(
    fake_openai: FakeOpenAIServer, factory: TrackingFactory
) -> None:
    async with LLMClientCache(max_size=2, http_client_factory=factory) as cache:
        for key in ("sk-tenant-a-000", "sk-tenant-b-000", "sk-tenant-a-000", "sk-tenant-c-000"):
            await cache.get(config(fake_openai, api_key=key)).complete(HELLO)
        a, b, c = factory.made
        assert len(cache) == 2
        assert b.is_closed  # least recently used
        assert not a.is_closed and not c.is_closed
        # b comes back with a new pool
        await cache.get(config(fake_openai, api_key="sk-tenant-b-000")).complete(HELLO)
        assert len(factory.made) == 4
        assert a.is_closed


async def test_evicted_pool_in_use_closes_after_its_call(
    fake_openai: FakeOpenAIServer, factory: TrackingFactory
) -> None:
    async with LLMClientCache(max_size=1, http_client_factory=factory) as cache:
        fake_openai.script(delay(0.5))  # tenant a's call is still running when b evicts it
        slow = asyncio.create_task(
            cache.get(config(fake_openai, api_key="sk-tenant-a-000")).complete(HELLO)
        )
        await fake_openai.wait_for_requests(1)
        await cache.get(config(fake_openai, api_key="sk-tenant-b-000")).complete(HELLO)
        a, b = factory.made
        closed_while_busy = a.is_closed

        completion = await asyncio.wait_for(slow, 5)

        assert not closed_while_busy
        assert completion.text == "hello"
        assert a.is_closed
        assert not b.is_closed
