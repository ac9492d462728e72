"""Job schedulers: interval and cron (with time zone), one pending job, no duplicate runs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from queue_core import InvalidOptionError, Job, JobState, Queue, Schedule, Worker
from queue_core.types import RedisClient

from .helpers import check_consistency, wait_for


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def test_interval_is_aligned_to_the_clock() -> None:
    s = Schedule(every_ms=1000)
    assert s.next_after(1_700_000_000_123) == 1_700_000_001_000
    assert s.next_after(1_700_000_001_000) == 1_700_000_002_000


def test_cron_in_a_time_zone_across_dst() -> None:
    s = Schedule(cron="0 9 * * *", tz="Europe/Berlin")
    # the night before the spring change (2026-03-29 02:00 CET -> 03:00 CEST)
    before = _ms(datetime(2026, 3, 28, 12, 0, tzinfo=UTC))
    first = s.next_after(before)
    second = s.next_after(first)  # type: ignore[arg-type]
    assert first == _ms(datetime(2026, 3, 29, 7, 0, tzinfo=UTC))  # 09:00 CEST = 07:00 UTC
    assert second == _ms(datetime(2026, 3, 30, 7, 0, tzinfo=UTC))
    winter = s.next_after(_ms(datetime(2026, 1, 10, 12, 0, tzinfo=UTC)))
    assert winter == _ms(datetime(2026, 1, 11, 8, 0, tzinfo=UTC))  # 09:00 CET = 08:00 UTC


def test_schedule_window_and_validation() -> None:
    end = datetime(2030, 1, 1, 0, 0, 3, tzinfo=UTC)
    s = Schedule(every_ms=1000, end_at=end)
    assert s.next_after(_ms(end) - 500) == _ms(end)
    assert s.next_after(_ms(end)) is None
    for bad in (
        {},
        {"every_ms": 1000, "cron": "* * * * *"},
        {"cron": "not a cron"},
        {"every_ms": 1000, "tz": "Mars/Olympus"},
        {"every_ms": 5},
    ):
        with pytest.raises(InvalidOptionError):
            Schedule(**bad)  # type: ignore[arg-type]


async def test_three_workers_run_each_period_once(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    runs: list[int] = []

    async def proc(job: Job) -> None:
        assert job.scheduled_at is not None
        runs.append(job.scheduled_at)

    first = await q.upsert_scheduler("tick", Schedule(every_ms=200), "tick", {"k": 1})
    assert first is not None
    # upserting the same schedule again (e.g. every service replica on startup) changes nothing
    assert await q.upsert_scheduler("tick", Schedule(every_ms=200), "tick", {"k": 1}) == first
    assert (await q.get_job_counts())["delayed"] == 1
    workers = [Worker(q, proc, concurrency=3) for _ in range(3)]
    for w in workers:
        w.start()
    await wait_for(lambda: len(runs) >= 6, timeout=5)
    await asyncio.gather(*(w.close(5) for w in workers))
    assert len(runs) == len(set(runs)), f"a period ran twice: {runs}"
    assert runs == sorted(runs) and all((r - first) % 200 == 0 for r in runs), runs
    # (a run that starts more than a period late skips the overdue period instead of bursting)
    counts = await q.get_job_counts()
    assert counts["delayed"] + counts["waiting"] == 1, "exactly one pending run"
    info = await q.get_scheduler("tick")
    assert info is not None and info.runs >= 6 and info.job_name == "tick"
    await check_consistency(q)


async def test_advance_is_a_compare_and_set_even_with_skewed_clocks(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    first = await q.upsert_scheduler("s", Schedule(every_ms=1000), "x")
    assert first is not None
    # two workers started the same run; their clocks disagree by 700 ms
    results = await asyncio.gather(
        q._advance_scheduler("s", first, first + 10), q._advance_scheduler("s", first, first + 710)
    )
    assert sorted(results) == [False, True]
    pending = await q.list_job_ids(JobState.DELAYED)
    assert len(pending) == 2  # the run that started (still delayed here) and exactly one next
    assert f"sch:s:{first + 1000}" in pending


async def test_upsert_with_a_new_schedule_replaces_the_pending_job(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    await q.upsert_scheduler("daily", Schedule(cron="0 3 * * *"), "report")
    await q.upsert_scheduler("daily", Schedule(cron="30 4 * * *"), "report")
    pending = await q.list_job_ids(JobState.DELAYED)
    info = await q.get_scheduler("daily")
    assert info is not None and pending == [f"sch:daily:{info.next_run_ms}"]
    assert datetime.fromtimestamp(info.next_run_ms / 1000, UTC).strftime("%H:%M") == "04:30"
    assert [s.id for s in await q.list_schedulers()] == ["daily"]
    assert await q.remove_scheduler("daily") is True
    assert await q.remove_scheduler("daily") is False
    assert await q.list_job_ids(JobState.DELAYED) == [] and await q.list_schedulers() == []


async def test_limit_and_cron_with_seconds(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    runs: list[int] = []

    async def proc(job: Job) -> None:
        runs.append(job.scheduled_at or 0)

    await q.upsert_scheduler("sec", Schedule(cron="* * * * * *", limit=2), "x")
    worker = Worker(q, proc)
    worker.start()
    await wait_for(lambda: len(runs) == 2, timeout=5)
    await worker.close(5)
    assert runs[1] - runs[0] == 1000
    assert (await q.get_job_counts())["delayed"] == 0, "the limit ended the schedule"
    assert await q.list_schedulers() == []


async def test_sweep_restores_a_vanished_pending_run(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    first = await q.upsert_scheduler("s", Schedule(every_ms=10_000), "x")
    await q.remove(f"sch:s:{first}")  # an operator removed the pending run by hand
    # pretend that run is long overdue, then let a sweep look at it
    await redis.zadd(q.keys.key("sched"), {"s": 1})
    await redis.hset(q.keys.key("sch:s"), "next", 1)
    worker = Worker(q, lambda job: asyncio.sleep(0), stalled_interval=50)
    await worker.sweep_stalled()
    assert await q.get_job("sch:s:1") is not None, "the missing run was re-created"
