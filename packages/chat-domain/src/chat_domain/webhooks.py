"""Outgoing webhooks: endpoints (signing secret encrypted), events, their delivery state per
endpoint (the outbox) and the attempt log.

Producers call `emit_event` inside their own transaction: the event and one pending dispatch per
subscribed endpoint commit (or roll back) with the change that caused them. After the commit the
producer hands the returned dispatches to `chat_pipeline.webhooks.enqueue_dispatches`; if it
never gets there (a crash), the delivery service's relay finds the overdue dispatches and queues
them. Job ids come from the dispatch, so queueing twice is one job.
"""

from __future__ import annotations

import base64
import hashlib
import secrets as _secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain._sql import dialect_insert
from chat_domain.crypto import SecretBox
from chat_domain.errors import NotFoundError
from chat_domain.models import (
    WebhookDelivery,
    WebhookDispatch,
    WebhookEndpoint,
    WebhookEvent,
    utcnow,
)

RESPONSE_EXCERPT_CHARS = 1000

# What tenants can subscribe to ("*" subscribes to all). `webhook.test` goes only to the endpoint
# it is sent to; `endpoint.disabled` tells a tenant's other endpoints that one was disabled.
EVENT_TYPES: tuple[str, ...] = (
    "message.received",
    "message.sent",
    "message.delivered",
    "message.read",
    "message.failed",
    "conversation.created",
    "conversation.status_changed",
    "channel.status_changed",
    "usage.limit_reached",
    "endpoint.disabled",
    "webhook.test",
)
DispatchStatus = Literal["pending", "delivered", "failed"]
DISPATCH_STATUSES: tuple[DispatchStatus, ...] = ("pending", "delivered", "failed")


def generate_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(_secrets.token_bytes(32)).decode()


@dataclass(frozen=True, slots=True)
class WebhookEndpointView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    url: str
    event_types: tuple[str, ...]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    disabled_at: datetime | None = None
    consecutive_failures: int = 0
    first_failure_at: datetime | None = None
    last_success_at: datetime | None = None
    previous_secret_expires_at: datetime | None = None

    @classmethod
    def of(cls, row: WebhookEndpoint) -> WebhookEndpointView:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            url=row.url,
            event_types=tuple(row.event_types),
            enabled=row.enabled,
            disabled_reason=row.disabled_reason,
            created_at=row.created_at,
            disabled_at=row.disabled_at,
            consecutive_failures=row.consecutive_failures or 0,
            first_failure_at=row.first_failure_at,
            last_success_at=row.last_success_at,
            previous_secret_expires_at=row.previous_secret_expires_at,
        )

    def subscribes_to(self, event_type: str) -> bool:
        return "*" in self.event_types or event_type in self.event_types


@dataclass(frozen=True, slots=True)
class CreatedWebhookEndpoint:
    endpoint: WebhookEndpointView
    secret: str = field(repr=False)  # shown once to the tenant; stored encrypted


@dataclass(frozen=True, slots=True)
class WebhookEventView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    event_type: str
    payload: dict[str, Any]
    created_at: datetime


async def create_webhook_endpoint(
    session: AsyncSession,
    box: SecretBox,
    *,
    tenant_id: uuid.UUID,
    url: str,
    event_types: Sequence[str],
    secret: str | None = None,
) -> CreatedWebhookEndpoint:
    """A new endpoint subscribed to ``event_types`` (``"*"`` for all). A signing secret is
    generated unless given."""
    secret = secret or generate_webhook_secret()
    row = WebhookEndpoint(
        tenant_id=tenant_id,
        url=url,
        secret_enc=box.encrypt(secret),
        event_types=list(event_types),
        enabled=True,
    )
    session.add(row)
    await session.flush()
    return CreatedWebhookEndpoint(endpoint=WebhookEndpointView.of(row), secret=secret)


async def get_webhook_endpoint(
    session: AsyncSession, endpoint_id: uuid.UUID
) -> WebhookEndpointView | None:
    row = await session.get(WebhookEndpoint, endpoint_id)
    return None if row is None else WebhookEndpointView.of(row)


async def get_webhook_secret(session: AsyncSession, box: SecretBox, endpoint_id: uuid.UUID) -> str:
    token = await session.scalar(
        select(WebhookEndpoint.secret_enc).where(WebhookEndpoint.id == endpoint_id)
    )
    if token is None:
        raise NotFoundError(f"webhook endpoint {endpoint_id} does not exist")
    return box.decrypt(token)


