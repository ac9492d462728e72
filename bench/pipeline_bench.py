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

WhatsApp Cloud (--whatsapp: these phases instead of the ones above)
    scripts/uv.sh run python bench/pipeline_bench.py --whatsapp [--wa-rate 100] [--wa-sends 2000]

Adds the channel-whatsapp-cloud process and the fake Graph API (tests/fakes/whatsapp.py, its own
process; WHATSAPP_GRAPH_URL points the sender at it, WHATSAPP_RATE_PER_S is lifted so the
per-number limit is not what is measured; RECONCILE_AFTER_MS is an hour, so replies held in
the paused send queue are not requeued as lost), and a Cloud channel on the demo chatbot (added with
`gateway-admin channels add-cloud`). The fake answers each send at once and posts the `sent`
and `delivered` status webhooks back to the gateway, as Meta does. Webhooks are posted by this
process, signed with the app secret (X-Hub-Signature-256), each from its own user number.
Times are time.monotonic(): the fake records when it accepted each send on the same clock.
- unloaded: --wa-count webhooks one at a time: webhook -> 200, webhook -> the reply's send
  accepted by the fake.
- open_loop_low_rate, then open_loop: webhooks at --wa-low-rate, then --wa-rate per second
  for --wa-seconds (after --warmup-seconds), from rate*2 users (each writes every 2 s):
  webhook -> 200 (p50/p99/max, non-200 counted) and webhook -> send; `status_webhooks` is how
  the gateway answered the fake's status webhooks meanwhile.
- drain, then drain_monitored: --wa-sends (then --wa-monitor-sends) replies put into the paused
  send queue by the pipeline itself (webhook -> incoming -> AI -> outgoing -> send queue), the
  typing hints queued along taken out, the fake's status webhooks off; then the queue resumes
  and only the channel service works: sends/s, CPU ms per send, SQL per send (counted in the
  service). The monitored run counts the channel service's Redis commands with MONITOR, told
  apart by its connections' ports (commands of one pipeline share one round trip), and is
  slower for it.
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
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography.fernet import Fernet
from redis.asyncio import Redis

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.fakes: the fake OpenAI server

from tests.fakes.fixtures import fake_openai_process  # noqa: E402
from tests.fakes.whatsapp import (  # noqa: E402
    DISPLAY_PHONE_NUMBER,
    PHONE_NUMBER_ID,
    WABA_ID,
    fake_whatsapp_process,
    meta_json,
    meta_signature,
    text_message,
)

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
    for name in after:
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
    def __init__(
        self,
        platform: Platform,
        session: aiohttp.ClientSession,
        services: tuple[str, ...] = SERVICES,
    ) -> None:
        self.platform = platform
        self.session = session
        self.services = services  # the ones whose SQL is counted
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

    async def queues_empty(
        self,
        timeout: float,
        redis: Redis | None = None,
        queues: tuple[str, ...] = PIPELINE_QUEUES,
    ) -> float:
        """Seconds until the pipeline's queues hold nothing waiting or running."""
        own = redis is None
        client = connect(self.platform.redis_url) if redis is None else redis
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    busy = 0
                    for name in queues:
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
        for name in self.services:
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


# -- WhatsApp Cloud -------------------------------------------------------------------------------

WA_SERVICES = (*SERVICES, "channel-whatsapp-cloud")
WA_SEND_QUEUE = "whatsapp-cloud-send"
WA_QUEUES = (*PIPELINE_QUEUES, WA_SEND_QUEUE)
WA_TOKEN = "bench-token"
WA_APP_SECRET = "bench-app-secret"
WA_STATUSES = ("sent", "delivered")  # the fake's status webhooks after each accepted send
BUSY = ("waiting", "active", "delayed", "prioritized")


