"""`gateway-workers` / `python -m gateway.worker_service`: the pipeline's own queue workers
(incoming-messages, outgoing-messages, maintenance) and the reconciler, without HTTP or live
sockets. Scale it separately from the HTTP side (`gateway` with GATEWAY_ROLE=http); its
liveness goes to `gateway-workers health` (see docs/operations.md)."""

from __future__ import annotations

import asyncio
import logging

from chat_pipeline import PipelineSettings, Runtime
from chat_pipeline.consumer import serve_workers
from chat_pipeline.processors import pipeline_workers, schedule_maintenance
from chat_pipeline.reconcile import Reconciler
from chat_pipeline.service import Runner, run_service

__all__ = ["main", "run_workers"]

log = logging.getLogger("gateway.workers")

SERVICE = "gateway-workers"


async def run_workers(settings: PipelineSettings, stop: asyncio.Event) -> None:
    rt = await Runtime.start(settings)
    try:
        p = rt.pipeline
        await p.configure(p.incoming, p.outgoing, p.maintenance)
        await schedule_maintenance(rt)
        workers = pipeline_workers(rt)
        log.info("gateway workers running (incoming, outgoing, maintenance, reconciler)")
        await serve_workers(SERVICE, stop, workers, tasks=[Reconciler(rt).run()], close_timeout=10)
    finally:
        await rt.close()


def _runner() -> Runner:
    return run_workers


def main() -> int:
    return run_service(SERVICE, _runner)


if __name__ == "__main__":
    raise SystemExit(main())
