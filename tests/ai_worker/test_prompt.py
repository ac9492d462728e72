"""Prompt building and the offline token estimate, with the platform's own message and
knowledge-base types."""

from __future__ import annotations

import pytest

from ai_worker import build_messages, estimate_prompt_tokens, estimate_tokens
from ai_worker.prompt import KNOWLEDGE_INSTRUCTIONS, TRUNCATION_MARK, truncate_to_tokens
from chat_domain import MessageView
from tests.ai_worker.helpers import history, hit

SYSTEM = "You are the assistant of Acme Bikes. Be friendly."
BIG = 10_000


# --- estimate_tokens ----------------------------------------------------------------------------


def test_estimate_tokens_values() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("hello") == 2  # 5 chars / 4 -> 2; 1 word * 4/3 -> 2
    assert estimate_tokens("a b c d e f") == 8  # short words: 6 * 4/3
    assert estimate_tokens("x" * 400) == 100  # one long "word": chars / 4
    assert estimate_tokens("你好世界") == 4  # one token per CJK character
    assert estimate_tokens("price 你好") == 2 + 2


def test_estimate_tokens_is_deterministic_and_grows_with_text() -> None:
    sentence = "The quick brown fox jumps over the lazy dog. "
    sizes = [estimate_tokens(sentence * n) for n in range(1, 30)]
    assert sizes == [estimate_tokens(sentence * n) for n in range(1, 30)]
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == len(sizes)
    # Real tokenizers put this sentence at about 10 tokens; the estimate errs high, not wild.
    assert 10 <= estimate_tokens(sentence) <= 16


def test_truncate_to_tokens_keeps_head_and_tail() -> None:
    text = "START " + "filler words here " * 200 + "what is the question END"
    cut = truncate_to_tokens(text, 40)
    assert estimate_tokens(cut) <= 40
    assert cut.startswith("START filler")
    assert cut.endswith("question END")
    assert TRUNCATION_MARK in cut
    assert truncate_to_tokens("short text", 40) == "short text"


# --- structure ----------------------------------------------------------------------------------


def test_order_system_then_knowledge_then_turns() -> None:
    turns = history(("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Price?"))
    hits = [hit("Price list", "The city bike costs 500 EUR."), hit("FAQ", "We ship in 3 days.")]

    messages = build_messages(SYSTEM, turns, hits, token_budget=BIG)

    assert [m["role"] for m in messages] == ["system", "system", "user", "assistant", "user"]
    assert messages[0]["content"] == SYSTEM
    knowledge = messages[1]["content"]
    assert knowledge.startswith(KNOWLEDGE_INSTRUCTIONS)
    assert "do not contain the answer" in knowledge
    assert "[1] Price list\nThe city bike costs 500 EUR." in knowledge
    assert "[2] FAQ\nWe ship in 3 days." in knowledge
    assert knowledge.index("[1] Price list") < knowledge.index("[2] FAQ")
    assert [m["content"] for m in messages[2:]] == ["Hi", "Hello! How can I help?", "Price?"]


def test_no_knowledge_means_no_second_system_message() -> None:
    messages = build_messages(SYSTEM, history(("user", "Hi")), [], token_budget=BIG)
    assert messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]


def test_blank_system_prompt_is_left_out() -> None:
    messages = build_messages("  ", history(("user", "Hi")), [hit("T", "c")], token_budget=BIG)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith(KNOWLEDGE_INSTRUCTIONS)


def test_roles_agent_is_assistant_system_skipped() -> None:
    turns = history(
        ("user", "Can I talk to a human?"),
        ("system", "conversation handed to an agent"),
        ("agent", "Hi, this is Ana from support."),
        ("assistant", "   "),  # blank: nothing to send
        ("user", "Thanks Ana"),
    )
    messages = build_messages(SYSTEM, turns, [], token_budget=BIG)
    assert messages[1:] == [
        {"role": "user", "content": "Can I talk to a human?"},
        {"role": "assistant", "content": "Hi, this is Ana from support."},
        {"role": "user", "content": "Thanks Ana"},
    ]


def test_burst_of_user_messages_stays_separate_and_ordered() -> None:
    turns = history(
        ("assistant", "How can I help?"),
        ("user", "hi"),
        ("user", "my order"),
        ("user", "is late"),
    )
    messages = build_messages(SYSTEM, turns, [], token_budget=BIG)
    assert [(m["role"], m["content"]) for m in messages[1:]] == [
        ("assistant", "How can I help?"),
        ("user", "hi"),
        ("user", "my order"),
        ("user", "is late"),
    ]


