"""Answers conversations with an LLM (OpenAI-compatible) using knowledge-base context."""

from ai_worker.llm import (
    DEFAULT_BASE_URL,
    Completion,
    LLMClient,
    LLMClientCache,
    LLMClientClosedError,
    LLMError,
    PermanentLLMError,
    ProviderConfig,
    RetryableLLMError,
    create_llm_client,
    parse_retry_after,
)
from ai_worker.offline import OFFLINE_MODEL, OfflineResponder
from ai_worker.prompt import (
    ChatMessage,
    HistoryMessage,
    KnowledgePassage,
    build_messages,
    estimate_prompt_tokens,
    estimate_tokens,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "OFFLINE_MODEL",
    "ChatMessage",
    "Completion",
    "HistoryMessage",
    "KnowledgePassage",
    "LLMClient",
    "LLMClientCache",
    "LLMClientClosedError",
    "LLMError",
    "OfflineResponder",
    "PermanentLLMError",
    "ProviderConfig",
    "RetryableLLMError",
    "build_messages",
    "create_llm_client",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "parse_retry_after",
]
