"""queue-core benchmark: prints one JSON object.

    python bench/queue_core_bench.py [--jobs 20000] [--latency-jobs 2000] [--only name,...]

Runs against REDIS_URL when set, otherwise against a private valkey-server it starts (and
stops). Producer and worker run in separate processes, one each, as the peers were measured.
Default retention settings throughout.

Metrics
- enqueue_per_s: N adds from one producer, each awaited before the next.
- enqueue_concurrent_per_s: N adds issued concurrently (asyncio.gather) from one producer.
- enqueue_bulk_per_s: N jobs through add_bulk in batches of 1000.
- process_per_s_c10 / _c100: N queued no-op jobs, one worker process at concurrency 10 / 100,
  every job run and acknowledged (timed from worker start until close() has flushed every ack).
- grouped_process_per_s_c100: as c100, with the jobs spread over 1,000 groups;
  grouped_vs_ungrouped is the median ratio of grouped to ungrouped runs made back to back.
- latency_p50_ms / latency_p99_ms: enqueue -> processor start, at a steady 200 jobs/s with an
  idle worker (wall clock of the same machine, both processes).
- latency_floor_p50_ms / _p99_ms: the same measurement for a bare redis-py LPUSH -> BLPOP
  between two processes: what one network hop costs on this machine, for context.
- redis_commands_per_job: every command Redis executed (INFO commandstats, script-internal
  commands included) per job over a full add + process cycle; redis_calls_per_job counts only
  the commands clients sent (EVALSHA, BLPOP), i.e. the round trips.

Each throughput and latency figure is the median of --repeat runs (default 3); the individual
runs are listed under "runs". This machine is noisy: single runs vary by +-30%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from typing import Any

from queue_core import JobOptions, Queue, Worker, connect


def _name(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


async def _cleanup(url: str, name: str) -> None:
    r = connect(url)
    q = Queue(name, r)
    await q.pause()
    await q.obliterate(force=True)
    await r.aclose()


# -- producer side ---------------------------------------------------------------------------


async def enqueue_sequential(url: str, n: int) -> float:
    r = connect(url)
    q = Queue(_name("seq"), r)
    await q.add("warm", None)
    t0 = time.perf_counter()
    for i in range(n):
        await q.add("job", {"i": i})
    dt = time.perf_counter() - t0
    await r.aclose()
    await _cleanup(url, q.name)
    return n / dt


async def enqueue_concurrent(url: str, n: int) -> float:
    r = connect(url)
    q = Queue(_name("conc"), r)
    await q.add("warm", None)
    t0 = time.perf_counter()
    await asyncio.gather(*(q.add("job", {"i": i}) for i in range(n)))
    dt = time.perf_counter() - t0
    await r.aclose()
    await _cleanup(url, q.name)
    return n / dt


async def enqueue_bulk(url: str, n: int, batch: int = 1000) -> float:
    r = connect(url)
    q = Queue(_name("bulk"), r)
    await q.add("warm", None)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        await q.add_bulk([("job", {"i": i}) for i in range(start, min(n, start + batch))])
    dt = time.perf_counter() - t0
    await r.aclose()
    await _cleanup(url, q.name)
    return n / dt


async def _fill(url: str, name: str, n: int, groups: int = 0) -> None:
    r = connect(url)
    q = Queue(name, r)
    for start in range(0, n, 1000):
        items = []
        for i in range(start, min(n, start + 1000)):
            opts = JobOptions(group=f"g{i % groups}") if groups else JobOptions()
            items.append(("job", {"i": i}, opts))
        await q.add_bulk(items)
    await r.aclose()


# -- worker side (child processes) -----------------------------------------------------------


def _process_child(url: str, name: str, n: int, concurrency: int, out: Any) -> None:
    async def main() -> float:
        r = connect(url)
        q = Queue(name, r)
        done = asyncio.Event()
        count = 0

        async def noop(job: Any) -> None:
            nonlocal count
            count += 1
            if count >= n:
                done.set()

        worker = Worker(q, noop, concurrency=concurrency)
        t0 = time.perf_counter()
        worker.start()
        await done.wait()
        await worker.close(30)
        dt = time.perf_counter() - t0
        await r.aclose()
        return dt

    out.put(asyncio.run(main()))


def _latency_child(url: str, name: str, n: int, ready: Any, out: Any) -> None:
    async def main() -> list[float]:
        r = connect(url)
        q = Queue(name, r)
        lat: list[float] = []
        done = asyncio.Event()

        async def proc(job: Any) -> None:
            lat.append((time.time_ns() - job.data["t"]) / 1e6)
            if len(lat) >= n:
                done.set()

        worker = Worker(q, proc, concurrency=10)
        worker.start()
        await asyncio.sleep(0.5)  # idle: blocked on the wake-up marker
        ready.set()
        await done.wait()
        await worker.close(10)
        await r.aclose()
        return lat

    out.put(asyncio.run(main()))


def process_rate(url: str, n: int, concurrency: int, groups: int = 0) -> float:
    name = _name(f"c{concurrency}")
    asyncio.run(_fill(url, name, n, groups))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_process_child, args=(url, name, n, concurrency, out))
    child.start()
    dt = out.get(timeout=600)
    child.join(30)
    asyncio.run(_cleanup(url, name))
    return n / dt


def latency(url: str, n: int, rate: float = 200.0) -> tuple[float, float]:
    name = _name("lat")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ready = ctx.Event()
    child = ctx.Process(target=_latency_child, args=(url, name, n, ready, out))
    child.start()
    ready.wait(30)

    async def produce() -> None:
        r = connect(url)
        q = Queue(name, r)
        interval = 1 / rate
        start = time.perf_counter()
        for i in range(n):
            target = start + i * interval
            now = time.perf_counter()
            if target > now:
                await asyncio.sleep(target - now)
            await q.add("job", {"t": time.time_ns()})
        await r.aclose()

    asyncio.run(produce())
    lat = sorted(out.get(timeout=120))
    child.join(30)
    asyncio.run(_cleanup(url, name))
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return p50, p99


def _floor_child(url: str, key: str, n: int, ready: Any, out: Any) -> None:
    async def main() -> list[float]:
        r = connect(url)
        lat: list[float] = []
        ready.set()
        while len(lat) < n:
            reply = await r.blpop([key], timeout=5)
            if reply is not None:
                lat.append((time.time_ns() - int(reply[1])) / 1e6)
        await r.aclose()
        return lat

    out.put(asyncio.run(main()))


def latency_floor(url: str, n: int, rate: float = 200.0) -> tuple[float, float]:
    key = _name("floor")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ready = ctx.Event()
    child = ctx.Process(target=_floor_child, args=(url, key, n, ready, out))
    child.start()
    ready.wait(30)
    time.sleep(0.5)

    async def produce() -> None:
        r = connect(url)
        start = time.perf_counter()
        for i in range(n):
            target = start + i / rate
            now = time.perf_counter()
            if target > now:
                await asyncio.sleep(target - now)
            await r.lpush(key, time.time_ns())
        await r.aclose()

    asyncio.run(produce())
    lat = sorted(out.get(timeout=120))
    child.join(30)
    return statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def commands_per_job(url: str, n: int) -> tuple[float, float]:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)

    def totals() -> tuple[int, int]:
        stats = client.info("commandstats")
        all_calls = sum(int(v["calls"]) for v in stats.values())
        inner = 0
        # commands issued from scripts are counted too; the client-sent ones are these:
        # Scripts never call these, so their counts are exactly what clients sent.
        top = sum(
            int(v["calls"])
            for k, v in stats.items()
            if k in ("cmdstat_evalsha", "cmdstat_blpop", "cmdstat_script|load")
        )
        return all_calls - inner, top

    name = _name("cmds")

    async def add_all() -> None:
        r = connect(url)
        q = Queue(name, r)
        await asyncio.gather(*(q.add("job", {"i": i}) for i in range(n)))
        await r.aclose()

    before_all, before_top = totals()
    asyncio.run(add_all())
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_process_child, args=(url, name, n, 100, out))
    child.start()
    out.get(timeout=600)
    child.join(30)
    after_all, after_top = totals()
    client.close()
    asyncio.run(_cleanup(url, name))
    # the two INFO calls themselves are negligible against n jobs
    return (after_all - before_all) / n, (after_top - before_top) / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--latency-jobs", type=int, default=2000)
    parser.add_argument("--only", default="", help="comma-separated metric groups to run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))

    def want(key: str) -> bool:
        return not only or key in only

    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        from devstack import RedisServer

        server = RedisServer().start()
        url = server.url
    result: dict[str, Any] = {
        "jobs": args.jobs,
        "redis": "REDIS_URL" if server is None else "private valkey",
    }
    runs: dict[str, list[float]] = {}

    def measure(key: str, fn: Any, digits: int = 0) -> None:
        values = [fn() for _ in range(args.repeat)]
        runs[key] = [round(v, digits or None) for v in values]
        result[key] = round(statistics.median(values), digits or None)

    try:
        n = args.jobs
        if want("enqueue"):
            measure("enqueue_per_s", lambda: asyncio.run(enqueue_sequential(url, n)))
        if want("concurrent"):
            measure("enqueue_concurrent_per_s", lambda: asyncio.run(enqueue_concurrent(url, n)))
        if want("bulk"):
            measure("enqueue_bulk_per_s", lambda: asyncio.run(enqueue_bulk(url, n)))
        if want("c10"):
            measure("process_per_s_c10", lambda: process_rate(url, n, 10))
        if want("c100") or want("grouped"):
            # Interleaved, so each grouped run is compared with an ungrouped run made under the
            # same machine conditions (this VM's speed drifts between minutes).
            plain, grouped = [], []
            for _ in range(args.repeat):
                plain.append(process_rate(url, n, 100))
                grouped.append(process_rate(url, n, 100, groups=1000))
            runs["process_per_s_c100"] = [round(v) for v in plain]
            runs["grouped_process_per_s_c100"] = [round(v) for v in grouped]
            result["process_per_s_c100"] = round(statistics.median(plain))
            result["grouped_process_per_s_c100"] = round(statistics.median(grouped))
            ratios = [g / p for p, g in zip(plain, grouped, strict=True)]
            runs["grouped_vs_ungrouped"] = [round(r, 3) for r in ratios]
            result["grouped_vs_ungrouped"] = round(statistics.median(ratios), 3)
        if want("latency"):
            pairs = [latency(url, args.latency_jobs) for _ in range(args.repeat)]
            runs["latency_p99_ms"] = [round(p99, 3) for _, p99 in pairs]
            result["latency_p50_ms"] = round(statistics.median(p50 for p50, _ in pairs), 3)
            result["latency_p99_ms"] = round(statistics.median(p99 for _, p99 in pairs), 3)
            floor = [latency_floor(url, args.latency_jobs) for _ in range(args.repeat)]
            result["latency_floor_p50_ms"] = round(statistics.median(p50 for p50, _ in floor), 3)
            result["latency_floor_p99_ms"] = round(statistics.median(p99 for _, p99 in floor), 3)
        if want("commands"):
            cmds, calls = commands_per_job(url, n)
            result["redis_commands_per_job"] = round(cmds, 2)
            result["redis_calls_per_job"] = round(calls, 3)
        result["runs"] = runs
    finally:
        if server is not None:
            server.cleanup()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
