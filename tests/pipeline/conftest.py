"""Pipeline tests against the real platform (see tests/platform_fixtures.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from devstack.platform import Platform
from tests.platform_fixtures import FakeLLM, fake_llm, platform

from .client import WidgetClient

__all__ = ["FakeLLM", "fake_llm", "platform"]


@pytest.fixture
def _test_cleanup() -> Iterator[list[str]]:
    # the platform has its own Redis; no queue keys of the shared test server are used here
    return []


@pytest.fixture
async def widget(platform: Platform) -> AsyncIterator[WidgetClient]:
    async with aiohttp.ClientSession() as session:
        yield WidgetClient(platform.url, platform.demo["public_key"], session)
