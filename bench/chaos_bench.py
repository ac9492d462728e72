"""Chaos benchmark: is every accepted message answered exactly once, in order, under faults?
Prints JSON.

    scripts/uv.sh run python bench/chaos_bench.py [--conversations 1000] [--messages 5]
        [--rate 2] [--postgres URL] [--no-faults] [--seed N] [--keep]

The large run of tests/pipeline/test_chaos.py (the harness is tests/pipeline/chaos.py): the
platform in processes (Valkey with AOF everysec, SQLite or a fresh database on --postgres, the
gateway's HTTP side, its queue workers and the ai-worker) against a fake model that answers
after 50-400 ms naming the questions it answers; N conversations x M messages through the
widget API, --rate new conversations per second, random gaps of 0-1.5 s between a
conversation's messages. Unless --no-faults: the ai-worker is SIGKILLed and restarted 3 times,
the gateway worker process 2 times, Valkey once (kill -9, same port and data directory), at
random moments of the send phase. Then it waits until quiescent (at most --quiesce-timeout s).

Output: `counts` (accepted, unanswered, answered_twice, duplicate_replies, out_of_order,
fallback_replies, not_live, ...), `post_statuses`, `reply_latency_ms` (202 -> the reply naming
the question on the socket), `faults` (recovery of each), `offending_by_kind` (conversation
indexes) and up to 20 `offenders` described. 1,000 conversations at 2/s take ~10 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.pipeline.chaos, tests.fakes.chaos_model

from tests.pipeline.chaos import ChaosConfig, run_chaos  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument(
        "--rate", type=float, default=2.0, help="new conversations per second (default 2)"
    )
    parser.add_argument(
        "--postgres", metavar="URL", help="run on a fresh database of this PostgreSQL server"
    )
    parser.add_argument("--no-faults", action="store_true", help="the same traffic, no kills")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiesce-timeout", type=float, default=120.0)
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for the services"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directory (logs)")
    args = parser.parse_args()
    config = ChaosConfig(
        conversations=args.conversations,
        messages=args.messages,
        conversation_rate=args.rate,
        faults=not args.no_faults,
        seed=args.seed,
        postgres=args.postgres,
        quiesce_timeout_s=args.quiesce_timeout,
        env=dict(item.split("=", 1) for item in args.env),
        keep_data=args.keep,
    )
    report = asyncio.run(run_chaos(config))
    print(json.dumps(report.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