async def endpoints_for_event(
    session: AsyncSession, tenant_id: uuid.UUID, event_type: str
) -> list[WebhookEndpointView]:
    """The tenant's enabled endpoints subscribed to ``event_type``."""
    rows = await session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.enabled.is_(True))
        .order_by(WebhookEndpoint.created_at)
    )
    views = [WebhookEndpointView.of(row) for row in rows]
    return [view for view in views if view.subscribes_to(event_type)]


async def wanted_event_types(session: AsyncSession, tenant_id: uuid.UUID) -> frozenset[str]:
    """The event types the tenant's enabled endpoints subscribe to (``*``: all of them)."""
    rows = await session.scalars(
        select(WebhookEndpoint.event_types).where(
            WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.enabled.is_(True)
        )
    )
    return frozenset(t for types in rows for t in types)


async def set_webhook_endpoint_enabled(
    session: AsyncSession, endpoint_id: uuid.UUID, enabled: bool, *, reason: str | None = None
) -> None:
    """Enable, or disable with a reason (e.g. "410 Gone", "failing for 3 days")."""
    values: dict[str, Any] = {"enabled": enabled, "disabled_reason": None if enabled else reason}
    if enabled:  # a fresh start: old failures must not disable it again at the next one
        values.update(disabled_at=None, consecutive_failures=0, first_failure_at=None)
    else:
        values["disabled_at"] = utcnow()
    result = await session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id)
        .values(**values)
        .returning(WebhookEndpoint.id)
        .execution_options(synchronize_session=False)
    )
    if result.first() is None:
        raise NotFoundError(f"webhook endpoint {endpoint_id} does not exist")


async def record_webhook_event(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    event_type: str,
    payload: dict[str, Any],
    dedupe_key: str | None = None,
    now: datetime | None = None,
) -> WebhookEventView:
    """Store an event. With a ``dedupe_key`` a retried producer gets the first event back."""
    values = {
        "id": uuid.uuid4(),
        "tenant_id": tenant_id,
        "event_type": event_type,
        "payload": payload,
        "dedupe_key": dedupe_key,
        "created_at": now or utcnow(),
    }
    if dedupe_key is not None:
        await session.execute(
            dialect_insert(session, WebhookEvent)
            .values(**values)
            .on_conflict_do_nothing(
                index_elements=["dedupe_key"], index_where=WebhookEvent.dedupe_key.is_not(None)
            )
        )
        row = (
            await session.execute(select(WebhookEvent).where(WebhookEvent.dedupe_key == dedupe_key))
        ).scalar_one()
    else:
        row = WebhookEvent(**values)
        session.add(row)
        await session.flush()
    return WebhookEventView(
        id=row.id,
        tenant_id=row.tenant_id,
        event_type=row.event_type,
        payload=row.payload,
        created_at=row.created_at,
    )


async def get_webhook_event(session: AsyncSession, event_id: uuid.UUID) -> WebhookEventView | None:
    row = await session.get(WebhookEvent, event_id)
    if row is None:
        return None
    return WebhookEventView(
        id=row.id,
        tenant_id=row.tenant_id,
        event_type=row.event_type,
        payload=row.payload,
        created_at=row.created_at,
    )


