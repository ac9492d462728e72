"""The ai-processing worker: answer a conversation, store the reply, hand it to delivery."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from ai_worker.llm import (
    Completion,
    LLMClientCache,
    LLMError,
    PermanentLLMError,
    ProviderConfig,
    RetryableLLMError,
)
from ai_worker.offline import OfflineResponder
from ai_worker.prompt import build_messages
from chat_domain import (
    AlreadyAnsweredError,
    ChannelView,
    ChatbotSecrets,
    ChatbotView,
    ChunkHit,
    ContactView,
    MessageView,
    QueuePriority,
    get_channel,
    get_chatbot,
    get_chatbot_secrets,
    get_contact,
    get_conversation,
    get_message_by_external_id,
    get_queue_priority,
    history_for_prompt,
    recent_messages,
    search_chunks,
    set_conversation_status,
    store_reply,
    unanswered_messages,
)
from chat_domain.payloads import AIRequest, OutgoingMessage
from chat_domain.types import ChannelKind
from chat_domain.webhooks import DispatchRef
from chat_pipeline import PipelineSettings, Runtime
from chat_pipeline.cache import TTLCache
from chat_pipeline.consumer import pipeline_worker, serve_workers
from chat_pipeline.events import conversation_status_data
from chat_pipeline.handoff import asks_for_a_person, failed_in_a_row
from chat_pipeline.live import publish, status_frame, typing_frame, visitor_channel
from chat_pipeline.reconcile import answer_with_fallback
from queue_core import DelayJob, Job

__all__ = ["AnswerProcessor", "llm_backoff", "run_worker"]

log = logging.getLogger("ai_worker")


@dataclass(frozen=True, slots=True)
class _Context:
    """What one answer needs, read in one short database transaction."""

    chatbot: ChatbotView
    provider: ProviderConfig | None
    history: list[MessageView]
    pending: list[MessageView]  # the user's messages this answer replies to
    knowledge: list[ChunkHit]
    channel_id: uuid.UUID
    channel_kind: ChannelKind
    recipient: str
    plan: QueuePriority
    routable: bool  # the channel and contact still exist


def llm_backoff(base_ms: int, cap_ms: int = 60_000) -> Callable[[int, BaseException, Job], int]:
    """Backoff for LLM calls: the provider's Retry-After when it sent one, else exponential
    with jitter."""

    def strategy(attempts_made: int, exc: BaseException, job: Job) -> int:
        if isinstance(exc, RetryableLLMError) and exc.retry_after_s:
            return min(cap_ms, int(exc.retry_after_s * 1000))
        delay = base_ms * 2 ** max(0, attempts_made - 1)
        return min(cap_ms, int(delay * (0.7 + 0.3 * random.random())))

    return strategy


class AnswerProcessor:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.settings: PipelineSettings = rt.settings
        self.clients = LLMClientCache()
        self.offline = OfflineResponder()
        # configuration read for every answer, cached briefly (changes apply within seconds)
        self._bots: TTLCache[uuid.UUID, tuple[ChatbotView, ChatbotSecrets] | None] = TTLCache()
        self._routes: TTLCache[
            tuple[uuid.UUID, uuid.UUID], tuple[ChannelView | None, ContactView | None]
        ] = TTLCache()

    async def close(self) -> None:
        await self.clients.aclose()

    async def __call__(self, job: Job) -> str:
        req = AIRequest.model_validate(job.data)
        # The answer's own key: a rerun of this job finds the reply its earlier run stored.
        # (Jobs queued before request ids existed keep their old key.)
        if req.request_id is not None:
            reply_key = f"ai:{req.request_id}"
        else:
            reply_key = f"ai:{req.conversation_id}:{req.up_to_seq}"
        ctx = await self._context(req, reply_key)
        if isinstance(ctx, str):
            return ctx
        if any(asks_for_a_person(m.text, ctx.chatbot.handoff_phrases) for m in ctx.pending):
            return await self._store_and_send(req, ctx, reply_key, None, None, handoff=True)
        channel = None  # widget visitors see a typing indicator while the answer is made
        if ctx.channel_kind == "widget":
            channel = visitor_channel(ctx.channel_id, ctx.recipient)
            await self._best_effort(channel, typing_frame(True))
        try:
            completion = await self._answer(job, ctx)
        finally:
            if channel is not None:
                await self._best_effort(channel, typing_frame(False))
        return await self._store_and_send(req, ctx, reply_key, completion, channel)

    async def _best_effort(self, channel: str, frame: dict[str, object]) -> None:
        """A live hint (typing, read ticks): losing one costs nothing, so it never fails the
        job (a Redis blip right after the model answered used to throw the answer away)."""
        try:
            await publish(self.rt.redis, channel, frame)
        except Exception as exc:
            log.warning("live update on %s not published (%s)", channel, type(exc).__name__)

    async def _context(self, req: AIRequest, reply_key: str) -> _Context | str:
        async with self.rt.sessions() as session:
            conversation = await get_conversation(session, req.conversation_id)
            if conversation is None:
                return "no-bot"
            existing = await get_message_by_external_id(
                session, channel_id=conversation.channel_id, external_id=reply_key
            )
            if existing is not None:
                # An earlier run stored the reply and stopped before handing it on (it was
                # killed): hand it on, idempotently, instead of answering twice. Checked before
                # the status: a reply stored just before an agent took over still goes out.
                if existing.status == "queued":
                    await self._send(req, existing, session)
                return "resent"
            if conversation.status != "open":
                return "no-bot"  # handed to a human (or resolved) since the message came in

            async def load_bot() -> tuple[ChatbotView, ChatbotSecrets] | None:
                bot = await get_chatbot(session, req.chatbot_id)
                if bot is None:
                    return None
                return bot, await get_chatbot_secrets(session, self.rt.box, bot.id)

            loaded = await self._bots.get(req.chatbot_id, load_bot)
            if loaded is None:
                return "no-chatbot"
            chatbot, secrets = loaded
            # What this answer covers: the user messages no reply has answered yet, whenever
            # they arrived (a follow-up typed during an earlier model call included); the
            # reply claims exactly these when it is stored.
            pending = await unanswered_messages(session, conversation.id)
            if not pending:
                return "answered"  # an earlier job answered them (or a burst was coalesced)
            recent = await recent_messages(
                session, conversation.id, limit=self.settings.history_messages
            )
            # A question stored after `pending` was read is left to the next answer: the
            # prompt must not ask what this reply will not claim.
            asked = {m.id for m in pending}
            history = history_for_prompt(
                [m for m in recent if m.role != "user" or m.reply_id is not None or m.id in asked]
            )
            question = "\n".join(m.text for m in pending)
            knowledge: list[ChunkHit] = []
            if chatbot.kb_enabled and self.settings.kb_passages:
                knowledge = await search_chunks(
                    session, chatbot.id, question, self.settings.kb_passages
                )
            channel_id, contact_id = conversation.channel_id, conversation.contact_id

            async def load_route() -> tuple[ChannelView | None, ContactView | None]:
                return await get_channel(session, channel_id), await get_contact(
                    session, contact_id
                )

            channel, contact = await self._routes.get((channel_id, contact_id), load_route)
            plan = await get_queue_priority(session, req.tenant_id)
        api_key = secrets.provider_api_key or (
            self.settings.llm_api_key if not chatbot.provider_base_url else ""
        )
        base_url = chatbot.provider_base_url or self.settings.llm_base_url
        provider = None
        if api_key or chatbot.provider_base_url:
            provider = ProviderConfig(
                model=chatbot.model or self.settings.llm_model,
                base_url=base_url,
                api_key=api_key,
                temperature=chatbot.temperature,
                max_tokens=chatbot.max_tokens,
                timeout_s=self.settings.llm_timeout_s,
            )
        return _Context(
            chatbot=chatbot,
            provider=provider,
            history=history,
            pending=pending,
            knowledge=knowledge,
            channel_id=conversation.channel_id,
            channel_kind=channel.kind if channel else "widget",
            recipient=contact.external_id if contact else "",
            plan=plan,
            routable=channel is not None and contact is not None,
        )

    async def _answer(self, job: Job, ctx: _Context) -> Completion | None:
        """The reply, or None for the fallback (the provider failed for good)."""
        if ctx.provider is None:
            question = "\n".join(m.text for m in ctx.pending)
            return self.offline.answer(question, ctx.knowledge)
        messages = build_messages(
            ctx.chatbot.system_prompt,
            ctx.history,
            ctx.knowledge,
            token_budget=self.settings.prompt_token_budget,
            max_history=self.settings.history_messages,
        )
        last_attempt = job.attempts_made + 1 >= job.attempts
        try:
            completion = await self.clients.get(ctx.provider).complete(messages)
        except PermanentLLMError as exc:
            log.warning("chatbot %s: provider refused (%s); fallback reply", ctx.chatbot.id, exc)
            return None
        except RetryableLLMError as exc:
            if last_attempt:
                log.warning(
                    "chatbot %s: provider failed %d times (%s); fallback reply",
                    ctx.chatbot.id,
                    job.attempts,
                    exc,
                )
                return None
            raise  # the queue retries with llm_backoff
        except LLMError as exc:
            log.warning("chatbot %s: provider error (%s); fallback reply", ctx.chatbot.id, exc)
            return None
        return completion if completion.text.strip() else None

    async def _store_and_send(
        self,
        req: AIRequest,
        ctx: _Context,
        reply_key: str,
        completion: Completion | None,
        channel: str | None,
        *,
        handoff: bool = False,
    ) -> str:
        """Store the reply (the fallback when `completion` is None) and hand it on. A user who
        asked for a person (`handoff`), or a fallback that follows enough others, gets the
        chatbot's handoff reply instead, and the conversation goes to the tenant's agents in
        the same transaction: the bot stops answering it."""
        rt = self.rt
        text = completion.text.strip() if completion is not None else ctx.chatbot.fallback_reply
        asked = handoff  # (the user asked; else the bot's failures may hand over below)
        dispatches: list[DispatchRef] = []
        try:
            async with rt.sessions() as session, session.begin():
                failures = self.settings.handoff_after_failures
                if completion is None and not handoff and failures == 1:
                    handoff = True
                elif completion is None and not handoff and failures > 1:
                    # (read only on the failure path: the answered path costs nothing more)
                    recent = await recent_messages(session, req.conversation_id, limit=20)
                    handoff = failed_in_a_row(recent, ctx.chatbot.fallback_reply, failures - 1)
                if handoff:
                    text = ctx.chatbot.handoff_reply
                    await set_conversation_status(session, req.conversation_id, "pending_human")
                    why = "user_asked" if asked else "bot_failing"
                    data = conversation_status_data(
                        req.conversation_id, "pending_human", "open", why
                    )
                    dispatches = await rt.events.emit(
                        session, req.tenant_id, "conversation.status_changed", data
                    )
                result = await store_reply(
                    session,
                    conversation_id=req.conversation_id,
                    answers=[m.id for m in ctx.pending],
                    text=text,
                    external_id=reply_key,
                )
        except AlreadyAnsweredError:
            # Another run (a stale lease) answered some of these questions meanwhile: nothing
            # was stored; run again, without using an attempt, for what is still unanswered.
            log.warning("conversation %s: answered meanwhile; answering again", req.conversation_id)
            raise DelayJob(0) from None
        await rt.events.send(dispatches)
        # Only after the commit: a job queued inside the transaction could reach the outgoing
        # worker before the reply is visible to it (PostgreSQL), which then found no message
        # and dropped it. A crash between commit and queueing reruns this job, which finds
        # the stored reply and hands it on (the "resent" path).
        if ctx.routable:
            # on WhatsApp the reply quotes the newest question it answers (the widget shows
            # replies in order instead)
            quoted = ctx.pending[-1].external_id if ctx.channel_kind != "widget" else None
            await self._enqueue_outgoing(
                req, result.message, ctx.channel_id, ctx.channel_kind, ctx.recipient, ctx.plan,
                reply_to=quoted,
            )  # fmt: skip
        if completion is not None and completion.model != "offline":
            rt.usage.record(
                req.tenant_id,
                "ai_prompt_tokens",
                completion.prompt_tokens,
                model=completion.model,
                dedupe_key=f"{reply_key}:p",
            )
            rt.usage.record(
                req.tenant_id,
                "ai_completion_tokens",
                completion.completion_tokens,
                model=completion.model,
                dedupe_key=f"{reply_key}:c",
            )
        if channel is not None:
            for message in ctx.pending:
                await self._best_effort(channel, status_frame(message.id, "read"))
        if handoff:
            log.info("conversation %s handed to the tenant's agents", req.conversation_id)
            return "handoff"
        return "fallback" if completion is None else "answered"

    async def _send(self, req: AIRequest, message: MessageView, session: AsyncSession) -> None:
        conversation = await get_conversation(session, req.conversation_id)
        channel = await get_channel(session, message.channel_id)
        contact = await get_contact(session, conversation.contact_id) if conversation else None
        plan = await get_queue_priority(session, req.tenant_id)
        if channel is None or contact is None:
            return
        await self._enqueue_outgoing(
            req, message, channel.id, channel.kind, contact.external_id, plan
        )

    async def _enqueue_outgoing(
        self,
        req: AIRequest,
        message: MessageView,
        channel_id: uuid.UUID,
        channel_kind: ChannelKind,
        recipient: str,
        plan: QueuePriority,
        reply_to: str | None = None,
    ) -> None:
        await self.rt.pipeline.enqueue_outgoing(
            OutgoingMessage(
                tenant_id=req.tenant_id,
                conversation_id=req.conversation_id,
                message_id=message.id,
                channel_id=channel_id,
                channel_kind=channel_kind,
                recipient_external_id=recipient,
                text=message.text,
                reply_to_external_id=reply_to,
            ),
            plan,
        )


class DeadLetterProcessor:
    """An answer job that failed for good without answering (its worker died more than
    QUEUE_MAX_STALLS times: a poison conversation) lands in the dead-letter queue; its
    questions get the chatbot's fallback reply at once, never silence. (An answer job's own
    last attempt already falls back; the reconciler covers jobs lost with Redis' data.)"""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def __call__(self, job: Job) -> str:
        req = AIRequest.model_validate(job.data)
        async with self.rt.sessions() as session:
            conversation = await get_conversation(session, req.conversation_id)
            if conversation is None or conversation.status != "open":
                return "no-bot"
            channel = await get_channel(session, conversation.channel_id)
            contact = await get_contact(session, conversation.contact_id)
            plan = await get_queue_priority(session, req.tenant_id)
        if channel is None or contact is None:
            return "unroutable"
        answered = await answer_with_fallback(
            self.rt,
            tenant_id=req.tenant_id,
            chatbot_id=req.chatbot_id,
            conversation_id=req.conversation_id,
            channel_id=channel.id,
            channel_kind=channel.kind,
            recipient=contact.external_id,
            plan=plan,
        )
        if answered:
            log.error(
                "conversation %s: answer job failed for good (%s); fallback reply",
                req.conversation_id,
                job.failed_reason or "dead-lettered",
            )
        return "fallback" if answered else "answered"


async def run_worker(settings: PipelineSettings, stop: asyncio.Event) -> None:
    """Run until `stop` is set; raises if a queue worker dies (the process then exits and is
    restarted)."""
    rt = await Runtime.start(settings)
    processor = AnswerProcessor(rt)
    try:
        ai = rt.pipeline.ai
        await rt.pipeline.configure(ai)
        workers = [
            # a dead worker's job restarts after at most lock + stalled interval
            pipeline_worker(
                rt,
                ai,
                processor,
                concurrency=settings.ai_concurrency,
                lock_ms=settings.ai_lock_ms,
                backoff_strategies={"llm": llm_backoff(settings.ai_backoff_ms)},
            ),
            pipeline_worker(rt, ai.dead_letter_queue(), DeadLetterProcessor(rt), concurrency=2),
        ]
        log.info(
            "ai-worker running (concurrency %d, %s)",
            settings.ai_concurrency,
            "LLM " + settings.llm_base_url if settings.llm_api_key else "offline answers",
        )
        await serve_workers("ai-worker", stop, workers)
    finally:
        await processor.close()
        await rt.close()
