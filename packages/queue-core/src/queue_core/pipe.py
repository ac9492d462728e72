"""One pipelined connection for queue-core's own scripts.

redis-py's asyncio client spends about as much CPU around a command as the round trip itself
costs on a loopback: a pool checkout and return, a timer per read, a retry wrapper, telemetry
hooks. queue-core's hot path is one short script call per add and per batch of results, so it
sends them over one connection of its own instead: every request is written at once, replies
come back in order (RESP pipelining) and are matched to their callers' futures. Concurrent
callers share the connection without a lock; a caller that is cancelled leaves its reply to be
read and dropped, so the stream never goes out of step.

Only short, non-blocking commands go through a pipe (a blocking read would hold up everyone
behind it): blocking waits and everything else use the redis-py client it belongs to. Clients
made by `queue_core.connect()` for a plain TCP URL carry one; other clients (a cluster, TLS, a
Unix socket, a client built elsewhere) simply go through redis-py.

A request that has waited longer than `command_timeout` (the client's `socket_timeout`) for
its reply means the connection is stuck: it is dropped, and every request on it fails with a
`ConnectionError` (callers treat that as Redis being unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import hiredis
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["RedisPipe"]

_ERRORS: dict[str, type[ResponseError]] = {
    "NOSCRIPT": NoScriptError,
    "READONLY": ReadOnlyError,
    "OOM": OutOfMemoryError,
}


def _error(reply: ResponseError) -> Exception:
    text = str(reply)
    code = text.split(" ", 1)[0]
    if code == "LOADING":
        return BusyLoadingError(text)
    return _ERRORS.get(code, ResponseError)(text)


def pack(args: tuple[Any, ...]) -> bytes:
    """A RESP command: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int | float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:  # pragma: no cover - a broken server
                self._fail(RedisConnectionError(f"protocol error: {exc}"))
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            fut, _ = self.waiting.popleft()
            if fut.done():
                continue  # its caller was cancelled: the reply is read and dropped
            if isinstance(reply, ResponseError):
                fut.set_exception(_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(RedisConnectionError(f"connection to Redis lost ({exc or 'closed'})"))

    def _fail(self, error: Exception) -> None:
        self.lost = error
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(error)


class RedisPipe:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = 5.0,
        command_timeout: float | None = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self.password = password
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            proto = await self._connect()
        return await self._send(proto, pack(args))

    def _send(self, proto: _Protocol, payload: bytes) -> asyncio.Future[Any]:
        assert proto.transport is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.waiting.append((fut, time.monotonic()))
        proto.transport.write(payload)
        return fut

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError("the pipe is closed")
        # one connection attempt at a time; concurrent callers share it
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(_Protocol, self.host, self.port)
                if self.password is not None:
                    auth = (self.username, self.password) if self.username else (self.password,)
                    await self._send(proto, pack(("AUTH", *auth)))
                if self.db:
                    await self._send(proto, pack(("SELECT", self.db)))
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(
                f"Error connecting to {self.host}:{self.port}: {exc or type(exc).__name__}"
            ) from exc
        self._proto = proto
        if self.command_timeout and (self._watchdog is None or self._watchdog.done()):
            self._watchdog = asyncio.ensure_future(self._watch())
        return proto

    async def _watch(self) -> None:
        """Drop a connection whose oldest request waits beyond the command timeout (a frozen
        server, a half-open connection): one timer for the pipe, not one per request."""
        assert self.command_timeout is not None
        while not self._closed:
            await asyncio.sleep(min(1.0, self.command_timeout / 4))
            proto = self._proto
            if proto is None or not proto.waiting or proto.transport is None:
                continue
            if time.monotonic() - proto.waiting[0][1] > self.command_timeout:
                proto._fail(RedisConnectionError("Redis did not answer within the timeout"))
                proto.transport.abort()

    async def aclose(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.close()
