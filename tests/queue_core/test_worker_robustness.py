"""A worker never wedges or dies silently (issue 9): lease loss, retries racing renewals, bad
delay values from user code, unexpected exceptions in its loops, Redis outages."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import SlotNotCoveredError

from devstack import RedisServer
from queue_core import (
    Backoff,
    Dedup,
    DelayJob,
    InvalidOptionError,
    Job,
    JobFailedError,
    JobState,
    Queue,
    QueueSettings,
    RateLimitError,
    SerializationError,
    UnrecoverableError,
    Worker,
    connect,
    render_prometheus,
)
from queue_core.types import RedisClient

from .helpers import Faults, check_consistency, wait_for


async def test_a_lost_lease_does_not_wedge_a_full_worker(
    redis: RedisClient, queue_name: str
) -> None:
    """Concurrency 1: the only running job is cancelled because its lease was lost. The worker
    must go on fetching (it used to wait for a wake-up that never came)."""
    q = Queue(queue_name, redis)
    cancelled = asyncio.Event()

    async def proc(job: Job) -> str:
        if job.name == "hang":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return "done"

    j = await q.add("hang", None)
    worker = Worker(q, proc, concurrency=1, lock_duration=300, lock_renew_interval=50)
    worker.start()
    await wait_for(lambda: worker.active_count == 1)
    # another worker took the lease over (what a stall sweep and a takeover look like)
    await redis.hset(q.keys.job(j.id), "tok", "someone-else:1")
    await asyncio.wait_for(cancelled.wait(), 5)
    k = await q.add("next", None)
    assert await q.wait_until_finished(k.id, 5) == "done"
    assert worker.running
    await worker.close(5)


async def test_a_worker_whose_job_stalled_while_the_loop_was_blocked_keeps_working(
    redis: RedisClient, queue_name: str
) -> None:
    """The issue's reproduction: the processor blocks the event loop past its lease, the job is
    swept and taken back; the worker sees the loss, cancels its run and must fetch again."""
    q = Queue(queue_name, redis)
    runs: list[int] = []

    async def proc(job: Job) -> str:
        runs.append(job.attempts_started)
        if job.name == "J" and len(runs) == 1:
            time.sleep(0.6)  # noqa: ASYNC251 - blocks renewal on purpose: the lease expires
            # still blocking the loop: another client sweeps and takes the job back
            sweeper = threading.Thread(target=_sweep_now, args=(q, redis_url_of(redis)))
            sweeper.start()
            sweeper.join(10)
            await asyncio.sleep(0.5)  # the renewal now reports the lease lost
        return "ok"

    j = await q.add("J", None)
    worker = Worker(q, proc, concurrency=1, lock_duration=300, stalled_interval=100)
    worker.start()
    assert await q.wait_until_finished(j.id, 10) == "ok"
    k = await q.add("K", None)
    assert await q.wait_until_finished(k.id, 5) == "ok"
    assert worker.stats["lost"] == 1
    await worker.close(5)
    await check_consistency(q)


def redis_url_of(redis: RedisClient) -> str:
    kw = redis.connection_pool.connection_kwargs  # type: ignore[union-attr]
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _sweep_now(q: Queue, url: str) -> None:
    """One stall sweep from another client (and thread): the blocked worker cannot run one."""

    async def sweep() -> None:
        client = connect(url)
        try:
            other = Worker(Queue(q.name, client), _never, stalled_interval=10)
            await wait_for(lambda: _swept(other), timeout=5)
        finally:
            await client.aclose()

    asyncio.run(sweep())


async def _swept(worker: Worker) -> bool:
    requeued, _ = await worker.sweep_stalled()
    return bool(requeued)


async def _never(job: Job) -> None:  # pragma: no cover - never started
    raise AssertionError


async def test_a_renewal_racing_a_retry_never_reports_a_lost_lease(
    redis: RedisClient, queue_name: str
) -> None:
    """A retry with no backoff is re-leased in the same round trip under a new token; a renewal
    built before that reply carries the old token. It must not cancel the new attempt."""
    q = Queue(queue_name, redis)
    attempts: list[int] = []

    async def proc(job: Job) -> None:
        attempts.append(job.attempts_made)
        await asyncio.sleep(0.003)
        raise RuntimeError("again")

    job = await q.add("x", None, attempts=150)
    worker = Worker(q, proc, lock_duration=2000, lock_renew_interval=1)
    worker.start()
    with pytest.raises(Exception, match="again"):
        await q.wait_until_finished(job.id, 30)
    await worker.close(5)
    stored = await q.get_job(job.id)
    assert stored is not None
    assert worker.stats["lost"] == 0, "no lease was lost: every renewal raced our own retry"
    assert stored.attempts_made == 150 and stored.stalled_count == 0
    assert attempts == list(range(150)), "each attempt ran once, none cancelled"


# -- bad values from user code -------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [math.inf, math.nan, "soon", 10**20, -math.inf],
    ids=["inf", "nan", "str", "huge", "-inf"],
)
async def test_a_custom_backoff_returning_nonsense_fails_the_job_and_the_worker_goes_on(
    redis: RedisClient, queue_name: str, bad: Any
) -> None:
    q = Queue(queue_name, redis)

    async def proc(job: Job) -> str:
        if job.name == "bad":
            raise RuntimeError("boom")
        return "ok"

    worker = Worker(
        q, proc, backoff_strategies={"weird": lambda attempt, exc, job: bad}, lock_duration=1000
    )
    worker.start()
    job = await q.add("bad", None, attempts=3, backoff=Backoff("weird", 10))
    await wait_for(lambda: _state_is(q, job.id, JobState.FAILED), timeout=5)
    stored = await q.get_job(job.id)
    assert stored is not None and stored.failed_reason is not None
    assert "backoff" in stored.failed_reason, stored.failed_reason
    after = await q.add("good", None)
    assert await q.wait_until_finished(after.id, 5) == "ok"
    await worker.close(5)
    assert not worker.running
    await check_consistency(q)


async def _state_is(q: Queue, job_id: str, state: JobState) -> bool:
    return await q.get_state(job_id) is state


@pytest.mark.parametrize(
    "raise_it",
    [
        lambda: DelayJob(10**20),
        lambda: RateLimitError(10**20),
        lambda: DelayJob(math.inf),  # type: ignore[arg-type]
        lambda: DelayJob("later"),  # type: ignore[arg-type]
    ],
    ids=["delay-huge", "ratelimit-huge", "delay-inf", "delay-str"],
)
async def test_a_control_exception_with_a_bad_delay_fails_the_job_not_the_worker(
    redis: RedisClient, queue_name: str, raise_it: Callable[[], Exception], caplog: Any
) -> None:
    q = Queue(queue_name, redis)

    async def proc(job: Job) -> str:
        if job.name == "bad":
            raise raise_it()
        return "ok"

    worker = Worker(q, proc, lock_duration=1000, lock_renew_interval=50)
    worker.start()
    job = await q.add("bad", None, attempts=3)
    await wait_for(lambda: _state_is(q, job.id, JobState.FAILED), timeout=5)
    stored = await q.get_job(job.id)
    assert stored is not None and stored.failed_reason
    assert "delay" in stored.failed_reason.lower(), stored.failed_reason
    after = await q.add("good", None)
    assert await q.wait_until_finished(after.id, 5) == "ok"
    await worker.close(5)  # must not raise
    renewals_after_close = await _count_script_calls(redis, worker, "extend_locks", 0.3)
    assert renewals_after_close == 0
    await check_consistency(q)


async def _count_script_calls(redis: RedisClient, worker: Worker, name: str, seconds: float) -> int:
    """How often `worker` calls script `name` during `seconds` (counted on the client)."""
    with Faults(redis, name) as counter:
        await asyncio.sleep(seconds)
    return counter.calls


@pytest.mark.parametrize(
    "make",
    [
        lambda: Backoff.fixed(10**20),
        lambda: Backoff.exponential(10**20),
        lambda: Backoff("fixed", 1000, 0.0, 10**20),
        lambda: DelayJob(-5),
    ],
    ids=["fixed", "exponential", "max_delay", "negative-delayjob"],
)
def test_out_of_range_delays_are_refused_where_they_are_made(make: Callable[[], Any]) -> None:
    with pytest.raises(InvalidOptionError):
        make()


@pytest.mark.parametrize("delay", [2**63, 10**20, -1, math.nan], ids=["2^63", "1e20", "neg", "nan"])
async def test_add_refuses_an_out_of_range_delay(
    redis: RedisClient, queue_name: str, delay: Any
) -> None:
    q = Queue(queue_name, redis)
    with pytest.raises(InvalidOptionError, match="delay"):
        await q.add("x", None, delay=delay)
    assert (await q.get_job_counts())["waiting"] == 0


# -- loops that must not die silently -------------------------------------------------------


async def test_a_cluster_slot_error_in_the_main_loop_is_retried(
    redis: RedisClient, queue_name: str
) -> None:
    """redis-py's SlotNotCoveredError is not a RedisError; a failover raises it after the
    cluster client's own retries. The main loop must retry, not die."""
    q = Queue(queue_name, redis)

    async def proc(job: Job) -> str:
        return "ok"

    with Faults(redis, "finish_fetch") as faults:
        worker = Worker(q, proc, drain_delay=0.2)
        faults.pending += [SlotNotCoveredError("slot 7 is not covered")] * 2
        worker.start()
        job = await q.add("x", None)
        assert await q.wait_until_finished(job.id, 5) == "ok"
    assert faults.raised == 2
    assert worker.running
    await worker.close(5)


