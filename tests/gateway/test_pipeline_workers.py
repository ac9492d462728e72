"""The pipeline's workers in-process against real Redis and SQLite: the branches the end-to-end
tests do not reach (plan limits, channel routing, cross-replica fan-out, AI error handling)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ai_worker.service import AnswerProcessor
from chat_domain import (
    get_or_create_contact,
    get_or_create_conversation,
    insert_message,
    recent_messages,
    set_conversation_status,
)
from chat_domain.payloads import AIRequest, IncomingMessage, OutgoingMessage
from chat_pipeline import Runtime
from chat_pipeline.processors import IncomingProcessor, OutgoingProcessor
from devstack import RedisServer
from gateway.app import create_app
from queue_core import JobState
from tests.fakes.openai_server import FakeOpenAIServer, status

from .conftest import settings_for, visitor
from .helpers import _job, _tenant


def _incoming(t: dict[str, Any], text: str, ext: str, user: str = "4915550001") -> dict[str, Any]:
    return IncomingMessage(
        tenant_id=t["tenant"],
        chatbot_id=t["bot"],
        channel_id=t["wa"],
        channel_kind="whatsapp_cloud",
        external_user_id=user,
        text=text,
        external_message_id=ext,
        received_at=datetime.now(UTC),
    ).model_dump(mode="json")


async def test_incoming_stores_dedups_and_asks_for_an_answer_with_the_plans_priority(
    rt: Runtime,
) -> None:
    t = await _tenant(rt, price=10_000)  # >= $100/month: priority 1, weight 4
    process = IncomingProcessor(rt)
    assert await process(_job(rt.pipeline.incoming, _incoming(t, "hola", "wamid.1"))) == "queued"
    assert await process(_job(rt.pipeline.incoming, _incoming(t, "hola", "wamid.1"))) == "duplicate"
    (ai_job,) = await rt.pipeline.ai.list_jobs(JobState.DELAYED)
    assert ai_job.priority == 1 and ai_job.group and ai_job.group.startswith(str(t["tenant"]))
    request = AIRequest.model_validate(ai_job.data)
    assert request.up_to_seq == 1 and request.chatbot_id == t["bot"]
    raw = await rt.redis.hgetall(rt.pipeline.ai.keys.group_meta(ai_job.group))
    assert raw.get(b"w") == b"4", "the plan's fairness weight reaches the group"
    await rt.usage.flush()


async def test_over_the_plan_limit_the_limit_reply_is_sent_instead(rt: Runtime) -> None:
    t = await _tenant(rt, messages_per_month=1)
    process = IncomingProcessor(rt)
    assert await process(_job(rt.pipeline.incoming, _incoming(t, "one", "w.a"))) == "queued"
    await rt.usage.flush()  # the monthly count is as fresh as the last flush
    assert await process(_job(rt.pipeline.incoming, _incoming(t, "two", "w.b"))) == "limited"
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    sent = OutgoingMessage.model_validate(out.data)
    assert sent.channel_kind == "whatsapp_cloud" and "limit" in sent.text.lower()
    assert len(await rt.pipeline.ai.list_jobs(JobState.DELAYED)) == 1, "no AI job for the second"


async def test_a_human_handled_conversation_gets_no_ai_job(rt: Runtime) -> None:
    t = await _tenant(rt)
    process = IncomingProcessor(rt)
    await process(_job(rt.pipeline.incoming, _incoming(t, "first", "w.1", user="u-human")))
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=t["tenant"], channel_id=t["wa"], external_id="u-human"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=t["bot"])
        await set_conversation_status(s, conversation.id, "pending_human")
    await rt.pipeline.ai.drain(delayed=True)
    assert (
        await process(_job(rt.pipeline.incoming, _incoming(t, "second", "w.2", user="u-human")))
        == "no-bot"
    )
    assert (await rt.pipeline.ai.get_job_counts())["delayed"] == 0


async def test_outgoing_routes_whatsapp_replies_to_their_sender_queue(rt: Runtime) -> None:
    t = await _tenant(rt)
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=t["tenant"], channel_id=t["wa"], external_id="u1"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=t["bot"])
        reply = (
            await insert_message(s, conversation_id=conversation.id, role="assistant", text="hi")
        ).message
    out = OutgoingMessage(
        tenant_id=t["tenant"],
        conversation_id=conversation.id,
        message_id=reply.id,
        channel_id=t["wa"],
        channel_kind="whatsapp_cloud",
        recipient_external_id="u1",
        text="hi",
    )
    assert (
        await OutgoingProcessor(rt)(_job(rt.pipeline.outgoing, out.model_dump(mode="json")))
        == "routed"
    )
    (send,) = await rt.pipeline.whatsapp_cloud.list_jobs(JobState.WAITING)
    assert send.id == f"send:{reply.id}"
    async with rt.sessions() as s:
        assert (await recent_messages(s, conversation.id))[-1].status == "queued"


async def test_a_reply_reaches_a_socket_held_by_another_gateway_replica(
    rt: Runtime, gateway_redis: RedisServer, gateway_db: str, secret_key: str
) -> None:
    """Replica A holds the visitor's socket; the reply is published by a worker elsewhere."""
    t = await _tenant(rt)
    async with rt.sessions() as s, s.begin():
        from chat_domain import get_chatbot

        bot = await get_chatbot(s, t["bot"])
        contact = await get_or_create_contact(
            s, tenant_id=t["tenant"], channel_id=t["widget"], external_id=visitor("vis-1")
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=t["bot"])
        reply = (
            await insert_message(
                s, conversation_id=conversation.id, role="assistant", text="from another replica"
            )
        ).message
    assert bot is not None
    replica_a = create_app(settings_for(gateway_redis.url, gateway_db, secret_key))
    async with TestClient(TestServer(replica_a)) as client:
        ws = await client.ws_connect(
            f"/v1/widget/{bot.widget_public_key}/ws?visitor_id={visitor('vis-1')}"
        )
        out = OutgoingMessage(
            tenant_id=t["tenant"],
            conversation_id=conversation.id,
            message_id=reply.id,
            channel_id=t["widget"],
            channel_kind="widget",
            recipient_external_id=visitor("vis-1"),
            text=reply.text,
        )
        # the worker of "another replica" is this process's runtime: only Redis connects them
        for _ in range(50):  # the hub subscribes right after the upgrade; retry until it has
            await OutgoingProcessor(rt)(_job(rt.pipeline.outgoing, out.model_dump(mode="json")))
            try:
                message = await ws.receive(timeout=0.2)
                break
            except TimeoutError:
                continue
        frame = orjson.loads(message.data)
        assert frame["type"] == "message" and frame["message"]["text"] == "from another replica"
        await ws.close()


