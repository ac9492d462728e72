"""Every accepted chat message is answered exactly once, in order, while processes crash.

The platform runs as in production (see tests/pipeline/chaos.py): Valkey with AOF, SQLite or
PostgreSQL, the gateway's HTTP side, its queue workers and the ai-worker as separate processes,
and a fake model whose answers name the questions they answer. 50 conversations x 5 messages
go through the widget API while the ai-worker is SIGKILLed three times, the gateway worker
process twice and Valkey once; the counts come from the final GET of every conversation and
from the sockets. The same traffic without faults must be clean too (CHAOS_NO_FAULTS=1, or
`bench/chaos_bench.py --no-faults`).

The first tests check the harness's own judgement on conversations built by hand, so a clean
result of the platform runs means something.
"""

from __future__ import annotations

import os

import aiohttp
import pytest

from tests.domain.conftest import postgres_server
from tests.fakes.chaos_model import ChaosModelServer, answer_text, pending_tokens
from tests.pipeline.chaos import (
    ChaosConfig,
    ConversationRecord,
    Fault,
    Sent,
    analyse,
    check_conversation,
    run_chaos,
)

__all__ = ["postgres_server"]

CI_CONVERSATIONS = 50
CI_MESSAGES = 5


# -- the harness's judgement ----------------------------------------------------------------------


def test_the_model_answers_the_questions_after_the_last_reply() -> None:
    messages = [
        {"role": "system", "content": "You are a bot. Q9-9 in a system prompt is no question."},
        {"role": "user", "content": "Q1-0 hello"},
        {"role": "assistant", "content": "ANSWER Q1-0"},
        {"role": "user", "content": "Q1-1 next"},
        {"role": "user", "content": [{"type": "text", "text": "Q1-2 and more"}]},
    ]
    assert pending_tokens(messages) == ["Q1-1", "Q1-2"]
    assert answer_text(messages) == "ANSWER Q1-1 Q1-2"
    assert answer_text([*messages, {"role": "assistant", "content": "x"}]) == "ANSWER"


async def test_the_model_server_answers_over_http_and_counts_calls() -> None:
    async with (
        ChaosModelServer(min_ms=0, max_ms=0, seed=1) as server,
        aiohttp.ClientSession() as session,
    ):
        body = {"model": "m", "messages": [{"role": "user", "content": "Q3-0 hi"}]}
        async with session.post(f"{server.base_url}/chat/completions", json=body) as response:
            assert response.status == 200
            completion = await response.json()
        assert completion["choices"][0]["message"]["content"] == "ANSWER Q3-0"
        async with session.get(f"{server.url}/_chaos/stats") as response:
            assert await response.json() == {"calls": 1, "in_flight": 0}


def _user(seq: int, token: str) -> dict[str, object]:
    return {"id": f"u{seq}", "seq": seq, "role": "user", "text": f"{token} question"}


def _reply(seq: int, text: str, rid: str | None = None) -> dict[str, object]:
    return {"id": rid or f"r{seq}", "seq": seq, "role": "assistant", "text": text}


def _record(stored: list[dict[str, object]], tokens: list[str]) -> ConversationRecord:
    rec = ConversationRecord(index=1, visitor="v-1", stored=stored)
    for n, token in enumerate(tokens):
        rec.sent.append(Sent(token=token, client_message_id=f"c{n}", statuses=["202"]))
        rec.sent[-1].accepted_at = float(n)
    replies = sorted((m for m in stored if m["role"] == "assistant"), key=lambda m: str(m["seq"]))
    for m in replies:
        rec.live_first[str(m["id"])] = 100.0 + int(str(m["seq"]))
        rec.live_seqs.append(int(str(m["seq"])))
    return rec


def test_a_conversation_answered_once_in_order_is_clean() -> None:
    rec = _record(
        [
            _user(1, "Q1-0"),
            _reply(2, "ANSWER Q1-0"),
            _user(3, "Q1-1"),
            _user(4, "Q1-2"),
            _reply(5, "ANSWER Q1-1 Q1-2"),
        ],
        ["Q1-0", "Q1-1", "Q1-2"],
    )
    check = check_conversation(rec)
    assert not check.broken, check
    report = analyse([rec])
    assert report.violations() == {}
    assert report.counts["accepted"] == 3 and report.counts["not_live"] == 0
    assert report.offenders == []


