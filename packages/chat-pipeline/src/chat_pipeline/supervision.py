"""Queue workers of one service process: start, watch, report liveness, stop.

A worker whose driver loop died ends `WorkerSet.failed()` with its error, so the service exits
non-zero and its supervisor (compose, Kubernetes, systemd) restarts it, instead of a process
that looks alive and answers nothing. Liveness goes to `/readyz` (the gateway) and to a small
JSON file that `<service> health` reads (services without HTTP: a container health check).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any

from queue_core import Worker
from queue_core.worker import WorkerHealth

__all__ = [
    "HEALTH_MAX_AGE_S",
    "WorkerSet",
    "check_health_file",
    "first_of",
    "health_file",
    "report_health",
]

log = logging.getLogger("chat_pipeline.supervision")

HEALTH_INTERVAL_S = 5.0
HEALTH_MAX_AGE_S = 30.0  # a report older than this means the process is stuck or gone


class WorkerSet:
    def __init__(self, workers: Sequence[Worker]) -> None:
        self.workers = list(workers)
        self._runs: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for worker in self.workers:
            if not worker.running:
                worker.start()
        self._runs = [
            asyncio.create_task(worker.run(), name=f"run:{worker.queue.name}")
            for worker in self.workers
        ]

    async def failed(self) -> BaseException:
        """Wait until a worker stops with an error; returns that error (never returns while
        every worker runs, or once they all closed cleanly)."""
        pending = set(self._runs)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    error = task.exception()
                    assert error is not None
                    return error
        await asyncio.Event().wait()  # all closed cleanly: nothing will fail any more
        raise AssertionError("unreachable")  # pragma: no cover

    def health(self) -> list[WorkerHealth]:
        return [worker.health() for worker in self.workers]

    @property
    def healthy(self) -> bool:
        return all(h["healthy"] for h in self.health())

    async def close(self, timeout: float) -> None:
        await asyncio.gather(*(w.close(timeout=timeout) for w in self.workers))
        for task in self._runs:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def first_of(*awaitables: Awaitable[Any]) -> Any:
    """The result of whichever awaitable finishes first; the others are cancelled."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def health_file(service: str) -> Path:
    """Where `service` reports its workers' health (SERVICE_HEALTH_FILE overrides it)."""
    explicit = os.environ.get("SERVICE_HEALTH_FILE")
    if explicit:
        return Path(explicit)
    return Path(tempfile.gettempdir()) / f"chatbot-{service}.health.json"


@contextlib.asynccontextmanager
async def report_health(service: str, workers: WorkerSet) -> AsyncIterator[Path]:
    """Write the workers' health to `health_file(service)` every few seconds while inside."""
    path = health_file(service)

    async def loop() -> None:
        while True:
            try:
                _write(path, service, workers)
            except OSError as exc:
                log.warning("%s: cannot write the health file %s (%s)", service, path, exc)
            await asyncio.sleep(HEALTH_INTERVAL_S)

    task = asyncio.create_task(loop(), name="health-file")
    try:
        yield path
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(OSError):
            path.unlink()


def _write(path: Path, service: str, workers: WorkerSet) -> None:
    report = {
        "service": service,
        "pid": os.getpid(),
        "at": time.time(),
        "healthy": workers.healthy,
        "workers": workers.health(),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)  # atomic: a reader never sees half a report


def check_health_file(
    service: str, max_age: float = HEALTH_MAX_AGE_S
) -> tuple[bool, dict[str, Any]]:
    """(healthy, report) from the service's health file: healthy when the report is fresh
    and every worker in it is healthy."""
    path = health_file(service)
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return False, {"service": service, "error": f"no health report at {path}: {exc}"}
    age = time.time() - float(report.get("at", 0))
    report["age_s"] = round(age, 1)
    return bool(report.get("healthy")) and age <= max_age, report
