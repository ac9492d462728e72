"""Queue metrics: throughput per minute, processing times, Prometheus text exposition.

Workers record, in the queue's `metrics` hash, completed (`c:<minute>`) and failed
(`f:<minute>`) jobs per minute (minute = ms // 60000, kept about 7 days) and a processing-time
histogram (`h:<le ms>` non-cumulative counts, `h:inf`, `hs` = sum of ms) over every finished
attempt: completions, failures, retries and jobs handed back (rate limits, `DelayJob`).
All-time totals `ct`/`ft` are used when the finish script keeps them; otherwise totals are the
sum of the per-minute counts still kept (they drop as minutes age out).

"Minutes" here are wall-clock minutes of the machine reading the metrics; the series covers
complete minutes only, the running minute is reported apart (`completed_current`).

Any service can expose its queues:

    body = await render_prometheus(queues)  # serve with Content-Type: CONTENT_TYPE

or, without a web framework, `await start_metrics_server(queues, port=9464)`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from queue_core.errors import InvalidOptionError
from queue_core.queue import Queue
from queue_core.types import JobCounts, as_str
from queue_core.worker import HISTOGRAM_BUCKETS_MS

__all__ = [
    "CONTENT_TYPE",
    "MAX_MINUTES",
    "QueueMetrics",
    "QueueSnapshot",
    "get_metrics",
    "queue_snapshot",
    "render_prometheus",
    "start_metrics_server",
]

log = logging.getLogger("queue_core.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_MINUTES = 10080  # the finish script keeps per-minute counts for 7 days

_HIST_FIELDS = [f"h:{b}" for b in HISTOGRAM_BUCKETS_MS] + ["h:inf"]
_BOUNDS_S = [b / 1000 for b in HISTOGRAM_BUCKETS_MS] + [math.inf]
# Queues (by base key) whose hash has no all-time totals: read whole, so that the totals can be
# summed from the per-minute fields in the same round trip. Only an optimisation hint.
_SUM_MINUTES: dict[str, bool] = {}


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """Throughput and processing times of one queue.

    `completed`/`failed` hold one count per complete minute, oldest first, ending with the
    minute before `minute` (the running one, counted in `completed_current`/`failed_current`).
    `buckets` is the cumulative histogram: (upper bound in seconds, attempts that took at most
    that long), ending with (inf, `processing_count`).
    """

    name: str
    minute: int
    completed: tuple[int, ...]
    failed: tuple[int, ...]
    completed_current: int
    failed_current: int
    completed_total: int
    failed_total: int
    totals_all_time: bool
    buckets: tuple[tuple[float, int], ...]
    processing_count: int
    processing_sum_ms: int

    @property
    def start_minute(self) -> int:
        """The minute (ms // 60000) of the first entry of `completed`/`failed`."""
        return self.minute - len(self.completed)

    @property
    def completed_last_minute(self) -> int:
        """Completed during the last complete minute."""
        return self.completed[-1]

    @property
    def failed_last_minute(self) -> int:
        return self.failed[-1]

    @property
    def completed_in_window(self) -> int:
        """Completed during all the complete minutes of the window."""
        return sum(self.completed)

    @property
    def failed_in_window(self) -> int:
        return sum(self.failed)

    @property
    def rate_per_second(self) -> float:
        """Jobs finished (completed or failed) per second during the last complete minute."""
        return (self.completed[-1] + self.failed[-1]) / 60

    @property
    def processing_sum_seconds(self) -> float:
        return self.processing_sum_ms / 1000

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "minute": self.minute,
            "start_minute": self.start_minute,
            "completed": list(self.completed),
            "failed": list(self.failed),
            "completed_current": self.completed_current,
            "failed_current": self.failed_current,
            "completed_total": self.completed_total,
            "failed_total": self.failed_total,
            "totals_all_time": self.totals_all_time,
            "histogram": [["+Inf" if math.isinf(le) else le, n] for le, n in self.buckets],
            "processing_count": self.processing_count,
            "processing_sum_ms": self.processing_sum_ms,
        }


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """Job counts and metrics of one queue, read in one round trip."""

    counts: JobCounts
    metrics: QueueMetrics
    dead_letter_waiting: int | None = None
    """Copies waiting in the queue's dead-letter queue (None: the queue has none)."""


def _int(raw: Any) -> int:
    if raw is None or raw in (b"", ""):
        return 0
    return int(float(raw))


def _check_minutes(minutes: int) -> None:
    if not isinstance(minutes, int) or isinstance(minutes, bool) or not 1 <= minutes <= MAX_MINUTES:
        raise InvalidOptionError("minutes", f"must be an integer from 1 to {MAX_MINUTES}")


