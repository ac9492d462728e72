"""Fixtures and helpers around the fake OpenAI server. Use them from a conftest with
``from tests.fakes.fixtures import fake_openai``."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeOpenAIServer

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_PREFIX = "fake-openai listening on "


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAIServer]:
    """A started fake server on a free loopback port (echoes the last user message by
    default); stopped after the test."""
    async with FakeOpenAIServer() as server:
        yield server


@contextmanager
def fake_openai_process(
    args: Sequence[str] = (),
    *,
    timeout: float = 15.0,
    module: str = "tests.fakes.openai_server",
    ready_prefix: str = READY_PREFIX,
) -> Iterator[str]:
    """Run ``python -m <module>`` (the fake OpenAI server, or a subclass of it such as the
    chaos model) on a free port unless ``args`` has ``--port``, and yield its base URL once it
    accepts connections; terminated on exit."""
    argv = [sys.executable, "-m", module, *args]
    if "--port" not in args:
        argv += ["--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while not line.startswith(ready_prefix):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                stderr = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
                raise AssertionError(f"fake server did not start: {line!r} {stderr}")
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if ready:
                line = proc.stdout.readline()
        yield line[len(ready_prefix) :].strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
