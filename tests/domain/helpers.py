"""Builders shared by the domain tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    ChannelView,
    ChatbotView,
    PlanView,
    SecretBox,
    TenantView,
    WhatsAppCloudConfig,
    WhatsAppCloudSecrets,
    create_channel,
    create_chatbot,
    create_engine,
    create_plan,
    create_tenant,
)

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def migrate(url: str, direction: str, revision: str) -> None:
    """Run ``alembic upgrade/downgrade`` inside our own connection (the env.py sharing path)."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:

            def run(sync_conn: Connection) -> None:
                getattr(command, direction)(alembic_config(sync_conn), revision)

            await conn.run_sync(run)
    finally:
        await engine.dispose()


def admin_url(url: str, *, redact: bool = False) -> str:
    """A plain ``postgresql://`` DSN for asyncpg (drops any ``+driver``)."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=redact)


async def create_database(server_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url(server_url), timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return (
        make_url(server_url)
        .set(drivername="postgresql+asyncpg", database=name)
        .render_as_string(hide_password=False)
    )


async def drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url(server_url), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Await ``condition()`` becoming true, yielding to the loop; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


@dataclass(frozen=True)
class World:
    plan: PlanView
    tenant: TenantView
    chatbot: ChatbotView
    channel: ChannelView


async def make_world(
    session_factory: async_sessionmaker[AsyncSession],
    box: SecretBox,
    *,
    price_cents: int = 2900,
    messages_per_month: int | None = 1000,
    ai_tokens_per_month: int | None = 100_000,
    retention_days: int = 30,
) -> World:
    suffix = uuid.uuid4().hex[:10]
    async with session_factory() as session, session.begin():
        plan = await create_plan(
            session,
            name=f"plan-{suffix}",
            monthly_price_cents=price_cents,
            messages_per_month=messages_per_month,
            ai_tokens_per_month=ai_tokens_per_month,
        )
        tenant = await create_tenant(
            session, name=f"tenant-{suffix}", plan_id=plan.id, retention_days=retention_days
        )
        chatbot = await create_chatbot(
            session,
            box,
            tenant_id=tenant.id,
            name="Helper",
            model="gpt-test",
            provider_api_key=f"sk-provider-{suffix}",
            identity_secret=f"identity-{suffix}",
            limit_reply="Limit reached for this month.",
        )
        channel = await create_channel(
            session,
            box,
            chatbot_id=chatbot.id,
            config=WhatsAppCloudConfig(phone_number_id=f"pn-{suffix}"),
            secrets=WhatsAppCloudSecrets(
                access_token=f"EAAG-token-{suffix}",
                app_secret=f"app-secret-{suffix}",
                verify_token=f"verify-{suffix}",
            ),
        )
    return World(plan=plan, tenant=tenant, chatbot=chatbot, channel=channel)
