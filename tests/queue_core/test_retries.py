"""Retries, backoff, UnrecoverableError, dead letters, per-job timeouts (points 4 and 7)."""

from __future__ import annotations

import asyncio
import time

import pytest

from queue_core import (
    Backoff,
    DelayJob,
    Job,
    JobFailedError,
    JobState,
    Queue,
    QueueSettings,
    UnrecoverableError,
    Worker,
)
from queue_core.types import RedisClient

from .helpers import check_consistency, wait_for


async def test_retries_until_success_with_error_history(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    calls = 0

    async def proc(job: Job) -> str:
        nonlocal calls
        calls += 1
        if job.attempts_made < 2:
            raise RuntimeError(f"boom {job.attempts_made}")
        return "done"

    job = await q.add("x", None, attempts=3)
    worker = Worker(q, proc)
    worker.start()
    assert await q.wait_until_finished(job.id, 5) == "done"
    await worker.close(5)
    stored = await q.get_job(job.id)
    assert stored is not None
    assert calls == 3 and stored.attempts_made == 3 and stored.attempts_started == 3
    assert [e["error"] for e in stored.error_history] == [
        "RuntimeError: boom 0",
        "RuntimeError: boom 1",
    ]
    assert worker.stats["retried"] == 2 and worker.stats["completed"] == 1


async def test_fixed_and_exponential_backoff_timings(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    starts: dict[str, list[float]] = {}

    async def proc(job: Job) -> None:
        starts.setdefault(job.data, []).append(time.monotonic())
        raise RuntimeError("again")

    fixed = await q.add("x", "fixed", attempts=3, backoff=Backoff.fixed(200))
    expo = await q.add("x", "expo", attempts=4, backoff=Backoff.exponential(100))
    worker = Worker(q, proc, concurrency=2)
    worker.start()
    for job in (fixed, expo):
        with pytest.raises(JobFailedError):
            await q.wait_until_finished(job.id, 10)
    await worker.close(5)
    gaps_fixed = [b - a for a, b in zip(starts["fixed"], starts["fixed"][1:], strict=False)]
    gaps_expo = [b - a for a, b in zip(starts["expo"], starts["expo"][1:], strict=False)]
    for gap in gaps_fixed:
        assert 0.19 <= gap <= 0.35, gaps_fixed
    for gap, expected in zip(gaps_expo, (0.1, 0.2, 0.4), strict=True):
        assert expected - 0.01 <= gap <= expected + 0.15, gaps_expo


def test_backoff_compute_jitter_and_cap() -> None:
    b = Backoff.exponential(1000, jitter=0.5, max_delay=3000)
    assert b.compute(1, rng=lambda: 0.0) == 1000
    assert b.compute(2, rng=lambda: 1.0) == 1000  # 2000 * (1 - 0.5)
    assert b.compute(5, rng=lambda: 0.0) == 3000  # capped
    assert Backoff.fixed(700).compute(9) == 700


async def test_custom_backoff_strategy_and_its_give_up(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    seen: list[int] = []

    def strategy(attempts_made: int, exc: BaseException, job: Job) -> int | None:
        seen.append(attempts_made)
        return None if attempts_made >= 2 else 10

    async def proc(job: Job) -> None:
        raise ValueError("nope")

    job = await q.add("x", None, attempts=10, backoff=Backoff("linear-ish", 10))
    worker = Worker(q, proc, backoff_strategies={"linear-ish": strategy})
    worker.start()
    with pytest.raises(JobFailedError):
        await q.wait_until_finished(job.id, 5)
    await worker.close(5)
    assert seen == [1, 2]
    stored = await q.get_job(job.id)
    assert stored is not None and stored.attempts_made == 2


async def test_unrecoverable_error_fails_at_once(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    calls = 0

    async def proc(job: Job) -> None:
        nonlocal calls
        calls += 1
        raise UnrecoverableError("bad input")

    job = await q.add("x", None, attempts=5)
    worker = Worker(q, proc)
    worker.start()
    with pytest.raises(JobFailedError) as info:
        await q.wait_until_finished(job.id, 5)
    await worker.close(5)
    assert calls == 1 and "bad input" in info.value.reason
    assert await q.get_state(job.id) is JobState.FAILED


async def test_final_failure_lands_in_dead_letter_queue_with_history(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(dead_letter_queue=f"{queue_name}-dlq"))
    dlq = q.dead_letter_queue()

    async def proc(job: Job) -> None:
        raise RuntimeError(f"fail #{job.attempts_made + 1}")

    job = await q.add("send", {"to": "x"}, attempts=2)
    worker = Worker(q, proc)
    worker.start()
    with pytest.raises(JobFailedError):
        await q.wait_until_finished(job.id, 5)
    await worker.close(5)
    dead = await dlq.list_jobs(JobState.WAITING)
    assert len(dead) == 1
    d = dead[0]
    assert d.name == "send" and d.data == {"to": "x"}
    assert [e["error"] for e in d.error_history] == [
        "RuntimeError: fail #1",
        "RuntimeError: fail #2",
    ]
    raw = await redis.hgetall(dlq.keys.job(d.id))
    assert raw[b"srcid"] == job.id.encode() and raw[b"srcatm"] == b"2"
    await check_consistency(q)
    await check_consistency(dlq)


async def test_timeout_cancels_and_retries_then_fails(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    cancelled = 0

    async def proc(job: Job) -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled += 1
            raise

    job = await q.add("x", None, timeout=100, attempts=2)
    no_retry = await q.add("x", None, timeout=100, attempts=5, retry_on_timeout=False)
    worker = Worker(q, proc, concurrency=2)
    worker.start()
    for j in (job, no_retry):
        with pytest.raises(JobFailedError) as info:
            await q.wait_until_finished(j.id, 5)
        assert "JobTimeoutError" in info.value.reason
    await worker.close(5)
    assert cancelled == 3
    stored = await q.get_job(no_retry.id)
    assert stored is not None and stored.attempts_made == 1


async def test_processor_timeout_error_is_not_mistaken_for_job_timeout(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)

    async def proc(job: Job) -> None:
        raise TimeoutError("upstream timed out")

    job = await q.add("x", None, timeout=5000, retry_on_timeout=False, attempts=2)
    worker = Worker(q, proc)
    worker.start()
    with pytest.raises(JobFailedError):
        await q.wait_until_finished(job.id, 5)
    await worker.close(5)
    stored = await q.get_job(job.id)
    assert stored is not None and stored.attempts_made == 2, (
        "a processor's own TimeoutError is retried"
    )


async def test_delay_job_does_not_use_an_attempt(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    runs: list[float] = []

    async def proc(job: Job) -> str:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise DelayJob(150)
        return "later"

    job = await q.add("x", None, attempts=1)
    worker = Worker(q, proc)
    worker.start()
    assert await q.wait_until_finished(job.id, 5) == "later"
    await worker.close(5)
    assert runs[1] - runs[0] >= 0.14
    stored = await q.get_job(job.id)
    assert stored is not None and stored.attempts_made == 1


async def test_non_json_return_value_fails_clearly(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)

    async def proc(job: Job) -> object:
        return object()

    job = await q.add("x", None, attempts=3)
    worker = Worker(q, proc)
    worker.start()
    with pytest.raises(JobFailedError) as info:
        await q.wait_until_finished(job.id, 5)
    await worker.close(5)
    assert "return value is not JSON" in info.value.reason
    await wait_for(lambda: worker.stats["failed"] == 1)
