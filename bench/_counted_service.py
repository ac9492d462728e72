"""Run one platform service with a count of the SQL it executes (for bench/pipeline_bench.py).

    python bench/_counted_service.py gateway|ai-worker|channel-whatsapp-cloud

A class-level SQLAlchemy listener sees every statement of every engine the service creates,
without touching the service's code. On SIGUSR1 the counts so far are written to
``$BENCH_COUNTS_DIR/<service>.json`` with a sequence number, so the benchmark can take a
snapshot before and after a phase and subtract.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

_statements: Counter[str] = Counter()
_seconds: Counter[str] = Counter()  # per statement text: where the database time goes
_commits = 0
_snapshots = 0


def _on_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    words = statement.split(None, 1)
    _statements[words[0].upper() if words else "?"] += 1
    conn.info["bench_started"] = time.perf_counter()


def _after_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    started = conn.info.pop("bench_started", None)
    if started is not None:
        _seconds[" ".join(statement.split())[:160]] += time.perf_counter() - started


def _on_commit(conn: Any) -> None:
    global _commits
    _commits += 1


def _dump(path: Path) -> None:
    global _snapshots
    _snapshots += 1
    body = {
        "seq": _snapshots,
        "commits": _commits,
        "statements": dict(_statements),
        "seconds": dict(_seconds),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


def main() -> int:
    service = sys.argv[1]
    del sys.argv[1:]  # the service reads its own arguments
    out = Path(os.environ["BENCH_COUNTS_DIR"]) / f"{service}.json"
    event.listen(Engine, "before_cursor_execute", _on_execute)
    event.listen(Engine, "after_cursor_execute", _after_execute)
    event.listen(Engine, "commit", _on_commit)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _dump(out)

    signal.signal(signal.SIGUSR1, on_signal)
    if service == "gateway":
        from gateway.__main__ import main as service_main
    elif service == "ai-worker":
        from ai_worker.__main__ import main as service_main
    elif service == "channel-whatsapp-cloud":
        from channel_whatsapp_cloud.__main__ import main as service_main
    else:
        raise SystemExit(f"unknown service {service!r}")
    return service_main()


if __name__ == "__main__":
    raise SystemExit(main())
