"""queue-core soak run: the workload of tests/queue_core/test_soak.py for longer; prints JSON.

    python bench/queue_soak.py [--seconds 300] [--seed N] [--rate 60] [--workers 6,6,3,1]
                               [--bad-backoff-share 0.01] [--lock-renew-interval 25] [--details]

Runs against REDIS_URL when set, otherwise against a private valkey-server it starts. Worker
processes (one per --workers entry, that concurrency each) share one queue while a producer adds
jobs at --rate for --seconds; then the queue drains and everything is checked (see
tests/queue_core/soak.py). Output: jobs, completed, failed, retried, lost_leases,
wedged_workers, max_fetch_gap_s per worker, throughput_jobs_per_s, ... and the problems found
(exit status 1 when there are any).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package

from tests.queue_core.soak import SoakConfig, run_soak

from queue_core import Queue, connect


async def _cleanup(url: str, name: str) -> None:
    r = connect(url)
    q = Queue(name, r)
    await q.pause()
    await q.obliterate(force=True)
    async for key in r.scan_iter(match=f"test:{name}:*", count=1000):
        await r.delete(key)
    members = [m async for m in r.sscan_iter("qc:queues") if name in str(m)]
    if members:
        await r.srem("qc:queues", *members)
    await r.aclose()


async def _main(url: str, cfg: SoakConfig, details: bool) -> int:
    name = f"bench-soak-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="queue-soak-") as log_dir:
        try:
            result = await run_soak(url, name, cfg, Path(log_dir))
        finally:
            await _cleanup(url, name)
    out = dict(result.summary)
    out["problem_list"] = result.problems
    if details:
        out["details"] = result.details
    print(json.dumps(out, indent=2, sort_keys=True))
    return 1 if result.problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = SoakConfig()
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="jobs added per second")
    parser.add_argument(
        "--workers",
        default=",".join(map(str, defaults.concurrencies)),
        help="concurrency of each worker process",
    )
    parser.add_argument("--bad-backoff-share", type=float, default=defaults.bad_backoff_share)
    parser.add_argument(
        "--lock-renew-interval", type=int, default=defaults.lock_renew_interval, help="ms"
    )
    parser.add_argument("--details", action="store_true", help="list the jobs behind problems")
    args = parser.parse_args()
    cfg = replace(
        defaults,
        seconds=args.seconds,
        seed=args.seed,
        rate=args.rate,
        concurrencies=tuple(int(c) for c in args.workers.split(",")),
        bad_backoff_share=args.bad_backoff_share,
        lock_renew_interval=args.lock_renew_interval,
    )
    url = os.environ.get("REDIS_URL")
    server = None
    if not url:
        from devstack import RedisServer

        server = RedisServer().start()
        url = server.url
    try:
        status = asyncio.run(_main(url, cfg, args.details))
    finally:
        if server is not None:
            server.cleanup()
    sys.exit(status)


if __name__ == "__main__":
    main()
