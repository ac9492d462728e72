"""The AI worker's tests talk to the fake OpenAI server over loopback (real HTTP, real SDK)."""

from __future__ import annotations

from tests.fakes.fixtures import fake_openai

__all__ = ["fake_openai"]
