from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    SecretBox,
    UsageRecord,
    get_or_create_contact,
    get_or_create_conversation,
    insert_message,
    messages_since,
    monthly_totals,
    purge_expired,
    record_webhook_event,
    write_usage,
)
from chat_domain.models import Message, UsageEvent, WebhookEvent
from chat_domain.retention import usage_floor
from tests.domain.helpers import World, make_world

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)


async def _populate(
    session_factory: async_sessionmaker[AsyncSession], world: World, ages_days: list[int]
) -> None:
    async with session_factory() as session, session.begin():
        contact = await get_or_create_contact(
            session, tenant_id=world.tenant.id, channel_id=world.channel.id, external_id="c1"
        )
        conversation = await get_or_create_conversation(
            session, contact, chatbot_id=world.chatbot.id
        )
        for age in ages_days:
            at = NOW - timedelta(days=age)
            await insert_message(
                session, conversation_id=conversation.id, role="user", text=f"{age}d", now=at
            )
            await record_webhook_event(
                session,
                tenant_id=world.tenant.id,
                event_type="message.received",
                payload={},
                now=at,
            )
        await write_usage(
            session,
            [
                UsageRecord(world.tenant.id, "message_in", 1, NOW - timedelta(days=a))
                for a in ages_days
            ],
        )


async def _counts(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> tuple[int, int, int]:
    async with session_factory() as session:
        counts = []
        for model, column in (
            (Message, Message.tenant_id),
            (UsageEvent, UsageEvent.tenant_id),
            (WebhookEvent, WebhookEvent.tenant_id),
        ):
            counts.append(
                await session.scalar(
                    select(func.count()).select_from(model).where(column == world.tenant.id)
                )
            )
    return (int(counts[0] or 0), int(counts[1] or 0), int(counts[2] or 0))


def test_usage_floor_is_start_of_previous_month() -> None:
    assert usage_floor(NOW) == datetime(2026, 5, 1, tzinfo=UTC)
    assert usage_floor(datetime(2026, 1, 3, tzinfo=UTC)) == datetime(2025, 12, 1, tzinfo=UTC)


async def test_purge_respects_each_tenants_retention(
    session_factory: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    short = await make_world(session_factory, box, retention_days=30)
    long = await make_world(session_factory, box, retention_days=365)
    ages = [1, 10, 29, 31, 40, 41, 42, 100, 200]
    await _populate(session_factory, short, ages)
    await _populate(session_factory, long, ages)
    async with session_factory() as session:
        for world in (short, long):
            result = await purge_expired(session, NOW, batch_size=2, tenant_id=world.tenant.id)
            if world is short:
                # Messages and events older than 30 days go; usage rows only before 1 May
                # (the previous month stays for billing): the 100 and 200 days old ones.
                assert (result.messages, result.usage_events, result.webhook_events) == (6, 2, 6)
            else:
                assert (result.messages, result.usage_events, result.webhook_events) == (0, 0, 0)
    assert await _counts(session_factory, short) == (3, 7, 3)
    assert await _counts(session_factory, long) == (9, 9, 9)
    async with session_factory() as session:
        remaining = [
            m.text for m in await messages_since(session, await _conversation_id(session, short))
        ]
        assert remaining == ["1d", "10d", "29d"]
        # The monthly totals are not purged.
        assert await monthly_totals(session, short.tenant.id, 2026, 3) == {"message_in": 1}


async def _conversation_id(session: AsyncSession, world: World):  # type: ignore[no-untyped-def]
    return await session.scalar(
        select(Message.conversation_id).where(Message.tenant_id == world.tenant.id).limit(1)
    )


async def test_purge_all_tenants_uses_the_current_setting(
    session_factory: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    world = await make_world(session_factory, box, retention_days=365)
    await _populate(session_factory, world, [5, 50, 500])
    async with session_factory() as session:
        result = await purge_expired(session, NOW)
    assert result.messages >= 1
    assert await _counts(session_factory, world) == (2, 2, 2)