async def test_an_unexpected_error_ends_run_with_that_error(
    redis: RedisClient, queue_name: str, caplog: Any
) -> None:
    """A bug in the driver loop must not leave a worker that looks alive and does nothing:
    run() raises, so the service exits and its supervisor restarts it."""
    q = Queue(queue_name, redis)

    async def proc(job: Job) -> str:
        return "ok"

    class Bug(Exception):
        pass

    with Faults(redis, "finish_fetch") as faults, caplog.at_level(logging.ERROR):
        faults.pending.append(Bug("unexpected"))
        worker = Worker(q, proc, drain_delay=0.2)
        with pytest.raises(Bug):
            await asyncio.wait_for(worker.run(), 5)
    assert not worker.running
    assert any("unexpected" in r.getMessage() or r.exc_info for r in caplog.records)


@pytest.mark.parametrize("script", ["extend_locks", "sweep_stalled"])
async def test_upkeep_loops_survive_any_error(
    redis: RedisClient, queue_name: str, script: str, caplog: Any
) -> None:
    q = Queue(queue_name, redis)
    release = asyncio.Event()

    async def proc(job: Job) -> str:
        await release.wait()
        return "ok"

    with Faults(redis, script) as faults, caplog.at_level(logging.WARNING):
        faults.pending += [RuntimeError("odd"), SlotNotCoveredError("slot")]
        worker = Worker(q, proc, lock_duration=400, lock_renew_interval=40, stalled_interval=40)
        worker.start()
        job = await q.add("x", None)
        await wait_for(lambda: faults.raised == 2, timeout=5)
        # the loop is still alive: it keeps renewing / sweeping
        calls = await _count_script_calls(redis, worker, script, 0.4)
    assert calls >= 2
    release.set()
    assert await q.wait_until_finished(job.id, 5) == "ok"
    assert worker.running
    await worker.close(5)
    assert any("odd" in r.getMessage() for r in caplog.records)


