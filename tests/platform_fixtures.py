"""A real platform in processes (gateway, ai-worker, private Valkey, SQLite) talking to a fake
OpenAI-compatible server process: one per test session, shared by the pipeline tests and the
browser test of the real platform."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import free_port
from devstack.platform import Platform
from tests.fakes.fixtures import fake_openai_process


class FakeLLM:
    """Steers the fake server process through its control API."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.root = base_url.removesuffix("/v1")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.root}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def script(self, *behaviours: dict[str, Any]) -> None:
        self._call("POST", "/_fake/script", list(behaviours))

    def reset(self) -> None:
        self._call("POST", "/_fake/reset")

    def requests(self) -> list[dict[str, Any]]:
        return [
            r
            for r in self._call("GET", "/_fake/requests")["requests"]
            if r["path"].endswith("/chat/completions")
        ]


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLM]:
    with fake_openai_process(["--echo-prefix", "bot: "]) as base_url:
        yield FakeLLM(base_url)


@pytest.fixture(scope="session")
def platform(fake_llm: FakeLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    env = {
        "LLM_BASE_URL": fake_llm.base_url,
        "LLM_API_KEY": "test-key",
        "LLM_MODEL": "fake-model",
        "LLM_TIMEOUT_S": "5",
        "PIPELINE_DEBOUNCE_MS": "250",
        "AI_ATTEMPTS": "2",
        "AI_BACKOFF_MS": "100",
        "AI_LOCK_MS": "1500",
        "QUEUE_STALLED_INTERVAL_MS": "300",
        "WIDGET_VISITOR_RATE": "1000",
        "WIDGET_IP_RATE": "100000",
        "WIDGET_WS_MAX_PER_IP": "100000",  # every visitor here is 127.0.0.1
        "WIDGET_VISITOR_READ_RATE": "100000",  # the tests poll GET every 50 ms
        "WIDGET_IP_READ_RATE": "1000000",
        "LOG_LEVEL": "INFO",
    }
    data_dir: Path = tmp_path_factory.mktemp("platform")
    with Platform(data_dir, port=free_port(), env=env) as running:
        yield running