async def record_delivery_attempt(
    session: AsyncSession,
    *,
    event_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    attempt: int,
    status_code: int | None,
    duration_ms: int | None,
    error: str | None = None,
    response_excerpt: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Log one attempt; False when this (event, endpoint, attempt) was already logged (a
    retried job). The response excerpt is truncated."""
    if response_excerpt is not None:
        response_excerpt = response_excerpt[:RESPONSE_EXCERPT_CHARS]
    result = await session.execute(
        dialect_insert(session, WebhookDelivery)
        .values(
            id=uuid.uuid4(),
            event_id=event_id,
            endpoint_id=endpoint_id,
            attempt=attempt,
            status_code=status_code,
            duration_ms=duration_ms,
            error=error,
            response_excerpt=response_excerpt,
            attempted_at=now or utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["event_id", "endpoint_id", "attempt"])
        .returning(WebhookDelivery.id)
    )
    return result.first() is not None


# -- the outbox: events and their dispatches -------------------------------------------------


@dataclass(frozen=True, slots=True)
class DispatchRef:
    """What the queue needs to deliver one event to one endpoint (a job's payload and id)."""

    tenant_id: uuid.UUID
    event_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_type: str
    generation: int

    @property
    def job_id(self) -> str:
        return f"wh:{self.event_id}:{self.endpoint_id}:{self.generation}"


@dataclass(frozen=True, slots=True)
class EmittedEvent:
    event: WebhookEventView
    dispatches: list[DispatchRef]
    created: bool  # False: the dedupe key named an event stored before


def _event_view(row: WebhookEvent) -> WebhookEventView:
    return WebhookEventView(
        id=row.id,
        tenant_id=row.tenant_id,
        event_type=row.event_type,
        payload=row.payload,
        created_at=row.created_at,
    )


def _scoped_dedupe_key(tenant_id: uuid.UUID, key: str) -> str:
    """Dedupe keys are unique across the table: scope them by tenant (so one tenant's key never
    swallows another's event) and keep them within the column."""
    scoped = f"{tenant_id}:{key}"
    if len(scoped) > 200:
        scoped = f"{tenant_id}:h:" + hashlib.sha256(key.encode()).hexdigest()
    return scoped


async def emit_event(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    event_type: str,
    data: dict[str, Any],
    dedupe_key: str | None = None,
    *,
    endpoint_id: uuid.UUID | None = None,
    now: datetime | None = None,
) -> EmittedEvent:
    """Store an event once, in the caller's transaction, with a pending dispatch for each of the
    tenant's enabled endpoints subscribed to ``event_type`` (or only ``endpoint_id``, whatever
    it subscribes to: a test event). With a ``dedupe_key`` (scoped to the tenant) a retried
    producer gets the first event and its pending dispatches back, and nothing new is stored.

    After the commit, queue the returned dispatches (`chat_pipeline.webhooks`)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    now = now or utcnow()
    event_id = uuid.uuid4()
    values = {
        "id": event_id,
        "tenant_id": tenant_id,
        "event_type": event_type,
        "payload": data,
        "dedupe_key": None if dedupe_key is None else _scoped_dedupe_key(tenant_id, dedupe_key),
        "created_at": now,
    }
    if dedupe_key is not None:
        inserted = await session.execute(
            dialect_insert(session, WebhookEvent)
            .values(**values)
            .on_conflict_do_nothing(
                index_elements=["dedupe_key"], index_where=WebhookEvent.dedupe_key.is_not(None)
            )
            .returning(WebhookEvent.id)
        )
        if inserted.first() is None:
            row = (
                await session.execute(
                    select(WebhookEvent).where(WebhookEvent.dedupe_key == values["dedupe_key"])
                )
            ).scalar_one()
            pending = await session.scalars(
                select(WebhookDispatch).where(
                    WebhookDispatch.event_id == row.id, WebhookDispatch.status == "pending"
                )
            )
            return EmittedEvent(
                _event_view(row), [_ref(d, row.event_type) for d in pending], created=False
            )
        event = WebhookEventView(event_id, tenant_id, event_type, data, now)
    else:
        session.add(WebhookEvent(**values))
        event = WebhookEventView(event_id, tenant_id, event_type, data, now)
    if endpoint_id is not None:
        own = await session.get(WebhookEndpoint, endpoint_id)
        targets = [] if own is None or own.tenant_id != tenant_id else [own.id]
    else:
        targets = [e.id for e in await endpoints_for_event(session, tenant_id, event_type)]
    rows = [
        WebhookDispatch(
            event_id=event_id,
            endpoint_id=target,
            tenant_id=tenant_id,
            status="pending",
            attempts=0,
            round_attempts=0,
            generation=0,
            next_attempt_at=now,
            created_at=now,
        )
        for target in targets
    ]
    session.add_all(rows)
    await session.flush()
    return EmittedEvent(event, [_ref(d, event_type) for d in rows], created=True)


def _ref(row: WebhookDispatch, event_type: str) -> DispatchRef:
    return DispatchRef(row.tenant_id, row.event_id, row.endpoint_id, event_type, row.generation)


# -- what the delivery worker reads and writes -----------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryTask:
    """One attempt's inputs, read in one short transaction."""

    event: WebhookEventView
    endpoint: WebhookEndpointView
    secrets: tuple[str, ...] = field(repr=False)  # current first; the previous while in grace
    status: DispatchStatus
    attempts: int
    round_attempts: int
    generation: int
    next_attempt_at: datetime | None


async def load_delivery(
    session: AsyncSession,
    box: SecretBox,
    event_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    *,
    now: datetime | None = None,
) -> DeliveryTask | None:
    """None when the dispatch is gone (event or endpoint deleted)."""
    now = now or utcnow()
    found = (
        await session.execute(
            select(WebhookDispatch, WebhookEvent, WebhookEndpoint)
            .join(WebhookEvent, WebhookEvent.id == WebhookDispatch.event_id)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDispatch.endpoint_id)
            .where(WebhookDispatch.event_id == event_id, WebhookDispatch.endpoint_id == endpoint_id)
        )
    ).first()
    if found is None:
        return None
    dispatch, event, endpoint = found
    secrets = [box.decrypt(endpoint.secret_enc)]
    if (
        endpoint.previous_secret_enc is not None
        and endpoint.previous_secret_expires_at is not None
        and endpoint.previous_secret_expires_at > now
    ):
        secrets.append(box.decrypt(endpoint.previous_secret_enc))
    return DeliveryTask(
        event=_event_view(event),
        endpoint=WebhookEndpointView.of(endpoint),
        secrets=tuple(secrets),
        status=dispatch.status,  # type: ignore[arg-type]
        attempts=dispatch.attempts,
        round_attempts=dispatch.round_attempts,
        generation=dispatch.generation,
        next_attempt_at=dispatch.next_attempt_at,
    )


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """The result of one HTTP attempt and what the worker decided about it."""

    attempt: int  # the attempt's number in the log (dispatch attempts + 1)
    status_code: int | None
    duration_ms: int | None
    error: str | None
    response_excerpt: str | None
    delivered: bool
    next_attempt_at: datetime | None  # None: no further attempt (delivered or failed)
    disable_reason: str | None = None  # disable the endpoint now (a 410)


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status: DispatchStatus
    endpoint_disabled: str | None  # the reason, when this attempt disabled the endpoint
    notices: list[DispatchRef]  # `endpoint.disabled` events to queue after the commit


async def finish_attempt(
    session: AsyncSession,
    *,
    event_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    outcome: AttemptOutcome,
    disable_after: timedelta,
    now: datetime | None = None,
) -> AttemptResult:
    """Log the attempt, move the dispatch on and keep the endpoint's health, in the caller's
    transaction. An attempt already logged (a rerun job whose earlier run crashed after the
    commit) changes nothing more. An endpoint without a success since failures began more than
    ``disable_after`` ago is disabled, and its tenant's other endpoints get an
    ``endpoint.disabled`` event."""
    now = now or utcnow()
    logged = await record_delivery_attempt(
        session,
        event_id=event_id,
        endpoint_id=endpoint_id,
        attempt=outcome.attempt,
        status_code=outcome.status_code,
        duration_ms=outcome.duration_ms,
        error=outcome.error,
        response_excerpt=outcome.response_excerpt,
        now=now,
    )
    dispatch = await session.get(WebhookDispatch, (event_id, endpoint_id))
    endpoint = await session.get(WebhookEndpoint, endpoint_id)
    if dispatch is None or endpoint is None:
        return AttemptResult("failed", None, [])
    if not logged:
        return AttemptResult(dispatch.status, None, [])  # type: ignore[arg-type]
    status: DispatchStatus
    if outcome.delivered:
        status = "delivered"
    elif outcome.next_attempt_at is None or outcome.disable_reason is not None:
        status = "failed"
    else:
        status = "pending"
    dispatch.status = status
    dispatch.attempts = max(dispatch.attempts, outcome.attempt)
    dispatch.round_attempts += 1
    dispatch.next_attempt_at = outcome.next_attempt_at if status == "pending" else None
    dispatch.last_error = None if outcome.delivered else _failure_text(outcome)
    dispatch.finished_at = None if status == "pending" else now
    disabled: str | None = None
    if outcome.delivered:
        endpoint.consecutive_failures = 0
        endpoint.first_failure_at = None
        endpoint.last_success_at = now
    else:
        endpoint.consecutive_failures = (endpoint.consecutive_failures or 0) + 1
        if endpoint.first_failure_at is None:
            endpoint.first_failure_at = now
        if endpoint.enabled:
            if outcome.disable_reason is not None:
                disabled = outcome.disable_reason
            elif now - endpoint.first_failure_at >= disable_after:
                disabled = f"no successful delivery for {_span(now - endpoint.first_failure_at)}"
    notices: list[DispatchRef] = []
    if disabled is not None:
        endpoint.enabled = False
        endpoint.disabled_reason = disabled
        endpoint.disabled_at = now
        await session.flush()
        notice = await emit_event(
            session,
            endpoint.tenant_id,
            "endpoint.disabled",
            {"endpoint_id": str(endpoint.id), "url": endpoint.url, "reason": disabled},
            dedupe_key=f"endpoint.disabled:{endpoint.id}:{now.isoformat()}",
            now=now,
        )
        notices = notice.dispatches
    await session.flush()
    return AttemptResult(status, disabled, notices)


def _failure_text(outcome: AttemptOutcome) -> str:
    if outcome.error:
        return outcome.error[:500]
    return f"HTTP {outcome.status_code}"


def _span(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours"


async def fail_dispatch(
    session: AsyncSession,
    event_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    reason: str,
    *,
    now: datetime | None = None,
) -> None:
    """End a pending dispatch without an attempt (its endpoint was disabled meanwhile, or the
    event cannot be sent): failed, so that it can be replayed."""
    await session.execute(
        update(WebhookDispatch)
        .where(
            WebhookDispatch.event_id == event_id,
            WebhookDispatch.endpoint_id == endpoint_id,
            WebhookDispatch.status == "pending",
        )
        .values(
            status="failed", last_error=reason, next_attempt_at=None, finished_at=now or utcnow()
        )
        .execution_options(synchronize_session=False)
    )


# -- the relay: dispatches whose job went missing --------------------------------------------


async def overdue_dispatches(
    session: AsyncSession, *, older_than: datetime, limit: int
) -> list[DispatchRef]:
    """Pending dispatches due before ``older_than``: their job should have run by now."""
    rows = (
        await session.execute(
            select(WebhookDispatch, WebhookEvent.event_type)
            .join(WebhookEvent, WebhookEvent.id == WebhookDispatch.event_id)
            .where(
                WebhookDispatch.status == "pending", WebhookDispatch.next_attempt_at < older_than
            )
            .order_by(WebhookDispatch.next_attempt_at)
            .limit(limit)
        )
    ).all()
    return [_ref(d, event_type) for d, event_type in rows]


async def touch_dispatch(
    session: AsyncSession, ref: DispatchRef, *, next_generation: bool, now: datetime | None = None
) -> DispatchRef:
    """The relay looked at this dispatch: it goes behind the others in the overdue order (so a
    backlog cannot hide a lost job forever) and, when its job had finished, takes the next
    generation (a new job id)."""
    values: dict[str, Any] = {"next_attempt_at": now or utcnow()}
    if next_generation:
        values["generation"] = WebhookDispatch.generation + 1
    await session.execute(
        update(WebhookDispatch)
        .where(
            WebhookDispatch.event_id == ref.event_id,
            WebhookDispatch.endpoint_id == ref.endpoint_id,
            WebhookDispatch.status == "pending",
            WebhookDispatch.generation == ref.generation,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return DispatchRef(
        ref.tenant_id,
        ref.event_id,
        ref.endpoint_id,
        ref.event_type,
        ref.generation + (1 if next_generation else 0),
    )


# -- replay and recovery ---------------------------------------------------------------------


async def replay_dispatch(
    session: AsyncSession,
    event_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    *,
    now: datetime | None = None,
) -> DispatchRef | None:
    """Deliver an event to an endpoint again from the start of the retry schedule, whatever
    happened before (the endpoint need not have been a target: it is added). A dispatch still
    pending is left as it is. None when the event or endpoint does not exist."""
    now = now or utcnow()
    event = await session.get(WebhookEvent, event_id)
    endpoint = await session.get(WebhookEndpoint, endpoint_id)
    if event is None or endpoint is None or event.tenant_id != endpoint.tenant_id:
        return None
    row = await session.get(WebhookDispatch, (event_id, endpoint_id))
    if row is None:
        row = WebhookDispatch(
            event_id=event_id, endpoint_id=endpoint_id, tenant_id=event.tenant_id,
            status="pending", attempts=0, round_attempts=0, generation=0,
            next_attempt_at=now, created_at=now,
        )  # fmt: skip
        session.add(row)
    elif row.status != "pending":
        row.status = "pending"
        row.round_attempts = 0
        row.generation += 1
        row.next_attempt_at = now
        row.finished_at = None
    await session.flush()
    return _ref(row, event.event_type)


async def recover_failed(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    *,
    since: datetime,
    until: datetime | None = None,
    endpoint_id: uuid.UUID | None = None,
    limit: int = 10_000,
    now: datetime | None = None,
) -> list[DispatchRef]:
    """Replay the tenant's deliveries that failed between ``since`` and ``until``."""
    query = select(WebhookDispatch.event_id, WebhookDispatch.endpoint_id).where(
        WebhookDispatch.tenant_id == tenant_id,
        WebhookDispatch.status == "failed",
        WebhookDispatch.finished_at >= since,
    )
    if until is not None:
        query = query.where(WebhookDispatch.finished_at < until)
    if endpoint_id is not None:
        query = query.where(WebhookDispatch.endpoint_id == endpoint_id)
    failed = (await session.execute(query.order_by(WebhookDispatch.finished_at).limit(limit))).all()
    refs = []
    for event_id, target in failed:
        ref = await replay_dispatch(session, event_id, target, now=now)
        if ref is not None:
            refs.append(ref)
    return refs


# -- the tenant's management of endpoints ----------------------------------------------------


async def list_webhook_endpoints(
    session: AsyncSession, tenant_id: uuid.UUID
) -> list[WebhookEndpointView]:
    rows = await session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.tenant_id == tenant_id)
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    )
    return [WebhookEndpointView.of(row) for row in rows]


async def update_webhook_endpoint(
    session: AsyncSession,
    endpoint_id: uuid.UUID,
    *,
    url: str | None = None,
    event_types: Sequence[str] | None = None,
    enabled: bool | None = None,
) -> WebhookEndpointView:
    row = await session.get(WebhookEndpoint, endpoint_id)
    if row is None:
        raise NotFoundError(f"webhook endpoint {endpoint_id} does not exist")
    if url is not None:
        row.url = url
    if event_types is not None:
        row.event_types = list(event_types)
    await session.flush()
    if enabled is not None and enabled != row.enabled:
        await set_webhook_endpoint_enabled(session, endpoint_id, enabled, reason="disabled by you")
        await session.refresh(row)
    return WebhookEndpointView.of(row)


async def delete_webhook_endpoint(session: AsyncSession, endpoint_id: uuid.UUID) -> None:
    """The endpoint, its dispatches and attempt log go; the events stay (other endpoints')."""
    await session.execute(delete(WebhookDispatch).where(WebhookDispatch.endpoint_id == endpoint_id))
    await session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id))
    await session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id))


