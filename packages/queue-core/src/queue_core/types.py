"""Type aliases and TypedDicts shared across modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

if TYPE_CHECKING:
    from queue_core.job import Job

__all__ = ["GroupInfo", "JobCounts", "Processor", "RedisClient", "as_str"]

RedisClient: TypeAlias = "Redis | RedisCluster"

Processor: TypeAlias = "Callable[[Job], Awaitable[Any]]"


class JobCounts(TypedDict):
    waiting: int
    prioritized: int
    delayed: int
    active: int
    completed: int
    failed: int
    waiting_children: int
    paused: bool
    groups: int
    grouped_waiting: int


class GroupInfo(TypedDict):
    waiting: int
    active: int
    paused: bool
    held_until: int
    concurrency: int
    rate_limit_max: int
    rate_limit_duration: int


def as_str(value: Any) -> str:
    """Decode a Redis reply item (bytes with our clients, str with decode_responses=True)."""
    return value.decode() if isinstance(value, bytes) else str(value)
