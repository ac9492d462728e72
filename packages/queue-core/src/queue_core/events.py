"""Reading a queue's events stream from any process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from queue_core.connection import connect
from queue_core.keys import QueueKeys
from queue_core.types import RedisClient

__all__ = ["EVENT_NAMES", "QueueEvent", "QueueEvents"]

log = logging.getLogger("queue_core.events")

EVENT_NAMES = frozenset(
    {
        "waiting",
        "delayed",
        "active",
        "progress",
        "completed",
        "failed",
        "retrying",
        "stalled",
        "duplicated",
        "deduplicated",
        "removed",
        "drained",
        "paused",
        "resumed",
        "cleaned",
    }
)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """One entry of the events stream. `fields` holds the event's extra values as strings."""

    stream_id: str
    event: str
    job_id: str | None
    fields: dict[str, str]

    @property
    def return_value(self) -> Any:
        raw = self.fields.get("rv")
        return None if raw is None else orjson.loads(raw)

    @classmethod
    def parse(cls, stream_id: bytes | str, raw: dict[Any, Any]) -> QueueEvent:
        fields = {_s(k): _s(v) for k, v in raw.items()}
        event = fields.pop("e", "")
        job_id = fields.pop("id", None)
        return cls(_s(stream_id), event, job_id, fields)


class QueueEvents:
    """Iterate over a queue's events, from now (`last_id="$"`) or from a stream id.

    The stream is capped (about `max_events` entries), so a reader that falls far behind misses
    events: delivery is at-most-once past the cap. Each blocking read carries a client-side
    deadline, and a broken connection is retried, so a dead socket cannot stall the reader.
    """

    def __init__(
        self,
        name: str,
        redis: RedisClient | str,
        *,
        prefix: str = "qc",
        tag: str | None = None,
        last_id: str = "$",
        block_ms: int = 5000,
        count: int = 500,
    ) -> None:
        self.keys = QueueKeys.of(name, prefix, tag)
        self._own = isinstance(redis, str)
        self.redis: RedisClient = connect(redis) if isinstance(redis, str) else redis
        self._r: Any = self.redis
        self.last_id = last_id
        self.block_ms = block_ms
        self.count = count
        self._closed = False

    async def _resolve_start(self) -> None:
        if self.last_id == "$":
            newest = await self._r.xrevrange(self.keys.events, count=1)
            self.last_id = _s(newest[0][0]) if newest else "0-0"

    async def read(self) -> list[QueueEvent]:
        """One blocking read: the events after `last_id` (possibly none, after `block_ms`)."""
        await self._resolve_start()
        deadline = self.block_ms / 1000 + 5.0
        try:
            reply = await asyncio.wait_for(
                self._r.xread(
                    {self.keys.events: self.last_id}, count=self.count, block=self.block_ms
                ),
                deadline,
            )
        except (TimeoutError, RedisConnectionError, RedisTimeoutError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from exc
            log.warning("events read on %s failed (%s); retrying", self.keys.events, exc)
            await asyncio.sleep(0.2)
            return []
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError  # redis-py may absorb a cancel that races a reply
        out: list[QueueEvent] = []
        for _stream, entries in reply or []:
            for entry_id, raw in entries:
                event = QueueEvent.parse(entry_id, raw)
                ids = event.fields.pop("ids", None)
                if ids is None:
                    out.append(event)
                else:
                    # a bulk add wrote one entry for many jobs
                    for job_id in ids.split(" "):
                        out.append(QueueEvent(event.stream_id, event.event, job_id, event.fields))
        if out:
            self.last_id = out[-1].stream_id
        return out

    async def __aiter__(self) -> AsyncIterator[QueueEvent]:
        while not self._closed:
            for event in await self.read():
                yield event

    async def close(self) -> None:
        self._closed = True
        if self._own:
            await self.redis.aclose()


class FinishWaiters:
    """Futures of `wait_until_finished` callers, resolved by one shared events reader.

    The reader's starting point is fixed before any caller checks its job's state, so a job that
    finishes between the check and the read is still seen.
    """

    def __init__(self, events: QueueEvents) -> None:
        self._events = events
        self._waiters: dict[str, list[asyncio.Future[tuple[str, str]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    async def register(self, job_id: str) -> asyncio.Future[tuple[str, str]]:
        fut: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)
        if self._task is None or self._task.done():
            self._started.clear()
            self._task = asyncio.create_task(self._run(), name="queue-core-finish-waiters")
        await self._started.wait()
        return fut

    def unregister(self, job_id: str, fut: asyncio.Future[tuple[str, str]]) -> None:
        futures = self._waiters.get(job_id)
        if futures and fut in futures:
            futures.remove(fut)
            if not futures:
                del self._waiters[job_id]

    async def _run(self) -> None:
        await self._events._resolve_start()
        self._started.set()
        while self._waiters:
            for ev in await self._events.read():
                if ev.event not in ("completed", "failed") or ev.job_id is None:
                    continue
                payload = ev.fields.get("rv" if ev.event == "completed" else "err", "")
                for fut in self._waiters.pop(ev.job_id, []):
                    if not fut.done():
                        fut.set_result((ev.event, payload))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
