"""Job schedulers: repeat a job on a fixed interval or a cron expression (with a time zone)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from croniter import croniter

from queue_core.errors import InvalidOptionError

__all__ = ["Schedule", "SchedulerInfo"]


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
