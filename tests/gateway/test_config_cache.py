"""chat_pipeline.cache.TTLCache: configuration read per message, at most once per ttl."""

from __future__ import annotations

import asyncio

from chat_pipeline.cache import TTLCache


async def test_a_key_is_loaded_once_per_ttl_and_reloaded_after() -> None:
    loads: list[str] = []

    async def load(value: str) -> str:
        loads.append(value)
        return value

    cache: TTLCache[str, str] = TTLCache(ttl=0.2)
    assert await cache.get("bot", lambda: load("v1")) == "v1"
    assert await cache.get("bot", lambda: load("v2")) == "v1", "within the ttl: cached"
    assert await cache.get("other", lambda: load("o1")) == "o1"
    async with asyncio.timeout(5):
        while await cache.get("bot", lambda: load("v2")) != "v2":
            await asyncio.sleep(0.05)  # waiting for the ttl itself to pass
    assert loads == ["v1", "o1", "v2"]


async def test_a_missing_value_is_cached_too_and_the_size_is_bounded() -> None:
    calls = 0

    async def load() -> None:
        nonlocal calls
        calls += 1

    cache: TTLCache[int, None] = TTLCache(ttl=60, max_entries=3)
    for _ in range(2):
        assert await cache.get(1, load) is None
    assert calls == 1
    for key in range(2, 10):
        await cache.get(key, load)
    assert len(cache._entries) <= 3
