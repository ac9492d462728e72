"""The message path end to end over real processes: widget API -> incoming-messages ->
ai-processing (fake OpenAI-compatible server) -> outgoing-messages -> the visitor's WebSocket."""

from __future__ import annotations

import asyncio
import uuid

from chat_domain import create_engine, create_session_factory, set_conversation_status
from chat_domain.models.bots import DEFAULT_FALLBACK_REPLY
from devstack.platform import Platform
from queue_core import JobState, Queue, connect
from tests.platform_fixtures import FakeLLM

from .client import WidgetClient, assistant


def _visitor() -> str:
    return str(uuid.uuid4())  # the widget's random visitor id


async def _ai_idle(platform: Platform) -> None:
    """Wait until no AI job is pending or running (so 'no further reply' can be asserted)."""
    redis = connect(platform.redis_url)
    queue = Queue("ai-processing", redis)
    try:
        async with asyncio.timeout(20):
            while True:
                c = await queue.get_job_counts()
                if c["waiting"] + c["delayed"] + c["active"] + c["prioritized"] == 0:
                    return
                await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


async def test_reply_arrives_on_the_websocket(widget: WidgetClient, fake_llm: FakeLLM) -> None:
    visitor = _visitor()
    async with widget.socket(visitor) as live:
        status, answer = await widget.post(visitor, "Do you ship to Norway?")
        assert status == 202 and answer["status"] == "received"
        await live.wait_for(lambda f: f == {"type": "typing", "on": True})
        frame = await live.wait_for(assistant)
        assert frame["message"]["text"] == "bot: Do you ship to Norway?"
        assert frame["conversation_id"] == answer["conversation_id"]
        await live.ack(frame["message"]["id"])
        await live.wait_for(lambda f: f.get("type") == "status" and f["status"] == "delivered")
    messages = await widget.wait_messages(visitor, lambda ms: len(ms) == 2)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["status"] == "delivered"
    request = fake_llm.requests()[-1]
    assert request["headers"]["authorization"] == "Bearer test-key"
    assert request["json"]["messages"][0]["role"] == "system"


async def test_a_failing_model_yields_the_fallback_reply(
    widget: WidgetClient, fake_llm: FakeLLM
) -> None:
    visitor = _visitor()
    before = len(fake_llm.requests())
    # AI_ATTEMPTS=2: both attempts fail, then the chatbot's fallback reply is sent
    fake_llm.script({"kind": "status", "status": 500}, {"kind": "status", "status": 503})
    async with widget.socket(visitor) as live:
        await widget.post(visitor, "What is your phone number?")
        frame = await live.wait_for(assistant)
    assert frame["message"]["text"] == DEFAULT_FALLBACK_REPLY
    assert len(fake_llm.requests()) - before == 2, "one call per attempt, no hidden retries"


async def test_two_quick_messages_are_answered_once_in_order(
    widget: WidgetClient, fake_llm: FakeLLM, platform: Platform
) -> None:
    visitor = _visitor()
    before = len(fake_llm.requests())
    await widget.post(visitor, "Hi!")
    await widget.post(visitor, "Are you open on Sunday?")
    messages = await widget.wait_messages(
        visitor, lambda ms: any(m["role"] == "assistant" for m in ms)
    )
    await _ai_idle(platform)
    messages = (await widget.messages(visitor))["messages"]
    assert [m["role"] for m in messages] == ["user", "user", "assistant"], messages
    calls = fake_llm.requests()[before:]
    assert len(calls) == 1, "the burst was coalesced into one model call"
    users = [m["content"] for m in calls[0]["json"]["messages"] if m["role"] == "user"]
    assert users[-2:] == ["Hi!", "Are you open on Sunday?"]


