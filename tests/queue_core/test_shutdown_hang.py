"""An event loop that shuts down under a worker nobody closed must not hang (regression).

redis-py can absorb a cancellation that races a reply; the worker's loops must notice that the
task is being cancelled instead of sleeping on. The scenario is run many times in a subprocess
because the race is timing dependent (before the fix about one run in three hung).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from queue_core.types import RedisClient

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time, uuid
    from queue_core import Queue, Worker, connect

    async def scenario(url):
        redis = connect(url)
        q = Queue("hang-" + uuid.uuid4().hex[:8], redis)
        job = await q.add("x", None)
        async def slow(j):
            time.sleep(0.3)  # blocks renewal: the lease expires, b may take the job over
        async def fast(j):
            return 1
        a = Worker(q, slow, lock_duration=200); a.start()
        b = Worker(q, fast, stalled_interval=20); b.start()
        await q.wait_until_finished(job.id, 5)
        await redis.aclose()   # the client goes away under running workers; nobody closes them
        await asyncio.sleep(float(sys.argv[3]))

    for _ in range(int(sys.argv[2])):
        asyncio.run(scenario(sys.argv[1]))
    print("exited")
    """
)


async def test_unclosed_workers_do_not_hang_loop_shutdown(
    redis: RedisClient, redis_url: str
) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", SCRIPT, redis_url, "20", "0.05"],
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "exited"
