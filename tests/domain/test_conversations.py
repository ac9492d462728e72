from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from chat_domain import (
    ContactView,
    ConversationView,
    create_engine,
    create_session_factory,
    get_message,
    get_or_create_contact,
    get_or_create_conversation,
    insert_message,
    mark_delivered_for_visitor,
    messages_since,
    recent_messages,
    set_conversation_status,
    set_provider_id,
    update_delivery_status,
    update_delivery_status_by_external_id,
)
from chat_domain.models import Contact, Conversation, Message
from chat_domain.types import DeliveryStatus
from tests.domain.helpers import World, wait_until


async def _contact_and_conversation(
    session_factory: async_sessionmaker[AsyncSession], world: World, external_id: str = "491701"
) -> tuple[ContactView, ConversationView]:
    async with session_factory() as session, session.begin():
        contact = await get_or_create_contact(
            session,
            tenant_id=world.tenant.id,
            channel_id=world.channel.id,
            external_id=external_id,
            display_name="Ada",
        )
        conversation = await get_or_create_conversation(
            session, contact, chatbot_id=world.chatbot.id
        )
    return contact, conversation


async def test_get_or_create_contact_is_idempotent(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    first, _ = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        again = await get_or_create_contact(
            session, tenant_id=world.tenant.id, channel_id=world.channel.id, external_id="491701"
        )
        renamed = await get_or_create_contact(
            session,
            tenant_id=world.tenant.id,
            channel_id=world.channel.id,
            external_id="491701",
            display_name="Ada L.",
        )
    assert again.id == first.id
    assert again.display_name == "Ada"  # no name given: the stored one stays
    assert renamed.id == first.id
    assert renamed.display_name == "Ada L."


async def test_concurrent_get_or_create_yields_one_contact_and_one_conversation(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    async def one() -> tuple[uuid.UUID, uuid.UUID]:
        async with session_factory() as session, session.begin():
            contact = await get_or_create_contact(
                session,
                tenant_id=world.tenant.id,
                channel_id=world.channel.id,
                external_id="race",
            )
            conversation = await get_or_create_conversation(
                session, contact, chatbot_id=world.chatbot.id
            )
            return contact.id, conversation.id

    results = await asyncio.gather(*(one() for _ in range(8)))
    assert len(set(results)) == 1
    async with session_factory() as session:
        contacts = await session.scalar(
            select(func.count()).select_from(Contact).where(Contact.channel_id == world.channel.id)
        )
        conversations = await session.scalar(
            select(func.count())
            .select_from(Conversation)
            .where(Conversation.channel_id == world.channel.id)
        )
    assert (contacts, conversations) == (1, 1)


async def test_resolved_conversation_frees_the_contact(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    contact, conversation = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        await set_conversation_status(session, conversation.id, "pending_human")
        same = await get_or_create_conversation(session, contact, chatbot_id=world.chatbot.id)
        assert same.id == conversation.id
        assert same.status == "pending_human"
        await set_conversation_status(session, conversation.id, "resolved")
        fresh = await get_or_create_conversation(session, contact, chatbot_id=world.chatbot.id)
    assert fresh.id != conversation.id
    assert fresh.status == "open"


async def test_duplicate_external_id_is_refused(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    _, conversation = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        first = await insert_message(
            session, conversation_id=conversation.id, role="user", text="hi", external_id="wamid.1"
        )
        second = await insert_message(
            session, conversation_id=conversation.id, role="user", text="hi", external_id="wamid.1"
        )
        own_1 = await insert_message(
            session, conversation_id=conversation.id, role="assistant", text="a"
        )
        own_2 = await insert_message(
            session, conversation_id=conversation.id, role="assistant", text="b"
        )
    assert first.outcome == "inserted"
    assert first.message.status == "received"
    assert second.duplicate
    assert second.message.id == first.message.id
    assert own_1.outcome == own_2.outcome == "inserted"  # NULL external ids never collide
    assert own_1.message.status == "queued"
    assert [m.seq for m in (first.message, own_1.message, own_2.message)] == [1, 2, 3]


async def test_database_refuses_duplicates_on_its_own(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    """The unique constraint itself, not only the pre-check, guards (channel, external id)."""
    _, conversation = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        await insert_message(
            session, conversation_id=conversation.id, role="user", text="x", external_id="dup"
        )
    from sqlalchemy.exc import IntegrityError

    async with session_factory() as session:
        with pytest.raises(IntegrityError):
            async with session.begin():
                session.add(
                    Message(
                        tenant_id=world.tenant.id,
                        conversation_id=conversation.id,
                        channel_id=world.channel.id,
                        seq=99,
                        role="user",
                        text="x",
                        external_id="dup",
                        status="received",
                    )
                )


async def test_concurrent_duplicate_inserts_store_one_message(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    _, conversation = await _contact_and_conversation(session_factory, world)

    async def deliver() -> str:
        async with session_factory() as session, session.begin():
            result = await insert_message(
                session,
                conversation_id=conversation.id,
                role="user",
                text="once",
                external_id="wamid.race",
            )
            return result.outcome

    outcomes = await asyncio.gather(*(deliver() for _ in range(6)))
    assert sorted(outcomes) == ["duplicate"] * 5 + ["inserted"]
    async with session_factory() as session:
        stored = await messages_since(session, conversation.id)
    assert [m.external_id for m in stored] == ["wamid.race"]


async def test_status_only_moves_forward(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    _, conversation = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        message = (
            await insert_message(
                session, conversation_id=conversation.id, role="assistant", text="t"
            )
        ).message
    mid = message.id
    steps: list[tuple[DeliveryStatus, bool]] = [
        ("queued", False),  # already queued
        ("sent", True),
        ("queued", False),
        ("read", True),
        ("delivered", False),  # a late receipt never overwrites read
        ("failed", False),
        ("sent", False),
    ]
    async with session_factory() as session, session.begin():
        for status, applied in steps:
            assert await update_delivery_status(session, mid, status) is applied, status
        stored = await get_message(session, mid)
    assert stored is not None
    assert stored.status == "read"


async def test_failed_rules(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    _, conversation = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        message = (
            await insert_message(
                session, conversation_id=conversation.id, role="assistant", text="t"
            )
        ).message
        assert await update_delivery_status(session, message.id, "sent")
        assert await update_delivery_status(
            session, message.id, "failed", error_code="131026", error_text="undeliverable"
        )
        # The first failure is kept; `sent` cannot undo it.
        assert not await update_delivery_status(session, message.id, "failed", error_code="x")
        assert not await update_delivery_status(session, message.id, "sent")
        failed = await get_message(session, message.id)
        assert failed is not None
        assert (failed.status, failed.error_code, failed.error_text) == (
            "failed",
            "131026",
            "undeliverable",
        )
        # A delivery receipt proves arrival: it replaces failed and clears the error.
        assert await update_delivery_status(session, message.id, "delivered")
        delivered = await get_message(session, message.id)
        assert delivered is not None
        assert (delivered.status, delivered.error_code, delivered.error_text) == (
            "delivered",
            None,
            None,
        )


async def test_status_by_external_id(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    _, conversation = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        message = (
            await insert_message(
                session, conversation_id=conversation.id, role="assistant", text="t"
            )
        ).message
        assert await set_provider_id(session, message.id, "wamid.out")
        assert await set_provider_id(session, message.id, "wamid.out")  # idempotent
        assert not await set_provider_id(session, message.id, "wamid.other")
        assert await update_delivery_status_by_external_id(
            session, channel_id=world.channel.id, external_id="wamid.out", status="delivered"
        )
        assert not await update_delivery_status_by_external_id(
            session, channel_id=world.channel.id, external_id="wamid.out", status="sent"
        )
        assert not await update_delivery_status_by_external_id(
            session, channel_id=world.channel.id, external_id="unknown", status="read"
        )


async def test_concurrent_status_updates_end_at_the_highest(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    _, conversation = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        mid = (
            await insert_message(
                session, conversation_id=conversation.id, role="assistant", text="t"
            )
        ).message.id
    statuses: list[DeliveryStatus] = ["sent", "delivered", "read", "failed"] * 4
    random.Random(7).shuffle(statuses)

    async def apply(status: DeliveryStatus) -> bool:
        async with session_factory() as session, session.begin():
            return await update_delivery_status(session, mid, status)

    applied = await asyncio.gather(*(apply(s) for s in statuses))
    async with session_factory() as session:
        final = await get_message(session, mid)
    assert final is not None
    assert final.status == "read"
    assert final.error_code is None
    assert sum(applied) <= 4  # each rank can win at most once
    assert applied.count(True) >= 1


async def test_late_delivered_waits_for_read_and_loses(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    """A writer blocked behind an uncommitted `read` re-checks the rank once `read` commits."""
    _, conversation = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        mid = (
            await insert_message(
                session, conversation_id=conversation.id, role="assistant", text="t"
            )
        ).message.id
        await update_delivery_status(session, mid, "sent")

    status_updates: list[str] = []

    def count_updates(_c: object, _cur: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("UPDATE MESSAGES"):
            status_updates.append(statement)

    # the contender is another process's engine (a SQLite engine has one connection per process)
    other = create_engine(engine.url.render_as_string(hide_password=False))
    other_sessions = create_session_factory(other)

    async def late_delivered() -> bool:
        async with other_sessions() as session, session.begin():
            return await update_delivery_status(session, mid, "delivered")

    event.listen(engine.sync_engine, "before_cursor_execute", count_updates)
    event.listen(other.sync_engine, "before_cursor_execute", count_updates)
    try:
        async with session_factory() as writer:
            async with writer.begin():
                assert await update_delivery_status(writer, mid, "read")
                contender = asyncio.create_task(late_delivered())
                # The contender's UPDATE has been sent and is now waiting for our lock.
                await wait_until(lambda: len(status_updates) >= 2)
                if engine.dialect.name == "postgresql":
                    async with engine.connect() as probe:
                        waiting = 0
                        for _ in range(1000):
                            waiting = await probe.scalar(
                                text("SELECT count(*) FROM pg_locks WHERE NOT granted")
                            )
                            if waiting:
                                break
                            await asyncio.sleep(0.005)
                        assert waiting, "the second writer never waited for the row lock"
                assert not contender.done()
            assert await contender is False
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count_updates)
        await other.dispose()
    async with session_factory() as session:
        final = await get_message(session, mid)
    assert final is not None
    assert final.status == "read"


async def test_messages_since_is_a_stable_cursor(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    _, conversation = await _contact_and_conversation(session_factory, world)
    async with session_factory() as session, session.begin():
        for i in range(7):
            await insert_message(
                session, conversation_id=conversation.id, role="user", text=f"m{i}"
            )
    seen: list[str] = []
    cursor = 0
    async with session_factory() as session:
        while page := await messages_since(session, conversation.id, after_seq=cursor, limit=3):
            seen.extend(m.text for m in page)
            cursor = page[-1].seq
        assert seen == [f"m{i}" for i in range(7)]
        assert await messages_since(session, conversation.id, after_seq=cursor) == []
        recent = await recent_messages(session, conversation.id, limit=2)
    assert [m.text for m in recent] == ["m5", "m6"]


async def test_concurrent_inserts_get_distinct_increasing_seqs(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    _, conversation = await _contact_and_conversation(session_factory, world)

    async def add(i: int) -> int:
        async with session_factory() as session, session.begin():
            result = await insert_message(
                session, conversation_id=conversation.id, role="user", text=str(i)
            )
            return result.message.seq

    seqs = await asyncio.gather(*(add(i) for i in range(10)))
    assert sorted(seqs) == list(range(1, 11))


async def test_a_visitor_marks_only_its_own_bot_messages_delivered(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    _, mine = await _contact_and_conversation(session_factory, world, external_id="visitor-a")
    _, theirs = await _contact_and_conversation(session_factory, world, external_id="visitor-b")
    async with session_factory() as session, session.begin():
        ids = {}
        for key, conversation, role in [
            ("reply", mine, "assistant"),
            ("own-text", mine, "user"),
            ("other", theirs, "assistant"),
        ]:
            ids[key] = (
                await insert_message(session, conversation_id=conversation.id, role=role, text=key)
            ).message.id

    async def ack(message_id: uuid.UUID, visitor: str = "visitor-a") -> bool:
        async with session_factory() as session, session.begin():
            return await mark_delivered_for_visitor(
                session, message_id, channel_id=world.channel.id, external_id=visitor
            )

    assert not await ack(ids["other"]), "another visitor's message"
    assert not await ack(ids["own-text"]), "the visitor's own text is not 'delivered' to them"
    assert not await ack(ids["reply"], visitor="nobody")
    assert not await ack(uuid.uuid4())
    assert await ack(ids["reply"])
    assert not await ack(ids["reply"]), "only forward: a second ack changes nothing"
    async with session_factory() as session:
        statuses = {k: (await get_message(session, v)).status for k, v in ids.items()}  # type: ignore[union-attr]
    assert statuses == {"reply": "delivered", "own-text": "received", "other": "queued"}

    async with session_factory() as session, session.begin():
        await set_conversation_status(session, mine.id, "resolved")
        newer = (
            await insert_message(session, conversation_id=mine.id, role="assistant", text="late")
        ).message.id
    assert not await ack(newer), "a resolved conversation is not the visitor's active one"
