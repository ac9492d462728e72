"""Every accepted message answered exactly once (issue 10), in-process against real Redis and
SQLite: what a reply answers is recorded explicitly, replies are never published twice, a stored
message whose job was lost is queued again by the reconciler, and best-effort side effects never
fail an answer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from ai_worker.service import AnswerProcessor
from chat_domain import (
    get_message,
    get_or_create_contact,
    get_or_create_conversation,
    insert_message,
    messages_since,
    set_conversation_status,
    store_reply,
)
from chat_domain.payloads import AIRequest, OutgoingMessage
from chat_pipeline import Runtime
from chat_pipeline.processors import IncomingProcessor, OutgoingProcessor
from chat_pipeline.reconcile import Reconciler, ReconcileResult
from devstack import RedisServer
from queue_core import DelayJob, JobState
from tests.domain.helpers import migrate
from tests.fakes.openai_server import FakeOpenAIServer, delay, echo

from .conftest import settings_for
from .helpers import _job, _tenant

VISITOR = "v-integrity"


async def _conversation(rt: Runtime, t: dict[str, Any], kind: str = "widget") -> uuid.UUID:
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=t["tenant"], channel_id=t[kind], external_id=VISITOR
        )
        return (await get_or_create_conversation(s, contact, chatbot_id=t["bot"])).id


async def _ask(rt: Runtime, conversation_id: uuid.UUID, text: str) -> Any:
    async with rt.sessions() as s, s.begin():
        return (
            await insert_message(
                s,
                conversation_id=conversation_id,
                role="user",
                text=text,
                external_id=f"q:{uuid.uuid4().hex}",
            )
        ).message


def _request(t: dict[str, Any], conversation_id: uuid.UUID, message: Any) -> dict[str, Any]:
    return AIRequest(
        tenant_id=t["tenant"],
        chatbot_id=t["bot"],
        conversation_id=conversation_id,
        up_to_message_id=message.id,
        up_to_seq=message.seq,
        request_id=uuid.uuid4(),
    ).model_dump(mode="json")


async def _transcript(rt: Runtime, conversation_id: uuid.UUID) -> list[Any]:
    async with rt.sessions() as s:
        return await messages_since(s, conversation_id)


def _prompt(request: Any) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in request.json["messages"] if m["role"] != "system"]


async def test_a_follow_up_typed_during_the_model_call_is_answered_after_the_first_answer(
    rt: Runtime, fake_model: FakeOpenAIServer
) -> None:
    """The reply to question 1 is stored after question 2 arrived (higher seq). The answer to
    question 2 must see question 1, its answer, then question 2 — not both questions again."""
    t = await _tenant(rt, provider_url=fake_model.base_url)
    conv = await _conversation(rt, t)
    q1 = await _ask(rt, conv, "Q1: opening hours?")
    fake_model.script(delay(0.5, echo("A: ")), echo("A: "))
    processor = AnswerProcessor(rt)
    try:
        first = asyncio.create_task(processor(_job(rt.pipeline.ai, _request(t, conv, q1))))
        await fake_model.wait_for_requests(1)
        q2 = await _ask(rt, conv, "Q2: and on Sunday?")  # while the model answers Q1
        assert await first == "answered"
        assert await processor(_job(rt.pipeline.ai, _request(t, conv, q2))) == "answered"
    finally:
        await processor.close()
    second_prompt = _prompt(fake_model.chat_requests[1])
    assert second_prompt[-3:] == [
        ("user", "Q1: opening hours?"),
        ("assistant", "A: Q1: opening hours?"),
        ("user", "Q2: and on Sunday?"),
    ], second_prompt
    msgs = await _transcript(rt, conv)
    replies = {m.id: m for m in msgs if m.role == "assistant"}
    assert len(replies) == 2
    q1_row, q2_row = (m for m in msgs if m.role == "user")
    assert replies[q1_row.reply_id].text == "A: Q1: opening hours?"  # type: ignore[index]
    assert replies[q2_row.reply_id].text == "A: Q2: and on Sunday?"  # type: ignore[index]


async def test_a_question_between_two_answers_is_never_counted_as_answered(
    rt: Runtime, fake_model: FakeOpenAIServer
) -> None:
    """Q2 arrives while Q1 is answered; Q3 arrives later and its (debounce-replacing) job runs:
    Q2 and Q3 are both answered (Q2 used to stay `received` forever)."""
    t = await _tenant(rt, provider_url=fake_model.base_url)
    conv = await _conversation(rt, t)
    q1 = await _ask(rt, conv, "Q1")
    fake_model.script(delay(0.5, echo("A: ")), echo("A: "))
    processor = AnswerProcessor(rt)
    try:
        first = asyncio.create_task(processor(_job(rt.pipeline.ai, _request(t, conv, q1))))
        await fake_model.wait_for_requests(1)
        await _ask(rt, conv, "Q2")
        assert await first == "answered"
        q3 = await _ask(rt, conv, "Q3")
        # Q2's job was replaced by Q3's (debounce): only Q3's runs
        assert await processor(_job(rt.pipeline.ai, _request(t, conv, q3))) == "answered"
    finally:
        await processor.close()
    msgs = await _transcript(rt, conv)
    by_text = {m.text: m for m in msgs}
    assert all(m.reply_id is not None for m in msgs if m.role == "user"), [
        (m.text, m.reply_id) for m in msgs
    ]
    # one answer for Q2 and Q3 together (the model saw both after the first answer)
    assert by_text["Q2"].reply_id == by_text["Q3"].reply_id == by_text["A: Q3"].id
    assert [m.text for m in msgs if m.role == "assistant"] == ["A: Q1", "A: Q3"]


async def test_overlapping_answer_runs_answer_each_question_once(
    rt: Runtime, fake_model: FakeOpenAIServer
) -> None:
    """Two runs for the same questions at once (a stale lease and its takeover): one reply is
    stored; the other run stores nothing and steps aside without using an attempt."""
    t = await _tenant(rt, provider_url=fake_model.base_url)
    conv = await _conversation(rt, t)
    q = await _ask(rt, conv, "only once please")
    fake_model.script(delay(0.3, echo("A: ")), delay(0.3, echo("A: ")))
    processor = AnswerProcessor(rt)
    try:
        runs = await asyncio.gather(
            processor(_job(rt.pipeline.ai, _request(t, conv, q))),
            processor(_job(rt.pipeline.ai, _request(t, conv, q))),
            return_exceptions=True,
        )
    finally:
        await processor.close()
    assert sorted(type(r).__name__ for r in runs) == ["DelayJob", "str"], runs
    assert [r for r in runs if isinstance(r, str)] == ["answered"]
    assert isinstance(next(r for r in runs if not isinstance(r, str)), DelayJob)
    assert [m.role for m in await _transcript(rt, conv)] == ["user", "assistant"]


async def test_a_reply_stored_before_an_agent_took_over_is_still_delivered(
    rt: Runtime, fake_model: FakeOpenAIServer
) -> None:
    t = await _tenant(rt, provider_url=fake_model.base_url)
    conv = await _conversation(rt, t, "wa")
    q = await _ask(rt, conv, "hello")
    data = _request(t, conv, q)
    async with rt.sessions() as s, s.begin():
        # the run stored its answer and died; then an agent took the conversation
        await store_reply(
            s,
            conversation_id=conv,
            answers=[q.id],
            text="stored just before",
            external_id=f"ai:{data['request_id']}",
        )
        await set_conversation_status(s, conv, "pending_human")
    processor = AnswerProcessor(rt)
    try:
        assert await processor(_job(rt.pipeline.ai, data)) == "resent"
    finally:
        await processor.close()
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert OutgoingMessage.model_validate(out.data).text == "stored just before"
    assert fake_model.chat_requests == []


async def test_a_live_update_that_cannot_be_published_does_not_fail_the_answer(
    rt: Runtime, fake_model: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis refusing the typing indicator right after the model answered used to throw the
    answer away and use up an attempt."""
    t = await _tenant(rt, provider_url=fake_model.base_url)
    conv = await _conversation(rt, t)
    q = await _ask(rt, conv, "are you there?")
    fake_model.script(echo("A: "))

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Redis is restarting")

    monkeypatch.setattr(rt.redis, "publish", refused)
    processor = AnswerProcessor(rt)
    try:
        assert await processor(_job(rt.pipeline.ai, _request(t, conv, q))) == "answered"
    finally:
        await processor.close()
    assert [m.text for m in await _transcript(rt, conv)] == ["are you there?", "A: are you there?"]


