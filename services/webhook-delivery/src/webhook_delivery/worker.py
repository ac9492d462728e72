"""The delivery worker and the outbox relay.

A job delivers one event to one endpoint. The dispatch row, not the job, is the truth: the
worker reads it, makes one attempt, and records the attempt and the dispatch's next state in one
transaction; a failed attempt with attempts left becomes `DelayJob(delay)` (no queue attempt
used, the endpoint's group is not held). A job rerun after a crash finds the dispatch as the
last commit left it: at worst one attempt is sent twice with the same webhook-id, which
receivers dedupe on. The relay queues dispatches whose job is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    AttemptOutcome,
    DeliveryTask,
    SecretBox,
    fail_dispatch,
    finish_attempt,
    load_delivery,
    overdue_dispatches,
    touch_dispatch,
)
from chat_domain.models import utcnow
from chat_domain.payloads import WebhookEventJob
from chat_pipeline.webhooks import WebhookSettings, enqueue_dispatches
from queue_core import DelayJob, Job, Queue
from webhook_delivery.sender import Sender, SendResult

__all__ = ["DeliveryProcessor", "Relay", "envelope", "retry_delay_s"]

log = logging.getLogger("webhook_delivery")


def envelope(task: DeliveryTask) -> bytes:
    """The body: the same bytes on every attempt (the event's type, time and data)."""
    return orjson.dumps(
        {
            "type": task.event.event_type,
            "timestamp": task.event.created_at.isoformat().replace("+00:00", "Z"),
            "data": task.event.payload,
        }
    )


def retry_delay_s(
    settings: WebhookSettings,
    round_attempt: int,
    retry_after_s: float | None,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """Seconds until the next attempt after the `round_attempt`-th failed, or None when the
    schedule is used up. A receiver's Retry-After lengthens the wait (up to the cap), never
    shortens it."""
    schedule = settings.retry_schedule_s
    if round_attempt > len(schedule):
        return None
    delay = schedule[round_attempt - 1] * (1 + settings.jitter * (2 * rand() - 1))
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, settings.retry_after_cap_s))
    return max(0.0, delay)


def _generation(job_id: str | None) -> int | None:
    if job_id is None or not job_id.startswith("wh:"):
        return None
    tail = job_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


class DeliveryProcessor:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        box: SecretBox,
        queue: Queue,
        settings: WebhookSettings,
        sender: Sender | None = None,
    ) -> None:
        self.sessions = sessions
        self.box = box
        self.queue = queue
        self.settings = settings
        self.sender = sender or Sender(settings)

    async def close(self) -> None:
        await self.sender.aclose()

    async def __call__(self, job: Job) -> str:
        payload = WebhookEventJob.model_validate(job.data)
        async with self.sessions() as session:
            task = await load_delivery(session, self.box, payload.event_id, payload.endpoint_id)
        if task is None:
            return "gone"
        if task.status != "pending":
            return task.status  # a duplicate job: the dispatch already finished
        generation = _generation(job.id)
        if generation is not None and generation != task.generation:
            return "superseded"
        if not task.endpoint.enabled:
            reason = f"endpoint disabled: {task.endpoint.disabled_reason or 'by its owner'}"
            await self._fail(payload, reason)
            return "endpoint-disabled"
        now = utcnow()
        if task.next_attempt_at is not None and task.next_attempt_at > now:
            wait_ms = int((task.next_attempt_at - now).total_seconds() * 1000)
            if wait_ms > 50:  # picked up early (a rerun, or queued by the relay): not yet
                raise DelayJob(wait_ms)
        body = envelope(task)
        if len(body) > self.settings.max_payload_bytes:
            limit = self.settings.max_payload_bytes
            await self._fail(payload, f"payload of {len(body)} bytes exceeds {limit}")
            return "too-large"
        attempt = task.attempts + 1
        result = await self.sender.send(task.endpoint.url, str(task.event.id), body, task.secrets)
        outcome = self._outcome(task, attempt, result)
        async with self.sessions() as session, session.begin():
            done = await finish_attempt(
                session,
                event_id=payload.event_id,
                endpoint_id=payload.endpoint_id,
                outcome=outcome,
                disable_after=timedelta(seconds=self.settings.disable_after_s),
            )
        if done.endpoint_disabled is not None:
            log.warning("webhook endpoint %s disabled: %s", payload.endpoint_id,
                        done.endpoint_disabled)  # fmt: skip
        if done.notices:
            await enqueue_dispatches(self.queue, done.notices)
        if done.status == "pending" and outcome.next_attempt_at is not None:
            wait = (outcome.next_attempt_at - utcnow()).total_seconds()
            raise DelayJob(max(0, int(wait * 1000)))
        return done.status

    def _outcome(self, task: DeliveryTask, attempt: int, result: SendResult) -> AttemptOutcome:
        next_at: datetime | None = None
        disable = None
        if result.status_code == 410:
            disable = "the endpoint answered 410 Gone"
        elif not result.ok:
            delay = retry_delay_s(self.settings, task.round_attempts + 1, result.retry_after_s)
            if delay is not None:
                next_at = utcnow() + timedelta(seconds=delay)
        return AttemptOutcome(
            attempt=attempt,
            status_code=result.status_code,
            duration_ms=result.duration_ms,
            error=result.error,
            response_excerpt=result.excerpt,
            delivered=result.ok,
            next_attempt_at=next_at,
            disable_reason=disable,
        )

    async def _fail(self, payload: WebhookEventJob, reason: str) -> None:
        async with self.sessions() as session, session.begin():
            await fail_dispatch(session, payload.event_id, payload.endpoint_id, reason)


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Relay:
    """Queues pending dispatches that are overdue and have no live job: the producer died
    between its commit and its enqueue, or Redis lost the job. One replica at a time (a Redis
    lock); a bounded batch per round."""

    LOCK_KEY = "webhook-delivery:relay-lock"

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        queue: Queue,
        settings: WebhookSettings,
    ) -> None:
        self.sessions = sessions
        self.queue = queue
        self.settings = settings

    async def run_once(self, now: datetime | None = None) -> int:
        """Returns how many dispatches were queued again (0 also when another replica holds
        the lock)."""
        redis = self.queue.redis
        token = uuid.uuid4().hex
        lease_ms = int(max(self.settings.relay_interval_s * 3, 30) * 1000)
        if not await redis.set(self.LOCK_KEY, token, nx=True, px=lease_ms):
            return 0
        try:
            return await self._relay(now or utcnow())
        finally:
            await redis.eval(_RELEASE, 1, self.LOCK_KEY, token)

    async def _relay(self, now: datetime) -> int:
        cutoff = now - timedelta(seconds=self.settings.relay_after_s)
        async with self.sessions() as session:
            overdue = await overdue_dispatches(
                session, older_than=cutoff, limit=self.settings.relay_batch
            )
        if not overdue:
            return 0
        states = [await self.queue.get_state(ref.job_id) for ref in overdue]
        lost = []
        async with self.sessions() as session, session.begin():
            for ref, state in zip(overdue, states, strict=True):
                finished = state in ("completed", "failed")
                touched = await touch_dispatch(session, ref, next_generation=finished, now=now)
                if state is None or finished:
                    lost.append(touched)
        if lost:
            log.warning("webhook relay: queueing %d dispatch(es) whose job was gone", len(lost))
            await enqueue_dispatches(self.queue, lost)
        return len(lost)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception:
                log.warning("webhook relay round failed; next round in %.0f s",
                            self.settings.relay_interval_s, exc_info=True)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.relay_interval_s):
                    await stop.wait()