def test_max_history_keeps_the_latest_turns() -> None:
    turns = history(*[("user" if i % 2 else "assistant", f"turn {i}") for i in range(30)])
    messages = build_messages(SYSTEM, turns, [], token_budget=BIG, max_history=5)
    assert [m["content"] for m in messages[1:]] == [f"turn {i}" for i in range(25, 30)]


@pytest.mark.parametrize("options", [{"token_budget": 0}, {"token_budget": 10, "max_history": 0}])
def test_rejects_bad_limits(options: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        build_messages(SYSTEM, [], [], **options)


# --- budget -------------------------------------------------------------------------------------


def long_conversation(turns: int = 41) -> list[MessageView]:
    """Alternating turns of varied length, starting and ending with the user."""
    return history(
        *[
            (
                "user" if i % 2 == 0 else "assistant",
                f"message number {i} " + "lorem ipsum " * (i % 7),
            )
            for i in range(turns)
        ]
    )


@pytest.mark.parametrize("budget", [60, 90, 150, 300, 700])
def test_budget_trims_oldest_turns_first(budget: int) -> None:
    turns = long_conversation()
    texts = [t.text.strip() for t in turns]

    messages = build_messages(SYSTEM, turns, [], token_budget=budget, max_history=100)

    assert estimate_prompt_tokens(messages) <= budget
    kept = [m["content"] for m in messages[1:]]
    assert kept, "the newest user message is always kept"
    # The kept turns are the latest contiguous ones ...
    assert kept == texts[-len(kept) :]
    # ... and the next older one would not have fit.
    if len(kept) < len(texts):
        older = build_messages(SYSTEM, turns, [], token_budget=BIG, max_history=len(kept) + 1)
        assert estimate_prompt_tokens(older) > budget


def test_newest_user_message_kept_when_an_assistant_reply_follows() -> None:
    turns = history(("user", "old " * 50), ("user", "Where is my order?"), ("agent", "Checking."))
    messages = build_messages(SYSTEM, turns, [], token_budget=40)
    assert [m["content"] for m in messages[1:]] == ["Where is my order?", "Checking."]
    assert estimate_prompt_tokens(messages) <= 40


def test_oversized_newest_user_message_is_truncated_to_the_budget() -> None:
    huge = "BEGIN " + "pasted log line with details " * 500 + "so why does it fail?"
    turns = history(("user", "earlier question"), ("assistant", "earlier answer"), ("user", huge))

    messages = build_messages(SYSTEM, turns, [hit("Doc", "some passage")], token_budget=200)

    assert [m["role"] for m in messages] == ["system", "user"]  # no room for anything else
    content = messages[1]["content"]
    assert TRUNCATION_MARK in content
    assert content.startswith("BEGIN pasted log")
    assert content.endswith("so why does it fail?")
    assert estimate_prompt_tokens(messages) <= 200
    assert estimate_prompt_tokens(messages) > 150  # the room is used, not wasted


def test_newest_user_message_survives_a_budget_smaller_than_the_system_prompt() -> None:
    messages = build_messages("x " * 500, history(("user", "Help me please")), [], token_budget=10)
    assert messages[-1]["role"] == "user"
    assert messages[-1]["content"]


def test_knowledge_comes_before_older_turns_and_skips_what_does_not_fit() -> None:
    turns = long_conversation(21)
    hits = [
        hit("Big manual", "gear " * 400),  # far too large for the budget
        hit("Returns", "Returns are accepted within 30 days."),
        hit("Shipping", "Shipping takes 3 days."),
    ]

    messages = build_messages(SYSTEM, turns, hits, token_budget=160, max_history=100)

    assert estimate_prompt_tokens(messages) <= 160
    knowledge = messages[1]["content"]
    assert "Big manual" not in knowledge
    assert "[1] Returns\nReturns are accepted within 30 days." in knowledge
    assert "[2] Shipping\nShipping takes 3 days." in knowledge
    assert messages[-1]["content"] == turns[-1].text.strip()
    without_knowledge = build_messages(SYSTEM, turns, [], token_budget=160, max_history=100)
    assert len(without_knowledge) - 1 > len(messages) - 2  # the passages took history's room
