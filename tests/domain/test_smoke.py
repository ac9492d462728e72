from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain import get_channel, get_tenant
from tests.domain.helpers import World


async def test_world_is_committed(session: AsyncSession, world: World) -> None:
    tenant = await get_tenant(session, world.tenant.id)
    assert tenant is not None
    assert tenant.created_at.tzinfo is not None
    channel = await get_channel(session, world.channel.id)
    assert channel is not None
    assert channel.config == world.channel.config