def _window_fields(minute: int, minutes: int) -> list[str]:
    span = range(minute - minutes, minute + 1)
    return [f"c:{m}" for m in span] + [f"f:{m}" for m in span]


def _build(
    name: str, minute: int, minutes: int, get: Callable[[str], Any], totals: tuple[int, int] | None
) -> QueueMetrics:
    span = range(minute - minutes, minute)
    counts = [_int(get(f"h:{b}")) for b in HISTOGRAM_BUCKETS_MS] + [_int(get("h:inf"))]
    buckets = []
    running = 0
    for bound, n in zip(_BOUNDS_S, counts, strict=True):
        running += n
        buckets.append((bound, running))
    ct, ft = get("ct"), get("ft")
    all_time = ct is not None or ft is not None
    if all_time:
        completed_total, failed_total = _int(ct), _int(ft)
    elif totals is not None:
        completed_total, failed_total = totals
    else:  # pragma: no cover - callers pass totals whenever the hash has no all-time fields
        raise AssertionError("totals needed")
    return QueueMetrics(
        name=name,
        minute=minute,
        completed=tuple(_int(get(f"c:{m}")) for m in span),
        failed=tuple(_int(get(f"f:{m}")) for m in span),
        completed_current=_int(get(f"c:{minute}")),
        failed_current=_int(get(f"f:{minute}")),
        completed_total=completed_total,
        failed_total=failed_total,
        totals_all_time=all_time,
        buckets=tuple(buckets),
        processing_count=running,
        processing_sum_ms=_int(get("hs")),
    )


def _from_hash(name: str, minute: int, minutes: int, raw: dict[Any, Any]) -> QueueMetrics:
    h = {as_str(k): v for k, v in raw.items()}
    completed = failed = 0
    for field, value in h.items():
        if field.startswith("c:"):
            completed += _int(value)
        elif field.startswith("f:"):
            failed += _int(value)
    return _build(name, minute, minutes, h.get, (completed, failed))


async def _read(
    queue: Queue, minute: int, minutes: int, *, counts: bool, whole: bool
) -> tuple[JobCounts | None, int | None, Any]:
    """Optionally the job counts and dead-letter depth, and the metrics hash (whole or the
    needed fields), in one pipeline round trip."""
    fields = None if whole else ["ct", "ft", "hs", *_HIST_FIELDS, *_window_fields(minute, minutes)]
    return await queue._store.counts_and_hash(queue.keys.key("metrics"), fields, counts=counts)


async def _collect(
    queue: Queue, minutes: int, *, counts: bool, now_ms: int | None
) -> tuple[JobCounts | None, int | None, QueueMetrics]:
    _check_minutes(minutes)
    minute = (int(time.time() * 1000) if now_ms is None else now_ms) // 60000
    base = queue.keys.base
    whole = _SUM_MINUTES.get(base, False)
    job_counts, dlq, raw = await _read(queue, minute, minutes, counts=counts, whole=whole)
    if whole:
        metrics = _from_hash(queue.name, minute, minutes, raw)
        if metrics.totals_all_time:
            _SUM_MINUTES.pop(base, None)
        return job_counts, dlq, metrics
    has_totals = raw["ct"] is not None or raw["ft"] is not None
    if has_totals or not any(v is not None for f, v in raw.items() if f != "hs"):
        # All-time totals kept by the finish script, or nothing ever finished.
        return job_counts, dlq, _build(queue.name, minute, minutes, raw.get, (0, 0))
    # No all-time totals: sum the per-minute fields (and read the whole hash from now on).
    _SUM_MINUTES[base] = True
    _, _, whole_hash = await _read(queue, minute, minutes, counts=False, whole=True)
    return job_counts, dlq, _from_hash(queue.name, minute, minutes, whole_hash)


async def get_metrics(
    queue: Queue, minutes: int = 60, *, now_ms: int | None = None
) -> QueueMetrics:
    """Metrics of `queue` for the last `minutes` complete minutes (1 … 10080).

    `now_ms` (epoch ms) replaces the local clock, for tests and reproducible reports.
    """
    _, _, metrics = await _collect(queue, minutes, counts=False, now_ms=now_ms)
    return metrics


async def queue_snapshot(
    queue: Queue, minutes: int = 60, *, now_ms: int | None = None
) -> QueueSnapshot:
    """Job counts and metrics in one round trip."""
    counts, dlq, metrics = await _collect(queue, minutes, counts=True, now_ms=now_ms)
    assert counts is not None
    return QueueSnapshot(counts, metrics, dlq)


# -- Prometheus text format 0.0.4 ---------------------------------------------------------------


def _by_state(counts: JobCounts) -> list[tuple[str, int]]:
    return [
        ("waiting", counts["waiting"]),
        ("prioritized", counts["prioritized"]),
        ("delayed", counts["delayed"]),
        ("active", counts["active"]),
        ("completed", counts["completed"]),
        ("failed", counts["failed"]),
        ("waiting-children", counts["waiting_children"]),
    ]


