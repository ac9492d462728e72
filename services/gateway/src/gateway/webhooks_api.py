"""The tenant's webhooks in the admin API (/api/v1/webhooks/...): endpoints (the signing secret
shown once, on creation and rotation), a test event, the event log with each endpoint's delivery
state and attempts, replay of one event and recovery of every failed delivery since a time.

Routes join `admin_api.ROUTES` when this module is imported (gateway.app does), so they get the
same authentication, roles, tenant scoping and error shape. Every URL is checked as the delivery
worker checks it (public addresses only unless the operator's WEBHOOK_ALLOW_PRIVATE_NETWORKS
allows the network), so a tenant learns at registration that an address will be refused.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Annotated, Any

from aiohttp import web
from pydantic import AwareDatetime, Field, StringConstraints

from chat_domain import (
    EVENT_TYPES,
    AttemptView,
    EventWithDispatches,
    WebhookEndpointView,
    create_webhook_endpoint,
    delete_webhook_endpoint,
    emit_event,
    get_event_with_dispatches,
    get_webhook_endpoint,
    list_delivery_attempts,
    list_webhook_endpoints,
    list_webhook_events,
    recover_failed,
    replay_dispatch,
    rotate_webhook_secret,
    update_webhook_endpoint,
)
from chat_domain.webhooks import DISPATCH_STATUSES, DispatchRef
from chat_pipeline.webhooks import (
    UnsafeDestinationError,
    WebhookSettings,
    enqueue_dispatches,
    resolve_destination,
    webhook_queue,
)
from gateway.admin_api import (
    MAX_PAGE,
    Ctx,
    _body,
    _In,
    _json,
    _path_id,
    _query_int,
    _query_uuid,
    route,
)
from gateway.errors import ApiError

__all__ = ["webhook_settings"]

MAX_ENDPOINTS_PER_TENANT = 20
RECOVERY_WINDOW = timedelta(days=14)

HookUrl = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=2000)]
EventType = Annotated[str, StringConstraints(min_length=1, max_length=100)]


@functools.cache
def webhook_settings() -> WebhookSettings:
    return WebhookSettings.from_env()


def _endpoint(e: WebhookEndpointView) -> dict[str, Any]:
    return {
        "id": e.id,
        "url": e.url,
        "event_types": list(e.event_types),
        "enabled": e.enabled,
        "created_at": e.created_at,
        "health": {
            "last_success_at": e.last_success_at,
            "consecutive_failures": e.consecutive_failures,
            "failing_since": e.first_failure_at,
            "disabled_at": e.disabled_at,
            "disabled_reason": e.disabled_reason,
        },
        "previous_secret_expires_at": e.previous_secret_expires_at,
    }


def _event(e: EventWithDispatches) -> dict[str, Any]:
    return {
        "id": e.event.id,
        "type": e.event.event_type,
        "created_at": e.event.created_at,
        "data": e.event.payload,
        "deliveries": [asdict(d) for d in e.dispatches],
    }


def _attempt(a: AttemptView) -> dict[str, Any]:
    return asdict(a)


def _types(types: list[str]) -> list[str]:
    for i, t in enumerate(types):
        if t != "*" and t not in EVENT_TYPES:
            raise ApiError(400, "invalid", f"unknown event type {t!r}", f"event_types.{i}")
    return sorted(set(types))


async def _checked_url(url: str) -> str:
    try:
        await resolve_destination(url, webhook_settings().allow_private_networks)
    except UnsafeDestinationError as exc:
        raise ApiError(400, "unsafe_url", str(exc), "url") from None
    return url


async def _own_endpoint(ctx: Ctx, endpoint_id: uuid.UUID) -> WebhookEndpointView:
    async with ctx.rt.sessions() as session:
        endpoint = await get_webhook_endpoint(session, endpoint_id)
    if endpoint is None or endpoint.tenant_id != ctx.tenant:
        raise ApiError(404, "not_found", "no such webhook endpoint", "endpoint_id")
    return endpoint


async def _own_event(ctx: Ctx, event_id: uuid.UUID) -> EventWithDispatches:
    async with ctx.rt.sessions() as session:
        event = await get_event_with_dispatches(session, event_id)
    if event is None or event.event.tenant_id != ctx.tenant:
        raise ApiError(404, "not_found", "no such webhook event", "event_id")
    return event


async def _enqueue(ctx: Ctx, refs: list[DispatchRef]) -> None:
    await enqueue_dispatches(webhook_queue(ctx.rt.redis), refs)


class EndpointIn(_In):
    url: HookUrl
    event_types: list[EventType] = Field(min_length=1, max_length=50)


class EndpointPatch(_In):
    url: HookUrl | None = None
    event_types: list[EventType] | None = Field(default=None, min_length=1, max_length=50)
    enabled: bool | None = None


class RotateIn(_In):
    grace_seconds: int | None = Field(default=None, ge=0, le=7 * 86_400)


class ReplayIn(_In):
    endpoint_id: uuid.UUID | None = None


class RecoverIn(_In):
    since: AwareDatetime
    until: AwareDatetime | None = None
    endpoint_id: uuid.UUID | None = None


@route("GET", "/webhooks/endpoints", "admin", "The tenant's webhook endpoints, with health")
async def endpoints_list(request: web.Request, ctx: Ctx) -> web.Response:
    async with ctx.rt.sessions() as session:
        endpoints = await list_webhook_endpoints(session, ctx.tenant)
    return _json({"items": [_endpoint(e) for e in endpoints], "event_types": list(EVENT_TYPES)})


@route("POST", "/webhooks/endpoints", "admin", "Add an endpoint: its secret is in this answer only")
async def endpoints_create(request: web.Request, ctx: Ctx) -> web.Response:
    body = await _body(request, EndpointIn)
    types = _types(body.event_types)
    url = await _checked_url(body.url)
    async with ctx.rt.sessions() as session, session.begin():
        if len(await list_webhook_endpoints(session, ctx.tenant)) >= MAX_ENDPOINTS_PER_TENANT:
            raise ApiError(409, "limit", f"at most {MAX_ENDPOINTS_PER_TENANT} endpoints")
        made = await create_webhook_endpoint(
            session, ctx.rt.box, tenant_id=ctx.tenant, url=url, event_types=types
        )
    return _json({**_endpoint(made.endpoint), "secret": made.secret}, 201)


@route("GET", "/webhooks/endpoints/{endpoint_id}", "admin", "One webhook endpoint")
async def endpoints_get(request: web.Request, ctx: Ctx) -> web.Response:
    return _json(_endpoint(await _own_endpoint(ctx, _path_id(request, "endpoint_id"))))


@route("PATCH", "/webhooks/endpoints/{endpoint_id}", "admin", "Change URL, event types, enabled")
async def endpoints_update(request: web.Request, ctx: Ctx) -> web.Response:
    endpoint = await _own_endpoint(ctx, _path_id(request, "endpoint_id"))
    body = await _body(request, EndpointPatch)
    types = None if body.event_types is None else _types(body.event_types)
    url = None if body.url is None else await _checked_url(body.url)
    async with ctx.rt.sessions() as session, session.begin():
        changed = await update_webhook_endpoint(
            session, endpoint.id, url=url, event_types=types, enabled=body.enabled
        )
    return _json(_endpoint(changed))


@route("DELETE", "/webhooks/endpoints/{endpoint_id}", "admin", "Remove an endpoint")
async def endpoints_delete(request: web.Request, ctx: Ctx) -> web.Response:
    endpoint = await _own_endpoint(ctx, _path_id(request, "endpoint_id"))
    async with ctx.rt.sessions() as session, session.begin():
        await delete_webhook_endpoint(session, endpoint.id)
    return web.Response(status=204)


@route(
    "POST", "/webhooks/endpoints/{endpoint_id}/rotate-secret", "admin",
    "A new signing secret (shown once); the old one also signs during the grace period",
)  # fmt: skip
async def endpoints_rotate(request: web.Request, ctx: Ctx) -> web.Response:
    endpoint = await _own_endpoint(ctx, _path_id(request, "endpoint_id"))
    body = await _body(request, RotateIn)
    grace = body.grace_seconds
    if grace is None:
        grace = int(webhook_settings().rotation_grace_s)
    async with ctx.rt.sessions() as session, session.begin():
        secret = await rotate_webhook_secret(
            session, ctx.rt.box, endpoint.id, grace=timedelta(seconds=grace)
        )
        rotated = await get_webhook_endpoint(session, endpoint.id)
    assert rotated is not None
    return _json({**_endpoint(rotated), "secret": secret})


@route("POST", "/webhooks/endpoints/{endpoint_id}/test", "admin", "Send a webhook.test event")
async def endpoints_test(request: web.Request, ctx: Ctx) -> web.Response:
    endpoint = await _own_endpoint(ctx, _path_id(request, "endpoint_id"))
    async with ctx.rt.sessions() as session, session.begin():
        emitted = await emit_event(
            session, ctx.tenant, "webhook.test",
            {"endpoint_id": str(endpoint.id), "message": "This is a test event."},
            endpoint_id=endpoint.id,
        )  # fmt: skip
    await _enqueue(ctx, emitted.dispatches)
    return _json({"event_id": emitted.event.id}, 202)


@route("GET", "/webhooks/events", "admin", "Events, newest first, with each delivery's state")
async def events_list(request: web.Request, ctx: Ctx) -> web.Response:
    limit = _query_int(request, "limit", 50, 1, MAX_PAGE)
    endpoint_id = _query_uuid(request, "endpoint_id")
    event_type = request.query.get("type") or None
    status = request.query.get("status") or None
    if status is not None and status not in DISPATCH_STATUSES:
        raise ApiError(400, "invalid", "status must be pending, delivered or failed", "status")
    since = _query_time(request, "since")
    before = None
    cursor = request.query.get("cursor")
    if cursor:
        try:
            at, _, last = cursor.rpartition("~")
            before = (datetime.fromisoformat(at), uuid.UUID(last))
            if before[0].tzinfo is None:
                raise ValueError
        except ValueError:
            raise ApiError(400, "invalid", "not a cursor this API gave", "cursor") from None
    async with ctx.rt.sessions() as session:
        events = await list_webhook_events(
            session, ctx.tenant, event_type=event_type, endpoint_id=endpoint_id,
            status=status, since=since, before=before, limit=limit,
        )  # fmt: skip
    last_event = events[-1].event if len(events) == limit else None
    return _json(
        {
            "items": [_event(e) for e in events],
            "next_cursor": None
            if last_event is None
            else f"{last_event.created_at.isoformat()}~{last_event.id}",
        }
    )


def _query_time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise ApiError(400, "invalid", f"{name} must be an ISO time with a zone", name)
    return value


@route("GET", "/webhooks/events/{event_id}", "admin", "One event, its deliveries and attempts")
async def events_get(request: web.Request, ctx: Ctx) -> web.Response:
    event = await _own_event(ctx, _path_id(request, "event_id"))
    async with ctx.rt.sessions() as session:
        attempts = await list_delivery_attempts(session, event_id=event.event.id, limit=MAX_PAGE)
    return _json({**_event(event), "attempts": [_attempt(a) for a in attempts]})


@route("POST", "/webhooks/events/{event_id}/replay", "admin", "Deliver an event again")
async def events_replay(request: web.Request, ctx: Ctx) -> web.Response:
    event = await _own_event(ctx, _path_id(request, "event_id"))
    body = await _body(request, ReplayIn)
    if body.endpoint_id is not None:
        targets = [(await _own_endpoint(ctx, body.endpoint_id)).id]
    else:
        targets = [d.endpoint_id for d in event.dispatches]
    refs = []
    async with ctx.rt.sessions() as session, session.begin():
        for target in targets:
            ref = await replay_dispatch(session, event.event.id, target)
            if ref is not None:
                refs.append(ref)
    await _enqueue(ctx, refs)
    return _json({"replayed": [str(r.endpoint_id) for r in refs]}, 202)


@route("POST", "/webhooks/recover", "admin", "Replay every delivery that failed since a time")
async def recover(request: web.Request, ctx: Ctx) -> web.Response:
    body = await _body(request, RecoverIn)
    if body.until is not None and body.until <= body.since:
        raise ApiError(400, "invalid", "until must be after since", "until")
    if (body.until or datetime.now(body.since.tzinfo)) - body.since > RECOVERY_WINDOW:
        raise ApiError(400, "invalid", "recover at most 14 days at a time", "since")
    if body.endpoint_id is not None:
        await _own_endpoint(ctx, body.endpoint_id)
    async with ctx.rt.sessions() as session, session.begin():
        refs = await recover_failed(
            session, ctx.tenant, since=body.since, until=body.until,
            endpoint_id=body.endpoint_id, limit=10_000,
        )  # fmt: skip
    await _enqueue(ctx, refs)
    return _json({"replayed": len(refs)}, 202)
