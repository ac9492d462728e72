"""Knowledge-base documents and their searchable chunks.

Full-text search objects are not part of this metadata (autogenerate cannot see them); the
migration creates them per dialect: on SQLite the FTS5 table ``kb_chunks_fts`` (external content
over ``kb_chunks``, kept in sync by triggers), on PostgreSQL the generated ``tsvector`` column
``kb_chunks.search_vector`` with a GIN index.
"""

from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from chat_domain.models.base import Base, CreatedAt, UUIDPrimaryKey

# SQLite's FTS5 external-content table needs a stable integer rowid: an INTEGER PRIMARY KEY is
# an alias of the rowid and survives VACUUM, an implicit rowid does not.
IntegerKey = BigInteger().with_variant(Integer(), "sqlite")


class KbDocument(UUIDPrimaryKey, CreatedAt, Base):
    __tablename__ = "kb_documents"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    chatbot_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("chatbots.id", ondelete="CASCADE"), index=True
    )
    title: Mapped[str] = mapped_column(String(500))
    source: Mapped[str | None] = mapped_column(String(1000))

    chunks: Mapped[list[KbChunk]] = relationship(
        lazy="raise", back_populates="document", order_by="KbChunk.ordinal"
    )


class KbChunk(Base):
    __tablename__ = "kb_chunks"
    __table_args__ = (UniqueConstraint("document_id", "ordinal"),)

    id: Mapped[int] = mapped_column(IntegerKey, primary_key=True, autoincrement=True)
    document_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("kb_documents.id", ondelete="CASCADE")
    )
    chatbot_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("chatbots.id", ondelete="CASCADE"), index=True
    )
    ordinal: Mapped[int]
    content: Mapped[str] = mapped_column(Text)

    document: Mapped[KbDocument] = relationship(lazy="raise", back_populates="chunks")
