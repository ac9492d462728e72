"""A small widget-API client for tests and the pipeline benchmark (the same calls the widget
makes: POST a message, GET messages after a cursor, a WebSocket for live frames)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp


class WidgetClient:
    def __init__(self, base_url: str, public_key: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url
        self.public_key = public_key
        self.session = session

    @property
    def api(self) -> str:
        return f"{self.base_url}/v1/widget/{self.public_key}"

    async def post(
        self, visitor_id: str, text: str, client_message_id: str | None = None, **extra: Any
    ) -> tuple[int, dict[str, Any]]:
        body = {
            "visitor_id": visitor_id,
            "text": text,
            "client_message_id": client_message_id or uuid.uuid4().hex,
            **extra,
        }
        async with self.session.post(f"{self.api}/messages", json=body) as response:
            return response.status, await response.json()

    async def messages(self, visitor_id: str, after: int = 0) -> dict[str, Any]:
        params = {"visitor_id": visitor_id, "after": str(after)}
        async with self.session.get(f"{self.api}/messages", params=params) as response:
            assert response.status == 200, await response.text()
            return dict(await response.json())

    async def wait_messages(
        self,
        visitor_id: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 15,
    ) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while True:
                messages = (await self.messages(visitor_id))["messages"]
                if predicate(messages):
                    return list(messages)
                await asyncio.sleep(0.05)

    @asynccontextmanager
    async def socket(self, visitor_id: str) -> AsyncIterator[LiveSocket]:
        url = f"{self.api}/ws?visitor_id={visitor_id}"
        async with self.session.ws_connect(url, heartbeat=30) as ws:
            yield LiveSocket(ws)


class LiveSocket:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        for frame in self.frames:
            if predicate(frame):
                return frame
        async with asyncio.timeout(timeout):
            while True:
                message = await self.ws.receive()
                if message.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"socket closed: {message.type}")
                frame = json.loads(message.data)
                self.frames.append(frame)
                if predicate(frame):
                    return dict(frame)

    async def ack(self, message_id: str) -> None:
        await self.ws.send_json({"type": "ack", "message_id": message_id})


def assistant(frame: dict[str, Any]) -> bool:
    return frame.get("type") == "message" and frame["message"]["role"] == "assistant"
