"""Creating Redis clients the way queue-core expects them."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, cast
from urllib.parse import urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from queue_core.pipe import RedisPipe
from queue_core.types import RedisClient

__all__ = ["QueueCoreRedis", "WaitingConnectionPool", "connect", "is_cluster", "pipe_of"]


class QueueCoreRedis(Redis):
    """A redis-py client that also carries queue-core's pipelined connection for its scripts
    (see queue_core.pipe); closing the client closes both."""

    qc_pipe: RedisPipe | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self.qc_pipe is not None:
            await self.qc_pipe.aclose()
        await super().aclose(close_connection_pool)


def pipe_of(client: Any) -> RedisPipe | None:
    """The client's pipelined connection for queue-core's scripts, if it has one."""
    return getattr(client, "qc_pipe", None)


class WaitingConnectionPool(ConnectionPool):
    """redis-py's `ConnectionPool` that waits (up to `timeout` s) for a free connection when
    `max_connections` are in use, instead of failing with "Too many connections".

    redis-py's own `BlockingConnectionPool` does the same but takes a lock and a timer on every
    command, even with connections free: a third of a command's client time on a busy
    loopback. Here the waiting machinery is touched only when the pool is full."""

    def __init__(self, *args: Any, timeout: float = 20.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        deadline: float | None = None
        while True:
            if self.can_get_connection():
                try:
                    return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
                except RedisConnectionError as exc:
                    if "Too many connections" not in str(exc):
                        raise  # (another waiter took the last one between check and take)
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.timeout
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                async with asyncio.timeout_at(deadline):
                    await fut
            except TimeoutError:
                raise RedisConnectionError("No connection available.") from None
            finally:
                if not fut.done():
                    fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


def connect(url: str, *, cluster: bool | None = None, **kwargs: Any) -> RedisClient:
    """A client for `url` with bytes responses, TCP keepalive and a bounded socket timeout.

    `redis+cluster://host:port[,host:port...]` (or `cluster=True`) gives a `RedisCluster`.
    The socket timeout bounds ordinary commands only: blocking reads carry their own deadline.
    A burst of concurrent commands beyond ``max_connections`` (default 200) waits up to
    ``pool_timeout`` seconds for a free connection instead of failing at once, as redis-py's
    default pool would ("Too many connections" under load).
    """
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_keepalive": True,
        "socket_connect_timeout": 5.0,
        "socket_timeout": 30.0,
        "health_check_interval": 30,
        # A pooled connection that Redis closed while it sat idle (a restart, a failover)
        # fails its next command before anything is sent: that one is retried, once, on a
        # fresh connection. (Timeouts are not retried: the command may have run.)
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [RedisConnectionError],
    }
    options.update(kwargs)
    if url.startswith("redis+cluster://") or cluster:
        parts = urlsplit(url.replace("redis+cluster://", "redis://", 1))
        hosts = (parts.netloc.rsplit("@", 1)[-1]).split(",")
        nodes = []
        for hostport in hosts:
            host, _, port = hostport.partition(":")
            nodes.append(ClusterNode(host or "127.0.0.1", int(port or 6379)))
        options.pop("health_check_interval", None)
        return RedisCluster(startup_nodes=nodes, **options)
    max_connections = options.pop("max_connections", 200)
    pool_timeout = options.pop("pool_timeout", 20.0)
    pool = WaitingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, **options
    )
    client = cast(QueueCoreRedis, QueueCoreRedis.from_pool(pool))
    where = parse_url(url)
    if url.startswith("redis://") and "host" in where:
        client.qc_pipe = RedisPipe(
            where["host"],
            int(where.get("port") or 6379),
            db=int(where.get("db") or 0),
            username=where.get("username"),
            password=where.get("password"),
            connect_timeout=options["socket_connect_timeout"],
            command_timeout=options["socket_timeout"],
        )
    return client


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)
