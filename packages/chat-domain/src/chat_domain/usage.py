"""Usage metering: batched writes of billable events, and monthly totals.

``UsageRecorder`` buffers events in memory and writes them with one multi-row INSERT when
``batch_size`` events are waiting or the oldest has waited ``flush_interval`` seconds. Each
write also adds the batch to ``usage_monthly`` in the same transaction, so the log and the
per-month totals never disagree. Events stay in the buffer until their transaction commits: a
failed write is retried, and ``close()`` flushes whatever is left.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain._sql import dialect_insert
from chat_domain.errors import RecorderClosedError
from chat_domain.models import UsageEvent, UsageMonthly, utcnow
from chat_domain.types import USAGE_KINDS, UsageKind

log = logging.getLogger(__name__)

MAX_ROWS_PER_STATEMENT = 1000  # 6 parameters a row: far below SQLite's and asyncpg's limits


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One billable event. ``dedupe_key`` (optional, globally unique, e.g.
    ``f"{message_id}:ai_prompt_tokens"``) makes a retried producer's second write a no-op."""

    tenant_id: uuid.UUID
    kind: UsageKind
    quantity: int
    occurred_at: datetime
    model: str | None = None
    dedupe_key: str | None = None


def period_of(moment: datetime) -> int:
    """The calendar month (UTC) of ``moment`` as ``year * 100 + month``."""
    moment = moment.astimezone(UTC)
    return moment.year * 100 + moment.month


def month_bounds(year: int, month: int) -> tuple[datetime, datetime]:
    """[start, end) of a calendar month in UTC."""
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


async def write_usage(session: AsyncSession, records: Sequence[UsageRecord]) -> int:
    """Insert ``records`` (multi-row INSERTs, duplicates by ``dedupe_key`` skipped) and add the
    inserted ones to the monthly totals. Returns how many rows were inserted. Does not commit."""
    for record in records:
        if record.kind not in USAGE_KINDS or record.quantity < 0:
            raise ValueError(f"invalid usage record: {record.kind} x {record.quantity}")
    inserted = 0
    totals: dict[tuple[uuid.UUID, int, UsageKind], int] = defaultdict(int)
    table = UsageEvent.__table__
    # One compiled statement, executed with many parameter sets: SQLAlchemy sends it as
    # multi-row INSERT ... VALUES (...), (...) pages ("insertmanyvalues") on both databases.
    stmt = (
        dialect_insert(session, table)
        .on_conflict_do_nothing(
            index_elements=["dedupe_key"], index_where=UsageEvent.dedupe_key.is_not(None)
        )
        .returning(table.c.tenant_id, table.c.kind, table.c.quantity, table.c.occurred_at)
    )
    connection = await session.connection()
    for start in range(0, len(records), MAX_ROWS_PER_STATEMENT):
        chunk = records[start : start + MAX_ROWS_PER_STATEMENT]
        result = await connection.execute(
            stmt,
            [
                {
                    "tenant_id": r.tenant_id,
                    "kind": r.kind,
                    "quantity": r.quantity,
                    "model": r.model,
                    "occurred_at": r.occurred_at,
                    "dedupe_key": r.dedupe_key,
                }
                for r in chunk
            ],
        )
        for tenant_id, kind, quantity, occurred_at in result:
            inserted += 1
            totals[(tenant_id, period_of(occurred_at), kind)] += quantity
    if totals:
        # Sorted: concurrent writers lock the total rows in the same order (no deadlocks).
        ordered = sorted(totals.items(), key=lambda item: (str(item[0][0]), item[0][1], item[0][2]))
        for start in range(0, len(ordered), MAX_ROWS_PER_STATEMENT):
            upsert = dialect_insert(session, UsageMonthly).values(
                [
                    {"tenant_id": t, "period": p, "kind": k, "quantity": q}
                    for (t, p, k), q in ordered[start : start + MAX_ROWS_PER_STATEMENT]
                ]
            )
            await session.execute(
                upsert.on_conflict_do_update(
                    index_elements=["tenant_id", "period", "kind"],
                    set_={"quantity": UsageMonthly.quantity + upsert.excluded.quantity},
                )
            )
    return inserted


async def monthly_usage(
    session: AsyncSession, tenant_id: uuid.UUID, year: int, month: int
) -> dict[UsageKind, int]:
    """Sum per kind over the usage log for one calendar month (UTC). Answered from the
    ``(tenant_id, occurred_at, kind, quantity)`` index; see ``bench/usage_bench.py``."""
    start, end = month_bounds(year, month)
    rows = await session.execute(monthly_usage_query(tenant_id, start, end))
    return {kind: int(total) for kind, total in rows}


def monthly_usage_query(
    tenant_id: uuid.UUID, start: datetime, end: datetime
) -> Select[UsageKind, int]:
    """The monthly aggregate statement (exposed for the benchmark's EXPLAIN)."""
    return (
        select(UsageEvent.kind, func.sum(UsageEvent.quantity))
        .where(
            UsageEvent.tenant_id == tenant_id,
            UsageEvent.occurred_at >= start,
            UsageEvent.occurred_at < end,
        )
        .group_by(UsageEvent.kind)
    )


