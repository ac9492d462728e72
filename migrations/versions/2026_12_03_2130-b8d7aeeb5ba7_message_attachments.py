"""Message attachments: what a non-text WhatsApp message carried (media id and type, a button's
id, a location), kept as a reference beside the text the bot reads.

Revision ID: b8d7aeeb5ba7
Revises: d4d5ce8b8598
Create Date: 2026-12-03 21:30:00+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "b8d7aeeb5ba7"
down_revision: str | Sequence[str] | None = "d4d5ce8b8598"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "attachment",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("attachment")
