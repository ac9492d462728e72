"""Chatbot handoff settings: the phrases with which a user asks for a person, and what the bot
says when it hands a conversation to the tenant's agents (NULL: the platform's defaults).

Revision ID: 5e1f0c7a9d21
Revises: b8d7aeeb5ba7
Create Date: 2026-12-03 22:15:00+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "5e1f0c7a9d21"
down_revision: str | Sequence[str] | None = "b8d7aeeb5ba7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("chatbots", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "handoff_phrases",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("handoff_reply", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chatbots", schema=None) as batch_op:
        batch_op.drop_column("handoff_reply")
        batch_op.drop_column("handoff_phrases")
