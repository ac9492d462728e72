"""Inspection and administration of a queue (mixed into `Queue`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from redis.exceptions import RedisError

from queue_core.errors import InvalidOptionError, QueueError
from queue_core.job import Job, JobState
from queue_core.registry import unregister_queue

if TYPE_CHECKING:
    from queue_core.keys import QueueKeys
    from queue_core.queue import Queue
    from queue_core.storage import Storage
    from queue_core.types import RedisClient

__all__ = ["QueueAdmin", "as_state"]

log = logging.getLogger("queue_core.queue")

_PB = 2**32


def as_state(value: JobState | str) -> JobState:
    """A `JobState`, or `InvalidOptionError` naming the bad value."""
    try:
        return JobState(value)
    except ValueError:
        names = ", ".join(s.value for s in JobState)
        raise InvalidOptionError("state", f"unknown state {value!r} (one of {names})") from None


class QueueAdmin:
    name: str
    prefix: str
    keys: QueueKeys
    redis: RedisClient
    _store: Storage
    _registered: bool

    async def list_job_ids(
        self, state: JobState | str, start: int = 0, count: int = 100
    ) -> list[str]:
        """Ids in one state, paged. Waiting lists ungrouped jobs first, then each group in name
        order; completed and failed list the newest first; the others in processing order."""
        state = as_state(state)
        if start < 0 or count < 0:
            raise InvalidOptionError("start", "start and count must not be negative")
        store = self._store
        if state is JobState.WAITING:
            ids = await store.ids_by_score("wait", "-inf", f"({_PB}", start, count)
            if len(ids) < count:
                skip = max(0, start - await store.ungrouped_waiting())
                for group in await store.group_names():
                    size = await store.group_size(group)
                    if skip >= size:
                        skip -= size
                        continue
                    need = count - len(ids)
                    ids += await store.group_jobs(group, skip, skip + need - 1)
                    skip = 0
                    if len(ids) >= count:
                        break
            return ids
        if state is JobState.PRIORITIZED:
            return await store.ids_by_score("wait", _PB, "+inf", start, count)
        if state in (JobState.COMPLETED, JobState.FAILED):
            return await store.ids_by_rank(state.value, start, start + count - 1, newest=True)
        if state in (JobState.DELAYED, JobState.ACTIVE):
            return await store.ids_by_rank(state.value, start, start + count - 1, newest=False)
        if state is JobState.WAITING_CHILDREN:
            return await store.ids_by_rank("wc", start, start + count - 1, newest=False)
        raise InvalidOptionError("state", f"cannot list jobs in state {state.value!r}")

    async def list_jobs(self, state: JobState | str, start: int = 0, count: int = 100) -> list[Job]:
        ids = await self.list_job_ids(state, start, count)
        if not ids:
            return []
        hashes = await self._store.job_hashes(ids)
        queue = cast("Queue", self)  # (this mixin is only ever part of a Queue)
        return [Job.from_hash(queue, i, h) for i, h in zip(ids, hashes, strict=True) if h]

    async def get_job_logs(self, job_id: str, start: int = 0, end: int = -1) -> list[str]:
        return await self._store.job_logs(job_id, start, end)

    async def remove(self, job_id: str, *, force: bool = False) -> bool:
        """Remove a job. An active job is refused (`QueueError`) unless `force=True`."""
        r = await self._store.remove_job(job_id, force)
        if r == -1:
            raise QueueError(f"job {job_id!r} is active; use force=True to remove it anyway")
        return r == 1

    async def drain(self, *, delayed: bool = False, batch: int = 1000) -> int:
        """Remove all waiting (and optionally delayed) jobs; returns how many were removed."""
        total = 0
        while True:
            removed, remaining = await self._store.drain(delayed, batch)
            total += removed
            if remaining <= 0 or removed == 0:
                return total

    async def clean(self, grace_ms: int, state: JobState | str, limit: int = 1000) -> list[str]:
        """Remove up to `limit` jobs in `state` older than `grace_ms`; returns their ids."""
        state = as_state(state)
        if state is JobState.ACTIVE:
            raise InvalidOptionError("state", "active jobs hold a lease and cannot be cleaned")
        if grace_ms < 0 or limit <= 0:
            raise InvalidOptionError("grace_ms", "grace must be >= 0 and limit > 0")
        return await self._store.clean(state.value, int(grace_ms), int(limit))

    async def obliterate(self, *, force: bool = False, batch: int = 1000) -> None:
        """Delete the queue and everything in it. The queue must be paused first."""
        while not await self._store.obliterate(force, batch):
            pass
        await self._store.delete_matching(("de", "grl", "w"))
        self._registered = False
        try:
            await unregister_queue(self.redis, self.name, self.keys.tag, self.prefix)
        except RedisError as exc:
            log.warning("queue %s: could not remove it from the queue registry: %s", self.name, exc)

    async def retry_jobs(
        self,
        state: JobState | str = JobState.FAILED,
        *,
        count: int = 1000,
        reset_attempts: bool = True,
    ) -> int:
        """Move finished jobs back to waiting; returns how many moved (at most `count`)."""
        state = as_state(state)
        if state not in (JobState.FAILED, JobState.COMPLETED):
            raise InvalidOptionError("state", "must be failed or completed")
        return await self._store.retry_jobs(state.value, count, reset_attempts)

    async def promote_jobs(self, count: int = 1000, job_ids: Sequence[str] = ()) -> int:
        """Make delayed jobs (all, up to `count`, or the listed ones) startable now."""
        return await self._store.promote_jobs(count, job_ids)