async def _ai_setup(rt: Runtime, fake: FakeOpenAIServer) -> tuple[dict[str, Any], AIRequest]:
    t = await _tenant(rt, provider_url=fake.base_url)
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=t["tenant"], channel_id=t["wa"], external_id="u-ai"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=t["bot"])
        msg = (
            await insert_message(
                s,
                conversation_id=conversation.id,
                role="user",
                text="question?",
                external_id="wamid.ai",
            )
        ).message
    request = AIRequest(
        tenant_id=t["tenant"],
        chatbot_id=t["bot"],
        conversation_id=conversation.id,
        up_to_message_id=msg.id,
        up_to_seq=msg.seq,
    )
    return t, request


async def test_ai_retries_on_5xx_then_sends_the_fallback_on_the_last_attempt(
    rt: Runtime, fake_model: FakeOpenAIServer
) -> None:
    _, request = await _ai_setup(rt, fake_model)
    fake_model.script(status(503), status(503))
    processor = AnswerProcessor(rt)
    try:
        from ai_worker.llm import RetryableLLMError

        with pytest.raises(RetryableLLMError):  # not the last attempt: the queue retries
            await processor(
                _job(rt.pipeline.ai, request.model_dump(mode="json"), attempts=2, made=0)
            )
        assert (
            await processor(
                _job(rt.pipeline.ai, request.model_dump(mode="json"), attempts=2, made=1)
            )
            == "fallback"
        )
    finally:
        await processor.close()
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert OutgoingMessage.model_validate(out.data).text == "FALLBACK"


