"""The job as stored in Redis, and its states."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

from queue_core.codec import dumps
from queue_core.errors import JobNotFoundError
from queue_core.options import Backoff
from queue_core.types import as_str

if TYPE_CHECKING:
    from queue_core.queue import Queue

__all__ = ["ACTIVE_STATES", "PENDING_STATES", "TERMINAL_STATES", "Job", "JobState"]


class JobState(StrEnum):
    WAITING = "waiting"
    PRIORITIZED = "prioritized"
    DELAYED = "delayed"
    WAITING_CHILDREN = "waiting-children"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    UNKNOWN = "unknown"


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED})
PENDING_STATES = frozenset(
    {JobState.WAITING, JobState.PRIORITIZED, JobState.DELAYED, JobState.WAITING_CHILDREN}
)
ACTIVE_STATES = frozenset({JobState.ACTIVE})


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _int(h: Mapping[str, bytes | str], key: str, default: int = 0) -> int:
    raw = h.get(key)
    if raw is None or raw == b"" or raw == "":
        return default
    return int(float(raw))


class Job:
    """A job: what was added, plus what happened to it.

    Inside a processor the job also carries its lease `token`; `update_progress()` and `log()`
    write through the queue it came from. `data` is decoded from JSON on first access.
    """

    __slots__ = (
        "_data",
        "_raw",
        "attempts",
        "attempts_made",
        "attempts_started",
        "backoff",
        "dedup_id",
        "error_history",
        "failed_reason",
        "finished_on",
        "group",
        "id",
        "keep_logs",
        "name",
        "parent",
        "priority",
        "processed_on",
        "progress",
        "queue",
        "ready_at",
        "retry_on_timeout",
        "return_value",
        "scheduled_at",
        "scheduler_id",
        "stacktrace",
        "stalled_count",
        "timeout",
        "timestamp",
        "token",
    )

    def __init__(
        self,
        queue: Queue,
        job_id: str,
        name: str,
        data: Any = None,
        *,
        raw_data: bytes | str | None = None,
    ) -> None:
        self.queue = queue
        self.id = job_id
        self.name = name
        self._data = data
        self._raw = raw_data
        self.token: str | None = None
        self.priority = 0
        self.attempts = 1
        self.attempts_made = 0
        self.attempts_started = 0
        self.stalled_count = 0
        self.timestamp = 0
        self.processed_on: int | None = None
        self.finished_on: int | None = None
        self.backoff: Backoff | None = None
        self.timeout: int | None = None
        self.retry_on_timeout = True
        self.keep_logs = 100
        self.group: str | None = None
        self.dedup_id: str | None = None
        self.return_value: Any = None
        self.failed_reason: str | None = None
        self.stacktrace: str | None = None
        self.error_history: list[dict[str, Any]] = []
        self.progress: Any = None
        self.ready_at: int | None = None
        self.parent: tuple[str, str] | None = None
        self.scheduler_id: str | None = None
        self.scheduled_at: int | None = None

    @property
    def data(self) -> Any:
        if self._raw is not None:
            self._data = orjson.loads(self._raw)
            self._raw = None
        return self._data

    @classmethod
    def from_hash(cls, queue: Queue, job_id: str, raw: Mapping[Any, Any]) -> Job:
        h: dict[str, bytes | str] = {_s(k): v for k, v in raw.items()}
        job = cls(queue, job_id, _s(h.get("name", b"")), raw_data=h.get("data", b"null"))
        job.priority = _int(h, "prio")
        job.attempts = _int(h, "att", 1)
        job.attempts_made = _int(h, "atm")
        job.attempts_started = _int(h, "ats")
        job.stalled_count = _int(h, "stc")
        job.timestamp = _int(h, "ts")
        job.processed_on = _int(h, "pon") or None
        job.finished_on = _int(h, "fon") or None
        job.ready_at = _int(h, "rdy") or None
        if "bo" in h:
            job.backoff = Backoff.decode(_s(h["bo"]))
        if "to" in h:
            job.timeout = _int(h, "to")
        job.retry_on_timeout = _s(h.get("rot", b"1")) != "0"
        if "kl" in h:
            job.keep_logs = _int(h, "kl", 100)
        if "gid" in h:
            job.group = _s(h["gid"])
        if "ddk" in h:
            job.dedup_id = _s(h["ddk"])
        if "rv" in h:
            job.return_value = orjson.loads(h["rv"])
        if h.get("err"):
            job.failed_reason = _s(h["err"])
        if h.get("stack"):
            job.stacktrace = _s(h["stack"])
        if h.get("errs"):
            job.error_history = orjson.loads(h["errs"])
        if "prog" in h:
            job.progress = orjson.loads(h["prog"])
        if "sch" in h:
            job.scheduler_id = _s(h["sch"])
            job.scheduled_at = _int(h, "schat")
        if "pid" in h and "pb" in h:
            job.parent = (_s(h["pb"]), _s(h["pid"]))
        return job

    @classmethod
    def from_flat(cls, queue: Queue, job_id: str, flat: list[Any]) -> Job:
        return cls.from_hash(queue, job_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    # -- operations available inside a processor --------------------------------------------

    async def update_progress(self, progress: Any) -> None:
        """Store `progress` (any JSON value) and emit a `progress` event."""
        encoded = dumps(progress, "progress")
        self.progress = progress
        if not await self.queue._store.job_progress(self.id, encoded):
            raise JobNotFoundError(f"no job {self.id!r} in queue {self.queue.name!r}")

    async def log(self, message: str) -> int:
        """Append a line to the job's log (capped at `keep_logs` lines); returns the count."""
        return await self.queue._store.job_log(self.id, str(message), self.keep_logs)

    async def children_values(self) -> dict[tuple[str, str], Any]:
        """Results of this flow parent's completed children: {(queue base, job id): value}."""
        raw = await self.queue._store.children(self.id, failed=False)
        return {_child_key(k): orjson.loads(v) for k, v in raw.items()}

    async def failed_children(self) -> dict[tuple[str, str], str]:
        """Errors of children that failed under the `ignore`/`continue` policies."""
        raw = await self.queue._store.children(self.id, failed=True)
        return {_child_key(k): as_str(v) for k, v in raw.items()}

    async def get_state(self) -> Any:
        return await self.queue.get_state(self.id)

    async def wait_until_finished(self, timeout: float | None = None) -> Any:
        """Wait for the job to complete and return its result; raises `JobFailedError`."""
        return await self.queue.wait_until_finished(self.id, timeout)

    async def remove(self) -> bool:
        return await self.queue.remove(self.id)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, name={self.name!r}, queue={self.queue.name!r})"


def _child_key(raw: Any) -> tuple[str, str]:
    base, _, child_id = as_str(raw).rpartition("|")
    return base, child_id
