"""Live WebSocket delivery against the real gateway app, a private Valkey and SQLite: a socket
that stops reading cannot stall other visitors, a lost pub/sub connection makes every socket
resync, shutdown says 1001 at once, and one client cannot hold unbounded sockets or flood acks."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType, WSServerHandshakeError
from aiohttp.test_utils import TestServer
from redis.exceptions import ConnectionError as RedisConnectionError

from chat_domain import (
    ConfigError,
    create_engine,
    create_session_factory,
    find_channel_by_widget_key,
)
from chat_pipeline import PipelineSettings
from chat_pipeline.live import visitor_channel
from devstack import RedisServer
from gateway.app import create_app
from gateway.keys import hub_key
from queue_core import connect
from queue_core.types import RedisClient

from .conftest import Bots, settings_for, visitor

FRAME_DEADLINE_S = 2.0


async def _until(predicate: Callable[[], Awaitable[object]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def _channel_id(db_url: str, key: str) -> str:
    engine = create_engine(db_url)
    try:
        async with create_session_factory(engine)() as session:
            channel = await find_channel_by_widget_key(session, key)
    finally:
        await engine.dispose()
    assert channel is not None
    return str(channel.id)


async def _subscribers(redis: RedisClient, channel: str) -> int:
    try:
        [(_, count)] = await redis.pubsub_numsub(channel)
    except RedisConnectionError:  # our own client, just after a server restart
        return 0
    return int(count)


@asynccontextmanager
async def _gateway(
    redis_url: str, db: str, secret: str, **overrides: Any
) -> AsyncIterator[TestServer]:
    server = TestServer(create_app(settings_for(redis_url, db, secret, **overrides)))
    await server.start_server()
    await _hub_ready(server)
    try:
        yield server
    finally:
        await server.close()


async def _hub_ready(server: TestServer) -> None:
    """Sockets that join before the hub's first subscription get a resync frame (they may
    have missed something): tests that count frames start after it."""
    hub = server.app[hub_key]

    async def ready() -> bool:
        return hub.ready

    await _until(ready, 5, "the live hub subscribed")


@pytest.fixture
async def pub(gateway_redis: RedisServer) -> AsyncIterator[RedisClient]:
    client = connect(gateway_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _raw_upgrade(host: str, port: int, path: str) -> socket.socket:
    """A WebSocket client that upgrades, then never reads: tiny receive buffer, frames pile up
    in the server's send buffer."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 5)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: not one byte of a frame is read
        byte = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
        assert byte, f"closed during the handshake: {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def _read_to_eof(sock: socket.socket, timeout: float) -> int:
    loop = asyncio.get_running_loop()
    total = 0
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 1 << 20):
            total += len(chunk)
    return total


@pytest.mark.parametrize(
    ("queue", "timeout", "reason"),
    [
        pytest.param(100_000, 1.0, "a send took over", id="send-timeout"),
        pytest.param(64, 30.0, "its send queue is full", id="queue-full"),
    ],
)
async def test_a_socket_that_stops_reading_does_not_stall_other_visitors(
    gateway_redis: RedisServer,
    gateway_db: str,
    secret_key: str,
    bots: Bots,
    pub: RedisClient,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    queue: int,
    timeout: float,
    reason: str,
) -> None:
    channel_id = await _channel_id(gateway_db, bots.plain)
    slow_channel = visitor_channel(channel_id, visitor("slow-reader"))
    fast_channel = visitor_channel(channel_id, visitor("fast-reader"))
    filler = orjson.dumps({"type": "typing", "on": True, "pad": "x" * 3000})
    async with _gateway(
        gateway_redis.url, gateway_db, secret_key, ws_send_queue=queue, ws_send_timeout_s=timeout
    ) as server:
        assert server.host is not None and server.port is not None
        base = f"/v1/widget/{bots.plain}/ws?visitor_id="
        slow = await _raw_upgrade(server.host, server.port, base + visitor("slow-reader"))
        try:
            fast = await http.ws_connect(server.make_url(base + visitor("fast-reader")))
            for name in (slow_channel, fast_channel):
                await _until(partial(_subscribers, pub, name), 5, f"{name} subscribed")
            # ~3 MB for the slow reader: more than the kernel buffers for it, so its sends
            # block (the old hub stopped here for everyone)
            pipe = pub.pipeline(transaction=False)
            for _ in range(1000):
                pipe.publish(slow_channel, filler)
            await pipe.execute()
            # Until it is dropped, the slow one keeps getting frames and the fast one must get
            # each of its frames promptly.
            served = 0
            deadline = time.monotonic() + 10
            while served < 5 or await _subscribers(pub, slow_channel):
                assert time.monotonic() < deadline, "the slow socket was never dropped"
                await pub.publish(slow_channel, filler)
                await pub.publish(fast_channel, orjson.dumps({"type": "typing", "i": served}))
                frame = await fast.receive_json(timeout=FRAME_DEADLINE_S)
                assert frame.get("i") == served, frame
                served += 1
            assert reason in caplog.text
            # aborted: whatever the kernel still held for it, then the end of the stream
            await _read_to_eof(slow, 10)
            await pub.publish(fast_channel, orjson.dumps({"type": "typing", "on": True}))
            assert (await fast.receive_json(timeout=FRAME_DEADLINE_S))["on"] is True
            await fast.close()
        finally:
            slow.close()


