"""`connect()`: what a service gets when it talks to Redis under load."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from queue_core import connect


async def test_a_burst_beyond_the_pool_waits_for_a_connection(redis_url: str) -> None:
    # redis-py's default pool raises "Too many connections" at its limit; a gateway under a
    # burst of requests must queue for a connection instead of answering 500
    client = connect(redis_url, max_connections=2, pool_timeout=10)
    try:
        async with asyncio.timeout(10):
            replies = await asyncio.gather(*(client.ping() for _ in range(50)))
        assert replies == [True] * 50
        assert len(client.connection_pool._in_use_connections) == 0
    finally:
        await client.aclose()


async def test_a_waiter_gives_up_after_the_pool_timeout(redis_url: str) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = connect(redis_url, max_connections=1, pool_timeout=0.2)
    try:
        blocker = asyncio.create_task(client.blpop(["test:never"], timeout=2))
        await asyncio.sleep(0)  # (the blocking read holds the only connection)
        async with asyncio.timeout(5):
            while not client.connection_pool._in_use_connections:
                await asyncio.sleep(0.01)
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await client.ping()
        blocker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await blocker
    finally:
        await client.aclose()
