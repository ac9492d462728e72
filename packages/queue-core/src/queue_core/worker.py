"""The consumer side: lease jobs, run them, report results, keep leases alive, recover stalls."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import signal
import time
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from queue_core.errors import (
    DelayJob,
    GroupRateLimitError,
    InvalidOptionError,
    JobTimeoutError,
    RateLimitError,
    UnrecoverableError,
    WorkerStateError,
)
from queue_core.job import Job
from queue_core.options import BackoffStrategy
from queue_core.queue import Queue, _pack
from queue_core.types import Processor, RedisClient

__all__ = ["HISTOGRAM_BUCKETS_MS", "Worker"]

log = logging.getLogger("queue_core.worker")

# Errors after which the same request is simply sent again once Redis answers.
RETRYABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def _check_cancelled() -> None:
    """Re-raise a cancellation that the Redis client swallowed.

    A cancel that lands just as a reply arrives can be absorbed by redis-py (the call returns
    normally or raises a connection error). A loop that then went back to sleep would ignore the
    cancellation, and an event loop shutting down would hang on it. Loops call this after each
    Redis round trip."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


HISTOGRAM_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_HIST_FIELDS = [f"h:{b}" for b in HISTOGRAM_BUCKETS_MS] + ["h:inf"]


class Worker:
    """Runs `processor(job)` for the jobs of one queue, `concurrency` at a time.

    Lifecycle: `start()` (or `await run()`), then `await close(timeout)`. Delivery is
    at-least-once: a job runs again if its lease expires before it finishes (the worker died,
    the event loop was blocked longer than `lock_duration`, or Redis was unreachable).
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
        if lock_duration < 100:
            raise InvalidOptionError("lock_duration", "must be at least 100 ms")
        if stalled_interval < 10:
            raise InvalidOptionError("stalled_interval", "must be at least 10 ms")
        if max_stalled_count < 0:
            raise InvalidOptionError("max_stalled_count", "must not be negative")
        if drain_delay <= 0:
            raise InvalidOptionError("drain_delay", "must be positive")
        self.redis = self.queue.redis
        self._r: Any = self.queue._r
        self.processor = processor
        self.concurrency = concurrency
        self.lock_duration = lock_duration
        self.lock_renew_interval = lock_renew_interval or max(50, lock_duration // 3)
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

        self._script = self.queue._scripts
        self._route = self.queue._route
        self._base = self.queue._base
        self._inbox = self.queue.keys.key(f"w:{self.token_prefix}")
        self._running: dict[str, tuple[Job, asyncio.Task[None]]] = {}
        self._held: dict[str, str] = {}  # every job this worker leases: id -> token
        self._pending: list[list[Any]] = []
        self._hist: dict[str, int] = {}
        self._lost: set[str] = set()
        self._wake = asyncio.Event()
        self._closing = False
        self._force = False
        self._idle = False
        self._next_in = -1
        self._rl_ttl = 0
        self._maxed = False
        self._started = False
        self._done = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._aux_tasks: list[asyncio.Task[None]] = []
        self._inbox_task: asyncio.Task[Any] | None = None
        self._handed: list[Any] = []  # jobs handed to this worker, not yet started
        self._registered = False  # whether Redis may hold an idle registration for us
        self._close_task: asyncio.Task[None] | None = None

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

    def start(self) -> None:
        if self._started:
            raise WorkerStateError("worker already started")
        self._started = True
        self.last_fetch_at = time.monotonic()
        self._loop_task = asyncio.create_task(self._main_loop(), name=f"worker:{self.queue.name}")
        self._aux_tasks = [
            asyncio.create_task(self._renew_loop(), name="worker-renew"),
            asyncio.create_task(self._sweep_loop(), name="worker-sweep"),
        ]

    async def run(self, *, handle_signals: bool = False) -> None:
        """Start (if needed) and run until closed. With `handle_signals`, SIGTERM and SIGINT
        trigger `close(shutdown_timeout)`."""
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

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("worker %s: %s received, closing", self.name, signal.Signals(sig).name)
        if self._close_task is None:
            self._close_task = asyncio.create_task(self.close(self.shutdown_timeout))

    async def close(self, timeout: float | None = None) -> None:
        """Stop fetching, let running jobs finish for up to `timeout` seconds, then cancel the
        rest and return them to the queue at once (no attempt used), flush every result, and
        release resources. Safe to call more than once."""
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
        leftovers: list[asyncio.Task[Any]] = [*self._aux_tasks]
        if self._inbox_task is not None:
            leftovers.append(self._inbox_task)
        for leftover in leftovers:
            if not leftover.done():
                leftover.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await leftover
        self._done.set()

    # -- the driver loop: one round trip finishes a batch and leases the next one --------------

    async def _main_loop(self) -> None:
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
                failures += 1
                delay = min(5.0, 0.05 * 2**failures)
                log.warning(
                    "worker %s: Redis unavailable (%s); retrying in %.2fs", self.name, exc, delay
                )
                await self._sleep(delay)
                continue
            except (ResponseError, RedisError):
                _check_cancelled()
                failures += 1
                log.exception("worker %s: finish/fetch failed", self.name)
                if failures < 3:
                    self._pending[:0] = entries
                else:
                    # Give up on these results: the jobs' leases expire and the sweep retries them.
                    for entry in entries:
                        self._held.pop(entry[0], None)
                await self._sleep(0.5)
                continue
            _check_cancelled()
            failures = 0
            self.last_fetch_at = time.monotonic()
            self._apply(entries, reply, want)

    async def _finish_fetch(self, entries: list[list[Any]], hist: dict[str, int], want: int) -> Any:
        # Registering as idle (block_ms > 0) lets producers hand jobs straight to this worker.
        block_ms = int(self.drain_delay * 1000) if want > 0 else 0
        flat_hist: list[Any] = []
        for field, count in hist.items():
            flat_hist += [field, count]
        args = [
            self._base,
            self.token_prefix,
            self.lock_duration,
            want,
            block_ms,
            _pack(flat_hist),
            _pack(entries),
        ]
        return await self._script["finish_fetch"](self.redis, self._route, args)

    def _apply(self, entries: list[list[Any]], reply: Any, want: int) -> None:
        codes, jobs, next_in, rl_ttl, maxed, handed = reply
        self._registered = want > 0 and len(jobs) // 3 + len(handed) < want
        for entry, code in zip(entries, codes, strict=True):
            job_id = entry[0]
            self._held.pop(job_id, None)
            if code == -1:
                self.stats["lost"] += 1
                log.warning(
                    "worker %s: lease of job %s was lost (it stalled and was taken over); "
                    "its %s result was discarded",
                    self.name,
                    job_id,
                    entry[2],
                )
        fetched = len(jobs) // 3
        for i in range(0, len(jobs), 3):
            raw_id = jobs[i]
            raw_tok = jobs[i + 1]
            self._start(
                raw_id.decode() if isinstance(raw_id, bytes) else raw_id,
                raw_tok.decode() if isinstance(raw_tok, bytes) else raw_tok,
                jobs[i + 2],
            )
        for raw in handed:
            self._receive(raw)
        fetched += len(handed)
        self._idle = want > 0 and fetched < want
        self._next_in = int(next_in)
        self._rl_ttl = int(rl_ttl)
        self._maxed = bool(maxed)

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
        self._running[job_id] = (job, asyncio.create_task(self._execute(job)))

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

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when the worker closes."""
        if self._closing:
            seconds = min(seconds, 0.1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self._closing:
                    await self._wake.wait()
                    self._wake.clear()
                    if self._pending:
                        return

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
            await self._sleep(timeout)
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

    async def _pop_inbox(self, timeout: float) -> Any:
        try:
            # The client-side deadline catches a connection that died without an error.
            reply = await asyncio.wait_for(
                self._r.blpop([self._inbox], timeout=timeout), timeout + 2.0
            )
        except RETRYABLE as exc:
            _check_cancelled()
            log.warning("worker %s: blocking wait failed (%s); reconnecting", self.name, exc)
            await asyncio.sleep(0.1)
            return None
        _check_cancelled()
        return reply

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
            await self._r.rpush(self._inbox, "")
            await asyncio.wait_for(asyncio.shield(task), 3.0)
        except (*RETRYABLE, RedisError):
            _check_cancelled()

    # -- running one job ---------------------------------------------------------------------

    async def _execute(self, job: Job) -> None:
        started = time.monotonic()
        entry: list[Any] | None
        try:
            if job.scheduler_id is not None:
                await self._advance_scheduler(job)
            if job.timeout is None:
                result = await self.processor(job)
            else:
                result = await self._run_with_timeout(job)
        except asyncio.CancelledError:
            entry = None if job.id in self._lost else [job.id, job.token, "l", 0, ""]
        except RateLimitError as exc:
            entry = [job.id, job.token, "l", exc.delay_ms, "q"]
        except GroupRateLimitError as exc:
            entry = [job.id, job.token, "l", exc.delay_ms, "g" if job.group else ""]
        except DelayJob as exc:
            entry = [job.id, job.token, "l", exc.delay_ms, "d"]
        except Exception as exc:
            entry = self._failure(job, exc)
        else:
            try:
                rv = orjson.dumps(result)
            except TypeError as exc:
                entry = self._failure(job, UnrecoverableError(f"return value is not JSON: {exc}"))
            else:
                entry = [job.id, job.token, "c", rv, job.attempts_made + 1]
                self.stats["completed"] += 1
        finally:
            self._running.pop(job.id, None)
        if entry is None:
            self._held.pop(job.id, None)
            self._lost.discard(job.id)
            return
        if entry[2] == "l":
            self.stats["released"] += 1
        elapsed_ms = (time.monotonic() - started) * 1000
        field = _HIST_FIELDS[bisect.bisect_left(HISTOGRAM_BUCKETS_MS, elapsed_ms)]
        hist = self._hist
        hist[field] = hist.get(field, 0) + 1
        hist["hs"] = hist.get("hs", 0) + int(elapsed_ms)
        self._pending.append(entry)
        self._wake.set()

    async def _advance_scheduler(self, job: Job) -> None:
        """A scheduled run started: schedule the next one before running this one. Retried
        briefly; if Redis stays away, the stall sweep later restores the missing run."""
        assert job.scheduler_id is not None
        assert job.scheduled_at is not None
        for attempt in range(5):
            try:
                await self.queue._advance_scheduler(
                    job.scheduler_id, job.scheduled_at, int(time.time() * 1000)
                )
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
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        stack = "".join(traceback.format_exception(exc))[-self.stack_limit :]
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
        delay: int | None = 0
        if not final:
            delay = self._backoff_delay(job, attempts_made, exc)
            final = delay is None
        if final:
            self.stats["failed"] += 1
            return [job.id, job.token, "f", message, stack, errs, attempts_made]
        self.stats["retried"] += 1
        return [job.id, job.token, "r", message, stack, errs, attempts_made, delay]

    def _backoff_delay(self, job: Job, attempts_made: int, exc: BaseException) -> int | None:
        backoff = job.backoff
        if backoff is None:
            return 0
        if backoff.type in ("fixed", "exponential"):
            return backoff.compute(attempts_made)
        strategy = self.backoff_strategies.get(backoff.type)
        if strategy is None:
            log.error(
                "worker %s: job %s names unknown backoff %r; failing it",
                self.name,
                job.id,
                backoff.type,
            )
            return None
        try:
            delay = strategy(attempts_made, exc, job)
        except Exception:
            log.exception("worker %s: backoff strategy %r raised", self.name, backoff.type)
            return None
        if delay is None or delay < 0:
            return None
        return int(delay)

    # -- upkeep loops ------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        interval = self.lock_renew_interval / 1000
        while not self._done.is_set():
            await asyncio.sleep(interval)
            if not self._held:
                continue
            pairs: list[Any] = []
            for job_id, token in self._held.items():
                pairs += [job_id, token]
            try:
                lost = await self._script["extend_locks"](
                    self.redis, self._route, [self._base, self.lock_duration, *pairs]
                )
            except (*RETRYABLE, RedisError) as exc:
                _check_cancelled()
                log.warning("worker %s: lease renewal failed (%s)", self.name, exc)
                continue
            _check_cancelled()
            for raw in lost:
                self._lease_lost(raw.decode() if isinstance(raw, bytes) else raw)

    def _lease_lost(self, job_id: str) -> None:
        self._held.pop(job_id, None)
        running = self._running.get(job_id)
        self.stats["lost"] += 1
        log.warning(
            "worker %s: lease of job %s lost; cancelling it here (another worker owns it)",
            self.name,
            job_id,
        )
        if running is not None:
            self._lost.add(job_id)
            running[1].cancel()

    async def _sweep_loop(self) -> None:
        interval = self.stalled_interval / 1000
        while not self._done.is_set():
            try:
                await self.sweep_stalled()
            except (*RETRYABLE, RedisError) as exc:
                _check_cancelled()
                log.warning("worker %s: stalled sweep failed (%s)", self.name, exc)
            _check_cancelled()
            await asyncio.sleep(interval)

    async def sweep_stalled(self) -> tuple[list[str], list[str]]:
        """Run one stalled-job sweep now (unless another worker ran one this interval).

        Returns (requeued ids, failed ids)."""
        _swept, requeued, failed = await self._script["sweep_stalled"](
            self.redis,
            self._route,
            [self._base, self.stalled_interval, self.max_stalled_count, 1000],
        )

        def ids(raw: list[Any]) -> list[str]:
            return [x.decode() if isinstance(x, bytes) else x for x in raw]

        if requeued or failed:
            log.warning(
                "worker %s: stalled jobs requeued=%s failed=%s",
                self.name,
                ids(requeued),
                ids(failed),
            )
        return ids(requeued), ids(failed)
