"""`queue-core`: the operator's command-line tool (also `python -m queue_core.cli`).

Each command is an async function `cmd_<name>(ctx, ...) -> Result` that can be called directly
(tests, scripts); `main(argv)` parses the arguments, runs one command with `asyncio.run` and
prints its result as an aligned table (default) or JSON (`--json`).

Exit codes: 0 ok, 1 the operation was refused or failed (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from redis.exceptions import RedisClusterException, RedisError

from queue_core.connection import connect
from queue_core.errors import QueueError
from queue_core.job import Job, JobState
from queue_core.metrics import queue_snapshot, render_prometheus
from queue_core.queue import Queue
from queue_core.registry import list_queues, queue_exists
from queue_core.types import RedisClient, as_str

__all__ = [
    "CommandError",
    "Context",
    "Result",
    "build_parser",
    "cmd_clean",
    "cmd_drain",
    "cmd_groups",
    "cmd_job",
    "cmd_jobs",
    "cmd_metrics",
    "cmd_obliterate",
    "cmd_pause",
    "cmd_promote",
    "cmd_remove",
    "cmd_resume",
    "cmd_retry",
    "cmd_stats",
    "format_table",
    "main",
    "mask_url",
]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
LISTABLE_STATES = [s.value for s in JobState if s is not JobState.UNKNOWN]
CLEANABLE_STATES = [s for s in LISTABLE_STATES if s != JobState.ACTIVE.value]
CELL_WIDTH = 40  # longest table cell; longer values end with an ellipsis
ERROR_WIDTH = 60

# Job hash fields shown under their own headings by `job`; all others are listed raw.
_SHOWN_FIELDS = frozenset(
    [
        "name",
        "data",
        "prio",
        "att",
        "atm",
        "ats",
        "stc",
        "ts",
        "pon",
        "fon",
        "rdy",
        "gid",
        "ddk",
        "rv",
        "err",
        "stack",
        "errs",
        "prog",
        "pid",
        "pb",
    ]
)


class CommandError(Exception):
    """The command was refused or failed; the message is for the operator (exit code 1)."""


@dataclass(slots=True)
class Result:
    """What a command produced: `data` for --json, `text` for people."""

    data: Any
    text: str


@dataclass(slots=True)
class Context:
    redis: RedisClient
    prefix: str = "qc"

    def queue(self, name: str, tag: str | None = None) -> Queue:
        return Queue(name, self.redis, prefix=self.prefix, tag=tag)

    async def existing_queue(self, name: str, tag: str | None = None) -> Queue:
        """The queue, or CommandError when it has no keys at all (a typo, usually): commands
        must not create queues by writing settings into nothing. Without `tag`, a queue of
        that name with a tag of its own (a dead-letter queue) is found when it is the only one.
        """
        if await queue_exists(self.redis, name, tag, self.prefix):
            return self.queue(name, tag)
        if tag is None:
            tags = [t for n, t in await list_queues(self.redis, self.prefix) if n == name]
            if len(tags) == 1:
                return self.queue(name, tags[0])
            if tags:
                raise CommandError(
                    f"several queues are named {name!r}; choose one with --tag ({', '.join(tags)})"
                )
        where = f"queue {name!r}" + (f" (tag {tag!r})" if tag and tag != name else "")
        raise CommandError(
            f"{where} does not exist under prefix {self.prefix!r}; "
            "`queue-core stats` lists the queues"
        )


# -- formatting -----------------------------------------------------------------------------


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO-8601 UTC (`2024-05-01T12:00:00.123Z`), None for None/0."""
    if not ms:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.2f}"
    else:
        text = str(value)
    # One line per row: control characters (newlines in errors, tabs) become spaces.
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    if len(text) > width:
        text = text[: max(width - 1, 0)] + "…"
    return text


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    widths: Sequence[int | None] | None = None,
) -> str:
    """An aligned plain-text table; numeric columns are right-aligned, long cells truncated."""
    limits = [CELL_WIDTH if w is None else w for w in (widths or [None] * len(headers))]
    cells = [[_cell(v, limits[i]) for i, v in enumerate(row)] for row in rows]
    numeric = [
        bool(rows)
        and all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows)
        for i in range(len(headers))
    ]
    sizes = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(sizes[i]) if numeric[i] else v.ljust(sizes[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers)]
    out += [line(r) for r in cells]
    if not rows:
        out.append("(none)")
    return "\n".join(out)


