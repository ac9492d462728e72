from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    SecretBox,
    create_webhook_endpoint,
    endpoints_for_event,
    get_webhook_endpoint,
    get_webhook_event,
    record_delivery_attempt,
    record_webhook_event,
    set_webhook_endpoint_enabled,
)
from tests.domain.helpers import World


async def test_endpoints_events_and_attempts(
    session_factory: async_sessionmaker[AsyncSession], world: World, box: SecretBox
) -> None:
    t = world.tenant.id
    async with session_factory() as session, session.begin():
        messages = await create_webhook_endpoint(
            session, box, tenant_id=t, url="https://a.invalid/h", event_types=["message.received"]
        )
        everything = await create_webhook_endpoint(
            session, box, tenant_id=t, url="https://b.invalid/h", event_types=["*"], secret="given"
        )
        event = await record_webhook_event(
            session,
            tenant_id=t,
            event_type="message.received",
            payload={"text": "hi", "n": 1},
            dedupe_key=f"{t}:m1",
        )
        again = await record_webhook_event(
            session,
            tenant_id=t,
            event_type="message.received",
            payload={"text": "changed"},
            dedupe_key=f"{t}:m1",
        )
    assert everything.secret == "given"
    assert again.id == event.id
    assert again.payload == {"text": "hi", "n": 1}

    async with session_factory() as session, session.begin():
        targets = await endpoints_for_event(session, t, "message.received")
        assert {e.id for e in targets} == {messages.endpoint.id, everything.endpoint.id}
        others = await endpoints_for_event(session, t, "conversation.resolved")
        assert [e.id for e in others] == [everything.endpoint.id]

        assert await record_delivery_attempt(
            session,
            event_id=event.id,
            endpoint_id=messages.endpoint.id,
            attempt=1,
            status_code=500,
            duration_ms=120,
            response_excerpt="x" * 5000,
        )
        assert not await record_delivery_attempt(  # the retried job logs nothing twice
            session,
            event_id=event.id,
            endpoint_id=messages.endpoint.id,
            attempt=1,
            status_code=500,
            duration_ms=120,
        )
        await set_webhook_endpoint_enabled(session, messages.endpoint.id, False, reason="410 Gone")
    async with session_factory() as session:
        disabled = await get_webhook_endpoint(session, messages.endpoint.id)
        assert disabled is not None
        assert (disabled.enabled, disabled.disabled_reason) == (False, "410 Gone")
        targets = await endpoints_for_event(session, t, "message.received")
        assert [e.id for e in targets] == [everything.endpoint.id]
        stored = await get_webhook_event(session, event.id)
        assert stored is not None
        assert stored.payload == {"text": "hi", "n": 1}
