"""`ai-worker` / `python -m ai_worker`: the ai-processing queue worker.

Settings come from the environment (docs/configuration.md). Without LLM_API_KEY (and without
a chatbot-specific provider) answers come from the offline responder: the best-matching
knowledge-base passage, so the platform works with no network.
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
        print(f"ai-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from ai_worker.service import run_worker

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
