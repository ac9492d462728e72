"""The channel kinds the platform sends on, and the one runner of a channel service.

A channel kind is registered here once: its send queue (chat_pipeline.queues), its sender
factory, its send rate and the service that owns the queue. Adding a channel kind means a
module under `chat_pipeline.channels` (parsing, sender, errors), an entry here, and the
gateway's webhook route for its inbound side.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chat_domain import (
    ChannelView,
    WhatsAppCloudConfig,
    WhatsAppCloudSecrets,
    WhatsAppQrConfig,
    WhatsAppQrSecrets,
)
from chat_domain.types import ChannelKind
from chat_pipeline.channels.base import OutboundText, Sender, SendResult
from chat_pipeline.config import PipelineSettings
from chat_pipeline.consumer import pipeline_worker, serve_workers
from chat_pipeline.runtime import Runtime
from chat_pipeline.send import SendProcessor
from queue_core import Job, Queue

__all__ = ["CHANNELS", "ChannelJobs", "ChannelSpec", "run_channel_service"]

log = logging.getLogger("chat_pipeline.channels")


def _cloud_sender(channel: ChannelView, secrets: Any, rt: Runtime) -> Sender:
    from chat_pipeline.channels.whatsapp_cloud import CloudSender

    if not isinstance(channel.config, WhatsAppCloudConfig) or not isinstance(
        secrets, WhatsAppCloudSecrets
    ):
        raise ValueError(f"channel {channel.id} is not a WhatsApp Cloud channel")
    s = rt.settings
    return CloudSender(
        channel.config.phone_number_id,
        secrets.access_token,
        base_url=s.whatsapp_graph_url,
        version=s.whatsapp_graph_version,
        timeout=s.whatsapp_send_timeout_s,
    )


class _GentleQr:
    """A QR sender that shows "typing" for a while before each reply, as a person would: a
    Baileys number that answers instantly and tirelessly is what gets banned."""

    def __init__(self, sender: Any, per_char_ms: int) -> None:
        self.sender = sender
        self.per_char_ms = per_char_ms

    async def send_text(self, message: OutboundText) -> SendResult:
        from chat_pipeline.channels.whatsapp_qr import typing_delay_s

        chat = self.sender._chat(message.recipient)
        delay = typing_delay_s(message.text, per_char_ms=self.per_char_ms, max_s=8.0)
        start = getattr(self.sender, "start_typing", None)
        if start is not None and delay > 0 and await start(chat):
            await asyncio.sleep(delay)
            await self.sender.stop_typing(chat)
        result: SendResult = await self.sender.send_text(message)
        return result

    async def typing(self, external_message_id: str) -> bool:
        return False  # the delay above is the typing indicator

    async def aclose(self) -> None:
        await self.sender.aclose()


def _qr_sender(channel: ChannelView, secrets: Any, rt: Runtime) -> Sender:
    from chat_pipeline.channels.whatsapp_qr import EvolutionSender, WahaSender

    config = channel.config
    if not isinstance(config, WhatsAppQrConfig):
        raise ValueError(f"channel {channel.id} is not a WhatsApp QR channel")
    api_key = secrets.api_key if isinstance(secrets, WhatsAppQrSecrets) else None
    kind = WahaSender if config.service == "waha" else EvolutionSender
    sender = kind(config.base_url, config.session, api_key, timeout=rt.settings.qr_send_timeout_s)
    per_char = rt.settings.qr_typing_ms_per_char
    return _GentleQr(sender, per_char) if per_char > 0 else sender


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    kind: ChannelKind
    service: str  # the service that owns the channel's send queue
    make_sender: Callable[[ChannelView, Any, Runtime], Sender]
    per_second: Callable[[PipelineSettings], int]  # the send rate of one channel (a number)


CHANNELS: dict[ChannelKind, ChannelSpec] = {
    "whatsapp_cloud": ChannelSpec(
        "whatsapp_cloud", "channel-whatsapp-cloud", _cloud_sender, lambda s: s.whatsapp_rate_per_s
    ),
    "whatsapp_qr": ChannelSpec(
        "whatsapp_qr", "channel-whatsapp-qr", _qr_sender, lambda s: s.qr_rate_per_s
    ),
}


class ChannelJobs:
    """A channel queue's jobs: `send` (a stored reply) and `typing` (a best-effort hint that
    the bot is answering a message: mark it read and show the typing indicator)."""

    def __init__(self, sends: SendProcessor) -> None:
        self.sends = sends

    async def __call__(self, job: Job) -> str:
        if job.name == "typing":
            return await self.sends.typing(job.data)
        return await self.sends(job)


def channel_queue(rt: Runtime, kind: ChannelKind) -> Queue:
    queue = rt.pipeline.channel_queue(kind)
    if queue is None:
        raise ValueError(f"no send queue for channel kind {kind!r}")
    return queue


async def run_channel_service(
    kind: ChannelKind, settings: PipelineSettings, stop: asyncio.Event
) -> None:
    """The whole of a channel service: send its channel kind's replies until `stop`."""
    spec = CHANNELS[kind]
    rt = await Runtime.start(settings)
    sends = SendProcessor(rt, spec.make_sender, per_second=spec.per_second(settings))
    try:
        queue = channel_queue(rt, kind)
        await rt.pipeline.configure(queue)
        worker = pipeline_worker(
            rt, queue, ChannelJobs(sends), concurrency=settings.channel_concurrency
        )
        log.info("%s running", spec.service)
        await serve_workers(spec.service, stop, [worker])
    finally:
        await sends.close()
        await rt.close()
