"""Plans, tenants and API keys."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from chat_domain.models.base import Base, CreatedAt, UUIDPrimaryKey
from chat_domain.types import API_KEY_ROLES, TENANT_STATUSES, ApiKeyRole, TenantStatus, sql_in_list


class Plan(UUIDPrimaryKey, CreatedAt, Base):
    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("monthly_price_cents >= 0", name="price_not_negative"),
        CheckConstraint(
            "messages_per_month IS NULL OR messages_per_month >= 0", name="messages_limit"
        ),
        CheckConstraint(
            "ai_tokens_per_month IS NULL OR ai_tokens_per_month >= 0", name="ai_tokens_limit"
        ),
    )

    name: Mapped[str] = mapped_column(String(100), unique=True)
    monthly_price_cents: Mapped[int]
    # None means unlimited.
    messages_per_month: Mapped[int | None]
    ai_tokens_per_month: Mapped[int | None]


class Tenant(UUIDPrimaryKey, CreatedAt, Base):
    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint(f"status IN ({sql_in_list(TENANT_STATUSES)})", name="status"),
        CheckConstraint("retention_days >= 1", name="retention_days_positive"),
    )

    name: Mapped[str] = mapped_column(String(200))
    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id"), index=True)
    status: Mapped[TenantStatus] = mapped_column(String(20), default="active")
    retention_days: Mapped[int] = mapped_column(default=90)

    plan: Mapped[Plan] = relationship(lazy="raise")


class ApiKey(UUIDPrimaryKey, CreatedAt, Base):
    """A hashed API key. Operator keys have no tenant; admin and agent keys belong to one."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(f"role IN ({sql_in_list(API_KEY_ROLES)})", name="role"),
        CheckConstraint(
            "(role = 'operator' AND tenant_id IS NULL)"
            " OR (role <> 'operator' AND tenant_id IS NOT NULL)",
            name="operator_has_no_tenant",
        ),
    )

    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[ApiKeyRole] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
