"""A black-box chaos harness: is every accepted chat message answered exactly once, in order,
while processes crash and Valkey restarts?

What runs (each its own process, as in production):

- Valkey persisting like production (AOF, ``appendfsync everysec``: devstack's ``RedisServer``
  with ``persist=True``), SQLite, or a fresh database on a PostgreSQL server per run;
- the gateway's HTTP side (``GATEWAY_ROLE=http``), its queue workers (``gateway-workers``)
  and the ai-worker, with short lock / stall timings so a crash is recovered in seconds;
- a fake model (``tests/fakes/chaos_model.py``) that answers after 50-400 ms with the tokens of
  the questions it was asked (``ANSWER Q17-3 Q17-4``), so the replies tell what they answered.

What it does: N conversations x M messages through the widget API only (POST, one WebSocket per
conversation, GET), each message carrying a unique token ``Q<conversation>-<n>``, sent with
random gaps of 0-1.5 s so follow-ups arrive while the model answers. POSTs refused with
503/429/5xx or a connection error are retried with the same ``client_message_id`` (as the
widget does after Retry-After, or when the visitor taps "retry"), a bounded number of times. A
dropped socket is reconnected, then the messages after the cursor are fetched, as the widget
does. Meanwhile the chaos schedule SIGKILLs and restarts the ai-worker and the gateway worker
process and kill -9s Valkey (restarted on the same port and data directory) at random moments
of the send phase. Then it waits (bounded) until the platform is quiescent: the pipeline queues
hold nothing waiting, delayed or running (read from Valkey, the only look inside) and no frame
has arrived on any socket for a while.

What it counts: the final GET of each conversation is the truth about stored replies; the
sockets tell whether they arrived live. See ``check_conversation`` for the exact definitions.

    report = await run_chaos(ChaosConfig(conversations=50))
    print(report.describe())
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from bench._pg import temporary_database
from cryptography.fernet import Fernet

from chat_pipeline.queues import AI, INCOMING, OUTGOING
from devstack import free_port
from devstack.platform import Platform, PlatformError
from queue_core import Queue, connect
from tests.fakes.chaos_model import ANSWER_PREFIX, READY_PREFIX, TOKEN
from tests.fakes.fixtures import fake_openai_process

__all__ = [
    "ChaosConfig",
    "ChaosPlatform",
    "ChaosReport",
    "ConversationCheck",
    "ConversationRecord",
    "Fault",
    "Sent",
    "analyse",
    "check_conversation",
    "run_chaos",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_QUEUES = (INCOMING, AI, OUTGOING)
# statuses a POST is retried on, with the same client_message_id
RETRIED = frozenset({"429", "500", "502", "503", "504", "connection_error"})
# the counts that must be zero for "answered exactly once, in order"
ASSERTED = ("unanswered", "answered_twice", "duplicate_replies", "out_of_order")

VALKEY = "valkey"
AI_WORKER = "ai-worker"
GATEWAY_HTTP = "gateway"
GATEWAY_WORKERS = "gateway-workers"


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    conversations: int = 50
    messages: int = 5
    # new conversations per second: the offered load is about rate x messages msg/s
    conversation_rate: float = 2.0
    max_gap_s: float = 1.5
    faults: bool = True
    ai_worker_kills: int = 3
    gateway_worker_kills: int = 2
    valkey_restarts: int = 1
    down_s: float = 0.5  # between a kill and the restart
    quiesce_timeout_s: float = 120.0
    quiet_s: float = 2.0
    model_min_ms: float = 50
    model_max_ms: float = 400
    debounce_ms: int = 300
    post_attempts: int = 6
    post_timeout_s: float = 15.0
    seed: int | None = None
    # a PostgreSQL server (admin URL): a fresh database is created on it for the run
    postgres: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # overrides for the services
    keep_data: bool = False  # keep the data directory (logs) after the run


# -- the platform -------------------------------------------------------------------------------


class ChaosPlatform(Platform):
    """The platform with the gateway's HTTP side and its queue workers as separate processes,
    and the faults the harness injects."""

    READY_LINES: ClassVar[dict[str, str]] = {
        AI_WORKER: "ai-worker running",
        GATEWAY_WORKERS: "gateway workers running",
    }

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        env: Mapping[str, str],
        database_url: str | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            port=free_port(),
            env=env,
            services=(GATEWAY_HTTP, GATEWAY_WORKERS, AI_WORKER),
            database_url=database_url,
            commands={GATEWAY_WORKERS: ["-m", "gateway.worker_service"]},
        )
        self.service_env = {GATEWAY_HTTP: {"GATEWAY_ROLE": "http"}}

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        # Platform gives every service one environment; the two gateway roles differ in it
        shared = self.extra_env
        self.extra_env = {**shared, **self.service_env.get(name, {})}
        try:
            return super().start_service(name)
        finally:
            self.extra_env = shared

    def wait_ready(self, timeout: float = 30.0) -> None:
        super().wait_ready(timeout)
        for name in (GATEWAY_WORKERS, AI_WORKER):
            self.wait_service_ready(name, 0, timeout)

    def starts(self, name: str) -> int:
        """How often `name` logged that it runs (the worker services bind no port)."""
        path = self.logs / f"{name}.log"
        line = self.READY_LINES[name]
        return path.read_text(errors="replace").count(line) if path.exists() else 0

    def wait_service_ready(self, name: str, starts_before: int, timeout: float = 60.0) -> None:
        """Until `name` serves: a worker service logged that it runs (for the
        `starts_before + 1`-th time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise PlatformError(f"{name} exited with {code}:\n{self.log_tail(name)}")
            if name not in self.READY_LINES or self.starts(name) > starts_before:
                return
            time.sleep(0.05)
        raise PlatformError(f"{name} was not ready in {timeout}s:\n{self.log_tail(name)}")

    def crash(self, target: str, down_s: float) -> None:
        """SIGKILL `target` (a service or Valkey), restart it after `down_s`, and return once
        it serves again. Blocking: run it in a thread."""
        if target == VALKEY:
            if self.redis is None:
                raise PlatformError("Valkey is not ours to kill")
            self.redis.kill()  # kill -9: AOF keeps what was fsynced (everysec)
            time.sleep(down_s)
            self.redis.start()  # same port, same data directory
            return
        starts = self.starts(target) if target in self.READY_LINES else 0
        self.kill_service(target)
        time.sleep(down_s)
        self.start_service(target)
        self.wait_service_ready(target, starts)

    def exited(self) -> list[tuple[str, int]]:
        return [
            (name, proc.returncode)
            for name, proc in list(self.processes.items())
            if proc.poll() is not None
        ]

    def restart_exited(self, name: str) -> None:
        """What an orchestrator does for a service that died on its own."""
        self.processes.pop(name, None)
        self.start_service(name)


def service_env(config: ChaosConfig, model_url: str) -> dict[str, str]:
    return {
        "LLM_BASE_URL": model_url,
        "LLM_API_KEY": "chaos-key",
        "LLM_MODEL": "fake-model",
        "LLM_TIMEOUT_S": "5",
        "PIPELINE_DEBOUNCE_MS": str(config.debounce_ms),
        # a killed ai-worker's job runs again after lock + stall interval (~3.5 s)
        "AI_LOCK_MS": "3000",
        "QUEUE_LOCK_MS": "3000",
        "QUEUE_STALLED_INTERVAL_MS": "500",
        # the reconciler: a stored message whose job was lost (Valkey restarted) is queued
        # again after 10 s (x requeues + 1); it gives up (the fallback reply) after 40 s, which
        # a slow but working pipeline on a loaded 2-core machine must not reach
        "RECONCILE_AFTER_MS": "10000",
        "RECONCILE_INTERVAL_MS": "1000",
        "AI_BACKOFF_MS": "200",
        "WIDGET_VISITOR_RATE": "100000",
        "WIDGET_IP_RATE": "100000000",  # every visitor comes from 127.0.0.1
        "WIDGET_CHATBOT_RATE": "100000000",
        "WIDGET_TENANT_RATE": "100000000",
        "WIDGET_VISITOR_READ_RATE": "100000000",
        "WIDGET_IP_READ_RATE": "100000000",
        "WIDGET_WS_MAX_PER_IP": "100000",
        "PLATFORM_SECRET_KEY": Fernet.generate_key().decode(),
        "LOG_LEVEL": "INFO",  # the ai-worker's readiness is its "running" log line
        **config.env,
    }


def chaos_model_process(
    min_ms: float, max_ms: float, seed: int, *, timeout: float = 15.0
) -> contextlib.AbstractContextManager[str]:
    """Run the chaos model as a process; yield its base URL; terminate it on exit."""
    args = ["--min-ms", str(min_ms), "--max-ms", str(max_ms), "--seed", str(seed)]
    return fake_openai_process(
        args, timeout=timeout, module="tests.fakes.chaos_model", ready_prefix=READY_PREFIX
    )


def fresh_postgres_database(server_url: str) -> contextlib.AbstractAsyncContextManager[str]:
    """A new, uniquely named database on the server of `server_url` for one run; its
    ``postgresql+asyncpg://`` URL; dropped (connections closed) afterwards."""
    return temporary_database(server_url, "chaos")


# -- what was observed --------------------------------------------------------------------------


@dataclass
class Sent:
    """One question: its token and what its POSTs got."""

    token: str
    client_message_id: str
    statuses: list[str] = field(default_factory=list)
    first_sent_at: float | None = None
    accepted_at: float | None = None  # when the 202 arrived
    seq: int | None = None

    @property
    def accepted(self) -> bool:
        return self.accepted_at is not None


@dataclass
class ConversationRecord:
    """Everything observed about one conversation from the outside (times are monotonic)."""

    index: int
    visitor: str
    sent: list[Sent] = field(default_factory=list)
    stored: list[dict[str, Any]] = field(default_factory=list)  # the final GET, in page order
    live_first: dict[str, float] = field(default_factory=dict)  # reply id -> first socket frame
    live_seqs: list[int] = field(default_factory=list)  # reply seqs in socket arrival order
    redelivered: int = 0  # a reply frame for an id already seen on the socket
    caught_up: dict[str, float] = field(default_factory=dict)  # reply id -> reconnect GET
    token_seen: dict[str, float] = field(default_factory=dict)  # socket or reconnect GET
    token_live: dict[str, float] = field(default_factory=dict)  # socket only
    connects: int = 0


@dataclass
class ConversationCheck:
    """What is wrong with one conversation; every list holds tokens or reply seqs."""

    unanswered: list[str] = field(default_factory=list)
    answered_twice: list[str] = field(default_factory=list)
    duplicate_replies: list[int] = field(default_factory=list)
    out_of_order_stored: list[int] = field(default_factory=list)
    out_of_order_live: list[int] = field(default_factory=list)
    fallback_replies: list[int] = field(default_factory=list)
    not_live: list[int] = field(default_factory=list)
    caught_up_on_reconnect: list[int] = field(default_factory=list)
    lost_user_messages: list[str] = field(default_factory=list)  # accepted, not stored
    user_stored_twice: list[str] = field(default_factory=list)
    foreign_tokens: list[str] = field(default_factory=list)  # another conversation's token
    live_not_stored: list[str] = field(default_factory=list)  # reply ids
    redelivered: int = 0

    @property
    def out_of_order(self) -> int:
        return len(self.out_of_order_stored) + len(self.out_of_order_live)

    @property
    def broken(self) -> bool:
        """Breaks 'answered exactly once, in order' (the asserted counts)."""
        return bool(
            self.unanswered
            or self.answered_twice
            or self.duplicate_replies
            or self.out_of_order
            or self.lost_user_messages
            or self.user_stored_twice
            or self.foreign_tokens
        )


def _token_conversation(token: str) -> int:
    return int(token[1:].split("-", 1)[0])


def check_conversation(rec: ConversationRecord) -> ConversationCheck:
    """The definitions, applied to one conversation.

    The stored replies (final GET, in seq order) are the truth. A reply that does not start
    with ``ANSWER`` is the chatbot's fallback (no tokens: the model was not heard). For the
    others, the tokens it names are what it answered:

    - unanswered: an accepted (202) question whose token is in no stored reply;
    - answered_twice: a token named by two or more stored replies;
    - duplicate_replies: a reply naming no token, or only tokens answered by earlier replies,
      or a reply id listed twice;
    - out_of_order: a reply newly answering a question older (lower seq) than one an earlier
      reply answered; plus each reply frame that reached the socket after a frame of a later
      reply (seq order), first arrivals only;
    - not_live: a stored reply whose frame never reached the socket (``caught_up_on_reconnect``
      of them were fetched after a reconnect, as the widget does).
    """
    check = ConversationCheck(redelivered=rec.redelivered)
    users: dict[str, int] = {}
    replies: list[dict[str, Any]] = []
    ids_seen: set[str] = set()
    for message in sorted(rec.stored, key=lambda m: int(m["seq"])):
        if message["role"] == "user":
            for token in TOKEN.findall(str(message["text"]))[:1]:
                if token in users:  # a retried POST must not store the question again
                    check.user_stored_twice.append(token)
                users.setdefault(token, int(message["seq"]))
        elif message["role"] == "assistant":
            if message["id"] in ids_seen:
                check.duplicate_replies.append(int(message["seq"]))
                continue
            ids_seen.add(message["id"])
            replies.append(message)

    answered: Counter[str] = Counter()
    newest_answered = -1  # the highest question seq answered so far
    for reply in replies:
        seq = int(reply["seq"])
        text = str(reply["text"])
        if not text.startswith(ANSWER_PREFIX):
            check.fallback_replies.append(seq)
            continue
        tokens = list(dict.fromkeys(TOKEN.findall(text)))
        check.foreign_tokens += [t for t in tokens if _token_conversation(t) != rec.index]
        new = [t for t in tokens if answered[t] == 0]
        answered.update(tokens)
        if not new:
            check.duplicate_replies.append(seq)
            continue
        question_seqs = [users[t] for t in new if t in users]
        if question_seqs:
            if min(question_seqs) < newest_answered:
                check.out_of_order_stored.append(seq)
            newest_answered = max(newest_answered, *question_seqs)

    check.duplicate_replies.sort()
    check.unanswered = [s.token for s in rec.sent if s.accepted and answered[s.token] == 0]
    check.answered_twice = sorted(t for t, n in answered.items() if n > 1)
    check.lost_user_messages = [s.token for s in rec.sent if s.accepted and s.token not in users]

    highest = -1
    for seq in rec.live_seqs:
        if seq < highest:
            check.out_of_order_live.append(seq)
        highest = max(highest, seq)
    stored_ids = {str(r["id"]) for r in replies}
    for reply in replies:
        if reply["id"] not in rec.live_first:
            check.not_live.append(int(reply["seq"]))
            if reply["id"] in rec.caught_up:
                check.caught_up_on_reconnect.append(int(reply["seq"]))
    check.live_not_stored = sorted(i for i in rec.live_first if i not in stored_ids)
    return check


def describe_conversation(rec: ConversationRecord, check: ConversationCheck) -> str:
    """A few readable lines: what is wrong, what was sent, what was stored."""
    problems = []
    for label, items in (
        ("unanswered", check.unanswered),
        ("answered twice", check.answered_twice),
        ("duplicate replies #", check.duplicate_replies),
        ("out of order (stored) #", check.out_of_order_stored),
        ("out of order (socket) #", check.out_of_order_live),
        ("fallback #", check.fallback_replies),
        ("not live #", check.not_live),
        ("accepted but not stored", check.lost_user_messages),
        ("question stored twice", check.user_stored_twice),
        ("other conversation's tokens", check.foreign_tokens),
    ):
        if items:
            if label.endswith(" #"):  # reply seqs
                label = label.removesuffix(" #")
                items = [f"#{i}" for i in items]
            problems.append(f"{label} {' '.join(str(i) for i in items)}")
    sent = []
    for s in rec.sent:
        mark = f"#{s.seq}" if s.accepted else "never accepted"
        retried = "" if s.statuses == ["202"] else f" {s.statuses}"
        sent.append(f"{s.token} {mark}{retried}")
    stored = []
    for m in sorted(rec.stored, key=lambda m: int(m["seq"])):
        if m["role"] == "user":
            stored.append(f"#{m['seq']} {' '.join(TOKEN.findall(str(m['text']))) or '?'}")
        else:
            text = str(m["text"])
            if text.startswith(ANSWER_PREFIX):
                what = text.removeprefix(ANSWER_PREFIX).strip() or "no token"
            else:
                what = "fallback"
            live = "live" if m["id"] in rec.live_first else "GET only"
            stored.append(f"#{m['seq']} reply [{what}] {live}")
    return (
        f"conversation {rec.index} ({rec.visitor}): {'; '.join(problems) or 'ok'}\n"
        f"  sent:   {' | '.join(sent)}\n"
        f"  stored: {' | '.join(stored)}"
    )


@dataclass
class Fault:
    kind: str  # ai-worker, gateway-workers, valkey
    at: float  # monotonic, when the kill was sent
    ready_at: float | None = None  # serving again
    error: str | None = None


def _percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return round(ordered[index], 1)


def recovery(
    fault: Fault,
    records: Sequence[ConversationRecord],
    t0: float,
    previous: Fault | None = None,
) -> dict[str, Any]:
    """How the platform came back from one fault.

    - backlog: questions in flight at the kill (accepted before it, no answer seen yet), less
      those accepted before the previous fault and never answered (lost to that one);
    - backlog_lost: of them, never seen answered (socket or reconnect GET);
    - backlog_answered_s: kill -> the last of the answered ones seen;
    - first_new_reply_s: back up -> the first answer to a question accepted after that.
    """
    inflight = 0
    seen: list[float] = []
    back = fault.ready_at or fault.at
    fresh: list[float] = []
    for rec in records:
        for s in rec.sent:
            if s.accepted_at is None:
                continue
            at = rec.token_seen.get(s.token)
            lost_before = at is None and previous is not None and s.accepted_at < previous.at
            if s.accepted_at < fault.at and (at is None or at > fault.at) and not lost_before:
                inflight += 1
                if at is not None:
                    seen.append(at)
            if s.accepted_at >= back and at is not None and at >= back:
                fresh.append(at)
    return {
        "kind": fault.kind,
        "at_s": round(fault.at - t0, 2),
        "back_up_s": None if fault.ready_at is None else round(fault.ready_at - fault.at, 2),
        "error": fault.error,
        "backlog": inflight,
        "backlog_lost": inflight - len(seen),
        "backlog_answered_s": round(max(seen) - fault.at, 2) if seen else None,
        "first_new_reply_s": round(min(fresh) - back, 2) if fresh else None,
    }


@dataclass
class ChaosReport:
    config: dict[str, Any]
    counts: dict[str, int]
    post_statuses: dict[str, int]
    reply_latency_ms: dict[str, Any]
    faults: list[dict[str, Any]]
    timings: dict[str, Any]
    unexpected_exits: list[dict[str, Any]]
    offenders: list[str]  # readable, one block per broken conversation
    offending_conversations: int
    offending_by_kind: dict[str, list[int]]  # conversation indexes

    def violations(self) -> dict[str, int]:
        """The asserted counts that are not zero, and any 500."""
        bad = {k: self.counts[k] for k in (*ASSERTED, "lost_user_messages") if self.counts[k]}
        if self.post_statuses.get("500"):
            bad["post_500"] = self.post_statuses["500"]
        return bad

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["offenders"] = self.offenders[:20]
        return data

    def describe(self, examples: int = 5) -> str:
        lines = [
            "config: " + json.dumps(self.config),
            "counts: " + json.dumps(self.counts),
            "POST statuses: " + json.dumps(self.post_statuses),
            "reply latency: " + json.dumps(self.reply_latency_ms),
            "timings: " + json.dumps(self.timings),
        ]
        lines += ["fault: " + json.dumps(f) for f in self.faults]
        lines += ["unexpected exit: " + json.dumps(e) for e in self.unexpected_exits]
        if self.offenders:
            kinds = ", ".join(f"{kind}: {len(v)}" for kind, v in self.offending_by_kind.items())
            lines.append(
                f"{self.offending_conversations} conversations broken ({kinds}); "
                f"{min(examples, len(self.offenders))} of them:"
            )
            lines += self.offenders[:examples]
        return "\n".join(lines)


def analyse(
    records: Sequence[ConversationRecord],
    *,
    faults: Sequence[Fault] = (),
    post_statuses: Mapping[str, int] | None = None,
    t0: float = 0.0,
    config: dict[str, Any] | None = None,
    timings: dict[str, Any] | None = None,
    unexpected_exits: Sequence[dict[str, Any]] = (),
) -> ChaosReport:
    checks = [(rec, check_conversation(rec)) for rec in records]
    total: Counter[str] = Counter()
    latencies: list[float] = []
    for rec, check in checks:
        sent_accepted = [s for s in rec.sent if s.accepted]
        total["sent"] += len(rec.sent)
        total["accepted"] += len(sent_accepted)
        total["never_accepted"] += len(rec.sent) - len(sent_accepted)
        total["replies_stored"] += sum(1 for m in rec.stored if m["role"] == "assistant")
        total["unanswered"] += len(check.unanswered)
        total["answered_twice"] += len(check.answered_twice)
        total["duplicate_replies"] += len(check.duplicate_replies)
        total["out_of_order"] += check.out_of_order
        total["out_of_order_stored"] += len(check.out_of_order_stored)
        total["out_of_order_live"] += len(check.out_of_order_live)
        total["fallback_replies"] += len(check.fallback_replies)
        total["not_live"] += len(check.not_live)
        total["caught_up_on_reconnect"] += len(check.caught_up_on_reconnect)
        total["lost_user_messages"] += len(check.lost_user_messages)
        total["user_stored_twice"] += len(check.user_stored_twice)
        total["foreign_tokens"] += len(check.foreign_tokens)
        total["live_not_stored"] += len(check.live_not_stored)
        total["socket_redelivered"] += check.redelivered
        total["socket_reconnects"] += max(0, rec.connects - 1)
        for s in sent_accepted:
            at = rec.token_live.get(s.token)
            if at is None or s.accepted_at is None:
                continue
            if at < s.accepted_at:
                # a POST that timed out was stored and answered; its retry got the 202 later
                total["replied_before_202"] += 1
            else:
                latencies.append((at - s.accepted_at) * 1000)
    broken = [(rec, check) for rec, check in checks if check.broken]
    by_kind: dict[str, list[int]] = {}
    for kind in (*ASSERTED, "lost_user_messages", "user_stored_twice", "foreign_tokens"):
        hits = [rec.index for rec, check in broken if _has(check, kind)]
        if hits:
            by_kind[kind] = hits
    # the first example of each kind of breakage first, then the rest in order
    first = list(dict.fromkeys(hits[0] for hits in by_kind.values()))
    order = first + [rec.index for rec, _ in broken if rec.index not in first]
    described = {rec.index: describe_conversation(rec, check) for rec, check in broken}
    keys = (
        "sent",
        "accepted",
        "never_accepted",
        "replies_stored",
        *ASSERTED,
        "out_of_order_stored",
        "out_of_order_live",
        "fallback_replies",
        "not_live",
        "caught_up_on_reconnect",
        "lost_user_messages",
        "user_stored_twice",
        "foreign_tokens",
        "live_not_stored",
        "socket_redelivered",
        "socket_reconnects",
        "replied_before_202",
    )
    return ChaosReport(
        config=config or {},
        counts={k: total[k] for k in keys},
        post_statuses=dict(sorted((post_statuses or {}).items())),
        reply_latency_ms={
            "n": len(latencies),
            "p50": _percentile(latencies, 50),
            "p99": _percentile(latencies, 99),
            "max": round(max(latencies), 1) if latencies else None,
        },
        faults=[
            recovery(f, records, t0, faults[i - 1] if i else None) for i, f in enumerate(faults)
        ],
        timings=timings or {},
        unexpected_exits=list(unexpected_exits),
        offenders=[described[i] for i in order],
        offending_conversations=len(broken),
        offending_by_kind=by_kind,
    )


def _has(check: ConversationCheck, kind: str) -> bool:
    if kind == "out_of_order":
        return check.out_of_order > 0
    return bool(getattr(check, kind))


# -- the traffic --------------------------------------------------------------------------------


class Conversation:
    """One visitor: a WebSocket kept open (reconnected when it drops, then the messages after
    the cursor fetched), and the questions posted one after another with random gaps."""

    def __init__(self, driver: Driver, index: int, rng: random.Random) -> None:
        self.driver = driver
        self.rng = rng
        # (the widget's random visitor ids: a chatbot without an identity secret takes no other)
        self.rec = ConversationRecord(index=index, visitor=str(uuid.uuid4()))
        self.cursor = 0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._socket_task: asyncio.Task[None] | None = None

    @property
    def visitor(self) -> str:
        return self.rec.visitor

    async def run(self, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        self._socket_task = asyncio.create_task(self._socket_loop())
        # replies are published, not stored for the socket: be subscribed before asking
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                await self._connected.wait()
        for n in range(self.driver.config.messages):
            if n:
                await asyncio.sleep(self.rng.uniform(0, self.driver.config.max_gap_s))
            await self._send(n)

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._socket_task is not None:
            self._socket_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._socket_task

    async def _send(self, n: int) -> None:
        d = self.driver
        token = f"Q{self.rec.index}-{n}"
        sent = Sent(token=token, client_message_id=f"{self.visitor}-m{n}")
        self.rec.sent.append(sent)
        body = {
            "visitor_id": self.visitor,
            "text": f"{token} question {n + 1} of {d.config.messages}",
            "client_message_id": sent.client_message_id,
        }
        for attempt in range(d.config.post_attempts):
            now = time.monotonic()
            if sent.first_sent_at is None:
                sent.first_sent_at = now
            retry_after = 1.0
            try:
                async with d.session.post(
                    f"{d.api}/messages",
                    json=body,
                    timeout=aiohttp.ClientTimeout(total=d.config.post_timeout_s),
                ) as response:
                    status = str(response.status)
                    data = await response.json(content_type=None) if status == "202" else None
                    with contextlib.suppress(ValueError):
                        retry_after = float(response.headers.get("Retry-After", "1"))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                status = "connection_error"
                data = None
            sent.statuses.append(status)
            d.post_statuses[status] += 1
            if status == "202" and isinstance(data, dict):
                sent.accepted_at = time.monotonic()
                sent.seq = data.get("seq")
                return
            if status not in RETRIED or attempt + 1 == d.config.post_attempts:
                return
            # like the widget: after Retry-After, with jitter so retries do not come in lockstep
            await asyncio.sleep(retry_after * (1 + 0.5 * self.rng.random()))

    async def _socket_loop(self) -> None:
        d = self.driver
        url = f"{d.api}/ws?visitor_id={self.visitor}"
        backoff = 0.25
        while not self._closing:
            try:
                async with d.session.ws_connect(url, heartbeat=10) as ws:
                    self._ws = ws
                    self.rec.connects += 1
                    self._connected.set()
                    backoff = 0.25
                    if self.rec.connects > 1:
                        await self._catch_up()
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            break
                        await self._frame(json.loads(message.data))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                pass
            self._ws = None
            # as the widget: exponential backoff with jitter
            await asyncio.sleep(backoff * (0.5 + self.rng.random() / 2))
            backoff = min(backoff * 2, 5.0)

    async def _frame(self, frame: dict[str, Any]) -> None:
        now = time.monotonic()
        self.driver.last_frame_at = now
        if frame.get("type") != "message" or not isinstance(frame.get("message"), dict):
            return
        message = frame["message"]
        self._see(message, now, live=True)
        if message.get("role") == "assistant" and self._ws is not None:
            with contextlib.suppress(Exception):  # the widget acks what it showed
                await self._ws.send_json({"type": "ack", "message_id": message["id"]})

    def _see(self, message: dict[str, Any], at: float, *, live: bool) -> None:
        seq = message.get("seq")
        if isinstance(seq, int):
            self.cursor = max(self.cursor, seq)
        if message.get("role") != "assistant":
            return
        mid = str(message["id"])
        rec = self.rec
        if live:
            if mid in rec.live_first:
                rec.redelivered += 1
            else:
                rec.live_first[mid] = at
                if isinstance(seq, int):
                    rec.live_seqs.append(seq)
        elif mid not in rec.live_first:
            rec.caught_up.setdefault(mid, at)
        for token in TOKEN.findall(str(message.get("text", ""))):
            rec.token_seen.setdefault(token, at)
            if live:
                rec.token_live.setdefault(token, at)

    async def _catch_up(self) -> None:
        """After a reconnect, what was sent meanwhile (the widget's refresh)."""
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            for _ in range(20):
                page = await self.driver.get_page(self.visitor, self.cursor)
                if not page["messages"]:
                    return
                now = time.monotonic()
                for message in page["messages"]:
                    self._see(message, now, live=False)

    async def final_messages(self) -> None:
        """Every stored message of the conversation, paged (the source of truth)."""
        messages: list[dict[str, Any]] = []
        after = 0
        for _ in range(1000):
            page: dict[str, Any] | None = None
            for attempt in range(5):
                try:
                    page = await self.driver.get_page(self.visitor, after)
                    break
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    await asyncio.sleep(0.5 * (attempt + 1))
            if page is None:
                raise PlatformError(f"GET messages of {self.visitor} keeps failing")
            if not page["messages"] or int(page["cursor"]) <= after:
                break
            messages += page["messages"]
            after = int(page["cursor"])
        self.rec.stored = messages


class Driver:
    def __init__(
        self,
        config: ChaosConfig,
        platform: ChaosPlatform,
        session: aiohttp.ClientSession,
        rng: random.Random,
    ) -> None:
        self.config = config
        self.platform = platform
        self.session = session
        self.rng = rng
        self.run_id = uuid.uuid4().hex[:6]
        self.api = f"{platform.url}/v1/widget/{platform.demo['public_key']}"
        self.post_statuses: Counter[str] = Counter()
        self.last_frame_at = time.monotonic()
        self.faults: list[Fault] = []
        self.exits: list[dict[str, Any]] = []
        self.lock = asyncio.Lock()  # one process change at a time

    async def get_page(self, visitor: str, after: int) -> dict[str, Any]:
        async with self.session.get(
            f"{self.api}/messages",
            params={"visitor_id": visitor, "after": str(after)},
            timeout=aiohttp.ClientTimeout(total=15),
        ) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
            return dict(await response.json())

    def fault_plan(self, send_window_s: float) -> list[tuple[float, str]]:
        """Each fault at a random moment of its own slot of the send phase's 10%-80%: random,
        yet never two at once."""
        c = self.config
        kinds = (
            [AI_WORKER] * c.ai_worker_kills
            + [GATEWAY_WORKERS] * c.gateway_worker_kills
            + [VALKEY] * c.valkey_restarts
        )
        self.rng.shuffle(kinds)
        lo, hi = 0.1 * send_window_s, 0.8 * send_window_s
        slot = (hi - lo) / max(1, len(kinds))
        return [
            (lo + i * slot + self.rng.uniform(0.1, 0.9) * slot, kind)
            for i, kind in enumerate(kinds)
        ]

    async def run_faults(self, plan: Sequence[tuple[float, str]], t0: float) -> None:
        for offset, kind in plan:
            await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
            async with self.lock:
                fault = Fault(kind=kind, at=time.monotonic())
                self.faults.append(fault)
                try:
                    await asyncio.to_thread(self.platform.crash, kind, self.config.down_s)
                    fault.ready_at = time.monotonic()
                except Exception as exc:  # reported; the supervisor restarts what is down
                    fault.error = f"{type(exc).__name__}: {str(exc)[:300]}"

    async def supervise(self, t0: float) -> None:
        """Restart a service that died on its own (as an orchestrator would), and say so."""
        while True:
            await asyncio.sleep(0.5)
            async with self.lock:
                for name, code in self.platform.exited():
                    self.exits.append(
                        {"service": name, "at_s": round(time.monotonic() - t0, 2), "code": code}
                    )
                    await asyncio.to_thread(self.platform.restart_exited, name)

    async def queues_busy(self) -> int | None:
        """Jobs waiting, delayed or running on the pipeline queues; None if Valkey is away."""
        redis = connect(self.platform.redis_url)
        try:
            busy = 0
            for name in PIPELINE_QUEUES:
                c = await Queue(name, redis).get_job_counts()
                busy += (
                    c["waiting"]
                    + c["prioritized"]
                    + c["delayed"]
                    + c["active"]
                    + c["waiting_children"]
                    + c["grouped_waiting"]
                )
            return busy
        except Exception:
            return None
        finally:
            await redis.aclose()

    async def wait_quiescent(self) -> tuple[float, bool]:
        start = time.monotonic()
        deadline = start + self.config.quiesce_timeout_s
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self.last_frame_at >= self.config.quiet_s
            if quiet and await self.queues_busy() == 0:
                return time.monotonic() - start, True
            await asyncio.sleep(0.25)
        return time.monotonic() - start, False

    async def model_calls(self, model_url: str) -> int | None:
        url = model_url.removesuffix("/v1") + "/_chaos/stats"
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                return int((await r.json())["calls"])
        return None


def send_window(config: ChaosConfig) -> float:
    """The expected length of the send phase: the last conversation's start plus its gaps."""
    return (config.conversations - 1) / config.conversation_rate + (
        config.messages - 1
    ) * config.max_gap_s / 2


async def _drive(config: ChaosConfig, platform: ChaosPlatform, model_url: str) -> ChaosReport:
    seed = config.seed if config.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)  # many browsers, not one
    timeout = aiohttp.ClientTimeout(total=None, connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        driver = Driver(config, platform, session, rng)
        conversations = [
            Conversation(driver, i, random.Random(rng.random()))
            for i in range(config.conversations)
        ]
        window = send_window(config)
        plan = driver.fault_plan(window) if config.faults else []
        t0 = time.monotonic()
        supervisor = asyncio.create_task(driver.supervise(t0))
        chaos = asyncio.create_task(driver.run_faults(plan, t0))
        try:
            await asyncio.gather(
                *(c.run(t0 + i / config.conversation_rate) for i, c in enumerate(conversations))
            )
            sent_s = time.monotonic() - t0
            await chaos  # every planned fault happens, even if sending was quicker
            quiesce_s, quiescent = await driver.wait_quiescent()
        finally:
            chaos.cancel()
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            closing = time.monotonic()
            await asyncio.gather(*(c.close() for c in conversations))
        reads = asyncio.Semaphore(16)

        async def final(c: Conversation) -> None:
            async with reads:
                await c.final_messages()

        await asyncio.gather(*(final(c) for c in conversations))
        read_s = time.monotonic() - closing
        calls = await driver.model_calls(model_url)
    settings = {
        k: v for k, v in asdict(config).items() if k not in ("env", "postgres", "keep_data")
    }
    settings["seed"] = seed
    settings["database"] = "postgresql" if config.postgres else "sqlite"
    report = analyse(
        [c.rec for c in conversations],
        faults=driver.faults,
        post_statuses=driver.post_statuses,
        t0=t0,
        config=settings,
        timings={
            "send_phase_s": round(sent_s, 1),
            "planned_send_window_s": round(window, 1),
            "quiescence_s": round(quiesce_s, 1),
            "quiescent": quiescent,
            "close_and_read_s": round(read_s, 1),
            "model_calls": calls,
        },
        unexpected_exits=driver.exits,
    )
    return report


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Start everything, drive the traffic and the faults, wait, check, stop everything."""
    seed = config.seed if config.seed is not None else random.randrange(2**31)
    if config.seed is None:
        config = ChaosConfig(**{**asdict(config), "seed": seed})
    data_dir = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        async with AsyncExitStack() as stack:
            model_url = stack.enter_context(
                chaos_model_process(config.model_min_ms, config.model_max_ms, seed)
            )
            database_url = None
            if config.postgres:
                database_url = await stack.enter_async_context(
                    fresh_postgres_database(config.postgres)
                )
            platform = ChaosPlatform(
                data_dir, env=service_env(config, model_url), database_url=database_url
            )
            await asyncio.to_thread(platform.start)
            stack.push_async_callback(asyncio.to_thread, platform.stop)
            report = await _drive(config, platform, model_url)
            report.timings["data_dir"] = str(data_dir) if config.keep_data else None
            return report
    finally:
        if not config.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
