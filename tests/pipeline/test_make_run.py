"""`make run`'s launcher as a user runs it: start, chat, Ctrl-C, start again on the same data."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest

from devstack import free_port

from .client import WidgetClient

REPO = Path(__file__).resolve().parents[2]
VISITOR = "7d9f6a2e-3b1c-4e8a-9f0d-5c6b7a8e9f01"  # a returning visitor, in the widget's format


def _spawn(data_dir: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}  # offline answers
    # (the test polls GET every 50 ms, far more often than the widget)
    env.update(
        {
            "PIPELINE_DEBOUNCE_MS": "100",
            "PYTHONUNBUFFERED": "1",
            "WIDGET_VISITOR_READ_RATE": "100000",
        }
    )
    argv = [
        sys.executable,
        "-m",
        "devstack.platform",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
    ]
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


async def _launch(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    proc = _spawn(data_dir, port)
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while True:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, "the launcher exited:\n" + "".join(lines)
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
    demo = next(line for line in lines if "Demo page" in line)
    return proc, demo.rsplit("/demo/", 1)[1].strip()


async def _stop(proc: subprocess.Popen[str]) -> None:
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the launcher runs the services as child processes"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert proc.stdout is not None
    assert "Stopped." in proc.stdout.read()
    proc.stdout.close()
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running after Ctrl-C: {alive}"


@pytest.mark.timeout(150)
async def test_second_run_reuses_the_data_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    proc, key = await _launch(data, port)
    try:
        async with aiohttp.ClientSession() as session:
            widget = WidgetClient(f"http://127.0.0.1:{port}", key, session)
            await widget.post(VISITOR, "When does the roastery open?")
            first = await widget.wait_messages(VISITOR, lambda ms: len(ms) == 2)
        assert first[1]["text"].startswith("From our knowledge base:"), "offline answer"
    finally:
        await _stop(proc)
    proc, key_again = await _launch(data, port)
    try:
        assert key_again == key, "the demo tenant is created once"
        async with aiohttp.ClientSession() as session:
            widget = WidgetClient(f"http://127.0.0.1:{port}", key, session)
            again = (await widget.messages(VISITOR))["messages"]
        assert [m["id"] for m in again] == [m["id"] for m in first], (
            "the conversation is still there"
        )
    finally:
        await _stop(proc)
