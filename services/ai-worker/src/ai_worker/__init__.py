"""Answers conversations with an LLM (OpenAI-compatible) using knowledge-base context."""
