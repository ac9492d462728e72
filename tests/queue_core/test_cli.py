"""The `queue-core` command-line tool and the queue registry it lists queues from.

Commands run in-process through `main(argv)` (in a thread: `main` owns its event loop) with the
output captured, plus real subprocesses of the console script. Every test uses a key prefix of
its own (`test:<queue name>`), so `stats` sees exactly the test's queues and conftest deletes
all of it, the registry set included.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from queue_core import (
    Job,
    JobOptions,
    JobState,
    Queue,
    QueueSettings,
    UnrecoverableError,
    Worker,
    connect,
)
from queue_core.cli import (
    CommandError,
    Context,
    cmd_jobs,
    cmd_stats,
    format_table,
    main,
    mask_url,
)
from queue_core.registry import (
    list_queues,
    parse_member,
    registry_key,
    registry_member,
)
from queue_core.types import RedisClient

from .helpers import wait_for

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def prefix(queue_name: str) -> str:
    return f"test:{queue_name}"


@pytest.fixture
def cli(redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `queue-core --redis <test redis> --prefix <test prefix> ARGS` in-process."""

    async def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--redis", redis_url, "--prefix", prefix, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


async def _populate(redis: RedisClient, name: str, prefix: str) -> Queue:
    """3 completed jobs (logs, progress), 2 failed (stack, history), then, with no worker
    running: 1 delayed, 1 prioritized, 2 waiting in groups g1/g2 and 1 ungrouped waiting."""
    q = Queue(name, redis, prefix=prefix)
    for i in range(3):
        await q.add("ok", {"i": i, "text": "x" * 100})
    for i in range(2):
        await q.add("bad", {"i": i}, attempts=1)
    done = asyncio.Event()
    finished = 0

    async def proc(job: Job) -> Any:
        nonlocal finished
        try:
            await job.log(f"started {job.id}")
            await job.update_progress({"pct": 50})
            if job.name == "bad":
                raise UnrecoverableError("boom: " + "the reason is long " * 10 + "\nsecond line")
            return {"answer": job.data["i"]}
        finally:
            finished += 1
            if finished == 5:
                done.set()

    worker = Worker(q, proc, concurrency=1)  # one at a time: a known finishing order
    worker.start()
    await asyncio.wait_for(done.wait(), 10)
    await worker.close(5)
    await wait_for(lambda: _counts_done(q))
    await q.add("later", None, delay=3_600_000)
    await q.add("urgent", None, priority=5)
    await q.add("grouped", {"g": 1}, group="g1")
    await q.add("grouped", {"g": 2}, group="g2")
    await q.add("plain", None)
    return q


async def _counts_done(q: Queue) -> bool:
    c = await q.get_job_counts()
    return c["completed"] == 3 and c["failed"] == 2


async def _dump(redis: RedisClient, prefix: str) -> dict[bytes, Any]:
    """Every key under the prefix with its serialized value (to check that nothing changed)."""
    r: Any = redis
    out = {}
    async for key in r.scan_iter(match=f"{prefix}:*", count=1000):
        out[key] = await r.dump(key)
    return out


# -- formatting helpers ---------------------------------------------------------------------------


def test_format_table_aligns_and_truncates() -> None:
    text = format_table(
        ["ID", "NAME", "N"],
        [["1", "a" * 50, 5], ["22", "line\nbreak", 123]],
        widths=[None, 10, None],
    )
    lines = text.splitlines()
    assert lines[0] == "ID  NAME          N"
    assert lines[1] == "1   aaaaaaaaa…    5", "cut to the width with an ellipsis"
    assert lines[2] == "22  line break  123", "numbers right-aligned, control characters blanked"
    assert format_table(["A"], []).splitlines() == ["A", "(none)"]


def test_mask_url() -> None:
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert (
        mask_url("rediss://h:1/0?password=s3cret&db=1") == "rediss://h:1/0?password=%2A%2A%2A&db=1"
    )
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask_url("redis+cluster://u:pw@a:1,b:2") == "redis+cluster://u:***@a:1,b:2"


