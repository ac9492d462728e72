"""Message provider ids: the id a channel gave an outgoing message (wamid, a QR service's key
id), apart from `external_id`, which for replies is our own idempotency key; status callbacks
find messages by it.

Revision ID: 7c3a51d2e8f4
Revises: 5e1f0c7a9d21
Create Date: 2026-12-03 22:40:00+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "7c3a51d2e8f4"
down_revision: str | Sequence[str] | None = "5e1f0c7a9d21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HAS = sa.text("provider_id IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider_id", sa.String(length=200), nullable=True))
        batch_op.create_index(
            "uq_messages_channel_provider_id",
            ["channel_id", "provider_id"],
            unique=True,
            sqlite_where=_HAS,
            postgresql_where=_HAS,
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("uq_messages_channel_provider_id")
        batch_op.drop_column("provider_id")
