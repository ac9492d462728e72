"""Prompt building: the system prompt, knowledge-base passages and recent turns, within a token
budget estimated offline.

Token counts here are estimates (``estimate_tokens``), not a real tokenizer: tokenizer
libraries such as tiktoken download their encodings at run time, which the worker must not
depend on, and tenants use many model families whose tokenizers differ anyway. The estimate errs
on the high side for English text, so a prompt built within a budget fits the model's window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Final, Literal, Protocol, TypedDict

ChatRole = Literal["system", "user", "assistant"]


class ChatMessage(TypedDict):
    """One message of a chat completion request."""

    role: ChatRole
    content: str


class HistoryMessage(Protocol):
    """A stored conversation message; ``chat_domain.MessageView`` is one. Roles: ``user``,
    ``assistant``, ``agent`` (a human operator; sent as ``assistant``), ``system`` (skipped)."""

    @property
    def role(self) -> str: ...

    @property
    def text(self) -> str: ...


class KnowledgePassage(Protocol):
    """A knowledge-base passage; ``chat_domain.ChunkHit`` is one."""

    @property
    def document_title(self) -> str: ...

    @property
    def content(self) -> str: ...


# Each message costs a few tokens beyond its text (role and separators in the chat template);
# the reply is primed with a few more. Both follow OpenAI's published accounting.
MESSAGE_OVERHEAD_TOKENS: Final = 4
REPLY_PRIMING_TOKENS: Final = 3
DEFAULT_MAX_HISTORY: Final = 20

KNOWLEDGE_INSTRUCTIONS: Final = (
    "Answer the user's question using the knowledge-base passages below. Base your answer on "
    "them. If they do not contain the answer, say that you do not have that information "
    "instead of guessing."
)
TRUNCATION_MARK: Final = " […] "

_WORDS = re.compile(r"\w+")
# Scripts written without spaces between words (CJK, kana, Hangul, Thai, ...): a character is
# about one token or more there, so they are counted per character.
_DENSE = re.compile(r"[\u0e00-\u0e7f\u2e80-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff]")


def estimate_tokens(text: str) -> int:
    """A deterministic, offline token estimate for ``text``.

    For alphabetic scripts: the larger of characters / 4 and words × 4/3 (English averages
    about 4 characters and 0.75 words per token; taking the larger covers both long words and
    punctuation-heavy text). Characters of scripts written without spaces (CJK, Thai, ...) add
    one token each. Empty text is 0 tokens.
    """
    if not text:
        return 0
    dense = len(_DENSE.findall(text))
    rest = _DENSE.sub(" ", text) if dense else text
    chars = len(rest.strip())
    words = len(_WORDS.findall(rest))
    return max(math.ceil(chars / 4), math.ceil(words * 4 / 3)) + dense


def estimate_message_tokens(message: ChatMessage) -> int:
    return estimate_tokens(message["content"]) + MESSAGE_OVERHEAD_TOKENS


def estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """The estimated prompt size of a whole request (what ``build_messages`` keeps within its
    budget)."""
    return REPLY_PRIMING_TOKENS + sum(estimate_message_tokens(m) for m in messages)


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """``text`` shortened to at most ``max_tokens`` estimated tokens, keeping its beginning and
    end (a long message often starts with context and ends with the question) around
    ``TRUNCATION_MARK``. Text that fits is returned unchanged."""
    if estimate_tokens(text) <= max_tokens:
        return text
    mark_tokens = estimate_tokens(TRUNCATION_MARK.strip()) + 1
    if max_tokens <= mark_tokens:
        return ""
    # Binary search for the longest kept length that fits (the estimate grows with length, near
    # enough; whatever is returned was checked to fit).
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if estimate_tokens(_head_and_tail(text, mid)) <= max_tokens:
            low = mid
        else:
            high = mid - 1
    return _head_and_tail(text, low) if low else ""


def _head_and_tail(text: str, keep: int) -> str:
    head = math.ceil(keep * 2 / 3)
    tail = keep - head
    return (
        text[:head].rstrip() + TRUNCATION_MARK + (text[len(text) - tail :].lstrip() if tail else "")
    )


def format_knowledge(knowledge: Sequence[KnowledgePassage]) -> str:
    """The knowledge-base system message: instructions, then numbered passages with their
    document titles."""
    blocks = [KNOWLEDGE_INSTRUCTIONS]
    for number, passage in enumerate(knowledge, start=1):
        title = " ".join(passage.document_title.split()) or "Untitled"
        blocks.append(f"[{number}] {title}\n{passage.content.strip()}")
    return "\n\n".join(blocks)


def _history_turns(history: Sequence[HistoryMessage], max_history: int) -> list[ChatMessage]:
    turns: list[ChatMessage] = []
    for message in history:
        text = message.text.strip()
        if not text:
            continue
        if message.role == "user":
            turns.append({"role": "user", "content": text})
        elif message.role in ("assistant", "agent"):
            turns.append({"role": "assistant", "content": text})
        # "system" history messages (notes, status changes) are not part of the dialogue.
    return turns[-max_history:]


def build_messages(
    system_prompt: str,
    history: Sequence[HistoryMessage],
    knowledge: Sequence[KnowledgePassage] = (),
    *,
    token_budget: int,
    max_history: int = DEFAULT_MAX_HISTORY,
) -> list[ChatMessage]:
    """The messages of a chat completion request.

    Order: the system prompt (left out when blank); the knowledge passages as a second system
    message when there are any; then conversation turns, oldest first. History messages with
    role ``agent`` are sent as ``assistant``, ``system`` ones are skipped, and consecutive user
    messages stay separate. At most ``max_history`` turns are considered.

    Budget (``estimate_prompt_tokens`` of the result ≤ ``token_budget``), filled in priority
    order: the system prompt and the newest user message are always kept (that message is
    truncated when it does not fit; the budget is exceeded only when the system prompt leaves
    no room for a few words of it); then as many passages as fit, best (first) first; then
    the most recent turns, newest first, stopping at the first that does not fit, so the kept
    turns are the latest contiguous ones.
    """
    if token_budget < 1:
        raise ValueError("token_budget must be positive")
    if max_history < 1:
        raise ValueError("max_history must be positive")
    turns = _history_turns(history, max_history)
    newest_user = next(
        (i for i in range(len(turns) - 1, -1, -1) if turns[i]["role"] == "user"), None
    )

    head: list[ChatMessage] = []
    if system_prompt.strip():
        head.append({"role": "system", "content": system_prompt.strip()})
    used = estimate_prompt_tokens(head)

    kept: dict[int, ChatMessage] = {}
    if newest_user is not None:
        message = turns[newest_user]
        room = token_budget - used - MESSAGE_OVERHEAD_TOKENS
        if estimate_tokens(message["content"]) > room:
            content = truncate_to_tokens(message["content"], room)
            # Never send an empty question: keep a little of it even past the budget.
            message = {"role": "user", "content": content or message["content"][:200]}
        kept[newest_user] = message
        used += estimate_message_tokens(message)

    passages: list[KnowledgePassage] = []
    knowledge_cost = 0
    for passage in knowledge:
        candidate = [*passages, passage]
        cost = estimate_message_tokens({"role": "system", "content": format_knowledge(candidate)})
        if used - knowledge_cost + cost <= token_budget:
            used += cost - knowledge_cost
            knowledge_cost = cost
            passages = candidate
    if passages:
        head.append({"role": "system", "content": format_knowledge(passages)})

    for index in range(len(turns) - 1, -1, -1):
        if index == newest_user:
            continue
        cost = estimate_message_tokens(turns[index])
        if used + cost > token_budget:
            break
        kept[index] = turns[index]
        used += cost

    return head + [kept[i] for i in sorted(kept)]
