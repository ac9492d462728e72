"""Adding jobs: ids, idempotency, validation, bulk, priorities, delays, LIFO (points 1-3)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from queue_core import (
    MAX_PRIORITY,
    Backoff,
    BulkJob,
    InvalidOptionError,
    JobOptions,
    JobState,
    PayloadTooLargeError,
    Queue,
    QueueEvents,
    SerializationError,
    Worker,
)
from queue_core.types import RedisClient

from .helpers import Collector, check_consistency, wait_for


async def test_queue_created_on_first_use_with_shared_hash_tag(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    assert await redis.exists(q.keys.meta) == 0
    job = await q.add("greet", {"hello": "world"})
    assert job.id == "1"
    keys = [k.decode() async for k in redis.scan_iter(match=f"qc:{{{queue_name}}}*")]
    assert keys, "adding created the queue's keys"
    assert all(k.startswith(f"qc:{{{queue_name}}}:") for k in keys)
    stored = await q.get_job(job.id)
    assert stored is not None and stored.data == {"hello": "world"} and stored.name == "greet"
    assert await q.get_state(job.id) is JobState.WAITING


async def test_custom_tag_puts_two_queues_in_one_slot(redis: RedisClient, queue_name: str) -> None:
    a = Queue(queue_name, redis)
    b = Queue(queue_name + "-dlq", redis, tag=queue_name)
    assert a.keys.meta.startswith(f"qc:{{{queue_name}}}:")
    assert b.keys.meta.startswith(f"qc:{{{queue_name}}}:{queue_name}-dlq:")


async def test_duplicate_job_id_returns_existing_job_and_emits_duplicated(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    events = QueueEvents(queue_name, redis, block_ms=200)
    await events.read()  # fix the starting point
    first = await q.add("x", {"v": 1}, job_id="msg-42")
    second = await q.add("x", {"v": 2}, job_id="msg-42")
    assert first.id == second.id == "msg-42"
    assert second.data == {"v": 1}, "the stored job is returned, not the new payload"
    counts = await q.get_job_counts()
    assert counts["waiting"] == 1
    names = [(e.event, e.job_id) for e in await events.read()]
    assert ("duplicated", "msg-42") in names


async def test_concurrent_duplicate_adds_create_one_job(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    jobs = await asyncio.gather(*(q.add("x", i, job_id="same") for i in range(50)))
    assert {j.id for j in jobs} == {"same"}
    assert (await q.get_job_counts())["waiting"] == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"priority": -1}, "priority"),
        ({"priority": MAX_PRIORITY + 1}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"attempts": 0}, "attempts"),
        ({"delay": -5}, "delay"),
        ({"job_id": "123"}, "job_id"),
        ({"job_id": ""}, "job_id"),
        ({"backoff": "fast"}, "backoff"),
        ({"timeout": 0}, "timeout"),
        ({"group": "g", "lifo": True}, "lifo"),
        ({"remove_on_complete": -3}, "remove_on_complete"),
        ({"run_at": datetime(2030, 1, 1)}, "run_at"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
async def test_invalid_options_raise_typed_error_naming_the_field(
    redis: RedisClient, queue_name: str, overrides: dict[str, object], field: str
) -> None:
    q = Queue(queue_name, redis)
    with pytest.raises(InvalidOptionError) as info:
        await q.add("x", {}, **overrides)
    assert info.value.field == field
    assert await redis.exists(q.keys.key("wait")) == 0, "nothing was stored"


async def test_non_json_payload_and_oversize_payload_are_refused(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis, max_payload_bytes=100)
    with pytest.raises(SerializationError):
        await q.add("x", {"when": object()})
    with pytest.raises(PayloadTooLargeError) as info:
        await q.add("x", "a" * 200)
    assert info.value.size > 100 and info.value.limit == 100
    ok = await q.add("x", "small")
    assert (await q.get_job_counts())["waiting"] == 1 and ok.id == "1"


async def test_add_bulk_is_one_round_trip_and_validates_everything_first(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    with pytest.raises(InvalidOptionError):
        await q.add_bulk([("a", 1), BulkJob("b", 2, overrides={"priority": -4})])
    assert (await q.get_job_counts())["waiting"] == 0, "an invalid item stops the whole bulk"
    before = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    jobs = await q.add_bulk([("n", i) for i in range(1200)])
    after = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    assert len(jobs) == 1200 and [int(j.id) for j in jobs] == list(range(1, 1201))
    # 1200 jobs go as 3 script calls in one pipeline (other tests may share this server)
    assert after - before >= 3
    assert (await q.get_job_counts())["waiting"] == 1200


async def test_priorities_lower_first_and_fifo_within_a_priority(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    order = [(5, "a"), (1, "b"), (3, "c"), (1, "d"), (0, "e"), (5, "f"), (3, "g"), (0, "h")]
    for prio, label in order:
        await q.add("x", label, priority=prio)
    counts = await q.get_job_counts()
    assert counts["waiting"] == 2 and counts["prioritized"] == 6
    collector = Collector()
    worker = Worker(q, collector, concurrency=1)
    worker.start()
    await collector.wait(len(order))
    await worker.close(5)
    assert collector.seen == ["e", "h", "b", "d", "c", "g", "a", "f"]


async def test_lifo_jobs_run_newest_first_ahead_of_fifo_jobs(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    await q.add("x", "fifo-1")
    await q.add("x", "lifo-1", lifo=True)
    await q.add("x", "fifo-2")
    await q.add("x", "lifo-2", lifo=True)
    collector = Collector()
    worker = Worker(q, collector)
    worker.start()
    await collector.wait(4)
    await worker.close(5)
    assert collector.seen == ["lifo-2", "lifo-1", "fifo-1", "fifo-2"]


async def test_delayed_jobs_wait_their_delay_and_keep_fifo_for_equal_times(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    at = datetime.now(UTC) + timedelta(milliseconds=400)
    # same absolute ready time for all: they must come out in add order
    jobs = await q.add_bulk([("x", i, JobOptions(run_at=at)) for i in range(30)])
    early = await q.add("x", "early", delay=150)
    assert await q.get_state(jobs[0].id) is JobState.DELAYED
    assert (await q.get_job_counts())["delayed"] == 31
    collector = Collector()
    started = time.monotonic()
    worker = Worker(q, collector, concurrency=1)
    worker.start()
    await collector.wait(31)
    elapsed = time.monotonic() - started
    await worker.close(5)
    assert collector.seen[0] == "early"
    assert collector.seen[1:] == list(range(30))
    assert elapsed >= 0.35, "delayed jobs did not run before their time"
    assert await q.get_state(early.id) is JobState.COMPLETED


async def test_idle_worker_wakes_for_delayed_job_without_a_new_add(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    collector = Collector()
    worker = Worker(q, collector, drain_delay=5.0)
    worker.start()
    await asyncio.sleep(0)  # let the worker go idle first
    t0 = time.monotonic()
    await q.add("x", "late", delay=300)
    await collector.wait(1, timeout=3)
    took = time.monotonic() - t0
    await worker.close(5)
    assert 0.28 <= took < 1.5, (
        f"delayed job ran after {took:.3f}s (expected ~0.3s, not the 5s idle block)"
    )


async def test_backoff_option_forms(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    j = await q.add("x", 1, attempts=3, backoff=Backoff.exponential(100, jitter=0.5))
    stored = await q.get_job(j.id)
    assert stored is not None and stored.backoff == Backoff("exponential", 100, 0.5, None)
    j2 = await q.add("x", 1, attempts=2, backoff=250)
    stored2 = await q.get_job(j2.id)
    assert stored2 is not None and stored2.backoff == Backoff("fixed", 250)
    await check_consistency(q)


async def test_progress_and_logs(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    events = QueueEvents(queue_name, redis, block_ms=200)
    await events.read()

    async def proc(job):  # type: ignore[no-untyped-def]
        await job.update_progress({"pct": 50})
        for i in range(5):
            await job.log(f"line {i}")
        return "ok"

    job = await q.add("x", None, keep_logs=3)
    worker = Worker(q, proc)
    worker.start()
    assert await q.wait_until_finished(job.id, 5) == "ok"
    await worker.close(5)
    stored = await q.get_job(job.id)
    assert stored is not None and stored.progress == {"pct": 50}
    assert await q.get_job_logs(job.id) == ["line 2", "line 3", "line 4"]
    seen = []
    await wait_for(lambda: _collect(events, seen), timeout=5)
    assert ("progress", job.id) in [(e.event, e.job_id) for e in seen]


async def _collect(events: QueueEvents, into: list) -> bool:  # type: ignore[type-arg]
    into.extend(await events.read())
    return any(e.event == "completed" for e in into)
