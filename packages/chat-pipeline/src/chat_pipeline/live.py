"""Live updates for widget visitors: Redis pub/sub channels, one per (chatbot, visitor).

Any process may publish (the gateway's workers publish replies and statuses, the AI worker the
typing indicator); every gateway replica subscribes to the channels of the sockets it holds,
so a reply reaches its visitor whichever replica the browser is connected to.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from chat_domain import MessageView

__all__ = [
    "message_frame",
    "message_json",
    "publish",
    "status_frame",
    "typing_frame",
    "visitor_channel",
]


def visitor_channel(chatbot_id: uuid.UUID | str, visitor_id: str) -> str:
    return f"live:{chatbot_id}:{visitor_id}"


def client_message_id(message: MessageView) -> str | None:
    """Widget user messages store "<visitor id>:<client message id>" as their external id. A
    visitor id may contain ':' (a host's signed id), a client message id may not: the last ':'
    separates them."""
    if message.role != "user" or not message.external_id:
        return None
    return message.external_id.rsplit(":", 1)[-1]


def message_json(message: MessageView) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": str(message.id),
        "seq": message.seq,
        "role": message.role,
        "text": message.text,
        "status": message.status,
        "created_at": message.created_at.isoformat(),
    }
    cid = client_message_id(message)
    if cid is not None:
        data["client_message_id"] = cid
    return data


def message_frame(message: MessageView) -> dict[str, Any]:
    return {
        "type": "message",
        "message": message_json(message),
        "conversation_id": str(message.conversation_id),
    }


def typing_frame(on: bool) -> dict[str, Any]:
    return {"type": "typing", "on": on}


def status_frame(message_id: uuid.UUID | str, status: str) -> dict[str, Any]:
    return {"type": "status", "message_id": str(message_id), "status": status}


async def publish(redis: Any, channel: str, frame: dict[str, Any]) -> None:
    await redis.publish(channel, orjson.dumps(frame))
