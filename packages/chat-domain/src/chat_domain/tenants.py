"""Plans and tenants, and the queue priority a tenant's jobs get."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain.errors import NotFoundError
from chat_domain.models import Plan, Tenant
from chat_domain.plans import QueuePriority, priority_for_price
from chat_domain.types import TenantStatus


@dataclass(frozen=True, slots=True)
class PlanView:
    id: uuid.UUID
    name: str
    monthly_price_cents: int
    messages_per_month: int | None  # None: unlimited
    ai_tokens_per_month: int | None  # None: unlimited

    @property
    def queue_priority(self) -> QueuePriority:
        return priority_for_price(self.monthly_price_cents)

    @classmethod
    def of(cls, row: Plan) -> PlanView:
        return cls(
            id=row.id,
            name=row.name,
            monthly_price_cents=row.monthly_price_cents,
            messages_per_month=row.messages_per_month,
            ai_tokens_per_month=row.ai_tokens_per_month,
        )


@dataclass(frozen=True, slots=True)
class TenantView:
    id: uuid.UUID
    name: str
    plan_id: uuid.UUID
    status: TenantStatus
    retention_days: int
    created_at: datetime

    @classmethod
    def of(cls, row: Tenant) -> TenantView:
        return cls(
            id=row.id,
            name=row.name,
            plan_id=row.plan_id,
            status=row.status,
            retention_days=row.retention_days,
            created_at=row.created_at,
        )


async def create_plan(
    session: AsyncSession,
    *,
    name: str,
    monthly_price_cents: int,
    messages_per_month: int | None = None,
    ai_tokens_per_month: int | None = None,
) -> PlanView:
    priority_for_price(monthly_price_cents)  # validates the price
    row = Plan(
        name=name,
        monthly_price_cents=monthly_price_cents,
        messages_per_month=messages_per_month,
        ai_tokens_per_month=ai_tokens_per_month,
    )
    session.add(row)
    await session.flush()
    return PlanView.of(row)


async def get_plan(session: AsyncSession, plan_id: uuid.UUID) -> PlanView | None:
    row = await session.get(Plan, plan_id)
    return None if row is None else PlanView.of(row)


async def get_plan_by_name(session: AsyncSession, name: str) -> PlanView | None:
    row = await session.scalar(select(Plan).where(Plan.name == name))
    return None if row is None else PlanView.of(row)


async def list_plans(session: AsyncSession) -> list[PlanView]:
    rows = await session.scalars(select(Plan).order_by(Plan.monthly_price_cents, Plan.name))
    return [PlanView.of(row) for row in rows]


async def list_tenants(
    session: AsyncSession, *, after: uuid.UUID | None = None, limit: int = 100
) -> list[TenantView]:
    """Tenants in id order; ``after`` is the last id of the previous page."""
    stmt = select(Tenant).order_by(Tenant.id).limit(limit)
    if after is not None:
        stmt = stmt.where(Tenant.id > after)
    return [TenantView.of(row) for row in await session.scalars(stmt)]


async def create_tenant(
    session: AsyncSession, *, name: str, plan_id: uuid.UUID, retention_days: int = 90
) -> TenantView:
    if retention_days < 1:
        raise ValueError("retention_days must be at least 1")
    row = Tenant(name=name, plan_id=plan_id, retention_days=retention_days, status="active")
    session.add(row)
    await session.flush()
    return TenantView.of(row)


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> TenantView | None:
    row = await session.get(Tenant, tenant_id)
    return None if row is None else TenantView.of(row)


async def _update_tenant(session: AsyncSession, tenant_id: uuid.UUID, **values: object) -> None:
    result = await session.execute(
        update(Tenant).where(Tenant.id == tenant_id).values(**values).returning(Tenant.id)
    )
    if result.scalar_one_or_none() is None:
        raise NotFoundError(f"tenant {tenant_id} does not exist")


async def change_plan(session: AsyncSession, tenant_id: uuid.UUID, plan_id: uuid.UUID) -> None:
    """Move a tenant to another plan; jobs enqueued afterwards get the new plan's priority."""
    await _update_tenant(session, tenant_id, plan_id=plan_id)


async def set_tenant_status(
    session: AsyncSession, tenant_id: uuid.UUID, status: TenantStatus
) -> None:
    await _update_tenant(session, tenant_id, status=status)


async def set_retention_days(session: AsyncSession, tenant_id: uuid.UUID, days: int) -> None:
    if days < 1:
        raise ValueError("retention days must be at least 1")
    await _update_tenant(session, tenant_id, retention_days=days)


async def get_queue_priority(session: AsyncSession, tenant_id: uuid.UUID) -> QueuePriority:
    """Priority and fairness weight for a job enqueued now, from the tenant's current plan."""
    price = await session.scalar(
        select(Plan.monthly_price_cents)
        .join(Tenant, Tenant.plan_id == Plan.id)
        .where(Tenant.id == tenant_id)
    )
    if price is None:
        raise NotFoundError(f"tenant {tenant_id} does not exist")
    return priority_for_price(price)