async def test_worker_health_reports_its_loops(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)

    async def proc(job: Job) -> None:
        return None

    worker = Worker(q, proc, drain_delay=0.2)
    assert worker.health()["running"] is False
    worker.start()
    await wait_for(lambda: worker.health()["seconds_since_fetch"] < 1)
    health = worker.health()
    assert health["running"] is True
    assert health["loops"] == {"main": True, "renew": True, "sweep": True}
    await worker.close(5)
    assert worker.health()["running"] is False


# -- Redis outages ---------------------------------------------------------------------------


async def test_results_resume_within_a_second_of_redis_coming_back(
    private_redis: Callable[..., RedisServer], queue_name: str
) -> None:
    """Jobs finishing while Redis is down must not each count as another failed reconnect (the
    wait used to climb to its 5 s cap): results flow again within ~1 s of Redis being back."""
    server = private_redis(persist=True)
    server.extra_args = ["--appendfsync", "always"]  # the kill must not lose the added jobs
    server.restart()
    redis = connect(server.url)
    q = Queue(queue_name, redis)
    gate = asyncio.Event()

    async def proc(job: Job) -> str:
        await gate.wait()
        await asyncio.sleep(0.05 * int(job.data))  # finishes spread over the outage
        return "ok"

    worker = Worker(q, proc, concurrency=20, lock_duration=10_000)
    worker.start()
    await q.add_bulk([("x", i) for i in range(20)])
    await wait_for(lambda: worker.active_count == 20)
    server.kill()
    gate.set()
    await wait_for(lambda: worker.active_count == 0, timeout=5)  # all finished, results held
    await asyncio.sleep(0.2)  # stay down a little longer: several reconnects fail meanwhile
    await asyncio.to_thread(server.start)
    back = time.monotonic()
    await wait_for(lambda: _counts_completed(q, 20), timeout=10, interval=0.02)
    resumed = time.monotonic() - back
    assert resumed < 1.2, f"results resumed {resumed:.2f}s after Redis came back"
    await worker.close(5)
    await redis.aclose()