async def test_ai_permanent_error_falls_back_at_once(
    rt: Runtime, fake_model: FakeOpenAIServer
) -> None:
    _, request = await _ai_setup(rt, fake_model)
    fake_model.script(status(401))
    processor = AnswerProcessor(rt)
    try:
        result = await processor(_job(rt.pipeline.ai, request.model_dump(mode="json"), attempts=3))
    finally:
        await processor.close()
    assert result == "fallback" and len(fake_model.chat_requests) == 1


async def test_ai_reply_is_committed_before_its_outgoing_job_exists(
    rt: Runtime, fake_model: FakeOpenAIServer, gateway_redis: RedisServer
) -> None:
    """An outgoing job queued inside the reply's transaction could be taken by the outgoing
    worker before the reply is visible to it (PostgreSQL) and be dropped as 'gone'."""
    import redis as sync_redis
    from sqlalchemy import event

    _, request = await _ai_setup(rt, fake_model)
    probe = sync_redis.Redis.from_url(gateway_redis.url)
    queued_at_commit: list[int] = []

    def on_commit(_conn: object) -> None:
        # what the outgoing worker could already see while the reply is not committed
        queued_at_commit.append(len(probe.keys("*outgoing-messages*:j:*")))

    event.listen(rt.engine.sync_engine, "commit", on_commit)
    processor = AnswerProcessor(rt)
    try:
        assert await processor(_job(rt.pipeline.ai, request.model_dump(mode="json"))) == (
            "answered"
        )
    finally:
        event.remove(rt.engine.sync_engine, "commit", on_commit)
        await processor.close()
        probe.close()
    assert queued_at_commit and all(n == 0 for n in queued_at_commit), queued_at_commit
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert OutgoingMessage.model_validate(out.data).text == "question?"


async def test_ai_reply_stored_by_a_killed_run_is_sent_not_answered_again(
    rt: Runtime, fake_model: FakeOpenAIServer
) -> None:
    _, request = await _ai_setup(rt, fake_model)
    async with rt.sessions() as s, s.begin():
        await insert_message(
            s,
            conversation_id=request.conversation_id,
            role="assistant",
            text="stored before the crash",
            external_id=f"ai:{request.conversation_id}:{request.up_to_seq}",
        )
    processor = AnswerProcessor(rt)
    try:
        assert await processor(_job(rt.pipeline.ai, request.model_dump(mode="json"))) == "resent"
    finally:
        await processor.close()
    assert fake_model.chat_requests == [], "no second model call"
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert OutgoingMessage.model_validate(out.data).text == "stored before the crash"


async def test_retention_runs_from_an_idempotent_daily_schedule(rt: Runtime) -> None:
    from datetime import timedelta

    from chat_domain import set_retention_days
    from chat_pipeline.processors import RetentionProcessor, schedule_maintenance

    t = await _tenant(rt)
    async with rt.sessions() as s, s.begin():
        await set_retention_days(s, t["tenant"], 7)
        contact = await get_or_create_contact(
            s, tenant_id=t["tenant"], channel_id=t["widget"], external_id="old-visitor"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=t["bot"])
        await insert_message(
            s,
            conversation_id=conversation.id,
            role="user",
            text="ancient",
            now=datetime.now(UTC) - timedelta(days=30),
        )
        await insert_message(s, conversation_id=conversation.id, role="user", text="recent")
    result = await RetentionProcessor(rt)(_job(rt.pipeline.maintenance, {}))
    assert result["messages"] >= 1
    async with rt.sessions() as s:
        assert [m.text for m in await recent_messages(s, conversation.id)] == ["recent"]
    await schedule_maintenance(rt)
    await schedule_maintenance(rt)  # every replica does this on startup
    (pending,) = await rt.pipeline.maintenance.list_jobs(JobState.DELAYED)
    assert pending.id.startswith("sch:retention:") and pending.name == "retention"