# -- the registry ---------------------------------------------------------------------------------


def test_registry_members_round_trip() -> None:
    assert registry_member("a") == "a" and parse_member("a") == ("a", "a")
    assert registry_member("a", "a") == "a"
    assert registry_member("dlq", "src") == "dlq|src" and parse_member("dlq|src") == ("dlq", "src")
    assert registry_member("x|y") == "x|y"


async def test_registry_names_with_pipes(redis: RedisClient, queue_name: str, prefix: str) -> None:
    # members are ambiguous when names or tags contain `|`: the readings with keys are kept
    untagged = Queue(f"{queue_name}|a", redis, prefix=prefix)
    await untagged.configure(QueueSettings())
    tagged = Queue(f"{queue_name}|b", redis, prefix=prefix, tag=f"{queue_name}|t")
    await tagged.configure(QueueSettings())
    assert await list_queues(redis, prefix) == [
        (f"{queue_name}|a", f"{queue_name}|a"),
        (f"{queue_name}|b", f"{queue_name}|t"),
    ]


async def test_registry_and_discovery(redis: RedisClient, queue_name: str, prefix: str) -> None:
    r: Any = redis
    plain = Queue(queue_name, redis, prefix=prefix)
    await plain.add("x", None)
    assert await r.smembers(registry_key(prefix)) == {queue_name.encode()}
    # configure() registers the queue and its dead-letter queue (sharing the tag)
    configured = Queue(f"{queue_name}-c", redis, prefix=prefix)
    await configured.configure(QueueSettings(dead_letter_queue=f"{queue_name}-c-dlq"))
    # a queue added to by a client that predates the registry is found by SCAN
    await r.set(f"{prefix}:{{{queue_name}-old}}:ctr", 3)
    # a stale member (its keys were deleted by other means) is left out
    await r.sadd(registry_key(prefix), f"{queue_name}-gone", "bad{name")
    found = await list_queues(redis, prefix)
    assert found == [
        (queue_name, queue_name),
        (f"{queue_name}-c", f"{queue_name}-c"),
        (f"{queue_name}-old", f"{queue_name}-old"),
    ], "the DLQ has no keys yet: left out like any empty registry member"
    everything = await list_queues(redis, prefix, include_empty=True)
    assert (f"{queue_name}-c-dlq", f"{queue_name}-c") in everything
    assert (f"{queue_name}-gone", f"{queue_name}-gone") in everything
    # once the DLQ holds a job it is listed with its tag
    await configured.dead_letter_queue(f"{queue_name}-c-dlq").add("x", None)
    assert (f"{queue_name}-c-dlq", f"{queue_name}-c") in await list_queues(redis, prefix)
    # obliterate removes the registry entry
    await plain.pause()
    await plain.obliterate()
    assert queue_name.encode() not in await r.smembers(registry_key(prefix))
    assert (queue_name, queue_name) not in await list_queues(redis, prefix)


