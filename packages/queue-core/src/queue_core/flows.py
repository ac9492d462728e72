"""Flows: a parent job runs after its children (which may live in other queues of one tag)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from queue_core.connection import connect
from queue_core.errors import InvalidOptionError
from queue_core.options import JobOptions
from queue_core.queue import Queue
from queue_core.storage import pack
from queue_core.types import RedisClient

__all__ = ["FlowJob", "FlowNode", "FlowProducer", "child_key_to_id"]

ChildPolicy = Literal["fail", "ignore", "continue"]


@dataclass(slots=True)
class FlowJob:
    """One node of a flow. `on_failure` says what this job's final failure does to its parent:
    `fail` (the parent fails), `ignore` (counts as done; see `Job.failed_children()`), or
    `continue` (the parent starts at once, other children keep running)."""

    queue: str
    name: str
    data: Any = None
    options: JobOptions | None = None
    on_failure: ChildPolicy = "fail"
    children: list[FlowJob] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FlowNode:
    queue: str
    job_id: str
    children: tuple[FlowNode, ...] = ()


def child_key_to_id(key: str) -> tuple[str, str]:
    """Split a child key (`<queue base>|<job id>`) into (queue base, job id)."""
    base, _, job_id = key.rpartition("|")
    return base, job_id


class FlowProducer:
    """Adds flows atomically (one script call for the whole tree).

    Every queue of a flow must share one hash tag (`tag`), so that the flow works unchanged on
    Redis Cluster: workers of those queues open them with `Queue(name, redis, tag=tag)`.
    """

    def __init__(self, redis: RedisClient | str, *, tag: str, prefix: str = "qc") -> None:
        self._own = isinstance(redis, str)
        self.redis: RedisClient = connect(redis) if isinstance(redis, str) else redis
        self.tag = tag
        self.prefix = prefix
        self._queues: dict[str, Queue] = {}

    def queue(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = Queue(name, self.redis, prefix=self.prefix, tag=self.tag)
        return self._queues[name]

    async def close(self) -> None:
        if self._own:
            await self.redis.aclose()

    def _walk(self, node: FlowJob, parent: int, out: list[tuple[FlowJob, int]]) -> None:
        out.append((node, parent))
        me = len(out)
        for child in node.children:
            self._walk(child, me, out)

    async def add(self, flow: FlowJob) -> FlowNode:
        nodes: list[tuple[FlowJob, int]] = []
        self._walk(flow, 0, nodes)
        encoded: list[list[Any]] = []
        for node, parent in nodes:
            if node.on_failure not in ("fail", "ignore", "continue"):
                raise InvalidOptionError("on_failure", "must be 'fail', 'ignore' or 'continue'")
            queue = self.queue(node.queue)
            opts = queue._options(node.options, {})
            if opts.dedup is not None or opts.group_max_size:
                raise InvalidOptionError("options", "flows do not support dedup or group_max_size")
            job = queue._encode(node.name, node.data, opts)
            encoded.append([queue.keys.base, parent, node.on_failure, job, len(node.children)])
        root = self.queue(flow.queue)
        ids = await root._store.add_flow(pack(encoded))
        id_iter: Iterator[str] = iter(ids)
        return self._tree(flow, id_iter)

    def _tree(self, node: FlowJob, ids: Iterator[str]) -> FlowNode:
        job_id = next(ids)
        return FlowNode(node.queue, job_id, tuple(self._tree(c, ids) for c in node.children))
