"""Shared fixtures: a real Redis for every test, isolated by a unique queue name per test.

Redis comes from REDIS_URL when set (CI points it at the machine's Redis 7); otherwise a private
valkey-server is started on a free port for this test session (and each xdist worker). Tests
that restart or kill a server always get a private one of their own.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis as sync_redis

from devstack import RedisServer
from queue_core import connect
from queue_core.types import RedisClient


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        try:
            sync_redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        except sync_redis.RedisError as exc:
            pytest.exit(f"REDIS_URL={url} is set but unreachable: {exc}", returncode=3)
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def queue_name(_test_cleanup: list[str]) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    _test_cleanup.append(name)
    return name


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Factory for servers owned by one test (restart/kill tests); all stopped at teardown."""
    servers: list[RedisServer] = []

    def make(*, persist: bool = False) -> RedisServer:
        server = RedisServer(data_dir=tmp_path_factory.mktemp("redis"), persist=persist)
        servers.append(server.start())
        return server

    yield make
    for server in servers:
        server.cleanup()


@pytest.fixture(autouse=True)
async def _test_cleanup(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[str]]:
    """Teardown for every test: close workers a failing test left running (bounded), then delete
    the keys of the test's queues (never anything else: the server may be shared)."""
    from queue_core import Worker

    started: list[Worker] = []
    names: list[str] = []
    original = Worker.start

    def tracking_start(self: Worker) -> None:
        started.append(self)
        original(self)

    monkeypatch.setattr(Worker, "start", tracking_start)
    yield names
    for worker in started:
        if worker.running:
            try:
                await asyncio.wait_for(worker.close(0.5), 15)
            except TimeoutError:
                pass
    if names:
        client = connect(redis_url)
        try:
            for name in names:
                for pattern in (f"qc:{{{name}*", f"test:{name}:*"):
                    async for key in client.scan_iter(match=pattern, count=1000):
                        await client.delete(key)
                # the queue registry (queue_core.registry) names them too
                members = [m async for m in client.sscan_iter("qc:queues") if name in str(m)]
                if members:
                    await client.srem("qc:queues", *members)
        finally:
            await client.aclose()