async def test_a_lost_pubsub_connection_makes_every_socket_resync(
    client: Any, bots: Bots, gateway_db: str, pub: RedisClient
) -> None:
    channel = visitor_channel(await _channel_id(gateway_db, bots.plain), visitor("resync-a"))
    await _hub_ready(client.server)
    ws = await client.ws_connect(f"/v1/widget/{bots.plain}/ws?visitor_id={visitor('resync-a')}")
    await _until(lambda: _subscribers(pub, channel), 5, "subscribed")
    killed = await pub.client_kill_filter(_type="pubsub")
    assert killed >= 1
    assert await ws.receive_json(timeout=5) == {"type": "resync"}
    # subscribed again: live frames flow on the same socket
    await _until(lambda: _subscribers(pub, channel), 5, "subscribed again")
    await pub.publish(channel, orjson.dumps({"type": "typing", "on": True}))
    assert await ws.receive_json(timeout=FRAME_DEADLINE_S) == {"type": "typing", "on": True}
    await ws.close()


async def test_a_redis_restart_makes_every_socket_resync(
    private_redis: Callable[..., RedisServer],
    gateway_db: str,
    secret_key: str,
    bots: Bots,
    http: aiohttp.ClientSession,
) -> None:
    server_redis = private_redis()
    pub = connect(server_redis.url)
    try:
        channel = visitor_channel(await _channel_id(gateway_db, bots.plain), visitor("resync-b"))
        async with _gateway(server_redis.url, gateway_db, secret_key) as server:
            url = server.make_url(f"/v1/widget/{bots.plain}/ws?visitor_id={visitor('resync-b')}")
            ws = await http.ws_connect(url)
            await _until(lambda: _subscribers(pub, channel), 5, "subscribed")
            await asyncio.to_thread(server_redis.restart, graceful=False, down_for=1.0)
            assert await ws.receive_json(timeout=10) == {"type": "resync"}
            await _until(lambda: _subscribers(pub, channel), 5, "subscribed again")
            await pub.publish(channel, orjson.dumps({"type": "typing", "on": True}))
            assert (await ws.receive_json(timeout=FRAME_DEADLINE_S))["on"] is True
            await ws.close()
    finally:
        await pub.aclose()


async def test_shutdown_closes_sockets_with_going_away_at_once(
    gateway_redis: RedisServer,
    gateway_db: str,
    secret_key: str,
    bots: Bots,
    pub: RedisClient,
    http: aiohttp.ClientSession,
) -> None:
    channel = visitor_channel(await _channel_id(gateway_db, bots.plain), visitor("leaving"))
    server = TestServer(create_app(settings_for(gateway_redis.url, gateway_db, secret_key)))
    await server.start_server()
    await _hub_ready(server)
    ws = await http.ws_connect(
        server.make_url(f"/v1/widget/{bots.plain}/ws?visitor_id={visitor('leaving')}")
    )
    await _until(lambda: _subscribers(pub, channel), 5, "subscribed")
    started = time.monotonic()
    await asyncio.wait_for(server.close(), 30)
    took = time.monotonic() - started
    message = await ws.receive(timeout=2)
    assert message.type == WSMsgType.CLOSE and message.data == 1001, message
    assert took < 2.0, f"shutdown took {took:.1f} s"


