"""Fan-out of live updates to this process's WebSockets through Redis pub/sub.

One pub/sub connection per gateway process; a channel is subscribed while at least one local
socket wants it. Publishers (any process) never need to know which replica holds a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

from aiohttp import web

__all__ = ["LiveHub"]

log = logging.getLogger("gateway.live")


class LiveHub:
    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._pubsub: Any = None
        self._sockets: dict[str, set[web.WebSocketResponse]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="live-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def join(self, channel: str, ws: web.WebSocketResponse) -> None:
        await asyncio.wait_for(self._ready.wait(), 10)
        first = not self._sockets[channel]
        self._sockets[channel].add(ws)
        if first:
            await self._pubsub.subscribe(channel)

    async def leave(self, channel: str, ws: web.WebSocketResponse) -> None:
        sockets = self._sockets.get(channel)
        if sockets is None:
            return
        sockets.discard(ws)
        if not sockets:
            del self._sockets[channel]
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    async def _run(self) -> None:
        while True:
            try:
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                # a placeholder keeps the connection subscribed (get_message needs one)
                await self._pubsub.subscribe("live:__hub__")
                for channel in list(self._sockets):
                    await self._pubsub.subscribe(channel)
                self._ready.set()
                while True:
                    message = await self._pubsub.get_message(timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        await self._deliver(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep delivering after a Redis hiccup
                self._ready.clear()
                log.warning("live hub lost Redis (%s); resubscribing", exc)
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()
                await asyncio.sleep(0.5)

    async def _deliver(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        text = data.decode() if isinstance(data, bytes) else data
        for ws in list(self._sockets.get(name, ())):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(text)
