"""Knowledge base: chunking, ingestion and full-text search on SQLite (FTS5) and PostgreSQL
(tsvector), behind one function."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Float, Integer, String, Uuid, column, delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain.errors import NotFoundError
from chat_domain.fts import FTS_LANGUAGE, SQLITE_FTS_TABLE
from chat_domain.models import Chatbot, KbChunk, KbDocument

DEFAULT_CHUNK_CHARS = 1000
MAX_QUERY_TERMS = 32
MAX_TERM_CHARS = 64

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCES = re.compile(r"(?<=[.!?。！？])\s+")
_WORDS = re.compile(r"\w+")


@dataclass(frozen=True, slots=True)
class DocumentView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    chatbot_id: uuid.UUID
    title: str
    source: str | None
    chunk_count: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChunkHit:
    """A search result; ``score`` is higher for better matches (comparable within one search)."""

    chunk_id: int
    document_id: uuid.UUID
    document_title: str
    ordinal: int
    content: str
    score: float


# --- chunking -----------------------------------------------------------------------------------


def _pieces(text_: str, max_chars: int) -> list[str]:
    """Split into units no longer than max_chars: paragraphs, else sentences, else words, else
    hard cuts."""
    out: list[str] = []
    for paragraph in _PARAGRAPHS.split(text_):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        if len(paragraph) <= max_chars:
            out.append(paragraph)
            continue
        for sentence in _SENTENCES.split(paragraph):
            if len(sentence) <= max_chars:
                out.append(sentence)
                continue
            for word in sentence.split(" "):
                out.extend(word[i : i + max_chars] for i in range(0, len(word), max_chars))
    return out


def chunk_text(text_: str, *, max_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Split ``text_`` into passages of at most ``max_chars`` characters, packing whole
    paragraphs (then sentences, then words) greedily; whitespace is normalised."""
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    chunks: list[str] = []
    current = ""
    for piece in _pieces(text_, max_chars):
        # Paragraph breaks are kept as blank lines when pieces share a chunk.
        candidate = f"{current}\n\n{piece}" if current else piece
        if len(candidate) <= max_chars:
            current = candidate
        else:
            chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


# --- ingestion ----------------------------------------------------------------------------------


async def ingest_document(
    session: AsyncSession,
    *,
    chatbot_id: uuid.UUID,
    title: str,
    text: str,
    source: str | None = None,
    max_chars: int = DEFAULT_CHUNK_CHARS,
) -> DocumentView:
    """Store a document and its chunks; the search index follows (SQLite triggers, PostgreSQL
    generated column). Does not commit."""
    tenant_id = await session.scalar(select(Chatbot.tenant_id).where(Chatbot.id == chatbot_id))
    if tenant_id is None:
        raise NotFoundError(f"chatbot {chatbot_id} does not exist")
    document = KbDocument(tenant_id=tenant_id, chatbot_id=chatbot_id, title=title, source=source)
    session.add(document)
    await session.flush()
    chunks = chunk_text(text, max_chars=max_chars)
    session.add_all(
        KbChunk(document_id=document.id, chatbot_id=chatbot_id, ordinal=i, content=content)
        for i, content in enumerate(chunks)
    )
    await session.flush()
    return DocumentView(
        id=document.id,
        tenant_id=tenant_id,
        chatbot_id=chatbot_id,
        title=title,
        source=source,
        chunk_count=len(chunks),
        created_at=document.created_at,
    )


async def list_documents(session: AsyncSession, chatbot_id: uuid.UUID) -> list[DocumentView]:
    chunks = (
        select(KbChunk.document_id, func.count().label("n"))
        .where(KbChunk.chatbot_id == chatbot_id)
        .group_by(KbChunk.document_id)
        .subquery()
    )
    rows = await session.execute(
        select(KbDocument, func.coalesce(chunks.c.n, 0))
        .outerjoin(chunks, chunks.c.document_id == KbDocument.id)
        .where(KbDocument.chatbot_id == chatbot_id)
        .order_by(KbDocument.created_at, KbDocument.id)
    )
    return [
        DocumentView(
            id=d.id,
            tenant_id=d.tenant_id,
            chatbot_id=d.chatbot_id,
            title=d.title,
            source=d.source,
            chunk_count=n,
            created_at=d.created_at,
        )
        for d, n in rows
    ]


async def get_document_owner(session: AsyncSession, document_id: uuid.UUID) -> uuid.UUID | None:
    """The tenant a document belongs to, or None when it does not exist."""
    return await session.scalar(select(KbDocument.tenant_id).where(KbDocument.id == document_id))