async def rotate_webhook_secret(
    session: AsyncSession,
    box: SecretBox,
    endpoint_id: uuid.UUID,
    *,
    grace: timedelta,
    now: datetime | None = None,
) -> str:
    """A new signing secret (returned once). The old one keeps signing beside it for
    ``grace``, so a receiver can switch without dropping a webhook; a rotation within the
    grace of the last one drops the older secret."""
    now = now or utcnow()
    row = await session.get(WebhookEndpoint, endpoint_id)
    if row is None:
        raise NotFoundError(f"webhook endpoint {endpoint_id} does not exist")
    secret = generate_webhook_secret()
    row.previous_secret_enc = row.secret_enc
    row.previous_secret_expires_at = now + grace if grace > timedelta(0) else None
    if grace <= timedelta(0):
        row.previous_secret_enc = None
    row.secret_enc = box.encrypt(secret)
    await session.flush()
    return secret


# -- what the tenant sees: events, dispatches, attempts --------------------------------------


@dataclass(frozen=True, slots=True)
class DispatchView:
    endpoint_id: uuid.UUID
    status: DispatchStatus
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class EventWithDispatches:
    event: WebhookEventView
    dispatches: list[DispatchView]


@dataclass(frozen=True, slots=True)
class AttemptView:
    event_id: uuid.UUID
    endpoint_id: uuid.UUID
    attempt: int
    status_code: int | None
    duration_ms: int | None
    error: str | None
    response_excerpt: str | None
    attempted_at: datetime


