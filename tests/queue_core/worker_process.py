"""A worker in its own process, for kill tests.

usage: python worker_process.py REDIS_URL QUEUE MODE [CONCURRENCY]
MODE "hang": each job records that it started (SADD <queue>:started id) and then hangs.
MODE "work": each job records itself and sleeps 20 ms (RPUSH <queue>:ran id), then completes.
Prints "ready" once the worker has started.
"""

from __future__ import annotations

import asyncio
import sys

from queue_core import Job, Queue, Worker, connect


async def main(url: str, name: str, mode: str, concurrency: int) -> None:
    redis = connect(url)
    queue = Queue(name, redis)

    async def proc(job: Job) -> str:
        if mode == "hang":
            await redis.sadd(f"test:{name}:started", job.id)
            await asyncio.sleep(3600)
        await redis.rpush(f"test:{name}:ran", job.id)
        await asyncio.sleep(0.02)
        return "ok"

    worker = Worker(
        queue,
        proc,
        concurrency=concurrency,
        lock_duration=1000,
        stalled_interval=300,
        shutdown_timeout=5,
    )
    worker.start()
    print("ready", flush=True)
    await worker.run(handle_signals=True)
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    )
