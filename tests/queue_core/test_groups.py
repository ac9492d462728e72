"""Groups: per-conversation order, fair turns, weights, per-group concurrency and rate limits."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict

import pytest

from queue_core import (
    Backoff,
    BulkJob,
    GroupFullError,
    GroupRateLimitError,
    Job,
    JobOptions,
    Queue,
    QueueSettings,
    Worker,
)
from queue_core.types import RedisClient

from .helpers import check_consistency, wait_for


async def test_groups_keep_order_under_random_failures_and_retries(
    redis: RedisClient, queue_name: str
) -> None:
    """200 groups x 50 jobs, 4 workers at concurrency 50, ~15% failures with retries: every
    group completes its jobs in enqueue order."""
    q = Queue(queue_name, redis)
    groups, per_group = 200, 50
    rng = random.Random(7)
    items = [
        BulkJob(
            "m",
            {"g": g, "i": i},
            overrides={"group": f"g{g}", "attempts": 20, "backoff": Backoff.fixed(5)},
        )
        for i in range(per_group)
        for g in range(groups)
    ]
    await q.add_bulk(items)
    completed: dict[int, list[int]] = defaultdict(list)
    active: dict[int, int] = defaultdict(int)
    overlap = 0

    async def proc(job: Job) -> None:
        nonlocal overlap
        g, i = job.data["g"], job.data["i"]
        active[g] += 1
        if active[g] > 1:
            overlap += 1
        try:
            await asyncio.sleep(0)
            if rng.random() < 0.15:
                raise RuntimeError("flaky")
            completed[g].append(i)
        finally:
            active[g] -= 1

    workers = [Worker(q, proc, concurrency=50) for _ in range(4)]
    for w in workers:
        w.start()
    await wait_for(
        lambda: sum(len(v) for v in completed.values()) == groups * per_group, timeout=60
    )
    await asyncio.gather(*(w.close(5) for w in workers))
    assert overlap == 0, "group concurrency 1 means one job of a group at a time, across workers"
    for g in range(groups):
        assert completed[g] == list(range(per_group)), (
            f"group {g} out of order: {completed[g][:10]}"
        )
    assert sum(w.stats["retried"] for w in workers) > 500
    await check_consistency(q)


async def test_a_big_backlog_does_not_starve_small_groups(
    redis: RedisClient, queue_name: str
) -> None:
    """One group with 20,000 jobs added first, then 100 groups with 5 each: the small groups all
    finish long before the big one (the big group may run 10 at a time)."""
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(group_concurrency=10))
    await q.add_bulk(
        [BulkJob("m", {"g": "big"}, overrides={"group": "big"}) for _ in range(20_000)]
    )
    await q.add_bulk(
        [
            BulkJob("m", {"g": f"s{g}"}, overrides={"group": f"s{g}"})
            for g in range(100)
            for _ in range(5)
        ]
    )
    done: dict[str, int] = defaultdict(int)
    big_done_when_small_finished: list[int] = []

    async def proc(job: Job) -> None:
        done[job.data["g"]] += 1
        small = sum(v for k, v in done.items() if k != "big")
        if small == 500 and not big_done_when_small_finished:
            big_done_when_small_finished.append(done["big"])

    worker = Worker(q, proc, concurrency=10)
    worker.start()
    await wait_for(lambda: bool(big_done_when_small_finished), timeout=60)
    await worker.close(5)
    # Round-robin gives every ready group one turn per round: 5 rounds for the small groups,
    # in which the big group also gets about one turn each (plus what runs concurrently).
    assert big_done_when_small_finished[0] < 100, big_done_when_small_finished


async def test_weights_give_proportional_turns(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(group_concurrency=50))
    await q.add_bulk(
        [BulkJob("m", "heavy", overrides={"group": "heavy", "group_weight": 3}) for _ in range(400)]
    )
    await q.add_bulk([BulkJob("m", "light", overrides={"group": "light"}) for _ in range(400)])
    order: list[str] = []

    async def proc(job: Job) -> None:
        order.append(job.data)

    worker = Worker(q, proc, concurrency=1)
    worker.start()
    await wait_for(lambda: len(order) >= 200, timeout=20)
    await worker.close(5)
    first = order[:200]
    ratio = first.count("heavy") / max(1, first.count("light"))
    assert 2.5 <= ratio <= 3.5, ratio


async def test_priority_orders_groups_and_ungrouped_jobs_win_ties(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    await q.add("m", "g-p5", group="a", priority=5)
    await q.add("m", "u-p5", priority=5)
    await q.add("m", "g-p1", group="b", priority=1)
    await q.add("m", "u-p3", priority=3)
    order: list[str] = []

    async def proc(job: Job) -> None:
        order.append(job.data)

    worker = Worker(q, proc)
    worker.start()
    await wait_for(lambda: len(order) == 4)
    await worker.close(5)
    assert order == ["g-p1", "u-p3", "u-p5", "g-p5"]


async def test_group_concurrency_is_global_and_overridable(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(group_concurrency=2))
    await q.set_group_concurrency("wide", 5)
    await q.add_bulk([BulkJob("m", "narrow", overrides={"group": "narrow"}) for _ in range(30)])
    await q.add_bulk([BulkJob("m", "wide", overrides={"group": "wide"}) for _ in range(30)])
    active: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    count = 0

    async def proc(job: Job) -> None:
        nonlocal count
        g = job.data
        active[g] += 1
        peak[g] = max(peak[g], active[g])
        await asyncio.sleep(0.01)
        active[g] -= 1
        count += 1

    workers = [Worker(q, proc, concurrency=10) for _ in range(3)]
    for w in workers:
        w.start()
    await wait_for(lambda: count == 60, timeout=20)
    await asyncio.gather(*(w.close(5) for w in workers))
    assert peak["narrow"] == 2 and peak["wide"] == 5, dict(peak)
    info = await q.get_group_info("wide")
    assert info["concurrency"] == 5
    await q.set_group_concurrency("wide", None)
    assert (await q.get_group_info("wide"))["concurrency"] == 2


async def test_strict_order_survives_a_retry_with_backoff(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    for i in range(3):
        await q.add("m", i, group="conv", attempts=3, backoff=Backoff.fixed(150))
    runs: list[tuple[int, float]] = []

    async def proc(job: Job) -> None:
        runs.append((job.data, time.monotonic()))
        if job.data == 0 and job.attempts_made == 0:
            raise RuntimeError("first try fails")

    worker = Worker(q, proc, concurrency=5)
    worker.start()
    await wait_for(lambda: len(runs) == 4, timeout=5)
    await worker.close(5)
    assert [d for d, _ in runs] == [0, 0, 1, 2], "the retried head keeps its place"
    assert runs[1][1] - runs[0][1] >= 0.14, "the group waited out the backoff"


async def test_non_strict_queue_lets_later_jobs_pass_a_retrying_one(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(strict_group_order=False))
    for i in range(3):
        await q.add("m", i, group="conv", attempts=3, backoff=Backoff.fixed(200))
    order: list[int] = []

    async def proc(job: Job) -> None:
        order.append(job.data)
        if job.data == 0 and job.attempts_made == 0:
            raise RuntimeError("fails")

    worker = Worker(q, proc)
    worker.start()
    await wait_for(lambda: len(order) == 4, timeout=5)
    await worker.close(5)
    assert order == [0, 1, 2, 0]


async def test_group_rate_limit_error_holds_only_that_group(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    await q.add("m", "a1", group="a", attempts=1)
    await q.add("m", "a2", group="a")
    await q.add_bulk([BulkJob("m", f"b{i}", overrides={"group": "b"}) for i in range(5)])
    seen: list[tuple[str, float]] = []
    limited = False

    async def proc(job: Job) -> None:
        nonlocal limited
        seen.append((job.data, time.monotonic()))
        if job.data == "a1" and not limited:
            limited = True
            raise GroupRateLimitError(300)

    t0 = time.monotonic()
    worker = Worker(q, proc, concurrency=2)
    worker.start()
    await wait_for(lambda: len(seen) == 8, timeout=5)
    await worker.close(5)
    order = [d for d, _ in seen]
    assert order.index("b4") < order.index("a2"), "group b kept flowing while a was held"
    a1_runs = [t for d, t in seen if d == "a1"]
    assert len(a1_runs) == 2 and a1_runs[1] - t0 >= 0.29, "a1 ran again after the hold"
    assert order.index("a2") > len(order) - 2 - 1, "a2 stayed behind a1"
    stored = next(j for j in await q.list_jobs("completed", 0, 100) if j.data == "a1")
    assert stored.attempts_made == 1, "a rate-limited run used no attempt"


async def test_per_group_rate_limit_with_concurrency(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(group_concurrency=3, group_rate_limit=(5, 200)))
    await q.add_bulk([BulkJob("m", "a", overrides={"group": "a"}) for _ in range(20)])
    await q.add_bulk([BulkJob("m", "b", overrides={"group": "b"}) for _ in range(20)])
    starts: dict[str, list[float]] = defaultdict(list)
    active: dict[str, int] = defaultdict(int)
    peak = 0

    async def proc(job: Job) -> None:
        nonlocal peak
        starts[job.data].append(time.monotonic())
        active[job.data] += 1
        peak = max(peak, active[job.data])
        await asyncio.sleep(0.01)
        active[job.data] -= 1

    workers = [Worker(q, proc, concurrency=10) for _ in range(3)]
    for w in workers:
        w.start()
    await wait_for(lambda: sum(len(v) for v in starts.values()) == 40, timeout=10)
    await asyncio.gather(*(w.close(5) for w in workers))
    assert peak <= 3
    for g in ("a", "b"):
        times = starts[g]
        # 20 jobs at 5 per 200 ms: the last window starts no earlier than 3 windows in
        assert times[-1] - times[0] >= 0.55, (g, times[-1] - times[0])
        rate = (len(times) - 5) / (times[-1] - times[0])
        assert rate <= 25 * 1.1, rate


async def test_pause_and_resume_one_group(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    assert await q.pause_group("a") is True
    assert await q.pause_group("a") is False
    await q.add_bulk([BulkJob("m", "a", overrides={"group": "a"}) for _ in range(3)])
    await q.add_bulk([BulkJob("m", "b", overrides={"group": "b"}) for _ in range(3)])
    seen: list[str] = []

    async def proc(job: Job) -> None:
        seen.append(job.data)

    worker = Worker(q, proc, concurrency=3)
    worker.start()
    await wait_for(lambda: len(seen) == 3)
    assert seen == ["b", "b", "b"]
    assert (await q.get_group_info("a"))["paused"] is True
    assert await q.resume_group("a") is True
    assert await q.resume_group("a") is False
    await wait_for(lambda: len(seen) == 6)
    await worker.close(5)


async def test_max_group_size_and_group_listing(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    for i in range(3):
        await q.add("m", i, group="tiny", group_max_size=3)
    with pytest.raises(GroupFullError) as info:
        await q.add("m", 4, group="tiny", group_max_size=3)
    assert info.value.group == "tiny"
    await q.add("m", 1, group="other")
    assert await q.list_groups() == ["other", "tiny"]
    assert len(await q.list_group_jobs("tiny")) == 3
    info2 = await q.get_group_info("tiny")
    assert info2["waiting"] == 3 and info2["active"] == 0
    await check_consistency(q)


async def test_global_rate_limit_across_three_workers_within_ten_percent(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(rate_limit=(20, 100)))  # 200 jobs/s
    await q.add_bulk([("m", i) for i in range(300)])
    starts: list[float] = []

    async def proc(job: Job) -> None:
        starts.append(time.monotonic())

    workers = [Worker(q, proc, concurrency=20) for _ in range(3)]
    for w in workers:
        w.start()
    await wait_for(lambda: len(starts) == 300, timeout=10)
    await asyncio.gather(*(w.close(5) for w in workers))
    starts.sort()
    # the first window's 20 jobs start at t0; the other 280 take 14 more windows
    rate = (len(starts) - 20) / (starts[-1] - starts[0])
    assert 200 * 0.9 <= rate <= 200 * 1.1, rate


async def test_global_concurrency_cap(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    await q.configure(QueueSettings(concurrency=4))
    await q.add_bulk([("m", i) for i in range(40)])
    active = peak = done = 0

    async def proc(job: Job) -> None:
        nonlocal active, peak, done
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        done += 1

    workers = [Worker(q, proc, concurrency=10) for _ in range(3)]
    for w in workers:
        w.start()
    await wait_for(lambda: done == 40, timeout=10)
    await asyncio.gather(*(w.close(5) for w in workers))
    assert peak == 4


async def test_manual_queue_rate_limit_uses_no_attempt(redis: RedisClient, queue_name: str) -> None:
    from queue_core import RateLimitError

    q = Queue(queue_name, redis)
    job = await q.add("m", None, attempts=1)
    runs: list[float] = []

    async def proc(j: Job) -> str:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RateLimitError(250)
        return "ok"

    worker = Worker(q, proc)
    worker.start()
    assert await q.wait_until_finished(job.id, 5) == "ok"
    await worker.close(5)
    assert runs[1] - runs[0] >= 0.24


def test_group_options_validated() -> None:
    from queue_core import InvalidOptionError

    for bad in ({"group": "has space"}, {"group_weight": 0}, {"group_max_size": -1}):
        with pytest.raises(InvalidOptionError):
            JobOptions(**bad)  # type: ignore[arg-type]
