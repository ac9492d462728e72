"""The pipeline's own queue processors: incoming-messages, outgoing-messages and the daily
retention run. Any service may run them (the gateway's worker role does, see
`gateway.worker_service`); channel senders have their own processor (`chat_pipeline.send`)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, replace
from datetime import UTC, datetime

from chat_domain import (
    AlreadyAnsweredError,
    check_inbound_allowed,
    get_conversation,
    get_message,
    get_or_create_contact,
    get_or_create_conversation,
    get_queue_priority,
    insert_message,
    purge_expired,
    store_reply,
    update_delivery_status,
)
from chat_domain.payloads import AIRequest, IncomingMessage, OutgoingMessage
from chat_domain.types import DELIVERY_STATUS_RANK
from chat_domain.webhooks import DispatchRef
from chat_pipeline.consumer import pipeline_worker
from chat_pipeline.errors import DEPENDENCY_ERRORS
from chat_pipeline.events import status_data
from chat_pipeline.live import message_frame, publish, visitor_channel
from chat_pipeline.runtime import Runtime
from chat_pipeline.supervision import WorkerSet
from queue_core import Backoff, Job, Schedule, UnrecoverableError, Worker

__all__ = ["IncomingProcessor", "OutgoingProcessor", "start_workers"]

log = logging.getLogger("chat_pipeline.processors")


class IncomingProcessor:
    """Store the message (unless the receiving side did), drop duplicates, enforce the plan's
    limits, count usage, and ask for an answer (debounced per conversation).

    Runs again safely: the reconciler queues a stored message that is still unanswered once
    more (a job lost with Redis' data), and a message some reply already answered is left
    alone."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def __call__(self, job: Job) -> str:
        rt = self.rt
        msg = IncomingMessage.model_validate(job.data)
        limit_reply = None
        limit_events: list[DispatchRef] = []
        async with rt.sessions() as session, session.begin():
            if msg.message_id is None:
                contact = await get_or_create_contact(
                    session,
                    tenant_id=msg.tenant_id,
                    channel_id=msg.channel_id,
                    external_id=msg.external_user_id,
                    display_name=msg.contact_name,
                )
                conversation = await get_or_create_conversation(
                    session, contact, chatbot_id=msg.chatbot_id
                )
                result = await insert_message(
                    session,
                    conversation_id=conversation.id,
                    role="user",
                    text=msg.text,
                    external_id=msg.external_message_id,
                    status="received",
                )
                if result.duplicate:
                    return "duplicate"  # a redelivered webhook: already answered once
                message = result.message
            else:
                stored = await get_message(session, msg.message_id)
                if stored is None:
                    raise UnrecoverableError(f"message {msg.message_id} does not exist")
                message = stored
                found = await get_conversation(session, message.conversation_id)
                if found is None:
                    raise UnrecoverableError(f"conversation {message.conversation_id} is gone")
                conversation = found
                if message.reply_id is not None:
                    return "answered"  # queued again, but a reply answered it meanwhile
            if conversation.status != "open":
                return "no-bot"  # a human agent has the conversation (or it was resolved)
            quota = await check_inbound_allowed(
                session, tenant_id=msg.tenant_id, chatbot_id=msg.chatbot_id
            )
            plan = quota.priority
            if not quota.allowed:
                try:
                    stored_reply = await store_reply(
                        session,
                        conversation_id=conversation.id,
                        answers=[message.id],
                        text=quota.reply_text or "",
                        external_id=f"limit:{message.id}",
                    )
                except AlreadyAnsweredError:
                    return "answered"
                limit_reply = stored_reply.message
                if quota.reason != "tenant_suspended":
                    now = datetime.now(UTC)
                    period = f"{now.year:04d}-{now.month:02d}"
                    kind, used, limit = (
                        ("messages", quota.messages_used, quota.messages_limit)
                        if quota.reason == "messages_limit"
                        else ("ai_tokens", quota.ai_tokens_used, quota.ai_tokens_limit)
                    )
                    limit_events = await rt.events.emit(
                        session,
                        msg.tenant_id,
                        "usage.limit_reached",
                        {"kind": kind, "limit": limit, "used": used, "period": period},
                        dedupe_key=f"limit:{kind}:{period}",  # once a month per limit
                    )
        rt.usage.record(msg.tenant_id, "message_in", dedupe_key=f"in:{message.id}")
        await rt.events.send(limit_events)
        if limit_reply is not None:
            log.info("tenant %s over its plan limit (%s): limit reply", msg.tenant_id, quota.reason)
            await rt.pipeline.enqueue_outgoing(
                OutgoingMessage(
                    tenant_id=msg.tenant_id,
                    conversation_id=conversation.id,
                    message_id=limit_reply.id,
                    channel_id=msg.channel_id,
                    channel_kind=msg.channel_kind,
                    recipient_external_id=msg.external_user_id,
                    text=limit_reply.text,
                ),
                plan,
            )
            return "limited"
        s = rt.settings
        if msg.channel_kind != "widget" and msg.external_message_id:
            try:  # (a hint: never worth failing the message for)
                await rt.pipeline.enqueue_typing(
                    msg.channel_kind, msg.channel_id, msg.external_message_id
                )
            except DEPENDENCY_ERRORS as exc:
                log.debug("typing hint for %s not queued (%s)", message.id, exc)
        await rt.pipeline.enqueue_ai(
            AIRequest(
                tenant_id=msg.tenant_id,
                chatbot_id=msg.chatbot_id,
                conversation_id=conversation.id,
                up_to_message_id=message.id,
                up_to_seq=message.seq,
                request_id=uuid.uuid4(),
            ),
            plan,
            debounce_ms=s.debounce_ms,
            attempts=s.ai_attempts,
            backoff_ms=s.ai_backoff_ms,
            timeout_ms=s.ai_timeout_ms,
        )
        return "queued"


class OutgoingProcessor:
    """Route a stored reply to its channel: widget replies go live to the visitor's sockets
    (delivered when the browser acknowledges them); WhatsApp replies go to their senders.

    Whether a reply went out is recorded in the database (``sent``) and checked first, so a
    rerun, a requeue by the reconciler or a job id that outlived its retention never
    publishes (or sends) a reply twice."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def __call__(self, job: Job) -> str:
        rt = self.rt
        out = OutgoingMessage.model_validate(job.data)
        async with rt.sessions() as session:
            message = await get_message(session, out.message_id)
        if message is None:
            return "gone"
        if DELIVERY_STATUS_RANK[message.status] >= DELIVERY_STATUS_RANK["sent"]:
            return "already-sent"
        if out.channel_kind == "widget":
            # Published before it is marked: a crash in between publishes it once more (the
            # widget drops a message id it already shows), never zero times.
            await publish(
                rt.redis,
                visitor_channel(out.channel_id, out.recipient_external_id),
                message_frame(replace(message, status="sent")),
            )
            dispatches = []
            async with rt.sessions() as session, session.begin():
                if await update_delivery_status(session, out.message_id, "sent"):
                    data = status_data(out.message_id, out.conversation_id, out.channel_id, "sent")
                    dispatches = await rt.events.emit(session, out.tenant_id, "message.sent", data)
            await rt.events.send(dispatches)
            rt.usage.record(out.tenant_id, "message_out", dedupe_key=f"out:{out.message_id}")
            return "published"
        queue = rt.pipeline.channel_queue(out.channel_kind)
        if queue is None:
            raise UnrecoverableError(f"no sender for channel kind {out.channel_kind!r}")
        async with rt.sessions() as session:
            plan = await get_queue_priority(session, out.tenant_id)
        await queue.add(
            "send",
            out.model_dump(mode="json"),
            job_id=f"send:{out.message_id}" + (f":{message.requeues}" if message.requeues else ""),
            group=f"{out.tenant_id}:{out.conversation_id}",
            priority=plan.priority,
            group_weight=plan.weight,
            # retryable failures (5xx, timeouts) back off up to a minute; throttling, a paused
            # channel and a busy recipient wait without using these attempts
            attempts=8,
            backoff=Backoff.exponential(1000, jitter=0.3, max_delay=60_000),
        )
        return "routed"


class RetentionProcessor:
    """The daily retention run (a job scheduler on the maintenance queue triggers it)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def __call__(self, job: Job) -> dict[str, int]:
        async with self.rt.sessions() as session:
            result = await purge_expired(session, datetime.now(UTC))
        log.info("retention: %s", result)
        return {k: int(v) for k, v in asdict(result).items()}


async def schedule_maintenance(rt: Runtime) -> None:
    """Idempotent: every gateway replica upserts the same schedule on startup."""
    await rt.pipeline.maintenance.upsert_scheduler(
        "retention", Schedule(cron="30 3 * * *", tz="UTC"), "retention"
    )


def pipeline_workers(rt: Runtime) -> list[Worker]:
    """The workers of the pipeline's own queues (the gateway's worker role runs them)."""
    s = rt.settings
    p = rt.pipeline
    return [
        pipeline_worker(rt, p.incoming, IncomingProcessor(rt), concurrency=s.incoming_concurrency),
        pipeline_worker(rt, p.outgoing, OutgoingProcessor(rt), concurrency=s.outgoing_concurrency),
        pipeline_worker(rt, p.maintenance, RetentionProcessor(rt), concurrency=1),
    ]


def start_workers(rt: Runtime) -> WorkerSet:
    workers = WorkerSet(pipeline_workers(rt))
    workers.start()
    return workers
