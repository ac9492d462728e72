"""Every table of the platform: importing this package registers them all on ``Base.metadata``."""

from chat_domain.models.base import Base, UTCDateTime, utcnow
from chat_domain.models.bots import Channel, Chatbot
from chat_domain.models.conversations import Contact, Conversation, Message
from chat_domain.models.kb import KbChunk, KbDocument
from chat_domain.models.tenancy import ApiKey, Plan, Tenant
from chat_domain.models.usage import UsageEvent, UsageMonthly
from chat_domain.models.webhooks import (
    WebhookDelivery,
    WebhookDispatch,
    WebhookEndpoint,
    WebhookEvent,
)

__all__ = [
    "ApiKey",
    "Base",
    "Channel",
    "Chatbot",
    "Contact",
    "Conversation",
    "KbChunk",
    "KbDocument",
    "Message",
    "Plan",
    "Tenant",
    "UTCDateTime",
    "UsageEvent",
    "UsageMonthly",
    "WebhookDelivery",
    "WebhookDispatch",
    "WebhookEndpoint",
    "WebhookEvent",
    "utcnow",
]
