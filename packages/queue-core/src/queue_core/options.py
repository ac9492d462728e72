"""Typed job options and queue settings, validated on construction."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from queue_core.errors import InvalidOptionError
from queue_core.limits import MAX_DELAY_MS

if TYPE_CHECKING:
    from queue_core.job import Job

__all__ = [
    "MAX_DELAY_MS",
    "MAX_PRIORITY",
    "Backoff",
    "BackoffStrategy",
    "Dedup",
    "JobOptions",
    "KeepJobs",
    "QueueSettings",
    "RemoveOption",
]

MAX_PRIORITY = 2_097_151  # 2**21 - 1: the priority and a 32-bit position share one float score

BackoffStrategy = Callable[[int, BaseException, "Job"], "int | float | None"]
"""Custom backoff: (attempts made, error, job) -> delay ms, or None to fail the job now."""


def _ms(value: int | float | timedelta, field_name: str) -> int:
    if isinstance(value, timedelta):
        value = value.total_seconds() * 1000
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidOptionError(field_name, "must be a number of milliseconds or a timedelta")
    if value < 0:
        raise InvalidOptionError(field_name, "must not be negative")
    if value > MAX_DELAY_MS:
        raise InvalidOptionError(field_name, f"must be at most {MAX_DELAY_MS} ms (ten years)")
    return int(value)


def check_text(value: object, field_name: str, max_len: int) -> str:
    """A non-empty string of at most `max_len` characters that encodes as UTF-8 (a lone
    surrogate cannot be stored in Redis or sent in JSON), without whitespace."""
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidOptionError(
            field_name, f"must be a non-empty string of at most {max_len} chars"
        )
    if any(c.isspace() for c in value):
        raise InvalidOptionError(field_name, "must not contain whitespace")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidOptionError(field_name, "must be valid text (no lone surrogates)") from None
    return value


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay between attempts.

    `fixed`: always `delay` ms. `exponential`: `delay * 2**(attempt-1)` ms. `jitter` in [0, 1]
    draws the delay uniformly from `[d*(1-jitter), d]`; `max_delay` caps it. Any other `type`
    names a custom strategy registered on the worker (`Worker(backoff_strategies=...)`).
    """

    type: str = "fixed"
    delay: int = 1000
    jitter: float = 0.0
    max_delay: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type or ":" in self.type:
            raise InvalidOptionError("backoff.type", "must be a non-empty name without ':'")
        object.__setattr__(self, "delay", _ms(self.delay, "backoff.delay"))
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter <= 1:
            raise InvalidOptionError("backoff.jitter", "must be between 0 and 1")
        if self.max_delay is not None:
            object.__setattr__(self, "max_delay", _ms(self.max_delay, "backoff.max_delay"))

    @classmethod
    def fixed(cls, delay: int | timedelta) -> Backoff:
        return cls("fixed", _ms(delay, "backoff.delay"))

    @classmethod
    def exponential(
        cls, delay: int | timedelta, *, jitter: float = 0.0, max_delay: int | None = None
    ) -> Backoff:
        return cls("exponential", _ms(delay, "backoff.delay"), jitter, max_delay)

    def encode(self) -> str:
        return f"{self.type}:{self.delay}:{self.jitter}:{self.max_delay or 0}"

    @classmethod
    def decode(cls, raw: str) -> Backoff:
        kind, delay, jitter, max_delay = raw.split(":")
        return cls(kind, int(delay), float(jitter), int(max_delay) or None)

    def compute(self, attempts_made: int, rng: Callable[[], float] = random.random) -> int:
        """Delay in ms before the next attempt, after `attempts_made` failed attempts."""
        d: float
        if self.type == "exponential":
            # (an exponent past ~40 doublings already exceeds the cap: no huge int is built)
            d = float(self.delay * 2 ** min(max(0, attempts_made - 1), 64))
        else:
            d = float(self.delay)
        d = min(d, self.max_delay if self.max_delay is not None else MAX_DELAY_MS)
        if self.jitter:
            d = d * (1 - self.jitter * rng())
        return math.floor(d + 0.5)