def _dispatch_view(row: WebhookDispatch) -> DispatchView:
    return DispatchView(
        endpoint_id=row.endpoint_id,
        status=row.status,  # type: ignore[arg-type]
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        finished_at=row.finished_at,
    )


async def list_webhook_events(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    *,
    event_type: str | None = None,
    endpoint_id: uuid.UUID | None = None,
    status: DispatchStatus | None = None,
    since: datetime | None = None,
    before: tuple[datetime, uuid.UUID] | None = None,
    limit: int = 50,
) -> list[EventWithDispatches]:
    """The tenant's events, newest first (keyset: ``before`` = the last one's (created_at, id)),
    each with its dispatches; filtered by type, time, and endpoint/status of a dispatch."""
    query = select(WebhookEvent).where(WebhookEvent.tenant_id == tenant_id)
    if event_type is not None:
        query = query.where(WebhookEvent.event_type == event_type)
    if since is not None:
        query = query.where(WebhookEvent.created_at >= since)
    if before is not None:
        at, last = before
        query = query.where(
            (WebhookEvent.created_at < at)
            | ((WebhookEvent.created_at == at) & (WebhookEvent.id < last))
        )
    if endpoint_id is not None or status is not None:
        sub = select(WebhookDispatch.event_id).where(WebhookDispatch.tenant_id == tenant_id)
        if endpoint_id is not None:
            sub = sub.where(WebhookDispatch.endpoint_id == endpoint_id)
        if status is not None:
            sub = sub.where(WebhookDispatch.status == status)
        query = query.where(WebhookEvent.id.in_(sub))
    events = list(
        await session.scalars(
            query.order_by(WebhookEvent.created_at.desc(), WebhookEvent.id.desc()).limit(limit)
        )
    )
    by_event: dict[uuid.UUID, list[DispatchView]] = {e.id: [] for e in events}
    if events:
        rows = await session.scalars(
            select(WebhookDispatch)
            .where(WebhookDispatch.event_id.in_(list(by_event)))
            .order_by(WebhookDispatch.created_at)
        )
        for row in rows:
            by_event[row.event_id].append(_dispatch_view(row))
    return [EventWithDispatches(_event_view(e), by_event[e.id]) for e in events]


