from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import chunk_text, delete_document, ingest_document, search_chunks
from chat_domain.kb import search_terms
from tests.domain.helpers import World

HOSTILE_QUERIES = [
    '"',
    '""',
    "'",
    "AND",
    "OR",
    "NOT",
    "a AND",
    "AND OR NOT",
    "*",
    "refund*",
    ":",
    "content:refund",
    "chatbot_id:abc",
    "{content chatbot_id}:refund",
    "NEAR(refund policy, 2)",
    "(",
    ")",
    "refund)",
    "^refund",
    "-refund",
    "refund & | ! <->",
    "'refund':*",
    "\\",
    "%_",
    "\x00",
    "",
    "   ",
    "😀 emoji",
    "x" * 5000,
    " ".join(f"w{i}" for i in range(500)),
]


def test_chunks_are_bounded_and_keep_every_word() -> None:
    paragraph = "Sentence number {i} talks about refunds and shipping. " * 3
    text = "\n\n".join(paragraph.format(i=i) for i in range(40))
    text += "\n\n" + "supercalifragilistic" * 30  # one word longer than a chunk
    chunks = chunk_text(text, max_chars=300)
    assert len(chunks) > 10
    assert all(0 < len(chunk) <= 300 for chunk in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())


def test_short_text_is_one_chunk_and_empty_text_none() -> None:
    assert chunk_text("Hello.\n\nWorld.") == ["Hello.\n\nWorld."]
    assert chunk_text("  \n\n ") == []
    with pytest.raises(ValueError, match="positive"):
        chunk_text("x", max_chars=0)


def test_search_terms_strip_syntax() -> None:
    assert search_terms('"Refund" AND policy:* (NEAR)') == ["refund", "and", "policy", "near"]
    assert search_terms("\"'*:^-()") == []


async def test_more_relevant_chunk_ranks_first(
    session_factory: async_sessionmaker[AsyncSession], world: World, other_world: World
) -> None:
    async with session_factory() as session, session.begin():
        await ingest_document(
            session,
            chatbot_id=world.chatbot.id,
            title="Shipping",
            text="Shipping takes five days. Tracking numbers arrive by email.",
        )
        policy = await ingest_document(
            session,
            chatbot_id=world.chatbot.id,
            title="Refunds",
            text="Our refund policy: a refund needs the receipt. Refund requests take a week.",
        )
        await ingest_document(
            session,
            chatbot_id=world.chatbot.id,
            title="Mentions",
            text="See the refund page for anything else about orders and shipping.",
        )
        # Another tenant's chatbot with the perfect match must never be returned.
        await ingest_document(
            session,
            chatbot_id=other_world.chatbot.id,
            title="Other",
            text="refund policy receipt refund policy receipt",
        )
    async with session_factory() as session:
        hits = await search_chunks(session, world.chatbot.id, "refund policy receipt?", limit=5)
        assert [hit.document_title for hit in hits] == ["Refunds", "Mentions"]
        assert hits[0].document_id == policy.id
        assert hits[0].score > hits[1].score
        assert "receipt" in hits[0].content
        assert await search_chunks(session, world.chatbot.id, "tracking", limit=5)
        assert await search_chunks(session, world.chatbot.id, "nonexistentword") == []
        limited = await search_chunks(session, world.chatbot.id, "refund shipping", limit=1)
        assert len(limited) == 1


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
async def test_hostile_queries_do_not_error(
    session: AsyncSession, world: World, query: str
) -> None:
    await ingest_document(
        session,
        chatbot_id=world.chatbot.id,
        title="Policy",
        text="refund policy AND NOT near: the * receipt (w1) w2 content chatbot_id",
    )
    await session.flush()
    hits = await search_chunks(session, world.chatbot.id, query)
    assert isinstance(hits, list)
    if search_terms(query) and search_terms(query)[0] in {"refund", "and", "w0", "content"}:
        assert hits, "a query with a matching word finds the chunk"


async def test_deleted_document_leaves_the_index(
    session_factory: async_sessionmaker[AsyncSession], world: World
) -> None:
    async with session_factory() as session, session.begin():
        doc = await ingest_document(
            session, chatbot_id=world.chatbot.id, title="Temp", text="ephemeral zebra facts"
        )
        assert doc.chunk_count == 1
    async with session_factory() as session, session.begin():
        assert [h.document_id for h in await search_chunks(session, world.chatbot.id, "zebra")] == [
            doc.id
        ]
        assert await delete_document(session, doc.id)
    async with session_factory() as session:
        assert await search_chunks(session, world.chatbot.id, "zebra") == []
