"""The one seam between queue-core's Python classes and Redis.

Every Lua script has exactly one method here whose parameters are the script's ARGV contract
(see the header comment of each `lua/<name>.lua`) and whose reply is decoded into a typed value.
`Queue`, `Worker`, `Job`, flows and metrics reach Redis only through a `Storage`, so argument
order, reply shapes, NOSCRIPT recovery and error mapping live in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.exceptions import NoScriptError, ResponseError

from queue_core.connection import pipe_of
from queue_core.errors import QueueError
from queue_core.keys import QueueKeys
from queue_core.scripts import Script, scripts
from queue_core.types import GroupInfo, JobCounts, RedisClient, as_str

__all__ = [
    "AddReply",
    "FetchReply",
    "Leased",
    "Storage",
    "SweepReply",
    "pack",
]

_PB = 2**32


def pack(value: Any) -> bytes:
    # Redis' Lua cmsgpack predates msgpack's bin type: send bytes as (8-bit clean) raw strings.
    return msgpack.packb(value, use_bin_type=False)  # type: ignore[no-any-return]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(slots=True)  # (not frozen: a bulk add makes thousands, and frozen __init__ is slow)
class AddReply:
    """One job of an `add_jobs` call. status: 1 added, 0 duplicate job id (`existing` is the
    stored hash as a flat field/value list), 2 deduplicated (`job_id` is the existing job),
    -1 group full."""

    job_id: str
    status: int
    existing: list[Any] | None


@dataclass(slots=True)
class Leased:
    """A job leased to a worker: its id, lease token and hash (flat field/value list)."""

    job_id: str
    token: str
    fields: list[Any]


@dataclass(frozen=True, slots=True)
class FetchReply:
    """Reply of `finish_fetch`: per finished entry 1 applied / 0 replay / -1 lease lost; the
    jobs leased now; the jobs found in the worker's handoff inbox (leased earlier, JSON);
    ms until the next delayed job or group hold (-1: none); the queue's rate-limit wait (ms);
    whether the global concurrency cap is reached."""

    codes: list[int]
    jobs: list[Leased]
    handed: list[bytes | str]
    next_in: int
    rate_limit_ms: int
    maxed: bool


@dataclass(frozen=True, slots=True)
class SweepReply:
    """Reply of `sweep_stalled`. When another worker swept within the interval, `swept` is
    false and `throttled_ms` says when the next sweep is allowed."""

    swept: bool
    requeued: list[str]
    failed: list[str]
    throttled_ms: int


def job_counts(reply: Sequence[Any]) -> JobCounts:
    r = [int(x) for x in reply[:10]]
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


def group_info(reply: Sequence[Any]) -> GroupInfo:
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


class Storage:
    """Redis access of one queue (its keys share one hash tag, so one Cluster slot)."""

    __slots__ = ("_base", "_pipe", "_r", "_route", "_scripts", "keys", "redis")

    def __init__(self, redis: RedisClient, keys: QueueKeys) -> None:
        self.redis = redis
        self._r: Any = redis  # redis-py's overloaded reply types do not narrow for async clients
        self.keys = keys
        self._base = keys.base
        self._route = [keys.meta]
        self._scripts = scripts()
        # script calls go over queue-core's pipelined connection when the client has one
        self._pipe = pipe_of(redis)

    def _call(self, sha: str, *args: Any) -> Any:
        if self._pipe is not None:
            return self._pipe.execute("EVALSHA", sha, *args)
        return self._r.evalsha(sha, *args)

    # -- calling scripts --------------------------------------------------------------------

    async def _eval(self, name: str, *args: Any) -> Any:
        """One script call with the queue base as ARGV[1]. Redis errors propagate unchanged
        (the worker tells transient from permanent ones)."""
        script = self._scripts[name]
        try:
            return await self._call(script.sha, 1, self._route[0], self._base, *args)
        except NoScriptError:
            # the server lost its script cache (restart, SCRIPT FLUSH, a new cluster node)
            await self._r.script_load(script.source)
            return await self._call(script.sha, 1, self._route[0], self._base, *args)

    async def _admin(self, name: str, *args: Any) -> Any:
        """A script that refuses invalid operations with an error reply ("obliterate: pause the
        queue first"): callers get our typed error with the same message."""
        try:
            return await self._eval(name, *args)
        except ResponseError as exc:
            raise QueueError(str(exc).split(" script:", 1)[0]) from exc

    async def _eval_many(self, script: Script, arg_lists: Sequence[Sequence[Any]]) -> list[Any]:
        """One script run several times in one round trip (not atomic across the calls)."""
        for attempt in range(2):
            try:
                if self._pipe is not None:
                    # written back to back on the pipelined connection: one round trip
                    pipe = self._pipe
                    calls = [pipe.execute("EVALSHA", script.sha, 1, *self._route, *args)
                             for args in arg_lists]  # fmt: skip
                    results = await asyncio.gather(*calls, return_exceptions=True)
                    for result in results:
                        if isinstance(result, BaseException):
                            raise result
                    return list(results)
                pipe_ = self._r.pipeline(transaction=False)
                for args in arg_lists:
                    # (execute_command: redis-py's cluster pipeline refuses its evalsha method)
                    pipe_.execute_command("EVALSHA", script.sha, 1, *self._route, *args)
                return list(await pipe_.execute())
            except NoScriptError:
                if attempt:
                    raise
                await self._r.script_load(script.source)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- adding -----------------------------------------------------------------------------

    async def add_jobs(self, chunks: Sequence[bytes]) -> list[AddReply]:
        """`add_jobs`: each chunk is a msgpack array of encoded jobs (see the script); several
        chunks go in one pipelined round trip."""
        if len(chunks) == 1:
            replies = [await self._eval("add_jobs", chunks[0])]
        else:
            replies = await self._eval_many(
                self._scripts["add_jobs"], [(self._base, chunk) for chunk in chunks]
            )
        out: list[AddReply] = []
        for reply in replies:
            for i in range(0, len(reply), 3):
                extra = reply[i + 2]
                out.append(AddReply(_s(reply[i]), int(reply[i + 1]), extra or None))
        return out

    async def add_flow(self, nodes: bytes) -> list[str]:
        """`add_flow` (KEYS routes to the root queue; each node names its own queue base)."""
        script = self._scripts["add_flow"]
        try:
            try:
                ids = await self._call(script.sha, 1, self._route[0], nodes)
            except NoScriptError:
                await self._r.script_load(script.source)
                ids = await self._call(script.sha, 1, self._route[0], nodes)
        except ResponseError as exc:
            raise QueueError(str(exc).split(" script:", 1)[0]) from exc
        return [as_str(x) for x in ids]

    # -- the worker's scripts ---------------------------------------------------------------

    async def finish_fetch(
        self,
        token_prefix: str,
        lease_ms: int,
        want: int,
        block_ms: int,
        histogram: bytes,
        entries: bytes,
    ) -> FetchReply:
        codes, jobs, next_in, rl_ttl, maxed, handed = await self._eval(
            "finish_fetch", token_prefix, lease_ms, want, block_ms, histogram, entries
        )
        leased = [Leased(_s(jobs[i]), _s(jobs[i + 1]), jobs[i + 2]) for i in range(0, len(jobs), 3)]
        return FetchReply(
            [int(c) for c in codes], leased, list(handed), int(next_in), int(rl_ttl), bool(maxed)
        )

    async def extend_locks(self, lease_ms: int, pairs: Sequence[str]) -> list[str]:
        """Renew leases given as id, token, id, token, ...; returns the ids no longer held."""
        return [as_str(x) for x in await self._eval("extend_locks", lease_ms, *pairs)]

    async def sweep_stalled(self, interval_ms: int, max_stalled: int, limit: int) -> SweepReply:
        swept, requeued, failed, wait_ms = await self._eval(
            "sweep_stalled", interval_ms, max_stalled, limit
        )
        return SweepReply(
            bool(int(swept)),
            [as_str(x) for x in requeued],
            [as_str(x) for x in failed],
            int(wait_ms),
        )

    async def push_inbox(self, inbox: str) -> None:
        """Wake a worker blocked on its handoff inbox (an empty entry is a poke)."""
        await self._r.rpush(inbox, "")

    async def pop_inbox(self, inbox: str, timeout: float) -> Any:
        return await self._r.blpop([inbox], timeout=timeout)

    # -- settings ---------------------------------------------------------------------------

    async def configure(self, sets: dict[str, Any], deletes: Sequence[str] = ()) -> None:
        args: list[Any] = [len(sets)]
        for k, v in sets.items():
            args += [k, v]
        await self._admin("configure", *args, *deletes)

    async def is_paused(self) -> bool:
        return await self._r.hget(self.keys.meta, "paused") in (b"1", "1")

    # -- single jobs ------------------------------------------------------------------------

    async def job_hash(self, job_id: str) -> dict[Any, Any]:
        return await self._r.hgetall(self.keys.job(job_id))  # type: ignore[no-any-return]

    async def job_hashes(self, job_ids: Sequence[str]) -> list[dict[Any, Any]]:
        pipe = self._r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
        return list(await pipe.execute())

    async def job_field(self, job_id: str, field: str) -> Any:
        return await self._r.hget(self.keys.job(job_id), field)

    async def get_state(self, job_id: str) -> str:
        """A JobState value, or 'missing'."""
        return as_str(await self._admin("get_state", job_id))

    async def job_progress(self, job_id: str, encoded: bytes) -> bool:
        return bool(await self._admin("job_progress", job_id, encoded))

    async def job_log(self, job_id: str, line: str, keep: int) -> int:
        return int(await self._admin("job_log", job_id, line, keep))

    async def job_logs(self, job_id: str, start: int, end: int) -> list[str]:
        return [as_str(x) for x in await self._r.lrange(self.keys.logs(job_id), start, end)]

    async def children(self, job_id: str, failed: bool) -> dict[Any, Any]:
        kind = "cfail" if failed else "cres"
        return await self._r.hgetall(self.keys.key(f"{kind}:{job_id}"))  # type: ignore[no-any-return]

    async def remove_job(self, job_id: str, force: bool) -> int:
        """1 removed, 0 no such job, -1 active and not forced."""
        return int(await self._admin("remove_job", job_id, "1" if force else "0"))

    # -- counts and listings ----------------------------------------------------------------

    async def get_counts(self) -> JobCounts:
        return job_counts(await self._admin("get_counts"))

    async def counts_and_hash(
        self, key: str, fields: Sequence[str] | None, *, counts: bool
    ) -> tuple[JobCounts | None, int | None, Any]:
        """Optionally the job counts and the dead-letter queue's depth (None: no DLQ), and a
        hash (whole, or `fields` as a dict), in one round trip (the metrics reader)."""
        script = self._scripts["get_counts"]
        for attempt in range(2):
            pipe = self._r.pipeline(transaction=False)
            if counts:
                pipe.execute_command("EVALSHA", script.sha, 1, *self._route, self._base)
            if fields is None:
                pipe.hgetall(key)
            else:
                pipe.hmget(key, list(fields))
            try:
                replies = await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                await self._r.script_load(script.source)
                continue
            raw = replies[-1]
            if fields is not None:
                raw = dict(zip(fields, raw, strict=True))
            if not counts:
                return None, None, raw
            dlq = int(replies[0][10]) if len(replies[0]) > 10 else -1
            return job_counts(replies[0]), (dlq if dlq >= 0 else None), raw
        raise AssertionError("unreachable")  # pragma: no cover

    async def ids_by_score(self, kind: str, lo: Any, hi: Any, start: int, count: int) -> list[str]:
        raw = await self._r.zrangebyscore(self.keys.key(kind), lo, hi, start=start, num=count)
        return [as_str(x) for x in raw]

    async def ids_by_rank(self, kind: str, start: int, stop: int, *, newest: bool) -> list[str]:
        k = self.keys.key(kind)
        raw = await (self._r.zrevrange if newest else self._r.zrange)(k, start, stop)
        return [as_str(x) for x in raw]

    async def ungrouped_waiting(self) -> int:
        return int(await self._r.zcount(self.keys.key("wait"), "-inf", f"({_PB}"))

    async def group_names(self, start: int = 0, stop: int = -1) -> list[str]:
        return [as_str(x) for x in await self._r.zrange(self.keys.key("groups"), start, stop)]

    async def group_size(self, group: str) -> int:
        return int(await self._r.llen(self.keys.group(group)))

    async def group_jobs(self, group: str, start: int, stop: int) -> list[str]:
        return [as_str(x) for x in await self._r.lrange(self.keys.group(group), start, stop)]

    async def recent_events(self, count: int) -> list[tuple[Any, dict[Any, Any]]]:
        return list(await self._r.xrevrange(self.keys.events, count=count))

    # -- admin --------------------------------------------------------------------------------

    async def drain(self, delayed: bool, batch: int) -> tuple[int, int]:
        removed, remaining = await self._admin("drain", "1" if delayed else "0", batch)
        return int(removed), int(remaining)

    async def clean(self, state: str, grace_ms: int, limit: int) -> list[str]:
        return [as_str(x) for x in await self._admin("clean", state, grace_ms, limit)]

    async def obliterate(self, force: bool, batch: int) -> bool:
        """One batch; True when everything the scripts can enumerate is gone."""
        return bool(int(await self._admin("obliterate", "1" if force else "0", batch)))

    async def delete_matching(self, kinds: Sequence[str]) -> None:
        """Delete keys `<base>:<kind>:*` the scripts cannot enumerate. Only these kinds, never
        `<base>:*`, which would also match other queues sharing the tag."""
        base = _glob_escape(self._base)
        for kind in kinds:
            async for key in self._r.scan_iter(match=f"{base}:{kind}:*", count=1000):
                await self._r.delete(key)

    async def retry_jobs(self, state: str, count: int, reset_attempts: bool) -> int:
        return int(await self._admin("retry_jobs", state, count, "1" if reset_attempts else "0"))

    async def promote_jobs(self, count: int, job_ids: Sequence[str]) -> int:
        return int(await self._admin("promote_jobs", count, *job_ids))

    # -- schedulers ---------------------------------------------------------------------------

    async def upsert_scheduler(
        self, scheduler_id: str, spec: bytes, template: bytes, first_ms: int, limit: int
    ) -> None:
        await self._admin("upsert_scheduler", scheduler_id, spec, template, first_ms, limit)

    async def scheduler_hash(self, scheduler_id: str) -> dict[Any, Any]:
        return await self._r.hgetall(self.keys.key(f"sch:{scheduler_id}"))  # type: ignore[no-any-return]

    async def scheduler_spec(self, scheduler_id: str) -> Any:
        return await self._r.hget(self.keys.key(f"sch:{scheduler_id}"), "spec")

    async def scheduler_ids(self) -> list[str]:
        return [as_str(x) for x in await self._r.zrange(self.keys.key("sched"), 0, -1)]

    async def remove_scheduler(self, scheduler_id: str) -> bool:
        return bool(await self._admin("remove_scheduler", scheduler_id))

    async def schedule_next(self, scheduler_id: str, started_at: int, next_ms: int) -> bool:
        return bool(await self._admin("schedule_next", scheduler_id, started_at, next_ms))

    # -- groups ---------------------------------------------------------------------------------

    async def group_control(self, op: str, group: str, *args: Any) -> Any:
        return await self._admin("group_control", op, group, *args)

    async def group_infos(self, groups: Sequence[str]) -> list[GroupInfo]:
        replies = await self._eval_many(
            self._scripts["group_control"], [(self._base, "info", g) for g in groups]
        )
        return [group_info(reply) for reply in replies]


def _glob_escape(text: str) -> str:
    for char in "\\*?[]":
        text = text.replace(char, "\\" + char)
    return text
