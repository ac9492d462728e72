"""Typed application keys (one module, so every handler agrees on the types)."""

from __future__ import annotations

from aiohttp import web

from chat_pipeline import Runtime
from gateway.live_hub import LiveHub

runtime_key = web.AppKey("runtime", Runtime)
hub_key = web.AppKey("live_hub", LiveHub)
