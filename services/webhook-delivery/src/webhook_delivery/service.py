"""The webhook-delivery service: the delivery worker and the outbox relay."""

from __future__ import annotations

import asyncio
import logging

from chat_pipeline import PipelineSettings, Runtime
from chat_pipeline.consumer import pipeline_worker, serve_workers
from chat_pipeline.webhooks import WebhookSettings, webhook_queue, webhook_queue_settings
from webhook_delivery.worker import DeliveryProcessor, Relay

__all__ = ["SERVICE", "run_delivery"]

SERVICE = "webhook-delivery"
log = logging.getLogger("webhook_delivery")


async def run_delivery(
    settings: PipelineSettings, stop: asyncio.Event, webhooks: WebhookSettings | None = None
) -> None:
    """Run until `stop` is set; raises if the queue worker dies (the process then exits and is
    restarted). With no endpoints it idles: a blocked worker and one small query per relay
    round."""
    wh = webhooks or WebhookSettings.from_env()
    rt = await Runtime.start(settings)
    queue = webhook_queue(rt.redis)
    processor = DeliveryProcessor(rt.sessions, rt.box, queue, wh)
    relay_stop = asyncio.Event()
    try:
        await queue.configure(webhook_queue_settings(wh.endpoint_concurrency))
        worker = pipeline_worker(
            rt, queue, processor, concurrency=wh.concurrency, lock_ms=wh.lock_ms
        )
        relay = Relay(rt.sessions, queue, wh)
        log.info("webhook-delivery running (concurrency %d, %d per endpoint, timeout %g s)",
                 wh.concurrency, wh.endpoint_concurrency, wh.timeout_s)  # fmt: skip
        await serve_workers(SERVICE, stop, [worker], tasks=[relay.run(relay_stop)])
    finally:
        relay_stop.set()
        await processor.close()
        await rt.close()
