"""Job schedulers: repeat a job on a fixed interval or a cron expression (with a time zone)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgpack
import orjson
from croniter import croniter

from queue_core.errors import InvalidOptionError
from queue_core.keys import validate_name
from queue_core.storage import pack
from queue_core.types import as_str

if TYPE_CHECKING:
    from queue_core.options import JobOptions
    from queue_core.storage import Storage

__all__ = ["Schedule", "SchedulerControls", "SchedulerInfo", "advance_scheduler"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """When a scheduler runs: every `every_ms` (aligned to the clock, or to `start_at`), or on
    a `cron` expression (5 fields, or 6 with seconds last) in time zone `tz`. Optional window
    `start_at`/`end_at` and a `limit` on the number of runs."""

    every_ms: int | None = None
    cron: str | None = None
    tz: str = "UTC"
    start_at: datetime | None = None
    end_at: datetime | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if (self.every_ms is None) == (self.cron is None):
            raise InvalidOptionError("schedule", "give exactly one of every_ms and cron")
        if self.every_ms is not None and (not isinstance(self.every_ms, int) or self.every_ms < 10):
            raise InvalidOptionError("every_ms", "must be an integer >= 10")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise InvalidOptionError("cron", f"not a valid cron expression: {self.cron!r}")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise InvalidOptionError("tz", f"unknown time zone {self.tz!r}") from exc
        for name in ("start_at", "end_at"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise InvalidOptionError(name, "must be a timezone-aware datetime")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise InvalidOptionError("limit", "must be a positive integer")

    def next_after(self, after_ms: int) -> int | None:
        """The first run strictly after `after_ms` (epoch ms), or None when the schedule ended."""
        start_ms = int(self.start_at.timestamp() * 1000) if self.start_at else None
        if start_ms is not None and after_ms < start_ms:
            after_ms = start_ms - 1
        if self.every_ms is not None:
            base = start_ms or 0
            nxt = base + (math.floor((after_ms - base) / self.every_ms) + 1) * self.every_ms
        else:
            assert self.cron is not None
            start = datetime.fromtimestamp(after_ms / 1000, ZoneInfo(self.tz))
            # croniter steps in whole seconds: from the floor of `after`, the next match is > it
            it = croniter(self.cron, start.replace(microsecond=0))
            nxt = int(it.get_next(datetime).timestamp() * 1000)
            while nxt <= after_ms:
                nxt = int(it.get_next(datetime).timestamp() * 1000)
        if self.end_at is not None and nxt > self.end_at.timestamp() * 1000:
            return None
        return nxt

    def to_json(self) -> bytes:
        raw = asdict(self)
        for name in ("start_at", "end_at"):
            if raw[name] is not None:
                raw[name] = raw[name].isoformat()
        return orjson.dumps(raw)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Schedule:
        data: dict[str, Any] = orjson.loads(raw)
        for name in ("start_at", "end_at"):
            if data.get(name):
                data[name] = datetime.fromisoformat(data[name])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class SchedulerInfo:
    id: str
    schedule: Schedule
    next_run_ms: int | None
    runs: int
    job_name: str


class SchedulerControls:
    """Job schedulers of a queue (mixed into `Queue`)."""

    _store: Storage

    if TYPE_CHECKING:  # provided by Queue

        def _options(self, options: JobOptions | None, overrides: dict[str, Any]) -> JobOptions: ...

        def _encode(self, name: str, data: Any, opts: JobOptions) -> list[Any]: ...

    async def upsert_scheduler(
        self,
        scheduler_id: str,
        schedule: Schedule,
        name: str = "scheduled",
        data: Any = None,
        options: JobOptions | None = None,
        /,
        **overrides: Any,
    ) -> int | None:
        """Create or replace a scheduler. Exactly one job is pending for it at any time (id
        `sch:<scheduler_id>:<run ms>`); each run's start schedules the next. Returns the first
        run time (epoch ms), or None when the schedule has no run left."""
        validate_name(scheduler_id, "scheduler_id")
        if not isinstance(schedule, Schedule):
            raise InvalidOptionError("schedule", "must be a Schedule")
        opts = self._options(options, overrides)
        if opts.job_id is not None or opts.dedup is not None or opts.delay or opts.run_at:
            raise InvalidOptionError("options", "schedulers choose job ids and times themselves")
        template = self._encode(name, data, opts)[1:]  # without the job id
        first = schedule.next_after(int(time.time() * 1000) - 1)
        await self._store.upsert_scheduler(
            scheduler_id, schedule.to_json(), pack(template), first or 0, schedule.limit or 0
        )
        return first

    async def get_scheduler(self, scheduler_id: str) -> SchedulerInfo | None:
        raw = await self._store.scheduler_hash(scheduler_id)
        if not raw:
            return None
        h = {as_str(k): v for k, v in raw.items()}
        fields = msgpack.unpackb(h["tmpl"], raw=False)[-1]
        nxt = int(as_str(h.get("next", b"0")))
        return SchedulerInfo(
            id=scheduler_id,
            schedule=Schedule.from_json(h["spec"]),
            next_run_ms=nxt or None,
            runs=int(as_str(h.get("count", b"0"))),
            job_name=as_str(fields[fields.index("name") + 1]),
        )

    async def list_schedulers(self) -> list[SchedulerInfo]:
        out = []
        for sid in await self._store.scheduler_ids():
            info = await self.get_scheduler(sid)
            if info is not None:
                out.append(info)
        return out

    async def remove_scheduler(self, scheduler_id: str) -> bool:
        """Remove a scheduler and its pending job (a running one finishes)."""
        return await self._store.remove_scheduler(scheduler_id)

    async def _advance_scheduler(self, scheduler_id: str, started_at: int, now_ms: int) -> bool:
        return await advance_scheduler(self._store, scheduler_id, started_at, now_ms)


async def advance_scheduler(
    store: Storage, scheduler_id: str, started_at: int, now_ms: int
) -> bool:
    """Schedule the run after `started_at` (a compare-and-set: one caller per run wins)."""
    raw = await store.scheduler_spec(scheduler_id)
    if raw is None:
        return False
    nxt = Schedule.from_json(raw).next_after(max(started_at, now_ms))
    return await store.schedule_next(scheduler_id, started_at, nxt or 0)
