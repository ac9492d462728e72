"""The platform on PostgreSQL (the production database): concurrent conversations each get
their reply. Queueing a job inside the transaction that stores what it refers to is invisible
on SQLite (one writer at a time) and loses messages on PostgreSQL, as the pipeline benchmark
found; this runs the real processes on a real server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.fernet import Fernet

from devstack import free_port
from devstack.platform import Platform
from tests.domain.conftest import postgres_server, postgres_url
from tests.platform_fixtures import FakeLLM

from .client import WidgetClient, assistant

__all__ = ["postgres_server", "postgres_url"]

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_platform(
    fake_llm: FakeLLM, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    env = {
        "LLM_BASE_URL": fake_llm.base_url,
        "LLM_API_KEY": "test-key",
        "LLM_MODEL": "fake-model",
        "PIPELINE_DEBOUNCE_MS": "0",
        "PLATFORM_SECRET_KEY": Fernet.generate_key().decode(),
        "WIDGET_VISITOR_RATE": "1000",
        "WIDGET_IP_RATE": "100000",
        "WIDGET_WS_MAX_PER_IP": "100000",  # every visitor here is 127.0.0.1
        "WIDGET_VISITOR_READ_RATE": "100000",  # the tests poll GET every 50 ms
        "WIDGET_IP_READ_RATE": "1000000",
    }
    data_dir: Path = tmp_path_factory.mktemp("platform-pg")
    with Platform(data_dir, port=free_port(), env=env, database_url=postgres_url) as running:
        yield running


@pytest.fixture
async def pg_widget(pg_platform: Platform) -> AsyncIterator[WidgetClient]:
    async with aiohttp.ClientSession() as session:
        yield WidgetClient(pg_platform.url, pg_platform.demo["public_key"], session)


async def test_concurrent_conversations_each_get_every_reply(pg_widget: WidgetClient) -> None:
    async def conversation(i: int) -> list[str]:
        visitor = str(uuid.uuid4())  # the widget's random visitor id
        replies = []
        async with pg_widget.socket(visitor) as live:
            for turn in range(3):
                text = f"question {turn} from {i}"
                status, _ = await pg_widget.post(visitor, text)
                assert status == 202
                frame = await live.wait_for(
                    lambda f, t=text: assistant(f) and f["message"]["text"] == f"bot: {t}",
                    timeout=30,
                )
                replies.append(frame["message"]["text"])
                await live.ack(frame["message"]["id"])
        return replies

    results = await asyncio.gather(*(conversation(i) for i in range(30)))
    assert all(len(r) == 3 for r in results)
