"""Leases, lost locks, stalled-job recovery, SIGKILL, close() (points 5, 6 and 7)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from queue_core import Job, JobFailedError, JobState, Queue, QueueEvents, Worker
from queue_core.types import RedisClient

from .helpers import Collector, Faults, check_consistency, wait_for

WORKER_SCRIPT = Path(__file__).with_name("worker_process.py")


def spawn_worker(url: str, queue: str, mode: str, concurrency: int = 1) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER_SCRIPT), url, queue, mode, str(concurrency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


async def test_lease_is_renewed_for_long_jobs(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    release = asyncio.Event()

    async def proc(job: Job) -> str:
        await release.wait()
        return "ok"

    job = await q.add("x", None)
    # renewal every 200 ms keeps a 600 ms lease alive with 400 ms of slack for a busy loop
    worker = Worker(q, proc, lock_duration=600, stalled_interval=100)
    sweeper = Worker(q, proc, lock_duration=600, stalled_interval=100)
    worker.start()
    await wait_for(lambda: worker.active_count == 1)
    sweeper.start()
    # three lease lengths pass; renewal keeps the job active and never stalled
    await asyncio.sleep(1.8)
    assert await q.get_state(job.id) is JobState.ACTIVE
    release.set()
    assert await q.wait_until_finished(job.id, 5) == "ok"
    await asyncio.gather(worker.close(5), sweeper.close(5))
    stored = await q.get_job(job.id)
    assert stored is not None and stored.stalled_count == 0 and worker.stats["lost"] == 0


async def test_all_concurrent_leases_renewed_in_one_batch(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    release = asyncio.Event()

    async def proc(job: Job) -> None:
        await release.wait()

    await q.add_bulk([("x", i) for i in range(20)])
    worker = Worker(q, proc, concurrency=20, lock_duration=300)
    worker.start()
    await wait_for(lambda: worker.active_count == 20)
    before = await redis.zrange(q.keys.key("active"), 0, -1, withscores=True)
    await asyncio.sleep(0.25)
    after = await redis.zrange(q.keys.key("active"), 0, -1, withscores=True)
    assert len(after) == 20
    assert min(s for _, s in after) > max(s for _, s in before) - 1, "every lease moved forward"
    release.set()
    await worker.close(5)


async def test_expired_lease_is_taken_over_and_the_slow_worker_is_told(
    redis: RedisClient, queue_name: str
) -> None:
    """A job outlives its lease without renewal (as when Redis was unreachable for the renewal):
    the sweep requeues it, another worker finishes it, and the first worker's late result is
    reported as lost, not written."""
    q = Queue(queue_name, redis)
    slow_started = asyncio.Event()

    async def slow(job: Job) -> str:
        slow_started.set()
        await asyncio.sleep(0.6)
        return "slow"

    async def fast(job: Job) -> str:
        return "fast"

    job = await q.add("x", None)
    # every renewal fails (Redis unreachable for it), so the 200 ms lease expires within the
    # 0.6 s job (workers of one queue share stalled_interval: the first sweep sets the
    # cluster-wide throttle)
    with Faults(redis, "extend_locks") as faults:
        faults.always = ConnectionError("renewal cannot reach Redis")
        slow_worker = Worker(q, slow, lock_duration=200, stalled_interval=50)
        slow_worker.start()
        await asyncio.wait_for(slow_started.wait(), 5)
        # when the slow job returns, its worker sends a stale result
        rescuer = Worker(q, fast, lock_duration=2000, stalled_interval=50)
        rescuer.start()
        assert await q.wait_until_finished(job.id, 5) == "fast"
        await wait_for(lambda: slow_worker.stats["lost"] >= 1)
    await asyncio.gather(slow_worker.close(5), rescuer.close(5))
    stored = await q.get_job(job.id)
    assert stored is not None
    # Order of events is fixed by the blocking sleep: the sweep ran while `slow` was blocked.
    assert stored.stalled_count == 1
    assert stored.return_value == "fast"
    assert slow_worker.stats["lost"] == 1
    await check_consistency(q)


async def test_stolen_lease_is_reported_and_running_job_cancelled(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    cancelled = asyncio.Event()

    async def proc(job: Job) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    job = await q.add("x", None)
    worker = Worker(q, proc, lock_duration=300, lock_renew_interval=60)
    worker.start()
    await wait_for(lambda: worker.active_count == 1)
    # someone else takes the lease (what a takeover after a stall looks like)
    await redis.hset(q.keys.job(job.id), "tok", "other-worker:9")
    await asyncio.wait_for(cancelled.wait(), 5)
    assert worker.stats["lost"] == 1
    await worker.close(5)
    assert await redis.hget(q.keys.job(job.id), "tok") == b"other-worker:9", "never overwritten"


async def test_sigkilled_worker_job_finishes_once_on_another_worker(
    redis: RedisClient, redis_url: str, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    jobs = await q.add_bulk([("x", i) for i in range(3)])
    victim = spawn_worker(redis_url, queue_name, "hang", concurrency=3)
    try:
        await wait_for(lambda: _scard(redis, f"test:{queue_name}:started", 3), timeout=10)
        victim.send_signal(signal.SIGKILL)
        victim.wait(5)
        killed_at = time.monotonic()
        ran: list[str] = []

        async def proc(job: Job) -> str:
            ran.append(job.id)
            return "rescued"

        rescuer = Worker(q, proc, stalled_interval=200, concurrency=3)
        rescuer.start()
        for job in jobs:
            assert await q.wait_until_finished(job.id, 10) == "rescued"
        recovery = time.monotonic() - killed_at
        await rescuer.close(5)
    finally:
        victim.kill()
        victim.wait(5)
        assert victim.stdout is not None
        victim.stdout.close()
    assert sorted(ran) == sorted(j.id for j in jobs), "each job finished exactly once"
    # lease 1000 ms + sweep interval 200 ms bounds the recovery time
    assert recovery < 1.0 + 0.2 + 1.0, recovery
    for job in jobs:
        stored = await q.get_job(job.id)
        assert stored is not None and stored.stalled_count == 1
    await check_consistency(q)
    await redis.delete(f"test:{queue_name}:started")


async def _scard(redis: RedisClient, key: str, n: int) -> bool:
    return int(await redis.scard(key)) >= n  # type: ignore[misc]


async def test_job_failing_by_stalls_beyond_max_stalled_count(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    job = await q.add("x", None)
    events = QueueEvents(queue_name, redis, block_ms=100)
    await events.read()
    # Simulate two workers that died holding the job: lease it, let the lease expire, sweep.
    sweeper = Worker(q, Collector(), lock_duration=100, stalled_interval=20, max_stalled_count=1)
    for _ in range(2):
        reply = await sweeper._finish_fetch([], {}, 1)
        assert len(reply.jobs) == 1
        await asyncio.sleep(0.15)
        await redis.delete(q.keys.key("stall"))
        await sweeper.sweep_stalled()
    assert await q.get_state(job.id) is JobState.FAILED
    stored = await q.get_job(job.id)
    assert stored is not None and stored.failed_reason == "job stalled more than allowable limit"
    assert stored.stalled_count == 2
    names = [e.event for e in await events.read()]
    assert names.count("stalled") == 2 and "failed" in names
    await check_consistency(q)


async def test_exactly_one_stall_sweep_per_interval(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    workers = [Worker(q, Collector(), stalled_interval=1000) for _ in range(5)]
    swept = 0
    for w in workers:
        res = await w.queue._store.sweep_stalled(1000, 1, 1000)
        swept += int(res.swept)
    assert swept == 1


async def test_close_waits_for_running_jobs(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    finished: list[str] = []

    async def proc(job: Job) -> str:
        await asyncio.sleep(0.2)
        finished.append(job.id)
        return "ok"

    await q.add_bulk([("x", i) for i in range(10)])
    worker = Worker(q, proc, concurrency=4)
    worker.start()
    await wait_for(lambda: worker.active_count == 4)
    await worker.close(timeout=5)
    assert len(finished) == 4, "close stops fetching and lets the running jobs finish"
    counts = await q.get_job_counts()
    assert counts["completed"] == 4 and counts["waiting"] == 6 and counts["active"] == 0
    await check_consistency(q)


async def test_close_timeout_returns_running_jobs_to_wait_at_once(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)

    async def proc(job: Job) -> None:
        await asyncio.sleep(60)

    jobs = await q.add_bulk([("x", i) for i in range(3)])
    await q.add("x", "last")
    worker = Worker(q, proc, concurrency=3, lock_duration=30_000)
    worker.start()
    await wait_for(lambda: worker.active_count == 3)
    t0 = time.monotonic()
    await worker.close(timeout=0.2)
    assert time.monotonic() - t0 < 2
    counts = await q.get_job_counts()
    assert counts["active"] == 0 and counts["waiting"] == 4, counts
    # returned jobs keep their place ahead of later jobs, and used no attempt
    collector = Collector()
    w2 = Worker(q, collector, concurrency=1)
    w2.start()
    await collector.wait(4)
    await w2.close(5)
    assert collector.ids[:3] == [j.id for j in jobs] and collector.seen[3] == "last"
    for job in jobs:
        stored = await q.get_job(job.id)
        assert stored is not None and stored.attempts_made == 1 and stored.stalled_count == 0


async def test_sigterm_closes_worker_process_gracefully(
    redis: RedisClient, redis_url: str, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    await q.add_bulk([("x", i) for i in range(200)])
    proc = spawn_worker(redis_url, queue_name, "work", concurrency=5)
    await wait_for(lambda: _llen(redis, f"test:{queue_name}:ran", 10))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stdout is not None
    proc.stdout.close()
    counts = await q.get_job_counts()
    assert counts["active"] == 0, "graceful exit leaves nothing active"
    assert counts["completed"] + counts["waiting"] == 200
    ran = await redis.llen(f"test:{queue_name}:ran")  # type: ignore[misc]
    assert counts["completed"] == ran
    await check_consistency(q)
    await redis.delete(f"test:{queue_name}:ran")


async def _llen(redis: RedisClient, key: str, n: int) -> bool:
    return int(await redis.llen(key)) >= n  # type: ignore[misc]


async def test_wait_until_finished_errors(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    from queue_core import JobNotFoundError

    with pytest.raises(JobNotFoundError):
        await q.wait_until_finished("nope", 1)
    job = await q.add("x", None)
    with pytest.raises(TimeoutError):
        await q.wait_until_finished(job.id, 0.2)

    async def proc(j: Job) -> None:
        raise RuntimeError("x")

    worker = Worker(q, proc)
    worker.start()
    with pytest.raises(JobFailedError):
        await q.wait_until_finished(job.id, 5)
    # after the fact: the stored state answers at once
    with pytest.raises(JobFailedError):
        await q.wait_until_finished(job.id, 1)
    await worker.close(5)


async def test_renewal_racing_our_own_ack_is_not_a_lost_lease(
    redis: RedisClient, queue_name: str
) -> None:
    """The renewal batch includes jobs whose ack is in flight; if the ack lands first, the
    renewal must not report the lease lost (it was released by the same token)."""
    q = Queue(queue_name, redis)
    await q.add("x", None)
    worker = Worker(q, Collector())
    reply = await worker._finish_fetch([], {}, 1)
    job_id, token = reply.jobs[0].job_id, reply.jobs[0].token
    await worker._finish_fetch([[job_id, token, "c", b"null", 1]], {}, 0)
    lost = await q._store.extend_locks(1000, [job_id, token])
    assert lost == []
    stolen = await q._store.extend_locks(1000, [job_id, "other:1"])
    assert stolen == [job_id]