async def _counts_completed(q: Queue, n: int) -> bool:
    try:
        return (await q.get_job_counts())["completed"] >= n
    except Exception:
        return False


# -- recovery bound ---------------------------------------------------------------------------

WORKER_SCRIPT = Path(__file__).with_name("worker_process.py")
LOCK_MS, STALLED_MS = 1000, 300  # what worker_process.py configures


def _spawn(url: str, queue: str, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER_SCRIPT), url, queue, mode, "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


async def test_a_dead_workers_job_restarts_within_lock_plus_stalled_interval(
    redis: RedisClient, redis_url: str, queue_name: str
) -> None:
    """The documented bound: a job whose worker died restarts within lock_duration +
    stalled_interval, also when the dead worker was the one holding the sweep throttle (the
    survivors used to wait out a whole interval after a refused sweep)."""
    q = Queue(queue_name, redis)
    took: list[float] = []
    for trial in range(3):
        hanger = _spawn(redis_url, queue_name, "hang")  # sweeps at start: holds the throttle
        job = await q.add("x", trial)
        await wait_for(lambda j=job.id: _started(redis, queue_name, j), timeout=10)
        rescuer = _spawn(redis_url, queue_name, "work")
        await asyncio.sleep(random.uniform(0, STALLED_MS / 1000))  # any phase of the sweeps
        # the hanger sweeps right before it dies
        await redis.delete(q.keys.key("stall"))
        await asyncio.to_thread(_sweep_as_dead_worker, q, redis_url_of(redis))
        hanger.kill()
        killed = time.monotonic()
        await wait_for(lambda j=job.id: _state_is(q, j, JobState.COMPLETED), timeout=15)
        took.append(time.monotonic() - killed)
        rescuer.terminate()
        for proc in (hanger, rescuer):
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()
    bound = (LOCK_MS + STALLED_MS) / 1000
    # process scheduling and one pickup on a busy 2-core machine: 0.35 s of slack
    assert max(took) <= bound + 0.35, f"recovery took {took} s; bound {bound} s"
    await check_consistency(q)


def _sweep_as_dead_worker(q: Queue, url: str) -> None:
    """A sweep that sets the throttle for a whole interval, as the hanger's own would."""

    async def sweep() -> None:
        client = connect(url)
        try:
            await Worker(Queue(q.name, client), _never, stalled_interval=STALLED_MS).sweep_stalled()
        finally:
            await client.aclose()

    asyncio.run(sweep())


async def _started(redis: RedisClient, queue: str, job_id: str) -> bool:
    return bool(await redis.sismember(f"test:{queue}:started", job_id))  # type: ignore[misc]


# -- small ones ---------------------------------------------------------------------------------


async def test_stats_count_what_redis_applied(redis: RedisClient, queue_name: str) -> None:
    """A completion refused because the lease was lost counts as lost, not completed; a loss
    seen by both the renewal and the finish counts once."""
    q = Queue(queue_name, redis)
    release = asyncio.Event()

    async def proc(job: Job) -> str:
        await release.wait()
        return "late"

    job = await q.add("x", None)
    worker = Worker(q, proc, lock_duration=300, lock_renew_interval=50)
    worker.start()
    await wait_for(lambda: worker.active_count == 1)
    with Faults(redis, "extend_locks") as faults:
        faults.always = ConnectionError("renewals cannot reach Redis")
        await redis.hset(q.keys.job(job.id), "tok", "someone-else:1")  # taken over
        release.set()  # the job finishes: its result is refused
        await wait_for(lambda: worker.stats["lost"] >= 1)
    await asyncio.sleep(0.2)  # renewals work again and see the loss too
    await worker.close(5)
    assert worker.stats["completed"] == 0
    assert worker.stats["lost"] == 1


