"""The consumer side: lease jobs, run them, report results, keep leases alive, recover stalls."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import random
import signal
import time
import traceback
import uuid
from collections.abc import Mapping
from typing import Any, TypedDict

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from queue_core.codec import dumps
from queue_core.errors import (
    DelayJob,
    GroupRateLimitError,
    InvalidOptionError,
    JobTimeoutError,
    RateLimitError,
    SerializationError,
    UnrecoverableError,
    WorkerStateError,
)
from queue_core.job import Job
from queue_core.limits import checked_delay
from queue_core.options import BackoffStrategy
from queue_core.queue import Queue
from queue_core.schedulers import advance_scheduler
from queue_core.storage import FetchReply, pack
from queue_core.types import Processor, RedisClient

__all__ = ["HISTOGRAM_BUCKETS_MS", "Worker", "WorkerHealth"]

log = logging.getLogger("queue_core.worker")

# Errors after which the same request is simply sent again once Redis answers. redis-py's
# cluster client raises RedisClusterException (not a RedisError) when a slot is uncovered
# during a failover, after its own retries.
RETRYABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    RedisClusterException,
    ConnectionError,
    OSError,
    TimeoutError,
)

# Reconnect schedule of the driver loop: doubling from 50 ms, capped low so that work resumes
# within about half a second of Redis coming back.
_RECONNECT_FIRST_S = 0.05
_RECONNECT_CAP_S = 0.5


def _check_cancelled() -> None:
    """Re-raise a cancellation that the Redis client swallowed.

    A cancel that lands just as a reply arrives can be absorbed by redis-py (the call returns
    normally or raises a connection error). A loop that then went back to sleep would ignore the
    cancellation, and an event loop shutting down would hang on it. Loops call this after each
    Redis round trip."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _text(value: str) -> str:
    """Text that encodes as UTF-8 (error messages from user code may hold lone surrogates,
    which neither msgpack nor JSON can carry)."""
    return value.encode("utf-8", "replace").decode("utf-8")


HISTOGRAM_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_HIST_FIELDS = [f"h:{b}" for b in HISTOGRAM_BUCKETS_MS] + ["h:inf"]


class WorkerHealth(TypedDict):
    """What a service's health check reports about one worker."""

    name: str
    queue: str
    running: bool
    healthy: bool
    loops: dict[str, bool]
    seconds_since_fetch: float
    active: int
    concurrency: int
    stats: dict[str, int]
    error: str | None


