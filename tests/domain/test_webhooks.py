from __future__ import annotations

import base64
import uuid
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_domain import (
    AttemptOutcome,
    SecretBox,
    create_webhook_endpoint,
    emit_event,
    endpoints_for_event,
    finish_attempt,
    get_event_with_dispatches,
    get_webhook_endpoint,
    get_webhook_event,
    list_delivery_attempts,
    list_webhook_events,
    load_delivery,
    overdue_dispatches,
    record_delivery_attempt,
    record_webhook_event,
    recover_failed,
    replay_dispatch,
    rotate_webhook_secret,
    set_webhook_endpoint_enabled,
    touch_dispatch,
)
from chat_domain.models import utcnow
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


# -- the outbox ------------------------------------------------------------------------------

WEEK = timedelta(days=7)


async def _endpoints(
    session_factory: async_sessionmaker[AsyncSession], box: SecretBox, tenant: uuid.UUID
) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    async with session_factory() as session, session.begin():
        received = await create_webhook_endpoint(
            session, box, tenant_id=tenant, url="https://a.invalid/h",
            event_types=["message.received"],
        )  # fmt: skip
        every = await create_webhook_endpoint(
            session, box, tenant_id=tenant, url="https://b.invalid/h", event_types=["*"]
        )
        off = await create_webhook_endpoint(
            session, box, tenant_id=tenant, url="https://c.invalid/h", event_types=["*"]
        )
        await set_webhook_endpoint_enabled(session, off.endpoint.id, False, reason="by hand")
    return received.endpoint.id, every.endpoint.id, off.endpoint.id


async def test_an_event_is_stored_once_with_a_dispatch_per_subscribed_enabled_endpoint(
    session_factory: async_sessionmaker[AsyncSession], world: World, other_world: World,
    box: SecretBox,
) -> None:  # fmt: skip
    t = world.tenant.id
    received, every, _off = await _endpoints(session_factory, box, t)
    other = await _endpoints(session_factory, box, other_world.tenant.id)
    async with session_factory() as session, session.begin():
        first = await emit_event(session, t, "message.received", {"id": "m1"}, dedupe_key="m1")
        sent = await emit_event(session, t, "message.sent", {"id": "m2"})
    assert first.created and {d.endpoint_id for d in first.dispatches} == {received, every}
    assert [d.endpoint_id for d in sent.dispatches] == [every]
    assert len({d.job_id for d in first.dispatches}) == 2
    async with session_factory() as session, session.begin():
        again = await emit_event(session, t, "message.received", {"id": "other"}, dedupe_key="m1")
        # the same key from another tenant is another event
        theirs = await emit_event(
            session, other_world.tenant.id, "message.received", {"id": "x"}, dedupe_key="m1"
        )
    assert not again.created and again.event.id == first.event.id
    assert again.event.payload == {"id": "m1"}
    assert sorted(d.job_id for d in again.dispatches) == sorted(d.job_id for d in first.dispatches)
    assert theirs.created and {d.endpoint_id for d in theirs.dispatches} == set(other[:2])
    async with session_factory() as session:
        with pytest.raises(ValueError, match="unknown webhook event type"):
            await emit_event(session, t, "message.exploded", {})


async def test_an_event_rolled_back_with_its_transaction_leaves_nothing(
    session_factory: async_sessionmaker[AsyncSession], world: World, box: SecretBox
) -> None:
    t = world.tenant.id
    await _endpoints(session_factory, box, t)
    emitted = None

    async def producer() -> None:
        nonlocal emitted
        async with session_factory() as session, session.begin():
            emitted = await emit_event(session, t, "message.sent", {"id": "gone"})
            raise RuntimeError("the producer's change failed")

    with pytest.raises(RuntimeError):
        await producer()
    assert emitted is not None
    async with session_factory() as session:
        assert await get_event_with_dispatches(session, emitted.event.id) is None


async def test_attempts_move_a_dispatch_to_delivered_or_failed_and_replay_starts_over(
    session_factory: async_sessionmaker[AsyncSession], world: World, box: SecretBox
) -> None:
    t = world.tenant.id
    _, every, _ = await _endpoints(session_factory, box, t)
    async with session_factory() as session, session.begin():
        event = (await emit_event(session, t, "message.sent", {"id": "m"})).event
    now = utcnow()
    async with session_factory() as session, session.begin():
        task = await load_delivery(session, box, event.id, every)
        assert task is not None and task.status == "pending" and task.attempts == 0
        assert task.secrets[0].startswith("whsec_")
        assert len(base64.b64decode(task.secrets[0].removeprefix("whsec_"))) == 32
        failed_once = AttemptOutcome(1, 500, 12, None, "boom", False, now + timedelta(seconds=5))
        result = await finish_attempt(
            session, event_id=event.id, endpoint_id=every, outcome=failed_once, disable_after=WEEK
        )
        assert result.status == "pending"
        # the same attempt logged again (a rerun job) changes nothing
        again = await finish_attempt(
            session, event_id=event.id, endpoint_id=every, outcome=failed_once, disable_after=WEEK
        )
        assert again.status == "pending"
        last = AttemptOutcome(2, None, 15000, "timed out", None, False, None)
        assert (
            await finish_attempt(
                session, event_id=event.id, endpoint_id=every, outcome=last, disable_after=WEEK
            )
        ).status == "failed"
    async with session_factory() as session, session.begin():
        failed = await list_webhook_events(session, t, status="failed")
        assert [e.event.id for e in failed] == [event.id]
        assert failed[0].dispatches[0].last_error == "timed out"
        endpoint = await get_webhook_endpoint(session, every)
        assert endpoint is not None and endpoint.consecutive_failures == 2
        refs = await recover_failed(session, t, since=now - timedelta(minutes=1))
        assert [r.generation for r in refs] == [1]
    async with session_factory() as session, session.begin():
        task = await load_delivery(session, box, event.id, every)
        assert task is not None and (task.status, task.round_attempts, task.attempts) == (
            "pending", 0, 2,
        )  # fmt: skip
        ok = AttemptOutcome(3, 204, 5, None, "", True, None)
        done = await finish_attempt(
            session, event_id=event.id, endpoint_id=every, outcome=ok, disable_after=WEEK
        )
        assert done.status == "delivered"
        attempts = await list_delivery_attempts(session, event_id=event.id)
        assert [a.attempt for a in attempts] == [3, 2, 1]
        endpoint = await get_webhook_endpoint(session, every)
        assert endpoint is not None and endpoint.consecutive_failures == 0
        assert endpoint.last_success_at is not None
        replayed = await replay_dispatch(session, event.id, every)
        assert replayed is not None and replayed.generation == 2


