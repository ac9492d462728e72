"""Fan-out of live updates to this process's WebSockets through Redis pub/sub.

One pub/sub connection per gateway process; a channel is subscribed while at least one local
socket wants it. Publishers (any process) never need to know which replica holds a socket.

The pub/sub read loop never waits on a socket: it only appends frames to each socket's bounded
queue, and every socket has its own writer task. A socket that cannot keep up (its queue fills,
or one send takes longer than the send timeout) is aborted; the widget reconnects and fetches
what it missed. After every (re)subscription of the pub/sub connection each socket gets a
`{"type": "resync"}` frame: frames published while nothing was subscribed are gone, and the
widget fetches them by GET.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from typing import Any

from aiohttp import web

__all__ = ["RESYNC_FRAME", "FrameBudget", "HubClosing", "LiveHub", "LiveSocket", "TooManySockets"]

log = logging.getLogger("gateway.live")

RESYNC_FRAME = '{"type":"resync"}'
_HUB_CHANNEL = "live:__hub__"
# Answered in order after every SUBSCRIBE sent before it: its pong proves the subscriptions
# are active, so a resync sent after it cannot race a frame published in between.
_RESYNC_PING = b"live-hub-resync"
_POLL_S = 5.0
_RETRY_S = 0.5


class TooManySockets(Exception):
    """This client address already holds the allowed number of sockets in this process."""


class HubClosing(Exception):
    """The gateway is shutting down."""


class FrameBudget:
    """Token bucket for inbound frames of one socket: `burst` at once, `rate` per second."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class LiveSocket:
    """One WebSocket's outbound side: a bounded queue drained by its own writer task."""

    __slots__ = (
        "_max_queue",
        "_queue",
        "_request",
        "_task",
        "_wakeup",
        "channel",
        "dropped",
        "ip",
        "sending_since",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.BaseRequest,
        channel: str,
        ip: str,
        *,
        max_queue: int,
    ) -> None:
        self.ws = ws
        self.channel = channel
        self.ip = ip
        self.dropped = False
        # loop time at which the send in progress started (0: none); the hub's watchdog
        # aborts a socket whose send has waited too long (no timer per frame)
        self.sending_since = 0.0
        self._request = request
        self._max_queue = max_queue
        self._queue: deque[str] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def offer(self, text: str) -> None:
        """Queue a frame; never waits. A full queue means the client stopped reading."""
        if self.dropped:
            return
        if len(self._queue) >= self._max_queue:
            self.drop("its send queue is full")
            return
        self._queue.append(text)
        self._wakeup.set()

    def start(self) -> None:
        """After the upgrade: frames queued since joining are sent first."""
        if self._task is None and not self.dropped:
            self._task = asyncio.create_task(self._write(), name="live-socket-writer")

    async def stop(self) -> None:
        self._queue.clear()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def drop(self, reason: str) -> None:
        """Abort the connection at once. close() would first flush what the client does not
        read, so it would never finish; an abort frees the socket and ends the handler."""
        if self.dropped:
            return
        self.dropped = True
        self._queue.clear()
        log.warning("dropping a live socket from %s: %s", self.ip, reason)
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    async def close(self, code: int, message: bytes, timeout: float) -> None:
        """Say goodbye with `code`; a client that does not answer within `timeout` is cut."""
        await self.stop()
        if not self.ws.prepared:  # between joining and the 101: nothing to say goodbye on
            self.drop("closing before the upgrade")
            return
        try:
            async with asyncio.timeout(timeout):
                await self.ws.close(code=code, message=message)
        except TimeoutError:
            self.drop("no answer to the close frame")
        except Exception as exc:  # already gone: nothing left to close
            log.debug("closing a live socket failed: %r", exc)

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._queue:
                    text = self._queue.popleft()
                    # a send waits only while the kernel and transport buffers are full
                    self.sending_since = loop.time()
                    await self.ws.send_str(text)
                self.sending_since = 0.0
        except (ConnectionError, RuntimeError):
            pass  # the socket closed; its handler leaves the hub
        except Exception:
            log.exception("live socket writer failed")
            self.drop("its writer failed")