async def test_a_sent_reply_is_never_published_again(rt: Runtime) -> None:
    """Job-id dedup ends with retention: a later run for the same reply (a retry, a requeue)
    must find it sent in the database and publish nothing."""
    t = await _tenant(rt)
    conv = await _conversation(rt, t)
    async with rt.sessions() as s, s.begin():
        reply = (
            await insert_message(s, conversation_id=conv, role="assistant", text="once")
        ).message
    out = OutgoingMessage(
        tenant_id=t["tenant"],
        conversation_id=conv,
        message_id=reply.id,
        channel_id=t["widget"],
        channel_kind="widget",
        recipient_external_id=VISITOR,
        text="once",
    ).model_dump(mode="json")
    channel = f"live:{t['widget']}:{VISITOR}"
    pubsub = rt.redis.pubsub()
    await pubsub.subscribe(channel)
    try:
        processor = OutgoingProcessor(rt)
        assert await processor(_job(rt.pipeline.outgoing, out)) == "published"
        assert await processor(_job(rt.pipeline.outgoing, out)) == "already-sent"
        await rt.redis.publish(channel, orjson.dumps({"type": "end"}))  # after anything else
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while not frames or frames[-1]["type"] != "end":
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    frames.append(orjson.loads(message["data"]))
    finally:
        await pubsub.aclose()
    assert [f["message"]["id"] for f in frames if f["type"] == "message"] == [str(reply.id)]
    async with rt.sessions() as s:
        stored = await get_message(s, reply.id)
    assert stored is not None and stored.status == "sent"


