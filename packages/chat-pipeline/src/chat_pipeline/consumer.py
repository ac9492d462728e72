"""The one way a service runs queue workers: built with the pipeline's settings, supervised
(a dead worker ends the service, to be restarted), its liveness reported, closed on a signal."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from chat_pipeline.runtime import Runtime
from chat_pipeline.supervision import WorkerSet, first_of, report_health
from queue_core import Queue, Worker
from queue_core.options import BackoffStrategy
from queue_core.types import Processor

__all__ = ["pipeline_worker", "serve_workers"]


def pipeline_worker(
    rt: Runtime,
    queue: Queue,
    processor: Processor,
    *,
    concurrency: int,
    lock_ms: int | None = None,
    backoff_strategies: Mapping[str, BackoffStrategy] | None = None,
) -> Worker:
    """A worker with the pipeline's lease, stall-sweep and stall-limit settings."""
    s = rt.settings
    return Worker(
        queue,
        processor,
        concurrency=concurrency,
        lock_duration=lock_ms or s.queue_lock_ms,
        stalled_interval=s.stalled_interval_ms,
        max_stalled_count=s.max_stalls,
        backoff_strategies=backoff_strategies,
    )


async def serve_workers(
    service: str,
    stop: asyncio.Event,
    workers: Sequence[Worker],
    *,
    tasks: Sequence[Coroutine[Any, Any, None]] = (),
    close_timeout: float = 30.0,
) -> None:
    """Run `workers` (and background `tasks`, e.g. the reconciler) until `stop` is set or a
    worker dies, writing the service's health report meanwhile. Raises the error of a worker
    that died (the service then exits non-zero and is restarted)."""
    running = WorkerSet(workers)
    running.start()
    background = [asyncio.create_task(task) for task in tasks]
    try:
        async with report_health(service, running):
            error = await first_of(stop.wait(), running.failed())
    finally:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await running.close(close_timeout)
    if isinstance(error, BaseException):
        raise error