async def get_event_with_dispatches(
    session: AsyncSession, event_id: uuid.UUID
) -> EventWithDispatches | None:
    event = await session.get(WebhookEvent, event_id)
    if event is None:
        return None
    rows = await session.scalars(
        select(WebhookDispatch)
        .where(WebhookDispatch.event_id == event_id)
        .order_by(WebhookDispatch.created_at)
    )
    return EventWithDispatches(_event_view(event), [_dispatch_view(r) for r in rows])


async def list_delivery_attempts(
    session: AsyncSession,
    *,
    event_id: uuid.UUID | None = None,
    endpoint_id: uuid.UUID | None = None,
    limit: int = 100,
) -> list[AttemptView]:
    """Attempts of an event and/or to an endpoint, newest first."""
    if event_id is None and endpoint_id is None:
        raise ValueError("name an event or an endpoint")
    query = select(WebhookDelivery)
    if event_id is not None:
        query = query.where(WebhookDelivery.event_id == event_id)
    if endpoint_id is not None:
        query = query.where(WebhookDelivery.endpoint_id == endpoint_id)
    rows = await session.scalars(
        query.order_by(WebhookDelivery.attempted_at.desc(), WebhookDelivery.attempt.desc()).limit(
            limit
        )
    )
    return [
        AttemptView(
            r.event_id,
            r.endpoint_id,
            r.attempt,
            r.status_code,
            r.duration_ms,
            r.error,
            r.response_excerpt,
            r.attempted_at,
        )
        for r in rows
    ]


async def count_pending_dispatches(session: AsyncSession, endpoint_id: uuid.UUID) -> int:
    return int(
        await session.scalar(
            select(func.count())
            .select_from(WebhookDispatch)
            .where(WebhookDispatch.endpoint_id == endpoint_id, WebhookDispatch.status == "pending")
        )
        or 0
    )
