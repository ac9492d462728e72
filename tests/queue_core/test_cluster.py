"""queue-core on a real three-master Valkey Cluster started by the test session."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as sync_redis

from devstack import RedisCluster
from queue_core import (
    Backoff,
    BulkJob,
    Dedup,
    FlowJob,
    FlowProducer,
    Job,
    Queue,
    Schedule,
    Worker,
    connect,
)
from queue_core.types import RedisClient

from .helpers import check_consistency, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3) as c:
        yield c


@pytest.fixture
async def cluster_redis(cluster: RedisCluster) -> AsyncIterator[RedisClient]:
    first = cluster.nodes[0]
    client = connect(f"redis+cluster://{first.host}:{first.port}")
    yield client
    await client.aclose()


def _node_of(cluster: RedisCluster, key: str) -> int:
    """Index of the node that owns `key` (slots were split evenly in node order)."""
    slot = sync_redis.Redis(port=cluster.nodes[0].port).cluster("KEYSLOT", key)
    for i in range(len(cluster.nodes)):
        per = 16384 // len(cluster.nodes)
        lo = i * per
        hi = 16383 if i == len(cluster.nodes) - 1 else (i + 1) * per - 1
        if lo <= int(slot) <= hi:
            return i
    raise AssertionError("slot without a node")


def _queues_on_every_node(cluster: RedisCluster, base: str) -> list[str]:
    chosen: dict[int, str] = {}
    i = 0
    while len(chosen) < len(cluster.nodes):
        name = f"{base}-{i}"
        chosen.setdefault(_node_of(cluster, f"qc:{{{name}}}:meta"), name)
        i += 1
    return list(chosen.values())


async def test_group_ordered_workload_across_nodes(
    cluster: RedisCluster, cluster_redis: RedisClient, queue_name: str
) -> None:
    names = _queues_on_every_node(cluster, queue_name)
    queues = [Queue(n, cluster_redis) for n in names]
    rng = random.Random(3)
    for q in queues:
        await q.add_bulk(
            [BulkJob("m", {"g": g, "i": i}, overrides={"group": f"g{g}", "attempts": 10,
                                                         "backoff": Backoff.fixed(5)})
             for i in range(20) for g in range(30)]
        )  # fmt: skip
    done: dict[tuple[str, int], list[int]] = defaultdict(list)

    async def proc(job: Job) -> None:
        if rng.random() < 0.1:
            raise RuntimeError("flaky")
        done[(job.queue.name, job.data["g"])].append(job.data["i"])

    workers = [Worker(q, proc, concurrency=20) for q in queues for _ in range(2)]
    for w in workers:
        w.start()
    await wait_for(lambda: sum(len(v) for v in done.values()) == 3 * 600, timeout=60)
    await asyncio.gather(*(w.close(5) for w in workers))
    for key, seq in done.items():
        assert seq == list(range(20)), (key, seq)
    for q in queues:
        await check_consistency(q)


async def test_connection_kill_on_one_node_loses_nothing(
    cluster: RedisCluster, cluster_redis: RedisClient, queue_name: str
) -> None:
    names = _queues_on_every_node(cluster, queue_name)
    queues = [Queue(n, cluster_redis) for n in names]
    for q in queues:
        await q.add_bulk([("m", i) for i in range(300)])
    ran: dict[str, set[int]] = defaultdict(set)

    async def proc(job: Job) -> None:
        ran[job.queue.name].add(job.data)
        await asyncio.sleep(0.002)

    workers = [Worker(q, proc, concurrency=10, lock_duration=2000, stalled_interval=300)
               for q in queues]  # fmt: skip
    for w in workers:
        w.start()
    await wait_for(lambda: sum(len(v) for v in ran.values()) > 150, timeout=20)
    victim = cluster.nodes[1]
    killed = sync_redis.Redis(port=victim.port).client_kill_filter(_type="normal", skipme=True)
    assert killed > 0
    await wait_for(lambda: all(len(ran[n]) == 300 for n in names), timeout=30)

    async def settled() -> bool:
        counts = [await q.get_job_counts() for q in queues]
        return all(c["completed"] == 300 and c["active"] == 0 for c in counts)

    await wait_for(settled, timeout=20)
    await asyncio.gather(*(w.close(5) for w in workers))
    for q in queues:
        await check_consistency(q)


async def test_flows_schedulers_dedup_and_admin_on_cluster(
    cluster_redis: RedisClient, queue_name: str
) -> None:
    flows = FlowProducer(cluster_redis, tag=queue_name)
    tree = await flows.add(FlowJob(queue_name, "parent", children=[
        FlowJob(f"{queue_name}-c", "a"), FlowJob(f"{queue_name}-c", "b")]))  # fmt: skip

    async def proc(job: Job) -> str:
        return job.name

    parent_q = flows.queue(queue_name)
    child_q = flows.queue(f"{queue_name}-c")
    await parent_q.upsert_scheduler("tick", Schedule(every_ms=100), "tick")
    first = await parent_q.add("d", 1, dedup=Dedup("same"))
    assert (await parent_q.add("d", 2, dedup=Dedup("same"))).id == first.id
    workers = [Worker(parent_q, proc), Worker(child_q, proc)]
    for w in workers:
        w.start()
    assert await parent_q.wait_until_finished(tree.job_id, 10) == "parent"
    await wait_for(lambda: _ran_ticks(parent_q, 3), timeout=10)
    await asyncio.gather(*(w.close(5) for w in workers))
    await parent_q.remove_scheduler("tick")
    for q in (parent_q, child_q):
        await q.pause()
        await q.obliterate(force=True)
    assert [k async for k in cluster_redis.scan_iter(match=f"qc:{{{queue_name}}}*")] == []


async def _ran_ticks(q: Queue, n: int) -> bool:
    info = await q.get_scheduler("tick")
    return info is not None and info.runs >= n