@dataclass(frozen=True, slots=True)
class KeepJobs:
    """Retention of finished jobs: keep at most `count` of them, none older than `age` seconds.

    `None` means no limit on that axis. Trimming happens as jobs finish, in batches: the set may
    exceed `count` by up to 10% before it is cut back.
    """

    count: int | None = None
    age: float | None = None

    def __post_init__(self) -> None:
        if self.count is not None and (not isinstance(self.count, int) or self.count < 0):
            raise InvalidOptionError("keep.count", "must be a non-negative integer")
        if self.age is not None and (not isinstance(self.age, int | float) or self.age <= 0):
            raise InvalidOptionError("keep.age", "must be a positive number of seconds")

    def encode(self) -> str:
        count = -1 if self.count is None else self.count
        age = 0 if self.age is None else max(1, int(self.age))
        return f"{count},{age}"


RemoveOption = bool | int | KeepJobs
"""True: delete at once. False: keep forever. int N: keep the newest N. KeepJobs: count and age."""


def _encode_remove(value: RemoveOption, field_name: str) -> str:
    if value is True:
        return "0,0"
    if value is False:
        return "-1,0"
    if isinstance(value, int):
        if value < 0:
            raise InvalidOptionError(field_name, "must not be negative")
        return f"{value},0"
    if isinstance(value, KeepJobs):
        return value.encode()
    raise InvalidOptionError(field_name, "must be a bool, an int or KeepJobs")


@dataclass(frozen=True, slots=True)
class Dedup:
    """Deduplicate adds by `id`.

    - `simple` (no ttl): further adds are ignored until the job completes or fails.
    - `ttl`: further adds are ignored for `ttl` ms, whatever the job's state.
    - `debounce`: a further add *replaces* the pending job while it is still delayed (its delay
      starts again, so a burst becomes one job that runs `delay` after the last add); once the job
      has started, a further add creates a new job.
    """

    id: str
    ttl: int | None = None
    mode: Literal["simple", "ttl", "debounce"] = "simple"

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or len(self.id) > 512:
            raise InvalidOptionError("dedup.id", "must be a non-empty string of at most 512 chars")
        try:
            self.id.encode()
        except UnicodeEncodeError:
            reason = "must be valid text (no lone surrogates)"
            raise InvalidOptionError("dedup.id", reason) from None
        if self.mode not in ("simple", "ttl", "debounce"):
            raise InvalidOptionError("dedup.mode", "must be 'simple', 'ttl' or 'debounce'")
        if self.ttl is not None:
            object.__setattr__(self, "ttl", _ms(self.ttl, "dedup.ttl"))
        if self.mode == "ttl" and not self.ttl:
            raise InvalidOptionError("dedup.ttl", "is required for mode 'ttl'")


DEFAULT_KEEP_COMPLETED = KeepJobs(count=1000, age=24 * 3600)
DEFAULT_KEEP_FAILED = KeepJobs(count=10_000, age=7 * 24 * 3600)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobOptions:
    """Options of one job. Every field is validated when the object is built."""

    job_id: str | None = None
    priority: int = 0
    delay: int | float | timedelta = 0
    run_at: datetime | None = None
    lifo: bool = False
    attempts: int = 1
    backoff: Backoff | int | None = None
    timeout: int | float | timedelta | None = None
    retry_on_timeout: bool = True
    remove_on_complete: RemoveOption = DEFAULT_KEEP_COMPLETED
    remove_on_fail: RemoveOption = DEFAULT_KEEP_FAILED
    keep_logs: int = 100
    group: str | None = None
    group_weight: float = 1.0
    group_max_size: int = 0
    dedup: Dedup | None = None

    def __post_init__(self) -> None:
        if self.job_id is not None and check_text(self.job_id, "job_id", 256).isdigit():
            raise InvalidOptionError("job_id", "must not be all digits (reserved for auto ids)")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise InvalidOptionError("priority", "must be an integer")
        if not 0 <= self.priority <= MAX_PRIORITY:
            raise InvalidOptionError("priority", f"must be between 0 and {MAX_PRIORITY}")
        object.__setattr__(self, "delay", _ms(self.delay, "delay"))
        if self.run_at is not None and not isinstance(self.run_at, datetime):
            raise InvalidOptionError("run_at", "must be a datetime")
        if self.run_at is not None and self.run_at.tzinfo is None:
            raise InvalidOptionError("run_at", "must be timezone-aware")
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise InvalidOptionError("attempts", "must be an integer")
        if not 1 <= self.attempts <= 1_000_000:
            raise InvalidOptionError("attempts", "must be between 1 and 1000000")
        if isinstance(self.backoff, int) and not isinstance(self.backoff, bool):
            object.__setattr__(self, "backoff", Backoff.fixed(self.backoff))
        elif self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise InvalidOptionError("backoff", "must be a Backoff or a number of milliseconds")
        if self.timeout is not None:
            t = _ms(self.timeout, "timeout")
            if t == 0:
                raise InvalidOptionError("timeout", "must be positive")
            object.__setattr__(self, "timeout", t)
        _encode_remove(self.remove_on_complete, "remove_on_complete")
        _encode_remove(self.remove_on_fail, "remove_on_fail")
        if not isinstance(self.keep_logs, int) or self.keep_logs < 0:
            raise InvalidOptionError("keep_logs", "must be a non-negative integer")
        if self.group is not None:
            check_text(self.group, "group", 256)
            if self.lifo:
                raise InvalidOptionError("lifo", "cannot be used with a group (groups are FIFO)")
        if not isinstance(self.group_weight, int | float) or not 0 < self.group_weight <= 1000:
            raise InvalidOptionError("group_weight", "must be in (0, 1000]")
        if not isinstance(self.group_max_size, int) or self.group_max_size < 0:
            raise InvalidOptionError("group_max_size", "must be a non-negative integer")
        if self.dedup is not None and not isinstance(self.dedup, Dedup):
            raise InvalidOptionError("dedup", "must be a Dedup")

    def merged(self, overrides: dict[str, Any]) -> JobOptions:
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise InvalidOptionError(sorted(unknown)[0], "is not a job option")
        return replace(self, **overrides)

    def hash_fields(self) -> list[str]:
        """The job-hash fields these options contribute (see docs/queue-core.md)."""
        return list(_hash_fields(self))


