"""Plan limits: may another inbound message be handled this month?"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chat_domain.errors import NotFoundError
from chat_domain.models import Chatbot, Plan, Tenant, utcnow
from chat_domain.plans import QueuePriority, priority_for_price
from chat_domain.usage import monthly_totals, period_of

QuotaReason = Literal["ok", "tenant_suspended", "messages_limit", "ai_tokens_limit"]


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """``allowed`` False comes with the chatbot's configured ``reply_text`` (limit reply) to
    send instead of an AI answer. ``*_limit`` None means unlimited."""

    allowed: bool
    reason: QuotaReason
    reply_text: str | None
    messages_used: int
    messages_limit: int | None
    ai_tokens_used: int
    ai_tokens_limit: int | None
    priority: QueuePriority  # for the jobs this message causes, from the tenant's current plan


async def check_inbound_allowed(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    chatbot_id: uuid.UUID,
    now: datetime | None = None,
) -> QuotaDecision:
    """Whether one more inbound message may be answered in the current calendar month (UTC).

    Allowed while ``message_in`` usage this month is below the plan's messages/month and AI
    tokens (prompt + completion) are below its tokens/month. Reads the running monthly totals
    (one indexed row per kind), so it is cheap enough to call for every message. Totals are as
    fresh as the last ``UsageRecorder`` flush, so a burst can overshoot a limit by up to one
    flush interval's worth of events.
    """
    row = (
        await session.execute(
            select(
                Tenant.status,
                Plan.messages_per_month,
                Plan.ai_tokens_per_month,
                Chatbot.limit_reply,
                Plan.monthly_price_cents,
            )
            .join(Plan, Plan.id == Tenant.plan_id)
            .join(Chatbot, Chatbot.tenant_id == Tenant.id)
            .where(Tenant.id == tenant_id, Chatbot.id == chatbot_id)
        )
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"chatbot {chatbot_id} of tenant {tenant_id} does not exist")
    status, messages_limit, tokens_limit, limit_reply, price_cents = row
    period = period_of(now or utcnow())
    totals = await monthly_totals(session, tenant_id, period // 100, period % 100)
    messages_used = totals.get("message_in", 0)
    tokens_used = totals.get("ai_prompt_tokens", 0) + totals.get("ai_completion_tokens", 0)

    reason: QuotaReason = "ok"
    if status != "active":
        reason = "tenant_suspended"
    elif messages_limit is not None and messages_used >= messages_limit:
        reason = "messages_limit"
    elif tokens_limit is not None and tokens_used >= tokens_limit:
        reason = "ai_tokens_limit"
    allowed = reason == "ok"
    return QuotaDecision(
        allowed=allowed,
        reason=reason,
        reply_text=None if allowed else limit_reply,
        messages_used=messages_used,
        messages_limit=messages_limit,
        ai_tokens_used=tokens_used,
        ai_tokens_limit=tokens_limit,
        priority=priority_for_price(price_cents),
    )
