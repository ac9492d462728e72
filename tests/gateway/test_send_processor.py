"""The one send processor (chat_pipeline.send) with a scripted Sender, against real Redis and
SQLite: what the database says, the channel gate (circuit, holds, rate) and every typed
failure of the channel seam."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from chat_domain import (
    WhatsAppCloudSecrets,
    get_message,
    get_or_create_contact,
    get_or_create_conversation,
    insert_message,
    update_channel,
    update_delivery_status,
)
from chat_domain.payloads import OutgoingMessage
from chat_pipeline import Runtime
from chat_pipeline.channels.base import (
    ChannelFatalError,
    OutboundText,
    PermanentSendError,
    RetryableSendError,
    SendResult,
    ThrottledError,
)
from chat_pipeline.send import SendProcessor
from queue_core import DelayJob, GroupRateLimitError, JobState

from .helpers import _job, _tenant


class ScriptedSender:
    """A Sender whose next outcomes are scripted: an exception to raise, or ids to return."""

    def __init__(self) -> None:
        self.outcomes: list[Any] = []
        self.sent: list[OutboundText] = []
        self.closed = False

    async def send_text(self, message: OutboundText) -> SendResult:
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, BaseException):
            raise outcome
        self.sent.append(message)
        return SendResult(outcome or (f"wamid.{len(self.sent)}",))

    async def aclose(self) -> None:
        self.closed = True


async def _reply(rt: Runtime, t: dict[str, Any], text: str = "hello") -> dict[str, Any]:
    async with rt.sessions() as s, s.begin():
        contact = await get_or_create_contact(
            s, tenant_id=t["tenant"], channel_id=t["wa"], external_id="4915550001"
        )
        conversation = await get_or_create_conversation(s, contact, chatbot_id=t["bot"])
        reply = (
            await insert_message(s, conversation_id=conversation.id, role="assistant", text=text)
        ).message
    return OutgoingMessage(
        tenant_id=t["tenant"],
        conversation_id=conversation.id,
        message_id=reply.id,
        channel_id=t["wa"],
        channel_kind="whatsapp_cloud",
        recipient_external_id="4915550001",
        text=text,
    ).model_dump(mode="json")


async def _status(rt: Runtime, message_id: str) -> Any:
    async with rt.sessions() as s:
        return await get_message(s, uuid.UUID(message_id))


@pytest.fixture
def sender() -> ScriptedSender:
    return ScriptedSender()


def _processor(rt: Runtime, sender: ScriptedSender, **kw: Any) -> SendProcessor:
    return SendProcessor(rt, lambda channel, secrets, runtime: sender, **kw)


async def test_a_sent_reply_records_its_id_and_is_never_sent_again(
    rt: Runtime, sender: ScriptedSender
) -> None:
    t = await _tenant(rt)
    out = await _reply(rt, t)
    process = _processor(rt, sender)
    assert await process(_job(rt.pipeline.whatsapp_cloud, out)) == "sent"
    stored = await _status(rt, out["message_id"])
    assert stored.status == "sent" and stored.provider_id == "wamid.1"
    assert await process(_job(rt.pipeline.whatsapp_cloud, out)) == "already-sent"
    assert len(sender.sent) == 1
    await process.close()
    assert sender.closed


async def test_a_status_webhook_before_the_send_returns_means_it_went_out(
    rt: Runtime, sender: ScriptedSender
) -> None:
    t = await _tenant(rt)
    out = await _reply(rt, t)
    async with rt.sessions() as s, s.begin():
        await update_delivery_status(s, uuid.UUID(out["message_id"]), "delivered")
    assert await _processor(rt, sender)(_job(rt.pipeline.whatsapp_cloud, out)) == "already-sent"
    assert sender.sent == []


async def test_an_ambiguous_failure_is_not_retried_once_a_status_shows_it_went_out(
    rt: Runtime, sender: ScriptedSender
) -> None:
    t = await _tenant(rt)
    out = await _reply(rt, t)
    process = _processor(rt, sender)

    class TimedOutAfterSending(RetryableSendError):
        pass

    async def status_arrives_then_timeout(message: OutboundText) -> SendResult:
        async with rt.sessions() as s, s.begin():  # the status webhook, meanwhile
            await update_delivery_status(s, message.message_id, "sent")
        raise TimedOutAfterSending("timed out", ambiguous=True)

    sender.send_text = status_arrives_then_timeout  # type: ignore[method-assign]
    assert await process(_job(rt.pipeline.whatsapp_cloud, out)) == "sent"
    # not ambiguous (refused before sending): retried by the queue
    out2 = await _reply(rt, t, "again")
    sender.send_text = ScriptedSender.send_text.__get__(sender)  # type: ignore[method-assign]
    sender.outcomes = [RetryableSendError("connect refused")]
    with pytest.raises(RetryableSendError):
        await process(_job(rt.pipeline.whatsapp_cloud, out2))


async def test_a_throttled_channel_holds_every_send_of_it(
    rt: Runtime, sender: ScriptedSender
) -> None:
    t = await _tenant(rt)
    first, second = await _reply(rt, t, "one"), await _reply(rt, t, "two")
    process = _processor(rt, sender)
    sender.outcomes = [ThrottledError("slow down", code="130429", delay_s=2)]
    with pytest.raises(DelayJob) as held:
        await process(_job(rt.pipeline.whatsapp_cloud, first))
    assert 0 < held.value.delay_ms <= 2000
    with pytest.raises(DelayJob):  # the other message of the channel waits too, unsent
        await process(_job(rt.pipeline.whatsapp_cloud, second))
    assert sender.sent == []


async def test_a_recipient_throttle_holds_only_that_conversation(
    rt: Runtime, sender: ScriptedSender
) -> None:
    t = await _tenant(rt)
    out = await _reply(rt, t)
    sender.outcomes = [ThrottledError("pair rate", code="131056", delay_s=6, scope="recipient")]
    with pytest.raises(GroupRateLimitError) as held:
        await _processor(rt, sender)(_job(rt.pipeline.whatsapp_cloud, out))
    assert held.value.delay_ms == 6000


async def test_a_permanent_failure_marks_the_message_failed_with_the_code(
    rt: Runtime, sender: ScriptedSender
) -> None:
    t = await _tenant(rt)
    out = await _reply(rt, t)
    sender.outcomes = [PermanentSendError("outside the 24-hour window", code="131047")]
    assert await _processor(rt, sender)(_job(rt.pipeline.whatsapp_cloud, out)) == "failed"
    stored = await _status(rt, out["message_id"])
    assert stored.status == "failed" and stored.error_code == "131047"


async def test_a_channel_fatal_error_opens_the_circuit_until_the_channel_is_fixed(
    rt: Runtime, sender: ScriptedSender
) -> None:
    t = await _tenant(rt)
    first, second = await _reply(rt, t, "one"), await _reply(rt, t, "two")
    process = _processor(rt, sender)
    sender.outcomes = [ChannelFatalError("token expired", code="190")]
    with pytest.raises(DelayJob):
        await process(_job(rt.pipeline.whatsapp_cloud, first))
    state = await process.gate.state(t["wa"])
    assert state.open and state.code == "190" and "token" in (state.reason or "")
    with pytest.raises(DelayJob):  # queued messages wait, unsent, attempts untouched
        await process(_job(rt.pipeline.whatsapp_cloud, second))
    assert sender.sent == []
    assert await process.gate.close(t["wa"])  # the tenant fixed the token
    assert await process(_job(rt.pipeline.whatsapp_cloud, second)) == "sent"
    assert await process(_job(rt.pipeline.whatsapp_cloud, first)) == "sent"
    assert not (await process.gate.state(t["wa"])).open


async def test_after_a_channel_fatal_error_the_next_send_reads_the_channel_settings_again(
    rt: Runtime,
) -> None:
    """The operator replaces the expired token and the waiting replies start at once: they
    must go out with the new token, not with the settings cached (a few seconds) before the
    failure, or they meet the old token's error again and wait a whole probe interval."""
    t = await _tenant(rt)
    built: list[str] = []

    def make(channel: Any, secrets: Any, runtime: Runtime) -> ScriptedSender:
        built.append(secrets.access_token)
        sender = ScriptedSender()
        if secrets.access_token == "t":  # the channel's first, expired token
            sender.outcomes = [ChannelFatalError("token expired", code="190")]
        return sender

    process = SendProcessor(rt, make)
    first = await _reply(rt, t, "one")
    with pytest.raises(DelayJob):
        await process(_job(rt.pipeline.whatsapp_cloud, first))
    async with rt.sessions() as s, s.begin():
        await update_channel(
            s,
            rt.box,
            t["wa"],
            secrets=WhatsAppCloudSecrets(access_token="new", app_secret="a", verify_token="v"),
        )
    await process.gate.resume(t["wa"], rt.pipeline.whatsapp_cloud)  # what the update does
    assert await process(_job(rt.pipeline.whatsapp_cloud, first)) == "sent"
    assert built == ["t", "new"]


