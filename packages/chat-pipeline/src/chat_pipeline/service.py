"""The shared shape of a service's entry point: settings from the environment, logging, and a
stop event set by SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

from chat_domain import ConfigError
from chat_pipeline.config import PipelineSettings

__all__ = ["run_service"]

Runner = Callable[[PipelineSettings, asyncio.Event], Awaitable[None]]


def run_service(name: str, runner: Callable[[], Runner]) -> int:
    """Run `runner()(settings, stop)` until a signal sets `stop`. `runner` is a factory so the
    service's heavy imports happen after the configuration was checked."""
    try:
        settings = PipelineSettings.from_env()
    except ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run = runner()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    asyncio.run(main())
    return 0
