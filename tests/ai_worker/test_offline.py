"""The offline responder: answers from the best knowledge-base passage, deterministically."""

from __future__ import annotations

import pytest

from ai_worker import OFFLINE_MODEL, OfflineResponder, estimate_tokens
from ai_worker.offline import DEFAULT_NO_ANSWER, DEFAULT_PREFIX
from tests.ai_worker.helpers import hit

SHIPPING = hit(
    "Shipping",
    "We ship to all EU countries. Orders placed before noon leave the warehouse the same day. "
    "Delivery takes 2 to 4 working days. Tracking links are sent by email. "
    "Express delivery costs 15 EUR.",
)
RETURNS = hit(
    "Returns",
    "Returns are free within 30 days.\nPack the bike in its original box.\n"
    "Refunds arrive within a week of us receiving the parcel.",
)


def test_answers_with_the_best_matching_passage() -> None:
    responder = OfflineResponder()
    completion = responder.answer("How many days does delivery take?", [RETURNS, SHIPPING])

    assert completion.text.startswith(DEFAULT_PREFIX + " ")
    assert "Delivery takes 2 to 4 working days." in completion.text
    assert "Returns" not in completion.text
    assert completion.model == OFFLINE_MODEL
    assert completion.finish_reason == "stop"
    assert completion.usage_estimated is True
    assert completion.completion_tokens == estimate_tokens(completion.text)
    assert completion.prompt_tokens >= estimate_tokens("How many days does delivery take?")


def test_excerpt_is_a_few_sentences_starting_at_the_best_one() -> None:
    responder = OfflineResponder(max_sentences=2)
    text = responder.answer("delivery days?", [SHIPPING]).text
    assert text == (
        f"{DEFAULT_PREFIX} Delivery takes 2 to 4 working days. Tracking links are sent by email."
    )


def test_excerpt_window_shifts_back_at_the_end_of_the_passage() -> None:
    responder = OfflineResponder(max_sentences=2)
    text = responder.answer("how much is express?", [SHIPPING]).text
    assert (
        text == f"{DEFAULT_PREFIX} Tracking links are sent by email. Express delivery costs 15 EUR."
    )


def test_lines_count_as_sentences() -> None:
    text = OfflineResponder(max_sentences=1).answer("original box?", [RETURNS]).text
    assert text == f"{DEFAULT_PREFIX} Pack the bike in its original box."


def test_long_excerpts_are_cut_at_a_word() -> None:
    passage = hit("Manual", "Brakes " + "need regular adjustment and careful inspection " * 40)
    text = OfflineResponder(max_chars=100).answer("brakes", [passage]).text
    snippet = text.removeprefix(DEFAULT_PREFIX + " ")
    assert len(snippet) <= 100
    assert snippet.endswith("…")
    assert snippet.startswith("Brakes need regular")
    assert not snippet[:-1].endswith(" ")


def test_plural_and_case_do_not_matter() -> None:
    text = OfflineResponder().answer("REFUND", [SHIPPING, RETURNS]).text
    assert "Refunds arrive within a week" in text


@pytest.mark.parametrize(
    ("question", "knowledge"),
    [
        ("How long does delivery take?", []),
        ("Do you sell helmets?", [SHIPPING, RETURNS]),  # nothing shared
        ("What is the", [SHIPPING, RETURNS]),  # only stopwords shared
        ("", [SHIPPING]),
    ],
)
def test_no_answer_without_a_matching_passage(question: str, knowledge: list) -> None:  # type: ignore[type-arg]
    completion = OfflineResponder().answer(question, knowledge)
    assert completion.text == DEFAULT_NO_ANSWER
    assert completion.model == OFFLINE_MODEL
    assert completion.completion_tokens == estimate_tokens(DEFAULT_NO_ANSWER)


def test_deterministic_and_ties_follow_search_order() -> None:
    first = hit("A", "Opening hours are 9 to 5.")
    second = hit("B", "Opening hours on Sunday: closed.")
    responder = OfflineResponder()
    answers = {responder.answer("opening hours", [first, second]).text for _ in range(5)}
    assert answers == {f"{DEFAULT_PREFIX} Opening hours are 9 to 5."}
    assert responder.answer("opening hours", [second, first]).text.endswith("closed.")
    # More shared words beat the search order.
    assert responder.answer("sunday opening hours", [first, second]).text.endswith("closed.")


def test_custom_texts() -> None:
    responder = OfflineResponder(prefix="FAQ:", no_answer_text="Ask a human.")
    assert responder.answer("returns", [RETURNS]).text.startswith("FAQ: Returns are free")
    assert responder.answer("helmets", [RETURNS]).text == "Ask a human."
