"""The usage log (one row per billable event) and its per-month rollup."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from chat_domain.models.base import Base
from chat_domain.types import USAGE_KINDS, UsageKind, sql_in_list

# Millions of rows: an integer key is a quarter of the size of a UUID (and the rowid on SQLite).
IntegerKey = BigInteger().with_variant(Integer(), "sqlite")


class UsageEvent(Base):
    __tablename__ = "usage_events"
    __table_args__ = (
        CheckConstraint(f"kind IN ({sql_in_list(USAGE_KINDS)})", name="kind"),
        CheckConstraint("quantity >= 0", name="quantity_not_negative"),
        # Monthly aggregate: range on (tenant, time), and kind + quantity in the index so both
        # databases answer from the index alone (covering; an index-only scan on PostgreSQL).
        Index(
            "ix_usage_events_tenant_id_occurred_at",
            "tenant_id",
            "occurred_at",
            "kind",
            "quantity",
        ),
        # Retried producers pass a dedupe key; events without one are never deduplicated.
        Index(
            "uq_usage_events_dedupe_key",
            "dedupe_key",
            unique=True,
            sqlite_where=text("dedupe_key IS NOT NULL"),
            postgresql_where=text("dedupe_key IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(IntegerKey, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[UsageKind] = mapped_column(String(30))
    quantity: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str | None] = mapped_column(String(200))
    occurred_at: Mapped[datetime]
    dedupe_key: Mapped[str | None] = mapped_column(String(200))


class UsageMonthly(Base):
    """Running totals per tenant, calendar month (``period`` = year * 100 + month, UTC) and kind,
    incremented in the same transaction as the log rows they count. Quota checks read this
    (one row per kind) instead of summing the month's log."""

    __tablename__ = "usage_monthly"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    period: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[UsageKind] = mapped_column(String(30), primary_key=True)
    quantity: Mapped[int] = mapped_column(BigInteger, default=0)
