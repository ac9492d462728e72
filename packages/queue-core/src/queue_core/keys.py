"""Every Redis key name of a queue comes from here (the Lua side builds the same names)."""

from __future__ import annotations

from dataclasses import dataclass

from queue_core.errors import InvalidOptionError

__all__ = ["KEY_KINDS", "QueueKeys", "validate_name"]

# The key kinds under a queue's base (lua/lib.lua lists what each holds).
KEY_KINDS = frozenset(
    [
        "meta",
        "ctr",
        "pseq",
        "wait",
        "active",
        "delayed",
        "completed",
        "failed",
        "events",
        "idle",
        "w",
        "j",
        "l",
        "de",
        "limiter",
        "qhold",
        "stall",
        "metrics",
        "groups",
        "g",
        "gm",
        "gready",
        "gprios",
        "gheld",
        "gclock",
        "gw",
        "wc",
        "deps",
        "cres",
        "cfail",
        "sched",
        "sch",
        "fseq",
        "grl",
    ]
)

_FORBIDDEN = set("{}\r\n\t ")


def validate_name(name: str, what: str = "queue name") -> str:
    if not isinstance(name, str) or not name:
        raise InvalidOptionError(what, "must be a non-empty string")
    if len(name) > 200:
        raise InvalidOptionError(what, "must be at most 200 characters")
    if _FORBIDDEN & set(name):
        raise InvalidOptionError(what, "must not contain braces or whitespace")
    return name


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Key names for one queue.

    All keys share the hash tag `{tag}` (the queue name unless given), so every script touches a
    single Redis Cluster slot. Queues that must be reachable from one script (a queue and its
    dead-letter queue, the queues of one flow) share a tag.
    """

    prefix: str
    name: str
    tag: str

    @classmethod
    def of(cls, name: str, prefix: str = "qc", tag: str | None = None) -> QueueKeys:
        validate_name(name)
        validate_name(prefix, "prefix")
        if tag is not None:
            validate_name(tag, "tag")
            if tag != name and name in KEY_KINDS:
                # its keys would read as keys of the queue named like the tag
                raise InvalidOptionError("queue name", f"{name!r} is reserved in a shared tag")
        return cls(prefix, name, tag or name)

    @property
    def base(self) -> str:
        if self.tag == self.name:
            return f"{self.prefix}:{{{self.name}}}"
        return f"{self.prefix}:{{{self.tag}}}:{self.name}"

    def key(self, suffix: str) -> str:
        return f"{self.base}:{suffix}"

    @property
    def meta(self) -> str:
        return self.key("meta")

    @property
    def events(self) -> str:
        return self.key("events")

    @property
    def marker(self) -> str:
        return self.key("marker")

    def job(self, job_id: str) -> str:
        return self.key(f"j:{job_id}")

    def logs(self, job_id: str) -> str:
        return self.key(f"l:{job_id}")

    def group(self, group_id: str) -> str:
        return self.key(f"g:{group_id}")

    def group_meta(self, group_id: str) -> str:
        return self.key(f"gm:{group_id}")
