"""Outgoing webhooks: endpoints (signing secret encrypted), events and delivery attempts."""

from __future__ import annotations

import secrets as _secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain._sql import dialect_insert
from chat_domain.crypto import SecretBox
from chat_domain.errors import NotFoundError
from chat_domain.models import WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow

RESPONSE_EXCERPT_CHARS = 1000


@dataclass(frozen=True, slots=True)
class WebhookEndpointView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    url: str
    event_types: tuple[str, ...]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime

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
    secret = secret or "whsec_" + _secrets.token_urlsafe(32)
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


async def set_webhook_endpoint_enabled(
    session: AsyncSession, endpoint_id: uuid.UUID, enabled: bool, *, reason: str | None = None
) -> None:
    """Enable, or disable with a reason (e.g. "410 Gone", "failing for 3 days")."""
    result = await session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id)
        .values(enabled=enabled, disabled_reason=None if enabled else reason)
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