class _Reconnect:
    """One reconnect schedule for the driver's connection: every failed round trip waits for
    the next step; a success resets it. Results that arrive meanwhile do not add attempts."""

    def __init__(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        delay: float = min(_RECONNECT_CAP_S, _RECONNECT_FIRST_S * 2.0**self.failures)
        self.failures = min(self.failures + 1, 16)
        return delay * (0.8 + 0.4 * random.random())

    def reset(self) -> None:
        self.failures = 0


class Worker:
    """Runs `processor(job)` for the jobs of one queue, `concurrency` at a time.

    Lifecycle: `start()` (or `await run()`), then `await close(timeout)`. Delivery is
    at-least-once: a job runs again if its lease expires before it finishes (the worker died,
    the event loop was blocked longer than `lock_duration`, or Redis was unreachable).

    Nothing a processor or a custom backoff returns or raises stops the worker: a bad value
    fails that job with a clear reason. The upkeep loops (lease renewal, stall sweep) log and
    survive any error; an unexpected error in the driver loop stops the worker and `run()`
    raises it, so that the service exits and its supervisor restarts it.
    """

    def __init__(
        self,
        queue: Queue | str,
        processor: Processor,
        redis: RedisClient | str | None = None,
        *,
        prefix: str = "qc",
        tag: str | None = None,
        concurrency: int = 1,
        lock_duration: int = 30_000,
        lock_renew_interval: int | None = None,
        stalled_interval: int = 30_000,
        max_stalled_count: int = 1,
        drain_delay: float = 5.0,
        backoff_strategies: Mapping[str, BackoffStrategy] | None = None,
        shutdown_timeout: float = 30.0,
        error_history_limit: int = 20,
        stack_limit: int = 8000,
        name: str | None = None,
    ) -> None:
        if isinstance(queue, Queue):
            self.queue = queue
        else:
            if redis is None:
                raise InvalidOptionError("redis", "is required when the queue is given by name")
            self.queue = Queue(queue, redis, prefix=prefix, tag=tag)
        if not callable(processor):
            raise InvalidOptionError("processor", "must be an async callable taking a Job")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidOptionError("concurrency", "must be a positive integer")
        if not isinstance(lock_duration, int) or lock_duration < 100:
            raise InvalidOptionError("lock_duration", "must be an integer of at least 100 ms")
        renew = lock_renew_interval or max(50, lock_duration // 3)
        if not isinstance(renew, int) or not 0 < renew < lock_duration:
            raise InvalidOptionError(
                "lock_renew_interval", "must be a positive integer below lock_duration (ms)"
            )
        if not isinstance(stalled_interval, int) or stalled_interval < 10:
            raise InvalidOptionError("stalled_interval", "must be an integer of at least 10 ms")
        if not isinstance(max_stalled_count, int) or max_stalled_count < 0:
            raise InvalidOptionError("max_stalled_count", "must be a non-negative integer")
        if not isinstance(drain_delay, int | float) or not 0 < drain_delay <= 3600:
            raise InvalidOptionError("drain_delay", "must be positive (seconds, at most 3600)")
        self.redis = self.queue.redis
        self._store = self.queue._store
        self.processor = processor
        self.concurrency = concurrency
        self.lock_duration = lock_duration
        self.lock_renew_interval = renew
        self.stalled_interval = stalled_interval
        self.max_stalled_count = max_stalled_count
        self.drain_delay = drain_delay
        self.backoff_strategies = dict(backoff_strategies or {})
        self.shutdown_timeout = shutdown_timeout
        self.error_history_limit = error_history_limit
        self.stack_limit = stack_limit
        self.name = name or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.token_prefix = uuid.uuid4().hex
        self.stats = {"completed": 0, "failed": 0, "retried": 0, "released": 0, "lost": 0}
        self.last_fetch_at = 0.0

        self._inbox = self.queue.keys.key(f"w:{self.token_prefix}")
        self._running: dict[str, tuple[Job, asyncio.Task[None]]] = {}
        self._held: dict[str, str] = {}  # every job this worker leases: id -> token
        self._lost: set[str] = set()  # tokens of running jobs cancelled for a lost lease
        self._pending: list[list[Any]] = []
        self._hist: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self._force = False
        self._idle = False
        self._next_in = -1
        self._rl_ttl = 0
        self._maxed = False
        self._started = False
        self._fatal: BaseException | None = None
        self._done = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._inbox_task: asyncio.Task[Any] | None = None
        self._handed: list[Any] = []  # jobs handed to this worker, not yet started
        self._registered = False  # whether Redis may hold an idle registration for us
        self._close_task: asyncio.Task[None] | None = None
        self._reconnect = _Reconnect()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._started and not self._done.is_set()

    @property
    def active_count(self) -> int:
        return len(self._running)

    @property
    def seconds_since_last_fetch(self) -> float:
        """Seconds since the last successful round trip to Redis (a liveness signal)."""
        return time.monotonic() - self.last_fetch_at if self.last_fetch_at else float("inf")

    def health(self) -> WorkerHealth:
        """Liveness for a service's health check. `healthy` is false when the worker stopped,
        one of its loops died, or it has free slots but has not reached Redis for longer than
        its idle wait allows (it is wedged, or Redis is unreachable)."""
        loops = {
            "main": _alive(self._loop_task),
            "renew": _alive(self._renew_task),
            "sweep": _alive(self._sweep_task),
        }
        since = self.seconds_since_last_fetch
        busy = len(self._running) >= self.concurrency
        running = self.running
        healthy = running and all(loops.values()) and (busy or since < self.drain_delay + 10)
        return WorkerHealth(
            name=self.name,
            queue=self.queue.name,
            running=running,
            healthy=healthy,
            loops=loops,
            seconds_since_fetch=round(since, 3) if since != float("inf") else -1.0,
            active=len(self._running),
            concurrency=self.concurrency,
            stats=dict(self.stats),
            error=None if self._fatal is None else f"{type(self._fatal).__name__}: {self._fatal}",
        )

    def start(self) -> None:
        if self._started:
            raise WorkerStateError("worker already started")
        self._started = True
        self.last_fetch_at = time.monotonic()
        self._loop_task = asyncio.create_task(self._main_loop(), name=f"worker:{self.queue.name}")
        self._renew_task = asyncio.create_task(self._renew_loop(), name="worker-renew")
        self._sweep_task = asyncio.create_task(self._sweep_loop(), name="worker-sweep")

    async def run(self, *, handle_signals: bool = False) -> None:
        """Start (if needed) and run until closed. With `handle_signals`, SIGTERM and SIGINT
        trigger `close(shutdown_timeout)`. Raises the error that stopped the worker, if one
        did (see the class docstring)."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        try:
            if not self._started:
                self.start()
            await self._done.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        if self._fatal is not None:
            raise self._fatal

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("worker %s: %s received, closing", self.name, signal.Signals(sig).name)
        if self._close_task is None:
            self._close_task = asyncio.create_task(self.close(self.shutdown_timeout))

    async def close(self, timeout: float | None = None) -> None:
        """Stop fetching, let running jobs finish for up to `timeout` seconds, then cancel the
        rest and return them to the queue at once (no attempt used), flush every result, and
        release resources. Safe to call more than once; never raises for the worker's state."""
        if not self._started:
            self._started = True
            self._done.set()
            return
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        self._wake.set()
        await self._interrupt_inbox_wait()
        tasks = [task for _, task in self._running.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                log.warning(
                    "worker %s: %d jobs still running at close; returning them to the queue",
                    self.name,
                    len(pending),
                )
                self._force = True
                for task in pending:
                    task.cancel()
                _, stuck = await asyncio.wait(pending, timeout=5.0)
                if stuck:
                    log.error(
                        "worker %s: %d jobs ignored cancellation; their leases will expire",
                        self.name,
                        len(stuck),
                    )
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._loop_task), 10.0)
            except TimeoutError:
                log.error(
                    "worker %s: could not flush results to Redis; jobs will be recovered "
                    "after their lease expires",
                    self.name,
                )
                self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await self._stop_aux()
        self._done.set()

    async def _stop_aux(self) -> None:
        for task in (self._renew_task, self._sweep_task, self._inbox_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # -- the driver loop: one round trip finishes a batch and leases the next one --------------

    async def _main_loop(self) -> None:
        try:
            await self._drive()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # A bug, not a Redis hiccup: stop visibly rather than look alive and do nothing.
            log.critical("worker %s: driver loop failed; stopping", self.name, exc_info=exc)
            self._fatal = exc
            self._closing = True
            for _, task in list(self._running.values()):
                task.cancel()  # their results could not be reported: the leases expire
            await self._stop_aux()
            self._done.set()

    async def _drive(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            if self._handed:
                self._start_handed()
            want = 0 if self._closing else self.concurrency - len(self._running)
            if not self._pending:
                if self._closing and not self._running:
                    if not self._registered:
                        return
                    # one more round trip withdraws our idle registration and drains the inbox
                elif want <= 0:
                    await self._wake.wait()
                    continue
                elif self._idle:
                    await self._wait_for_work()
                    self._idle = False
                    continue
            entries, self._pending = self._pending, []
            hist, self._hist = self._hist, {}
            try:
                reply = await self._finish_fetch(entries, hist, want)
            except RETRYABLE as exc:
                _check_cancelled()
                self._pending[:0] = entries
                self._merge_hist(hist)
                delay = self._reconnect.next_delay()
                log.warning(
                    "worker %s: Redis unavailable (%s); retrying in %.2fs", self.name, exc, delay
                )
                await self._pause(delay)
                continue
            except RedisError:
                _check_cancelled()
                failures += 1
                log.exception("worker %s: finish/fetch failed", self.name)
                if failures < 3:
                    self._pending[:0] = entries
                else:
                    # Give up on these results: the jobs' leases expire and the sweep retries them.
                    for entry in entries:
                        self._release_hold(entry[0], entry[1])
                await self._pause(0.5)
                continue
            _check_cancelled()
            failures = 0
            self._reconnect.reset()
            self.last_fetch_at = time.monotonic()
            self._apply(entries, reply, want)

    async def _finish_fetch(
        self, entries: list[list[Any]], hist: dict[str, int], want: int
    ) -> FetchReply:
        # Registering as idle (block_ms > 0) lets producers hand jobs straight to this worker.
        block_ms = int(self.drain_delay * 1000) if want > 0 else 0
        flat_hist: list[Any] = []
        for field, count in hist.items():
            flat_hist += [field, count]
        return await self._store.finish_fetch(
            self.token_prefix, self.lock_duration, want, block_ms, pack(flat_hist), pack(entries)
        )

    def _apply(self, entries: list[list[Any]], reply: FetchReply, want: int) -> None:
        fetched = len(reply.jobs) + len(reply.handed)
        self._registered = want > 0 and fetched < want
        for entry, code in zip(entries, reply.codes, strict=True):
            job_id, token, kind = entry[0], entry[1], entry[2]
            self._release_hold(job_id, token)
            if code == -1:
                self.stats["lost"] += 1
                log.warning(
                    "worker %s: lease of job %s was lost (it stalled and was taken over); "
                    "its %s result was discarded",
                    self.name,
                    job_id,
                    kind,
                )
            else:  # applied now, or by an earlier round trip whose reply was lost (0)
                self.stats[_STAT_OF[kind]] += 1
        for leased in reply.jobs:
            self._start(leased.job_id, leased.token, leased.fields)
        for raw in reply.handed:
            self._receive(raw)
        self._idle = want > 0 and fetched < want
        self._next_in = reply.next_in
        self._rl_ttl = reply.rate_limit_ms
        self._maxed = reply.maxed

    def _release_hold(self, job_id: str, token: str) -> None:
        """Forget a lease, unless the job was leased to us again meanwhile (a new token)."""
        if self._held.get(job_id) == token:
            del self._held[job_id]

    def _start(self, job_id: str, token: str, flat: list[Any]) -> None:
        job = Job.from_flat(self.queue, job_id, flat)
        job.token = token
        job.attempts_started += 1
        self._held[job_id] = token
        if self._closing or len(self._running) >= self.concurrency:
            # Leased to us after we stopped taking work (a handoff racing close or a fetch):
            # give it straight back, at the front, without using an attempt.
            self._pending.append([job_id, token, "l", 0, ""])
            self._wake.set()
            return
        task = asyncio.create_task(self._execute(job))
        task.add_done_callback(self._never_started)
        self._running[job_id] = (job, task)

    def _never_started(self, task: asyncio.Task[None]) -> None:
        """A job task cancelled before its first step never runs `_execute`'s cleanup (a lease
        lost, or close(), right after the lease): free its slot and settle its lease here."""
        for job_id, (job, running) in list(self._running.items()):
            if running is task:
                del self._running[job_id]
                token = job.token or ""
                if token in self._lost:
                    self._lost.discard(token)
                    self._release_hold(job_id, token)
                else:
                    self._pending.append([job_id, token, "l", 0, ""])
                self._wake.set()
                return

    def _receive(self, raw: bytes | str) -> None:
        """A handoff from the inbox: a leased job as JSON [id, token, flat hash], or '' (poke)."""
        if raw in (b"", ""):
            return
        job_id, token, flat = orjson.loads(raw)
        self._handed.append((job_id, token, flat))

    def _start_handed(self) -> None:
        handed, self._handed = self._handed, []
        for job_id, token, flat in handed:
            self._start(job_id, token, flat)

    def _merge_hist(self, hist: dict[str, int]) -> None:
        for k, v in hist.items():
            self._hist[k] = self._hist.get(k, 0) + v

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake early when the worker closes. Results that arrive meanwhile wait for
        the next scheduled round trip: they must not each become another attempt."""
        if self._closing:
            seconds = min(seconds, 0.1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self._closing:
                    await self._wake.wait()
                    self._wake.clear()

    # -- idle waiting -----------------------------------------------------------------------

    def _idle_timeout(self) -> float:
        timeout = self.drain_delay
        if self._rl_ttl > 0:
            timeout = min(timeout, self._rl_ttl / 1000)
        if self._next_in >= 0:
            timeout = min(timeout, max(0.001, self._next_in / 1000))
        if self._maxed:
            timeout = min(timeout, 0.5)
        return timeout

    async def _wait_for_work(self) -> None:
        """Block until a job is handed to us, a job of ours finishes, or the idle timeout."""
        timeout = self._idle_timeout()
        if self._rl_ttl > 0:
            await self._wake_or_sleep(timeout)
            return
        if self._inbox_task is None:
            self._inbox_task = asyncio.create_task(self._pop_inbox(timeout))
            self._inbox_task.add_done_callback(self._inbox_done)
        waiter = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait(
                {self._inbox_task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()

    async def _wake_or_sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _pop_inbox(self, timeout: float) -> Any:
        try:
            # The client-side deadline catches a connection that died without an error.
            return await asyncio.wait_for(self._store.pop_inbox(self._inbox, timeout), timeout + 2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _check_cancelled()
            log.warning("worker %s: blocking wait failed (%s); reconnecting", self.name, exc)
            await asyncio.sleep(0.1)
            return None

    def _inbox_done(self, task: asyncio.Task[Any]) -> None:
        self._inbox_task = None
        if task.cancelled() or task.exception() is not None:
            return
        reply = task.result()
        if reply is not None:
            self._receive(reply[1])
            self._start_handed()  # start at once: this is the latency-critical path
            self._wake.set()

    async def _interrupt_inbox_wait(self) -> None:
        """Make a pending inbox wait return now (a cancelled BLPOP could lose a popped job)."""
        task = self._inbox_task
        if task is None or task.done():
            return
        try:
            await self._store.push_inbox(self._inbox)
            await asyncio.wait_for(asyncio.shield(task), 3.0)
        except (*RETRYABLE, RedisError):
            _check_cancelled()

    # -- running one job ---------------------------------------------------------------------

    async def _execute(self, job: Job) -> None:
        started = time.monotonic()
        token = job.token or ""
        try:
            entry = await self._attempt(job)
        finally:
            self._running.pop(job.id, None)
            self._wake.set()  # a slot is free (whatever happened): the driver fetches again
        if entry is None:  # the lease was lost: another worker owns the job now
            self._lost.discard(token)
            self._release_hold(job.id, token)
            return
        elapsed_ms = (time.monotonic() - started) * 1000
        field = _HIST_FIELDS[bisect.bisect_left(HISTOGRAM_BUCKETS_MS, elapsed_ms)]
        hist = self._hist
        hist[field] = hist.get(field, 0) + 1
        hist["hs"] = hist.get("hs", 0) + int(elapsed_ms)
        self._pending.append(entry)

    async def _attempt(self, job: Job) -> list[Any] | None:
        """Run the processor once; the finish entry for its outcome (None: lease lost). Never
        raises: whatever user code does becomes an entry."""
        try:
            if job.scheduler_id is not None:
                await self._advance_scheduler(job)
            if job.timeout is None:
                result = await self.processor(job)
            else:
                result = await self._run_with_timeout(job)
        except asyncio.CancelledError as exc:
            if job.token in self._lost:
                return None
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # close() gave up waiting: back to the queue without using an attempt
                return [job.id, job.token, "l", 0, ""]
            return self._failure(job, exc)  # the processor's own cancellation leaked out
        except (RateLimitError, GroupRateLimitError, DelayJob) as exc:
            return self._control_entry(job, exc)
        except Exception as exc:
            return self._failure(job, exc)
        try:
            rv = dumps(result, "return value")
        except SerializationError as exc:
            return self._failure(job, UnrecoverableError(str(exc)))
        return [job.id, job.token, "c", rv, job.attempts_made + 1]

    def _control_entry(
        self, job: Job, exc: RateLimitError | GroupRateLimitError | DelayJob
    ) -> list[Any]:
        delay = checked_delay(exc.delay_ms)
        if delay is None:
            reason = f"{type(exc).__name__} with an invalid delay_ms: {exc.delay_ms!r}"
            return self._failure(job, UnrecoverableError(reason))
        if isinstance(exc, RateLimitError):
            return [job.id, job.token, "l", delay, "q"]
        if isinstance(exc, GroupRateLimitError):
            return [job.id, job.token, "l", delay, "g" if job.group else ""]
        return [job.id, job.token, "l", delay, "d"]

    async def _advance_scheduler(self, job: Job) -> None:
        """A scheduled run started: schedule the next one before running this one. Retried
        briefly; if Redis stays away, the stall sweep later restores the missing run."""
        assert job.scheduler_id is not None
        assert job.scheduled_at is not None
        for attempt in range(5):
            try:
                now = int(time.time() * 1000)
                await advance_scheduler(self._store, job.scheduler_id, job.scheduled_at, now)
                return
            except (*RETRYABLE, RedisError) as exc:
                _check_cancelled()
                log.warning("worker %s: could not schedule the next run of %s (%s)",
                            self.name, job.scheduler_id, exc)  # fmt: skip
                await asyncio.sleep(0.2 * 2**attempt)

    async def _run_with_timeout(self, job: Job) -> Any:
        assert job.timeout is not None
        cm = asyncio.timeout(job.timeout / 1000)
        try:
            async with cm:
                return await self.processor(job)
        except TimeoutError as exc:
            if cm.expired():
                raise JobTimeoutError(f"job exceeded its timeout of {job.timeout} ms") from exc
            raise

    def _failure(self, job: Job, exc: BaseException) -> list[Any]:
        attempts_made = job.attempts_made + 1
        message = _text(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        stack = _text("".join(traceback.format_exception(exc))[-self.stack_limit :])
        history = [
            *job.error_history,
            {"attempt": attempts_made, "error": message, "at": int(time.time() * 1000)},
        ]
        errs = orjson.dumps(history[-self.error_history_limit :])
        final = (
            isinstance(exc, UnrecoverableError)
            or attempts_made >= job.attempts
            or (isinstance(exc, JobTimeoutError) and not job.retry_on_timeout)
        )
        if not final:
            delay, why = self._backoff_delay(job, attempts_made, exc)
            if delay is None:
                final = True
                if why:
                    message = _text(f"{message} (not retried: {why})")
        if final:
            return [job.id, job.token, "f", message, stack, errs, attempts_made]
        return [job.id, job.token, "r", message, stack, errs, attempts_made, delay]

    def _backoff_delay(
        self, job: Job, attempts_made: int, exc: BaseException
    ) -> tuple[int | None, str]:
        """The delay before the next attempt, or (None, why) to fail the job now."""
        backoff = job.backoff
        if backoff is None:
            return 0, ""
        if backoff.type in ("fixed", "exponential"):
            return backoff.compute(attempts_made), ""
        strategy = self.backoff_strategies.get(backoff.type)
        if strategy is None:
            log.error(
                "worker %s: job %s names unknown backoff %r; failing it",
                self.name,
                job.id,
                backoff.type,
            )
            return None, f"unknown backoff strategy {backoff.type!r}"
        try:
            raw = strategy(attempts_made, exc, job)
        except Exception as err:
            log.exception("worker %s: backoff strategy %r raised", self.name, backoff.type)
            return None, f"backoff strategy {backoff.type!r} raised {type(err).__name__}"
        if raw is None:
            return None, ""  # the strategy's documented way to fail the job now
        delay = checked_delay(raw)
        if delay is None:
            log.error(
                "worker %s: backoff strategy %r returned %r; failing job %s",
                self.name,
                backoff.type,
                raw,
                job.id,
            )
            return None, f"backoff strategy {backoff.type!r} returned an invalid delay {raw!r}"
        return delay, ""

    # -- upkeep loops ------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        interval = self.lock_renew_interval / 1000
        while not self._done.is_set():
            await asyncio.sleep(interval)
            if not self._held:
                continue
            sent = dict(self._held)
            pairs: list[str] = []
            for job_id, token in sent.items():
                pairs += [job_id, token]
            try:
                lost = await self._store.extend_locks(self.lock_duration, pairs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _check_cancelled()
                log.warning("worker %s: lease renewal failed (%s)", self.name, exc)
                continue
            _check_cancelled()
            for job_id in lost:
                # Only a lease this very renewal carried: a retry or a handoff may have
                # re-leased the job to us under a new token while the renewal was in flight.
                if self._held.get(job_id) == sent[job_id]:
                    self._lease_lost(job_id)

    def _lease_lost(self, job_id: str) -> None:
        token = self._held.pop(job_id)
        running = self._running.get(job_id)
        log.warning(
            "worker %s: lease of job %s lost; cancelling it here (another worker owns it)",
            self.name,
            job_id,
        )
        if running is not None and running[0].token == token:
            self.stats["lost"] += 1  # (a finished job's result reports the loss on its own)
            self._lost.add(token)
            running[1].cancel()

    async def _sweep_loop(self) -> None:
        interval = self.stalled_interval / 1000
        while not self._done.is_set():
            delay = interval
            try:
                reply = await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _check_cancelled()
                log.warning("worker %s: stalled sweep failed (%s)", self.name, exc)
            else:
                _check_cancelled()
                if not reply.swept:
                    # Another worker swept: sweep again as soon as its throttle ends, so that
                    # a dead sweeper delays recovery by at most one interval.
                    delay = min(interval, reply.throttled_ms / 1000 + 0.002)
            await asyncio.sleep(delay)

    async def _sweep(self) -> Any:
        reply = await self._store.sweep_stalled(self.stalled_interval, self.max_stalled_count, 1000)
        if reply.requeued or reply.failed:
            log.warning(
                "worker %s: stalled jobs requeued=%s failed=%s",
                self.name,
                reply.requeued,
                reply.failed,
            )
        return reply

    async def sweep_stalled(self) -> tuple[list[str], list[str]]:
        """Run one stalled-job sweep now (unless another worker ran one this interval).

        Returns (requeued ids, failed ids)."""
        reply = await self._sweep()
        return reply.requeued, reply.failed


_STAT_OF = {"c": "completed", "f": "failed", "r": "retried", "l": "released"}


def _alive(task: asyncio.Task[Any] | None) -> bool:
    return task is not None and not task.done()