def escape_label_value(value: str) -> str:
    """A label value for the text format: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else format(bound, "g")


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]

    @property
    def sampled(self) -> bool:
        return len(self.lines) > 2

    def sample(self, name: str, labels: Sequence[tuple[str, str]], value: float) -> None:
        body = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
        self.lines.append(f"{name}{{{body}}} {_number(value)}")


async def render_prometheus(queues: Sequence[Queue]) -> str:
    """Metrics of `queues` in the Prometheus text exposition format 0.0.4 (one pipeline round
    trip per queue, all queues concurrently). Serve it with `Content-Type: CONTENT_TYPE`.

    The `queue` label is the queue's name; two queues with the same name (different tags or
    prefixes) cannot be rendered together.
    """
    seen: dict[str, Queue] = {}
    for q in queues:
        if q.name in seen and seen[q.name].keys.base != q.keys.base:
            raise InvalidOptionError("queues", f"two different queues are named {q.name!r}")
        seen[q.name] = q
    unique = list(seen.values())
    snaps = await asyncio.gather(*(queue_snapshot(q, 1) for q in unique))
    jobs = _Family("queue_jobs", "gauge", "Jobs in the queue by state.")
    paused = _Family("queue_paused", "gauge", "1 when the queue is paused.")
    completed = _Family(
        "queue_completed_total",
        "counter",
        "Jobs completed (all time when the finish script keeps totals, else the kept 7 days).",
    )
    failed = _Family(
        "queue_failed_total",
        "counter",
        "Jobs failed for good (all time when the finish script keeps totals, else 7 days).",
    )
    last_minute = _Family(
        "queue_completed_last_minute", "gauge", "Jobs completed during the last complete minute."
    )
    failed_last_minute = _Family(
        "queue_failed_last_minute", "gauge", "Jobs failed during the last complete minute."
    )
    dead = _Family(
        "queue_dead_letter_jobs",
        "gauge",
        "Copies waiting in the queue's dead-letter queue (capped by dead_letter_max).",
    )
    hist = _Family(
        "queue_processing_seconds",
        "histogram",
        "Processing time of finished attempts (completed, failed, retried or handed back).",
    )
    for q, snap in zip(unique, snaps, strict=True):
        label = ("queue", q.name)
        counts, m = snap.counts, snap.metrics
        for state, n in _by_state(counts):
            jobs.sample("queue_jobs", [label, ("state", state)], n)
        paused.sample("queue_paused", [label], 1 if counts["paused"] else 0)
        completed.sample("queue_completed_total", [label], m.completed_total)
        failed.sample("queue_failed_total", [label], m.failed_total)
        last_minute.sample("queue_completed_last_minute", [label], m.completed_last_minute)
        failed_last_minute.sample("queue_failed_last_minute", [label], m.failed_last_minute)
        if snap.dead_letter_waiting is not None:
            dead.sample("queue_dead_letter_jobs", [label], snap.dead_letter_waiting)
        for bound, n in m.buckets:
            hist.sample("queue_processing_seconds_bucket", [label, ("le", _le(bound))], n)
        hist.sample("queue_processing_seconds_sum", [label], m.processing_sum_ms / 1000)
        hist.sample("queue_processing_seconds_count", [label], m.processing_count)
    families = (jobs, paused, completed, failed, last_minute, failed_last_minute, dead, hist)
    # (a family without samples, such as dead letters where no queue has a DLQ, is left out)
    return "".join(line + "\n" for family in families if family.sampled for line in family.lines)


# -- a minimal scrape endpoint -------------------------------------------------------------------


async def start_metrics_server(
    queues: Sequence[Queue] | Callable[[], Sequence[Queue]],
    *,
    host: str = "127.0.0.1",
    port: int = 9464,
    path: str = "/metrics",
) -> asyncio.Server:
    """Serve `GET <path>` with `render_prometheus(queues)` over plain HTTP/1.1, for processes
    without a web framework (workers). `queues` may be a callable returning the current list.
    Close it with `server.close(); await server.wait_closed()`. Binds to localhost by default.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError):
                return
            except asyncio.LimitOverrunError:
                return
            status, body, ctype = "200 OK", b"", CONTENT_TYPE
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif target.split("?", 1)[0] != path:
                status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
            else:
                current = queues() if callable(queues) else queues
                try:
                    body = (await render_prometheus(current)).encode()
                except RedisError as exc:
                    log.warning("metrics: cannot read the queues: %s", exc)
                    status, body, ctype = "503 Service Unavailable", b"redis error\n", "text/plain"
            header = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(header.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    return await asyncio.start_server(handle, host, port)