def redis_client_ports(pid: int, redis_port: int) -> set[int]:
    """Local ports of process `pid`'s TCP connections to `redis_port`: MONITOR names a client
    by its address, so this tells one service's commands from the others'."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[9] in inodes and remote_port == redis_port:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class WhatsAppBench(Bench):
    """The Cloud channel's path: signed webhooks into the gateway, replies out through the
    channel-whatsapp-cloud service to the fake Graph API. Timestamps are time.monotonic(), the
    clock the fake records each accepted send on (one clock for every process of the host)."""

    def __init__(
        self,
        platform: Platform,
        session: aiohttp.ClientSession,
        graph_url: str,
        channel_id: str,
        phone_number_id: str,
    ) -> None:
        super().__init__(platform, session, WA_SERVICES)
        self.graph = graph_url
        self.phone_number_id = phone_number_id
        self.callback = f"{platform.url}/v1/channels/{channel_id}/whatsapp-cloud"
        self._users = 0

    def new_users(self, n: int) -> list[str]:
        first = self._users
        self._users += n
        return [f"5511{900000000 + i}" for i in range(first, first + n)]

    def signed(self, user: str, text: str) -> tuple[bytes, str]:
        """A user's text message as Meta sends it: compact ASCII JSON, X-Hub-Signature-256."""
        value = {
            "messaging_product": "whatsapp",
            "metadata": {
                "display_phone_number": DISPLAY_PHONE_NUMBER,
                "phone_number_id": self.phone_number_id,
            },
            "contacts": [{"profile": {"name": "Bench User"}, "wa_id": user}],
            "messages": [text_message(text, from_=user)],
        }
        raw = meta_json(
            {
                "object": "whatsapp_business_account",
                "entry": [{"id": WABA_ID, "changes": [{"value": value, "field": "messages"}]}],
            }
        )
        return raw, meta_signature(WA_APP_SECRET, raw)

    async def post_webhook(self, raw: bytes, signature: str) -> tuple[int, float, float]:
        """(status, monotonic start, ms to the answer)."""
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": signature}
        started = time.monotonic()
        async with self.session.post(self.callback, data=raw, headers=headers) as response:
            await response.read()
            return response.status, started, (time.monotonic() - started) * 1000

    async def fake(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, f"{self.graph}{path}", json=body) as response:
            response.raise_for_status()
            return await response.json()

    async def sent(self) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = (await self.fake("GET", "/_fake/sent"))["sent"]
        return sent

    @staticmethod
    def reply_times(sent: list[dict[str, Any]]) -> dict[str, float]:
        """Question text -> when the fake accepted its answer (the echo model repeats every
        question it answers, one per line)."""
        out: dict[str, float] = {}
        for message in sent:
            for line in (message["text"] or "").split("\n"):
                out.setdefault(line, message["at"])
        return out

    async def replies(self, texts: list[str], timeout: float) -> dict[str, float]:
        """The fake's acceptance time of each answer, once the queues are idle (or `timeout`).
        The poll only decides when to look: the times are the fake's own."""
        deadline = time.monotonic() + timeout
        while True:
            await self.queues_empty(timeout=max(1.0, deadline - time.monotonic()), queues=WA_QUEUES)
            got = self.reply_times(await self.sent())
            if all(t in got for t in texts) or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.2)

    async def deliveries(self) -> dict[str, int]:
        """How the gateway answered the fake's status webhooks."""
        body = await self.fake("GET", "/_fake/deliveries")
        return dict(Counter(str(d["outcome"]) for d in body["deliveries"]))

    # -- phases ---------------------------------------------------------------------------------

    async def unloaded(self, n: int) -> dict[str, Any]:
        """One webhook at a time, each waiting for its reply on the fake (polled every 5 ms;
        the latency is the fake's own acceptance time minus the POST's start)."""
        await self.fake("POST", "/_fake/reset")
        users = self.new_users(n)
        webhook_ms: list[float] = []
        to_send_ms: list[float] = []
        for i, user in enumerate(users):
            text = f"wa-one {self.run} {i}"
            status, started, ms = await self.post_webhook(*self.signed(user, text))
            assert status == 200, status
            webhook_ms.append(ms)
            async with asyncio.timeout(15):
                while True:
                    got = self.reply_times(await self.sent())
                    if text in got:
                        break
                    await asyncio.sleep(0.005)
            to_send_ms.append((got[text] - started) * 1000)
        await self.queues_empty(timeout=30, queues=WA_QUEUES)
        return {"messages": n, "webhook": summary(webhook_ms), "to_send": summary(to_send_ms)}

    async def open_loop(self, rate: int, seconds: float, warmup: float) -> dict[str, Any]:
        """Signed webhooks at `rate`/s whatever the answers do, from rate*2 users (each writes
        every 2 s); webhook -> 200, and webhook -> the reply's send accepted by the fake."""
        await self.fake("POST", "/_fake/reset")
        n_users = max(1, rate * 2)
        users = self.new_users(n_users)
        total = int(rate * (seconds + warmup))
        warm = int(rate * warmup)
        texts = [f"wa {self.run} {i}" for i in range(total)]
        # signed beforehand: the generator's loop only posts
        bodies = [self.signed(users[i % n_users], texts[i]) for i in range(total)]
        posted: dict[str, float] = {}
        ok_ms: list[float] = []
        statuses: Counter[int] = Counter()
        cpu_before = self.cpu()

        async def one(i: int) -> None:
            try:
                status, started, ms = await self.post_webhook(*bodies[i])
            except aiohttp.ClientError:
                statuses[0] += 1  # no answer at all
                return
            statuses[status] += 1
            if status == 200:
                posted[texts[i]] = started
                if i >= warm:
                    ok_ms.append(ms)

        tasks = []
        lag_ms = 0.0
        start = time.monotonic()
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag_ms = max(lag_ms, -delay * 1000)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        owed = [t for t in texts if t in posted]
        got = await self.replies(owed, timeout=300)
        elapsed = time.monotonic() - start
        measured = [t for t in texts[warm:] if t in posted]
        to_send = [(got[t] - posted[t]) * 1000 for t in measured if t in got]
        return {
            "offered_per_s": rate,
            "users": n_users,
            "messages": len(texts) - warm,
            "warmup_messages": warm,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "non_200": sum(v for k, v in statuses.items() if k != 200),
            "webhook": summary(ok_ms),
            "to_send": summary(to_send),
            "replies_missing": sum(1 for t in measured if t not in got),
            "answered_per_s": round(sum(1 for t in owed if t in got) / elapsed, 1),
            "elapsed_s": round(elapsed, 2),
            "status_webhooks": await self.deliveries(),
            "generator_max_lag_ms": round(lag_ms, 1),
            "cpu_ms_per_message": self.cpu_ms_per_message(cpu_before, max(1, len(owed))),
        }

    async def preload(self, n: int, send_queue: Queue) -> dict[str, int]:
        """`n` replies waiting in the paused send queue, put there by the pipeline itself
        (webhook -> incoming -> AI -> outgoing -> send queue). The typing hints the pipeline
        queues along (mark read + typing, one Graph call each) are taken out: what drains is
        sends only."""
        await send_queue.pause()
        users = self.new_users(n)
        bodies = [self.signed(u, f"wa-load {self.run} {u}") for u in users]
        gate = asyncio.Semaphore(32)
        statuses: Counter[int] = Counter()

        async def one(raw: bytes, signature: str) -> None:
            async with gate:
                status, _, _ = await self.post_webhook(raw, signature)
                statuses[status] += 1

        await asyncio.gather(*(one(*b) for b in bodies))
        assert statuses == Counter({200: n}), statuses
        await self.queues_empty(timeout=300, redis=send_queue.redis)
        typing = 0
        while jobs := [
            j for j in await send_queue.list_jobs("waiting", 0, n) if j.name == "typing"
        ]:
            for job in jobs:
                typing += int(await send_queue.remove(job.id))
        counts = await send_queue.get_job_counts()
        return {"typing_removed": typing, "queued": sum(counts.get(s, 0) for s in BUSY)}

    async def drain(self, n: int, monitor: bool) -> dict[str, Any]:
        """`n` replies preloaded into the send queue, then only the channel service works:
        how fast it sends them to the fake (the fake's status webhooks are off meanwhile, so
        the gateway is idle). With `monitor`, Redis commands are counted (MONITOR slows
        Valkey: the rate of that run is not the capacity)."""
        probe = Redis.from_url(self.platform.redis_url, single_connection_client=True)
        send_queue = Queue(WA_SEND_QUEUE, probe)
        await self.fake("POST", "/_fake/statuses", {"default": []})
        try:
            loaded = await self.preload(n, send_queue)
            await self.fake("POST", "/_fake/reset")
            channel_pid = self.platform.processes["channel-whatsapp-cloud"].pid
            by_port: Counter[tuple[int, str]] = Counter()
            scripted: Counter[str] = Counter()
            probe_port = int((await probe.client_info())["addr"].rsplit(":", 1)[1])
            sql_before = self.sql_snapshot()
            cpu_before = self.cpu()

            async def watch(stream: Any) -> None:
                async for info in stream.listen():
                    name = info["command"].split(" ", 1)[0].strip('"').upper()
                    if info["client_type"] == "lua":
                        scripted[name] += 1
                    elif int(info["client_port"]) != probe_port:
                        by_port[(int(info["client_port"]), name)] += 1

            async with contextlib.AsyncExitStack() as stack:
                if monitor:
                    monitor_conn = connect(self.platform.redis_url)
                    stack.push_async_callback(monitor_conn.aclose)
                    stream = await stack.enter_async_context(monitor_conn.monitor())
                    watcher = asyncio.create_task(watch(stream))
                    stack.callback(watcher.cancel)
                started = time.monotonic()
                await send_queue.resume()
                while True:
                    counts = await send_queue.get_job_counts()
                    if sum(counts.get(s, 0) for s in BUSY) == 0:
                        break
                    await asyncio.sleep(0.02)
                drained = time.monotonic() - started
                if monitor:
                    await asyncio.sleep(0.2)  # the last commands reach the watcher
            cpu = self.cpu_ms_per_message(cpu_before, n)
            sql = sql_per_message(sql_before, self.sql_snapshot(), n)["channel-whatsapp-cloud"]
            sent = await self.sent()
            at = sorted(m["at"] for m in sent)
            out: dict[str, Any] = {
                "sends": n,
                **loaded,
                "sent_on_fake": len(sent),
                "drain_s": round(drained, 3),
                "sends_per_s": round(n / drained, 1),
                # first to last acceptance on the fake: free of the 20 ms poll above
                "sends_per_s_fake_clock": (
                    round((len(at) - 1) / (at[-1] - at[0]), 1) if len(at) > 1 else None
                ),
                "first_send_after_resume_ms": round((at[0] - started) * 1000, 1) if at else None,
                "cpu_ms_per_send": cpu,
                "sql_per_send": sql,
            }
            if monitor:
                redis_port = urlsplit(self.platform.redis_url).port or 6379
                ours = redis_client_ports(channel_pid, redis_port)
                mine: Counter[str] = Counter()
                others: Counter[str] = Counter()
                for (port, name), count in by_port.items():
                    (mine if port in ours else others)[name] += count
                out["redis_round_trips_per_send"] = round(sum(mine.values()) / n, 2)
                out["redis_round_trips_by_command"] = {
                    k: round(v / n, 2) for k, v in mine.most_common()
                }
                out["redis_commands_in_scripts_per_send"] = round(sum(scripted.values()) / n, 2)
                out["redis_round_trips_of_other_clients_per_send"] = round(
                    sum(v for k, v in others.items() if k != "MONITOR") / n, 2
                )
            return out
        finally:
            await self.fake("POST", "/_fake/statuses", {"default": list(WA_STATUSES)})
            with contextlib.suppress(Exception):
                await send_queue.resume()
            await probe.aclose()


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


