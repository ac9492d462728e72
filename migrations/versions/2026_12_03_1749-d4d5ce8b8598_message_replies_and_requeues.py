"""Message replies and requeues: which reply answered a user message (``reply_id``), how often
the reconciler had to queue a message again (``requeues``), and the partial indexes that keep
the unanswered questions and the undelivered replies cheap to find.

Existing user messages are marked as answered by the first bot or agent message after them, so
the reconciler does not take the history for a backlog.

Revision ID: d4d5ce8b8598
Revises: 15ee3350622e
Create Date: 2026-12-03 17:49:23.002391+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "d4d5ce8b8598"
down_revision: str | Sequence[str] | None = "15ee3350622e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reply_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("requeues", sa.Integer(), server_default="0", nullable=False))
        batch_op.create_index(
            "ix_messages_queued_created_at",
            ["created_at"],
            unique=False,
            sqlite_where=sa.text("status = 'queued'"),
            postgresql_where=sa.text("status = 'queued'"),
        )
        batch_op.create_index(
            "ix_messages_unanswered_conversation",
            ["conversation_id", "seq"],
            unique=False,
            sqlite_where=sa.text("role = 'user' AND reply_id IS NULL"),
            postgresql_where=sa.text("role = 'user' AND reply_id IS NULL"),
        )
        batch_op.create_index(
            "ix_messages_unanswered_created_at",
            ["created_at"],
            unique=False,
            sqlite_where=sa.text("role = 'user' AND reply_id IS NULL"),
            postgresql_where=sa.text("role = 'user' AND reply_id IS NULL"),
        )
    op.execute(
        """
        UPDATE messages SET reply_id = (
            SELECT r.id FROM messages AS r
            WHERE r.conversation_id = messages.conversation_id
              AND r.role IN ('assistant', 'agent') AND r.seq > messages.seq
            ORDER BY r.seq LIMIT 1
        )
        WHERE role = 'user'
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_messages_unanswered_created_at",
            sqlite_where=sa.text("role = 'user' AND reply_id IS NULL"),
            postgresql_where=sa.text("role = 'user' AND reply_id IS NULL"),
        )
        batch_op.drop_index(
            "ix_messages_unanswered_conversation",
            sqlite_where=sa.text("role = 'user' AND reply_id IS NULL"),
            postgresql_where=sa.text("role = 'user' AND reply_id IS NULL"),
        )
        batch_op.drop_index(
            "ix_messages_queued_created_at",
            sqlite_where=sa.text("status = 'queued'"),
            postgresql_where=sa.text("status = 'queued'"),
        )
        batch_op.drop_column("requeues")
        batch_op.drop_column("reply_id")
