"""The one send processor: what every channel's sender would otherwise repeat.

For each stored reply routed to a channel queue: skip it if the database says it went out
(`sent` or beyond — a status webhook can arrive before the send call returns); wait while the
channel is paused (its circuit is open, or the provider asked it to slow down) or over its
per-number rate, without using the message's attempts; send through the channel's `Sender`;
record the channel's message id and `sent`; count usage. The sender's typed failures decide the
rest (`chat_pipeline.channels.base`): throttled → slow the channel (or only this recipient);
permanent → the message is `failed` with the code; channel-fatal → the channel's circuit opens
(its messages stay queued, the tenant is told) until its settings change or a probe succeeds;
retryable → the queue retries with backoff, and an ambiguous failure is never sent again once a
status webhook shows the first try went out.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from chat_domain import (
    ChannelView,
    get_channel,
    get_channel_secrets,
    get_message,
    set_provider_id,
    update_delivery_status,
)
from chat_domain.payloads import OutgoingMessage
from chat_domain.types import DELIVERY_STATUS_RANK
from chat_domain.webhooks import DispatchRef
from chat_pipeline.cache import TTLCache
from chat_pipeline.channels.base import (
    ChannelFatalError,
    OutboundText,
    PermanentSendError,
    RetryableSendError,
    Sender,
    SendError,
    ThrottledError,
)
from chat_pipeline.errors import DEPENDENCY_ERRORS
from chat_pipeline.events import STATUS_EVENTS, status_data
from chat_pipeline.runtime import Runtime
from queue_core import DelayJob, GroupRateLimitError, Job, Queue

__all__ = ["ChannelGate", "CircuitState", "GateCheck", "SendProcessor", "SenderFactory"]

log = logging.getLogger("chat_pipeline.send")

SenderFactory = Callable[[ChannelView, Any, Runtime], Sender]
"""(channel, its decrypted secrets, runtime) -> a Sender for it."""

CIRCUIT_PROBE_MS = 60_000  # an open circuit lets one send through this often (half-open)
STOPPED_KEY = "chan:stopped"  # ids of the channels whose circuit is open

# KEYS[1] = the last applied time; ARGV = (this report's time, ms to keep it)
_SET_IF_NEWER = """
local seen = tonumber(redis.call('GET', KEYS[1]) or '-1')
local at = tonumber(ARGV[1])
if at < seen then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# GCRA, as queue-core's own limits: `max` sends per `ms` across every replica, bursts up to
# `max`. Returns 0 (send now, counted) or the ms to wait.
_RATE = """
local key, max, dur = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per = dur / max
local tat = tonumber(redis.call('GET', key)) or now
if tat < now then tat = now end
if tat - now > dur - per then return math.ceil(tat - now - (dur - per)) end
tat = tat + per
redis.call('SET', key, tat, 'PX', math.ceil(tat - now + dur))
return 0
"""


@dataclass(frozen=True, slots=True)
class CircuitState:
    """Why a channel does not send (an operator reads this in `gateway-admin channels`)."""

    open: bool
    code: str | None = None
    reason: str | None = None
    since: float | None = None  # epoch seconds


@dataclass(frozen=True, slots=True)
class GateCheck:
    wait_ms: int  # how long the channel must not send (0: it may)
    circuit_open: bool  # a send now is the circuit's probe
    parts_sent: int  # parts of this reply that earlier attempts sent


