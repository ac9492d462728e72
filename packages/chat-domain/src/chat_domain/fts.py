"""Names of the full-text-search objects that live outside the SQLAlchemy metadata.

The migration creates them per dialect; ``migrations/env.py`` hides them from autogenerate.
"""

from __future__ import annotations

FTS_LANGUAGE = "simple"  # PostgreSQL text search configuration: no stemming, any language
SQLITE_FTS_TABLE = "kb_chunks_fts"
SQLITE_FTS_TRIGGERS = ("kb_chunks_fts_ai", "kb_chunks_fts_ad", "kb_chunks_fts_au")
PG_TSVECTOR_COLUMN = "search_vector"
PG_TSVECTOR_INDEX = "ix_kb_chunks_search_vector"


def is_fts_object(name: str | None, type_: str, *, reflected: bool) -> bool:
    """True for schema objects that only the migration manages (FTS5 shadow tables included)."""
    if name is None:
        return False
    if type_ == "table":
        return name == SQLITE_FTS_TABLE or name.startswith(SQLITE_FTS_TABLE + "_")
    if type_ == "column":
        return reflected and name == PG_TSVECTOR_COLUMN
    if type_ == "index":
        return name == PG_TSVECTOR_INDEX
    return False