async def test_registration_is_one_sadd_per_queue_object(
    redis: RedisClient, queue_name: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = Queue(queue_name, redis, prefix=prefix)
    sadds: list[Any] = []
    original = redis.sadd

    def sadd(*args: Any) -> Any:
        sadds.append(args)
        return original(*args)

    monkeypatch.setattr(redis, "sadd", sadd)
    await q.add("x", 1)
    await asyncio.gather(*(q.add("x", i) for i in range(20)))
    await q.add_bulk([("x", i) for i in range(5)])
    assert sadds == [(registry_key(prefix), queue_name)]


async def test_registry_failure_does_not_fail_adds(
    redis: RedisClient, queue_name: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ResponseError

    async def refuse(*args: Any) -> Any:
        raise ResponseError("NOPERM this user has no permissions to run the 'sadd' command")

    monkeypatch.setattr(redis, "sadd", refuse)
    q = Queue(queue_name, redis, prefix=prefix)
    job = await q.add("x", 1)
    assert await q.get_state(job.id) is JobState.WAITING


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too. (devstack's
    `RedisCluster` may pick ports above 55535, which cluster mode refuses.)"""
    for _ in range(100):
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair")


@pytest.mark.cluster
async def test_cluster_discovery_and_commands(
    queue_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from devstack import RedisCluster

    cluster = RedisCluster()
    for node in cluster.nodes:
        node.port = _cluster_port()
    with cluster:
        host, port = cluster.startup_nodes[0]
        url = f"redis+cluster://{host}:{port}"
        client = connect(url)
        try:
            names = [f"{queue_name}-{i}" for i in range(12)]  # spread over the slots
            for name in names:
                await Queue(name, client).add("x", None)
            await client.delete(registry_key("qc"))  # discovery alone must find them
            found = await list_queues(client, "qc")
            assert found == sorted((n, n) for n in names)
            nodes = {client.get_node_from_key(f"qc:{{{n}}}:ctr").name for n in names}
            assert len(nodes) > 1, "the queues live on several primaries"

            # pipelined script calls work on a cluster (bulk adds over one chunk, group infos)
            q = Queue(names[0], client)
            await q.add_bulk([("g", i, JobOptions(group=f"g{i % 3}")) for i in range(600)])
            assert [i["waiting"] for i in await q.get_group_infos(["g0", "g1", "g2"])] == [200] * 3
            await _fail_all(Queue(names[2], client))  # its one job fails

            async def run(*argv: str) -> tuple[int, str, str]:
                capsys.readouterr()
                code = await asyncio.to_thread(main, ["--redis", url, *argv])
                out, err = capsys.readouterr()
                return code, out, err

            code, out, err = await run("--json", "stats")
            assert code == 0, err
            rows = {r["queue"]: r for r in orjson.loads(out)}
            assert set(rows) == set(names) and rows[names[2]]["failed"] == 1
            assert rows[names[0]]["waiting"] == 601
            code, out, err = await run("groups", names[0])
            assert code == 0 and len(out.splitlines()) == 4, err
            code, out, err = await run("metrics", names[2])
            assert code == 0 and f'queue_failed_total{{queue="{names[2]}"}} 1' in out, err
            code, out, err = await run("obliterate", names[1], "--force")
            assert code == 0, err
            assert (names[1], names[1]) not in await list_queues(client, "qc")
        finally:
            await client.aclose()


async def _fail_all(q: Queue) -> None:
    async def proc(job: Job) -> None:
        raise UnrecoverableError("no")

    worker = Worker(q, proc)
    worker.start()
    try:
        await wait_for(lambda: _all_failed(q))
    finally:
        await worker.close(5)


async def _all_failed(q: Queue) -> bool:
    c = await q.get_job_counts()
    return c["failed"] > 0 and c["waiting"] == c["active"] == 0


# -- commands -------------------------------------------------------------------------------------


async def test_stats(redis: RedisClient, queue_name: str, prefix: str, cli: Cli) -> None:
    await _populate(redis, queue_name, prefix)
    other = Queue(f"{queue_name}-other", redis, prefix=prefix)
    await other.add("x", None)
    await other.pause()
    code, out, err = await cli("stats")
    assert code == 0 and err == ""
    header, first, second, *_ = out.splitlines()
    assert header.split()[:8] == [
        "QUEUE",
        "WAIT",
        "PRIO",
        "DELAYED",
        "ACTIVE",
        "DONE",
        "FAILED",
        "PAUSED",
    ]
    assert first.split()[:8] == [queue_name, "3", "1", "1", "0", "3", "2", "no"]
    assert second.split()[:8] == [f"{queue_name}-other", "1", "0", "0", "0", "0", "0", "yes"]
    for argv in (["--json", "stats"], ["stats", "--json"]):
        code, out, _ = await cli(*argv)
        rows = orjson.loads(out)
        assert code == 0 and [r["queue"] for r in rows] == [queue_name, f"{queue_name}-other"]
        row = rows[0]
        assert (row["waiting"], row["prioritized"], row["delayed"]) == (3, 1, 1)
        assert (row["completed"], row["failed"], row["paused"]) == (3, 2, False)
        assert row["completed_last_minute"] + row["completed_this_minute"] >= 3 or (
            row["completed_last_hour"] + row["completed_this_minute"] == 3
        )
        assert row["completed_total"] == 3 and row["failed_total"] == 2
        assert isinstance(row["rate_per_second"], float)
    # direct call, no subprocess or argument parsing
    result = await cmd_stats(Context(redis, prefix))
    assert [r["queue"] for r in result.data] == [queue_name, f"{queue_name}-other"]


async def test_jobs(redis: RedisClient, queue_name: str, prefix: str, cli: Cli) -> None:
    await _populate(redis, queue_name, prefix)
    code, out, _ = await cli("jobs", queue_name, "failed")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "NAME",
        "STATE",
        "ATTEMPTS",
        "CREATED",
        "PROCESSED",
        "FINISHED",
        "ERROR",
    ]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["5", "bad", "failed", "1/1"],
        ["4", "bad", "failed", "1/1"],
    ], "newest first"
    assert lines[1].endswith("…") and "UnrecoverableError: boom" in lines[1]
    assert "Z" in lines[1].split()[4] and lines[1].split()[4].startswith("20")
    code, out, _ = await cli("--json", "jobs", queue_name, "failed")
    rows = orjson.loads(out)
    assert rows[0]["error"].endswith("second line"), "JSON is never truncated"
    assert rows[0]["finished"].endswith("Z") and rows[0]["attempts_made"] == 1
    code, out, _ = await cli("jobs", queue_name, "completed", "--start", "1", "--count", "1")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["2"]
    code, out, _ = await cli("jobs", queue_name, "waiting", "--json")
    assert [r["name"] for r in orjson.loads(out)] == ["plain", "grouped", "grouped"]
    code, out, _ = await cli("jobs", queue_name, "delayed")
    assert out.splitlines()[1].split()[:2] == ["6", "later"]
    code, out, _ = await cli("jobs", queue_name, "active")
    assert out.splitlines()[1:] == ["(none)"]
    with pytest.raises(CommandError, match="unknown state"):
        await cmd_jobs(Context(redis, prefix), queue_name, "sleeping")


async def test_job(redis: RedisClient, queue_name: str, prefix: str, cli: Cli) -> None:
    await _populate(redis, queue_name, prefix)
    code, out, _ = await cli("job", queue_name, "4")
    assert code == 0
    assert "state             failed" in out
    for part in (
        'data:\n  {\n    "i": 0',
        "stack trace:\n  Traceback",
        "error history:\n  [",
        "logs (1):\n  started 4",
        "attempts_made     1",
        "stalled_count     0",
    ):
        assert part in out, part
    assert "second line" in out, "the job view shows the whole error"
    code, out, _ = await cli("job", queue_name, "1", "--json")
    data = orjson.loads(out)
    assert data["state"] == "completed" and data["return_value"] == {"answer": 0}
    assert data["data"] == {"i": 0, "text": "x" * 100}
    assert data["progress"] == {"pct": 50} and data["logs"] == ["started 1"]
    assert data["attempts_started"] == 1 and data["stalled_count"] == 0
    assert data["created"].endswith("Z") and "seq" in data["other_fields"]
    code, out, _ = await cli("job", queue_name, "9", "--json")
    assert orjson.loads(out)["group"] == "g2"
    code, out, err = await cli("job", queue_name, "nope")
    assert code == 1 and out == "" and "no job 'nope'" in err


async def test_retry_promote_clean_drain(
    redis: RedisClient, queue_name: str, prefix: str, cli: Cli
) -> None:
    q = await _populate(redis, queue_name, prefix)
    code, out, _ = await cli("retry", queue_name, "--count", "1")
    assert (code, out.strip()) == (0, f"retried 1 failed job of queue {queue_name}")
    code, out, _ = await cli("--json", "retry", queue_name, "--state", "completed")
    assert orjson.loads(out) == {"queue": queue_name, "state": "completed", "retried": 3}
    c = await q.get_job_counts()
    assert (c["completed"], c["failed"], c["waiting"]) == (0, 1, 7)
    code, out, _ = await cli("promote", queue_name)
    assert out.strip() == f"promoted 1 delayed job of queue {queue_name}"
    assert (await q.get_job_counts())["delayed"] == 0
    code, out, _ = await cli("clean", queue_name, "failed", "--grace-ms", "3600000")
    assert out.strip() == "removed 0 failed jobs older than 3600000 ms"
    code, out, _ = await cli("--json", "clean", queue_name, "failed")
    assert orjson.loads(out)["ids"] == ["5"]
    code, _, err = await cli("clean", queue_name, "active")
    assert code == 2 and "invalid choice" in err
    code, out, _ = await cli("drain", queue_name)
    assert (code, out.strip()) == (0, f"removed 9 waiting jobs from queue {queue_name}")
    c = await q.get_job_counts()
    assert c["waiting"] == 0 and c["prioritized"] == 0, "prioritized jobs are waiting too"
    await q.add("later", None, delay=60_000)
    await q.add("now", None)
    code, out, _ = await cli("--json", "drain", queue_name, "--delayed")
    assert orjson.loads(out) == {"queue": queue_name, "delayed": True, "removed": 2}
    c = await q.get_job_counts()
    assert (c["waiting"], c["prioritized"], c["delayed"]) == (0, 0, 0)


async def test_pause_resume_and_groups(
    redis: RedisClient, queue_name: str, prefix: str, cli: Cli
) -> None:
    q = await _populate(redis, queue_name, prefix)
    code, out, _ = await cli("pause", queue_name)
    assert (code, out.strip()) == (0, f"paused queue {queue_name}")
    assert await q.is_paused()
    code, out, _ = await cli("pause", queue_name)
    assert out.strip() == f"queue {queue_name} was already paused"
    code, out, _ = await cli("--json", "resume", queue_name)
    assert orjson.loads(out)["changed"] is True and not await q.is_paused()
    code, out, _ = await cli("pause", queue_name, "--group", "g1")
    assert out.strip() == f"paused group g1 of queue {queue_name}"
    await q.set_group_concurrency("g2", 3)
    await q.rate_limit_group("g2", 60_000)
    code, out, _ = await cli("groups", queue_name)
    lines = out.splitlines()
    assert lines[0].split() == [
        "GROUP",
        "WAITING",
        "ACTIVE",
        "PAUSED",
        "HELD",
        "UNTIL",
        "CONCURRENCY",
        "RATE",
        "LIMIT",
    ]
    assert lines[1].split() == ["g1", "1", "0", "yes", "-", "1", "-"]
    g2 = lines[2].split()
    assert g2[:4] == ["g2", "1", "0", "no"] and g2[4].endswith("Z") and g2[5] == "3"
    code, out, _ = await cli("groups", queue_name, "--json")
    rows = orjson.loads(out)
    assert [r["group"] for r in rows] == ["g1", "g2"] and rows[0]["paused"] is True
    code, out, _ = await cli("resume", queue_name, "--group", "g1")
    assert out.strip() == f"resumed group g1 of queue {queue_name}"
    assert not (await q.get_group_info("g1"))["paused"]


async def test_remove(redis: RedisClient, queue_name: str, prefix: str, cli: Cli) -> None:
    q = Queue(queue_name, redis, prefix=prefix)
    job = await q.add("x", None)
    other = await q.add("y", None)
    release = asyncio.Event()

    async def proc(job: Job) -> None:
        await release.wait()

    worker = Worker(q, proc, concurrency=1)
    worker.start()
    try:
        await wait_for(lambda: worker.active_count == 1)
        code, _, err = await cli("remove", queue_name, job.id)
        assert code == 1 and "is active" in err and "--force" in err
        assert await q.get_state(job.id) is JobState.ACTIVE
        code, out, _ = await cli("remove", queue_name, other.id)
        assert (code, out.strip()) == (0, f"removed waiting job {other.id} from queue {queue_name}")
        code, out, _ = await cli("--json", "remove", queue_name, job.id, "--force")
        assert orjson.loads(out) == {
            "queue": queue_name,
            "id": job.id,
            "removed": True,
            "state": "active",
        }
        assert await q.get_state(job.id) is None
        code, _, err = await cli("remove", queue_name, job.id)
        assert code == 1 and f"no job '{job.id}'" in err
    finally:
        release.set()
        await worker.close(5)


async def test_obliterate(redis: RedisClient, queue_name: str, prefix: str, cli: Cli) -> None:
    q = await _populate(redis, queue_name, prefix)
    before = await _dump(redis, prefix)
    code, out, err = await cli("obliterate", queue_name)
    assert (code, out) == (1, "")
    assert err.strip() == (
        f"queue-core: error: refusing to obliterate queue '{queue_name}' without --force"
    )
    assert await _dump(redis, prefix) == before, "nothing changed"
    code, out, _ = await cli("obliterate", queue_name, "--force")
    assert (code, out.strip()) == (0, f"obliterated queue {queue_name} (10 jobs)")
    assert await list_queues(redis, prefix) == []
    assert await q.get_job_counts() == {
        "waiting": 0,
        "prioritized": 0,
        "delayed": 0,
        "active": 0,
        "completed": 0,
        "failed": 0,
        "waiting_children": 0,
        "paused": False,
        "groups": 0,
        "grouped_waiting": 0,
    }
    code, _, err = await cli("obliterate", queue_name, "--force")
    assert code == 1 and "does not exist" in err


async def test_obliterate_with_active_jobs(
    redis: RedisClient, queue_name: str, prefix: str, cli: Cli
) -> None:
    q = Queue(queue_name, redis, prefix=prefix)
    await q.add("x", None)
    release = asyncio.Event()

    async def proc(job: Job) -> None:
        await release.wait()

    worker = Worker(q, proc)
    worker.start()
    try:
        await wait_for(lambda: worker.active_count == 1)
        code, _, err = await cli("obliterate", queue_name, "--force")
        assert code == 1 and "1 active job" in err and "--force-active" in err
        assert not await q.is_paused(), "refused before pausing"
        code, out, _ = await cli("--json", "obliterate", queue_name, "--force", "--force-active")
        assert code == 0 and orjson.loads(out)["obliterated"] is True
        assert (await q.get_job_counts())["active"] == 0
    finally:
        release.set()
        await worker.close(5)


async def test_obliterate_leaves_queues_sharing_the_tag(
    redis: RedisClient, queue_name: str, prefix: str, cli: Cli
) -> None:
    q = Queue(queue_name, redis, prefix=prefix)
    await q.configure(QueueSettings(dead_letter_queue=f"{queue_name}-dlq"))
    await q.add("x", None)
    await q.dead_letter_queue(f"{queue_name}-dlq").add("dead", None)
    # the tag of a dead-letter queue is found when its name is unique
    code, out, _ = await cli("--json", "jobs", f"{queue_name}-dlq", "waiting")
    assert code == 0 and [r["name"] for r in orjson.loads(out)] == ["dead"]
    code, out, _ = await cli("obliterate", queue_name, "--force")
    assert code == 0, out
    code, out, _ = await cli("--json", "jobs", f"{queue_name}-dlq", "waiting")
    assert code == 0 and [r["name"] for r in orjson.loads(out)] == ["dead"], "the DLQ survives"
    assert await list_queues(redis, prefix) == [(f"{queue_name}-dlq", queue_name)]
    code, out, _ = await cli("obliterate", f"{queue_name}-dlq", "--tag", queue_name, "--force")
    assert code == 0, out
    assert await list_queues(redis, prefix, include_empty=True) == []


async def test_metrics_command(redis: RedisClient, queue_name: str, prefix: str, cli: Cli) -> None:
    await _populate(redis, queue_name, prefix)
    code, out, _ = await cli("metrics")
    assert code == 0 and "# TYPE queue_jobs gauge" in out
    assert f'queue_jobs{{queue="{queue_name}",state="failed"}} 2' in out
    code, out, _ = await cli("metrics", queue_name, "--json")
    (entry,) = orjson.loads(out)
    assert entry["counts"]["failed"] == 2 and entry["metrics"]["completed_total"] == 3


async def test_usage_and_refusals_change_nothing(
    redis: RedisClient, queue_name: str, prefix: str, cli: Cli
) -> None:
    await _populate(redis, queue_name, prefix)
    before = await _dump(redis, prefix)
    code, out, err = await cli("jobs", queue_name, "sleeping")
    assert (code, out) == (2, "") and "invalid choice: 'sleeping'" in err
    code, _, err = await cli("frobnicate")
    assert code == 2 and "invalid choice" in err
    code, _, err = await cli()
    assert code == 2 and "required" in err
    code, _, err = await cli("jobs", queue_name, "failed", "--count", "0")
    assert code == 2 and "must be positive" in err
    code, _, err = await cli("pause", f"{queue_name}-typo")
    assert code == 1 and "does not exist" in err
    code, _, err = await cli("retry", f"{queue_name}-typo")
    assert code == 1
    for tag in ("t1", "t2"):
        await Queue("twin", redis, prefix=prefix, tag=f"{queue_name}-{tag}").add("x", None)
    before = await _dump(redis, prefix)
    code, _, err = await cli("drain", "twin")
    assert code == 1 and "several queues are named 'twin'; choose one with --tag" in err
    assert await _dump(redis, prefix) == before, "nothing changed, no queue created"
    code, out, _ = await cli("--help")
    assert code == 0 and "obliterate" in out
    # options after the command override those before it; a bad URL is a usage error
    code, _, err = await cli("stats", "--redis", "nonsense://:pw1234@h:1")
    assert code == 2 and "invalid --redis URL nonsense://:***@h:1" in err and "pw1234" not in err


# -- the console script -------------------------------------------------------------------------


def _script() -> list[str]:
    path = Path(sys.executable).with_name("queue-core")
    return [str(path)] if path.exists() else [sys.executable, "-m", "queue_core.cli"]


async def _spawn(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_console_script(
    redis: RedisClient, redis_url: str, queue_name: str, prefix: str
) -> None:
    await _populate(redis, queue_name, prefix)
    # $REDIS_URL is the default for --redis
    code, out, err = await _spawn(
        *_script(), "--prefix", prefix, "--json", "stats", env={"REDIS_URL": redis_url}
    )
    assert (code, err) == (0, "")
    assert [r["queue"] for r in orjson.loads(out)] == [queue_name]
    code, out, err = await _spawn(
        sys.executable,
        "-m",
        "queue_core.cli",
        "--redis",
        redis_url,
        "--prefix",
        prefix,
        "obliterate",
        queue_name,
    )
    assert code == 1 and out == "" and "without --force" in err
    code, _, err = await _spawn(*_script(), "--redis", redis_url, "jobs", queue_name, "bogus")
    assert code == 2 and "invalid choice" in err


async def test_console_script_never_prints_the_password() -> None:
    code, out, err = await _spawn(
        *_script(), "--redis", "redis://:s3cretpassw0rd@127.0.0.1:1/0", "stats"
    )
    assert code == 1 and out == ""
    assert "s3cretpassw0rd" not in err and "redis://:***@127.0.0.1:1/0" in err