# -- the reconciler: the database is the outbox --------------------------------------------------


@pytest.fixture
async def own_rt(
    gateway_redis: RedisServer, secret_key: str, tmp_path: Path
) -> AsyncIterator[Runtime]:
    """A runtime on a database of its own: the reconciler scans every tenant's messages."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
    await migrate(url, "upgrade", "head")
    runtime = await Runtime.start(settings_for(gateway_redis.url, url, secret_key))
    yield runtime
    await runtime.redis.flushdb()
    await runtime.close()


def _quick(rt: Runtime) -> Reconciler:
    settings = replace(rt.settings, reconcile_after_ms=60_000, reconcile_max_requeues=2)
    return Reconciler(replace(rt, settings=settings))


def _later(reconciler: Reconciler, seconds: float) -> None:
    """Move the reconciler's clock on (a minute is its `after` here)."""
    earlier = reconciler.clock
    reconciler.clock = lambda: earlier() + timedelta(seconds=seconds)


async def test_a_stored_question_whose_jobs_were_lost_is_queued_again_then_falls_back(
    own_rt: Runtime,
) -> None:
    """A message was accepted (stored) and its job never ran (Redis lost it). The reconciler
    queues it again under a new job id each time it is due; after the last requeue the
    question gets the fallback reply: answered or explicitly failed, never silent."""
    rt = own_rt
    t = await _tenant(rt)
    conv = await _conversation(rt, t)
    q = await _ask(rt, conv, "anyone?")
    reconciler = _quick(rt)
    assert (await reconciler.run_once(lock=False)).questions_requeued == 0  # not due yet
    _later(reconciler, 90)
    assert (await reconciler.run_once(lock=False)).questions_requeued == 1
    assert await rt.pipeline.incoming.get_state(f"in:{q.id}:1") is JobState.WAITING
    # run the requeued job: the message enters the pipeline again
    (job,) = await rt.pipeline.incoming.list_jobs(JobState.WAITING)
    assert await IncomingProcessor(rt)(job) == "queued"
    await rt.redis.flushdb()  # ...and Redis loses that job too
    _later(reconciler, 150)  # due again only after twice `after`
    assert (await reconciler.run_once(lock=False)).questions_requeued == 1
    await rt.redis.flushdb()
    _later(reconciler, 210)
    result = await reconciler.run_once(lock=False)
    assert result.fallbacks == 1 and result.questions_requeued == 0
    msgs = await _transcript(rt, conv)
    assert [(m.role, m.text) for m in msgs] == [("user", "anyone?"), ("assistant", "FALLBACK")]
    assert msgs[0].reply_id == msgs[1].id
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert OutgoingMessage.model_validate(out.data).text == "FALLBACK"
    assert await OutgoingProcessor(rt)(out) == "published"
    assert (await reconciler.run_once(lock=False)) == ReconcileResult(), "nothing owed any more"


