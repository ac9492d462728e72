"""Single sequential adds: queue-core beside dramatiq and the bare round trip, in one run.

    scripts/uv.sh run --with 'dramatiq[redis]' python bench/single_add_bench.py [--n 5000]

Each round adds N jobs one at a time (each awaited before the next) with queue-core, then
enqueues N messages with dramatiq's RedisBroker (if installed), then measures the bare floor:
N sequential EVALSHA of a trivial script with redis-py's asyncio client (what queue-core runs
on) and with its sync client (what dramatiq runs on). Rounds alternate so that the machine's
drift hits every contender alike; the medians over --rounds are printed as JSON. dramatiq is
not a dependency of the project: without it that column is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from typing import Any

import redis as sync_redis

from devstack import RedisServer
from queue_core import Queue, connect


async def _queue_core(url: str, n: int) -> float:
    r = connect(url)
    q = Queue(f"bench-add-{uuid.uuid4().hex[:8]}", r)
    await q.add("warm", None)
    t0 = time.perf_counter()
    for i in range(n):
        await q.add("job", {"i": i})
    rate = n / (time.perf_counter() - t0)
    await q.pause()
    await q.obliterate(force=True)
    await r.aclose()
    return rate


async def _bare_async(url: str, n: int) -> float:
    r: Any = connect(url)
    sha = await r.script_load("return 1")
    t0 = time.perf_counter()
    for _ in range(n):
        await r.evalsha(sha, 0)
    rate = n / (time.perf_counter() - t0)
    await r.aclose()
    return rate


def _bare_sync(url: str, n: int) -> float:
    r = sync_redis.Redis.from_url(url)
    sha = r.script_load("return 1")
    t0 = time.perf_counter()
    for _ in range(n):
        r.evalsha(sha, 0)
    rate = n / (time.perf_counter() - t0)
    r.close()
    return rate


def _dramatiq(url: str, n: int) -> float | None:
    try:
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker
    except ImportError:
        return None
    broker = RedisBroker(url=url, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name="bench", broker=broker)  # type: ignore[misc]
    def job(i: int) -> None:  # pragma: no cover - never run here
        pass

    job.send(-1)  # warm
    t0 = time.perf_counter()
    for i in range(n):
        job.send(i)
    rate = n / (time.perf_counter() - t0)
    broker.flush_all()
    broker.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        server = RedisServer().start()
        url = server.url
    runs: dict[str, list[float]] = {
        k: [] for k in ("queue_core", "dramatiq", "bare_async", "bare_sync")
    }
    try:
        for _ in range(args.rounds):
            runs["queue_core"].append(asyncio.run(_queue_core(url, args.n)))
            d = _dramatiq(url, args.n)
            if d is not None:
                runs["dramatiq"].append(d)
            runs["bare_async"].append(asyncio.run(_bare_async(url, args.n)))
            runs["bare_sync"].append(_bare_sync(url, args.n))
    finally:
        if server is not None:
            server.cleanup()
    med = {k: round(statistics.median(v)) for k, v in runs.items() if v}
    out: dict[str, Any] = {"n": args.n, "rounds": args.rounds, "adds_per_s_median": med}
    if "dramatiq" in med:
        out["queue_core_vs_dramatiq"] = round(med["queue_core"] / med["dramatiq"], 2)
    out["queue_core_vs_bare_async"] = round(med["queue_core"] / med["bare_async"], 2)
    out["runs"] = {k: [round(x) for x in v] for k, v in runs.items() if v}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
