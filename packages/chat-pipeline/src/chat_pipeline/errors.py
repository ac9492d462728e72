"""Errors every service treats alike."""

from __future__ import annotations

from redis.exceptions import ClusterDownError, ReadOnlyError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

__all__ = ["DEPENDENCY_ERRORS"]

# A dependency that is down or overloaded (Redis restarting, a database failover, a pool
# exhausted). An HTTP client is told to retry (503 + Retry-After); work already stored is left
# to the reconciler.
DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    RedisClusterException,
    ClusterDownError,
    OperationalError,
    InterfaceError,
    SATimeoutError,
    ConnectionError,
    TimeoutError,
)