async def test_a_channel_that_works_again_starts_its_waiting_messages_at_once(
    rt: Runtime, sender: ScriptedSender
) -> None:
    """Messages paused by an open circuit wait as delayed jobs; without parking they would wait
    out their whole delay (a minute) after the channel is fixed."""
    t = await _tenant(rt)
    queue = rt.pipeline.whatsapp_cloud
    process = _processor(rt, sender)
    sender.outcomes = [ChannelFatalError("token expired", code="190")]
    # as the worker leaves them after each DelayJob: delayed
    jobs = [await queue.add("send", await _reply(rt, t, f"m{i}"), delay=60_000) for i in range(3)]
    for job in jobs:
        with pytest.raises(DelayJob):
            await process(job)
    assert {await queue.get_state(j.id) for j in jobs} == {JobState.DELAYED}
    # the probe interval passes and the next send (a new reply) goes through
    await rt.redis.delete(f"chan:probe:{t['wa']}")
    probe = await queue.add("send", await _reply(rt, t, "probe"))
    assert await process(probe) == "sent"
    assert not (await process.gate.state(t["wa"])).open
    assert {await queue.get_state(j.id) for j in jobs} == {JobState.WAITING}
    # the same through `resume` (new settings, a QR session working again)
    sender.outcomes = [ChannelFatalError("token expired", code="190")]
    later = await queue.add("send", await _reply(rt, t, "later"), delay=60_000)
    with pytest.raises(DelayJob):
        await process(later)
    assert await process.gate.resume(t["wa"], queue) == 1
    assert await queue.get_state(later.id) == JobState.WAITING
    assert await process.gate.resume(t["wa"], queue) == 0  # parked once, started once


