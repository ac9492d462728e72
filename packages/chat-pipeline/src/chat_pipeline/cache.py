"""A small per-process cache for configuration read on every message (chatbots, channels,
widget keys): each key is read from the database at most once per ``ttl`` seconds, so a change
an admin makes takes effect everywhere within ``ttl``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["CONFIG_TTL_S", "TTLCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CONFIG_TTL_S = 5.0


class TTLCache(Generic[K, V]):
    def __init__(self, ttl: float = CONFIG_TTL_S, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, V]] = {}

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The cached value of ``key``, or ``await load()`` when it is missing or expired."""
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] >= now:
            return hit[1]
        value = await load()
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # crude but bounded; entries are cheap to reload
        self._entries[key] = (now + self.ttl, value)
        return value

    def forget(self, key: K) -> None:
        """The next ``get`` of ``key`` loads it again (the caller knows it went stale)."""
        self._entries.pop(key, None)
