"""Real databases for the domain tests.

SQLite always: one database file per test session (and xdist worker), built with
``alembic upgrade head``. PostgreSQL when one answers: ``TEST_POSTGRES_URL``, else
``postgresql://postgres@127.0.0.1:5432/postgres``; the suite creates its own uniquely named
database there, migrates it, and drops it at the end. Without a server the PostgreSQL cases are
skipped with the reason.

Tests do not share rows: each builds its own tenant (fresh UUIDs) and commits, which is what the
concurrency tests need (several connections must see the same committed rows), instead of the
roll-back-per-test pattern.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from chat_domain import SecretBox, create_engine, create_session_factory
from tests.domain.helpers import (
    World,
    admin_url,
    create_database,
    drop_database,
    make_world,
    migrate,
)

T = TypeVar("T")

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when called inside a running loop
    (session fixtures may be first requested by an async test): on a thread of its own."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def postgres_admin_url() -> str:
    return os.environ.get("TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


async def _probe(url: str) -> str | None:
    try:
        conn = await asyncpg.connect(admin_url(url), timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL not reachable at {admin_url(url, redact=True)}: {exc}"
    await conn.close()
    return None


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of a reachable PostgreSQL server, or skip."""
    url = postgres_admin_url()
    reason = run_blocking(_probe(url))
    if reason is not None:
        pytest.skip(reason)
    return url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "domain.db"
    url = f"sqlite+aiosqlite:///{path}"
    run_blocking(migrate(url, "upgrade", "head"))
    return url


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> Iterator[str]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"chat_domain_test_{worker}_{uuid.uuid4().hex[:8]}"
    url = run_blocking(create_database(postgres_server, name))
    try:
        run_blocking(migrate(url, "upgrade", "head"))
        yield url
    finally:
        run_blocking(drop_database(postgres_server, name))


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_session_factory(engine)


@pytest.fixture
async def session(session_factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with session_factory() as session:
        yield session


@pytest.fixture(scope="session")
def box() -> SecretBox:
    return SecretBox(SecretBox.generate_key())


@pytest.fixture
async def world(session_factory: async_sessionmaker[AsyncSession], box: SecretBox) -> World:
    """A committed tenant on a $29 plan with a chatbot and a WhatsApp Cloud channel."""
    return await make_world(session_factory, box)


@pytest.fixture
async def other_world(session_factory: async_sessionmaker[AsyncSession], box: SecretBox) -> World:
    """A second, unrelated tenant."""
    return await make_world(session_factory, box)