async def test_a_stored_reply_that_was_never_handed_on_is_queued_again_then_failed(
    own_rt: Runtime,
) -> None:
    rt = own_rt
    t = await _tenant(rt)
    conv = await _conversation(rt, t)
    q = await _ask(rt, conv, "hi")
    async with rt.sessions() as s, s.begin():
        reply = (
            await store_reply(
                s, conversation_id=conv, answers=[q.id], text="hello", external_id="ai:lost"
            )
        ).message
    reconciler = _quick(rt)
    _later(reconciler, 90)
    assert (await reconciler.run_once(lock=False)).replies_requeued == 1
    assert await rt.pipeline.outgoing.get_state(f"out:{reply.id}:1") is JobState.WAITING
    # it is handed on: nothing owed
    (job,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert await OutgoingProcessor(rt)(job) == "published"
    _later(reconciler, 150)
    assert (await reconciler.run_once(lock=False)).replies_requeued == 0
    # a reply that can never be handed on is marked failed after the last requeue
    async with rt.sessions() as s, s.begin():
        stuck = (
            await insert_message(s, conversation_id=conv, role="assistant", text="stuck")
        ).message
    for seconds in (90, 150, 210):
        await rt.redis.flushdb()
        _later(reconciler, seconds)
        await reconciler.run_once(lock=False)
    async with rt.sessions() as s:
        final = await get_message(s, stuck.id)
    assert final is not None and final.status == "failed" and final.error_code == "undeliverable"


async def test_a_reply_waiting_in_its_send_queue_is_neither_requeued_nor_failed(
    own_rt: Runtime,
) -> None:
    """A WhatsApp reply handed to its channel's send queue waits there (a stopped channel parks
    it for as long as the token stays expired; a backlog behind the per-number rate). It is
    not owed: the reconciler used to queue it again every `after` and then mark it failed,
    after which the resumed channel skipped it as already done: lost."""
    rt = own_rt
    t = await _tenant(rt)
    conv = await _conversation(rt, t, kind="wa")
    q = await _ask(rt, conv, "hi")
    async with rt.sessions() as s, s.begin():
        reply = (
            await store_reply(
                s, conversation_id=conv, answers=[q.id], text="hello", external_id="ai:wait"
            )
        ).message
    await rt.pipeline.enqueue_outgoing(
        OutgoingMessage(
            tenant_id=t["tenant"], conversation_id=conv, message_id=reply.id,
            channel_id=t["wa"], channel_kind="whatsapp_cloud", recipient_external_id=VISITOR,
            text="hello",
        ),
        await _priority(rt, t),
    )  # fmt: skip
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert await OutgoingProcessor(rt)(out) == "routed"
    await rt.pipeline.outgoing.remove(out.id)
    reconciler = _quick(rt)
    for seconds in (90, 150, 210, 3600):
        _later(reconciler, seconds)
        result = await reconciler.run_once(lock=False)
        assert result.replies_requeued == 0 and result.replies_failed == 0, seconds
    async with rt.sessions() as s:
        assert (await get_message(s, reply.id)).status == "queued"  # type: ignore[union-attr]
    # the send job is gone for real (Redis lost it): now it is owed
    await rt.redis.flushdb()
    assert (await reconciler.run_once(lock=False)).replies_requeued == 1


async def _priority(rt: Runtime, t: dict[str, Any]) -> Any:
    from chat_domain import get_queue_priority

    async with rt.sessions() as s:
        return await get_queue_priority(s, t["tenant"])


async def test_one_process_reconciles_per_interval(rt: Runtime) -> None:
    a, b = Reconciler(rt), Reconciler(rt)
    assert not (await a.run_once()).skipped
    assert (await b.run_once()).skipped


async def test_an_answer_job_that_failed_for_good_ends_in_the_fallback_reply(rt: Runtime) -> None:
    """An answer job whose worker died more than QUEUE_MAX_STALLS times is dead-lettered; its
    questions get the fallback reply at once (they used to get nothing)."""
    from ai_worker.service import DeadLetterProcessor

    t = await _tenant(rt)
    conv = await _conversation(rt, t)
    q = await _ask(rt, conv, "poison?")
    dead = rt.pipeline.ai.dead_letter_queue()
    job = _job(dead, _request(t, conv, q))
    assert await DeadLetterProcessor(rt)(job) == "fallback"
    assert await DeadLetterProcessor(rt)(job) == "answered", "once"
    msgs = await _transcript(rt, conv)
    assert [(m.role, m.text) for m in msgs] == [("user", "poison?"), ("assistant", "FALLBACK")]
    assert msgs[0].reply_id == msgs[1].id
    (out,) = await rt.pipeline.outgoing.list_jobs(JobState.WAITING)
    assert OutgoingMessage.model_validate(out.data).text == "FALLBACK"


async def test_a_question_stored_while_the_answer_is_prepared_is_not_in_its_prompt(
    rt: Runtime, fake_model: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer claims the questions it read as unanswered; a question committed just after
    that read must not reach the prompt (the model would answer it, and so would the next
    job: the chaos run saw it)."""
    import ai_worker.service as service
    from chat_domain import create_engine, create_session_factory

    t = await _tenant(rt, provider_url=fake_model.base_url)
    conv = await _conversation(rt, t)
    q1 = await _ask(rt, conv, "Q1")
    real = service.unanswered_messages
    other = create_engine(rt.settings.db)  # another process's connection

    async def then_another_arrives(session: Any, conversation_id: uuid.UUID) -> Any:
        pending = await real(session, conversation_id)
        async with create_session_factory(other)() as s, s.begin():
            await insert_message(s, conversation_id=conv, role="user", text="Q2")
        return pending

    monkeypatch.setattr(service, "unanswered_messages", then_another_arrives)
    fake_model.script(echo("A: "))
    processor = AnswerProcessor(rt)
    try:
        assert await processor(_job(rt.pipeline.ai, _request(t, conv, q1))) == "answered"
    finally:
        await processor.close()
        await other.dispose()
    assert [c for r, c in _prompt(fake_model.chat_requests[0]) if r == "user"] == ["Q1"]


# -- a dependency that is down: 503 before storing, 202 once stored ------------------------------


async def _stored_for(db_url: str, visitor_id: str) -> list[Any]:
    from sqlalchemy import select

    from chat_domain import create_engine, create_session_factory
    from chat_domain.models import Message

    engine = create_engine(db_url)
    try:
        async with create_session_factory(engine)() as s:
            rows = await s.scalars(
                select(Message).where(Message.external_id.like(f"{visitor_id}:%"))
            )
            return list(rows)
    finally:
        await engine.dispose()


async def test_a_post_while_redis_is_down_is_a_503_and_stores_nothing(
    gateway_db: str, secret_key: str, bots: Any
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from devstack import free_port
    from gateway.app import create_app

    from .conftest import visitor

    app = create_app(settings_for(f"redis://127.0.0.1:{free_port()}/0", gateway_db, secret_key))
    who = visitor("redis-down")
    async with TestClient(TestServer(app)) as client:
        r = await client.post(
            f"/v1/widget/{bots.plain}/messages",
            json={"visitor_id": who, "text": "hello?", "client_message_id": "c1"},
        )
        assert r.status == 503, await r.text()
        assert r.headers["Retry-After"] == "2"
        assert (await r.json())["error"]["code"] == "unavailable"
    assert await _stored_for(gateway_db, who) == []


async def test_a_message_stored_before_queueing_failed_is_accepted(
    gateway_redis: RedisServer, gateway_db: str, secret_key: str, bots: Any
) -> None:
    """Redis fails after the message is stored: the visitor gets 202 (the reconciler queues
    it), never a 500 that the widget would retry into a duplicate question."""
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.app import create_app
    from gateway.keys import runtime_key
    from tests.queue_core.helpers import Faults

    from .conftest import visitor

    app = create_app(settings_for(gateway_redis.url, gateway_db, secret_key))
    who = visitor("queueing-fails")
    async with TestClient(TestServer(app)) as client:
        with Faults(app[runtime_key].redis, "add_jobs") as faults:
            faults.always = ConnectionError("Redis went away")
            r = await client.post(
                f"/v1/widget/{bots.plain}/messages",
                json={"visitor_id": who, "text": "still there?", "client_message_id": "c1"},
            )
        assert r.status == 202, await r.text()
        assert faults.raised >= 1
    (stored,) = await _stored_for(gateway_db, who)
    assert stored.status == "received" and stored.reply_id is None
