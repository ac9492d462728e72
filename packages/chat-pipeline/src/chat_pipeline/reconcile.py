"""The reconciler: the database is the pipeline's outbox.

Every message the platform accepted is a row before anything is queued. A stored user message
that no reply has answered (in a conversation the bot answers) and a stored reply still
``queued`` are work the queues owe. When such a row is older than `after` (times the number of
times it was already requeued, plus one), the job that should carry it was lost — Redis lost
its data (``appendfsync everysec``, a failover), a process died between the commit and the
enqueue, a job failed for good — so the reconciler queues it again under a new job id. After
`max_requeues` attempts it gives up explicitly: the questions get the chatbot's fallback reply,
a reply that cannot be handed on is marked ``failed``. Nothing is left in silence.

Queueing again is always safe: the incoming step skips an answered message, an answer claims
only unanswered questions, and a reply already ``sent`` is never published or sent again.
One gateway process per interval does the work (a Redis lock); the scan reads two small
partial indexes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from chat_domain import (
    AlreadyAnsweredError,
    OwedMessage,
    QueuePriority,
    get_chatbot,
    get_queue_priority,
    note_requeued,
    owed_questions,
    owed_replies,
    store_reply,
    unanswered_messages,
    update_delivery_status,
)
from chat_domain.models import utcnow
from chat_domain.payloads import IncomingMessage, OutgoingMessage
from chat_domain.types import ChannelKind
from chat_pipeline.runtime import Runtime
from queue_core.job import ACTIVE_STATES, PENDING_STATES

__all__ = ["ReconcileResult", "Reconciler", "answer_with_fallback"]

log = logging.getLogger("chat_pipeline.reconcile")

LOCK_KEY = "chat:reconcile:lock"


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    questions_requeued: int = 0
    replies_requeued: int = 0
    fallbacks: int = 0  # conversations whose questions got the fallback reply
    replies_failed: int = 0
    skipped: bool = False  # another process held the lock


_ALIVE = PENDING_STATES | ACTIVE_STATES


class Reconciler:
    def __init__(self, rt: Runtime) -> None:
        s = rt.settings
        self.rt = rt
        self.interval = s.reconcile_interval_ms / 1000
        self.after = timedelta(milliseconds=s.reconcile_after_ms)
        self.max_requeues = s.reconcile_max_requeues
        self.lookback = timedelta(hours=s.reconcile_lookback_h)
        self.last_run_at = 0.0
        self.clock: Callable[[], datetime] = utcnow  # (tests move time instead of sleeping)

    async def run(self) -> None:
        """Reconcile every interval until cancelled; no error ends the loop."""
        while True:
            try:
                result = await self.run_once()
                if result != ReconcileResult() and not result.skipped:
                    log.warning("reconciler: %s", result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reconciler run failed (%s: %s)", type(exc).__name__, exc)
            await asyncio.sleep(self.interval)

    async def run_once(self, *, lock: bool = True) -> ReconcileResult:
        if lock and not await self.rt.redis.set(
            LOCK_KEY, "1", nx=True, px=max(1, int(self.interval * 900))
        ):
            return ReconcileResult(skipped=True)
        self.last_run_at = asyncio.get_running_loop().time()
        now = self.clock()
        since = now - self.lookback
        async with self.rt.sessions() as session:
            questions = await owed_questions(session, older_than=now - self.after, since=since)
            replies = await owed_replies(session, older_than=now - self.after, since=since)
        plans: dict[uuid.UUID, QueuePriority] = {}
        requeued_q = requeued_r = fallbacks = failed = 0
        fallen: set[uuid.UUID] = set()
        for owed in questions:
            if not self._due(owed):
                continue
            if owed.message.requeues >= self.max_requeues:
                if owed.message.conversation_id not in fallen:
                    fallen.add(owed.message.conversation_id)
                    fallbacks += await self._fall_back(owed, plans)
                continue
            await self._requeue(owed, plans)
            requeued_q += 1
        for owed in replies:
            if not self._due(owed) or await self._in_flight(owed):
                continue
            if owed.message.requeues >= self.max_requeues:
                async with self.rt.sessions() as session, session.begin():
                    await update_delivery_status(
                        session,
                        owed.message.id,
                        "failed",
                        error_code="undeliverable",
                        error_text=f"not handed on after {owed.message.requeues} requeues",
                    )
                log.error("reply %s could not be handed on; marked failed", owed.message.id)
                failed += 1
                continue
            await self._requeue(owed, plans)
            requeued_r += 1
        return ReconcileResult(requeued_q, requeued_r, fallbacks, failed)

    async def _in_flight(self, owed: OwedMessage) -> bool:
        """A reply still `queued` whose job is alive is not owed: it waits in the outgoing
        queue, or in its channel's send queue (parked while the channel is stopped, behind the
        per-number rate). Queued again it would only be sent by a second job; failed after the
        last requeue, the resumed channel would skip it as done."""
        m = owed.message
        suffix = f":{m.requeues}" if m.requeues else ""
        queues = [(self.rt.pipeline.outgoing, f"out:{m.id}{suffix}")]
        channel_queue = self.rt.pipeline.channel_queue(owed.channel_kind)
        if channel_queue is not None:
            queues.append((channel_queue, f"send:{m.id}{suffix}"))
        for queue, job_id in queues:
            if await queue.get_state(job_id) in _ALIVE:
                return True
        return False

    def _due(self, owed: OwedMessage) -> bool:
        # each requeue waits one more `after` before the next: a slow but working pipeline
        # (model retries) is not flooded with duplicate jobs
        age = self.clock() - owed.message.created_at
        return age >= self.after * (owed.message.requeues + 1)

    async def _plan(
        self, tenant_id: uuid.UUID, plans: dict[uuid.UUID, QueuePriority]
    ) -> QueuePriority:
        if tenant_id not in plans:
            async with self.rt.sessions() as session:
                plans[tenant_id] = await get_queue_priority(session, tenant_id)
        return plans[tenant_id]

    async def _requeue(self, owed: OwedMessage, plans: dict[uuid.UUID, QueuePriority]) -> None:
        """Queue an owed question (incoming) or reply (outgoing) again, under a new job id."""
        m = owed.message
        plan = await self._plan(owed.tenant_id, plans)
        async with self.rt.sessions() as session, session.begin():
            await note_requeued(session, [m.id])
        if m.role != "user":
            await self.rt.pipeline.enqueue_outgoing(
                _outgoing(owed, m.id, m.text), plan, requeue=m.requeues + 1
            )
            return
        incoming = IncomingMessage(
            tenant_id=owed.tenant_id,
            chatbot_id=owed.chatbot_id,
            channel_id=m.channel_id,
            channel_kind=owed.channel_kind,
            external_user_id=owed.recipient,
            text=m.text,
            external_message_id=m.external_id,
            received_at=m.created_at,
            message_id=m.id,
            conversation_id=m.conversation_id,
        )
        await self.rt.pipeline.enqueue_incoming(incoming, plan, requeue=m.requeues + 1)

    async def _fall_back(self, owed: OwedMessage, plans: dict[uuid.UUID, QueuePriority]) -> int:
        """The pipeline failed this conversation's questions `max_requeues` times: answer them
        with the chatbot's fallback reply (explicit, visible), once."""
        m = owed.message
        plan = await self._plan(owed.tenant_id, plans)
        answered = await answer_with_fallback(
            self.rt,
            tenant_id=owed.tenant_id,
            chatbot_id=owed.chatbot_id,
            conversation_id=m.conversation_id,
            channel_id=m.channel_id,
            channel_kind=owed.channel_kind,
            recipient=owed.recipient,
            plan=plan,
        )
        if answered:
            log.error(
                "conversation %s: %d questions unanswered after %d requeues; fallback reply",
                m.conversation_id,
                answered,
                m.requeues,
            )
        return 1 if answered else 0


