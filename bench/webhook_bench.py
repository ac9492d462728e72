"""Webhook delivery benchmark: the webhook-delivery service as a real process, one tenant with
`--endpoints` endpoints (each subscribed to every event) on a local receiver that answers 204 at
once, `--events` events emitted as the pipeline emits them (stored, then queued after the
commit). Prints JSON: deliveries/s from the first emit to the last receipt, and event creation
-> receipt p50/p99/max.

    scripts/uv.sh run python bench/webhook_bench.py [--endpoints 100] [--events 50]

Private Valkey and a temporary SQLite database; the receiver runs in this process (one core is
shared with the service and Valkey on a 2-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.fernet import Fernet

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.domain.helpers import migrate  # noqa: E402

from chat_domain import (  # noqa: E402
    SecretBox,
    create_engine,
    create_plan,
    create_session_factory,
    create_tenant,
    create_webhook_endpoint,
)
from chat_domain.webhooks import emit_event  # noqa: E402
from chat_pipeline.webhooks import enqueue_dispatches, webhook_queue  # noqa: E402
from devstack import RedisServer  # noqa: E402
from queue_core import connect  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))], 1)


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    received: dict[str, float] = {}  # webhook-id:endpoint -> receipt time (monotonic)
    expected = args.endpoints * args.events
    done, warmed = asyncio.Event(), asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        received[f"{request.headers['webhook-id']}:{request.path}"] = time.monotonic()
        if len(received) >= args.endpoints:
            warmed.set()
        if len(received) >= expected and created:
            done.set()
        return web.Response(status=204)

    created: dict[str, float] = {}

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    db = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    await migrate(db, "upgrade", "head")
    key = Fernet.generate_key().decode()
    engine = create_engine(db)
    sessions = create_session_factory(engine)
    box = SecretBox(key)
    async with sessions() as s, s.begin():
        plan = await create_plan(s, name="bench", monthly_price_cents=0)
        tenant = (await create_tenant(s, name="T", plan_id=plan.id)).id
        for i in range(args.endpoints):
            await create_webhook_endpoint(
                s, box, tenant_id=tenant, url=f"http://127.0.0.1:{port}/e{i}", event_types=["*"]
            )
    with RedisServer() as valkey:
        env = {
            **os.environ,
            "REDIS_URL": valkey.url,
            "DATABASE_URL": db,
            "PLATFORM_SECRET_KEY": key,
            "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8",
            "WEBHOOK_CONCURRENCY": str(args.concurrency),
            "LOG_LEVEL": "WARNING",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "webhook_delivery", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        redis = connect(valkey.url)
        queue = webhook_queue(redis)
        try:
            # one warm-up event (the service starting, connections opening): not measured
            async with sessions() as s, s.begin():
                warm = await emit_event(s, tenant, "message.received", {"warm": True})
            await enqueue_dispatches(queue, warm.dispatches)
            async with asyncio.timeout(120):
                await warmed.wait()
            received.clear()
            start = time.monotonic()
            for i in range(args.events):
                async with sessions() as s, s.begin():
                    emitted = await emit_event(
                        s, tenant, "message.received", {"n": i, "text": "hi"}
                    )
                created[str(emitted.event.id)] = time.monotonic()
                await enqueue_dispatches(queue, emitted.dispatches)
                if args.rate:
                    await asyncio.sleep(1 / args.rate)
            emitted_s = time.monotonic() - start
            async with asyncio.timeout(args.timeout):
                await done.wait()
            elapsed = max(received.values()) - start
        finally:
            proc.terminate()
            async with asyncio.timeout(20):
                await proc.wait()
            await redis.aclose()
            await engine.dispose()
            await runner.cleanup()
    latencies = [
        (at - created[key.split(":", 1)[0]]) * 1000
        for key, at in received.items()
        if key.split(":", 1)[0] in created
    ]
    return {
        "endpoints": args.endpoints,
        "events": args.events,
        "deliveries": len(received),
        "emit_seconds": round(emitted_s, 2),
        "deliveries_per_s": round(len(received) / elapsed, 1),
        "event_to_receipt_ms": {
            "p50": pct(latencies, 50),
            "p99": pct(latencies, 99),
            "max": round(max(latencies), 1),
        },
        "service_concurrency": args.concurrency,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--rate", type=float, default=0, help="events/s (0: as fast as stored)")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="webhook-bench-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
