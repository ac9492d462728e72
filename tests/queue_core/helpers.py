"""Test helpers: bounded waiting, a consistency checker, and a collecting processor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from queue_core import Queue
from queue_core.connection import pipe_of
from queue_core.scripts import scripts
from queue_core.types import RedisClient

PB = 2**32


async def wait_for(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Await a condition with a deadline (the condition is polled; nothing else is assumed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


async def check_consistency(queue: Queue) -> dict[str, str]:
    """Assert that every job is in exactly one state and the bookkeeping agrees.

    Returns {job id: state}. Checks: each job hash is referenced by exactly one state structure;
    every referenced id has a hash; active jobs hold a live token; group counters and ready sets
    match the group lists; no job id appears twice in a group list.
    """
    r = queue.redis
    k = queue.keys.key
    where: dict[str, list[str]] = {}

    def note(job_id: Any, state: str) -> None:
        where.setdefault(_s(job_id), []).append(state)

    for set_name, state in (
        ("wait", "waiting"),
        ("active", "active"),
        ("delayed", "delayed"),
        ("completed", "completed"),
        ("failed", "failed"),
        ("wc", "waiting-children"),
    ):
        for job_id in await r.zrange(k(set_name), 0, -1):
            note(job_id, state)
    grouped = 0
    for gid in [_s(g) for g in await r.zrange(k("groups"), 0, -1)]:
        members = [_s(x) for x in await r.lrange(k(f"g:{gid}"), 0, -1)]
        assert len(members) == len(set(members)), f"group {gid} lists a job twice: {members}"
        grouped += len(members)
        for job_id in members:
            note(job_id, f"group:{gid}")
    gw = int(await r.get(k("gw")) or 0)
    assert gw == grouped, f"gw counter {gw} != jobs in group lists {grouped}"

    # every job hash of this queue
    hashes = set()
    async for key in r.scan_iter(match=queue.keys.base + ":j:*", count=1000):
        hashes.add(_s(key).rsplit(":j:", 1)[1])
    problems = []
    for job_id, states in where.items():
        if len(states) != 1:
            problems.append(f"job {job_id} is in {states}")
        if job_id not in hashes:
            problems.append(f"job {job_id} is in {states} but has no hash")
    for job_id in hashes - set(where):
        problems.append(f"job {job_id} has a hash but no state")
    for job_id, states in where.items():
        if states == ["active"]:
            tok = _s(await r.hget(k(f"j:{job_id}"), "tok") or b"")
            if not tok or tok[0] in "rs":
                problems.append(f"active job {job_id} has no live token ({tok!r})")
    # active counts of groups match active jobs
    active_per_group: dict[str, int] = {}
    for job_id, states in where.items():
        if states == ["active"]:
            gid = await r.hget(k(f"j:{job_id}"), "gid")
            if gid is not None:
                active_per_group[_s(gid)] = active_per_group.get(_s(gid), 0) + 1
    for gid in [_s(g) for g in await r.zrange(k("groups"), 0, -1)]:
        a = int(await r.hget(k(f"gm:{gid}"), "a") or 0)
        if a != active_per_group.get(gid, 0):
            problems.append(
                f"group {gid}: counter a={a}, active jobs={active_per_group.get(gid, 0)}"
            )
    assert not problems, "inconsistent queue:\n" + "\n".join(problems)
    return {job_id: states[0] for job_id, states in where.items()}


class Collector:
    """A processor that records what it ran and can be awaited until N jobs have run."""

    def __init__(self, result: Callable[[Any], Any] | None = None) -> None:
        self.seen: list[Any] = []
        self.ids: list[str] = []
        self._result = result
        self._cond = asyncio.Condition()

    async def __call__(self, job: Any) -> Any:
        self.seen.append(job.data)
        self.ids.append(job.id)
        async with self._cond:
            self._cond.notify_all()
        return self._result(job) if self._result else None

    async def wait(self, n: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(lambda: len(self.seen) >= n)


class Faults:
    """Fault injection on a real client: calls of one script raise the queued errors first
    (`pending`), or always while `always` is set. Used as a context manager. Scripts go over
    the client's pipelined connection (queue_core.pipe) when it has one, else `evalsha`."""

    def __init__(self, redis: RedisClient, script: str) -> None:
        self.sha = scripts()[script].sha
        self.redis = redis
        self.pending: list[BaseException] = []
        self.always: BaseException | None = None
        self.raised = 0
        self.calls = 0  # calls of the script, faulty or not
        self._pipe = pipe_of(redis)
        self._target: Any = self._pipe if self._pipe is not None else redis
        self._name = "execute" if self._pipe is not None else "evalsha"
        self._original = getattr(self._target, self._name)

    async def __call__(self, *args: Any) -> Any:
        sha = args[1] if self._pipe is not None else args[0]
        if sha == self.sha:
            self.calls += 1
        if sha == self.sha and (self.pending or self.always is not None):
            self.raised += 1
            raise self.pending.pop(0) if self.pending else self.always  # type: ignore[misc]
        return await self._original(*args)

    def __enter__(self) -> Faults:
        setattr(self._target, self._name, self)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self._target, self._name, self._original)
