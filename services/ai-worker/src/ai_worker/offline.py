"""Answers without a language model (no API key configured): the knowledge-base passage that
best matches the question, shortened to a few sentences, or a polite "no answer yet".

Deterministic: the same question and passages always give the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from ai_worker.llm import Completion
from ai_worker.prompt import KnowledgePassage, estimate_tokens

OFFLINE_MODEL: Final = "offline"
DEFAULT_PREFIX: Final = "From our knowledge base:"
DEFAULT_NO_ANSWER: Final = (
    "Sorry, I don't have an answer to that yet. Could you rephrase your question or ask "
    "about something else?"
)

_WORDS = re.compile(r"\w+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?。！？])\s+|\s*\n+\s*")
# Words that say nothing about a topic; a passage must share something else with the question.
# (The knowledge-base search matches any word, these included.)
_STOPWORD_LINES = (
    "a about above after again all am an and any are as at be because been before being",
    "below between both but by can could did do does doing don down during each few for",
    "from further get got had has have having he her here hers him his how i if in into",
    "is it its itself just know let like me more most my no nor not now of off on once",
    "only or other our ours out over own please same she should so some such tell than",
    "thank thanks that the their theirs them then there these they this those through to",
    "too under until up very want was we were what when where which while who whom why",
    "will with would you your yours hi hello hey ok okay",
)
STOPWORDS: Final = frozenset(" ".join(_STOPWORD_LINES).split())


def content_terms(text: str) -> set[str]:
    """The words of ``text`` that can match a topic: lower-cased, stopwords removed, a plural
    ``-s`` dropped from longer words (``prices`` matches ``price``)."""
    terms = set()
    for word in _WORDS.findall(text.lower()):
        if word in STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        terms.add(word)
    return terms


class OfflineResponder:
    """Builds answers from knowledge-base passages (``chat_domain.ChunkHit``, best first)."""

    def __init__(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        no_answer_text: str = DEFAULT_NO_ANSWER,
        max_sentences: int = 3,
        max_chars: int = 600,
    ) -> None:
        if max_sentences < 1 or max_chars < 20:
            raise ValueError("max_sentences must be positive and max_chars at least 20")
        self.prefix = prefix
        self.no_answer_text = no_answer_text
        self.max_sentences = max_sentences
        self.max_chars = max_chars

    def best_passage(
        self, question: str, knowledge: Sequence[KnowledgePassage]
    ) -> KnowledgePassage | None:
        """The passage containing the most distinct content words of the question (ties: the
        earlier one, so the search ranking decides), or None when none shares any."""
        wanted = content_terms(question)
        best: KnowledgePassage | None = None
        best_overlap = 0
        for passage in knowledge:
            overlap = len(wanted & content_terms(passage.content))
            if overlap > best_overlap:
                best, best_overlap = passage, overlap
        return best

    def excerpt(self, question: str, passage: str) -> str:
        """Up to ``max_sentences`` consecutive sentences of ``passage``, starting at the one that
        shares the most content words with the question, cut to ``max_chars``."""
        sentences = [s for s in _SENTENCE_BREAK.split(passage.strip()) if s.strip()]
        if not sentences:
            return ""
        wanted = content_terms(question)
        overlaps = [len(wanted & content_terms(s)) for s in sentences]
        start = overlaps.index(max(overlaps))
        start = max(0, min(start, len(sentences) - self.max_sentences))
        text = " ".join(" ".join(s.split()) for s in sentences[start : start + self.max_sentences])
        if len(text) > self.max_chars:
            cut = text[: self.max_chars - 1]
            if " " in cut:
                cut = cut.rsplit(" ", 1)[0]
            text = cut.rstrip(" ,;:") + "…"
        return text

    def answer(self, question: str, knowledge: Sequence[KnowledgePassage]) -> Completion:
        passage = self.best_passage(question, knowledge)
        snippet = self.excerpt(question, passage.content) if passage is not None else ""
        text = f"{self.prefix} {snippet}".strip() if snippet else self.no_answer_text
        prompt_tokens = estimate_tokens(question) + sum(
            estimate_tokens(p.content) for p in knowledge
        )
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=estimate_tokens(text),
            model=OFFLINE_MODEL,
            finish_reason="stop",
            usage_estimated=True,
        )