async def test_a_410_or_a_long_failure_disables_and_tells_the_other_endpoints(
    session_factory: async_sessionmaker[AsyncSession], world: World, box: SecretBox
) -> None:
    t = world.tenant.id
    received, every, _ = await _endpoints(session_factory, box, t)
    async with session_factory() as session, session.begin():
        event = (await emit_event(session, t, "message.received", {"id": "m"})).event
    long_ago = utcnow() - timedelta(days=6)
    async with session_factory() as session, session.begin():
        first = AttemptOutcome(1, 503, 3, None, None, False, long_ago + timedelta(seconds=5))
        await finish_attempt(
            session, event_id=event.id, endpoint_id=received, outcome=first,
            disable_after=timedelta(days=5), now=long_ago,
        )  # fmt: skip
        later = AttemptOutcome(2, 503, 3, None, None, False, utcnow())
        result = await finish_attempt(
            session, event_id=event.id, endpoint_id=received, outcome=later,
            disable_after=timedelta(days=5),
        )  # fmt: skip
    assert result.endpoint_disabled is not None and "6.0 days" in result.endpoint_disabled
    assert [n.endpoint_id for n in result.notices] == [every]
    async with session_factory() as session, session.begin():
        gone = AttemptOutcome(1, 410, 3, None, None, False, None, disable_reason="410 Gone")
        result = await finish_attempt(
            session, event_id=event.id, endpoint_id=every, outcome=gone, disable_after=WEEK
        )
    assert result.status == "failed" and result.endpoint_disabled == "410 Gone"
    assert result.notices == []  # nobody left to tell
    async with session_factory() as session:
        for endpoint_id, reason in ((received, "no successful"), (every, "410 Gone")):
            endpoint = await get_webhook_endpoint(session, endpoint_id)
            assert endpoint is not None and not endpoint.enabled
            assert endpoint.disabled_reason is not None
            assert endpoint.disabled_reason.startswith(reason)


async def test_rotation_signs_with_both_secrets_until_the_grace_ends(
    session_factory: async_sessionmaker[AsyncSession], world: World, box: SecretBox
) -> None:
    t = world.tenant.id
    _, every, _ = await _endpoints(session_factory, box, t)
    async with session_factory() as session, session.begin():
        event = (await emit_event(session, t, "message.sent", {"id": "m"})).event
        before = (await load_delivery(session, box, event.id, every)).secrets  # type: ignore[union-attr]
        new = await rotate_webhook_secret(session, box, every, grace=timedelta(hours=1))
        during = (await load_delivery(session, box, event.id, every)).secrets  # type: ignore[union-attr]
        after = await load_delivery(
            session, box, event.id, every, now=utcnow() + timedelta(hours=2)
        )
    assert during == (new, before[0])
    assert after is not None and after.secrets == (new,)


async def test_the_relay_finds_overdue_dispatches_and_touching_moves_them_behind(
    session_factory: async_sessionmaker[AsyncSession], world: World, box: SecretBox
) -> None:
    t = world.tenant.id
    _, every, _ = await _endpoints(session_factory, box, t)
    old = utcnow() - timedelta(hours=1)
    async with session_factory() as session, session.begin():
        a = (await emit_event(session, t, "message.sent", {"n": 1}, now=old)).dispatches[0]
        b = (await emit_event(session, t, "message.sent", {"n": 2}, now=old)).dispatches[0]
        fresh = (await emit_event(session, t, "message.sent", {"n": 3})).dispatches[0]
    cutoff = utcnow() - timedelta(minutes=1)
    async with session_factory() as session, session.begin():
        due = await overdue_dispatches(session, older_than=cutoff, limit=10_000)
        mine = [d for d in due if d.endpoint_id == every]
        assert {d.event_id for d in mine} == {a.event_id, b.event_id}
        assert fresh.event_id not in {d.event_id for d in mine}
        touched = await touch_dispatch(session, a, next_generation=True)
        assert touched.generation == 1 and touched.job_id != a.job_id
    async with session_factory() as session:
        due = await overdue_dispatches(session, older_than=cutoff, limit=10_000)
        assert a.event_id not in {d.event_id for d in due}
