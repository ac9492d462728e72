"""The producer side of a queue, plus settings and the state of single jobs.

Administration (listing, cleaning, retrying), group controls and job schedulers are mixed in
from `admin.py`, `groups.py` and `schedulers.py`; every Redis call goes through `Storage`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from queue_core.admin import QueueAdmin, as_state
from queue_core.codec import dumps
from queue_core.connection import connect
from queue_core.errors import (
    GroupFullError,
    InvalidOptionError,
    JobFailedError,
    JobNotFoundError,
    PayloadTooLargeError,
)
from queue_core.events import FinishWaiters, QueueEvents
from queue_core.groups import GroupControls
from queue_core.job import Job, JobState
from queue_core.keys import QueueKeys
from queue_core.options import JobOptions, QueueSettings
from queue_core.registry import register_queues
from queue_core.schedulers import SchedulerControls
from queue_core.storage import AddReply, Storage, job_counts, pack
from queue_core.types import JobCounts, RedisClient, as_str

if TYPE_CHECKING:
    from queue_core.metrics import QueueMetrics

__all__ = ["BulkJob", "Queue", "job_counts_from_reply"]

log = logging.getLogger("queue_core.queue")

_ADD_CHUNK = 500  # jobs per add script call; a bulk pipelines its chunks in one round trip

job_counts_from_reply = job_counts  # (kept for callers of the old name)


@lru_cache(maxsize=256)
def _control(opts: JobOptions) -> tuple[Any, ...]:
    """The placement values the add script reads (cached: most adds share their options)."""
    dedup = opts.dedup
    ready_at = int(opts.run_at.timestamp() * 1000) if opts.run_at is not None else 0
    return (
        opts.job_id or "",
        opts.priority,
        opts.delay,
        ready_at,
        1 if opts.lifo else 0,
        opts.group or "",
        opts.group_weight,
        opts.group_max_size,
        dedup.id if dedup else "",
        (dedup.ttl or 0) if dedup else 0,
        dedup.mode if dedup else "",
    )


def _check_name(name: object) -> str:
    if not isinstance(name, str) or len(name) > 256:
        raise InvalidOptionError("name", "must be a string of at most 256 characters")
    if not name.isascii():
        try:
            name.encode()
        except UnicodeEncodeError:
            raise InvalidOptionError("name", "must be valid text (no lone surrogates)") from None
    return name


# The encoded options of the JobOptions objects seen last, by identity: hashing a JobOptions
# (the lru caches' key) costs more than encoding a small job, and most adds share one object.
_ENCODED: dict[int, tuple[JobOptions, tuple[Any, ...], list[str]]] = {}


def _encoded_options(opts: JobOptions) -> tuple[tuple[Any, ...], list[str]]:
    hit = _ENCODED.get(id(opts))
    if hit is not None and hit[0] is opts:
        return hit[1], hit[2]
    if len(_ENCODED) >= 64:
        _ENCODED.clear()
    control, fields = _control(opts), opts.hash_fields()
    _ENCODED[id(opts)] = (opts, control, fields)  # (holding opts keeps its id unique)
    return control, fields


@dataclass(slots=True)
class BulkJob:
    name: str
    data: Any = None
    options: JobOptions | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


class Queue(QueueAdmin, GroupControls, SchedulerControls):
    """A named queue: add jobs, inspect them, administer the queue.

    Queues need no creation: keys appear on first use. Concurrent `add()` calls on one `Queue`
    object are coalesced into one script call per event-loop turn (auto-pipelining), so a burst
    of adds costs one round trip; a single awaited add still costs exactly one.
    """

    def __init__(
        self,
        name: str,
        redis: RedisClient | str,
        *,
        prefix: str = "qc",
        tag: str | None = None,
        default_options: JobOptions | None = None,
        max_payload_bytes: int = 1024 * 1024,
    ) -> None:
        self.keys = QueueKeys.of(name, prefix, tag)
        self.name = name
        self.prefix = prefix
        self.tag = tag
        self._own = isinstance(redis, str)
        self.redis: RedisClient = connect(redis) if isinstance(redis, str) else redis
        self._store = Storage(self.redis, self.keys)
        self.default_options = default_options or JobOptions()
        if max_payload_bytes <= 0:
            raise InvalidOptionError("max_payload_bytes", "must be positive")
        self.max_payload_bytes = max_payload_bytes
        self._pending: list[tuple[list[Any], asyncio.Future[AddReply]]] = []
        self._flush_scheduled = False
        self._flushing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: FinishWaiters | None = None
        self._registered = False  # in the registry `<prefix>:queues` (see queue_core.registry)

    def __repr__(self) -> str:
        return f"Queue({self.name!r}, base={self.keys.base!r})"

    async def close(self) -> None:
        if self._waiters is not None:
            await self._waiters.close()
        for task in list(self._tasks):
            await task
        if self._own:
            await self.redis.aclose()

    # -- adding ---------------------------------------------------------------------------

    def _encode(self, name: str, data: Any, opts: JobOptions) -> list[Any]:
        _check_name(name)
        payload = dumps(data, "job data")
        if len(payload) > self.max_payload_bytes:
            raise PayloadTooLargeError(len(payload), self.max_payload_bytes)
        control, fields = _encoded_options(opts)
        return [*control, ["name", name, "data", payload, *fields]]

    def _options(self, options: JobOptions | None, overrides: dict[str, Any]) -> JobOptions:
        base = options if options is not None else self.default_options
        if not isinstance(base, JobOptions):
            raise InvalidOptionError("options", "must be a JobOptions")
        return base.merged(overrides)

    async def add(
        self, name: str, data: Any = None, options: JobOptions | None = None, /, **overrides: Any
    ) -> Job:
        """Add a job. Options come from `options` (or the queue default) plus keyword overrides.

        With `job_id`, adding is idempotent: a second add returns the stored job with
        `duplicate=True` semantics (see `Job.id`) and emits `duplicated`.
        """
        opts = self._options(options, overrides)
        args = self._encode(name, data, opts)
        if not self._flushing and not self._pending:
            # Nothing in flight: send now (one loop turn sooner). Adds issued while this one is
            # in flight queue up and go together in the next call.
            self._flushing = True
            try:
                (reply,) = await self._add_many([args])
            finally:
                self._flushing = False
                if self._pending and not self._flush_scheduled:
                    self._flush_scheduled = True
                    asyncio.get_running_loop().call_soon(self._start_flush)
            return self._added_job(reply, name, data, opts)
        fut: asyncio.Future[AddReply] = asyncio.get_running_loop().create_future()
        self._pending.append((args, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        return self._added_job(await fut, name, data, opts)

    def _added_job(self, reply: AddReply, name: str, data: Any, opts: JobOptions) -> Job:
        if reply.status == -1:
            raise GroupFullError(opts.group or "", opts.group_max_size)
        if reply.status == 0 and reply.existing:
            return Job.from_flat(self, reply.job_id, reply.existing)
        job = Job(self, reply.job_id, name, data)
        job.priority = opts.priority
        job.attempts = opts.attempts
        job.group = opts.group
        return job

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        if self._flushing or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._flushing = True
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: list[tuple[list[Any], asyncio.Future[AddReply]]]) -> None:
        try:
            results = await self._add_many([args for args, _ in batch])
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        finally:
            self._flushing = False
            if self._pending and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._start_flush)

    async def _add_many(self, encoded: Sequence[list[Any]]) -> list[AddReply]:
        chunks = [pack(encoded[i : i + _ADD_CHUNK]) for i in range(0, len(encoded), _ADD_CHUNK)]
        replies = await self._store.add_jobs(chunks)
        if not self._registered:
            await self._register()
        return replies

    async def add_bulk(
        self, jobs: Iterable[BulkJob | tuple[str, Any] | tuple[str, Any, JobOptions]]
    ) -> list[Job]:
        """Add many jobs in one round trip. Each job is validated before anything is sent."""
        prepared: list[tuple[str, Any, JobOptions]] = []
        for item in jobs:
            if isinstance(item, BulkJob):
                prepared.append((item.name, item.data, self._options(item.options, item.overrides)))
            elif isinstance(item, tuple) and len(item) in (2, 3):
                opts = item[2] if len(item) == 3 else None
                prepared.append((item[0], item[1], self._options(opts, {})))
            else:
                raise InvalidOptionError("jobs", "items must be BulkJob or (name, data[, options])")
        if not prepared:
            return []
        encoded = [self._encode(name, data, opts) for name, data, opts in prepared]
        results = await self._add_many(encoded)
        return [
            self._added_job(reply, name, data, opts)
            for (name, data, opts), reply in zip(prepared, results, strict=True)
        ]

    # -- settings ---------------------------------------------------------------------------

    async def configure(self, settings: QueueSettings) -> None:
        """Store queue-wide settings (read by every worker on its next fetch)."""
        sets: dict[str, Any] = {
            "gc": settings.group_concurrency,
            "strict": "1" if settings.strict_group_order else "0",
            "maxev": settings.max_events,
            "dlqmax": settings.dead_letter_max,
        }
        deletes: list[str] = []
        if settings.concurrency is None:
            deletes.append("conc")
        else:
            sets["conc"] = settings.concurrency
        if settings.rate_limit is None:
            deletes += ["rlm", "rld"]
        else:
            sets["rlm"], sets["rld"] = settings.rate_limit
        if settings.group_rate_limit is None:
            deletes += ["grlm", "grld"]
        else:
            sets["grlm"], sets["grld"] = settings.group_rate_limit
        if settings.dead_letter_queue is None:
            deletes += ["dlq", "dlqname"]
        else:
            dlq = QueueKeys.of(settings.dead_letter_queue, self.prefix, self.keys.tag)
            sets["dlq"] = dlq.base
            sets["dlqname"] = settings.dead_letter_queue
        for k, v in settings.extra.items():
            sets[f"x:{k}"] = v
        await self._store.configure(sets, deletes)
        known: list[tuple[str, str | None]] = [(self.name, self.keys.tag)]
        if settings.dead_letter_queue is not None:
            known.append((settings.dead_letter_queue, self.keys.tag))
        await self._register(known)

    async def _register(self, queues: list[tuple[str, str | None]] | None = None) -> None:
        """Record queues in the registry (best effort: the registry only serves operators)."""
        self._registered = True
        try:
            await register_queues(self.redis, queues or [(self.name, self.keys.tag)], self.prefix)
        except RedisError as exc:
            log.warning("queue %s: could not record it in the queue registry: %s", self.name, exc)

    def dead_letter_queue(self, name: str | None = None) -> Queue:
        """The `Queue` object of a dead-letter queue that shares this queue's hash tag."""
        return Queue(name or f"{self.name}-dlq", self.redis, prefix=self.prefix, tag=self.keys.tag)

    async def pause(self) -> None:
        """Stop all workers from starting jobs (active ones finish; delayed ones still promote)."""
        await self._store.configure({"paused": "1"})

    async def resume(self) -> None:
        await self._store.configure({"paused": "0"})

    async def is_paused(self) -> bool:
        return await self._store.is_paused()

    # -- single jobs ----------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        raw = await self._store.job_hash(job_id)
        if not raw:
            return None
        return Job.from_hash(self, job_id, raw)

    async def get_state(self, job_id: str) -> JobState | None:
        """The job's state, or None when no such job exists."""
        state = await self._store.get_state(job_id)
        return None if state == "missing" else as_state(state)

    async def get_job_counts(self) -> JobCounts:
        return await self._store.get_counts()

    async def get_metrics(self, minutes: int = 60) -> QueueMetrics:
        """Completed/failed jobs per minute for the last `minutes` complete minutes, totals and
        the processing-time histogram (see `queue_core.metrics`)."""
        from queue_core.metrics import get_metrics

        return await get_metrics(self, minutes)

    async def wait_until_finished(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait until the job completes (returns its result) or fails (`JobFailedError`).

        Raises `JobNotFoundError` for an unknown job and `TimeoutError` after `timeout` s.
        """
        if self._waiters is None:
            self._waiters = FinishWaiters(
                QueueEvents(self.name, self.redis, prefix=self.prefix, tag=self.tag, block_ms=2000)
            )
        fut = await self._waiters.register(job_id)
        try:
            state = await self.get_state(job_id)
            if state is None:
                # Retention may already have deleted a finished job: its final event remains.
                final = await self._recent_final_event(job_id)
                if final is None:
                    raise JobNotFoundError(f"no job {job_id!r} in queue {self.name!r}")
                event, payload = final
                if event == "failed":
                    raise JobFailedError(job_id, payload)
                return orjson.loads(payload) if payload else None
            if state in (JobState.COMPLETED, JobState.FAILED):
                job = await self.get_job(job_id)
                if job is not None:
                    if state is JobState.FAILED:
                        raise JobFailedError(job_id, job.failed_reason or "")
                    return job.return_value
            async with asyncio.timeout(timeout):
                event, payload = await fut
        finally:
            self._waiters.unregister(job_id, fut)
        if event == "failed":
            raise JobFailedError(job_id, payload)
        return orjson.loads(payload) if payload else None

    async def _recent_final_event(
        self, job_id: str, lookback: int = 2000
    ) -> tuple[str, str] | None:
        for _, raw in await self._store.recent_events(lookback):
            fields = {as_str(k): v for k, v in raw.items()}
            jid = fields.get("id")
            if jid is None or as_str(jid) != job_id:
                continue
            event = as_str(fields.get("e", b""))
            if event in ("completed", "failed"):
                payload = fields.get("rv" if event == "completed" else "err", b"")
                return event, as_str(payload) if payload else ""
        return None