async def monthly_totals(
    session: AsyncSession, tenant_id: uuid.UUID, year: int, month: int
) -> dict[UsageKind, int]:
    """The same numbers as ``monthly_usage`` from the running totals (one row per kind)."""
    rows = await session.execute(
        select(UsageMonthly.kind, UsageMonthly.quantity).where(
            UsageMonthly.tenant_id == tenant_id, UsageMonthly.period == year * 100 + month
        )
    )
    return {kind: int(quantity) for kind, quantity in rows}


@dataclass(slots=True)
class RecorderStats:
    recorded: int = 0
    written: int = 0  # rows inserted (duplicates by dedupe_key not counted)
    flushes: int = 0
    failures: int = 0
    dropped: int = 0
    last_error: str | None = field(default=None)


class UsageRecorder:
    """Buffers usage events and writes them in batches.

    ``record()`` is synchronous and cheap (no I/O); a background task flushes when
    ``batch_size`` events are buffered or the oldest is ``flush_interval`` seconds old. Call
    ``await close()`` on shutdown (or use ``async with``): it flushes everything buffered.
    When the database is unavailable, events stay buffered and the write is retried every
    ``flush_interval`` seconds; beyond ``max_buffered`` events the oldest are dropped and
    logged (memory is bounded; nothing is dropped silently). An event the database refuses
    on its own (integrity error, e.g. its tenant was deleted) is dropped and logged.
    """

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_buffered: int = 100_000,
    ) -> None:
        if batch_size < 1 or flush_interval <= 0 or max_buffered < batch_size:
            raise ValueError("need batch_size >= 1, flush_interval > 0, max_buffered >= batch_size")
        self._session_factory = session_factory
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_buffered = max_buffered
        self.stats = RecorderStats()
        self._buffer: list[UsageRecord] = []
        self._first_at = 0.0  # loop time when the buffer last became non-empty
        self._retry_at = 0.0  # loop time before which a failed write is not retried
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def __aenter__(self) -> UsageRecorder:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start the background flusher (``record()`` also starts it)."""
        if self._closed:
            raise RecorderClosedError("the usage recorder is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="usage-recorder-flush"
            )

    def record(
        self,
        tenant_id: uuid.UUID,
        kind: UsageKind,
        quantity: int = 1,
        *,
        model: str | None = None,
        occurred_at: datetime | None = None,
        dedupe_key: str | None = None,
    ) -> None:
        self.add(
            UsageRecord(
                tenant_id=tenant_id,
                kind=kind,
                quantity=quantity,
                occurred_at=occurred_at or utcnow(),
                model=model,
                dedupe_key=dedupe_key,
            )
        )

    def add(self, record: UsageRecord) -> None:
        if self._closed:
            raise RecorderClosedError("the usage recorder is closed")
        if record.kind not in USAGE_KINDS or record.quantity < 0:
            raise ValueError(f"invalid usage record: {record.kind} x {record.quantity}")
        self.start()
        if not self._buffer:
            self._first_at = asyncio.get_running_loop().time()
            self._wakeup.set()
        self._buffer.append(record)
        self.stats.recorded += 1
        if len(self._buffer) > self.max_buffered:
            overflow = len(self._buffer) - self.max_buffered
            del self._buffer[:overflow]
            self.stats.dropped += overflow
            log.error("usage recorder: buffer full, dropped %d oldest events", overflow)
        if len(self._buffer) >= self.batch_size:
            self._wakeup.set()

    async def flush(self) -> int:
        """Write everything buffered now; returns rows written. Raises when the database
        fails (the events stay buffered)."""
        async with self._lock:
            total = 0
            while self._buffer:
                batch = self._buffer[: self.batch_size]
                # Only this method removes events, under the lock: the first len(batch) are ours.
                try:
                    async with self._session_factory() as session, session.begin():
                        written = await write_usage(session, batch)
                except IntegrityError:
                    written = await self._write_individually(batch)
                else:
                    del self._buffer[: len(batch)]
                total += written
                self.stats.flushes += 1
                self.stats.written += written
                if self._buffer:
                    self._first_at = asyncio.get_running_loop().time()
            return total

    async def _write_individually(self, batch: list[UsageRecord]) -> int:
        """A batch the database refused (e.g. a tenant deleted meanwhile): write its events one
        by one and drop, with an error log, only those refused on their own, so one bad event
        cannot block the recorder."""
        written = 0
        for record in batch:
            try:
                async with self._session_factory() as session, session.begin():
                    written += await write_usage(session, [record])
            except IntegrityError:
                self.stats.dropped += 1
                log.error(
                    "usage recorder: dropped an event the database refuses (tenant %s, kind %s)",
                    record.tenant_id,
                    record.kind,
                )
            del self._buffer[0]
        return written

    async def close(self) -> None:
        """Stop the flusher and write everything still buffered. Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            self._wakeup.set()
            await task
        if self._buffer:
            await self.flush()

    def _due_at(self) -> float:
        full = len(self._buffer) >= self.batch_size
        due = 0.0 if full else self._first_at + self.flush_interval
        return max(due, self._retry_at)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._buffer:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = self._due_at() - loop.time()
            if delay > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                except TimeoutError:
                    pass
                continue
            try:
                await self.flush()
            except Exception as exc:
                self.stats.failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._retry_at = loop.time() + self.flush_interval
                log.exception("usage recorder: write failed, %d events kept", len(self._buffer))
            else:
                self._retry_at = 0.0
