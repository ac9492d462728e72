"""`gateway` / `python -m gateway`: the HTTP gateway and its queue workers.

GATEWAY_ROLE=all (default) runs both; `http` only the HTTP side; `workers` only the
incoming-messages and outgoing-messages workers (scale them separately). Settings come from
the environment: docs/configuration.md.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from chat_domain import ConfigError
from chat_pipeline import PipelineSettings


def main() -> int:
    try:
        settings = PipelineSettings.from_env()
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from gateway.app import serve

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
