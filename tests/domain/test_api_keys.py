from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    PermissionDenied,
    create_api_key,
    has_role,
    list_api_keys,
    require_role,
    revoke_api_key,
    verify_api_key,
)
from chat_domain.models import utcnow
from tests.domain.helpers import World


async def test_create_and_verify(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    async with session_factory() as session, session.begin():
        created = await create_api_key(session, role="admin", tenant_id=world.tenant.id, name="ci")
    assert created.plaintext.startswith(f"cbk_{created.key.prefix}_")
    assert created.plaintext not in repr(created)
    async with session_factory() as session:
        key = await verify_api_key(session, created.plaintext)
        assert key is not None
        assert key.id == created.key.id
        assert key.role == "admin"
        assert key.tenant_id == world.tenant.id
        # Only the hash is stored.
        raw = (
            await session.execute(
                text("SELECT prefix, key_hash, name FROM api_keys WHERE prefix = :p"),
                {"p": created.key.prefix},
            )
        ).one()
        secret_part = created.plaintext.rsplit("_", 1)[-1]
        assert all(secret_part not in str(value) for value in raw)
        assert bytes(raw.key_hash) != created.plaintext.encode()


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "cbk_",
        "cbk__",
        "nope",
        "cbk_short_secret",
        "cbk_0123456789ab",
        "Bearer x",
        "cbk_" + "_" * 40,
    ],
)
async def test_malformed_keys_are_rejected(session: AsyncSession, candidate: str) -> None:
    assert await verify_api_key(session, candidate) is None


async def test_wrong_secret_and_revoked_key_are_rejected(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    async with session_factory() as session, session.begin():
        created = await create_api_key(session, role="agent", tenant_id=world.tenant.id)
    tampered = created.plaintext[:-1] + ("A" if created.plaintext[-1] != "A" else "B")
    async with session_factory() as session, session.begin():
        assert await verify_api_key(session, tampered) is None
        assert await verify_api_key(session, created.plaintext) is not None
        assert await revoke_api_key(session, created.key.id) is True
        assert await revoke_api_key(session, created.key.id) is False
    async with session_factory() as session:
        assert await verify_api_key(session, created.plaintext) is None
        listed = await list_api_keys(session, world.tenant.id)
        assert [k.id for k in listed] == [created.key.id]
        assert listed[0].revoked_at is not None


async def test_last_used_is_written_at_most_once_a_minute(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    async with session_factory() as session, session.begin():
        created = await create_api_key(session, role="agent", tenant_id=world.tenant.id)
    t0 = utcnow()

    async def verify_at(moment_offset: timedelta) -> None:
        async with session_factory() as session, session.begin():
            assert await verify_api_key(session, created.plaintext, now=t0 + moment_offset)

    async def stored_last_used() -> object:
        async with session_factory() as session:
            keys = await list_api_keys(session, world.tenant.id)
            return keys[0].last_used_at

    await verify_at(timedelta(0))
    assert await stored_last_used() == t0
    await verify_at(timedelta(seconds=30))
    assert await stored_last_used() == t0
    await verify_at(timedelta(seconds=61))
    assert await stored_last_used() == t0 + timedelta(seconds=61)


async def test_operator_keys_have_no_tenant(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    async with session_factory() as session, session.begin():
        with pytest.raises(ValueError, match="operator"):
            await create_api_key(session, role="operator", tenant_id=world.tenant.id)
        with pytest.raises(ValueError, match="need one"):
            await create_api_key(session, role="admin")
        operator = await create_api_key(session, role="operator", name="ops")
        admin = await create_api_key(session, role="admin", tenant_id=world.tenant.id)
        agent = await create_api_key(session, role="agent", tenant_id=world.tenant.id)
    own, other = world.tenant.id, uuid.uuid4()
    op_key, admin_key, agent_key = operator.key, admin.key, agent.key

    assert require_role(op_key, "operator") is op_key
    assert require_role(op_key, "admin", tenant_id=other) is op_key
    assert require_role(admin_key, "admin", tenant_id=own) is admin_key
    assert require_role(admin_key, "agent", tenant_id=own) is admin_key
    assert require_role(agent_key, "agent", tenant_id=own) is agent_key
    assert has_role(agent_key, "admin", tenant_id=own) is False
    assert has_role(admin_key, "admin", tenant_id=other) is False
    assert has_role(admin_key, "operator") is False
    assert has_role(admin_key, "admin") is False  # tenant keys need the tenant named
    for key, role, tenant in [
        (agent_key, "admin", own),
        (admin_key, "agent", other),
        (admin_key, "operator", None),
        (None, "agent", own),
    ]:
        with pytest.raises(PermissionDenied):
            require_role(key, role, tenant_id=tenant)  # type: ignore[arg-type]
