"""Retention: delete each tenant's messages, usage rows and webhook events older than its
``retention_days``, in small batches (each batch its own transaction)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain.models import Message, Tenant, UsageEvent, WebhookEvent


@dataclass(frozen=True, slots=True)
class PurgeResult:
    messages: int
    usage_events: int
    webhook_events: int


def usage_floor(now: datetime) -> datetime:
    """Usage rows are kept at least from the first day of the previous month (UTC), whatever the
    retention, so the current month's quota and last month's invoice can still be computed."""
    now = now.astimezone(UTC)
    year, month = (now.year, now.month - 1) if now.month > 1 else (now.year - 1, 12)
    return datetime(year, month, 1, tzinfo=UTC)


async def _delete_batches(
    session: AsyncSession, table: Any, id_column: Any, conditions: list[Any], batch_size: int
) -> int:
    total = 0
    while True:
        ids = select(id_column).where(*conditions).limit(batch_size).scalar_subquery()
        result = await session.execute(
            delete(table)
            .where(id_column.in_(ids))
            .returning(id_column)
            .execution_options(synchronize_session=False)
        )
        deleted = len(result.all())
        await session.commit()
        total += deleted
        if deleted < batch_size:
            return total


async def purge_expired(
    session: AsyncSession,
    now: datetime,
    *,
    batch_size: int = 1000,
    tenant_id: uuid.UUID | None = None,
) -> PurgeResult:
    """Delete rows older than each tenant's retention (every tenant, or only ``tenant_id``).

    Commits after every batch of at most ``batch_size`` rows, so call it with a session that
    holds no other pending work. Conversations, contacts and the monthly usage totals are kept.
    Deleting webhook events cascades to their delivery attempts.
    """
    query = select(Tenant.id, Tenant.retention_days).order_by(Tenant.id)
    if tenant_id is not None:
        query = query.where(Tenant.id == tenant_id)
    tenants = (await session.execute(query)).all()
    await session.commit()
    messages = usage = events = 0
    for tid, days in tenants:
        cutoff = now - timedelta(days=days)
        messages += await _delete_batches(
            session,
            Message,
            Message.id,
            [Message.tenant_id == tid, Message.created_at < cutoff],
            batch_size,
        )
        usage += await _delete_batches(
            session,
            UsageEvent,
            UsageEvent.id,
            [UsageEvent.tenant_id == tid, UsageEvent.occurred_at < min(cutoff, usage_floor(now))],
            batch_size,
        )
        events += await _delete_batches(
            session,
            WebhookEvent,
            WebhookEvent.id,
            [WebhookEvent.tenant_id == tid, WebhookEvent.created_at < cutoff],
            batch_size,
        )
    return PurgeResult(messages=messages, usage_events=usage, webhook_events=events)
