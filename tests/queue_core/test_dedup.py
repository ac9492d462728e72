"""Deduplication windows and debounce (coalescing a burst into one job)."""

from __future__ import annotations

import asyncio
import time

import pytest

from queue_core import Dedup, InvalidOptionError, Job, JobState, Queue, QueueEvents, Worker
from queue_core.types import RedisClient

from .helpers import Collector, check_consistency, wait_for


async def test_simple_dedup_lasts_until_the_job_finishes(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    events = QueueEvents(queue_name, redis, block_ms=100)
    await events.read()
    first = await q.add("x", 1, dedup=Dedup("order-7"))
    second = await q.add("x", 2, dedup=Dedup("order-7"))
    assert second.id == first.id
    assert (await q.get_job_counts())["waiting"] == 1
    assert ("deduplicated", first.id) in [(e.event, e.job_id) for e in await events.read()]
    collector = Collector()
    worker = Worker(q, collector)
    worker.start()
    await collector.wait(1)
    await wait_for(lambda: _state(q, first.id, JobState.COMPLETED))
    third = await q.add("x", 3, dedup=Dedup("order-7"))
    assert third.id != first.id, "a finished job no longer deduplicates"
    await collector.wait(2)
    await worker.close(5)
    assert collector.seen == [1, 3]


async def _state(q: Queue, job_id: str, state: JobState) -> bool:
    return await q.get_state(job_id) is state


async def test_ttl_dedup_outlives_the_job(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    collector = Collector()
    worker = Worker(q, collector)
    worker.start()
    a = await q.add("x", "a", dedup=Dedup("ping", ttl=400, mode="ttl"))
    await collector.wait(1)
    await wait_for(lambda: _state(q, a.id, JobState.COMPLETED))
    b = await q.add("x", "b", dedup=Dedup("ping", ttl=400, mode="ttl"))
    assert b.id == a.id, "still inside the 400 ms window"
    await wait_for(lambda: _ttl_gone(redis, q.keys.key("de:ping")), timeout=3)
    c = await q.add("x", "c", dedup=Dedup("ping", ttl=400, mode="ttl"))
    assert c.id != a.id
    await collector.wait(2)
    await worker.close(5)
    assert collector.seen == ["a", "c"]


async def _ttl_gone(redis: RedisClient, key: str) -> bool:
    return not await redis.exists(key)


async def test_debounce_coalesces_a_burst_into_one_delayed_job(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    runs: list[tuple[object, float]] = []

    async def proc(job: Job) -> None:
        runs.append((job.data, time.monotonic()))

    worker = Worker(q, proc)
    worker.start()
    ids = []
    for i in range(4):
        job = await q.add(
            "reply", i, delay=250, group="conv-1", dedup=Dedup("conv-1", mode="debounce")
        )
        last_add = time.monotonic()
        ids.append(job.id)
        await asyncio.sleep(0.05)
    assert len(set(ids)) == 4, "each add replaces the pending job with a new one"
    assert (await q.get_job_counts())["delayed"] == 1
    await wait_for(lambda: len(runs) == 1, timeout=5)
    assert runs[0][0] == 3, "the newest payload runs"
    assert runs[0][1] - last_add >= 0.24, "the delay restarted with the last add"
    # once the job has started, a new message makes a new job (it is not swallowed)
    again = await q.add(
        "reply", 4, delay=10, group="conv-1", dedup=Dedup("conv-1", mode="debounce")
    )
    await wait_for(lambda: len(runs) == 2, timeout=5)
    await worker.close(5)
    assert runs[1][0] == 4 and again.id not in ids
    for old in ids[:3]:
        assert await q.get_job(old) is None, "replaced jobs are removed"
    await check_consistency(q)


def test_dedup_validation() -> None:
    with pytest.raises(InvalidOptionError):
        Dedup("")
    with pytest.raises(InvalidOptionError):
        Dedup("x", mode="ttl")
    with pytest.raises(InvalidOptionError):
        Dedup("x", mode="sometimes")  # type: ignore[arg-type]
