"""Which queues exist: a best-effort registry plus key discovery.

Queues need no creation, so nothing lists them by design. Operators' tools do need a list:

- the registry, a SET `<prefix>:queues` with members `name` (or `name|tag` when the queue has a
  tag of its own), written by `Queue.configure()` (for the queue and its dead-letter queue) and
  once per `Queue` object after its first successful add, and cleaned by `Queue.obliterate()`.
  Names and tags may themselves contain `|`: such members are read every possible way and the
  readings whose queue has keys are kept;
- discovery: `SCAN MATCH <prefix>:{*}:ctr` on every primary, which finds every queue without a
  separate tag that ever had a job added (the `ctr` counter is created by the first add and
  only deleted by obliterate).

`list_queues()` merges both and leaves out registry members whose queue has no keys at all (a
queue deleted by other means). Nothing here is on the hot path of adding or processing.
"""

from __future__ import annotations

from typing import Any

from queue_core.connection import is_cluster
from queue_core.errors import InvalidOptionError
from queue_core.keys import QueueKeys
from queue_core.types import RedisClient, as_str

__all__ = [
    "list_queues",
    "parse_member",
    "queue_exists",
    "register_queues",
    "registry_key",
    "registry_member",
    "unregister_queue",
]

# Keys of which at least one exists for any queue that holds anything (checked in one EXISTS).
_PRESENCE = (
    "meta",
    "ctr",
    "events",
    "wait",
    "active",
    "delayed",
    "completed",
    "failed",
    "groups",
    "metrics",
)


def registry_key(prefix: str = "qc") -> str:
    """The registry SET of all queues under `prefix`."""
    return f"{prefix}:queues"


def registry_member(name: str, tag: str | None = None) -> str:
    """`name`, or `name|tag` when the queue has a tag of its own."""
    tag = tag or name
    return name if tag == name else f"{name}|{tag}"


def parse_member(member: str) -> tuple[str, str]:
    """The likeliest (name, tag) of a registry member: the last `|` separates name and tag.
    (`list_queues` also tries the other readings when names or tags contain `|`.)"""
    if "|" in member:
        name, _, tag = member.rpartition("|")
        return name, tag
    return member, member


def _readings(member: str, prefix: str) -> list[tuple[str, str]]:
    """Every valid (name, tag) that `member` can stand for, the likeliest first."""
    options = [parse_member(member), (member, member)]
    options += [(member[:i], member[i + 1 :]) for i, ch in enumerate(member) if ch == "|"]
    out: list[tuple[str, str]] = []
    for name, tag in options:
        try:
            QueueKeys.of(name, prefix, tag)
        except InvalidOptionError:
            continue  # not written by queue-core
        if (name, tag) not in out:
            out.append((name, tag))
    return out


def glob_escape(text: str) -> str:
    """`text` as a literal inside a Redis MATCH pattern."""
    out = []
    for ch in text:
        if ch in "\\*?[]":
            out.append("\\")
        out.append(ch)
    return "".join(out)


async def register_queues(
    redis: RedisClient, queues: list[tuple[str, str | None]], prefix: str = "qc"
) -> None:
    """Add (name, tag) pairs to the registry (one SADD)."""
    if queues:
        r: Any = redis
        await r.sadd(registry_key(prefix), *(registry_member(n, t) for n, t in queues))


async def unregister_queue(
    redis: RedisClient, name: str, tag: str | None = None, prefix: str = "qc"
) -> None:
    r: Any = redis
    await r.srem(registry_key(prefix), registry_member(name, tag))


def _parse_counter_key(key: str, prefix: str) -> tuple[str, str] | None:
    """`<prefix>:{<name>}:ctr` -> (name, name). Tags cannot contain `}`, so the first `}`
    closes the tag and the rest must be exactly `:ctr` (keys of tagged queues, and job or
    dedup keys that merely end in `:ctr`, do not qualify)."""
    head = f"{prefix}:{{"
    if not key.startswith(head):
        return None
    tag, sep, rest = key[len(head) :].partition("}")
    if not sep or not tag or rest != ":ctr":
        return None
    return tag, tag


async def _scan_counters(redis: RedisClient, prefix: str) -> set[tuple[str, str]]:
    pattern = glob_escape(prefix) + ":{*}:ctr"
    r: Any = redis
    found: set[tuple[str, str]] = set()
    if is_cluster(redis):
        # SCAN sees one node's keys: walk every primary.
        for node in r.get_primaries():
            async for key in r.scan_iter(match=pattern, count=1000, target_nodes=node):
                parsed = _parse_counter_key(as_str(key), prefix)
                if parsed:
                    found.add(parsed)
    else:
        async for key in r.scan_iter(match=pattern, count=1000):
            parsed = _parse_counter_key(as_str(key), prefix)
            if parsed:
                found.add(parsed)
    return found


async def queue_exists(
    redis: RedisClient, name: str, tag: str | None = None, prefix: str = "qc"
) -> bool:
    """Whether the queue holds anything (settings, jobs, counters, events or metrics)."""
    keys = QueueKeys.of(name, prefix, tag)
    r: Any = redis
    return bool(int(await r.exists(*(keys.key(k) for k in _PRESENCE))))


async def list_queues(
    redis: RedisClient, prefix: str = "qc", *, include_empty: bool = False
) -> list[tuple[str, str]]:
    """All queues under `prefix` as (name, tag) pairs (tag == name for untagged queues), sorted.

    Registry members whose queue has no keys left are left out unless `include_empty`.
    """
    r: Any = redis
    members = [_readings(as_str(m), prefix) for m in await r.smembers(registry_key(prefix))]
    found = await _scan_counters(redis, prefix)
    candidates = sorted({q for readings in members for q in readings} - found)
    present: set[tuple[str, str]] = set()
    if candidates:
        pipe = r.pipeline(transaction=False)
        for name, tag in candidates:
            keys = QueueKeys.of(name, prefix, tag)
            # All keys of a queue share its hash slot: one EXISTS per queue, also on a cluster.
            pipe.exists(*(keys.key(k) for k in _PRESENCE))
        replies = await pipe.execute()
        present = {q for q, n in zip(candidates, replies, strict=True) if int(n)}
    result = set(found)
    for readings in members:
        live = [q for q in readings if q in present or q in found]
        if live:
            result.update(live)
        elif include_empty and readings:
            result.add(readings[0])
    return sorted(result)
