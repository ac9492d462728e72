"""Metrics: the per-minute series, totals, histogram and the Prometheus text exposition."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from queue_core import Job, Queue, UnrecoverableError, Worker
from queue_core.errors import InvalidOptionError
from queue_core.metrics import (
    CONTENT_TYPE,
    MAX_MINUTES,
    escape_label_value,
    get_metrics,
    queue_snapshot,
    render_prometheus,
    start_metrics_server,
)
from queue_core.types import RedisClient
from queue_core.worker import HISTOGRAM_BUCKETS_MS

from .helpers import Collector

Labels = frozenset[tuple[str, str]]


@pytest.fixture
def prefix(queue_name: str) -> str:
    # A prefix of the test's own keeps the registry set (`<prefix>:queues`) out of the shared
    # `qc:queues`; conftest deletes `test:<name>:*` at teardown.
    return f"test:{queue_name}"


async def _process(q: Queue, ok: int, bad: int) -> None:
    """Run `ok` jobs that complete and `bad` jobs that fail for good."""
    for i in range(ok + bad):
        await q.add("x", {"fail": i >= ok})

    async def proc(job: Job) -> str:
        if job.data["fail"]:
            raise UnrecoverableError("no")
        return "ok"

    collector = Collector()

    async def run(job: Job) -> str:
        try:
            return await proc(job)
        finally:
            await collector(job)

    worker = Worker(q, run, concurrency=4)
    worker.start()
    await collector.wait(ok + bad)
    await worker.close(5)


# -- a tiny parser for the text format ----------------------------------------------------------


def _parse_labels(text: str) -> Iterator[tuple[str, str]]:
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        key = text[i:eq]
        assert text[eq + 1] == '"', text
        j = eq + 2
        value = []
        while text[j] != '"':
            if text[j] == "\\":
                value.append({"\\": "\\", '"': '"', "n": "\n"}[text[j + 1]])
                j += 2
            else:
                value.append(text[j])
                j += 1
        yield key, "".join(value)
        i = j + 1
        if i < len(text):
            assert text[i] == ",", text
            i += 1


def parse_exposition(text: str) -> tuple[dict[tuple[str, Labels], float], dict[str, str]]:
    """Samples by (name, labels) and the TYPE of each family; checks HELP/TYPE precede samples."""
    assert text.endswith("\n")
    samples: dict[tuple[str, Labels], float] = {}
    types: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped, f"TYPE before HELP for {name}"
            types[name] = kind
        else:
            head, _, value = line.rpartition(" ")
            name, brace, rest = head.partition("{")
            assert brace and rest.endswith("}"), line
            family = name
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and name.removesuffix(suffix) in types:
                    family = name.removesuffix(suffix)
            assert family in types, f"sample {name} before its TYPE"
            key = (name, frozenset(_parse_labels(rest[:-1])))
            assert key not in samples, f"duplicate sample {line}"
            samples[key] = math.inf if value == "+Inf" else float(value)
    return samples, types


def _labels(**kw: str) -> Labels:
    return frozenset(kw.items())


# -- tests --------------------------------------------------------------------------------------


async def test_get_metrics_counts_processed_jobs(
    redis: RedisClient, queue_name: str, prefix: str
) -> None:
    q = Queue(queue_name, redis, prefix=prefix)
    await _process(q, ok=5, bad=2)
    before = int(time.time() * 1000) // 60000
    m = await q.get_metrics(10)
    assert len(m.completed) == len(m.failed) == 10
    assert m.minute - m.start_minute == 10 and m.minute >= before
    # the jobs finished in this minute or (at a minute boundary) the one before
    assert sum(m.completed) + m.completed_current == 5
    assert sum(m.failed) + m.failed_current == 2
    assert (m.completed_total, m.failed_total) == (5, 2)
    assert m.processing_count == 7, "one attempt per job"
    assert m.processing_sum_ms >= 0
    bounds = [b for b, _ in m.buckets]
    assert bounds == [b / 1000 for b in HISTOGRAM_BUCKETS_MS] + [math.inf]
    counts = [n for _, n in m.buckets]
    assert counts == sorted(counts) and counts[-1] == 7, "cumulative, ending with the count"
    d = m.to_dict()
    assert d["histogram"][-1] == ["+Inf", 7] and len(d["completed"]) == 10


async def test_minute_series_places_counts_by_minute(
    redis: RedisClient, queue_name: str, prefix: str
) -> None:
    q = Queue(queue_name, redis, prefix=prefix)
    mk = q.keys.key("metrics")
    now = 29_000_000 * 60000 + 30_000  # half-way through minute 29,000,000
    m0 = 29_000_000
    await redis.hset(  # type: ignore[misc]
        mk,
        mapping={
            f"c:{m0}": 7,  # the running minute
            f"c:{m0 - 1}": 5,
            f"c:{m0 - 3}": 2,
            f"f:{m0 - 2}": 1,
            f"c:{m0 - 11}": 100,  # outside a 10-minute window
            "h:5": 3,
            "h:inf": 1,
            "hs": 90_500,
        },
    )
    m = await get_metrics(q, 10, now_ms=now)
    assert m.minute == m0 and m.start_minute == m0 - 10
    assert m.completed == (0, 0, 0, 0, 0, 0, 0, 2, 0, 5)
    assert m.failed == (0, 0, 0, 0, 0, 0, 0, 0, 1, 0)
    assert (m.completed_current, m.failed_current) == (7, 0)
    assert (m.completed_last_minute, m.failed_last_minute) == (5, 0)
    assert (m.completed_in_window, m.failed_in_window) == (7, 1)
    assert m.rate_per_second == pytest.approx(5 / 60)
    # no all-time totals in the hash: the kept minutes are summed
    assert (m.completed_total, m.failed_total, m.totals_all_time) == (114, 1, False)
    assert m.buckets[0] == (0.005, 3) and m.buckets[-1] == (math.inf, 4)
    assert m.processing_count == 4 and m.processing_sum_seconds == 90.5

    one = await get_metrics(q, 1, now_ms=now)
    assert one.completed == (5,) and one.completed_last_minute == 5

    # all-time totals kept by the finish script (`ct`/`ft`) win over the sum
    await redis.hset(mk, mapping={"ct": 1000, "ft": 10})  # type: ignore[misc]
    m = await get_metrics(q, 10, now_ms=now)
    assert (m.completed_total, m.failed_total, m.totals_all_time) == (1000, 10, True)


async def test_minutes_must_be_in_range(redis: RedisClient, queue_name: str, prefix: str) -> None:
    q = Queue(queue_name, redis, prefix=prefix)
    for bad in (0, -1, MAX_MINUTES + 1):
        with pytest.raises(InvalidOptionError):
            await q.get_metrics(bad)
    m = await q.get_metrics(MAX_MINUTES)
    assert len(m.completed) == MAX_MINUTES and m.completed_total == 0


async def test_empty_queue_has_zero_metrics(
    redis: RedisClient, queue_name: str, prefix: str
) -> None:
    snap = await queue_snapshot(Queue(queue_name, redis, prefix=prefix), 5)
    assert snap.counts["waiting"] == 0
    m = snap.metrics
    assert m.completed == (0,) * 5 and m.processing_count == 0 and m.completed_total == 0
    assert m.buckets[-1] == (math.inf, 0)


async def test_render_prometheus_after_processing(
    redis: RedisClient, queue_name: str, prefix: str
) -> None:
    a = Queue(queue_name, redis, prefix=prefix)
    b = Queue(f"{queue_name}-b", redis, prefix=prefix)
    await _process(a, ok=4, bad=3)
    await b.add("later", None, delay=60_000)
    await b.add("now", None)
    await b.pause()
    text = await render_prometheus([a, b])
    samples, types = parse_exposition(text)
    assert types == {
        "queue_jobs": "gauge",
        "queue_paused": "gauge",
        "queue_completed_total": "counter",
        "queue_failed_total": "counter",
        "queue_completed_last_minute": "gauge",
        "queue_failed_last_minute": "gauge",
        "queue_processing_seconds": "histogram",
    }
    qa, qb = a.name, b.name
    assert samples["queue_jobs", _labels(queue=qa, state="completed")] == 4
    assert samples["queue_jobs", _labels(queue=qa, state="failed")] == 3
    assert samples["queue_jobs", _labels(queue=qa, state="waiting")] == 0
    assert samples["queue_jobs", _labels(queue=qb, state="waiting")] == 1
    assert samples["queue_jobs", _labels(queue=qb, state="delayed")] == 1
    states = {dict(k[1])["state"] for k in samples if k[0] == "queue_jobs"}
    assert states == {
        "waiting",
        "prioritized",
        "delayed",
        "active",
        "completed",
        "failed",
        "waiting-children",
    }
    assert samples["queue_paused", _labels(queue=qa)] == 0
    assert samples["queue_paused", _labels(queue=qb)] == 1
    assert samples["queue_completed_total", _labels(queue=qa)] == 4
    assert samples["queue_failed_total", _labels(queue=qa)] == 3
    assert samples["queue_completed_total", _labels(queue=qb)] == 0
    last = samples["queue_completed_last_minute", _labels(queue=qa)]
    assert last == (await a.get_metrics(1)).completed_last_minute
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in samples.items()
        if k[0] == "queue_processing_seconds_bucket" and dict(k[1])["queue"] == qa
    )
    assert [le for le, _ in buckets] == [b / 1000 for b in HISTOGRAM_BUCKETS_MS] + [math.inf]
    values = [v for _, v in buckets]
    assert values == sorted(values) and values[-1] == 7
    assert samples["queue_processing_seconds_count", _labels(queue=qa)] == 7
    assert samples["queue_processing_seconds_sum", _labels(queue=qa)] >= 0
    assert samples["queue_processing_seconds_count", _labels(queue=qb)] == 0


async def test_label_values_are_escaped(redis: RedisClient, queue_name: str, prefix: str) -> None:
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    odd = Queue(queue_name + '-"quoted"\\back|é', redis, prefix=prefix)
    await odd.add("x", None)
    text = await render_prometheus([odd])
    assert 'queue="' + queue_name + '-\\"quoted\\"\\\\back|é"' in text
    samples, _ = parse_exposition(text)
    assert samples["queue_jobs", _labels(queue=odd.name, state="waiting")] == 1


async def test_same_name_in_two_tags_is_refused(
    redis: RedisClient, queue_name: str, prefix: str
) -> None:
    one = Queue(queue_name, redis, prefix=prefix)
    other = Queue(queue_name, redis, prefix=prefix, tag=f"{queue_name}-t")
    with pytest.raises(InvalidOptionError):
        await render_prometheus([one, other])
    text = await render_prometheus([one, Queue(queue_name, redis, prefix=prefix)])
    assert text.count("queue_paused{") == 1, "the same queue twice is rendered once"


async def test_one_round_trip_per_queue(
    redis: RedisClient, queue_name: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = Queue(queue_name, redis, prefix=prefix)
    await _process(q, ok=2, bad=1)
    calls: list[str] = []
    original_pipeline = redis.pipeline
    original_command = redis.execute_command

    def pipeline(*args: Any, **kw: Any) -> Any:
        calls.append("pipeline")
        return original_pipeline(*args, **kw)

    async def command(*args: Any, **kw: Any) -> Any:
        calls.append(str(args[0]))
        return await original_command(*args, **kw)

    monkeypatch.setattr(redis, "pipeline", pipeline)
    monkeypatch.setattr(redis, "execute_command", command)
    # Without all-time totals in the hash (finish script without `ct`/`ft`), the first read
    # finds that out and reads the whole hash; from then on one round trip.
    await render_prometheus([q])
    assert calls.count("pipeline") <= 2
    calls.clear()
    text = await render_prometheus([q])
    assert calls == ["pipeline"], calls
    assert f'queue_completed_total{{queue="{q.name}"}} 2' in text
    # With all-time totals: one round trip reading only the fields needed.
    await original_command("HSET", q.keys.key("metrics"), "ct", 2, "ft", 1)
    for _ in range(2):
        calls.clear()
        text = await render_prometheus([q])
        assert calls == ["pipeline"], calls
        assert f'queue_failed_total{{queue="{q.name}"}} 1' in text


async def test_metrics_server(redis: RedisClient, queue_name: str, prefix: str) -> None:
    q = Queue(queue_name, redis, prefix=prefix)
    await q.add("x", None)
    server = await start_metrics_server(lambda: [q], port=0)
    port = server.sockets[0].getsockname()[1]

    async def request(line: str) -> tuple[str, dict[str, str], str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"{line}\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        head, _, body = raw.decode().partition("\r\n\r\n")
        status, *headers = head.split("\r\n")
        return status, dict(h.split(": ", 1) for h in headers), body

    try:
        status, headers, body = await request("GET /metrics HTTP/1.1")
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Type"] == CONTENT_TYPE
        assert int(headers["Content-Length"]) == len(body.encode())
        samples, _ = parse_exposition(body)
        assert samples["queue_jobs", _labels(queue=q.name, state="waiting")] == 1
        assert (await request("GET /other HTTP/1.1"))[0] == "HTTP/1.1 404 Not Found"
        assert (await request("POST /metrics HTTP/1.1"))[0].startswith("HTTP/1.1 405")
    finally:
        server.close()
        await server.wait_closed()
