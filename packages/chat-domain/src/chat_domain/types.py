"""String choices stored in the database, as Literal aliases with their allowed values."""

from __future__ import annotations

from typing import Final, Literal, get_args

TenantStatus = Literal["active", "suspended"]
ApiKeyRole = Literal["operator", "admin", "agent"]
ChannelKind = Literal["widget", "whatsapp_cloud", "whatsapp_qr"]
QrService = Literal["waha", "evolution"]
ConversationStatus = Literal["open", "pending_human", "resolved"]
MessageRole = Literal["user", "assistant", "agent", "system"]
DeliveryStatus = Literal["received", "queued", "sent", "failed", "delivered", "read"]
UsageKind = Literal[
    "message_in",
    "message_out",
    "ai_prompt_tokens",
    "ai_completion_tokens",
    "whatsapp_send",
    "webhook_delivery",
]

TENANT_STATUSES: Final = get_args(TenantStatus)
API_KEY_ROLES: Final = get_args(ApiKeyRole)
CHANNEL_KINDS: Final = get_args(ChannelKind)
CONVERSATION_STATUSES: Final = get_args(ConversationStatus)
ACTIVE_CONVERSATION_STATUSES: Final[tuple[ConversationStatus, ...]] = ("open", "pending_human")
MESSAGE_ROLES: Final = get_args(MessageRole)
DELIVERY_STATUSES: Final = get_args(DeliveryStatus)
USAGE_KINDS: Final = get_args(UsageKind)

# The forward-only ladder of delivery statuses. An update applies only when the new rank is
# strictly higher than the stored one. `failed` sits above `sent` and below `delivered`: it may
# replace received/queued/sent, a delivery or read receipt still replaces it (the message did
# arrive), and a second `failed` never replaces the first error.
DELIVERY_STATUS_RANK: Final[dict[DeliveryStatus, int]] = {
    "received": 0,
    "queued": 1,
    "sent": 2,
    "failed": 3,
    "delivered": 4,
    "read": 5,
}


def sql_in_list(values: tuple[str, ...]) -> str:
    """``'a', 'b'`` for CHECK constraints built from the Literal values above."""
    return ", ".join(f"'{value}'" for value in values)
