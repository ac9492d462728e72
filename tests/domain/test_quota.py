from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    NotFoundError,
    SecretBox,
    UsageRecord,
    change_plan,
    check_inbound_allowed,
    create_plan,
    set_tenant_status,
    write_usage,
)
from tests.domain.helpers import World, make_world

NOW = datetime(2026, 5, 20, 12, 0, tzinfo=UTC)
LAST_MONTH = datetime(2026, 4, 30, 23, 0, tzinfo=UTC)


async def _write(session_factory: async_sessionmaker[AsyncSession], *records: UsageRecord) -> None:
    async with session_factory() as session, session.begin():
        await write_usage(session, list(records))


async def _check(session_factory: async_sessionmaker[AsyncSession], world: World):  # type: ignore[no-untyped-def]
    async with session_factory() as session:
        return await check_inbound_allowed(
            session, tenant_id=world.tenant.id, chatbot_id=world.chatbot.id, now=NOW
        )


async def test_message_limit(
    session_factory: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    world = await make_world(session_factory, box, messages_per_month=3, ai_tokens_per_month=None)
    t = world.tenant.id
    await _write(session_factory, UsageRecord(t, "message_in", 50, LAST_MONTH))  # not this month
    await _write(session_factory, *[UsageRecord(t, "message_in", 1, NOW) for _ in range(2)])
    decision = await _check(session_factory, world)
    assert decision.allowed
    assert (decision.reason, decision.reply_text) == ("ok", None)
    assert (decision.messages_used, decision.messages_limit) == (2, 3)

    await _write(session_factory, UsageRecord(t, "message_in", 1, NOW))
    decision = await _check(session_factory, world)
    assert not decision.allowed
    assert decision.reason == "messages_limit"
    assert decision.reply_text == "Limit reached for this month."
    assert decision.messages_used == 3


async def test_ai_token_limit(
    session_factory: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    world = await make_world(session_factory, box, messages_per_month=None, ai_tokens_per_month=100)
    t = world.tenant.id
    await _write(session_factory, UsageRecord(t, "ai_prompt_tokens", 60, NOW, model="m"))
    assert (await _check(session_factory, world)).allowed
    await _write(session_factory, UsageRecord(t, "ai_completion_tokens", 40, NOW, model="m"))
    decision = await _check(session_factory, world)
    assert not decision.allowed
    assert decision.reason == "ai_tokens_limit"
    assert decision.ai_tokens_used == 100
    assert decision.reply_text == world.chatbot.limit_reply


async def test_unlimited_plan_and_suspended_tenant(
    session_factory: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    world = await make_world(
        session_factory, box, messages_per_month=None, ai_tokens_per_month=None
    )
    await _write(session_factory, UsageRecord(world.tenant.id, "message_in", 10**9, NOW))
    assert (await _check(session_factory, world)).allowed
    async with session_factory() as session, session.begin():
        await set_tenant_status(session, world.tenant.id, "suspended")
    decision = await _check(session_factory, world)
    assert (decision.allowed, decision.reason) == (False, "tenant_suspended")


async def test_chatbot_must_belong_to_tenant(
    session_factory: async_sessionmaker[AsyncSession], world: World, other_world: World
) -> None:
    async with session_factory() as session:
        with pytest.raises(NotFoundError):
            await check_inbound_allowed(
                session, tenant_id=world.tenant.id, chatbot_id=other_world.chatbot.id
            )


async def test_the_decision_carries_the_priority_of_the_current_plan(
    session_factory: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    world = await make_world(session_factory, box, price_cents=2900)
    decision = await _check(session_factory, world)
    assert (decision.priority.priority, decision.priority.weight) == (5, 1)
    async with session_factory() as session, session.begin():
        pro = await create_plan(session, name="Pro-q", monthly_price_cents=12900)
        await change_plan(session, world.tenant.id, pro.id)
    decision = await _check(session_factory, world)
    assert (decision.priority.priority, decision.priority.weight) == (1, 4)
