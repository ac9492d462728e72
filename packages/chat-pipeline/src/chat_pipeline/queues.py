"""The platform's queues: names, owners' settings, and how jobs are enqueued onto them.

Conversation order holds end to end because every conversation is one group (group
concurrency 1) on the queues after `incoming-messages`; job priority and group weight come from
the tenant's current plan.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from chat_domain import QueuePriority
from chat_domain.payloads import AIRequest, IncomingMessage, OutgoingMessage
from queue_core import Backoff, Dedup, Job, JobOptions, KeepJobs, Queue, QueueSettings
from queue_core.types import RedisClient

__all__ = [
    "AI",
    "INCOMING",
    "MAINTENANCE",
    "OUTGOING",
    "QUEUE_SETTINGS",
    "WEBHOOKS",
    "WHATSAPP_CLOUD",
    "WHATSAPP_QR",
    "Pipeline",
    "conversation_group",
]

INCOMING = "incoming-messages"
AI = "ai-processing"
OUTGOING = "outgoing-messages"
WHATSAPP_CLOUD = "whatsapp-cloud-send"
WHATSAPP_QR = "whatsapp-qr-send"
WEBHOOKS = "webhook-delivery"
MAINTENANCE = "maintenance"

QUEUE_SETTINGS: dict[str, QueueSettings] = {
    name: QueueSettings(group_concurrency=1, dead_letter_queue=f"{name}-dlq")
    for name in (INCOMING, AI, OUTGOING, WHATSAPP_CLOUD, WHATSAPP_QR, WEBHOOKS, MAINTENANCE)
}

# Finished jobs are evidence for operators, not data: keep a bounded window.
_KEEP = JobOptions(remove_on_complete=KeepJobs(count=2000, age=3600))


def conversation_group(tenant_id: uuid.UUID, conversation_id: uuid.UUID) -> str:
    return f"{tenant_id}:{conversation_id}"


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The queues of the message pipeline and the one place that decides job options."""

    incoming: Queue
    ai: Queue
    outgoing: Queue
    whatsapp_cloud: Queue
    whatsapp_qr: Queue
    maintenance: Queue

    @classmethod
    def open(cls, redis: RedisClient) -> Pipeline:
        names = (INCOMING, AI, OUTGOING, WHATSAPP_CLOUD, WHATSAPP_QR, MAINTENANCE)
        return cls(*(Queue(n, redis, default_options=_KEEP) for n in names))

    async def configure(self, *queues: Queue) -> None:
        """Owners call this on startup for the queues they consume."""
        for queue in queues:
            await queue.configure(QUEUE_SETTINGS[queue.name])

    async def enqueue_incoming(
        self, message: IncomingMessage, plan: QueuePriority, *, requeue: int = 0
    ) -> Job:
        """Job ids and groups are fixed-length whatever the channel's ids: a stored message is
        `in:<message id>:<requeue>` in its conversation's group (the reconciler queues a
        message again under the next requeue number); a message not stored yet is keyed by a
        hash of its channel and external ids, in a group per sender (a sender's messages are
        stored in the order they arrived)."""
        if message.message_id is not None and message.conversation_id is not None:
            job_id: str | None = f"in:{message.message_id}:{requeue}"
            group = conversation_group(message.tenant_id, message.conversation_id)
        else:
            sender = _digest(f"{message.channel_id}\0{message.external_user_id}")
            group = f"{message.tenant_id}:{sender}"
            job_id = None
            if message.external_message_id:
                job_id = "in:" + _digest(f"{message.channel_id}\0{message.external_message_id}")
        return await self.incoming.add(
            "incoming",
            message.model_dump(mode="json"),
            job_id=job_id,
            group=group,
            priority=plan.priority,
            group_weight=plan.weight,
            attempts=5,
            backoff=Backoff.exponential(500, jitter=0.3),
        )

    async def enqueue_ai(
        self,
        request: AIRequest,
        plan: QueuePriority,
        *,
        debounce_ms: int,
        attempts: int,
        backoff_ms: int,
        timeout_ms: int,
    ) -> Job:
        """Debounced per conversation: a burst of messages within `debounce_ms` becomes one
        AI job that answers all of them."""
        return await self.ai.add(
            "answer",
            request.model_dump(mode="json"),
            group=conversation_group(request.tenant_id, request.conversation_id),
            priority=plan.priority,
            group_weight=plan.weight,
            delay=debounce_ms,
            dedup=Dedup(f"ai:{request.conversation_id}", mode="debounce"),
            attempts=attempts,
            backoff=Backoff("llm", backoff_ms),
            timeout=timeout_ms,
        )

    async def enqueue_outgoing(
        self, message: OutgoingMessage, plan: QueuePriority, *, requeue: int = 0
    ) -> Job:
        job_id = f"out:{message.message_id}" + (f":{requeue}" if requeue else "")
        return await self.outgoing.add(
            "deliver",
            message.model_dump(mode="json"),
            job_id=job_id,
            group=conversation_group(message.tenant_id, message.conversation_id),
            priority=plan.priority,
            group_weight=plan.weight,
            attempts=5,
            backoff=Backoff.exponential(500, jitter=0.3),
        )

    async def enqueue_typing(
        self, kind: str, channel_id: uuid.UUID, external_message_id: str
    ) -> None:
        """Best effort: tell the channel's sender to show the user that the bot is answering
        (WhatsApp: mark their message read and show "typing"). Never retried."""
        queue = self.channel_queue(kind)
        if queue is not None:
            await queue.add(
                "typing",
                {"channel_id": str(channel_id), "external_message_id": external_message_id},
                attempts=1,
                remove_on_complete=True,
                remove_on_fail=100,
            )

    def by_name(self, name: str) -> Queue | None:
        """One of the platform's queues by name (the operator's raw-job door), else None."""
        for queue in (
            self.incoming, self.ai, self.outgoing, self.whatsapp_cloud, self.whatsapp_qr,
            self.maintenance,
        ):  # fmt: skip
            if queue.name == name:
                return queue
        if name == WEBHOOKS:
            return Queue(WEBHOOKS, self.incoming.redis, default_options=_KEEP)
        return None

    def channel_queue(self, kind: str) -> Queue | None:
        return {"whatsapp_cloud": self.whatsapp_cloud, "whatsapp_qr": self.whatsapp_qr}.get(kind)
