"""Helpers shared by the gateway's pipeline tests."""

from __future__ import annotations

import uuid
from typing import Any

from chat_domain import (
    WhatsAppCloudConfig,
    WhatsAppCloudSecrets,
    WidgetConfig,
    create_channel,
    create_chatbot,
    create_plan,
    create_tenant,
)
from chat_pipeline import Runtime
from queue_core import Job, Queue


async def _tenant(
    rt: Runtime,
    *,
    price: int = 1900,
    messages_per_month: int | None = None,
    provider_url: str | None = None,
) -> dict[str, Any]:
    async with rt.sessions() as s, s.begin():
        plan = await create_plan(
            s,
            name=f"P-{uuid.uuid4().hex[:8]}",
            monthly_price_cents=price,
            messages_per_month=messages_per_month,
        )
        tenant = await create_tenant(s, name="T", plan_id=plan.id)
        bot = await create_chatbot(
            s,
            rt.box,
            tenant_id=tenant.id,
            name="B",
            model="fake-model",
            provider_base_url=provider_url,
            provider_api_key="k" if provider_url else None,
            fallback_reply="FALLBACK",
        )
        widget = await create_channel(s, rt.box, chatbot_id=bot.id, config=WidgetConfig())
        wa = await create_channel(
            s,
            rt.box,
            chatbot_id=bot.id,
            config=WhatsAppCloudConfig(phone_number_id=f"pn-{uuid.uuid4().hex[:8]}"),
            secrets=WhatsAppCloudSecrets(access_token="t", app_secret="a", verify_token="v"),
        )
    return {"tenant": tenant.id, "bot": bot.id, "widget": widget.id, "wa": wa.id}


def _job(queue: Queue, data: dict[str, Any], attempts: int = 1, made: int = 0) -> Job:
    job = Job(queue, "test", "x", data)
    job.attempts = attempts
    job.attempts_made = made
    return job
