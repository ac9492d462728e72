"""The shared shape of a service's entry point: settings from the environment, logging, and a
stop event set by SIGTERM/SIGINT. `<service> health` checks a running service's workers (for a
container health check) instead of starting one."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from chat_domain import ConfigError
from chat_pipeline.config import PipelineSettings

__all__ = ["run_service"]

Runner = Callable[[PipelineSettings, asyncio.Event], Awaitable[None]]


def _loop_factory(settings: PipelineSettings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop unless EVENT_LOOP=asyncio: the same program for about a quarter less CPU per
    message (measured in bench/pipeline_bench.py, docs/architecture.md#performance)."""
    if settings.event_loop == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def run_service(name: str, runner: Callable[[], Runner], argv: Sequence[str] | None = None) -> int:
    """Run `runner()(settings, stop)` until a signal sets `stop`. `runner` is a factory so the
    service's heavy imports happen after the configuration was checked. A runner that raises
    (a queue worker died) makes the process exit with status 1, so that it is restarted."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["health"]:
        from chat_pipeline.supervision import check_health_file

        healthy, report = check_health_file(name)
        print(json.dumps(report, indent=2))
        return 0 if healthy else 1
    if args:
        print(f"usage: {name} [health]", file=sys.stderr)
        return 2
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

    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings)) as runner_:
            runner_.run(main())
    except Exception:
        logging.getLogger(name).critical("%s stopped on an error; exiting", name, exc_info=True)
        return 1
    return 0
