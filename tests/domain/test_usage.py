from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    RecorderClosedError,
    UsageRecord,
    UsageRecorder,
    month_bounds,
    monthly_totals,
    monthly_usage,
    write_usage,
)
from chat_domain.models import UsageEvent
from tests.domain.helpers import World, wait_until


async def _stored(
    session_factory: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID
) -> tuple[int, int]:
    """(rows, sum of quantity) in the log for a tenant."""
    async with session_factory() as session:
        rows, total = (
            await session.execute(
                select(func.count(), func.coalesce(func.sum(UsageEvent.quantity), 0)).where(
                    UsageEvent.tenant_id == tenant_id
                )
            )
        ).one()
    return int(rows), int(total)


def test_month_bounds() -> None:
    assert month_bounds(2026, 2) == (
        datetime(2026, 2, 1, tzinfo=UTC),
        datetime(2026, 3, 1, tzinfo=UTC),
    )
    assert month_bounds(2026, 12) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )


async def test_count_based_flush(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    recorder = UsageRecorder(session_factory, batch_size=5, flush_interval=3600)
    try:
        for _ in range(5):
            recorder.record(world.tenant.id, "message_in")
        await wait_until(lambda: recorder.stats.written == 5)
        assert recorder.stats.flushes == 1
        assert await _stored(session_factory, world.tenant.id) == (5, 5)
        recorder.record(world.tenant.id, "message_out")
        recorder.record(world.tenant.id, "message_out")
        assert recorder.pending == 2  # below the batch size and the hour: still buffered
    finally:
        await recorder.close()
    assert await _stored(session_factory, world.tenant.id) == (7, 7)


async def test_time_based_flush(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    async with UsageRecorder(session_factory, batch_size=1000, flush_interval=0.05) as recorder:
        recorder.record(world.tenant.id, "ai_prompt_tokens", 120, model="gpt-test")
        recorder.record(world.tenant.id, "ai_completion_tokens", 30, model="gpt-test")
        recorder.record(world.tenant.id, "whatsapp_send")
        await wait_until(lambda: recorder.stats.written == 3)
        assert recorder.pending == 0
        assert await _stored(session_factory, world.tenant.id) == (3, 151)


async def test_close_flushes_everything_buffered(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    recorder = UsageRecorder(session_factory, batch_size=1000, flush_interval=3600)
    for i in range(250):
        recorder.record(world.tenant.id, "webhook_delivery", i % 3)
    await asyncio.sleep(0)  # the flusher runs, and finds nothing due
    assert recorder.pending == 250
    assert await _stored(session_factory, world.tenant.id) == (0, 0)
    await recorder.close()
    assert recorder.pending == 0
    assert await _stored(session_factory, world.tenant.id) == (250, sum(i % 3 for i in range(250)))
    await recorder.close()  # idempotent
    with pytest.raises(RecorderClosedError):
        recorder.record(world.tenant.id, "message_in")


async def test_nothing_lost_with_concurrent_producers(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    recorder = UsageRecorder(session_factory, batch_size=50, flush_interval=0.01)

    async def produce(n: int) -> None:
        for i in range(n):
            recorder.record(world.tenant.id, "message_in", 1, dedupe_key=None)
            if i % 25 == 0:
                await asyncio.sleep(0)  # let the flusher interleave

    await asyncio.gather(*(produce(300) for _ in range(5)))
    await recorder.close()
    assert recorder.stats.recorded == 1500
    assert await _stored(session_factory, world.tenant.id) == (1500, 1500)
    now = datetime.now(UTC)
    async with session_factory() as session:
        totals = await monthly_totals(session, world.tenant.id, now.year, now.month)
    assert totals == {"message_in": 1500}


class FlakyFactory:
    """A session factory whose first ``failures`` sessions cannot connect."""

    def __init__(self, real: async_sessionmaker[AsyncSession], failures: int) -> None:
        self.real = real
        self.failures = failures

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("database unavailable")
        async with self.real() as session:
            yield session

    def __call__(self) -> object:
        return self._session()


async def test_failed_write_keeps_events_and_retries(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    flaky = FlakyFactory(session_factory, failures=2)
    recorder = UsageRecorder(flaky, batch_size=10, flush_interval=0.02)  # type: ignore[arg-type]
    for _ in range(10):
        recorder.record(world.tenant.id, "message_in")
    await wait_until(lambda: recorder.stats.written == 10)
    assert recorder.stats.failures == 2
    assert recorder.stats.last_error == "ConnectionError: database unavailable"
    await recorder.close()
    assert await _stored(session_factory, world.tenant.id) == (10, 10)


async def test_close_raises_when_the_last_write_fails(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    flaky = FlakyFactory(session_factory, failures=1)
    recorder = UsageRecorder(flaky, batch_size=10, flush_interval=3600)  # type: ignore[arg-type]
    recorder.record(world.tenant.id, "message_in")
    with pytest.raises(ConnectionError):
        await recorder.close()
    assert recorder.pending == 1  # still there: a caller may flush() again
    assert await recorder.flush() == 1
    assert await _stored(session_factory, world.tenant.id) == (1, 1)


async def test_monthly_aggregate(
    session_factory: async_sessionmaker[AsyncSession], world: World, other_world: World
) -> None:
    feb_last = datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=UTC)
    mar_first = datetime(2026, 3, 1, tzinfo=UTC)
    # 01:00 at UTC+02:00 on 1 March is still February in UTC.
    feb_late_local = datetime(2026, 3, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    t, o = world.tenant.id, other_world.tenant.id
    records = [
        UsageRecord(t, "message_in", 1, datetime(2026, 2, 1, tzinfo=UTC)),
        UsageRecord(t, "message_in", 1, feb_last),
        UsageRecord(t, "message_in", 1, feb_late_local),
        UsageRecord(t, "message_out", 2, feb_last),
        UsageRecord(t, "ai_prompt_tokens", 500, feb_last, model="m1"),
        UsageRecord(t, "ai_prompt_tokens", 250, feb_last, model="m2"),
        UsageRecord(t, "message_in", 7, mar_first),
        UsageRecord(t, "message_in", 9, datetime(2026, 1, 31, 23, 59, tzinfo=UTC)),
        UsageRecord(o, "message_in", 100, feb_last),
    ]
    async with session_factory() as session, session.begin():
        assert await write_usage(session, records) == len(records)
    expected_feb = {"message_in": 3, "message_out": 2, "ai_prompt_tokens": 750}
    async with session_factory() as session:
        assert await monthly_usage(session, t, 2026, 2) == expected_feb
        assert await monthly_totals(session, t, 2026, 2) == expected_feb
        assert await monthly_usage(session, t, 2026, 3) == {"message_in": 7}
        assert await monthly_totals(session, t, 2026, 3) == {"message_in": 7}
        assert await monthly_usage(session, t, 2026, 1) == {"message_in": 9}
        assert await monthly_usage(session, o, 2026, 2) == {"message_in": 100}
        assert await monthly_usage(session, t, 2025, 2) == {}


async def test_dedupe_key_makes_retries_idempotent(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    at = datetime(2026, 4, 2, tzinfo=UTC)
    key = f"{uuid.uuid4()}:ai_prompt_tokens"
    record = UsageRecord(world.tenant.id, "ai_prompt_tokens", 42, at, model="m", dedupe_key=key)
    async with session_factory() as session, session.begin():
        assert await write_usage(session, [record]) == 1
    async with session_factory() as session, session.begin():
        assert await write_usage(session, [record, record]) == 0
    async with session_factory() as session:
        assert await monthly_usage(session, world.tenant.id, 2026, 4) == {"ai_prompt_tokens": 42}
        assert await monthly_totals(session, world.tenant.id, 2026, 4) == {"ai_prompt_tokens": 42}


def test_invalid_recorder_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        UsageRecorder(async_sessionmaker(), batch_size=0)
    with pytest.raises(ValueError, match="flush_interval"):
        UsageRecorder(async_sessionmaker(), flush_interval=0)


async def test_invalid_usage_kind(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    recorder = UsageRecorder(session_factory)
    try:
        with pytest.raises(ValueError, match="invalid usage record"):
            recorder.record(world.tenant.id, "bogus")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="invalid usage record"):
            recorder.record(world.tenant.id, "message_in", -1)
    finally:
        await recorder.close()


async def test_an_event_the_database_refuses_does_not_block_the_rest(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    recorder = UsageRecorder(session_factory, batch_size=100, flush_interval=3600)
    recorder.record(world.tenant.id, "message_in")
    recorder.record(uuid.uuid4(), "message_in")  # no such tenant: the foreign key refuses it
    recorder.record(world.tenant.id, "message_out")
    assert await recorder.flush() == 2
    assert recorder.stats.dropped == 1
    assert recorder.pending == 0
    await recorder.close()
    assert await _stored(session_factory, world.tenant.id) == (2, 2)
