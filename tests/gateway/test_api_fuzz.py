"""Property-based requests over the whole OpenAPI document (schemathesis): no generated request,
valid or not, gets a 500. The gateway runs on a thread of its own with its own Valkey and
SQLite, signed in as an operator naming a tenant (so tenant and platform routes are reached);
the example count is bounded to keep CI quick (FUZZ_EXAMPLES raises it)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, settings

from chat_domain import (
    create_api_key,
    create_engine,
    create_plan,
    create_session_factory,
    create_tenant,
)
from devstack import RedisServer, free_port
from gateway import openapi
from gateway.app import create_app
from tests.domain.conftest import run_blocking
from tests.domain.helpers import migrate

from .conftest import settings_for

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
schema = schemathesis.openapi.from_dict(openapi.build("http://127.0.0.1"))


class LiveGateway:
    """The app on a loop in a thread: schemathesis calls it over real HTTP."""

    def __init__(self, app: web.Application, port: int) -> None:
        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.runner = web.AppRunner(self.app, access_log=None)
        self._loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the gateway did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        future = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self._loop)
        future.result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path: Path = tmp_path_factory.mktemp("fuzz-db") / "fuzz.db"
    db = f"sqlite+aiosqlite:///{path}"
    run_blocking(migrate(db, "upgrade", "head"))
    key = Fernet.generate_key().decode()

    async def seed() -> tuple[str, str]:
        engine = create_engine(db)
        try:
            async with create_session_factory(engine)() as s, s.begin():
                plan = await create_plan(s, name="fuzz", monthly_price_cents=0)
                tenant = await create_tenant(s, name="Fuzz", plan_id=plan.id)
                operator = await create_api_key(s, role="operator")
            return str(tenant.id), operator.plaintext
        finally:
            await engine.dispose()

    tenant, operator = run_blocking(seed())
    with RedisServer() as valkey:
        app = create_app(settings_for(valkey.url, db, key))
        with LiveGateway(app, free_port()) as gateway:
            yield {
                "url": gateway.url,
                "headers": {"Authorization": f"Bearer {operator}", "X-Tenant-Id": tenant},
            }


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases on every run: a failure reproduces
)
def test_no_generated_request_is_a_server_error(case: Any, live: dict[str, Any]) -> None:
    if case.path.endswith("/ws"):
        return  # a WebSocket upgrade, not a request/response route
    headers = {
        **(case.headers or {}),
        **live["headers"],
    }  # (ours win: a generated token is not a key)
    response = case.call(base_url=live["url"], headers=headers, timeout=15)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