async def delete_document(session: AsyncSession, document_id: uuid.UUID) -> bool:
    """Delete a document and its chunks (and their index entries)."""
    await session.execute(
        delete(KbChunk)
        .where(KbChunk.document_id == document_id)
        .execution_options(synchronize_session=False)
    )
    result = await session.execute(
        delete(KbDocument)
        .where(KbDocument.id == document_id)
        .returning(KbDocument.id)
        .execution_options(synchronize_session=False)
    )
    return result.first() is not None


# --- search -------------------------------------------------------------------------------------


def search_terms(query: str) -> list[str]:
    """The words of a user query, lower-cased and de-duplicated: letters, digits and underscores
    only, so no FTS operator, quote, column filter or prefix syntax survives."""
    terms: list[str] = []
    for match in _WORDS.finditer(query.lower()):
        term = match.group()[:MAX_TERM_CHARS]
        if term not in terms:
            terms.append(term)
        if len(terms) == MAX_QUERY_TERMS:
            break
    return terms


def sqlite_match_expression(chatbot_id: uuid.UUID, terms: list[str]) -> str:
    """FTS5 MATCH: the chatbot's rows (its id is an indexed column) and any of the terms, each a
    quoted string (terms hold no quotes)."""
    any_term = " OR ".join(f'"{term}"' for term in terms)
    return f'chatbot_id : "{chatbot_id.hex}" AND content : ({any_term})'


def postgres_tsquery(terms: list[str]) -> str:
    """``to_tsquery`` text: any of the terms, each a quoted lexeme (terms hold no quotes)."""
    return " | ".join(f"'{term}'" for term in terms)


_RESULT_COLUMNS = (
    column("id", Integer()),
    column("document_id", Uuid()),
    column("title", String()),
    column("ordinal", Integer()),
    column("content", String()),
    column("score", Float()),
)

_SQLITE_SEARCH = text(
    f"""
    SELECT c.id, c.document_id, d.title, c.ordinal, c.content,
           -bm25({SQLITE_FTS_TABLE}, 1.0, 0.0) AS score
    FROM {SQLITE_FTS_TABLE}
    JOIN kb_chunks AS c ON c.id = {SQLITE_FTS_TABLE}.rowid
    JOIN kb_documents AS d ON d.id = c.document_id
    WHERE {SQLITE_FTS_TABLE} MATCH :match
    ORDER BY bm25({SQLITE_FTS_TABLE}, 1.0, 0.0), c.id
    LIMIT :limit
    """
).columns(*_RESULT_COLUMNS)

_POSTGRES_SEARCH = text(
    f"""
    SELECT c.id, c.document_id, d.title, c.ordinal, c.content,
           ts_rank(c.search_vector, q.query) AS score
    FROM kb_chunks AS c
    JOIN kb_documents AS d ON d.id = c.document_id,
         to_tsquery('{FTS_LANGUAGE}', :tsquery) AS q(query)
    WHERE c.chatbot_id = :chatbot_id AND c.search_vector @@ q.query
    ORDER BY score DESC, c.id
    LIMIT :limit
    """
).columns(*_RESULT_COLUMNS)


async def search_chunks(
    session: AsyncSession, chatbot_id: uuid.UUID, query: str, limit: int = 5
) -> list[ChunkHit]:
    """The chatbot's chunks that best match ``query`` (any text: it is reduced to plain words),
    best first: bm25 on SQLite, ts_rank on PostgreSQL. Empty when the query has no words."""
    terms = search_terms(query)
    if not terms or limit < 1:
        return []
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        result = await session.execute(
            _SQLITE_SEARCH,
            {"match": sqlite_match_expression(chatbot_id, terms), "limit": limit},
        )
    elif dialect == "postgresql":
        result = await session.execute(
            _POSTGRES_SEARCH,
            {"tsquery": postgres_tsquery(terms), "chatbot_id": chatbot_id, "limit": limit},
        )
    else:
        raise NotImplementedError(f"no full-text search for {dialect}")
    return [
        ChunkHit(
            chunk_id=int(chunk_id),
            document_id=document_id
            if isinstance(document_id, uuid.UUID)
            else uuid.UUID(document_id),
            document_title=title,
            ordinal=int(ordinal),
            content=content,
            score=float(score),
        )
        for chunk_id, document_id, title, ordinal, content, score in result
    ]
