"""queue-core's pipelined connection (queue_core.pipe): many callers on one connection, each
with its own reply, whatever fails."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from devstack import RedisServer
from queue_core import connect
from queue_core.connection import pipe_of
from queue_core.pipe import RedisPipe


async def test_concurrent_callers_get_their_own_replies_over_one_connection(
    redis_url: str,
) -> None:
    client = connect(redis_url)
    pipe = pipe_of(client)
    assert pipe is not None
    try:
        replies = await asyncio.gather(*(pipe.execute("ECHO", f"r{i}") for i in range(500)))
        assert replies == [f"r{i}".encode() for i in range(500)]
        clients = [c for c in await client.client_list() if c.get("cmd") in ("echo",)]
        assert len(clients) == 1, "one connection carried them all"
    finally:
        await client.aclose()


async def test_a_cancelled_caller_leaves_the_stream_in_step(redis_url: str) -> None:
    client = connect(redis_url)
    pipe = pipe_of(client)
    assert pipe is not None
    try:
        slow = asyncio.create_task(pipe.execute("BLPOP", "test:pipe:nothing", "0.3"))
        await asyncio.sleep(0.05)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        # the BLPOP's reply arrives later and must not be handed to the next caller
        assert await pipe.execute("ECHO", "mine") == b"mine"
        assert await pipe.execute("ECHO", "mine too") == b"mine too"
    finally:
        await client.aclose()


async def test_error_replies_are_typed(redis_url: str) -> None:
    client = connect(redis_url)
    pipe = pipe_of(client)
    assert pipe is not None
    try:
        with pytest.raises(NoScriptError):
            await pipe.execute("EVALSHA", "0" * 40, 0)
        with pytest.raises(ResponseError, match="unknown command"):
            await pipe.execute("NOSUCHCOMMAND")
        assert await pipe.execute("PING") == b"PONG", "the connection is still usable"
    finally:
        await client.aclose()


async def test_the_database_of_the_url_is_used(redis_url: str) -> None:
    base = redis_url.rsplit("/", 1)[0]
    client = connect(f"{base}/3")
    pipe = pipe_of(client)
    assert pipe is not None
    try:
        await pipe.execute("SET", "test:pipe:db", "three")
        assert await client.get("test:pipe:db") == b"three"
        await client.delete("test:pipe:db")
    finally:
        await client.aclose()


async def test_a_restarted_server_fails_what_was_in_flight_then_reconnects(
    private_redis: Callable[..., RedisServer],
) -> None:
    server = private_redis()
    client = connect(server.url)
    pipe = pipe_of(client)
    assert pipe is not None
    try:
        assert await pipe.execute("PING") == b"PONG"
        in_flight = asyncio.create_task(pipe.execute("BLPOP", "test:pipe:none", "5"))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(server.restart, graceful=False, down_for=0.2)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(in_flight, 5)
        assert await pipe.execute("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_a_frozen_server_fails_calls_after_the_command_timeout(
    private_redis: Callable[..., RedisServer],
) -> None:
    """A server that accepts but never answers (stopped, a half-open connection): the pipe
    drops the connection after its timeout rather than waiting forever."""
    server = private_redis()
    host, port = server.url.split("//", 1)[1].split("/", 1)[0].split(":")
    pipe = RedisPipe(host, int(port), command_timeout=0.5)
    assert server.pid is not None
    try:
        assert await pipe.execute("PING") == b"PONG"
        os.kill(server.pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(pipe.execute("PING"), 5)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert time.monotonic() - started < 2.5
        assert await pipe.execute("PING") == b"PONG"
    finally:
        await pipe.aclose()
