"""Pipeline benchmark: the real platform in processes, driven through the widget API. Prints JSON.

    scripts/uv.sh run python bench/pipeline_bench.py [--ingest-rate 500] [--e2e-rate 200] ...

Starts what `make run` starts (private Valkey, SQLite with migrations, the demo tenant, the
gateway and ai-worker processes) in a temporary directory, with a local fake OpenAI-compatible
server that answers at once (echoing every question its request asks, one per line: a reply
to a burst that arrived while the previous answer was made names all of it),
PIPELINE_DEBOUNCE_MS=0 (an instant answer, so what is
measured is the pipeline itself) and the widget rate limits lifted. Each service runs through
bench/_counted_service.py, which counts its SQL statements. One load-generator process (this
one) shares the 2 cores with everything else.

Phases (in this order)
- per_message: --count-messages messages one at a time (POST, reply, ack, delivered): the
  unloaded reply latency, the median wait/run per queue, CPU milliseconds per message of each
  process, Redis commands seen by MONITOR (client commands = round trips; `lua` = run inside
  our scripts) and SQL statements / commits / database time counted in the services. Idle
  workers' blocking fetches during the phase are included.
- capacity: closed loop, --capacity-visitors each sending the next message when the reply to
  the last one arrived: the rate the platform sustains (`answered_per_s`).
- e2e_at_half_capacity, then e2e: visitors hold a WebSocket open; messages open loop at half
  the measured capacity, then at --e2e-rate conversations/s (each visitor once every 2 s);
  latency = POST sent -> the assistant's reply frame on the socket (the fake model's HTTP round
  trip, ~1 ms, included), acknowledged as the widget does. POSTs refused with 503 (the
  gateway's WIDGET_MAX_PENDING_POSTS) are counted, not owed a reply.
- ingest: POST /messages open loop at --ingest-rate for --ingest-seconds (each visitor posts
  once every 2 s); latency = request sent -> 202 (refusals reported apart). The pipeline
  answers everything accepted meanwhile; `drain_s` is how long after the last POST the queues
  were empty.

A run takes several minutes: whatever the open-loop phases accept beyond the capacity is
answered before the next phase starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.fernet import Fernet
from redis.asyncio import Redis

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.fakes: the fake OpenAI server

from tests.fakes.fixtures import fake_openai_process  # noqa: E402

from _pg import temporary_database  # noqa: E402
from devstack import free_port  # noqa: E402
from devstack.platform import Platform  # noqa: E402
from queue_core import Queue, connect  # noqa: E402

PIPELINE_QUEUES = ("incoming-messages", "ai-processing", "outgoing-messages")
SERVICES = ("gateway", "ai-worker")
TARGET_P99_MS = 50.0


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return round(ordered[index], 2)


def summary(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {}
    return {
        "p50_ms": pct(values_ms, 50),
        "p90_ms": pct(values_ms, 90),
        "p99_ms": pct(values_ms, 99),
        "max_ms": round(max(values_ms), 2),
        "mean_ms": round(statistics.fmean(values_ms), 2),
    }


def sql_per_message(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], n: int
) -> dict[str, Any]:
    """Per service: statements, commits and time in the database per message between two
    snapshots, with the statements that took the most time."""
    sql: dict[str, Any] = {}
    for name in SERVICES:
        kinds = Counter(after[name]["statements"])
        kinds.subtract(before[name]["statements"])
        seconds = Counter(after[name]["seconds"])
        seconds.subtract(before[name]["seconds"])
        sql[name] = {
            "statements": round(sum(kinds.values()) / n, 2),
            "commits": round((after[name]["commits"] - before[name]["commits"]) / n, 2),
            "db_ms": round(sum(seconds.values()) / n * 1000, 2),
            "by_kind": {k: round(v / n, 2) for k, v in sorted(kinds.items()) if v},
            "top_ms": {k: round(v / n * 1000, 3) for k, v in seconds.most_common(4)},
        }
    return sql


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Live:
    """WebSockets of many visitors: when each reply arrived (keyed by its text, which the echo
    model repeats), acknowledged as the widget does."""

    def __init__(self, sockets: list[aiohttp.ClientWebSocketResponse]) -> None:
        self.sockets = sockets
        self.sent: dict[str, float] = {}
        self.replies: dict[str, float] = {}
        self.arrived = asyncio.Condition()
        self.readers = [asyncio.create_task(self._read(ws)) for ws in sockets]

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            frame = json.loads(message.data)
            if frame.get("type") == "message" and frame["message"]["role"] == "assistant":
                # one line per question it answers (a coalesced burst is answered together)
                now = time.perf_counter()
                for line in frame["message"]["text"].split("\n"):
                    self.replies.setdefault(line, now)
                async with self.arrived:
                    self.arrived.notify_all()
                await ws.send_json({"type": "ack", "message_id": frame["message"]["id"]})

    async def wait_for(self, texts: list[str], timeout: float) -> None:
        """Until every text has its reply, or `timeout` (what is missing is reported)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self.arrived:
                await self.arrived.wait_for(lambda: all(t in self.replies for t in texts))

    def latencies_ms(self, texts: list[str]) -> list[float]:
        return [(self.replies[t] - self.sent[t]) * 1000 for t in texts if t in self.replies]

    async def close(self) -> None:
        for ws in self.sockets:
            await ws.close()
        for task in self.readers:
            task.cancel()