def _kv(pairs: Sequence[tuple[str, Any]]) -> str:
    """`key  value` lines, keys aligned; values printed whole (these are not tables)."""
    size = max(len(k) for k, _ in pairs)
    out = []
    for key, value in pairs:
        shown = "-" if value is None else str(value)
        out.append(f"{key.ljust(size)}  {shown}".rstrip())
    return "\n".join(out)


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def mask_url(url: str) -> str:
    """`url` with its password (user info or `password=` query parameter) replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hosts = netloc.rpartition("@")
            user, sep, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hosts}" if sep else f"{user}@{hosts}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs])
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparsable URL>"


def _secrets(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
        found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password"]
    except ValueError:
        return []
    return [s for s in found if len(s) >= 3]


# -- commands ----------------------------------------------------------------------------------


async def cmd_stats(ctx: Context) -> Result:
    """All queues: jobs per state, paused, completed/failed in the last minute and hour."""
    names = await list_queues(ctx.redis, ctx.prefix)
    limit = asyncio.Semaphore(16)

    async def one(name: str, tag: str) -> dict[str, Any]:
        async with limit:
            snap = await queue_snapshot(ctx.queue(name, tag), 60)
        c, m = snap.counts, snap.metrics
        return {
            "queue": name,
            "tag": tag,
            "waiting": c["waiting"],
            "prioritized": c["prioritized"],
            "delayed": c["delayed"],
            "active": c["active"],
            "completed": c["completed"],
            "failed": c["failed"],
            "waiting_children": c["waiting_children"],
            "groups": c["groups"],
            "paused": c["paused"],
            "completed_last_minute": m.completed_last_minute,
            "failed_last_minute": m.failed_last_minute,
            "completed_last_hour": m.completed_in_window,
            "failed_last_hour": m.failed_in_window,
            "completed_this_minute": m.completed_current,
            "failed_this_minute": m.failed_current,
            "rate_per_second": round(m.rate_per_second, 3),
            "completed_total": m.completed_total,
            "failed_total": m.failed_total,
        }

    rows = list(await asyncio.gather(*(one(n, t) for n, t in names)))
    tagged = any(r["tag"] != r["queue"] for r in rows)
    headers = ["QUEUE", *(["TAG"] if tagged else [])]
    headers += ["WAIT", "PRIO", "DELAYED", "ACTIVE", "DONE", "FAILED", "PAUSED"]
    headers += ["DONE/1m", "FAIL/1m", "DONE/1h", "FAIL/1h", "JOBS/s"]
    table = []
    for r in rows:
        tag = [r["tag"] if r["tag"] != r["queue"] else None] if tagged else []
        counts = [r[k] for k in ("waiting", "prioritized", "delayed", "active", "completed")]
        counts += [r["failed"], r["paused"], r["completed_last_minute"], r["failed_last_minute"]]
        counts += [r["completed_last_hour"], r["failed_last_hour"], float(r["rate_per_second"])]
        table.append([r["queue"], *tag, *counts])
    text = format_table(headers, table)
    text += "\n(1m = the last complete minute, 1h = the last 60 complete minutes)"
    return Result(rows, text)


def _job_row(job: Job, state: str) -> dict[str, Any]:
    return {
        "id": job.id,
        "name": job.name,
        "state": state,
        "attempts_made": job.attempts_made,
        "attempts_started": job.attempts_started,
        "attempts": job.attempts,
        "priority": job.priority,
        "group": job.group,
        "created": iso(job.timestamp),
        "processed": iso(job.processed_on),
        "finished": iso(job.finished_on),
        "error": job.failed_reason,
    }


def _short_time(value: str | None) -> str | None:
    return None if value is None else value[:19] + "Z"


async def cmd_jobs(
    ctx: Context,
    queue: str,
    state: str,
    start: int = 0,
    count: int = 50,
    tag: str | None = None,
) -> Result:
    """Jobs of one state, newest first for completed/failed, else in processing order."""
    try:
        job_state = JobState(state)
    except ValueError:
        raise CommandError(
            f"unknown state {state!r}; choose from {', '.join(LISTABLE_STATES)}"
        ) from None
    q = await ctx.existing_queue(queue, tag)
    jobs = await q.list_jobs(job_state, start, count)
    rows = [_job_row(j, job_state.value) for j in jobs]
    headers = ["ID", "NAME", "STATE", "ATTEMPTS", "CREATED", "PROCESSED", "FINISHED", "ERROR"]
    table = [
        [
            r["id"],
            r["name"],
            r["state"],
            f"{r['attempts_made']}/{r['attempts']}",
            _short_time(r["created"]),
            _short_time(r["processed"]),
            _short_time(r["finished"]),
            r["error"],
        ]
        for r in rows
    ]
    widths = [None, None, None, None, None, None, None, ERROR_WIDTH]
    return Result(rows, format_table(headers, table, widths=widths))


def _loads(raw: Any) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return as_str(raw)


async def cmd_job(ctx: Context, queue: str, job_id: str, tag: str | None = None) -> Result:
    """One job with every field."""
    q = await ctx.existing_queue(queue, tag)
    r: Any = q.redis
    raw = await r.hgetall(q.keys.job(job_id))
    state = await q.get_state(job_id)
    if not raw or state is None:
        raise CommandError(f"no job {job_id!r} in queue {queue!r}")
    fields = {as_str(k): v for k, v in raw.items()}
    job = Job.from_hash(q, job_id, raw)
    logs = await q.get_job_logs(job_id)
    other = {k: as_str(v) for k, v in sorted(fields.items()) if k not in _SHOWN_FIELDS}
    data: dict[str, Any] = {
        "id": job.id,
        "queue": q.name,
        "name": job.name,
        "state": state.value,
        "priority": job.priority,
        "group": job.group,
        "attempts": job.attempts,
        "attempts_made": job.attempts_made,
        "attempts_started": job.attempts_started,
        "stalled_count": job.stalled_count,
        "created": iso(job.timestamp),
        "processed": iso(job.processed_on),
        "finished": iso(job.finished_on),
        "ready_at": iso(job.ready_at),
        "dedup_id": job.dedup_id,
        "parent": list(job.parent) if job.parent else None,
        "progress": job.progress,
        "data": _loads(fields.get("data", b"null")),
        "return_value": job.return_value,
        "error": job.failed_reason,
        "stacktrace": job.stacktrace,
        "error_history": job.error_history,
        "logs": logs,
        "other_fields": other,
    }
    head = [
        (k, data[k])
        for k in [
            "id",
            "queue",
            "name",
            "state",
            "priority",
            "group",
            "attempts",
            "attempts_made",
            "attempts_started",
            "stalled_count",
            "created",
            "processed",
            "finished",
            "ready_at",
            "dedup_id",
        ]
    ]
    head.append(("parent", "/".join(job.parent) if job.parent else None))
    head.append(("progress", None if job.progress is None else _json_text(job.progress)))
    head.append(("error", job.failed_reason))
    sections = [_kv(head)]
    sections.append("data:\n" + _indent(_json_text(data["data"])))
    if "rv" in fields:
        sections.append("return value:\n" + _indent(_json_text(job.return_value)))
    if job.stacktrace:
        sections.append("stack trace:\n" + _indent(job.stacktrace.rstrip()))
    if job.error_history:
        sections.append("error history:\n" + _indent(_json_text(job.error_history)))
    if logs:
        sections.append(f"logs ({len(logs)}):\n" + _indent("\n".join(logs)))
    if other:
        sections.append("other fields:\n" + _indent(_kv(list(other.items()))))
    return Result(data, "\n\n".join(sections))


def _indent(text: str) -> str:
    return "\n".join("  " + line if line else line for line in text.splitlines())


async def cmd_retry(
    ctx: Context, queue: str, state: str = "failed", count: int = 1000, tag: str | None = None
) -> Result:
    """Move failed (or completed) jobs back to waiting, oldest first, attempts reset."""
    q = await ctx.existing_queue(queue, tag)
    n = await q.retry_jobs(state, count=count)
    data = {"queue": queue, "state": state, "retried": n}
    return Result(data, f"retried {n} {state} job{'s' * (n != 1)} of queue {queue}")


async def cmd_promote(
    ctx: Context, queue: str, count: int = 1000, tag: str | None = None
) -> Result:
    """Make delayed jobs startable now."""
    q = await ctx.existing_queue(queue, tag)
    n = await q.promote_jobs(count)
    return Result(
        {"queue": queue, "promoted": n},
        f"promoted {n} delayed job{'s' * (n != 1)} of queue {queue}",
    )


async def cmd_clean(
    ctx: Context,
    queue: str,
    state: str,
    grace_ms: int = 0,
    limit: int = 1000,
    tag: str | None = None,
) -> Result:
    """Remove up to `limit` jobs in `state` older than `grace_ms`."""
    if state not in CLEANABLE_STATES:
        raise CommandError(
            f"cannot clean {state!r} jobs; choose from {', '.join(CLEANABLE_STATES)}"
        )
    q = await ctx.existing_queue(queue, tag)
    ids = await q.clean(grace_ms, state, limit)
    data = {"queue": queue, "state": state, "removed": len(ids), "ids": ids}
    text = f"removed {len(ids)} {state} job{'s' * (len(ids) != 1)} older than {grace_ms} ms"
    return Result(data, text)


async def cmd_drain(
    ctx: Context, queue: str, delayed: bool = False, tag: str | None = None
) -> Result:
    """Remove all waiting jobs (and delayed ones with `delayed`)."""
    q = await ctx.existing_queue(queue, tag)
    n = await q.drain(delayed=delayed)
    what = "waiting and delayed" if delayed else "waiting"
    return Result(
        {"queue": queue, "delayed": delayed, "removed": n},
        f"removed {n} {what} job{'s' * (n != 1)} from queue {queue}",
    )


async def _pause_or_resume(
    ctx: Context, queue: str, group: str | None, tag: str | None, pause: bool
) -> Result:
    q = await ctx.existing_queue(queue, tag)
    verb = "paused" if pause else "resumed"
    if group is not None:
        changed = await (q.pause_group(group) if pause else q.resume_group(group))
        what = f"group {group} of queue {queue}"
    else:
        changed = await q.is_paused() != pause
        if changed:
            await (q.pause() if pause else q.resume())
        what = f"queue {queue}"
    text = f"{verb} {what}" if changed else f"{what} was already {'paused' if pause else 'running'}"
    data = {"queue": queue, "group": group, "paused": pause, "changed": changed}
    return Result(data, text)


async def cmd_pause(
    ctx: Context, queue: str, group: str | None = None, tag: str | None = None
) -> Result:
    """Pause the queue (active jobs finish, no new ones start), or one group of it."""
    return await _pause_or_resume(ctx, queue, group, tag, True)


async def cmd_resume(
    ctx: Context, queue: str, group: str | None = None, tag: str | None = None
) -> Result:
    return await _pause_or_resume(ctx, queue, group, tag, False)


async def cmd_obliterate(
    ctx: Context,
    queue: str,
    force: bool = False,
    force_active: bool = False,
    tag: str | None = None,
) -> Result:
    """Delete the queue and all its jobs. Needs `force`; active jobs also need `force_active`.

    Queues sharing its hash tag (its dead-letter queue) are left alone. The queue is paused
    first (as the library requires); when obliterating is then refused, a pause made here is
    undone.
    """
    if not force:
        raise CommandError(f"refusing to obliterate queue {queue!r} without --force")
    q = await ctx.existing_queue(queue, tag)
    counts = await q.get_job_counts()
    if counts["active"] and not force_active:
        raise CommandError(
            f"queue {queue!r} has {counts['active']} active job(s); "
            "add --force-active to obliterate it anyway"
        )
    was_paused = counts["paused"]
    if not was_paused:
        await q.pause()
    try:
        await q.obliterate(force=force_active)
    except QueueError as exc:
        if not was_paused:
            await q.resume()
        raise CommandError(f"obliterate refused: {exc}") from exc
    total = counts["waiting"] + counts["prioritized"] + counts["delayed"] + counts["active"]
    total += counts["completed"] + counts["failed"] + counts["waiting_children"]
    return Result(
        {"queue": queue, "obliterated": True, "jobs": total},
        f"obliterated queue {queue} ({total} job{'s' * (total != 1)})",
    )


async def cmd_groups(
    ctx: Context, queue: str, start: int = 0, count: int = 100, tag: str | None = None
) -> Result:
    """Groups with waiting/active jobs, paused, held until, concurrency and rate limit."""
    q = await ctx.existing_queue(queue, tag)
    names = await q.list_groups(start, count)
    infos = await q.get_group_infos(names)
    now = int(time.time() * 1000)
    rows: list[dict[str, Any]] = []
    for name, info in zip(names, infos, strict=True):
        held = info["held_until"] if info["held_until"] > now else None
        limit = None
        if info["rate_limit_max"] and info["rate_limit_duration"]:
            limit = f"{info['rate_limit_max']}/{info['rate_limit_duration']}ms"
        rows.append(
            {
                "group": name,
                "waiting": info["waiting"],
                "active": info["active"],
                "paused": info["paused"],
                "held_until": iso(held),
                "concurrency": info["concurrency"],
                "rate_limit": limit,
            }
        )
    headers = ["GROUP", "WAITING", "ACTIVE", "PAUSED", "HELD UNTIL", "CONCURRENCY", "RATE LIMIT"]
    table = [
        [
            r["group"],
            r["waiting"],
            r["active"],
            r["paused"],
            _short_time(r["held_until"]),
            r["concurrency"],
            r["rate_limit"],
        ]
        for r in rows
    ]
    return Result(rows, format_table(headers, table))


async def cmd_remove(
    ctx: Context, queue: str, job_id: str, force: bool = False, tag: str | None = None
) -> Result:
    """Remove one job; an active job only with `force` (its worker's result is then dropped)."""
    q = await ctx.existing_queue(queue, tag)
    state = await q.get_state(job_id)
    if state is None:
        raise CommandError(f"no job {job_id!r} in queue {queue!r}")
    if state is JobState.ACTIVE and not force:
        raise CommandError(
            f"job {job_id!r} is active (a worker holds it); add --force to remove it anyway"
        )
    if not await q.remove(job_id, force=force):
        raise CommandError(f"no job {job_id!r} in queue {queue!r}")
    return Result(
        {"queue": queue, "id": job_id, "removed": True, "state": state.value},
        f"removed {state.value} job {job_id} from queue {queue}",
    )


async def cmd_metrics(ctx: Context, queues: Sequence[str] = (), tag: str | None = None) -> Result:
    """Prometheus text exposition of the named queues (all queues when none are named)."""
    if queues:
        targets = [await ctx.existing_queue(name, tag) for name in queues]
    else:
        targets = [ctx.queue(n, t) for n, t in await list_queues(ctx.redis, ctx.prefix)]
    text = await render_prometheus(targets)
    snaps = await asyncio.gather(*(queue_snapshot(q, 60) for q in targets))
    data = [{"counts": s.counts, "metrics": s.metrics.to_dict()} for s in snaps]
    return Result(data, text.rstrip("\n"))


# -- argument parsing ----------------------------------------------------------------------------


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


Handler = Callable[..., Awaitable[Result]]


def build_parser() -> argparse.ArgumentParser:
    default_url = os.environ.get("REDIS_URL") or DEFAULT_URL
    parser = argparse.ArgumentParser(
        prog="queue-core",
        description="Inspect and operate queue-core queues.",
        epilog="Exit codes: 0 ok, 1 refused or failed (reason on stderr), 2 usage error.",
    )
    # The global options are accepted before and after the command (after it, they override).
    common = argparse.ArgumentParser(add_help=False)
    for target, defaults in ((parser, True), (common, False)):
        target.add_argument(
            "--redis",
            metavar="URL",
            default=default_url if defaults else argparse.SUPPRESS,
            help="Redis URL; redis+cluster://host:port for a cluster "
            "(default: $REDIS_URL or redis://127.0.0.1:6379/0)",
        )
        target.add_argument(
            "--prefix",
            default="qc" if defaults else argparse.SUPPRESS,
            help="key prefix of the queues (default: qc)",
        )
        target.add_argument(
            "--json",
            action="store_true",
            default=False if defaults else argparse.SUPPRESS,
            help="print JSON instead of tables",
        )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    def queue_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("queue", help="queue name")
        p.add_argument("--tag", help="hash tag, when the queue has one of its own (e.g. a DLQ)")

    command("stats", cmd_stats, "all queues: jobs per state, paused, throughput")

    p = command("jobs", cmd_jobs, "list the jobs of a queue in one state")
    queue_arg(p)
    p.add_argument(
        "state", choices=LISTABLE_STATES, metavar="STATE", help=_choices(LISTABLE_STATES)
    )
    p.add_argument("--start", type=_non_negative, default=0, help="skip N jobs (default 0)")
    p.add_argument("--count", type=_positive, default=50, help="list N jobs (default 50)")

    p = command("job", cmd_job, "show one job with all its fields, logs and errors")
    queue_arg(p)
    p.add_argument("job_id", metavar="ID", help="job id")

    p = command("retry", cmd_retry, "move failed (or completed) jobs back to waiting")
    queue_arg(p)
    p.add_argument("--state", choices=["failed", "completed"], default="failed")
    p.add_argument("--count", type=_positive, default=1000, help="at most N jobs (default 1000)")

    p = command("promote", cmd_promote, "make delayed jobs startable now")
    queue_arg(p)
    p.add_argument("--count", type=_positive, default=1000, help="at most N jobs (default 1000)")

    p = command("clean", cmd_clean, "remove jobs of one state older than a grace period")
    queue_arg(p)
    p.add_argument(
        "state", choices=CLEANABLE_STATES, metavar="STATE", help=_choices(CLEANABLE_STATES)
    )
    p.add_argument(
        "--grace-ms", type=_non_negative, default=0, help="only jobs older than N ms (default 0)"
    )
    p.add_argument("--limit", type=_positive, default=1000, help="at most N jobs (default 1000)")

    p = command("drain", cmd_drain, "remove all waiting jobs")
    queue_arg(p)
    p.add_argument("--delayed", action="store_true", help="also remove delayed jobs")

    for name, handler, text in (
        ("pause", cmd_pause, "pause a queue (active jobs finish, no new ones start)"),
        ("resume", cmd_resume, "resume a paused queue"),
    ):
        p = command(name, handler, text)
        queue_arg(p)
        p.add_argument("--group", metavar="G", help="only this group of the queue")

    p = command("obliterate", cmd_obliterate, "delete a queue and all its jobs (needs --force)")
    queue_arg(p)
    p.add_argument("--force", action="store_true", help="really delete the queue")
    p.add_argument("--force-active", action="store_true", help="delete even when jobs are active")

    p = command("groups", cmd_groups, "list the groups of a queue")
    queue_arg(p)
    p.add_argument("--start", type=_non_negative, default=0, help="skip N groups (default 0)")
    p.add_argument("--count", type=_positive, default=100, help="list N groups (default 100)")

    p = command("remove", cmd_remove, "remove one job")
    queue_arg(p)
    p.add_argument("job_id", metavar="ID", help="job id")
    p.add_argument("--force", action="store_true", help="also when the job is active")

    p = command("metrics", cmd_metrics, "print Prometheus metrics (all queues or the named ones)")
    p.add_argument("queues", nargs="*", metavar="QUEUE", help="queue names (default: all)")
    p.add_argument("--tag", help="hash tag of the named queues")
    return parser


def _choices(values: Sequence[str]) -> str:
    return "one of: " + ", ".join(values)


async def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url: str = args.redis
    secrets = _secrets(url)

    def fail(message: str, code: int = 1) -> int:
        for secret in secrets:  # never echo a password, whatever a library put in a message
            message = message.replace(secret, "***")
        print(f"queue-core: error: {message}", file=err)
        return code

    try:
        redis = connect(url)
    except (ValueError, RedisError, RedisClusterException) as exc:
        return fail(f"invalid --redis URL {mask_url(url)}: {exc}", 2)
    handler: Handler = args.handler
    params = list(inspect.signature(handler).parameters)[1:]
    kwargs = {name: getattr(args, name) for name in params if hasattr(args, name)}
    try:
        result = await handler(Context(redis, args.prefix), **kwargs)
    except CommandError as exc:
        return fail(str(exc))
    except QueueError as exc:
        return fail(str(exc))
    except (RedisError, RedisClusterException, OSError) as exc:
        return fail(f"Redis at {mask_url(url)}: {exc}")
    finally:
        await redis.aclose()
    out.write((_json_text(result.data) if args.json else result.text) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 refused/failed, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return asyncio.run(_run(args, sys.stdout, sys.stderr))
    except BrokenPipeError:  # `queue-core jobs ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter's flush quiet
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