class LiveHub:
    def __init__(
        self,
        redis: Any,
        *,
        max_per_ip: int = 20,
        send_queue: int = 256,
        send_timeout: float = 5.0,
    ) -> None:
        self._redis = redis
        self._max_per_ip = max_per_ip
        self._send_queue = send_queue
        self._send_timeout = send_timeout
        self._pubsub: Any = None
        self._ready = False
        self._resync_due = False
        self._closing = False
        self._sockets: dict[str, set[LiveSocket]] = {}
        self._per_ip: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="live-hub"),
            asyncio.create_task(self._watch(), name="live-hub-watchdog"),
        ]

    async def close(self) -> None:
        # One cancel is not always enough: when it lands as redis-py's read times out (the
        # 5 s poll), Python 3.11's asyncio.timeout can turn it into a TimeoutError, which the
        # loops took for a Redis hiccup and carried on; shutdown then hung for good. The flag
        # ends the loops at their next turn; cancels are repeated until they have.
        self._stopped = True
        pending = {t for t in self._tasks if not t.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        for sockets in list(self._sockets.values()):
            for sock in list(sockets):
                await sock.stop()
        if self._pubsub is not None:
            await self._release(self._pubsub)

    async def shutdown(self, timeout: float = 1.0) -> None:
        """Close every socket with 1001 (going away), all at once, bounded by `timeout`: the
        widget reconnects (to another replica, or this one when it is back)."""
        self._closing = True
        sockets = [s for group in self._sockets.values() for s in group]
        await asyncio.gather(*(s.close(1001, b"server shutdown", timeout) for s in sockets))

    @property
    def ready(self) -> bool:
        """Subscribed: a socket joining now gets every frame published from here on."""
        return self._ready

    def sockets(self, channel: str | None = None) -> int:
        if channel is not None:
            return len(self._sockets.get(channel, ()))
        return sum(len(group) for group in self._sockets.values())

    async def join(
        self, channel: str, ws: web.WebSocketResponse, request: web.BaseRequest, ip: str
    ) -> LiveSocket:
        """Register a socket (before its upgrade: nothing published after the 101 is missed).
        Raises TooManySockets or HubClosing before anything is registered."""
        if self._closing:
            raise HubClosing
        if self._per_ip[ip] >= self._max_per_ip:
            raise TooManySockets
        sock = LiveSocket(
            ws,
            request,
            channel,
            ip,
            max_queue=self._send_queue,
        )
        self._per_ip[ip] += 1
        group = self._sockets.setdefault(channel, set())
        group.add(sock)
        if len(group) == 1 and self._ready:
            try:
                await self._pubsub.subscribe(channel)
            except asyncio.CancelledError:
                await self.leave(sock)
                raise
            except Exception as exc:
                # the read loop reconnects, subscribes what is missing and resyncs everyone
                log.warning("live hub could not subscribe (%s)", exc)
                self._resync_due = True
        return sock

    async def leave(self, sock: LiveSocket) -> None:
        await sock.stop()
        group = self._sockets.get(sock.channel)
        if group is None or sock not in group:
            return
        group.discard(sock)
        self._per_ip[sock.ip] -= 1
        if self._per_ip[sock.ip] <= 0:
            del self._per_ip[sock.ip]
        if not group:
            del self._sockets[sock.channel]
            if self._ready:
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(sock.channel)

    def _reconnected(self, connection: Any) -> None:
        # redis-py re-subscribed the connection's channels itself; frames published meanwhile
        # are lost all the same
        self._resync_due = True

    async def _reconcile(self, pubsub: Any) -> None:
        """Subscribe what local sockets want and the connection lacks, and the reverse."""
        have = {c.decode() if isinstance(c, bytes) else c for c in pubsub.channels}
        missing = [c for c in self._sockets if c not in have]
        stale = [c for c in have if c != _HUB_CHANNEL and c not in self._sockets]
        if missing:
            await pubsub.subscribe(*missing)
        if stale:
            await pubsub.unsubscribe(*stale)

    async def _run(self) -> None:
        while not self._stopped:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub = pubsub
            try:
                # a placeholder keeps the connection subscribed (get_message needs one)
                await pubsub.subscribe(_HUB_CHANNEL)
                connection = getattr(pubsub, "connection", None)
                if connection is not None:
                    connection.register_connect_callback(self._reconnected)
                # sockets that joined while Redis was away are subscribed here; no await
                # between this and ready: a join after it subscribes its channel itself
                await self._reconcile(pubsub)
                self._ready = True
                # sockets that were here before this subscription may have missed frames
                self._resync_due = bool(self._sockets)
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep delivering after a Redis hiccup
                self._ready = False
                log.warning("live hub lost Redis (%s); resubscribing", exc)
                await self._release(pubsub)
                await asyncio.sleep(_RETRY_S)

    async def _release(self, pubsub: Any) -> None:
        connection = getattr(pubsub, "connection", None)
        if connection is not None:
            # the connection goes back to the pool: its later reconnects are not ours
            connection.deregister_connect_callback(self._reconnected)
        with contextlib.suppress(Exception):
            await pubsub.aclose()

    async def _watch(self) -> None:
        """Abort sockets whose current send has waited longer than the send timeout."""
        loop = asyncio.get_running_loop()
        interval = min(1.0, self._send_timeout / 4)
        while not self._stopped:
            await asyncio.sleep(interval)
            try:
                limit = loop.time() - self._send_timeout
                for group in list(self._sockets.values()):
                    for sock in list(group):
                        if 0.0 < sock.sending_since < limit:
                            sock.drop(f"a send took over {self._send_timeout} s")
            except Exception:
                log.exception("live hub watchdog failed; trying again")

    async def _read(self, pubsub: Any) -> None:
        while not self._stopped:
            if self._resync_due:
                self._resync_due = False
                await self._reconcile(pubsub)
                await pubsub.ping(_RESYNC_PING)
            message = await pubsub.get_message(timeout=_POLL_S)
            if message is None:
                continue
            kind = message.get("type")
            if kind == "message":
                self._deliver(message["channel"], message["data"])
            elif kind == "pong" and message.get("data") == _RESYNC_PING:
                self._broadcast(RESYNC_FRAME)

    def _deliver(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        sockets = self._sockets.get(name)
        if not sockets:
            return
        text = data.decode() if isinstance(data, bytes) else data
        for sock in list(sockets):
            sock.offer(text)

    def _broadcast(self, text: str) -> None:
        for group in list(self._sockets.values()):
            for sock in list(group):
                sock.offer(text)