class Bench:
    def __init__(self, platform: Platform, session: aiohttp.ClientSession) -> None:
        self.platform = platform
        self.session = session
        self.api = f"{platform.url}/v1/widget/{platform.demo['public_key']}"
        self.run = uuid.uuid4().hex[:6]

    def pids(self) -> dict[str, int]:
        pids = {name: proc.pid for name, proc in self.platform.processes.items()}
        if self.platform.redis is not None and self.platform.redis.pid:
            pids["valkey"] = self.platform.redis.pid
        pids["load-generator"] = os.getpid()
        return pids

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids().items()}

    def cpu_ms_per_message(self, before: dict[str, float], n: int) -> dict[str, float]:
        return {name: round((t - before[name]) / n * 1000, 2) for name, t in self.cpu().items()}

    async def post(self, visitor: str, text: str) -> tuple[int, float]:
        body = {"visitor_id": visitor, "text": text, "client_message_id": uuid.uuid4().hex}
        started = time.perf_counter()
        async with self.session.post(f"{self.api}/messages", json=body) as response:
            await response.read()
            return response.status, (time.perf_counter() - started) * 1000

    async def queues_empty(self, timeout: float, redis: Redis | None = None) -> float:
        """Seconds until the pipeline's queues hold nothing waiting or running."""
        own = redis is None
        client = connect(self.platform.redis_url) if redis is None else redis
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    busy = 0
                    for name in PIPELINE_QUEUES:
                        counts = await Queue(name, client).get_job_counts()
                        busy += sum(
                            counts.get(state, 0)
                            for state in ("waiting", "active", "delayed", "prioritized")
                        )
                    if busy == 0:
                        return time.perf_counter() - started
                    await asyncio.sleep(0.02)
        finally:
            if own:
                await client.aclose()

    # -- ingest ---------------------------------------------------------------------------------

    async def ingest(self, rate: int, seconds: float) -> dict[str, Any]:
        total = int(rate * seconds)
        visitors = [str(uuid.uuid4()) for _ in range(max(1, rate * 2))]
        accepted: list[float] = []
        refused: list[float] = []
        statuses: Counter[int] = Counter()
        lag_ms = 0.0

        async def one(i: int) -> None:
            status, ms = await self.post(visitors[i % len(visitors)], f"ingest {i}")
            statuses[status] += 1
            (accepted if status == 202 else refused).append(ms)

        tasks = []
        start = time.perf_counter()
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag_ms = max(lag_ms, -delay * 1000)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        posted = time.perf_counter()
        drain = await self.queues_empty(timeout=300)
        return {
            "offered_per_s": rate,
            "messages": total,
            "posted_per_s": round(total / (posted - start), 1),
            "accepted_per_s": round(len(accepted) / (posted - start), 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            **summary(accepted),
            "refused": summary(refused),
            "generator_max_lag_ms": round(lag_ms, 1),
            "drain_s": round(drain, 2),
            "pipeline_per_s": round(len(accepted) / (time.perf_counter() - start), 1),
        }

    # -- end to end -----------------------------------------------------------------------------

    async def open_sockets(self, visitors: list[str]) -> Live:
        sockets = [
            await self.session.ws_connect(f"{self.api}/ws?visitor_id={v}", heartbeat=30)
            for v in visitors
        ]
        return Live(sockets)

    async def e2e(self, rate: int, seconds: float, warmup: float) -> dict[str, Any]:
        """Open loop: messages at `rate`/s whatever the replies do."""
        n_visitors = max(1, rate * 2)
        visitors = [str(uuid.uuid4()) for _ in range(n_visitors)]
        post_ms: list[float] = []
        statuses: Counter[int] = Counter()
        live = await self.open_sockets(visitors)
        sql_before = self.sql_snapshot()
        cpu_before = self.cpu()

        refused: set[str] = set()

        async def one(i: int, text: str) -> None:
            live.sent[text] = time.perf_counter()
            status, ms = await self.post(visitors[i % n_visitors], text)
            statuses[status] += 1
            if status != 202:
                refused.add(text)  # never accepted: no reply is owed
            elif i >= rate * warmup:
                post_ms.append(ms)

        total = int(rate * (seconds + warmup))
        texts = [f"e2e {self.run} {i}" for i in range(total)]
        tasks = []
        lag_ms = 0.0
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag_ms = max(lag_ms, -delay * 1000)
            tasks.append(asyncio.create_task(one(i, texts[i])))
        await asyncio.gather(*tasks)
        owed = [t for t in texts if t not in refused]
        await live.wait_for(owed, timeout=300)
        elapsed = time.perf_counter() - start
        cpu = self.cpu_ms_per_message(cpu_before, len(owed))
        sql = sql_per_message(sql_before, self.sql_snapshot(), len(owed))
        await live.close()
        measured = [t for t in texts[int(rate * warmup) :] if t not in refused]
        return {
            "offered_conversations_per_s": rate,
            "visitors": n_visitors,
            "messages": len(measured),
            "warmup_messages": total - len(measured),
            "replies_missing": sum(1 for t in measured if t not in live.replies),
            "answered_per_s": round(len(owed) / elapsed, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "reply": summary(live.latencies_ms(measured)),
            "post": summary(post_ms),
            "generator_max_lag_ms": round(lag_ms, 1),
            "cpu_ms_per_message": cpu,
            "sql_per_message": sql,
        }

    async def capacity(self, visitors_n: int, seconds: float) -> dict[str, Any]:
        """Closed loop: each visitor sends its next message when the reply to the last one
        arrived, so the platform runs as fast as it can and the rate is what it sustains."""
        visitors = [str(uuid.uuid4()) for _ in range(visitors_n)]
        live = await self.open_sockets(visitors)
        texts: list[str] = []
        statuses: Counter[int] = Counter()
        cpu_before = self.cpu()
        deadline = time.perf_counter() + seconds

        async def visitor(v: str) -> None:
            k = 0
            while time.perf_counter() < deadline:
                text = f"cap {self.run} {v} {k}"
                k += 1
                texts.append(text)
                live.sent[text] = time.perf_counter()
                status, _ = await self.post(v, text)
                statuses[status] += 1
                if status != 202:
                    texts.pop()  # not accepted: no reply owed
                    await asyncio.sleep(1)  # as Retry-After asks
                    continue
                await live.wait_for([text], timeout=60)

        start = time.perf_counter()
        await asyncio.gather(*(visitor(v) for v in visitors))
        elapsed = time.perf_counter() - start
        missing = [t for t in texts if t not in live.replies]
        for text in missing[:5]:
            v = text.split(" ")[2]
            async with self.session.get(
                f"{self.api}/messages", params={"visitor_id": v, "after": "0"}
            ) as response:
                page = await response.json()
            print(
                "missing reply:",
                text,
                [(m["role"], m["text"][-12:], m["status"]) for m in page["messages"][-4:]],
                file=sys.stderr,
            )
        cpu = self.cpu_ms_per_message(cpu_before, len(texts))
        await live.close()
        return {
            "concurrent_visitors": visitors_n,
            "messages": len(texts),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "answered_per_s": round(len(live.replies) / elapsed, 1),
            "reply": summary(live.latencies_ms(texts)),
            "cpu_ms_per_message": cpu,
        }

    # -- per-message costs ----------------------------------------------------------------------

    @staticmethod
    async def stages(redis: Redis, n: int) -> dict[str, dict[str, float]]:
        """Per queue, median time a job waited to be picked up and the time it ran."""
        out = {}
        for name in PIPELINE_QUEUES:
            jobs = [
                j
                for j in await Queue(name, redis).list_jobs("completed", 0, n)
                if j.processed_on and j.finished_on
            ]
            if jobs:
                out[name] = {
                    "wait": statistics.median((j.processed_on or 0) - j.timestamp for j in jobs),
                    "run": statistics.median(
                        (j.finished_on or 0) - (j.processed_on or 0) for j in jobs
                    ),
                }
        return out

    def sql_snapshot(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        counts_dir = Path(self.platform.extra_env["BENCH_COUNTS_DIR"])
        for name in SERVICES:
            path = counts_dir / f"{name}.json"
            before = json.loads(path.read_text())["seq"] if path.exists() else 0
            self.platform.processes[name].send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while True:
                if path.exists():
                    body = json.loads(path.read_text())
                    if body["seq"] > before:
                        out[name] = body
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not write its SQL counts")
                time.sleep(0.01)
        return out

    async def per_message(self, n: int) -> dict[str, Any]:
        visitors = [str(uuid.uuid4()) for _ in range(min(n, 10))]
        sockets = {
            v: await self.session.ws_connect(f"{self.api}/ws?visitor_id={v}") for v in visitors
        }
        redis = connect(self.platform.redis_url)
        # the benchmark's own polling runs on one connection whose commands are not counted
        probe = Redis.from_url(self.platform.redis_url, single_connection_client=True)
        probe_addr = (await probe.client_info())["addr"]
        client: Counter[str] = Counter()
        scripted: Counter[str] = Counter()
        before = self.sql_snapshot()
        cpu_before = self.cpu()
        latencies: list[float] = []

        async def watch(monitor: Any) -> None:
            async for info in monitor.listen():
                if f"{info['client_address']}:{info['client_port']}" == probe_addr:
                    continue
                name = info["command"].split(" ", 1)[0].strip('"').upper()
                (scripted if info["client_type"] == "lua" else client)[name] += 1

        async with redis.monitor() as monitor:
            watcher = asyncio.create_task(watch(monitor))
            for i in range(n):
                visitor = visitors[i % len(visitors)]
                ws = sockets[visitor]
                started = time.perf_counter()
                status, _ = await self.post(visitor, f"count {self.run} {i}")
                assert status == 202, status
                async with asyncio.timeout(15):
                    while True:
                        frame = json.loads((await ws.receive()).data)
                        if frame.get("type") == "message" and frame["message"]["role"] == (
                            "assistant"
                        ):
                            latencies.append((time.perf_counter() - started) * 1000)
                            await ws.send_json(
                                {"type": "ack", "message_id": frame["message"]["id"]}
                            )
                        if frame.get("type") == "status" and frame["status"] == "delivered":
                            break
            await self.queues_empty(timeout=30, redis=probe)
            watcher.cancel()
        stages = await self.stages(probe, n)
        cpu = self.cpu_ms_per_message(cpu_before, n)
        after = self.sql_snapshot()
        await redis.aclose()
        await probe.aclose()
        for ws in sockets.values():
            await ws.close()
        sql = sql_per_message(before, after, n)
        return {
            "messages": n,
            "unloaded_reply": summary(latencies),
            "stages_median_ms": stages,
            "cpu_ms_per_message": cpu,
            "redis_round_trips": round(sum(client.values()) / n, 2),
            "redis_commands_in_scripts": round(sum(scripted.values()) / n, 2),
            "redis_round_trips_by_command": {
                k: round(v / n, 2) for k, v in client.most_common() if k != "MONITOR"
            },
            "sql_statements": round(sum(s["statements"] for s in sql.values()), 2),
            "sql_commits": round(sum(s["commits"] for s in sql.values()), 2),
            "sql_by_service": sql,
        }


async def run(args: argparse.Namespace, platform: Platform) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        bench = Bench(platform, session)
        # one reply end to end first: every process warmed up (imports, connections, caches)
        await bench.per_message(3)
        per_message = await bench.per_message(args.count_messages)
        capacity = await bench.capacity(args.capacity_visitors, args.capacity_seconds)
        # latency where the platform keeps up, then at the offered rate asked for
        comfortable = max(1, int(capacity["answered_per_s"] / 2))
        e2e_half = await bench.e2e(comfortable, args.e2e_seconds, args.warmup_seconds)
        e2e = await bench.e2e(args.e2e_rate, args.e2e_seconds, args.warmup_seconds)
        ingest = (
            await bench.ingest(args.ingest_rate, args.ingest_seconds) if args.ingest_rate else {}
        )
    return {
        "ingest_p50_ms": ingest.get("p50_ms"),
        "ingest_p99_ms": ingest.get("p99_ms"),
        "e2e_p50_ms": e2e["reply"].get("p50_ms"),
        "e2e_p99_ms": e2e["reply"].get("p99_ms"),
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": bool(e2e["reply"]) and e2e["reply"]["p99_ms"] < TARGET_P99_MS,
        "capacity_messages_per_s": capacity["answered_per_s"],
        "e2e_at_half_capacity_p50_ms": e2e_half["reply"].get("p50_ms"),
        "e2e_at_half_capacity_p99_ms": e2e_half["reply"].get("p99_ms"),
        "unloaded_p50_ms": per_message["unloaded_reply"].get("p50_ms"),
        "redis_round_trips_per_message": per_message["redis_round_trips"],
        "sql_statements_per_message": per_message["sql_statements"],
        "ingest": ingest,
        "capacity": capacity,
        "e2e_at_half_capacity": e2e_half,
        "e2e": e2e,
        "per_message": per_message,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


async def start_and_run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    counts_dir = data_dir / "counts"
    counts_dir.mkdir()
    wrapper = str(REPO_ROOT / "bench" / "_counted_service.py")
    async with AsyncExitStack() as stack:
        database_url = None
        env = {
            "PIPELINE_DEBOUNCE_MS": "0",
            "WIDGET_VISITOR_RATE": "1000000",
            "WIDGET_IP_RATE": "100000000",
            "WIDGET_WS_MAX_PER_IP": "100000",  # every visitor here is 127.0.0.1
            "WIDGET_CHATBOT_RATE": "100000000",
            "WIDGET_TENANT_RATE": "100000000",
            "WIDGET_VISITOR_READ_RATE": "100000000",
            "WIDGET_IP_READ_RATE": "100000000",
            "LOG_LEVEL": "WARNING",
            "BENCH_COUNTS_DIR": str(counts_dir),
            "LLM_API_KEY": "bench-key",
            "LLM_MODEL": "fake-model",
            "LLM_BASE_URL": stack.enter_context(fake_openai_process(["--reply-mode", "echo-all"])),
        }
        env.update(item.split("=", 1) for item in args.env)
        if args.postgres:
            database_url = await stack.enter_async_context(
                temporary_database(args.postgres, "pipeline_bench")
            )
            env["PLATFORM_SECRET_KEY"] = Fernet.generate_key().decode()
        platform = Platform(
            data_dir,
            port=free_port(),
            env=env,
            database_url=database_url,
            commands={name: [wrapper, name] for name in SERVICES},
        )
        # starting blocks for a few seconds; nothing else runs on this loop yet
        stack.enter_context(platform)
        result = await run(args, platform)
        result["database"] = "postgresql" if args.postgres else "sqlite"
        return result
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ingest-rate", type=int, default=500)
    parser.add_argument("--ingest-seconds", type=float, default=4)
    parser.add_argument("--e2e-rate", type=int, default=200)
    parser.add_argument("--e2e-seconds", type=float, default=5)
    parser.add_argument("--warmup-seconds", type=float, default=1)
    parser.add_argument("--capacity-visitors", type=int, default=40)
    parser.add_argument("--capacity-seconds", type=float, default=10)
    parser.add_argument("--count-messages", type=int, default=50)
    parser.add_argument(
        "--postgres", metavar="URL", help="run on a temporary database of this PostgreSQL server"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for the services"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directory (logs)")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    try:
        result = asyncio.run(start_and_run(args, data_dir))
    finally:
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    result["data_dir"] = str(data_dir) if args.keep else None
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