class ChannelGate:
    """Per-channel pauses shared by every replica, in Redis: the circuit (a channel-fatal error
    opened it), a hold (the provider throttled the channel) and the per-number send rate.
    Messages that wait on a paused channel are parked under it, so whoever resumes the channel
    (new settings, a QR session working again, a probe that went through) starts them at once
    instead of after their delay."""

    PARKED_TTL_S = 7 * 86_400

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._rate = redis.register_script(_RATE)
        self._newer = redis.register_script(_SET_IF_NEWER)

    @staticmethod
    def _key(kind: str, channel_id: uuid.UUID) -> str:
        return f"chan:{kind}:{channel_id}"

    async def check(self, channel_id: uuid.UUID, message_id: uuid.UUID | None = None) -> GateCheck:
        """One round trip: may the channel send, is this send a probe, what went out already."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.pttl(self._key("probe", channel_id))
        pipe.pttl(self._key("hold", channel_id))
        pipe.exists(self._key("circuit", channel_id))
        if message_id is not None:
            pipe.get(f"chan:parts:{message_id}")
        probe, hold, circuit, *parts = await pipe.execute()
        return GateCheck(
            wait_ms=max(0, int(probe), int(hold)),
            circuit_open=bool(circuit),
            parts_sent=int(parts[0] or 0) if parts else 0,
        )

    async def wait_ms(self, channel_id: uuid.UUID) -> int:
        """How long this channel must not send (0: it may)."""
        return (await self.check(channel_id)).wait_ms

    async def take(self, channel_id: uuid.UUID, per_second: int) -> int:
        """Count one send against the channel's rate; 0, or the ms to wait first."""
        key = self._key("rate", channel_id)
        return int(await self._rate(keys=[key], args=[per_second, 1000]))

    async def claim_probe(self, channel_id: uuid.UUID) -> bool:
        """Whether this send is the open circuit's one probe. Parked messages all wake when the
        probe interval ends; without a claim every one of them would probe at once."""
        key = self._key("probe", channel_id)
        return bool(await self.redis.set(key, "1", px=CIRCUIT_PROBE_MS, nx=True))

    async def session_state_is_newest(self, channel_id: uuid.UUID, at_ms: int) -> bool:
        """Record that the channel's QR session reported a state at `at_ms` (the service's own
        clock); False when a later report was applied already. Services retry webhooks with
        backoff, so an old WORKING can arrive after a newer FAILED."""
        key = self._key("session_at", channel_id)
        return bool(await self._newer(keys=[key], args=[at_ms, self.PARKED_TTL_S * 1000]))

    async def hold(self, channel_id: uuid.UUID, ms: int) -> None:
        await self.redis.set(self._key("hold", channel_id), "1", px=max(1, ms))

    async def open(self, channel_id: uuid.UUID, code: str | None, reason: str) -> bool:
        """Stop the channel's sends; True when it was sending until now."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self._key("circuit", channel_id))
        pipe.hset(
            self._key("circuit", channel_id),
            mapping={"code": code or "", "reason": reason[:300], "since": time.time()},
        )
        # the next send is a probe, one interval from now
        pipe.set(self._key("probe", channel_id), "1", px=CIRCUIT_PROBE_MS)
        pipe.sadd(STOPPED_KEY, str(channel_id))
        was_open, *_ = await pipe.execute()
        return not was_open

    async def park(self, channel_id: uuid.UUID, job_id: str) -> None:
        """`job_id` waits (delayed) until the channel resumes."""
        key = self._key("parked", channel_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(key, job_id)
        pipe.expire(key, self.PARKED_TTL_S)
        await pipe.execute()

    async def parts_sent(self, message_id: uuid.UUID) -> int:
        """How many parts of a long reply earlier attempts sent."""
        raw = await self.redis.get(f"chan:parts:{message_id}")
        return int(raw or 0)

    async def note_parts_sent(self, message_id: uuid.UUID, count: int) -> None:
        await self.redis.set(f"chan:parts:{message_id}", count, ex=86_400)

    async def close(self, channel_id: uuid.UUID) -> bool:
        """The channel may send again; True when it had been stopped. Its parked messages still
        wait for their delay: `resume` also starts them."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self._key("circuit", channel_id), self._key("probe", channel_id))
        pipe.srem(STOPPED_KEY, str(channel_id))
        removed, _ = await pipe.execute()
        return bool(removed)

    async def stopped(self) -> dict[str, str]:
        """Every channel whose circuit is open, with the code that opened it (for /metrics)."""
        ids = sorted(
            m.decode() if isinstance(m, bytes) else str(m)
            for m in await self.redis.smembers(STOPPED_KEY)
        )
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for channel_id in ids:
            pipe.hget(f"chan:circuit:{channel_id}", "code")
        codes = await pipe.execute()
        out: dict[str, str] = {}
        for channel_id, code in zip(ids, codes, strict=True):
            if code is not None:  # closed meanwhile
                out[channel_id] = code.decode() if isinstance(code, bytes) else str(code)
        return out

    async def resume(self, channel_id: uuid.UUID, queue: Queue) -> int:
        """Close the circuit and start the messages parked under it now; how many started.
        A message that parks itself between the two may still wait out its delay (at most one
        probe interval), when it goes out as the probe."""
        await self.close(channel_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.smembers(self._key("parked", channel_id))
        pipe.delete(self._key("parked", channel_id))
        members, _ = await pipe.execute()
        ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        started = 0
        for at in range(0, len(ids), 500):
            started += await queue.promote_jobs(job_ids=ids[at : at + 500])
        return started

    async def state(self, channel_id: uuid.UUID) -> CircuitState:
        raw = await self.redis.hgetall(self._key("circuit", channel_id))
        if not raw:
            return CircuitState(open=False)
        h = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}

        def text(name: str) -> str | None:
            value = h.get(name)
            value = value.decode() if isinstance(value, bytes) else value
            return value or None

        since = text("since")
        return CircuitState(
            open=True, code=text("code"), reason=text("reason"), since=float(since or 0)
        )