@lru_cache(maxsize=256)
def _hash_fields(opts: JobOptions) -> tuple[str, ...]:
    out = [
        "att",
        str(opts.attempts),
        "roc",
        _encode_remove(opts.remove_on_complete, "remove_on_complete"),
        "rof",
        _encode_remove(opts.remove_on_fail, "remove_on_fail"),
    ]
    if isinstance(opts.backoff, Backoff):
        out += ["bo", opts.backoff.encode()]
    if opts.timeout is not None:
        out += ["to", str(opts.timeout)]
        if not opts.retry_on_timeout:
            out += ["rot", "0"]
    if opts.keep_logs != 100:
        out += ["kl", str(opts.keep_logs)]
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSettings:
    """Queue-wide settings, stored in Redis (`<base>:meta`) so every process sees the same.

    Written by `Queue.configure()`; the service that owns a queue calls it on startup.
    """

    concurrency: int | None = None
    """Global cap on active jobs across all workers (None = no cap)."""
    rate_limit: tuple[int, int] | None = None
    """(max jobs, per duration ms), counted across all workers on job starts."""
    group_concurrency: int = 1
    """Default active jobs per group, across all workers (1 = strict per-group order)."""
    group_rate_limit: tuple[int, int] | None = None
    """Default (max jobs, per duration ms) for every group."""
    strict_group_order: bool = True
    """A retried grouped job keeps the head of its group; the group waits out its backoff."""
    dead_letter_queue: str | None = None
    """Name of the queue (same hash tag) that receives a copy of every finally failed job."""
    max_events: int = 10_000
    """Approximate cap of the events stream."""
    dead_letter_max: int = 10_000
    """Most copies the dead-letter queue keeps waiting; the oldest go first beyond it."""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency is not None and (
            not isinstance(self.concurrency, int) or self.concurrency < 1
        ):
            raise InvalidOptionError("concurrency", "must be a positive integer or None")
        for name in ("rate_limit", "group_rate_limit"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, tuple)
                or len(value) != 2
                or not all(isinstance(v, int) and v > 0 for v in value)
            ):
                raise InvalidOptionError(name, "must be (max jobs, duration ms), both positive")
        if not isinstance(self.group_concurrency, int) or self.group_concurrency < 1:
            raise InvalidOptionError("group_concurrency", "must be a positive integer")
        if not isinstance(self.max_events, int) or self.max_events < 10:
            raise InvalidOptionError("max_events", "must be an integer >= 10")
        if not isinstance(self.dead_letter_max, int) or self.dead_letter_max < 1:
            raise InvalidOptionError("dead_letter_max", "must be a positive integer")