async def test_non_finite_numbers_are_a_serialization_error(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    for bad in (math.nan, math.inf, {"a": [1, -math.inf]}):
        with pytest.raises(SerializationError, match="NaN or Infinity"):
            await q.add("x", bad)
    assert (await q.get_job_counts())["waiting"] == 0

    async def proc(job: Job) -> Any:
        if job.name == "progress":
            await job.update_progress({"pct": math.nan})
        return {"ratio": math.inf}

    worker = Worker(q, proc)
    worker.start()
    job = await q.add("result", None)
    with pytest.raises(JobFailedError, match="NaN or Infinity"):
        await q.wait_until_finished(job.id, 5)
    job = await q.add("progress", None)
    with pytest.raises(JobFailedError, match="NaN or Infinity"):
        await q.wait_until_finished(job.id, 5)
    await worker.close(5)


@pytest.mark.parametrize(
    "options",
    [{"job_id": "bad\ud800id"}, {"group": "g\udfff"}, {"dedup": "x"}],
    ids=["job_id", "group", "dedup"],
)
async def test_text_that_cannot_be_stored_is_refused_with_a_typed_error(
    redis: RedisClient, queue_name: str, options: dict[str, Any]
) -> None:
    q = Queue(queue_name, redis)
    if "dedup" in options:
        with pytest.raises(InvalidOptionError, match=r"dedup\.id"):
            Dedup("d\ud800")
        return
    with pytest.raises(InvalidOptionError, match=next(iter(options))):
        await q.add("x", None, **options)
    with pytest.raises(InvalidOptionError, match="name"):
        await q.add("n\ud800", None)


async def test_an_unknown_state_is_an_invalid_option(redis: RedisClient, queue_name: str) -> None:
    q = Queue(queue_name, redis)
    with pytest.raises(InvalidOptionError, match="state"):
        await q.list_jobs("bogus")
    with pytest.raises(InvalidOptionError, match="state"):
        await q.clean(0, "bogus")
    with pytest.raises(InvalidOptionError, match="state"):
        await q.retry_jobs("bogus")


@pytest.mark.parametrize("renew", [0, 1000, 5000, -5])
def test_lock_renew_interval_must_be_below_the_lock(renew: int, redis: RedisClient) -> None:
    q = Queue("renew-check", redis)
    with pytest.raises(InvalidOptionError, match="lock_renew_interval"):
        Worker(q, _never, lock_duration=1000, lock_renew_interval=renew or -1)


async def test_dead_letters_are_capped_and_their_depth_is_a_metric(
    redis: RedisClient, queue_name: str
) -> None:
    q = Queue(queue_name, redis)
    dlq_name = f"{queue_name}-dlq"
    await q.configure(QueueSettings(dead_letter_queue=dlq_name, dead_letter_max=5))

    async def proc(job: Job) -> None:
        raise UnrecoverableError("poison")

    worker = Worker(q, proc, concurrency=4)
    worker.start()
    jobs = await q.add_bulk([("x", i) for i in range(12)])
    for job in jobs:
        with pytest.raises(JobFailedError):
            await q.wait_until_finished(job.id, 5)
    await worker.close(5)
    dlq = q.dead_letter_queue()
    kept = await dlq.list_jobs("waiting", 0, 100)
    assert len(kept) == 5, "the oldest copies went beyond the cap"
    assert sorted(j.data for j in kept) == list(range(7, 12))
    await check_consistency(dlq)
    body = await render_prometheus([q])
    assert f'queue_dead_letter_jobs{{queue="{queue_name}"}} 5' in body


async def test_a_job_whose_lease_is_lost_before_it_starts_frees_its_slot(
    redis: RedisClient, queue_name: str
) -> None:
    """A job task cancelled before its first step never runs its own cleanup: its slot must
    still be freed (concurrency 1 would wedge)."""
    q = Queue(queue_name, redis)
    ran: list[str] = []

    async def proc(job: Job) -> str:
        ran.append(job.name)
        return "ok"

    worker = Worker(q, proc, concurrency=1, lock_duration=1000)
    original = worker._start

    def start_then_lose(job_id: str, token: str, flat: list[Any]) -> None:
        original(job_id, token, flat)
        if job_id == first.id and len(ran) == 0 and worker._held.get(job_id) == token:
            worker._lease_lost(job_id)  # the loss is seen before the task's first step

    worker._start = start_then_lose  # type: ignore[method-assign]
    first = await q.add("first", None)
    worker.start()
    second = await q.add("second", None)
    assert await q.wait_until_finished(second.id, 5) == "ok"
    assert worker.active_count == 0
    await worker.close(5)
