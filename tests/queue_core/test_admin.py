"""Retention, events, inspection and admin operations (points 8, 9 and 10)."""

from __future__ import annotations

import asyncio

import pytest

from queue_core import (
    Dedup,
    Job,
    JobOptions,
    JobState,
    KeepJobs,
    Queue,
    QueueError,
    QueueEvent,
    QueueEvents,
    QueueSettings,
    UnrecoverableError,
    Worker,
)
from queue_core.types import RedisClient

from .helpers import Collector, check_consistency, wait_for


async def _run_all(q: Queue, n: int, proc: Collector | None = None, **kw: object) -> Collector:
    collector = proc or Collector()
    worker = Worker(q, collector, **kw)  # type: ignore[arg-type]
    worker.start()
    await collector.wait(n)
    await worker.close(5)
    return collector


async def test_retention_by_count_deletes_old_jobs(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis, default_options=JobOptions(remove_on_complete=3))
    jobs = [await q.add("x", i) for i in range(10)]
    await _run_all(q, 10)
    kept = await q.list_job_ids(JobState.COMPLETED)
    assert 3 <= len(kept) <= 4, kept
    assert jobs[-1].id in kept and jobs[0].id not in kept
    assert await q.get_job(jobs[0].id) is None, "trimmed jobs are deleted, not just unlisted"
    await check_consistency(q)


