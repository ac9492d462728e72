"""Flows: parents run after their children, across queues of one hash tag."""

from __future__ import annotations

import asyncio

import pytest

from queue_core import (
    FlowJob,
    FlowProducer,
    Job,
    JobOptions,
    JobState,
    Queue,
    UnrecoverableError,
    Worker,
)
from queue_core.types import RedisClient

from .helpers import check_consistency, wait_for


async def _workers(redis: RedisClient, tag: str, names: list[str], proc: object) -> list[Worker]:
    workers = [Worker(Queue(n, redis, tag=tag), proc) for n in names]  # type: ignore[arg-type]
    for w in workers:
        w.start()
    return workers


async def test_parent_runs_after_children_in_other_queues(
    redis: RedisClient, queue_name: str
) -> None:
    tag = queue_name
    flows = FlowProducer(redis, tag=tag)
    order: list[str] = []
    values: dict[tuple[str, str], object] = {}

    async def proc(job: Job) -> object:
        order.append(job.name)
        if job.name == "report":
            values.update(await job.children_values())
            return "report done"
        await asyncio.sleep(0.05 if job.name == "slow" else 0)
        return {"from": job.name}

    tree = await flows.add(
        FlowJob(
            f"{tag}-reports",
            "report",
            {"day": 1},
            children=[
                FlowJob(f"{tag}-fetch", "slow", 1),
                FlowJob(f"{tag}-fetch", "fast", 2),
                FlowJob(
                    f"{tag}-render",
                    "render",
                    3,
                    children=[FlowJob(f"{tag}-fetch", "grandchild", 4)],
                ),
            ],
        )
    )
    reports = flows.queue(f"{tag}-reports")
    assert await reports.get_state(tree.job_id) is JobState.WAITING_CHILDREN
    render = flows.queue(f"{tag}-render")
    assert await render.get_state(tree.children[2].job_id) is JobState.WAITING_CHILDREN
    workers = await _workers(redis, tag, [f"{tag}-reports", f"{tag}-fetch", f"{tag}-render"], proc)
    assert await reports.wait_until_finished(tree.job_id, 10) == "report done"
    await asyncio.gather(*(w.close(5) for w in workers))
    assert order[-1] == "report"
    assert order.index("grandchild") < order.index("render")
    assert sorted(v["from"] for v in values.values()) == ["fast", "render", "slow"]  # type: ignore[index]
    for name in ("reports", "fetch", "render"):
        await check_consistency(flows.queue(f"{tag}-{name}"))


async def test_failed_child_fails_parent_by_default(redis: RedisClient, queue_name: str) -> None:
    flows = FlowProducer(redis, tag=queue_name)
    ran: list[str] = []

    async def proc(job: Job) -> None:
        ran.append(job.name)
        if job.name == "bad":
            raise UnrecoverableError("broken input")

    tree = await flows.add(
        FlowJob(
            queue_name,
            "parent",
            children=[FlowJob(f"{queue_name}-c", "bad"), FlowJob(f"{queue_name}-c", "good")],
        )
    )
    workers = await _workers(redis, queue_name, [queue_name, f"{queue_name}-c"], proc)
    parent_q = flows.queue(queue_name)
    await wait_for(lambda: _state(parent_q, tree.job_id, JobState.FAILED), timeout=5)
    await wait_for(lambda: "good" in ran)
    await asyncio.gather(*(w.close(5) for w in workers))
    parent = await parent_q.get_job(tree.job_id)
    assert parent is not None and parent.failed_reason and "failed" in parent.failed_reason
    assert "parent" not in ran
    await check_consistency(parent_q)


async def _state(q: Queue, job_id: str, state: JobState) -> bool:
    return await q.get_state(job_id) is state


async def test_ignore_and_continue_policies(redis: RedisClient, queue_name: str) -> None:
    flows = FlowProducer(redis, tag=queue_name)
    release = asyncio.Event()
    ran: list[str] = []
    seen_failures: dict[str, object] = {}

    async def proc(job: Job) -> str:
        ran.append(job.name)
        if job.name.startswith("bad"):
            raise UnrecoverableError("nope")
        if job.name == "slow":
            await release.wait()
        if job.name.startswith("parent"):
            seen_failures[job.name] = await job.failed_children()
        return "ok"

    child_q = f"{queue_name}-c"
    ignore = await flows.add(
        FlowJob(
            queue_name,
            "parent-ignore",
            children=[FlowJob(child_q, "bad-1", on_failure="ignore"), FlowJob(child_q, "fine")],
        )
    )
    cont = await flows.add(
        FlowJob(
            queue_name,
            "parent-continue",
            children=[FlowJob(child_q, "bad-2", on_failure="continue"), FlowJob(child_q, "slow")],
        )
    )
    workers = [
        Worker(Queue(queue_name, redis, tag=queue_name), proc),
        Worker(Queue(child_q, redis, tag=queue_name), proc, concurrency=4),
    ]
    for w in workers:
        w.start()
    parent_q = flows.queue(queue_name)
    assert await parent_q.wait_until_finished(ignore.job_id, 5) == "ok"
    # `continue`: the parent ran although its slow sibling is still running
    assert await parent_q.wait_until_finished(cont.job_id, 5) == "ok"
    assert "slow" in ran and not release.is_set()
    release.set()
    await asyncio.gather(*(w.close(5) for w in workers))
    assert list(seen_failures["parent-ignore"].values()) == ["UnrecoverableError: nope"]  # type: ignore[attr-defined]
    assert len(seen_failures["parent-continue"]) == 1  # type: ignore[arg-type]


async def test_flow_rejects_an_existing_job_id_and_adds_nothing(
    redis: RedisClient, queue_name: str
) -> None:
    from queue_core import QueueError

    flows = FlowProducer(redis, tag=queue_name)
    q = flows.queue(queue_name)
    await q.add("x", None, job_id="taken")
    before = await q.get_job_counts()
    with pytest.raises(QueueError, match="already exists"):
        await flows.add(
            FlowJob(
                queue_name,
                "p",
                children=[FlowJob(queue_name, "c", options=JobOptions(job_id="taken"))],
            )
        )
    assert await q.get_job_counts() == before
