"""The delivery service in-process against a private Valkey and a migrated SQLite database,
with receivers on loopback (allowed by the operator allow-list, as an operator would for
private targets)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from chat_domain import (
    SecretBox,
    create_engine,
    create_plan,
    create_session_factory,
    create_tenant,
    create_webhook_endpoint,
    emit_event,
)
from chat_domain.webhooks import EmittedEvent
from chat_pipeline.webhooks import (
    WebhookSettings,
    enqueue_dispatches,
    webhook_queue,
    webhook_queue_settings,
)
from devstack import RedisServer
from queue_core import Queue, Worker, connect
from tests.domain.conftest import run_blocking
from tests.domain.helpers import migrate
from webhook_delivery.worker import DeliveryProcessor, Relay

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
FAST = WebhookSettings(
    timeout_s=3.0,
    retry_schedule_s=(0.1, 0.1, 0.1),
    jitter=0.0,
    allow_private_networks=LOOPBACK,
    concurrency=8,
    endpoint_concurrency=2,
    relay_interval_s=0.2,
    relay_after_s=0.3,
    lock_ms=2000,
)


@pytest.fixture(scope="package")
def wh_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="package")
def wh_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("webhooks-db") / "webhooks.db"
    url = f"sqlite+aiosqlite:///{path}"
    run_blocking(migrate(url, "upgrade", "head"))
    return url


@pytest.fixture(scope="package")
def wh_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
async def engine(wh_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(wh_db)
    yield engine
    await engine.dispose()


@dataclass
class Receipt:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A local HTTP server whose answer per path the test decides."""

    base: str = ""
    received: list[Receipt] = field(default_factory=list)
    behaviour: dict[str, Callable[[int], Awaitable[web.StreamResponse]]] = field(
        default_factory=dict
    )

    def url(self, path: str) -> str:
        return self.base + path

    def at(self, path: str) -> list[Receipt]:
        return [r for r in self.received if r.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Receipt(request.path, dict(request.headers), body, time.monotonic()))
        n = len(self.at(request.path))
        act = self.behaviour.get(request.path)
        if act is None:
            return web.Response(status=204)
        return await act(n)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.base = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


@dataclass
class Harness:
    sessions: async_sessionmaker[AsyncSession]
    box: SecretBox
    queue: Queue
    settings: WebhookSettings
    workers: list[Worker] = field(default_factory=list)
    processors: list[DeliveryProcessor] = field(default_factory=list)

    async def tenant(self) -> uuid.UUID:
        async with self.sessions() as s, s.begin():
            plan = await create_plan(s, name=f"p-{uuid.uuid4().hex[:8]}", monthly_price_cents=0)
            return (await create_tenant(s, name="T", plan_id=plan.id)).id

    async def endpoint(
        self, tenant: uuid.UUID, url: str, types: tuple[str, ...] = ("*",)
    ) -> tuple[uuid.UUID, str]:
        async with self.sessions() as s, s.begin():
            made = await create_webhook_endpoint(
                s, self.box, tenant_id=tenant, url=url, event_types=list(types)
            )
        return made.endpoint.id, made.secret

    async def emit(
        self, tenant: uuid.UUID, data: dict[str, Any], *, enqueue: bool = True,
        event_type: str = "message.received",
    ) -> EmittedEvent:  # fmt: skip
        async with self.sessions() as s, s.begin():
            emitted = await emit_event(s, tenant, event_type, data)
        if enqueue:
            await enqueue_dispatches(self.queue, emitted.dispatches)
        return emitted

    def start_worker(self, concurrency: int | None = None) -> Worker:
        processor = DeliveryProcessor(self.sessions, self.box, self.queue, self.settings)
        worker = Worker(
            self.queue,
            processor,
            concurrency=concurrency or self.settings.concurrency,
            lock_duration=self.settings.lock_ms,
            stalled_interval=300,
            max_stalled_count=5,
            drain_delay=0.5,
        )
        worker.start()
        self.workers.append(worker)
        self.processors.append(processor)
        return worker

    def relay(self) -> Relay:
        return Relay(self.sessions, self.queue, self.settings)


@pytest.fixture
async def harness(
    wh_redis: RedisServer, engine: AsyncEngine, wh_key: str
) -> AsyncIterator[Harness]:
    redis = connect(wh_redis.url)
    await redis.flushall()
    queue = webhook_queue(redis)
    await queue.configure(webhook_queue_settings(FAST.endpoint_concurrency))
    h = Harness(create_session_factory(engine), SecretBox(wh_key), queue, FAST)
    try:
        yield h
    finally:
        for worker in h.workers:
            await worker.close(1)
        for processor in h.processors:
            await processor.close()
        await redis.aclose()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)
