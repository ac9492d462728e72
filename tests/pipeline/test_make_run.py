"""`make run`'s launcher as a user runs it: start, chat, Ctrl-C, start again on the same data;
and every way it can end (a signal, a closed terminal or pipe, SIGKILL, a taken port, a service
that keeps failing) leaves no process of it running."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import psutil
import pytest

from devstack import free_port
from devstack.platform import Platform, PlatformError, supervise

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
        running = " ".join(_of_run(data))
        assert "-m channel_whatsapp_cloud" in running and "-m channel_whatsapp_qr" in running
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


# -- every exit path stops every child ------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the stop tests, so the demo tenant is created only once."""
    return tmp_path_factory.mktemp("make-run").resolve()


def _belongs(proc: psutil.Process, data_dir: Path) -> bool:
    """Found by what a process carries rather than by its parent, so orphans count: the launcher
    names the data directory on its command line, the services (and migrations) in their
    DATABASE_URL, and Valkey (which rewrites its title) works in it."""
    mark = str(data_dir)
    return (
        any(mark in arg for arg in proc.cmdline())
        or mark in proc.environ().get("DATABASE_URL", "")
        or proc.cwd().startswith(mark)
    )


def _of_run(data_dir: Path) -> list[str]:
    """Every live process of a run on `data_dir`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and _belongs(proc, data_dir):
                found.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:  # gone meanwhile, or not ours to inspect
            continue
    return found


async def _left_after(data_dir: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _of_run(data_dir)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return left


def _kill_run(launcher: subprocess.Popen[str], data_dir: Path) -> None:
    """Cleanup after a failed test, so one failure does not leave processes behind."""
    launcher.kill()
    launcher.wait(5)
    if launcher.stdout is not None:
        launcher.stdout.close()
    for proc in psutil.process_iter():
        try:
            if _belongs(proc, data_dir):
                proc.kill()
        except psutil.Error:
            continue


@pytest.mark.timeout(90)
async def test_ctrl_c_stops_everything_when_the_pipe_reader_is_gone(data_dir: Path) -> None:
    launcher, _key = await _launch(data_dir, free_port())
    try:
        assert len(_of_run(data_dir)) >= 6, "the launcher, Valkey and the services run"
        assert launcher.stdout is not None
        # `make run | tee log` after tee died: the launcher's next print raises BrokenPipeError
        launcher.stdout.close()
        launcher.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(launcher.wait, 30)
        assert await _left_after(data_dir, 15) == [], "left running after Ctrl-C"
        assert code == 0
    finally:
        _kill_run(launcher, data_dir)


async def _services_spawned(launcher: subprocess.Popen[str], data_dir: Path) -> None:
    """Until both services run, seconds before the gateway is ready: signals sent then arrive
    while `start` waits for readiness (and the tests need not wait for it)."""
    deadline = time.monotonic() + 60
    while not all(
        any(service in p for p in _of_run(data_dir)) for service in ("-m gateway", "-m ai_")
    ):
        assert launcher.poll() is None and time.monotonic() < deadline, "no services"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_closing_the_terminal_while_starting_stops_everything(data_dir: Path) -> None:
    launcher = _spawn(data_dir, free_port())
    try:
        await _services_spawned(launcher, data_dir)
        launcher.send_signal(signal.SIGHUP)  # what closing the terminal sends
        out, _ = await asyncio.to_thread(launcher.communicate, timeout=30)
        assert await _left_after(data_dir, 15) == [], "left running after SIGHUP"
        assert launcher.returncode == 0
        assert "Stopped." in out and "is running" not in out
    finally:
        _kill_run(launcher, data_dir)


@pytest.mark.timeout(90)
async def test_children_do_not_outlive_a_killed_launcher(data_dir: Path) -> None:
    launcher = _spawn(data_dir, free_port())
    try:
        await _services_spawned(launcher, data_dir)
        assert len(_of_run(data_dir)) >= 6, "the launcher, Valkey and the services run"
        launcher.kill()  # SIGKILL: no handler, no finally
        await asyncio.to_thread(launcher.wait, 10)
        assert await _left_after(data_dir, 30) == [], "orphans of a SIGKILLed launcher"
    finally:
        _kill_run(launcher, data_dir)


class _AlwaysReady(BaseHTTPRequestHandler):
    """Another platform on the port: it answers /readyz, so it must not pass for ours."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AlwaysReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.timeout(60)
async def test_a_taken_port_is_reported_up_front(data_dir: Path, other_server: int) -> None:
    port = other_server
    launcher = _spawn(data_dir, port)
    try:
        started = time.monotonic()
        out, _ = await asyncio.to_thread(launcher.communicate, timeout=15)
        elapsed = time.monotonic() - started
        assert launcher.returncode != 0
        assert f"port {port}" in out and "GATEWAY_PORT" in out, out
        assert "is running" not in out
        assert elapsed < 10, "checked before anything starts"
        assert await _left_after(data_dir, 10) == []
    finally:
        _kill_run(launcher, data_dir)


def _idle_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # never connected to by these fake services


@pytest.mark.timeout(30)
def test_readiness_is_not_taken_from_another_server_on_the_port(
    tmp_path: Path, other_server: int
) -> None:
    # a gateway that never listens, on a port where another server answers /readyz
    platform = Platform(
        tmp_path,
        port=other_server,
        services=("gateway",),
        redis_url=_idle_redis_url(),
        commands={"gateway": ["-c", "import time; time.sleep(60)"]},
    )
    platform.start_service("gateway")
    try:
        with pytest.raises(PlatformError, match="not ready"):
            platform.wait_ready(timeout=1)
    finally:
        platform.stop()


@pytest.mark.timeout(30)
def test_a_service_that_keeps_failing_at_startup_ends_the_launcher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    platform = Platform(
        tmp_path,
        port=free_port(),
        services=(),
        redis_url=_idle_redis_url(),
        commands={"flaky": ["-c", "raise SystemExit(3)"]},
    )
    platform.start_service("flaky")
    try:
        assert supervise(platform) == 1
    finally:
        platform.stop()
    err = capsys.readouterr().err
    assert "flaky keeps failing at startup" in err, err
    assert not platform.processes