async def answer_with_fallback(
    rt: Runtime,
    *,
    tenant_id: uuid.UUID,
    chatbot_id: uuid.UUID,
    conversation_id: uuid.UUID,
    channel_id: uuid.UUID,
    channel_kind: ChannelKind,
    recipient: str,
    plan: QueuePriority,
) -> int:
    """Answer every unanswered question of the conversation with the chatbot's fallback reply
    and hand it on; returns how many questions it answered (0: nothing was unanswered, or a
    real answer won the race). Idempotent: the reply's key is its first question's id."""
    try:
        async with rt.sessions() as session, session.begin():
            bot = await get_chatbot(session, chatbot_id)
            pending = await unanswered_messages(session, conversation_id)
            if bot is None or not pending:
                return 0
            reply = await store_reply(
                session,
                conversation_id=conversation_id,
                answers=[p.id for p in pending],
                text=bot.fallback_reply,
                external_id=f"fallback:{pending[0].id}",
            )
    except AlreadyAnsweredError:
        return 0
    await rt.pipeline.enqueue_outgoing(
        OutgoingMessage(
            tenant_id=tenant_id,
            conversation_id=conversation_id,
            message_id=reply.message.id,
            channel_id=channel_id,
            channel_kind=channel_kind,
            recipient_external_id=recipient,
            text=reply.message.text,
        ),
        plan,
    )
    return len(pending)


def _outgoing(owed: OwedMessage, message_id: uuid.UUID, text: str) -> OutgoingMessage:
    return OutgoingMessage(
        tenant_id=owed.tenant_id,
        conversation_id=owed.message.conversation_id,
        message_id=message_id,
        channel_id=owed.message.channel_id,
        channel_kind=owed.channel_kind,
        recipient_external_id=owed.recipient,
        text=text,
    )
