"""Delivery end to end: a worker in-process, receivers on loopback, a compressed schedule."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid

from aiohttp import web

from chat_domain import (
    get_event_with_dispatches,
    get_webhook_endpoint,
    list_delivery_attempts,
    load_delivery,
    replay_dispatch,
)
from chat_pipeline.webhooks import enqueue_dispatches
from devstack import RedisServer
from tests.webhooks.conftest import Harness, Receiver, until
from tests.webhooks.test_signing_and_ssrf import reference_verify


async def _status(h: Harness, event_id: uuid.UUID, endpoint_id: uuid.UUID) -> str:
    async with h.sessions() as s:
        found = await get_event_with_dispatches(s, event_id)
    assert found is not None
    return next(d.status for d in found.dispatches if d.endpoint_id == endpoint_id)


async def _attempts(h: Harness, event_id: uuid.UUID) -> list[int | None]:
    async with h.sessions() as s:
        return [a.status_code for a in reversed(await list_delivery_attempts(s, event_id=event_id))]


async def test_a_receiver_failing_three_times_gets_the_event_once_on_the_fourth(
    harness: Harness, receiver: Receiver
) -> None:
    async def flaky(n: int) -> web.Response:
        return web.Response(status=500, text="not yet") if n <= 3 else web.Response(text="ok")

    receiver.behaviour["/flaky"] = flaky
    tenant = await harness.tenant()
    endpoint, secret = await harness.endpoint(tenant, receiver.url("/flaky"))
    harness.start_worker()
    event = (await harness.emit(tenant, {"text": "hello"})).event

    async def delivered() -> bool:
        return await _status(harness, event.id, endpoint) == "delivered"

    await until(delivered)
    assert await _attempts(harness, event.id) == [500, 500, 500, 200]
    hits = receiver.at("/flaky")
    assert len(hits) == 4 and len({r.headers["webhook-id"] for r in hits}) == 1
    ok = hits[-1]
    assert ok.headers["webhook-id"] == str(event.id)
    assert reference_verify(secret, ok.headers["webhook-id"], ok.headers["webhook-timestamp"],
                            ok.body, ok.headers["webhook-signature"])  # fmt: skip
    assert b'"type":"message.received"' in ok.body and b'"data":{"text":"hello"}' in ok.body
    async with harness.sessions() as s:
        health = await get_webhook_endpoint(s, endpoint)
        attempts = await list_delivery_attempts(s, event_id=event.id)
    assert health is not None and health.consecutive_failures == 0 and health.last_success_at
    assert attempts[-1].response_excerpt == "not yet"


async def test_a_receiver_down_for_the_whole_schedule_fails_and_a_replay_delivers(
    harness: Harness, receiver: Receiver
) -> None:
    down = True

    async def maybe(n: int) -> web.Response:
        return web.Response(status=503 if down else 200)

    receiver.behaviour["/down"] = maybe
    tenant = await harness.tenant()
    endpoint, _ = await harness.endpoint(tenant, receiver.url("/down"))
    harness.start_worker()
    event = (await harness.emit(tenant, {"n": 1})).event

    async def failed() -> bool:
        return await _status(harness, event.id, endpoint) == "failed"

    await until(failed)
    assert await _attempts(harness, event.id) == [503] * 4  # 1 + the 3 scheduled retries
    await asyncio.sleep(0.3)  # (nothing more arrives after the last attempt)
    assert len(receiver.at("/down")) == 4

    down = False
    async with harness.sessions() as s, s.begin():
        ref = await replay_dispatch(s, event.id, endpoint)
    assert ref is not None
    await enqueue_dispatches(harness.queue, [ref])

    async def delivered() -> bool:
        return await _status(harness, event.id, endpoint) == "delivered"

    await until(delivered)
    assert await _attempts(harness, event.id) == [503, 503, 503, 503, 200]


async def test_a_410_disables_the_endpoint(harness: Harness, receiver: Receiver) -> None:
    async def gone(n: int) -> web.Response:
        return web.Response(status=410)

    receiver.behaviour["/gone"] = gone
    tenant = await harness.tenant()
    endpoint, _ = await harness.endpoint(tenant, receiver.url("/gone"))
    await harness.endpoint(tenant, receiver.url("/watcher"), ("endpoint.disabled",))
    harness.start_worker()
    event = (await harness.emit(tenant, {"n": 1})).event

    async def notified() -> bool:
        return len(receiver.at("/watcher")) == 1

    await until(notified)
    assert await _status(harness, event.id, endpoint) == "failed"
    assert len(receiver.at("/gone")) == 1  # no retry after a 410
    async with harness.sessions() as s:
        ep = await get_webhook_endpoint(s, endpoint)
    assert ep is not None and not ep.enabled and "410" in (ep.disabled_reason or "")
    assert b'"type":"endpoint.disabled"' in receiver.at("/watcher")[0].body
    later = await harness.emit(tenant, {"n": 2})
    assert [d.endpoint_id for d in later.dispatches] == []  # only the watcher, not subscribed


async def test_a_slow_receiver_does_not_delay_another_tenants_deliveries(
    harness: Harness, receiver: Receiver
) -> None:
    async def slow(n: int) -> web.Response:
        await asyncio.sleep(2.0)
        return web.Response(status=200)

    receiver.behaviour["/slow"] = slow
    slow_tenant, fast_tenant = await harness.tenant(), await harness.tenant()
    await harness.endpoint(slow_tenant, receiver.url("/slow"))
    fast, _ = await harness.endpoint(fast_tenant, receiver.url("/fast"))
    harness.start_worker(concurrency=4)
    for n in range(10):
        await harness.emit(slow_tenant, {"n": n})

    async def slow_started() -> bool:
        return len(receiver.at("/slow")) >= 2

    await until(slow_started)
    started = asyncio.get_running_loop().time()
    event = (await harness.emit(fast_tenant, {"n": "fast"})).event

    async def fast_arrived() -> bool:
        return len(receiver.at("/fast")) == 1

    await until(fast_arrived, timeout=1.5)  # well before the slow receiver answers
    assert asyncio.get_running_loop().time() - started < 1.5
    assert await _status(harness, event.id, fast) in ("pending", "delivered")
    # the slow endpoint holds at most its group's share of the worker
    assert len(receiver.at("/slow")) <= harness.settings.endpoint_concurrency


async def test_the_relay_delivers_an_event_whose_enqueue_never_happened(
    harness: Harness, receiver: Receiver
) -> None:
    tenant = await harness.tenant()
    endpoint, _ = await harness.endpoint(tenant, receiver.url("/relay"))
    harness.start_worker()
    event = (await harness.emit(tenant, {"n": 1}, enqueue=False)).event  # the producer died
    await asyncio.sleep(0.5)
    assert receiver.at("/relay") == []
    relay = harness.relay()
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:

        async def delivered() -> bool:
            return await _status(harness, event.id, endpoint) == "delivered"

        await until(delivered)
        assert len(receiver.at("/relay")) == 1
        # later rounds find nothing to do: the dispatch is finished
        assert await relay.run_once() == 0
    finally:
        stop.set()
        await task


async def test_the_relay_leaves_a_dispatch_with_a_live_job_alone(
    harness: Harness, receiver: Receiver
) -> None:
    tenant = await harness.tenant()
    await harness.endpoint(tenant, receiver.url("/later"))
    ref = (await harness.emit(tenant, {"n": 1})).dispatches[0]  # queued; no worker: waiting
    await asyncio.sleep(0.4)  # overdue now
    await harness.relay().run_once()  # (it may re-queue other tests' leftovers)
    async with harness.sessions() as s:
        task = await load_delivery(s, harness.box, ref.event_id, ref.endpoint_id)
    assert task is not None and task.generation == 0
    assert await harness.queue.get_state(ref.job_id) == "waiting"


async def test_a_worker_killed_mid_flight_loses_nothing(
    harness: Harness, receiver: Receiver, wh_redis: RedisServer, wh_db: str, wh_key: str
) -> None:
    """The service process is SIGKILLed while its request hangs at the receiver; the job's
    lease runs out and another worker delivers. The receiver sees the webhook-id twice."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hang_first(n: int) -> web.Response:
        if n == 1:
            arrived.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await release.wait()
        return web.Response(status=200)

    receiver.behaviour["/kill"] = hang_first
    tenant = await harness.tenant()
    endpoint, _ = await harness.endpoint(tenant, receiver.url("/kill"))
    env = {
        **os.environ,
        "REDIS_URL": wh_redis.url,
        "DATABASE_URL": wh_db.replace("+aiosqlite", ""),
        "PLATFORM_SECRET_KEY": wh_key,
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8",
        "WEBHOOK_TIMEOUT_S": "0.5",
        "WEBHOOK_LOCK_MS": "1000",
        "QUEUE_STALLED_INTERVAL_MS": "300",  # (the first sweeper's interval throttles all)
        "LOG_LEVEL": "WARNING",
    }
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhook_delivery", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        event = (await harness.emit(tenant, {"n": 1})).event
        async with asyncio.timeout(20):
            await arrived.wait()
        service.kill()  # SIGKILL: no shutdown, the lease is left to expire
        await service.wait()
        release.set()
    finally:
        if service.returncode is None:
            service.kill()
            await service.wait()
    assert await _status(harness, event.id, endpoint) == "pending"
    harness.start_worker()

    async def delivered() -> bool:
        return await _status(harness, event.id, endpoint) == "delivered"

    await until(delivered, timeout=10)
    hits = receiver.at("/kill")
    assert len(hits) == 2 and hits[0].headers["webhook-id"] == hits[1].headers["webhook-id"]
    assert await _attempts(harness, event.id) == [200]
