"""One worker process of the soak test (tests/queue_core/soak.py drives it).

usage: python soak_worker.py CONFIG_JSON

Uses only queue-core's public API. What a job does is decided by its data (see soak.py:
`f` failed attempts before it succeeds, `u` unrecoverable, `ms` async work, `blk` a blocking
sleep, `bv` the value of the custom "soak" backoff strategy), so the outcome of every job is
known in advance whatever worker runs it.

Per attempt the processor records, under `test:<queue>:`:
  runs         hash  job id -> attempts run (a re-run after a lost lease shows up here)
  starts:<g>   list  "<seq>:<attempt>" of each attempt of group g, in start order
  done:<g>     list  <seq> of each completed job of group g, in completion order
  inflight:<g> set   attempts of group g running now
  overlap      list  attempts that started while another attempt of their group was running
Every `report_interval` seconds the process writes its state as JSON to the hash field
`test:<queue>:report` / <index> (see `_snapshot`), and a last one with `final: true` after
the worker has closed (with how long close() took after SIGTERM). Prints "ready" once the
worker has started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

from queue_core import Job, Queue, UnrecoverableError, Worker, connect

SHUTDOWN_TIMEOUT = 5.0
log = logging.getLogger("soak")

# Values the "soak" backoff strategy returns, by the job's `bv`. The last five are bad values
# a strategy could return; they must not wedge a worker, kill one of its loops or leave the
# job stuck (how the worker treats them -- fail, clamp, retry at once -- is not asserted).
BACKOFF_VALUES: dict[str, float] = {
    "zero": 0.0,
    "float": 7.5,
    "nan": math.nan,
    "inf": math.inf,
    "neg": -5.0,
    "huge": 1e30,
}


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def soak_backoff(attempts_made: int, exc: BaseException, job: Job) -> float | None:
    kind = job.data.get("bv", "zero")
    if kind == "raise":
        raise ValueError("soak: backoff strategy raised")
    return BACKOFF_VALUES[kind]


class SoakWorker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.redis = connect(cfg["url"])
        self.queue = Queue(cfg["queue"], self.redis)
        self.k = f"test:{cfg['queue']}:"
        self.worker = Worker(
            self.queue,
            self.process,
            concurrency=cfg["concurrency"],
            lock_duration=cfg["lock_duration"],
            lock_renew_interval=cfg["lock_renew_interval"],
            stalled_interval=cfg["stalled_interval"],
            drain_delay=cfg["drain_delay"],
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            backoff_strategies={"soak": soak_backoff},
            name=f"soak-{cfg['index']}",
        )
        self.free_since: float | None = None
        self.max_gap = 0.0
        self.samples = 0
        self.attempts: dict[str, tuple[str, float]] = {}  # running attempts: job id, since
        self.close_started: float | None = None
        self.close_s: float | None = None
        self._close_task: asyncio.Task[None] | None = None

    async def process(self, job: Job) -> Any:
        d = job.data
        group = d.get("g")
        attempt = job.attempts_made
        # The lease token names this attempt. A set, not a counter: an attempt cancelled in the
        # middle of the pipeline below (its lease was lost) still leaves the set right, since
        # removing a member that was never added is harmless.
        me = f"{job.id}@{job.token}"
        self.attempts[me] = (job.id, time.monotonic())
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self.k + "runs", job.id, 1)
            if group is not None:
                pipe.rpush(self.k + f"starts:{group}", f"{d['s']}:{attempt}")
                pipe.sadd(self.k + f"inflight:{group}", me)
                pipe.smembers(self.k + f"inflight:{group}")
            replies = await pipe.execute()
            if group is not None and len(replies[3]) > 1:
                others = sorted(_s(x) for x in replies[3] if _s(x) != me)
                await self.redis.rpush(
                    self.k + "overlap",
                    f"{group} #{d['s']} attempt {attempt} ({me}) while {others} ran",
                )
            if d.get("ms"):
                await asyncio.sleep(d["ms"] / 1000)
            if d.get("blk"):
                # Deliberately blocks the event loop (a CPU-bound step in a real processor);
                # always well under lock_duration, so no lease may be lost over it.
                time.sleep(d["blk"] / 1000)  # noqa: ASYNC251
            if attempt < d.get("f", 0):
                if d.get("u"):
                    raise UnrecoverableError("soak: unrecoverable")
                raise RuntimeError(f"soak: planned failure {attempt + 1}")
            if group is not None:
                await self.redis.rpush(self.k + f"done:{group}", d["s"])
            return d.get("s", 0)
        finally:
            try:
                if group is not None:
                    await self.redis.srem(self.k + f"inflight:{group}", me)
            finally:
                self.attempts.pop(me, None)

    def _snapshot(self, final: bool) -> dict[str, Any]:
        """The process's view of its worker. `gap` is how long the worker has had a free slot
        without a successful fetch (min of the two), sampled here; a healthy worker with a free
        slot fetches at least every `drain_delay` seconds, whether or not work is waiting."""
        w = self.worker
        now = time.monotonic()
        gap = 0.0
        closing = self.close_started is not None
        if w.active_count < w.concurrency and w.running and not closing and not final:
            if self.free_since is None:
                self.free_since = now
            gap = min(now - self.free_since, w.seconds_since_last_fetch)
        else:
            self.free_since = None
        self.max_gap = max(self.max_gap, gap)
        self.samples += 1
        oldest = sorted(self.attempts.values(), key=lambda a: a[1])[:5]
        return {
            "index": self.cfg["index"],
            "pid": os.getpid(),
            "ts": time.time(),
            "concurrency": w.concurrency,
            "active": w.active_count,
            "running": w.running,
            "since_fetch": min(w.seconds_since_last_fetch, 1e9),
            "gap": gap,
            "max_gap": self.max_gap,
            "samples": self.samples,
            "stats": dict(w.stats),
            # the processor's view: attempts still inside it, oldest first, with their age
            "attempts": [[job_id, round(now - since, 2)] for job_id, since in oldest],
            "closing": closing,
            "close_s": self.close_s,
            "final": final,
        }

    async def _report(self, final: bool = False) -> None:
        snap = json.dumps(self._snapshot(final))
        await self.redis.hset(self.k + "report", str(self.cfg["index"]), snap)

    async def report_loop(self) -> None:
        # A reporter that dies would look like a wedged worker (stale report): keep it alive
        # through transient errors, but let them be seen.
        while True:
            try:
                await self._report()
            except Exception:
                log.exception("soak worker: report failed")
            await asyncio.sleep(self.cfg["report_interval"])

    def _on_sigterm(self) -> None:
        # Handled here rather than by Worker.run(handle_signals=True) to time the close and to
        # stop counting the fetch gap while closing (a closing worker fetches no more work).
        if self._close_task is not None:
            return
        self.close_started = time.monotonic()
        self._close_task = asyncio.create_task(self.worker.close(SHUTDOWN_TIMEOUT))
        self._close_task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("soak worker: close() failed", exc_info=task.exception())

    async def run(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_sigterm)
        self.worker.start()
        reporter = asyncio.create_task(self.report_loop())
        print("ready", flush=True)
        try:
            await self.worker.run()
            if self.close_started is not None:
                self.close_s = round(time.monotonic() - self.close_started, 2)
        finally:
            reporter.cancel()
            try:
                await reporter
            except asyncio.CancelledError:
                pass
            await self._report(final=True)
            await self.redis.aclose()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s soak-{cfg['index']} %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(SoakWorker(cfg).run())


if __name__ == "__main__":
    main()
