"""Soak harness for queue-core's worker: several worker processes, one queue, a mixed workload
for a while, then a check of everything that must hold. Used by test_soak.py (about a minute)
and bench/queue_soak.py (longer, prints JSON).

Only queue-core's public API drives the queue (producer: `Queue.add`/`add_bulk`; workers:
`Worker` with its public `stats`, `active_count`, `seconds_since_last_fetch`), so the harness
keeps working when the internals change; the final consistency check reads the keys directly
(tests/queue_core/helpers.py).

Workload (seeded): grouped jobs over many groups (group concurrency 1, strict order) and
ungrouped ones (some with a priority); a share fails a planned number of attempts and retries
with no backoff, fixed or exponential backoff including 0 ms (a retry re-leased in the same
round trip) and a custom strategy; some fail for good (attempts used up, or
UnrecoverableError); some take a few ms, a few block the event loop (shorter than the lock); a
few use bad backoff values (NaN, inf, negative, huge, a raising strategy). Short leases with
frequent renewal stress the renewal/finish races.

Checks:
- drained: within `drain_timeout` after the producer stops no job is waiting, prioritized or
  active (only bad-backoff jobs may stay delayed);
- each job ended as designed (state, attempts made, attempts run), no job stalled;
- per-group: attempts started in add order, never two at once, completions in add order;
- zero lost leases (`Worker.stats["lost"]`): no worker dies or blocks beyond its lock here;
- zero wedged workers: a worker is wedged when it has a free slot and has not fetched for
  `wedge_after` seconds, or its process stops reporting or exits. A healthy worker with a free
  slot fetches at least every `drain_delay` (1 s) whether or not work is waiting, so this needs
  no guess about which waiting jobs it could take; the report says how many were waiting. The
  monitor keeps watching for `wedge_after` after the drain, for a worker that wedged near the
  end, when nothing was waiting any more;
- every worker process exits cleanly on SIGTERM, within its shutdown timeout (+2 s);
- each job id is in exactly one state (`check_consistency`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from queue_core import (
    Backoff,
    BulkJob,
    InvalidOptionError,
    Job,
    Queue,
    QueueSettings,
    connect,
)

from .helpers import check_consistency
from .soak_worker import SHUTDOWN_TIMEOUT

WORKER_SCRIPT = Path(__file__).with_name("soak_worker.py")
BAD_BACKOFF = ("nan", "inf", "neg", "huge", "raise", "huge-fixed")


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 45.0  # how long the producer keeps adding
    seed: int = 20261201
    rate: float = 60.0  # jobs added per second
    groups: int = 40
    grouped_share: float = 0.6
    fail_share: float = 0.35  # jobs with planned failed attempts
    bad_backoff_share: float = 0.01  # ungrouped jobs whose retry uses a bad backoff value
    concurrencies: tuple[int, ...] = (6, 6, 3, 1)  # one worker process each
    lock_duration: int = 1000
    lock_renew_interval: int = 25
    stalled_interval: int = 300
    drain_delay: float = 1.0
    wedge_after: float = 3.0
    drain_timeout: float = 30.0
    report_interval: float = 0.1
    monitor_interval: float = 0.2


@dataclass
class Spec:
    """One job as planned; its data tells the processor what to do."""

    id: str
    group: str | None
    seq: int  # position in its group (add order)
    attempts: int
    fail: int  # attempts that fail before one succeeds
    unrecoverable: bool
    backoff: str
    bad: bool
    data: dict[str, Any]
    options: dict[str, Any]
    rejected: str | None = None  # add refused (InvalidOptionError): allowed for bad values

    @property
    def expected(self) -> tuple[str, int] | None:
        """(final state, attempts made), or None when any outcome but a stuck job is fine."""
        if self.bad:
            return None
        if self.unrecoverable:
            return ("failed", 1)
        if self.fail >= self.attempts:
            return ("failed", self.attempts)
        return ("completed", self.fail + 1)

    def describe(self) -> str:
        where = f"group {self.group} #{self.seq}" if self.group else "ungrouped"
        return (
            f"{self.id} ({where}, attempts={self.attempts}, fail={self.fail}"
            f"{', unrecoverable' if self.unrecoverable else ''}, backoff={self.backoff}, "
            f"ms={self.data.get('ms', 0)}, blk={self.data.get('blk', 0)})"
        )


class Workload:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.n = 0
        self.group_seq: Counter[str] = Counter()
        self.specs: dict[str, Spec] = {}

    def _backoff(self) -> tuple[str, Backoff | None, str | None]:
        rng = self.rng
        r = rng.random()
        # Most retries have no delay: the retry is re-leased in the same round trip that
        # reported the failure, with a new token, while renewals with the old one are in flight.
        if r < 0.25:
            return "none", None, None
        if r < 0.5:
            return "fixed(0)", Backoff.fixed(0), None
        if r < 0.6:
            return "exponential(0)", Backoff.exponential(0), None
        if r < 0.75:
            ms = rng.choice([5, 20, 60, 150])
            return f"fixed({ms})", Backoff.fixed(ms), None
        if r < 0.9:
            return (
                "exponential(10, jitter=0.5, max=200)",
                Backoff.exponential(10, jitter=0.5, max_delay=200),
                None,
            )
        bv = rng.choice(["zero", "float"])
        return f"soak:{bv}", Backoff("soak", 0), bv

    def next(self) -> Spec:
        rng, cfg = self.rng, self.cfg
        self.n += 1
        job_id = f"s{self.n}"
        grouped = rng.random() < cfg.grouped_share
        bad = not grouped and rng.random() < cfg.bad_backoff_share / (1 - cfg.grouped_share)
        attempts = rng.choice([1, 2, 3, 4])
        fail = 0
        unrecoverable = False
        data: dict[str, Any] = {}
        options: dict[str, Any] = {
            "job_id": job_id,
            "remove_on_complete": False,
            "remove_on_fail": False,
        }
        if bad:
            # A bad value must not be fatal to the worker; its job fails, retries or waits.
            attempts, fail = 3, 3
            kind = rng.choice(BAD_BACKOFF)
            backoff_name = f"bad:{kind}"
            if kind == "huge-fixed":
                options["backoff"] = 2**70  # ms; fits no Redis integer
            else:
                options["backoff"] = Backoff("soak", 0)
                data["bv"] = kind
        else:
            if rng.random() < cfg.fail_share:
                fail = rng.randint(1, attempts)
                unrecoverable = rng.random() < 0.05
            backoff_name, backoff, bv = self._backoff()
            if backoff is not None:
                options["backoff"] = backoff
            if bv is not None:
                data["bv"] = bv
        options["attempts"] = attempts
        group = None
        seq = 0
        if grouped:
            group = f"g{rng.randrange(cfg.groups)}"
            seq = self.group_seq[group]
            self.group_seq[group] += 1
            options["group"] = group
            data["g"] = group
            data["s"] = seq
        elif rng.random() < 0.2:
            options["priority"] = rng.randint(1, 3)
        if rng.random() < 0.5:
            data["ms"] = rng.randint(1, 60)
        if rng.random() < 0.03:
            data["blk"] = rng.randint(20, 200)
        if fail:
            data["f"] = fail
        if unrecoverable:
            data["u"] = 1
        spec = Spec(job_id, group, seq, attempts, fail, unrecoverable, backoff_name, bad, data,
                    options)  # fmt: skip
        self.specs[job_id] = spec
        return spec


@dataclass
class WorkerProc:
    index: int
    concurrency: int
    proc: asyncio.subprocess.Process
    log_path: Path
    exit_code: int | None = None
    killed: bool = False


@dataclass
class Wedge:
    index: int
    reason: str
    first_seen_s: float  # seconds into the run
    report: dict[str, Any]
    counts: dict[str, Any]
    episodes: int = 1


@dataclass
class SoakResult:
    summary: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"soak: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append("summary: " + json.dumps(self.summary, sort_keys=True))
        lines += self.details
        return "\n".join(lines)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class Soak:
    def __init__(self, url: str, queue_name: str, cfg: SoakConfig, log_dir: Path) -> None:
        self.url = url
        self.cfg = cfg
        self.log_dir = log_dir
        self.redis = connect(url)
        self.queue = Queue(queue_name, self.redis)
        self.k = f"test:{queue_name}:"
        self.workload = Workload(cfg)
        self.workers: list[WorkerProc] = []
        self.wedges: dict[int, Wedge] = {}
        self._wedged_now: set[int] = set()
        self.max_gap: dict[int, float] = {}
        self.reports: dict[int, dict[str, Any]] = {}
        self.t0 = 0.0
        self.added = 0

    # -- processes --------------------------------------------------------------------------

    async def start_workers(self) -> None:
        for index, concurrency in enumerate(self.cfg.concurrencies):
            wcfg = {
                "url": self.url,
                "queue": self.queue.name,
                "index": index,
                "concurrency": concurrency,
                "lock_duration": self.cfg.lock_duration,
                "lock_renew_interval": self.cfg.lock_renew_interval,
                "stalled_interval": self.cfg.stalled_interval,
                "drain_delay": self.cfg.drain_delay,
                "report_interval": self.cfg.report_interval,
            }
            log_path = self.log_dir / f"soak-worker-{index}.log"
            with log_path.open("wb") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(WORKER_SCRIPT),
                    json.dumps(wcfg),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log_file,
                )
            self.workers.append(WorkerProc(index, concurrency, proc, log_path))
        for w in self.workers:
            assert w.proc.stdout is not None
            try:
                line = await asyncio.wait_for(w.proc.stdout.readline(), 30)
            except TimeoutError:
                line = b""
            if line.strip() != b"ready":
                raise RuntimeError(
                    f"soak worker {w.index} did not start: {line!r}\n{self._log_tail(w, 30)}"
                )

    async def stop_workers(self) -> None:
        for w in self.workers:
            if w.proc.returncode is None:
                w.proc.send_signal(signal.SIGTERM)

        async def reap(w: WorkerProc) -> None:
            try:
                w.exit_code = await asyncio.wait_for(w.proc.wait(), 20)
            except TimeoutError:
                w.killed = True
                w.proc.kill()
                w.exit_code = await asyncio.wait_for(w.proc.wait(), 10)

        await asyncio.gather(*(reap(w) for w in self.workers))

    def _log_tail(self, w: WorkerProc, n: int) -> str:
        try:
            lines = w.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in lines[-n:])

    # -- producer and monitor ---------------------------------------------------------------

    async def _add(self, specs: list[Spec]) -> None:
        plain = [s for s in specs if not s.bad]
        if len(plain) > 1 and self.workload.rng.random() < 0.7:
            await self.queue.add_bulk([BulkJob("soak", s.data, None, s.options) for s in plain])
        else:
            for s in plain:
                await self.queue.add("soak", s.data, **s.options)
        for s in specs:
            if s.bad:
                try:
                    await self.queue.add("soak", s.data, **s.options)
                except InvalidOptionError as exc:
                    s.rejected = str(exc)
        self.added += sum(1 for s in specs if s.rejected is None)

    async def produce(self, until: float) -> None:
        tick = 0.05
        credit = 0.0
        next_at = time.monotonic()
        while time.monotonic() < until:
            credit += self.cfg.rate * tick
            n = int(credit)
            credit -= n
            if n:
                await self._add([self.workload.next() for _ in range(n)])
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _sample(self) -> dict[str, Any]:
        counts: dict[str, Any] = dict(await self.queue.get_job_counts())
        raw = await self.redis.hgetall(self.k + "report")
        now = time.time()
        pending = int(counts["waiting"]) + int(counts["prioritized"])
        for key, value in raw.items():
            rep = json.loads(value)
            index = int(_s(key))
            self.reports[index] = rep
            self.max_gap[index] = max(self.max_gap.get(index, 0.0), rep["max_gap"])
            age = now - rep["ts"]
            reason = None
            if age > self.cfg.wedge_after:
                reason = f"no report for {age:.1f}s (event loop stuck or process gone)"
            elif rep["gap"] > self.cfg.wedge_after:
                reason = (
                    f"{rep['concurrency'] - rep['active']} free slot(s), no fetch for "
                    f"{rep['gap']:.1f}s, {pending} jobs waiting"
                )
            self._note_wedge(index, reason, rep, counts)
        for w in self.workers:
            if w.proc.returncode is not None:
                rep = self.reports.get(w.index, {})
                self._note_wedge(
                    w.index, f"process exited with {w.proc.returncode}", rep, counts, sticky=True
                )
        return counts

    def _note_wedge(
        self,
        index: int,
        reason: str | None,
        rep: dict[str, Any],
        counts: dict[str, Any],
        sticky: bool = False,
    ) -> None:
        if reason is None:
            self._wedged_now.discard(index)
            return
        if index in self._wedged_now:
            return
        self._wedged_now.add(index)
        if index in self.wedges:
            if not sticky:
                self.wedges[index].episodes += 1
            return
        self.wedges[index] = Wedge(index, reason, time.monotonic() - self.t0, rep, counts)

    async def monitor(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.monitor_interval)

    async def _drained(self) -> bool:
        counts = await self._sample()
        bad_added = sum(1 for s in self.workload.specs.values() if s.bad and s.rejected is None)
        done = (
            counts["waiting"] == 0
            and counts["prioritized"] == 0
            and counts["active"] == 0
            and counts["delayed"] <= bad_added
            and counts["completed"] + counts["failed"] + counts["delayed"] >= self.added
        )
        return bool(done)

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> SoakResult:
        cfg = self.cfg
        await self.queue.configure(QueueSettings(group_concurrency=1, strict_group_order=True))
        await self.start_workers()
        self.t0 = time.monotonic()
        stop_monitor = asyncio.Event()
        monitor = asyncio.create_task(self.monitor(stop_monitor))
        try:
            await self.produce(self.t0 + cfg.seconds)
            produced_at = time.monotonic()
            deadline = produced_at + cfg.drain_timeout
            while True:
                drained = await self._drained()
                if drained or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            drain_s = time.monotonic() - produced_at
            elapsed = time.monotonic() - self.t0
            left = await self._left_over() if not drained else {}
            if drained:
                # Idle now, every healthy worker still fetches each drain_delay; one that
                # wedged near the end (no work waiting any more) shows up within wedge_after.
                await asyncio.sleep(self.cfg.wedge_after + 3 * self.cfg.monitor_interval)
        finally:
            stop_monitor.set()
            await monitor
            await self.stop_workers()
        return await self._verify(drained, drain_s, elapsed, left)

    async def _left_over(self) -> dict[str, list[str]]:
        left: dict[str, list[str]] = {}
        for state in ("waiting", "prioritized", "active", "delayed"):
            ids = await self.queue.list_job_ids(state, 0, 10_000)
            if ids:
                left[state] = ids
        return left

    async def _list(self, key: str) -> list[str]:
        return [_s(x) for x in await self.redis.lrange(self.k + key, 0, -1)]

    async def _finished_jobs(self) -> dict[str, Job]:
        jobs: dict[str, Job] = {}
        for state in ("completed", "failed"):
            start = 0
            while True:
                page = await self.queue.list_jobs(state, start, 1000)
                for job in page:
                    jobs[job.id] = job
                if len(page) < 1000:
                    break
                start += 1000
        return jobs

    async def _verify(
        self,
        drained: bool,
        drain_s: float,
        elapsed: float,
        left: dict[str, list[str]],
    ) -> SoakResult:
        cfg = self.cfg
        specs = {i: s for i, s in self.workload.specs.items() if s.rejected is None}
        problems: list[str] = []
        details: list[str] = []

        def listing(title: str, items: list[str], limit: int = 25) -> None:
            details.append(f"{title} ({len(items)}):")
            if len(items) <= limit:
                details.extend(f"    {x}" for x in items)
                return
            # the first and the last ones: how it started, and how it ended
            head = limit // 2
            details.extend(f"    {x}" for x in items[:head])
            details.append(f"    ... {len(items) - limit} more ...")
            details.extend(f"    {x}" for x in items[head - limit :])

        def spec_of(job_id: str) -> str:
            s = self.workload.specs.get(job_id)
            return s.describe() if s is not None else f"{job_id} (not added by the soak)"

        # drained in time
        if not drained:
            problems.append(
                f"not drained {cfg.drain_timeout:.0f}s after the producer stopped: "
                + ", ".join(f"{len(v)} {k}" for k, v in left.items())
            )
            for state, ids in left.items():
                if state == "delayed":
                    ids = [i for i in ids if not (i in specs and specs[i].bad)]
                if ids:
                    listing(f"left {state}", [spec_of(i) for i in ids])

        # worker processes: wedges, lost leases, clean exits
        finals = {i: r for i, r in self.reports.items() if r.get("final")}
        raw = await self.redis.hgetall(self.k + "report")
        for key, value in raw.items():
            rep = json.loads(value)
            if rep.get("final"):
                finals[int(_s(key))] = rep
        stats: Counter[str] = Counter()
        per_worker = {}
        for w in self.workers:
            rep = finals.get(w.index) or self.reports.get(w.index) or {}
            wstats = rep.get("stats", {})
            stats.update(wstats)
            per_worker[w.index] = {
                "concurrency": w.concurrency,
                "stats": wstats,
                "max_fetch_gap_s": round(
                    max(self.max_gap.get(w.index, 0.0), rep.get("max_gap", 0.0)), 3
                ),
                "exit_code": w.exit_code,
                "close_s": rep.get("close_s"),
            }
            if w.killed:
                problems.append(f"worker {w.index} ignored SIGTERM for 20s and was killed")
            elif w.exit_code != 0:
                problems.append(f"worker {w.index} exited with {w.exit_code}")
            if w.index not in finals:
                problems.append(f"worker {w.index} wrote no final report (its stats are stale)")
            elif (rep.get("close_s") or 0) > SHUTDOWN_TIMEOUT + 2:
                problems.append(
                    f"worker {w.index} took {rep['close_s']}s to close after SIGTERM (running "
                    f"jobs are at most {SHUTDOWN_TIMEOUT:.0f}s; close(timeout) should not hang)"
                )
            if wstats.get("lost", 0):
                problems.append(
                    f"worker {w.index} (concurrency {w.concurrency}) reported "
                    f"{wstats['lost']} lost lease(s) though no worker died or blocked beyond "
                    f"its lock; stats {wstats}"
                )
        for wedge in self.wedges.values():
            w = self.workers[wedge.index]
            rep = wedge.report
            problems.append(
                f"worker {wedge.index} (concurrency {w.concurrency}) wedged "
                f"{wedge.first_seen_s:.1f}s into the run: {wedge.reason}; episodes "
                f"{wedge.episodes}; active {rep.get('active')} (in the processor, with age: "
                f"{rep.get('attempts')}), since last fetch {rep.get('since_fetch', 0):.1f}s, "
                f"stats {rep.get('stats')}; queue "
                f"waiting={wedge.counts.get('waiting')} active={wedge.counts.get('active')} "
                f"delayed={wedge.counts.get('delayed')}"
            )

        # one state per job
        states: dict[str, str] = {}
        try:
            states = await check_consistency(self.queue)
        except AssertionError as exc:
            problems.append(str(exc))
        foreign = sorted(set(states) - set(specs))
        if foreign:
            problems.append(f"{len(foreign)} job ids the soak never added: {foreign[:10]}")
        missing = sorted(set(specs) - set(states)) if states else []
        if missing:
            problems.append(f"{len(missing)} added jobs have no state (lost)")
            listing("lost jobs", [spec_of(i) for i in missing])

        # each job ended as designed
        finished = await self._finished_jobs()
        runs_raw = await self.redis.hgetall(self.k + "runs")
        runs = {_s(k): int(v) for k, v in runs_raw.items()}
        wrong: list[str] = []
        stalled: list[str] = []
        rerun: list[str] = []
        bad_outcomes: Counter[str] = Counter()
        for job_id, spec in specs.items():
            state = states.get(job_id, "missing")
            if state.startswith("group:"):
                state = f"waiting ({state})"
            job = finished.get(job_id)
            expected = spec.expected
            if job is not None and job.stalled_count:
                stalled.append(f"{spec.describe()}: stalled {job.stalled_count}x, {state}")
            if expected is None:
                bad_outcomes[f"{spec.backoff}->{state}"] += 1
                if state not in ("completed", "failed", "delayed"):
                    wrong.append(f"{spec.describe()}: {state} (bad backoff; stuck)")
                continue
            want_state, want_atm = expected
            if state != want_state:
                wrong.append(f"{spec.describe()}: {state}, expected {want_state}")
                continue
            assert job is not None
            if job.attempts_made != want_atm:
                wrong.append(
                    f"{spec.describe()}: {state} after {job.attempts_made} attempts, "
                    f"expected {want_atm} ({job.failed_reason})"
                )
            if runs.get(job_id, 0) != want_atm:
                rerun.append(f"{spec.describe()}: ran {runs.get(job_id, 0)}x, expected {want_atm}")
        if wrong:
            problems.append(f"{len(wrong)} jobs did not end as designed")
            listing("jobs not ending as designed", wrong)
        if stalled:
            problems.append(f"{len(stalled)} jobs stalled (a lease expired under a live worker)")
            listing("stalled jobs", stalled)
        if rerun:
            problems.append(f"{len(rerun)} jobs ran a different number of times than planned")
            listing("jobs run more or less often than planned", rerun)

        # per-group order and concurrency
        order: list[str] = []
        groups: dict[str, list[Spec]] = {}
        for spec in specs.values():
            if spec.group is not None:
                groups.setdefault(spec.group, []).append(spec)
        for gid, members in sorted(groups.items()):
            starts = [int(x.split(":")[0]) for x in await self._list(f"starts:{gid}")]
            for a, b in itertools.pairwise(starts):
                if b < a:
                    order.append(f"group {gid}: #{b} started after #{a} (starts {starts[:40]})")
                    break
            done = [int(x) for x in await self._list(f"done:{gid}")]
            want = [s.seq for s in members if (s.expected or ("",))[0] == "completed"]
            if done != sorted(done):
                order.append(f"group {gid}: completed out of add order: {done[:40]}")
            elif drained and done != want:
                order.append(
                    f"group {gid}: completed {len(done)} jobs, expected {len(want)}: "
                    f"missing {sorted(set(want) - set(done))[:10]}, "
                    f"extra {sorted(set(done) - set(want))[:10]}"
                )
        overlaps = await self._list("overlap")
        if order:
            problems.append(f"{len(order)} groups broke their order")
            listing("group order", order)
        if overlaps:
            problems.append(f"{len(overlaps)} attempts overlapped another of their group")
            listing("group overlaps", overlaps)

        # worker logs: what the workers said about the problems above
        for w in self.workers:
            notable = _notable_log_lines(w.log_path)
            if notable and (problems or not drained):
                listing(f"worker {w.index} log (warnings and errors)", notable, 15)

        state_counts = Counter("waiting" if v.startswith("group:") else v for v in states.values())
        finished_n = state_counts["completed"] + state_counts["failed"]
        summary = {
            "seconds": cfg.seconds,
            "seed": cfg.seed,
            "workers": list(cfg.concurrencies),
            "jobs": len(specs),
            "rejected_at_add": sum(1 for s in self.workload.specs.values() if s.rejected),
            "grouped": sum(len(m) for m in groups.values()),
            "groups": len(groups),
            "completed": state_counts["completed"],
            "failed": state_counts["failed"],
            "left": {k: v for k, v in state_counts.items() if k not in ("completed", "failed")},
            "retried": stats["retried"],
            "released": stats["released"],
            "lost_leases": stats["lost"],
            "stalled_jobs": len(stalled),
            "wedged_workers": len(self.wedges),
            "max_fetch_gap_s": {str(i): p["max_fetch_gap_s"] for i, p in per_worker.items()},
            "per_worker": {str(i): p for i, p in per_worker.items()},
            "bad_backoff_outcomes": dict(bad_outcomes),
            "drained": drained,
            "drain_s": round(drain_s, 2),
            "throughput_jobs_per_s": round(finished_n / elapsed, 1) if elapsed else 0,
            "problems": len(problems),
        }
        return SoakResult(summary, problems, details)

    async def close(self) -> None:
        for w in self.workers:
            if w.proc.returncode is None:
                w.proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.proc.wait(), 10)
        await self.redis.aclose()


def _notable_log_lines(path: Path) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keep = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback", "Error:", "never retrieved")
    return [line for line in lines if any(k in line for k in keep)]


async def run_soak(url: str, queue_name: str, cfg: SoakConfig, log_dir: Path) -> SoakResult:
    soak = Soak(url, queue_name, cfg, log_dir)
    try:
        return await soak.run()
    finally:
        await soak.close()
