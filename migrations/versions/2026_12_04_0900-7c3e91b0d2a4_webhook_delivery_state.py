"""Webhook delivery state: one outbox row per (event, endpoint) with its status, attempt counts
and next due time (what the delivery worker and the relay work from); endpoint health (failures
since the last success, when the endpoint was disabled) and the previous signing secret that
still signs during a rotation's grace period.

Revision ID: 7c3e91b0d2a4
Revises: 7c3a51d2e8f4
Create Date: 2026-12-04 09:00:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "7c3e91b0d2a4"
down_revision: str | Sequence[str] | None = "7c3a51d2e8f4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)
PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("disabled_at", TIMESTAMP, nullable=True))
        batch_op.add_column(sa.Column("previous_secret_enc", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("previous_secret_expires_at", TIMESTAMP, nullable=True))
        batch_op.add_column(
            sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("first_failure_at", TIMESTAMP, nullable=True))
        batch_op.add_column(sa.Column("last_success_at", TIMESTAMP, nullable=True))

    op.create_table(
        "webhook_dispatches",
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("round_attempts", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')",
            name=op.f("ck_webhook_dispatches_status"),
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_dispatches_endpoint_id_webhook_endpoints"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["webhook_events.id"],
            name=op.f("fk_webhook_dispatches_event_id_webhook_events"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_webhook_dispatches_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("event_id", "endpoint_id", name=op.f("pk_webhook_dispatches")),
    )
    op.create_index(
        op.f("ix_webhook_dispatches_endpoint_id"),
        "webhook_dispatches",
        ["endpoint_id"],
        unique=False,
    )
    op.create_index(
        "ix_webhook_dispatches_due",
        "webhook_dispatches",
        ["next_attempt_at"],
        unique=False,
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )
    op.create_index(
        "ix_webhook_dispatches_tenant_id_status",
        "webhook_dispatches",
        ["tenant_id", "status", "finished_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_dispatches_tenant_id_status", table_name="webhook_dispatches")
    op.drop_index(
        "ix_webhook_dispatches_due",
        table_name="webhook_dispatches",
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )
    op.drop_index(op.f("ix_webhook_dispatches_endpoint_id"), table_name="webhook_dispatches")
    op.drop_table("webhook_dispatches")
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.drop_column("last_success_at")
        batch_op.drop_column("first_failure_at")
        batch_op.drop_column("consecutive_failures")
        batch_op.drop_column("previous_secret_expires_at")
        batch_op.drop_column("previous_secret_enc")
        batch_op.drop_column("disabled_at")