async def test_a_duplicate_client_message_id_is_answered_once(
    widget: WidgetClient, platform: Platform
) -> None:
    visitor = _visitor()
    first = await widget.post(visitor, "Where is my order?", client_message_id="order-q-1")
    second = await widget.post(visitor, "Where is my order?", client_message_id="order-q-1")
    assert first[1]["message_id"] == second[1]["message_id"]
    await widget.wait_messages(visitor, lambda ms: any(m["role"] == "assistant" for m in ms))
    await _ai_idle(platform)
    roles = [m["role"] for m in (await widget.messages(visitor))["messages"]]
    assert roles == ["user", "assistant"]


async def test_a_conversation_handed_to_a_human_gets_no_bot_reply(
    widget: WidgetClient, platform: Platform
) -> None:
    visitor = _visitor()
    _, first = await widget.post(visitor, "I want to talk to a person")
    await widget.wait_messages(visitor, lambda ms: len(ms) == 2)
    engine = create_engine(platform.database_url)
    try:
        async with create_session_factory(engine)() as session, session.begin():
            await set_conversation_status(
                session, uuid.UUID(first["conversation_id"]), "pending_human"
            )
    finally:
        await engine.dispose()
    _, second = await widget.post(visitor, "Hello? Anyone?", client_message_id="human-1")
    redis = connect(platform.redis_url)
    try:
        incoming = Queue("incoming-messages", redis)
        job_id = f"in:{second['message_id']}:0"
        assert await incoming.wait_until_finished(job_id, 10) == "no-bot"
    finally:
        await redis.aclose()
    await _ai_idle(platform)
    roles = [m["role"] for m in (await widget.messages(visitor))["messages"]]
    assert roles == ["user", "assistant", "user"], "the bot stayed silent"
    assert second["conversation_id"] == first["conversation_id"]


async def test_killing_the_ai_worker_mid_job_still_yields_exactly_one_reply(
    widget: WidgetClient, fake_llm: FakeLLM, platform: Platform
) -> None:
    visitor = _visitor()
    before = len(fake_llm.requests())
    fake_llm.script({"kind": "delay", "seconds": 30})  # the first call hangs: the worker is mid-job
    await widget.post(visitor, "Tell me about the subscription")
    async with asyncio.timeout(15):
        while len(fake_llm.requests()) == before:
            await asyncio.sleep(0.05)
    platform.kill_service("ai-worker")
    platform.start_service("ai-worker")
    await widget.wait_messages(
        visitor, lambda ms: any(m["role"] == "assistant" for m in ms), timeout=20
    )
    await _ai_idle(platform)
    page = await widget.messages(visitor)
    replies = [m for m in page["messages"] if m["role"] == "assistant"]
    assert len(replies) == 1, page["messages"]
    assert replies[0]["text"] == "bot: Tell me about the subscription"
    redis = connect(platform.redis_url)
    try:
        ai = Queue("ai-processing", redis)
        jobs = [
            j
            for j in await ai.list_jobs(JobState.COMPLETED, 0, 500)
            if j.data["conversation_id"] == page["conversation_id"]
        ]
    finally:
        await redis.aclose()
    assert [j.stalled_count for j in jobs] == [1], "recovered from the killed worker, run once more"


async def test_data_survives_a_platform_restart(widget: WidgetClient, platform: Platform) -> None:
    visitor = _visitor()
    await widget.post(visitor, "Remember me?")
    await widget.wait_messages(visitor, lambda ms: len(ms) == 2)
    for name in ("gateway", "ai-worker"):
        platform.stop_service(name)
    assert platform.redis is not None
    platform.redis.restart()  # AOF: the queue state survives, as the data directory does
    for name in ("gateway", "ai-worker"):
        platform.start_service(name)
    platform.wait_ready()
    messages = (await widget.messages(visitor))["messages"]
    assert next(m["text"] for m in messages) == "Remember me?"
    status, _ = await widget.post(visitor, "Still there?")
    assert status == 202
    await widget.wait_messages(visitor, lambda ms: len(ms) == 4)
