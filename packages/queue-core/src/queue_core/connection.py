"""Creating Redis clients the way queue-core expects them."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from queue_core.types import RedisClient

__all__ = ["connect", "is_cluster"]


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
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, **options
    )
    return Redis.from_pool(pool)


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)
