"""The producer and admin side of a queue."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import msgpack
import orjson
from redis.exceptions import NoScriptError, RedisError, ResponseError

from queue_core.connection import connect
from queue_core.errors import (
    GroupFullError,
    InvalidOptionError,
    JobFailedError,
    JobNotFoundError,
    PayloadTooLargeError,
    QueueError,
    SerializationError,
)
from queue_core.events import FinishWaiters, QueueEvents
from queue_core.job import Job, JobState
from queue_core.keys import QueueKeys, validate_name
from queue_core.options import JobOptions, QueueSettings
from queue_core.registry import register_queues, unregister_queue
from queue_core.schedulers import Schedule, SchedulerInfo
from queue_core.scripts import scripts
from queue_core.types import GroupInfo, JobCounts, RedisClient, as_str

if TYPE_CHECKING:
    from queue_core.metrics import QueueMetrics

__all__ = ["BulkJob", "Queue"]

log = logging.getLogger("queue_core.queue")

_PB = 2**32
_ADD_CHUNK = 500  # jobs per add script call; a bulk pipelines its chunks in one round trip


def _glob_escape(text: str) -> str:
    for char in "\\*?[]":
        text = text.replace(char, "\\" + char)
    return text


def _pack(value: Any) -> bytes:
    # Redis' Lua cmsgpack predates msgpack's bin type: send bytes as (8-bit clean) raw strings.
    return msgpack.packb(value, use_bin_type=False)  # type: ignore[no-any-return]


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


def job_counts_from_reply(reply: Sequence[Any]) -> JobCounts:
    """`JobCounts` from the reply of the `get_counts` script."""
    r = [int(x) for x in reply]
    return JobCounts(
        waiting=r[0],
        prioritized=r[1],
        delayed=r[2],
        active=r[3],
        completed=r[4],
        failed=r[5],
        waiting_children=r[6],
        paused=bool(r[7]),
        groups=r[8],
        grouped_waiting=r[9],
    )


def group_info_from_reply(reply: Sequence[Any]) -> GroupInfo:
    """`GroupInfo` from the reply of `group_control info`."""
    r = [int(float(x)) for x in reply]
    return GroupInfo(
        waiting=r[0],
        active=r[1],
        paused=bool(r[2]),
        held_until=r[3],
        concurrency=r[4],
        rate_limit_max=r[5],
        rate_limit_duration=r[6],
    )


@dataclass(slots=True)
class BulkJob:
    name: str
    data: Any = None
    options: JobOptions | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


class Queue:
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
        # redis-py's overloaded reply types do not narrow for async clients: call through Any
        self._r: Any = self.redis
        self.default_options = default_options or JobOptions()
        if max_payload_bytes <= 0:
            raise InvalidOptionError("max_payload_bytes", "must be positive")
        self.max_payload_bytes = max_payload_bytes
        self._scripts = scripts()
        self._base = self.keys.base
        self._route = [self.keys.meta]
        self._pending: list[tuple[list[Any], asyncio.Future[tuple[str, int, Any]]]] = []
        self._flush_scheduled = False
        self._flushing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: FinishWaiters | None = None
        self._registered = False  # in the registry `<prefix>:queues` (see queue_core.registry)

    def __repr__(self) -> str:
        return f"Queue({self.name!r}, base={self._base!r})"

    async def close(self) -> None:
        if self._waiters is not None:
            await self._waiters.close()
        for task in list(self._tasks):
            await task
        if self._own:
            await self.redis.aclose()

    async def _call(self, script: str, *args: Any, routed_only: bool = False) -> Any:
        # routed_only: the script takes no queue base (it reaches several queues of the tag)
        argv = list(args) if routed_only else [self._base, *args]
        try:
            return await self._scripts[script](self.redis, self._route, argv)
        except ResponseError as exc:
            # Scripts refuse invalid operations with error replies ("obliterate: pause the
            # queue first"); callers get our typed error with the same message.
            raise QueueError(str(exc).split(" script:", 1)[0]) from exc

    # -- adding ---------------------------------------------------------------------------

    def _encode(self, name: str, data: Any, opts: JobOptions) -> list[Any]:
        if not isinstance(name, str) or len(name) > 256:
            raise InvalidOptionError("name", "must be a string of at most 256 characters")
        try:
            payload = orjson.dumps(data)
        except TypeError as exc:
            raise SerializationError(f"job data is not JSON-serializable: {exc}") from exc
        if len(payload) > self.max_payload_bytes:
            raise PayloadTooLargeError(len(payload), self.max_payload_bytes)
        control = _control(opts)
        return [*control, ["name", name, "data", payload, *opts.hash_fields()]]

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
                ((job_id, status, extra),) = await self._add_many([args])
            finally:
                self._flushing = False
                if self._pending and not self._flush_scheduled:
                    self._flush_scheduled = True
                    asyncio.get_running_loop().call_soon(self._start_flush)
            return self._added_job(job_id, status, extra, name, data, opts)
        fut: asyncio.Future[tuple[str, int, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((args, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        job_id, status, extra = await fut
        return self._added_job(job_id, status, extra, name, data, opts)

    def _added_job(
        self, job_id: str, status: int, extra: Any, name: str, data: Any, opts: JobOptions
    ) -> Job:
        if status == -1:
            raise GroupFullError(opts.group or "", opts.group_max_size)
        if status == 0 and extra:
            job = Job.from_flat(self, job_id, extra)
        else:
            job = Job(self, job_id, name, data)
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

    async def _flush(
        self, batch: list[tuple[list[Any], asyncio.Future[tuple[str, int, Any]]]]
    ) -> None:
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

    async def _add_many(self, encoded: Sequence[list[Any]]) -> list[tuple[str, int, Any]]:
        chunks: list[list[Any]] = []
        for start in range(0, len(encoded), _ADD_CHUNK):
            chunks.append([self._base, _pack(encoded[start : start + _ADD_CHUNK])])
        script = self._scripts["add_jobs"]
        if len(chunks) == 1:
            replies = [await script(self.redis, self._route, chunks[0])]
        else:
            replies = await self._pipeline_script(script.name, chunks)
        if not self._registered:
            await self._register()
        out: list[tuple[str, int, Any]] = []
        for reply in replies:
            for i in range(0, len(reply), 3):
                raw_id = reply[i]
                out.append(
                    (
                        raw_id.decode() if isinstance(raw_id, bytes) else raw_id,
                        int(reply[i + 1]),
                        reply[i + 2],
                    )
                )
        return out

    async def _pipeline_script(self, name: str, arg_lists: list[list[Any]]) -> list[Any]:
        """Run one script several times in one round trip (not atomic across calls)."""
        script = self._scripts[name]
        for attempt in range(2):
            pipe = self._r.pipeline(transaction=False)
            for args in arg_lists:
                # (execute_command: redis-py's cluster pipeline refuses its evalsha method)
                pipe.execute_command("EVALSHA", script.sha, len(self._route), *self._route, *args)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt:
                    raise
                await self._r.script_load(script.source)
        raise AssertionError("unreachable")  # pragma: no cover

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
        jobs_out = []
        for (name, data, opts), (job_id, status, extra) in zip(prepared, results, strict=True):
            jobs_out.append(self._added_job(job_id, status, extra, name, data, opts))
        return jobs_out

    # -- settings ---------------------------------------------------------------------------

    async def configure(self, settings: QueueSettings) -> None:
        """Store queue-wide settings (read by every worker on its next fetch)."""
        sets: dict[str, Any] = {
            "gc": settings.group_concurrency,
            "strict": "1" if settings.strict_group_order else "0",
            "maxev": settings.max_events,
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
        await self._configure(sets, deletes)
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

    async def _configure(self, sets: dict[str, Any], deletes: Sequence[str] = ()) -> None:
        args: list[Any] = [len(sets)]
        for k, v in sets.items():
            args += [k, v]
        args += list(deletes)
        await self._call("configure", *args)

    def dead_letter_queue(self, name: str | None = None) -> Queue:
        """The `Queue` object of a dead-letter queue that shares this queue's hash tag."""
        return Queue(name or f"{self.name}-dlq", self.redis, prefix=self.prefix, tag=self.keys.tag)

    async def pause(self) -> None:
        """Stop all workers from starting jobs (active ones finish; delayed ones still promote)."""
        await self._configure({"paused": "1"})

    async def resume(self) -> None:
        await self._configure({"paused": "0"})

    async def is_paused(self) -> bool:
        return await self._r.hget(self.keys.meta, "paused") in (b"1", "1")

    # -- inspection ---------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        raw = await self._r.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return Job.from_hash(self, job_id, raw)

    async def get_state(self, job_id: str) -> JobState | None:
        """The job's state, or None when no such job exists."""
        raw = await self._call("get_state", job_id)
        state = as_str(raw)
        return None if state == "missing" else JobState(state)

    async def get_job_counts(self) -> JobCounts:
        return job_counts_from_reply(await self._call("get_counts"))

    async def get_metrics(self, minutes: int = 60) -> QueueMetrics:
        """Completed/failed jobs per minute for the last `minutes` complete minutes, totals and
        the processing-time histogram (see `queue_core.metrics`)."""
        from queue_core.metrics import get_metrics

        return await get_metrics(self, minutes)

    async def list_job_ids(
        self, state: JobState | str, start: int = 0, count: int = 100
    ) -> list[str]:
        """Ids in one state, paged. Waiting lists ungrouped jobs first, then each group in name
        order; completed and failed list the newest first; the others in processing order."""
        state = JobState(state)
        if start < 0 or count < 0:
            raise InvalidOptionError("start", "start and count must not be negative")
        r = self._r
        k = self.keys.key
        raw: list[Any]
        if state is JobState.WAITING:
            raw = list(await r.zrangebyscore(k("wait"), "-inf", f"({_PB}", start=start, num=count))
            if len(raw) < count:
                skip = max(0, start - await r.zcount(k("wait"), "-inf", f"({_PB}"))
                for gid in await r.zrange(k("groups"), 0, -1):
                    gname = gid.decode() if isinstance(gid, bytes) else gid
                    size = await r.llen(self.keys.group(gname))
                    if skip >= size:
                        skip -= size
                        continue
                    need = count - len(raw)
                    raw += await r.lrange(self.keys.group(gname), skip, skip + need - 1)
                    skip = 0
                    if len(raw) >= count:
                        break
        elif state is JobState.PRIORITIZED:
            raw = await r.zrangebyscore(k("wait"), _PB, "+inf", start=start, num=count)
        elif state in (JobState.COMPLETED, JobState.FAILED):
            raw = await r.zrevrange(k(state.value), start, start + count - 1)
        elif state in (JobState.DELAYED, JobState.ACTIVE):
            raw = await r.zrange(k(state.value), start, start + count - 1)
        elif state is JobState.WAITING_CHILDREN:
            raw = await r.zrange(k("wc"), start, start + count - 1)
        else:
            raise InvalidOptionError("state", f"cannot list jobs in state {state.value!r}")
        return [as_str(x) for x in raw]

    async def list_jobs(self, state: JobState | str, start: int = 0, count: int = 100) -> list[Job]:
        ids = await self.list_job_ids(state, start, count)
        if not ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        hashes = await pipe.execute()
        return [Job.from_hash(self, i, h) for i, h in zip(ids, hashes, strict=True) if h]

    async def get_job_logs(self, job_id: str, start: int = 0, end: int = -1) -> list[str]:
        lines = await self._r.lrange(self.keys.logs(job_id), start, end)
        return [as_str(x) for x in lines]

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
        entries = await self._r.xrevrange(self.keys.events, count=lookback)
        for _, raw in entries:
            fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
            jid = fields.get("id")
            if jid is None or (jid.decode() if isinstance(jid, bytes) else jid) != job_id:
                continue
            event = fields.get("e")
            event = event.decode() if isinstance(event, bytes) else event
            if event in ("completed", "failed"):
                raw_payload = fields.get("rv" if event == "completed" else "err", b"")
                payload = raw_payload.decode() if isinstance(raw_payload, bytes) else raw_payload
                return str(event), payload or ""
        return None

    # -- job operations used by Job ---------------------------------------------------------

    async def _update_progress(self, job_id: str, encoded: bytes) -> None:
        if not await self._call("job_progress", job_id, encoded):
            raise JobNotFoundError(f"no job {job_id!r} in queue {self.name!r}")

    async def _children(self, job_id: str, failed: bool) -> dict[tuple[str, str], Any]:
        raw = await self._r.hgetall(self.keys.key(f"{'cfail' if failed else 'cres'}:{job_id}"))
        out: dict[tuple[str, str], Any] = {}
        for key, value in raw.items():
            base, _, child_id = as_str(key).rpartition("|")
            out[(base, child_id)] = as_str(value) if failed else orjson.loads(value)
        return out

    async def _add_log(self, job_id: str, line: str, keep: int) -> int:
        return int(await self._call("job_log", job_id, line, keep))

    # -- admin --------------------------------------------------------------------------------

    async def remove(self, job_id: str, *, force: bool = False) -> bool:
        """Remove a job. An active job is refused (`QueueError`) unless `force=True`."""
        r = int(await self._call("remove_job", job_id, "1" if force else "0"))
        if r == -1:
            raise QueueError(f"job {job_id!r} is active; use force=True to remove it anyway")
        return r == 1

    async def drain(self, *, delayed: bool = False, batch: int = 1000) -> int:
        """Remove all waiting (and optionally delayed) jobs; returns how many were removed."""
        total = 0
        while True:
            removed, remaining = (
                int(x) for x in await self._call("drain", "1" if delayed else "0", batch)
            )
            total += removed
            if remaining <= 0 or removed == 0:
                return total

    async def clean(self, grace_ms: int, state: JobState | str, limit: int = 1000) -> list[str]:
        """Remove up to `limit` jobs in `state` older than `grace_ms`; returns their ids."""
        state = JobState(state)
        if state is JobState.ACTIVE:
            raise InvalidOptionError("state", "active jobs hold a lease and cannot be cleaned")
        if grace_ms < 0 or limit <= 0:
            raise InvalidOptionError("grace_ms", "grace must be >= 0 and limit > 0")
        ids = await self._call("clean", state.value, int(grace_ms), int(limit))
        return [as_str(x) for x in ids]

    async def obliterate(self, *, force: bool = False, batch: int = 1000) -> None:
        """Delete the queue and everything in it. The queue must be paused first."""
        while not int(await self._call("obliterate", "1" if force else "0", batch)):
            pass
        # Keys the scripts cannot enumerate go by pattern: only these kinds, never `<base>:*`,
        # which would also match other queues sharing the tag (a dead-letter queue).
        base = _glob_escape(self._base)
        for kind in ("de", "grl", "w"):
            async for key in self._r.scan_iter(match=f"{base}:{kind}:*", count=1000):
                await self._r.delete(key)
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
        state = JobState(state)
        if state not in (JobState.FAILED, JobState.COMPLETED):
            raise InvalidOptionError("state", "must be failed or completed")
        return int(
            await self._call("retry_jobs", state.value, count, "1" if reset_attempts else "0")
        )

    async def promote_jobs(self, count: int = 1000, job_ids: Sequence[str] = ()) -> int:
        """Make delayed jobs (all, up to `count`, or the listed ones) startable now."""
        return int(await self._call("promote_jobs", count, *job_ids))

    # -- job schedulers --------------------------------------------------------------------------

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
        await self._call(
            "upsert_scheduler", scheduler_id, schedule.to_json(), _pack(template), first or 0,
            schedule.limit or 0,
        )  # fmt: skip
        return first

    async def get_scheduler(self, scheduler_id: str) -> SchedulerInfo | None:
        raw = await self._r.hgetall(self.keys.key(f"sch:{scheduler_id}"))
        if not raw:
            return None
        h = {as_str(k): v for k, v in raw.items()}
        template = msgpack.unpackb(h["tmpl"], raw=False)
        fields = template[-1]
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
        for sid in await self._r.zrange(self.keys.key("sched"), 0, -1):
            info = await self.get_scheduler(as_str(sid))
            if info is not None:
                out.append(info)
        return out

    async def remove_scheduler(self, scheduler_id: str) -> bool:
        """Remove a scheduler and its pending job (a running one finishes)."""
        return bool(await self._call("remove_scheduler", scheduler_id))

    async def _advance_scheduler(self, scheduler_id: str, started_at: int, now_ms: int) -> bool:
        """Schedule the run after `started_at` (a compare-and-set: one caller per run wins)."""
        raw = await self._r.hget(self.keys.key(f"sch:{scheduler_id}"), "spec")
        if raw is None:
            return False
        nxt = Schedule.from_json(raw).next_after(max(started_at, now_ms))
        return bool(await self._call("schedule_next", scheduler_id, started_at, nxt or 0))

    # -- groups --------------------------------------------------------------------------------

    async def _group(self, op: str, group: str, *args: Any) -> Any:
        if not isinstance(group, str) or not group:
            raise InvalidOptionError("group", "must be a non-empty string")
        return await self._call("group_control", op, group, *args)

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
        await self._group("hold", group, int(delay_ms))

    async def get_group_info(self, group: str) -> GroupInfo:
        return group_info_from_reply(await self._group("info", group))

    async def get_group_infos(self, groups: Sequence[str]) -> list[GroupInfo]:
        """`get_group_info` of several groups in one round trip."""
        for group in groups:
            if not isinstance(group, str) or not group:
                raise InvalidOptionError("group", "must be a non-empty string")
        if not groups:
            return []
        replies = await self._pipeline_script(
            "group_control", [[self._base, "info", group] for group in groups]
        )
        return [group_info_from_reply(reply) for reply in replies]

    async def list_groups(self, start: int = 0, count: int = 100) -> list[str]:
        """Groups that have waiting or active jobs or settings of their own, by name."""
        raw = await self._r.zrange(self.keys.key("groups"), start, start + count - 1)
        return [as_str(x) for x in raw]

    async def list_group_jobs(self, group: str, start: int = 0, count: int = 100) -> list[str]:
        raw = await self._r.lrange(self.keys.group(group), start, start + count - 1)
        return [as_str(x) for x in raw]
