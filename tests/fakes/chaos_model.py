"""A fake OpenAI-compatible model whose answers say which questions they answer.

Every user message of the chaos harness carries a unique token (``Q<conversation>-<n>``). Given
the chat messages of a request, this model answers with the tokens of the user messages after
the last assistant message, e.g. ``ANSWER Q17-3 Q17-4``: what the platform asked it to answer.
So the stored replies alone tell which questions each reply answered, and a question answered
twice, never, or out of order is visible from the outside. Each answer comes after a random
delay (50-400 ms by default), like a real model, so follow-ups arrive while it is answering.

As a process (prints ``chaos-model listening on <base url>`` once it accepts connections)::

    python -m tests.fakes.chaos_model --port 0 --min-ms 50 --max-ms 400 --seed 1

``GET /_chaos/stats`` returns ``{"calls": n, "in_flight": k}``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from tests.fakes.openai_server import Delay, FakeOpenAIServer, Reply, _content_text, _error_body

__all__ = ["ANSWER_PREFIX", "TOKEN", "ChaosModelServer", "answer_text", "pending_tokens"]

TOKEN = re.compile(r"\bQ\d+-\d+\b")
ANSWER_PREFIX = "ANSWER"
READY_PREFIX = "chaos-model listening on "


def pending_tokens(messages: Sequence[Any]) -> list[str]:
    """The tokens of the user messages after the last assistant message, in request order."""
    last_assistant = max(
        (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
        default=-1,
    )
    tokens: list[str] = []
    for message in messages[last_assistant + 1 :]:
        if isinstance(message, dict) and message.get("role") == "user":
            tokens.extend(TOKEN.findall(_content_text(message.get("content"))))
    return tokens


def answer_text(messages: Sequence[Any]) -> str:
    return " ".join([ANSWER_PREFIX, *pending_tokens(messages)])


class ChaosModelServer(FakeOpenAIServer):
    """Answers every chat request with ``answer_text`` after a random delay. Requests are
    counted, not recorded: a large run makes thousands."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        min_ms: float = 50,
        max_ms: float = 400,
        seed: int | None = None,
    ) -> None:
        super().__init__(host=host, port=port, control_api=False)
        if not 0 <= min_ms <= max_ms:
            raise ValueError("need 0 <= min_ms <= max_ms")
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.random = random.Random(seed)
        self.calls = 0
        self.in_flight = 0

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return web.json_response(
                _error_body(400, "a 'messages' list is required.", None), status=400
            )
        self.calls += 1
        self.in_flight += 1
        try:
            seconds = self.random.uniform(self.min_ms, self.max_ms) / 1000
            text = answer_text(body["messages"])
            return await self._respond(request, Delay(seconds, Reply(text)), body)
        finally:
            self.in_flight -= 1

    async def _not_found(self, request: web.Request) -> web.Response:
        # the base app ends in a catch-all route: the stats endpoint lives behind it
        if request.method == "GET" and request.path == "/_chaos/stats":
            return web.json_response({"calls": self.calls, "in_flight": self.in_flight})
        return await super()._not_found(request)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.chaos_model", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--min-ms", type=float, default=50)
    parser.add_argument("--max-ms", type=float, default=400)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    server = ChaosModelServer(
        host=args.host, port=args.port, min_ms=args.min_ms, max_ms=args.max_ms, seed=args.seed
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"{READY_PREFIX}{server.base_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
