"""The gateway app in-process (aiohttp test server) against a private Valkey and a migrated
SQLite database, with three chatbots: plain, origin-restricted, and identity-verified."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from chat_domain import (
    SecretBox,
    Settings,
    WidgetConfig,
    create_channel,
    create_chatbot,
    create_engine,
    create_plan,
    create_session_factory,
    create_tenant,
)
from chat_pipeline import PipelineSettings, Runtime
from devstack import RedisServer
from gateway.app import create_app
from tests.domain.conftest import run_blocking
from tests.domain.helpers import migrate
from tests.fakes.openai_server import FakeOpenAIServer

IDENTITY_SECRET = "identity-secret-for-tests"
SHOP = "https://shop.example"


def visitor(name: str) -> str:
    """A visitor id in the widget's random format (a version 4 UUID; chatbots without an
    identity secret take no other), the same for the same name."""
    digest = hashlib.sha256(name.encode()).digest()[:16]
    return str(uuid.UUID(bytes=digest, version=4))


@dataclass(frozen=True)
class Bots:
    plain: str
    restricted: str
    signed: str
    evil_name: str


@pytest.fixture(scope="package")
def gateway_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="package")
def gateway_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("gateway-db") / "gateway.db"
    url = f"sqlite+aiosqlite:///{path}"
    run_blocking(migrate(url, "upgrade", "head"))
    return url


@pytest.fixture(scope="package")
def secret_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture(scope="package")
def bots(gateway_db: str, secret_key: str) -> Bots:
    async def make() -> Bots:
        engine = create_engine(gateway_db)
        box = SecretBox(secret_key)
        try:
            async with create_session_factory(engine)() as session, session.begin():
                plan = await create_plan(session, name="Basic", monthly_price_cents=1900)
                tenant = await create_tenant(session, name="T", plan_id=plan.id)
                keys = []
                for name, extra in (
                    ("Plain", {}),
                    ("Restricted", {"allowed_origins": [SHOP]}),
                    ("Signed", {"identity_secret": IDENTITY_SECRET}),
                    ('<script>alert("x")</script>', {}),
                ):
                    bot = await create_chatbot(
                        session, box, tenant_id=tenant.id, name=name, model="m", **extra
                    )  # type: ignore[arg-type]
                    await create_channel(session, box, chatbot_id=bot.id, config=WidgetConfig())
                    keys.append(bot.widget_public_key)
        finally:
            await engine.dispose()
        return Bots(*keys)

    return run_blocking(make())


def settings_for(
    redis_url: str, db_url: str, secret_key: str, **overrides: object
) -> PipelineSettings:
    base = {
        "redis_url": redis_url,
        "db": Settings(database_url=db_url, secret_key=secret_key),
        "gateway_role": "http",
        "visitor_rate": (5, 60_000),
        "max_message_chars": 200,
    }
    base.update(overrides)
    return PipelineSettings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def client(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str, bots: Bots
) -> AsyncIterator[TestClient[object, object]]:
    app = create_app(settings_for(gateway_redis.url, gateway_db, secret_key))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@pytest.fixture
def _test_cleanup() -> list[str]:
    return []


@pytest.fixture
async def rt(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str
) -> AsyncIterator[Runtime]:
    runtime = await Runtime.start(settings_for(gateway_redis.url, gateway_db, secret_key))
    yield runtime
    # leave the shared private Redis clean for the next test (fixed queue names)
    await runtime.redis.flushdb()
    await runtime.close()


@pytest.fixture
async def fake_model() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server
