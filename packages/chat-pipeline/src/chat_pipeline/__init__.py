"""What the platform's services share: settings, queues, live-update channels, runtime."""

from chat_pipeline.config import PipelineSettings
from chat_pipeline.queues import (
    AI,
    INCOMING,
    OUTGOING,
    QUEUE_SETTINGS,
    WHATSAPP_CLOUD,
    WHATSAPP_QR,
    Pipeline,
    conversation_group,
)
from chat_pipeline.runtime import Runtime

__all__ = [
    "AI",
    "INCOMING",
    "OUTGOING",
    "QUEUE_SETTINGS",
    "WHATSAPP_CLOUD",
    "WHATSAPP_QR",
    "Pipeline",
    "PipelineSettings",
    "Runtime",
    "conversation_group",
]
