"""Live-hub benchmark: frames/s the gateway delivers to N visitors' WebSockets, with and without
one socket that stopped reading. Prints JSON.

    scripts/uv.sh run python bench/live_hub_bench.py [--sockets 200] [--rounds 200]

Starts a private Valkey, a migrated SQLite database with the demo tenant and one gateway
process (GATEWAY_ROLE=http) in a temporary directory. This process opens --sockets WebSockets
(aiohttp clients, permessage-deflate as browsers negotiate it) and publishes on Redis what the
workers publish: each round is one ~150-byte frame per socket, pipelined; at most --window rounds
are in flight. Throughput = frames received / (first publish -> last frame received); latency =
publish -> frame read by the client (same clock).

Phases
- baseline: the N sockets only.
- stalled: one more socket upgrades with a 4 KiB receive buffer and never reads; it is first sent
  ~3 MB (far beyond what the kernel buffers for it: its sends block) and then one 3 KB frame per
  round. The gateway runs with a send queue and send timeout large enough to keep it stalled for
  the whole phase (WIDGET_WS_SEND_QUEUE / WIDGET_WS_SEND_TIMEOUT_S): what is measured is the other
  sockets' delivery while it is stuck, not its disconnection.
- drop: the same stall against the default limits is what the tests check (it is aborted as soon
  as its queue is full); not measured here.

The load generator shares the 2 cores with the gateway and Valkey; the gateway's CPU per frame
is reported so the client's share can be told apart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from chat_domain import create_engine, create_session_factory, find_channel_by_widget_key
from chat_pipeline.live import visitor_channel
from devstack import free_port
from devstack.platform import Platform
from queue_core import connect


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return round(ordered[index], 2)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def channel_id(database_url: str, public_key: str) -> str:
    engine = create_engine(database_url)
    try:
        async with create_session_factory(engine)() as session:
            channel = await find_channel_by_widget_key(session, public_key)
    finally:
        await engine.dispose()
    assert channel is not None
    return str(channel.id)


async def stalled_socket(host: str, port: int, path: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        sock,
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
        if not byte:
            raise RuntimeError(f"closed during the handshake: {head!r}")
        head += byte
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode(errors="replace"))
    return sock


class Receivers:
    def __init__(self, sockets: list[aiohttp.ClientWebSocketResponse]) -> None:
        self.latencies_ms: list[float] = []
        self.received = 0
        self.by_round: dict[int, int] = {}
        self.last_at = 0.0
        self.changed = asyncio.Event()
        self.tasks = [asyncio.create_task(self._read(ws)) for ws in sockets]

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            frame = orjson.loads(message.data)
            if frame.get("type") != "typing":
                continue  # a resync
            now = time.time()
            self.latencies_ms.append((now - frame["t"]) * 1000)
            self.received += 1
            self.by_round[frame["r"]] = self.by_round.get(frame["r"], 0) + 1
            self.last_at = time.perf_counter()
            self.changed.set()

    def reset(self) -> None:
        self.latencies_ms.clear()
        self.received = 0
        self.by_round.clear()

    async def wait_round(self, r: int, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.by_round.get(r, 0) < n:
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"round {r}: {self.by_round.get(r, 0)}/{n} frames arrived")
            await asyncio.wait_for(self.changed.wait(), remaining)


async def phase(
    redis: Any,
    receivers: Receivers,
    channels: list[str],
    rounds: int,
    window: int,
    gateway_pid: int,
    stalled: str | None,
) -> dict[str, Any]:
    receivers.reset()
    pad = "x" * 3000
    cpu0 = cpu_seconds(gateway_pid)
    started = time.perf_counter()
    for r in range(rounds):
        if r >= window:
            await receivers.wait_round(r - window, len(channels), 30)
        pipe = redis.pipeline(transaction=False)
        t = time.time()
        for name in channels:
            pipe.publish(name, orjson.dumps({"type": "typing", "on": True, "r": r, "t": t}))
        if stalled is not None:
            pipe.publish(stalled, orjson.dumps({"type": "typing", "r": -1, "pad": pad}))
        await pipe.execute()
    for r in range(max(0, rounds - window), rounds):
        await receivers.wait_round(r, len(channels), 30)
    elapsed = receivers.last_at - started
    cpu = cpu_seconds(gateway_pid) - cpu0
    frames = receivers.received
    return {
        "frames": frames,
        "seconds": round(elapsed, 3),
        "frames_per_s": round(frames / elapsed),
        "latency_ms": {
            "p50": pct(receivers.latencies_ms, 50),
            "p99": pct(receivers.latencies_ms, 99),
            "max": round(max(receivers.latencies_ms), 2),
        },
        "gateway_cpu_us_per_frame": round(cpu / frames * 1e6, 1),
    }


async def run(args: argparse.Namespace, platform: Platform) -> dict[str, Any]:
    key = platform.demo["public_key"]
    cid = await channel_id(platform.database_url, key)
    redis = connect(platform.redis_url)
    gateway_pid = platform.processes["gateway"].pid
    connector = aiohttp.TCPConnector(limit=0)
    result: dict[str, Any] = {"sockets": args.sockets, "rounds": args.rounds}
    async with aiohttp.ClientSession(connector=connector) as session:
        path = f"/v1/widget/{key}/ws?visitor_id="
        sockets = [
            await session.ws_connect(f"{platform.url}{path}bench-{i}") for i in range(args.sockets)
        ]
        channels = [visitor_channel(cid, f"bench-{i}") for i in range(args.sockets)]
        receivers = Receivers(sockets)
        await phase(redis, receivers, channels, 20, args.window, gateway_pid, None)  # warm-up
        result["baseline"] = await phase(
            redis, receivers, channels, args.rounds, args.window, gateway_pid, None
        )

        stalled_name = visitor_channel(cid, "bench-stalled")
        stalled = await stalled_socket(platform.host, platform.port, path + "bench-stalled")
        filler = orjson.dumps({"type": "typing", "r": -1, "pad": "x" * 3000})
        pipe = redis.pipeline(transaction=False)
        for _ in range(1000):
            pipe.publish(stalled_name, filler)
        await pipe.execute()
        result["stalled"] = await phase(
            redis, receivers, channels, args.rounds, args.window, gateway_pid, stalled_name
        )
        [(_, subscribers)] = await redis.pubsub_numsub(stalled_name)
        result["stalled"]["stalled_socket_still_connected"] = int(subscribers) == 1
        stalled.close()
        for ws in sockets:
            await ws.close()
    await redis.aclose()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--window", type=int, default=5, help="rounds in flight at most")
    args = parser.parse_args()
    env = {
        "GATEWAY_ROLE": "http",
        "LOG_LEVEL": "WARNING",
        "WIDGET_WS_MAX_PER_IP": str(args.sockets + 10),  # every client is 127.0.0.1
        # keep the stalled socket stalled for the whole phase (see the docstring)
        "WIDGET_WS_SEND_QUEUE": "1000000",
        "WIDGET_WS_SEND_TIMEOUT_S": "3600",
    }
    with tempfile.TemporaryDirectory(prefix="live-hub-bench-") as tmp:
        platform = Platform(Path(tmp), port=free_port(), env=env, services=("gateway",))
        with platform:
            result = asyncio.run(run(args, platform))
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