def add_cloud_channel(platform: Platform) -> str:
    """The demo chatbot's WhatsApp Cloud channel, added as an operator does; its id."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.admin",
            "channels",
            "add-cloud",
            "--chatbot",
            platform.demo["chatbot_id"],
            "--phone-number-id",
            PHONE_NUMBER_ID,
            "--access-token",
            WA_TOKEN,
            "--app-secret",
            WA_APP_SECRET,
            "--json",
        ],
        cwd=platform.root,
        env=platform.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return str(json.loads(out.splitlines()[-1])["id"])


async def run_whatsapp(
    args: argparse.Namespace, platform: Platform, graph_url: str
) -> dict[str, Any]:
    channel_id = add_cloud_channel(platform)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        bench = WhatsAppBench(platform, session, graph_url, channel_id, PHONE_NUMBER_ID)
        await bench.fake("PUT", "/_fake/webhook", {"url": bench.callback, "secret": WA_APP_SECRET})
        await bench.unloaded(3)  # every process warmed up (imports, connections, caches)
        unloaded = await bench.unloaded(args.wa_count)
        # where the pipeline keeps up, then at the rate asked for
        low = await bench.open_loop(args.wa_low_rate, args.wa_seconds, args.warmup_seconds)
        open_loop = await bench.open_loop(args.wa_rate, args.wa_seconds, args.warmup_seconds)
        drain = await bench.drain(args.wa_sends, monitor=False)
        counted = await bench.drain(args.wa_monitor_sends, monitor=True)
    return {
        "mode": "whatsapp_cloud",
        "webhook_p50_ms": open_loop["webhook"].get("p50_ms"),
        "webhook_p99_ms": open_loop["webhook"].get("p99_ms"),
        "webhook_max_ms": open_loop["webhook"].get("max_ms"),
        "webhook_non_200": open_loop["non_200"],
        "webhook_to_send_p50_ms": open_loop["to_send"].get("p50_ms"),
        "webhook_to_send_p99_ms": open_loop["to_send"].get("p99_ms"),
        "unloaded_webhook_to_send_p50_ms": unloaded["to_send"].get("p50_ms"),
        "low_rate_webhook_p99_ms": low["webhook"].get("p99_ms"),
        "low_rate_webhook_to_send_p50_ms": low["to_send"].get("p50_ms"),
        "low_rate_webhook_to_send_p99_ms": low["to_send"].get("p99_ms"),
        "sends_per_s": drain["sends_per_s"],
        "cpu_ms_per_send": drain["cpu_ms_per_send"].get("channel-whatsapp-cloud"),
        "sql_statements_per_send": drain["sql_per_send"]["statements"],
        "redis_round_trips_per_send": counted["redis_round_trips_per_send"],
        "unloaded": unloaded,
        "open_loop_low_rate": low,
        "open_loop": open_loop,
        "drain": drain,
        "drain_monitored": counted,
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
        services = SERVICES
        graph_url = ""
        if args.whatsapp:
            services = WA_SERVICES
            graph_url = stack.enter_context(
                fake_whatsapp_process(
                    "graph",
                    [
                        "--token",
                        WA_TOKEN,
                        "--app-secret",
                        WA_APP_SECRET,
                        "--statuses",
                        "sent,delivered",
                    ],
                )
            )
            env["WHATSAPP_GRAPH_URL"] = graph_url
            # Meta's default 80/s per number would be what a drain measures, not the worker
            env["WHATSAPP_RATE_PER_S"] = "1000000"
            # replies held in the paused send queue while it is preloaded (a minute or two) are
            # not lost jobs for the reconciler to queue again
            env["RECONCILE_AFTER_MS"] = "3600000"
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
            services=services,
            commands={name: [wrapper, name] for name in services},
        )
        # starting blocks for a few seconds; nothing else runs on this loop yet
        stack.enter_context(platform)
        if args.whatsapp:
            result = await run_whatsapp(args, platform, graph_url)
        else:
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
    wa = parser.add_argument_group("WhatsApp Cloud (--whatsapp: these phases instead)")
    wa.add_argument("--whatsapp", action="store_true", help="the WhatsApp Cloud path")
    wa.add_argument("--wa-rate", type=int, default=100, help="webhooks per second, open loop")
    wa.add_argument(
        "--wa-low-rate", type=int, default=10, help="webhooks per second the pipeline keeps up with"
    )
    wa.add_argument("--wa-seconds", type=float, default=5)
    wa.add_argument("--wa-count", type=int, default=20, help="one-at-a-time webhooks")
    wa.add_argument("--wa-sends", type=int, default=2000, help="replies preloaded for the drain")
    wa.add_argument(
        "--wa-monitor-sends", type=int, default=200, help="the drain counted with MONITOR"
    )
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