class SendProcessor:
    def __init__(
        self,
        rt: Runtime,
        make_sender: SenderFactory,
        *,
        per_second: int = 80,
        on_sent: Callable[[OutgoingMessage, tuple[str, ...]], Awaitable[None]] | None = None,
    ) -> None:
        self.rt = rt
        self.make_sender = make_sender
        self.per_second = per_second
        self.gate = ChannelGate(rt.redis)
        self.on_sent = on_sent
        # a channel's sender is rebuilt when its settings change (within the cache's 5 s)
        self._channels: TTLCache[uuid.UUID, tuple[ChannelView, Any] | None] = TTLCache()
        self._senders: dict[uuid.UUID, tuple[object, Sender]] = {}

    async def close(self) -> None:
        for _, sender in self._senders.values():
            await sender.aclose()
        self._senders.clear()

    async def _sender(self, channel_id: uuid.UUID) -> Sender | None:
        async def load() -> tuple[ChannelView, Any] | None:
            async with self.rt.sessions() as session:
                channel = await get_channel(session, channel_id)
                if channel is None or not channel.active:
                    return None
                return channel, await get_channel_secrets(session, self.rt.box, channel_id)

        loaded = await self._channels.get(channel_id, load)
        if loaded is None:
            return None
        stamp, current = self._senders.get(channel_id, (None, None))
        if current is not None and stamp is loaded:
            return current
        if current is not None:
            await current.aclose()
        sender = self.make_sender(loaded[0], loaded[1], self.rt)
        self._senders[channel_id] = (loaded, sender)
        return sender

    async def typing(self, data: dict[str, Any]) -> str:
        """A best-effort hint to the user that the bot is answering (mark read + typing)."""
        try:
            channel_id = uuid.UUID(str(data["channel_id"]))
            external_id = str(data["external_message_id"])
        except (KeyError, ValueError):
            return "invalid"
        if await self.gate.wait_ms(channel_id):
            return "paused"
        sender = await self._sender(channel_id)
        hint = getattr(sender, "typing", None)
        if hint is None:
            return "unsupported"
        return "shown" if await hint(external_id) else "not-shown"

    async def _went_out(self, message_id: uuid.UUID) -> bool:
        async with self.rt.sessions() as session:
            message = await get_message(session, message_id)
        return (
            message is None or DELIVERY_STATUS_RANK[message.status] >= DELIVERY_STATUS_RANK["sent"]
        )

    async def __call__(self, job: Job) -> str:
        out = OutgoingMessage.model_validate(job.data)
        if await self._went_out(out.message_id):
            return "already-sent"  # sent by an earlier run, or a status webhook said so
        gate = await self.gate.check(out.channel_id, out.message_id)
        if (
            not gate.wait_ms
            and gate.circuit_open
            and not await self.gate.claim_probe(out.channel_id)
        ):
            # another send is the probe: wait for its outcome (at least a moment, should
            # its claim have just lapsed)
            again = await self.gate.check(out.channel_id, out.message_id)
            gate = GateCheck(max(1, again.wait_ms), again.circuit_open, again.parts_sent)
        if gate.wait_ms:
            # paused channel: the message waits, no attempt is used, until the channel resumes
            await self.gate.park(out.channel_id, job.id)
            raise DelayJob(gate.wait_ms)
        sender = await self._sender(out.channel_id)
        if sender is None:
            await self._fail(out, "channel_unavailable", "the channel is gone or disabled")
            return "failed"
        wait = await self.gate.take(out.channel_id, self.per_second)
        if wait:
            raise DelayJob(wait)
        done = gate.parts_sent
        try:
            result = await sender.send_text(
                OutboundText(
                    message_id=out.message_id,
                    conversation_id=out.conversation_id,
                    recipient=out.recipient_external_id,
                    text=out.text,
                    skip_parts=done,
                    reply_to_external_id=out.reply_to_external_id,
                )
            )
        except SendError as exc:
            # parts of a long reply that went out are never sent again by a later attempt
            sent_ids = getattr(exc, "sent_external_ids", ()) or ()
            sent_now = int(getattr(exc, "sent_parts", len(sent_ids)))
            if sent_now:
                await self.gate.note_parts_sent(out.message_id, done + sent_now)
            return await self._failed(job, out, exc)
        await self._record(out, result.external_ids, status="sent")
        if gate.circuit_open:  # the probe went through: the channel works again
            started = await self.gate.resume(out.channel_id, job.queue)
            log.info("channel %s sends again; %d waiting messages started", out.channel_id, started)
            await self._channel_event(out, "sending")
        self.rt.usage.record(out.tenant_id, "whatsapp_send", dedupe_key=f"send:{out.message_id}")
        if self.on_sent is not None:
            await self.on_sent(out, result.external_ids)
        return "sent"

    async def _failed(self, job: Job, out: OutgoingMessage, exc: SendError) -> str:
        """What a typed send failure means for this message and its channel."""
        if isinstance(exc, ThrottledError):
            ms = max(1, int(exc.delay_s * 1000))
            if exc.scope == "recipient":
                raise GroupRateLimitError(ms) from exc  # only this conversation waits
            await self.gate.hold(out.channel_id, ms)
            raise DelayJob(ms) from exc
        if isinstance(exc, ChannelFatalError):
            # the fix is new settings (a token, a service address): whoever resumes the channel
            # after `channels update` must not meet these cached ones again, or its messages
            # fail as before and wait a whole probe interval
            self._channels.forget(out.channel_id)
            if await self.gate.open(out.channel_id, exc.code, str(exc)):
                await self._channel_event(out, "stopped", exc.code)
            log.error(
                "channel %s stopped sending (%s): its messages wait until it is fixed",
                out.channel_id,
                exc.code or type(exc).__name__,
            )
            await self.gate.park(out.channel_id, job.id)
            raise DelayJob(CIRCUIT_PROBE_MS) from exc
        if isinstance(exc, PermanentSendError):
            await self._fail(out, exc.code or "permanent", str(exc))
            return "failed"
        sent_ids = tuple(getattr(exc, "sent_external_ids", ()) or ())
        if sent_ids:
            await self._record(out, sent_ids, status=None)  # parts already out: keep ids
        if (
            isinstance(exc, RetryableSendError)
            and exc.ambiguous
            and await self._went_out(out.message_id)
        ):
            return "sent"  # the first try went out: a status webhook said so meanwhile
        raise exc  # retryable (or an untyped SendError): the queue retries with backoff

    async def _record(
        self, out: OutgoingMessage, external_ids: tuple[str, ...], *, status: str | None
    ) -> None:
        dispatches = []
        async with self.rt.sessions() as session, session.begin():
            if external_ids:
                # status webhooks name the first part's id; later parts follow it
                await set_provider_id(session, out.message_id, external_ids[0])
            if status == "sent" and await update_delivery_status(session, out.message_id, "sent"):
                dispatches = await self._event(session, out, "sent")
        await self.rt.events.send(dispatches)

    async def _fail(self, out: OutgoingMessage, code: str, text: str) -> None:
        dispatches = []
        async with self.rt.sessions() as session, session.begin():
            if await update_delivery_status(
                session, out.message_id, "failed", error_code=code[:100], error_text=text[:500]
            ):
                dispatches = await self._event(session, out, "failed", code[:100])
        await self.rt.events.send(dispatches)
        log.warning("message %s not sent: %s", out.message_id, code)

    async def _channel_event(
        self, out: OutgoingMessage, status: str, code: str | None = None
    ) -> None:
        """`channel.status_changed` for the tenant (best effort: the sends matter more)."""
        data = {"channel_id": str(out.channel_id), "kind": out.channel_kind, "status": status}
        if code:
            data["code"] = code
        try:
            async with self.rt.sessions() as session, session.begin():
                dispatches = await self.rt.events.emit(
                    session, out.tenant_id, "channel.status_changed", data
                )
            await self.rt.events.send(dispatches)
        except DEPENDENCY_ERRORS as exc:
            log.warning("channel %s: status event not stored (%s)", out.channel_id, exc)

    async def _event(
        self, session: Any, out: OutgoingMessage, status: str, code: str | None = None
    ) -> list[DispatchRef]:
        data = status_data(out.message_id, out.conversation_id, out.channel_id, status, code)
        return await self.rt.events.emit(session, out.tenant_id, STATUS_EVENTS[status], data)