async def test_remove_on_complete_true_and_fail_false(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    ok = await q.add("x", "ok", remove_on_complete=True)
    bad = await q.add("x", "bad", remove_on_fail=False)

    async def proc(job: Job) -> str:
        if job.data == "bad":
            raise UnrecoverableError("no")
        return "fine"

    worker = Worker(q, proc)
    worker.start()
    assert await q.wait_until_finished(ok.id, 5) == "fine", "the result travels in the event"
    with pytest.raises(QueueError):
        await q.wait_until_finished(bad.id, 5)
    await worker.close(5)
    assert await q.get_job(ok.id) is None
    assert await q.get_state(bad.id) is JobState.FAILED


async def test_retention_by_age(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis, default_options=JobOptions(remove_on_complete=KeepJobs(age=1)))
    first = await q.add("x", 1)
    await _run_all(q, 1)
    await asyncio.sleep(1.1)  # let the first job age past one second (time passing, not syncing)
    await q.add("x", 2)
    await _run_all(q, 1)
    assert await q.get_job(first.id) is None
    assert len(await q.list_job_ids(JobState.COMPLETED)) == 1


def test_default_retention_is_bounded() -> None:
    opts = JobOptions()
    assert isinstance(opts.remove_on_complete, KeepJobs) and opts.remove_on_complete.count
    assert isinstance(opts.remove_on_fail, KeepJobs) and opts.remove_on_fail.count


async def test_events_stream_is_capped(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(max_events=50))
    for i in range(600):
        await q.add("x", i)
    length = await redis.xlen(q.keys.events)
    assert length < 300, length  # approximate trimming works in whole stream nodes (100 entries)


async def test_events_cover_the_lifecycle(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    events = QueueEvents(queue_name, redis, block_ms=100)
    await events.read()
    bulk = await q.add_bulk([("x", i, JobOptions(attempts=2)) for i in range(3)])
    await q.add("x", "dup", job_id="d-1")
    await q.add("x", "dup", job_id="d-1")
    await q.add("x", "later", delay=50)
    removable = await q.add("x", "gone", delay=60_000)
    await q.remove(removable.id)

    async def proc(job: Job) -> str:
        await job.update_progress(1)
        if job.data == 2 and job.attempts_made == 0:
            raise RuntimeError("once")
        if job.data == "dup":
            raise UnrecoverableError("no")
        return "ok"

    job = await q.add("x", "last")
    worker = Worker(q, proc)
    worker.start()
    await q.wait_until_finished(job.id, 5)
    seen: list[QueueEvent] = []

    async def drained() -> bool:
        seen.extend(await events.read())
        return any(e.event == "drained" for e in seen)

    await wait_for(drained, timeout=5)
    await worker.close(5)
    names = {e.event for e in seen}
    expected = {
        "waiting",
        "delayed",
        "active",
        "progress",
        "completed",
        "failed",
        "retrying",
        "duplicated",
        "removed",
        "drained",
    }
    assert expected <= names, expected - names
    waiting_ids = [e.job_id for e in seen if e.event == "waiting"]
    assert all(j.id in waiting_ids for j in bulk), "a bulk's single entry expands per job"
    completed = [e for e in seen if e.event == "completed" and e.job_id == job.id]
    assert completed and completed[0].return_value == "ok"


async def test_counts_and_paged_listing(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    plain = [await q.add("x", i) for i in range(5)]
    prio = [await q.add("x", i, priority=2) for i in range(2)]
    grouped = [await q.add("x", i, group=g) for i, g in enumerate(["a", "a", "b"])]
    await q.add("x", "d", delay=60_000)
    counts = await q.get_job_counts()
    assert counts == {
        "waiting": 8,
        "prioritized": 2,
        "delayed": 1,
        "active": 0,
        "completed": 0,
        "failed": 0,
        "waiting_children": 0,
        "paused": False,
        "groups": 2,
        "grouped_waiting": 3,
    }
    everything = await q.list_job_ids(JobState.WAITING, 0, 100)
    assert everything == [j.id for j in plain] + [j.id for j in grouped]
    page2 = await q.list_job_ids(JobState.WAITING, 4, 3)
    assert page2 == [plain[4].id, grouped[0].id, grouped[1].id]
    assert await q.list_job_ids(JobState.PRIORITIZED) == [j.id for j in prio]
    listed = await q.list_jobs(JobState.WAITING, 0, 2)
    assert [j.data for j in listed] == [0, 1]
    await check_consistency(q)


async def test_pause_keeps_promoting_delayed_jobs_and_resume_runs_them(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    collector = Collector()
    worker = Worker(q, collector)
    worker.start()
    await q.pause()
    assert await q.is_paused()
    job = await q.add("x", "delayed", delay=200)
    await q.add("x", "plain")
    await wait_for(lambda: _state_is(q, job.id, JobState.WAITING), timeout=3)
    assert collector.seen == [], "nothing starts while paused"
    assert (await q.get_job_counts())["paused"] is True
    await q.resume()
    await collector.wait(2, timeout=5)
    await worker.close(5)
    assert sorted(collector.seen) == ["delayed", "plain"]


async def _state_is(q: Queue, job_id: str, state: JobState) -> bool:
    return await q.get_state(job_id) is state


async def test_drain_clean_and_remove(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    await q.add_bulk([("x", i) for i in range(5)])
    await q.add("x", 1, group="g1")
    await q.add("x", 1, group="g2")
    delayed = await q.add("x", "d", delay=60_000)
    assert await q.drain() == 7
    assert (await q.get_job_counts())["delayed"] == 1 and await q.get_job(delayed.id) is not None
    assert await q.drain(delayed=True) == 1
    counts = await q.get_job_counts()
    assert counts["waiting"] == counts["delayed"] == counts["grouped_waiting"] == 0

    done = [await q.add("x", i) for i in range(4)]
    await _run_all(q, 4)

    # (all four recorded; clean(0) must take a job finished in its own ms too: a sub-ms
    # finishing-order offset in the score once hid it, in CI)
    async def all_completed() -> bool:
        return (await q.get_job_counts())["completed"] == 4

    await wait_for(all_completed)
    assert await q.clean(60_000, JobState.COMPLETED) == [], "grace protects recent jobs"
    assert sorted(await q.clean(0, JobState.COMPLETED, limit=3)) == sorted(j.id for j in done[:3])
    assert await q.get_job(done[0].id) is None
    with pytest.raises(QueueError):
        await q.clean(0, JobState.ACTIVE)

    keep = await q.add("x", "keep")
    assert await q.remove(keep.id) is True
    assert await q.remove(keep.id) is False
    await check_consistency(q)


async def test_remove_refuses_active_job_unless_forced(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    release = asyncio.Event()

    async def proc(job: Job) -> None:
        await release.wait()

    job = await q.add("x", None)
    worker = Worker(q, proc)
    worker.start()
    await wait_for(lambda: worker.active_count == 1)
    with pytest.raises(QueueError, match="active"):
        await q.remove(job.id)
    assert await q.remove(job.id, force=True)
    release.set()
    await worker.close(5)
    assert worker.stats["lost"] == 1, "the worker learns its job is gone"
    await check_consistency(q)


async def test_retry_and_promote_jobs(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    fail_first = True

    async def proc(job: Job) -> str:
        if fail_first:
            raise UnrecoverableError("not yet")
        return "ok"

    jobs = await q.add_bulk([("x", i) for i in range(3)])
    worker = Worker(q, proc)
    worker.start()
    await wait_for(lambda: _count(q, "failed", 3), timeout=5)
    fail_first = False
    assert await q.retry_jobs(JobState.FAILED) == 3
    for job in jobs:
        assert await q.wait_until_finished(job.id, 5) == "ok"
    later = await q.add("x", "later", delay=60_000)
    assert await q.promote_jobs() == 1
    assert await q.wait_until_finished(later.id, 5) == "ok"
    await worker.close(5)
    stored = await q.get_job(jobs[0].id)
    assert stored is not None and stored.attempts_made == 1, "reset_attempts restarts the count"


async def _count(q: Queue, state: str, n: int) -> bool:
    return (await q.get_job_counts())[state] >= n  # type: ignore[literal-required]


async def test_obliterate_requires_pause_and_force_with_active_jobs(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    release = asyncio.Event()

    async def proc(job: Job) -> None:
        await release.wait()

    await q.add_bulk([("x", i) for i in range(20)])
    await q.add("x", 1, group="g", job_id="j-g")
    with pytest.raises(QueueError, match="pause"):
        await q.obliterate()
    worker = Worker(q, proc)
    worker.start()
    await wait_for(lambda: worker.active_count == 1)
    await q.pause()
    with pytest.raises(QueueError, match="active"):
        await q.obliterate()
    await q.obliterate(force=True, batch=7)
    release.set()
    await worker.close(5)  # its late result finds no job: nothing is written back
    leftover = [k async for k in redis.scan_iter(match=f"qc:{{{queue_name}}}*")]
    assert leftover == [], leftover


async def test_obliterate_leaves_queues_sharing_the_tag_alone(
    redis: RedisClient, queue_name: str
) -> None:
    """Regression: the key cleanup by pattern also matched `<base>:<dlq name>:*`."""
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(dead_letter_queue=f"{queue_name}-dlq"))
    dlq = q.dead_letter_queue()
    kept = await dlq.add("x", "dead letter")
    await q.add("x", 1, dedup=Dedup("d"))
    await q.pause()
    await q.obliterate()
    assert await dlq.get_job(kept.id) is not None
    assert [k async for k in redis.scan_iter(match=f"qc:{{{queue_name}}}:de:*")] == []


def test_a_queue_name_that_reads_as_a_key_kind_is_refused_in_a_shared_tag() -> None:
    from queue_core import InvalidOptionError
    from queue_core.keys import QueueKeys

    with pytest.raises(InvalidOptionError):
        QueueKeys.of("de", tag="orders")
    assert QueueKeys.of("de").base == "qc:{de}"  # fine with its own tag
