"""When a conversation goes to the tenant's people instead of the bot: the user asks for one in
a short message, or the bot failed to answer several times in a row."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from chat_domain import MessageView

_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)
# Beyond this many words a phrase is part of a question, not a request: "is the agent
# discount still on?" is for the bot.
MAX_REQUEST_WORDS = 8


def _words(text: str) -> list[str]:
    return _NOT_WORD.sub(" ", text.casefold()).split()


def asks_for_a_person(text: str, phrases: Iterable[str]) -> bool:
    """True when a short message contains one of `phrases` as whole words ("Human please",
    "can I talk to a real person?"), whatever its case and punctuation."""
    words = _words(text)
    if not words or len(words) > MAX_REQUEST_WORDS:
        return False
    padded = f" {' '.join(words)} "
    for phrase in phrases:
        wanted = _words(phrase)
        if wanted and f" {' '.join(wanted)} " in padded:
            return True
    return False


def failed_in_a_row(recent: Sequence[MessageView], fallback_reply: str, count: int) -> bool:
    """True when the bot's last `count` replies in `recent` (oldest first) were all its
    fallback reply: the model keeps failing this conversation."""
    if count <= 0:
        return False
    replies = [m for m in recent if m.role == "assistant"][-count:]
    return len(replies) == count and all(m.text == fallback_reply for m in replies)