async def test_sockets_per_client_ip_are_limited(
    gateway_redis: RedisServer,
    gateway_db: str,
    secret_key: str,
    bots: Bots,
    http: aiohttp.ClientSession,
) -> None:
    async with _gateway(gateway_redis.url, gateway_db, secret_key, ws_max_per_ip=2) as server:
        path = f"/v1/widget/{bots.plain}/ws?visitor_id="
        first = await http.ws_connect(server.make_url(path + visitor("ip-1")))
        second = await http.ws_connect(server.make_url(path + visitor("ip-2")))
        with pytest.raises(WSServerHandshakeError) as refused:
            await http.ws_connect(server.make_url(path + visitor("ip-3")))
        assert refused.value.status == 429
        # refused before the upgrade, as a JSON error naming the field
        r = await http.get(server.make_url(path + visitor("ip-3")))
        assert r.status == 429
        error = (await r.json())["error"]
        assert error["field"] == "ip" and error["code"] == "too_many_sockets"
        # a closed socket frees its place
        await first.close()

        async def third_accepted() -> bool:
            try:
                third = await http.ws_connect(server.make_url(path + visitor("ip-3")))
            except WSServerHandshakeError:
                return False
            await third.close()
            return True

        await _until(third_accepted, 5, "a free socket place")
        await second.close()


async def test_a_socket_flooding_frames_is_closed_with_policy_violation(
    gateway_redis: RedisServer,
    gateway_db: str,
    secret_key: str,
    bots: Bots,
    http: aiohttp.ClientSession,
) -> None:
    async with _gateway(
        gateway_redis.url, gateway_db, secret_key, ws_frame_rate=1.0, ws_frame_burst=5
    ) as server:
        path = f"/v1/widget/{bots.plain}/ws?visitor_id="
        calm = await http.ws_connect(server.make_url(path + visitor("calm")))
        for _ in range(5):  # within the burst
            await calm.send_json({"type": "ack", "message_id": "not-a-uuid"})
        flood = await http.ws_connect(server.make_url(path + visitor("flood")))
        for _ in range(50):
            await flood.send_json({"type": "ack", "message_id": "not-a-uuid"})
        message = await flood.receive(timeout=5)
        assert message.type == WSMsgType.CLOSE and message.data == 1008, message
        # the calm socket is still open and usable
        await calm.ping()
        assert not calm.closed
        with pytest.raises(asyncio.TimeoutError):
            await calm.receive(timeout=0.3)
        await calm.close()


def test_socket_limits_are_read_from_the_environment() -> None:
    settings = PipelineSettings.from_env(
        {
            "WIDGET_WS_MAX_PER_IP": "3",
            "WIDGET_WS_FRAME_RATE": "2.5",
            "WIDGET_WS_FRAME_BURST": "7",
            "WIDGET_WS_SEND_QUEUE": "9",
            "WIDGET_WS_SEND_TIMEOUT_S": "0.5",
        }
    )
    assert (settings.ws_max_per_ip, settings.ws_frame_rate, settings.ws_frame_burst) == (3, 2.5, 7)
    assert (settings.ws_send_queue, settings.ws_send_timeout_s) == (9, 0.5)
    defaults = PipelineSettings.from_env({})
    assert (defaults.ws_max_per_ip, defaults.ws_send_queue, defaults.ws_send_timeout_s) == (
        20,
        256,
        5.0,
    )
    for name, bad in (("WIDGET_WS_MAX_PER_IP", "0"), ("WIDGET_WS_SEND_TIMEOUT_S", "soon")):
        with pytest.raises(ConfigError, match=name):
            PipelineSettings.from_env({name: bad})


async def test_an_unsigned_chatbot_refuses_a_made_up_visitor_id_on_the_socket(
    client: Any, bots: Bots
) -> None:
    """Without an identity secret the visitor id is the conversation's only credential: the
    socket takes the widget's random ids only, as the POST and GET do."""
    r = await client.get(f"/v1/widget/{bots.plain}/ws?visitor_id=customer-42")
    assert r.status == 400
    assert (await r.json())["error"]["field"] == "visitor_id"


async def test_closing_the_hub_ends_even_when_a_cancel_is_swallowed(
    gateway_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's asyncio.timeout can turn a cancel that lands as redis-py's read times out
    into a TimeoutError: the hub's loop took it for a Redis hiccup and went on, and the
    gateway's shutdown hung for good (seen as 60 s test teardowns). The read is made to
    swallow every cancel here; close must still end, promptly."""
    from redis.asyncio.client import PubSub

    from gateway.live_hub import LiveHub

    async def stubborn_get_message(self: Any, **kwargs: Any) -> None:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            return None  # the cancel is lost, as in the race
        return None

    monkeypatch.setattr(PubSub, "get_message", stubborn_get_message)
    redis = connect(gateway_redis.url)
    hub = LiveHub(redis, max_per_ip=5, send_queue=8, send_timeout=5.0)
    try:
        await hub.start()
        await _until(lambda: _true(hub._ready), 5, "the hub subscribed")
        async with asyncio.timeout(3):
            await hub.close()
    finally:
        await redis.aclose()


async def _true(value: object) -> bool:
    return bool(value)
