"""Worker liveness in every service: /readyz reports the gateway's queue workers, a dead worker
stops the process (to be restarted), and worker-only services answer `<service> health`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chat_pipeline.service import run_service
from chat_pipeline.supervision import WorkerSet, check_health_file, report_health
from devstack import RedisServer
from gateway.app import create_app, stop_key
from gateway.keys import runtime_key
from queue_core import Job, Queue, Worker, connect
from tests.queue_core.helpers import Faults, wait_for

from .conftest import Bots, settings_for


async def test_readyz_reports_the_workers_and_a_dead_one_stops_the_gateway(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str, bots: Bots
) -> None:
    app = create_app(settings_for(gateway_redis.url, gateway_db, secret_key, gateway_role="all"))
    async with TestClient(TestServer(app)) as client:
        ready = await client.get("/readyz")
        body = await ready.json()
        assert ready.status == 200, body
        assert body["checks"]["workers"] == "ok"
        queues = {w["queue"] for w in body["workers"]}
        assert queues == {"incoming-messages", "outgoing-messages", "maintenance"}
        assert all(
            w["loops"] == {"main": True, "renew": True, "sweep": True} for w in body["workers"]
        )

        # a bug in a worker's driver loop (not a Redis hiccup)
        with Faults(app[runtime_key].redis, "finish_fetch") as faults:
            faults.always = RuntimeError("driver bug")
            await asyncio.wait_for(app[stop_key].wait(), 15)
        ready = await client.get("/readyz")
        body = await ready.json()
        assert ready.status == 503
        assert body["checks"]["workers"].startswith("error")
        dead = [w for w in body["workers"] if not w["running"]]
        assert dead and "driver bug" in (dead[0]["error"] or "")


async def _noop(job: Job) -> None:
    return None


async def test_a_worker_service_reports_health_to_its_health_command(
    gateway_redis: RedisServer,
    queue_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SERVICE_HEALTH_FILE", str(tmp_path / "svc.json"))
    redis = connect(gateway_redis.url)
    workers = WorkerSet([Worker(Queue(queue_name, redis), _noop, drain_delay=0.5)])
    workers.start()
    try:
        async with report_health("svc", workers):
            await wait_for(lambda: (tmp_path / "svc.json").exists(), timeout=5)
            assert run_service("svc", lambda: None, argv=["health"]) == 0  # type: ignore[arg-type,return-value]
            report = json.loads(capsys.readouterr().out)
            assert report["healthy"] is True and report["workers"][0]["queue"] == queue_name
            await workers.close(5)  # stopped: the next report says so
            await wait_for(lambda: not check_health_file("svc")[0], timeout=10)
            assert run_service("svc", lambda: None, argv=["health"]) == 1  # type: ignore[arg-type,return-value]
    finally:
        await redis.aclose()
    # no service running: no report, unhealthy
    assert run_service("svc", lambda: None, argv=["health"]) == 1  # type: ignore[arg-type,return-value]


async def test_a_dead_worker_ends_its_set_with_the_error(
    gateway_redis: RedisServer, queue_name: str
) -> None:
    redis = connect(gateway_redis.url)
    workers = WorkerSet([Worker(Queue(queue_name, redis), _noop, drain_delay=0.2)])
    try:
        with Faults(redis, "finish_fetch") as faults:
            faults.always = KeyError("bug")
            workers.start()
            error = await asyncio.wait_for(workers.failed(), 10)
        assert isinstance(error, KeyError)
        assert not workers.healthy
    finally:
        await workers.close(5)
        await redis.aclose()