def test_every_kind_of_breakage_is_counted() -> None:
    rec = _record(
        [
            _user(1, "Q1-0"),
            _user(2, "Q1-1"),
            _reply(3, "ANSWER Q1-1"),  # answers Q1-1 ...
            _reply(4, "ANSWER Q1-0 Q1-1"),  # ... then the older Q1-0 (out of order), Q1-1 again
            _reply(5, "ANSWER Q1-1"),  # nothing new: a duplicate reply
            _reply(6, "ANSWER"),  # answers nothing: a duplicate reply
            _user(7, "Q1-2"),
            _reply(8, "Sorry, I cannot answer right now."),  # the fallback
            _user(9, "Q1-3"),  # never answered
            _reply(10, "ANSWER Q1-3", rid="same"),
            _reply(11, "ANSWER Q1-3", rid="same"),  # one reply id stored twice
        ],
        ["Q1-0", "Q1-1", "Q1-2", "Q1-3", "Q1-4"],
    )
    rec.sent[-1].accepted_at = None  # Q1-4 was never accepted: nobody owes it an answer
    del rec.live_first["r4"]  # reply #4 seen only in the final GET
    rec.live_seqs = [3, 5, 4, 6, 8, 10]  # #4's frame came after #5's
    check = check_conversation(rec)
    assert check.unanswered == ["Q1-2"]
    assert check.answered_twice == ["Q1-1"]  # Q1-3's reply is one, listed twice
    assert check.duplicate_replies == [5, 6, 11]
    assert check.out_of_order_stored == [4]
    assert check.out_of_order_live == [4]
    assert check.fallback_replies == [8]
    assert check.not_live == [4]
    report = analyse(
        [rec], faults=[Fault(kind="ai-worker", at=0.5, ready_at=1.0)], post_statuses={"500": 1}
    )
    assert report.violations() == {
        "unanswered": 1,
        "answered_twice": 1,
        "duplicate_replies": 3,
        "out_of_order": 2,
        "post_500": 1,
    }
    assert report.offending_by_kind["unanswered"] == [1]
    assert "unanswered Q1-2" in report.describe()


def test_lost_and_doubled_questions_and_a_slow_recovery_are_reported() -> None:
    rec = _record([_user(1, "Q1-0"), _user(2, "Q1-0"), _reply(3, "ANSWER Q1-0")], ["Q1-0", "Q1-1"])
    rec.token_seen = {"Q1-0": 4.0}
    report = analyse([rec], faults=[Fault(kind="valkey", at=1.5, ready_at=2.0)])
    assert report.counts["lost_user_messages"] == 1  # accepted (202) yet not stored
    assert report.counts["user_stored_twice"] == 1  # a retried POST stored it again
    assert report.counts["unanswered"] == 1
    (fault,) = report.faults
    assert fault["backlog"] == 2 and fault["backlog_lost"] == 1
    assert fault["backlog_answered_s"] == 2.5


# -- the platform under chaos ---------------------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param(None, id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def postgres(request: pytest.FixtureRequest) -> str | None:
    """None for SQLite; else the admin URL of a reachable PostgreSQL server (or skip)."""
    if request.param is None:
        return None
    return str(request.getfixturevalue("postgres_server"))


# The same traffic without faults (ordinary chat: follow-ups typed while the model answers) is
# the bench's `--no-faults` run; the runs with faults carry that traffic too, and the suite's
# time goes to them. CHAOS_NO_FAULTS=1 adds the fault-free runs here.
_FAULTS = [True, False] if os.environ.get("CHAOS_NO_FAULTS") == "1" else [True]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("faults", _FAULTS, ids=["faults", "no-faults"][: len(_FAULTS)])
async def test_every_accepted_message_is_answered_once_in_order(
    postgres: str | None, faults: bool
) -> None:
    report = await run_chaos(
        ChaosConfig(
            conversations=CI_CONVERSATIONS,
            messages=CI_MESSAGES,
            faults=faults,
            postgres=postgres,
        )
    )
    assert report.timings["quiescent"], report.describe()
    assert report.counts["accepted"] >= 0.9 * CI_CONVERSATIONS * CI_MESSAGES, report.describe()
    assert report.violations() == {}, report.describe(examples=6)
