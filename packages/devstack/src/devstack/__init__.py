"""Local development helpers: embedded Redis-compatible servers and the one-command platform."""

from devstack.redis_server import (
    RedisCluster,
    RedisServer,
    ServerError,
    find_server_binary,
    free_port,
)

__all__ = ["RedisCluster", "RedisServer", "ServerError", "find_server_binary", "free_port"]