async def test_the_per_number_rate_holds_across_processors(
    rt: Runtime, sender: ScriptedSender
) -> None:
    t = await _tenant(rt)
    outs = [await _reply(rt, t, f"m{i}") for i in range(3)]
    a, b = _processor(rt, sender, per_second=2), _processor(rt, sender, per_second=2)
    assert await a(_job(rt.pipeline.whatsapp_cloud, outs[0])) == "sent"
    assert await b(_job(rt.pipeline.whatsapp_cloud, outs[1])) == "sent"
    with pytest.raises(DelayJob) as waited:  # the third within the same second waits
        await a(_job(rt.pipeline.whatsapp_cloud, outs[2]))
    assert 0 < waited.value.delay_ms <= 1000


async def test_a_long_reply_failing_midway_resumes_after_the_parts_that_went_out(
    rt: Runtime, sender: ScriptedSender
) -> None:
    t = await _tenant(rt)
    out = await _reply(rt, t, "long")
    process = _processor(rt, sender)
    midway = RetryableSendError("5xx at part 3")
    midway.sent_external_ids = ("wamid.p0", "wamid.p1")  # type: ignore[attr-defined]
    sender.outcomes = [midway]
    with pytest.raises(RetryableSendError):
        await process(_job(rt.pipeline.whatsapp_cloud, out))
    assert (await _status(rt, out["message_id"])).provider_id == "wamid.p0"
    seen: list[int] = []

    async def record(message: OutboundText) -> SendResult:
        seen.append(message.skip_parts)
        return SendResult(("wamid.p2",))

    sender.send_text = record  # type: ignore[method-assign]
    assert await process(_job(rt.pipeline.whatsapp_cloud, out)) == "sent"
    assert seen == [2], "the retry skips the two parts already sent"
