"""Handoff to the tenant's people: a user who asks for one, and a bot that keeps failing. The AI
worker's processor against the fake model, real Redis and SQLite."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ai_worker.service import AnswerProcessor
from chat_domain import get_conversation, update_chatbot
from chat_domain.models.bots import DEFAULT_HANDOFF_REPLY
from chat_pipeline import Runtime
from chat_pipeline.handoff import asks_for_a_person
from queue_core import JobState
from tests.fakes.openai_server import FakeOpenAIServer, echo, status

from .helpers import _job, _tenant
from .test_message_integrity import _ask, _conversation, _request, _transcript

PHRASES = ("human", "agent", "a person", "real person")


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("human", True),
        ("HUMAN!!", True),
        ("Can I talk to a real person?", True),
        ("agent please", True),
        ("Is the agent discount still on for orders over 50 euros?", False),
        ("humane treatment of animals", False),
        ("", False),
        ("🙂", False),
    ],
)
def test_a_short_request_for_a_person_is_recognised(text: str, wanted: bool) -> None:
    assert asks_for_a_person(text, PHRASES) is wanted


async def test_asking_for_a_person_hands_over_without_asking_the_model(
    rt: Runtime, fake_model: FakeOpenAIServer
) -> None:
    t = await _tenant(rt, provider_url=fake_model.base_url)
    conv = await _conversation(rt, t)
    q = await _ask(rt, conv, "Can I talk to a human?")
    processor = AnswerProcessor(rt)
    try:
        assert await processor(_job(rt.pipeline.ai, _request(t, conv, q))) == "handoff"
    finally:
        await processor.close()
    assert fake_model.chat_requests == []
    msgs = await _transcript(rt, conv)
    assert [(m.role, m.text) for m in msgs] == [
        ("user", "Can I talk to a human?"),
        ("assistant", DEFAULT_HANDOFF_REPLY),
    ]
    assert msgs[0].reply_id == msgs[1].id
    async with rt.sessions() as s:
        assert (await get_conversation(s, conv)).status == "pending_human"  # type: ignore[union-attr]
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert out.data["text"] == DEFAULT_HANDOFF_REPLY


async def test_a_chatbot_with_no_phrases_keeps_answering(
    rt: Runtime, fake_model: FakeOpenAIServer
) -> None:
    t = await _tenant(rt, provider_url=fake_model.base_url)
    async with rt.sessions() as s, s.begin():
        await update_chatbot(s, t["bot"], handoff_phrases=[])
    conv = await _conversation(rt, t)
    q = await _ask(rt, conv, "human")
    fake_model.script(echo("bot: "))
    processor = AnswerProcessor(rt)
    try:
        assert await processor(_job(rt.pipeline.ai, _request(t, conv, q))) == "answered"
    finally:
        await processor.close()


@pytest.mark.parametrize("after", [2, 0])
async def test_a_bot_that_keeps_failing_hands_over(
    rt: Runtime, fake_model: FakeOpenAIServer, after: int
) -> None:
    """Two fallback replies in a row (HANDOFF_AFTER_FAILURES=2): the second is the handoff
    reply and a person gets the conversation. 0 turns it off."""
    rt = replace(rt, settings=replace(rt.settings, handoff_after_failures=after))
    t = await _tenant(rt, provider_url=fake_model.base_url)
    conv = await _conversation(rt, t)
    processor = AnswerProcessor(rt)
    outcomes = []
    try:
        for text in ("first?", "second?", "third?"):
            fake_model.script(status(400, message="bad request"))  # a permanent refusal: no retry
            q = await _ask(rt, conv, text)
            outcomes.append(await processor(_job(rt.pipeline.ai, _request(t, conv, q))))
            if outcomes[-1] == "handoff":
                break
    finally:
        await processor.close()
    replies = [m.text for m in await _transcript(rt, conv) if m.role == "assistant"]
    async with rt.sessions() as s:
        status_now = (await get_conversation(s, conv)).status  # type: ignore[union-attr]
    if after:
        assert outcomes == ["fallback", "handoff"]
        assert replies == ["FALLBACK", DEFAULT_HANDOFF_REPLY] and status_now == "pending_human"
    else:
        assert outcomes == ["fallback"] * 3 and status_now == "open"
