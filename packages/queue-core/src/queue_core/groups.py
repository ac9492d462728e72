"""Per-group controls of a queue (mixed into `Queue`): pause, concurrency, rate limits, holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from queue_core.errors import InvalidOptionError
from queue_core.limits import checked_delay
from queue_core.storage import group_info
from queue_core.types import GroupInfo

if TYPE_CHECKING:
    from queue_core.storage import Storage

__all__ = ["GroupControls"]


def _check_group(group: object) -> str:
    if not isinstance(group, str) or not group:
        raise InvalidOptionError("group", "must be a non-empty string")
    return group


class GroupControls:
    _store: Storage

    async def _group(self, op: str, group: str, *args: Any) -> Any:
        return await self._store.group_control(op, _check_group(group), *args)

    async def pause_group(self, group: str) -> bool:
        return bool(await self._group("pause", group))

    async def resume_group(self, group: str) -> bool:
        return bool(await self._group("resume", group))

    async def set_group_concurrency(self, group: str, concurrency: int | None) -> None:
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise InvalidOptionError("concurrency", "must be a positive integer or None")
        await self._group("concurrency", group, concurrency or 0)

    async def set_group_rate_limit(self, group: str, limit: tuple[int, int] | None) -> None:
        if limit is not None and (len(limit) != 2 or min(limit) <= 0):
            raise InvalidOptionError("limit", "must be (max jobs, duration ms), both positive")
        mx, dur = limit or (0, 0)
        await self._group("limit", group, mx, dur)

    async def rate_limit_group(self, group: str, delay_ms: int) -> None:
        """Hold a group for `delay_ms` (no job of it starts meanwhile)."""
        delay = checked_delay(delay_ms)
        if delay is None:
            raise InvalidOptionError("delay_ms", "must be a number of milliseconds (<= 10 years)")
        await self._group("hold", group, delay)

    async def get_group_info(self, group: str) -> GroupInfo:
        return group_info(await self._group("info", group))

    async def get_group_infos(self, groups: Sequence[str]) -> list[GroupInfo]:
        """`get_group_info` of several groups in one round trip."""
        for group in groups:
            _check_group(group)
        if not groups:
            return []
        return await self._store.group_infos(groups)

    async def list_groups(self, start: int = 0, count: int = 100) -> list[str]:
        """Groups that have waiting or active jobs or settings of their own, by name."""
        return await self._store.group_names(start, start + count - 1)

    async def list_group_jobs(self, group: str, start: int = 0, count: int = 100) -> list[str]:
        return await self._store.group_jobs(group, start, start + count - 1)
