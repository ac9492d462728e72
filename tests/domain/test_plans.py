from __future__ import annotations

import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    NotFoundError,
    QueuePriority,
    SecretBox,
    change_plan,
    create_plan,
    get_queue_priority,
    priority_for_price,
)
from tests.domain.helpers import make_world


@pytest.mark.parametrize(
    ("cents", "priority", "weight"),
    [
        (0, 5, 1),
        (4999, 5, 1),
        (5000, 3, 2),
        (9999, 3, 2),
        (10000, 1, 4),
        (250_000, 1, 4),
    ],
)
def test_price_to_priority_and_weight(cents: int, priority: int, weight: int) -> None:
    assert priority_for_price(cents) == QueuePriority(priority=priority, weight=weight)


def test_negative_price_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        priority_for_price(-1)


async def test_changing_plan_changes_priority_of_later_jobs(
    session_factory: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    world = await make_world(session_factory, box, price_cents=4999)
    async with session_factory() as session:
        assert await get_queue_priority(session, world.tenant.id) == QueuePriority(5, 1)
    async with session_factory() as session, session.begin():
        premium = await create_plan(
            session, name=f"premium-{world.tenant.id.hex}", monthly_price_cents=10_000
        )
        await change_plan(session, world.tenant.id, premium.id)
    async with session_factory() as session:
        assert await get_queue_priority(session, world.tenant.id) == QueuePriority(1, 4)


async def test_priority_of_unknown_tenant(session: AsyncSession) -> None:
    with pytest.raises(NotFoundError):
        await get_queue_priority(session, uuid.uuid4())
