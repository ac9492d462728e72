"""Small SQL helpers shared by the repository modules."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

Upsert = postgresql.Insert | sqlite.Insert


def dialect_insert(session: AsyncSession, entity: Any) -> Upsert:
    """``INSERT`` with ``ON CONFLICT`` support for the session's dialect (PostgreSQL or SQLite:
    both take the same ``on_conflict_do_nothing/do_update(index_elements=, index_where=)``)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(entity)
    if name == "sqlite":
        return sqlite.insert(entity)
    raise NotImplementedError(f"unsupported database dialect: {name}")
