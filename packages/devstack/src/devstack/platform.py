"""The whole platform on one machine: `make run` (`python -m devstack.platform`).

Starts an embedded Valkey (persisting to the data directory), SQLite with migrations applied, a
demo tenant with a chatbot, widget and knowledge base (created once), and every service as its
own process; prints the demo page's URL; Ctrl-C stops everything. A second run reuses the data,
so conversations are still there. The end-to-end tests and the pipeline benchmark use the same
`Platform` class with their own data directory and environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from devstack.redis_server import RedisServer, free_port

__all__ = ["Platform", "PlatformError", "main"]

SERVICES: dict[str, list[str]] = {
    "gateway": ["-m", "gateway"],
    "ai-worker": ["-m", "ai_worker"],
}


class PlatformError(RuntimeError):
    """A part of the platform did not start."""


def repo_root() -> Path:
    here = Path.cwd()
    for candidate in (here, *here.parents):
        if (candidate / "alembic.ini").exists() and (candidate / "migrations").is_dir():
            return candidate
    raise PlatformError("run from the repository (alembic.ini and migrations/ were not found)")


class Platform:
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int = 8080,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        services: Sequence[str] = ("gateway", "ai-worker"),
        redis_url: str | None = None,
        database_url: str | None = None,
        bootstrap: bool = True,
        commands: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs = self.data_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.extra_env = dict(env or {})
        self.service_names = list(services)
        self._redis_url = redis_url
        self.database_url = database_url or f"sqlite+aiosqlite:///{self.data_dir / 'platform.db'}"
        self.bootstrap_demo = bootstrap
        # argv after the interpreter, per service: the pipeline benchmark runs each service
        # through a wrapper that counts its SQL statements
        self.commands = {**SERVICES, **{k: list(v) for k, v in (commands or {}).items()}}
        self.redis: RedisServer | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.demo: dict[str, str] = {}
        self.root = repo_root()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def redis_url(self) -> str:
        if self._redis_url:
            return self._redis_url
        if self.redis is None:
            raise PlatformError("Redis is not started")
        return self.redis.url

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "REDIS_URL": self.redis_url,
                "DATABASE_URL": self.database_url,
                "GATEWAY_HOST": self.host,
                "GATEWAY_PORT": str(self.port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Platform:
        try:
            if not self._redis_url:
                # a fixed port per data directory would collide across runs; AOF keeps the data
                self.redis = RedisServer(data_dir=self.data_dir / "valkey", persist=True).start()
            self.migrate()
            if self.bootstrap_demo:
                self.demo = self._demo()
            for name in self.service_names:
                self.start_service(name)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def migrate(self) -> None:
        self._run(
            [
                sys.executable,
                "-m",
                "alembic",
                "-c",
                str(self.root / "alembic.ini"),
                "upgrade",
                "head",
            ],
            "migrations",
        )

    def _demo(self) -> dict[str, str]:
        state = self.data_dir / "demo.json"
        if state.exists():
            return dict(json.loads(state.read_text()))
        out = self._run(
            [
                sys.executable,
                "-m",
                "gateway.admin",
                "bootstrap",
                "--tenant",
                "Harbor & Pine Coffee",
                "--bot",
                "Harbor & Pine",
                "--plan-name",
                "Pro",
                "--plan-price-cents",
                "9900",
                "--demo-kb",
                "--json",
            ],
            "bootstrap",
        )
        demo = json.loads(out.splitlines()[-1])
        state.write_text(json.dumps(demo, indent=2))
        state.chmod(0o600)  # it holds the admin API key
        return dict(demo)

    def _run(self, argv: list[str], what: str) -> str:
        done = subprocess.run(
            argv,
            cwd=self.root,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise PlatformError(f"{what} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *self.commands[name]],
            cwd=self.root,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = proc
        return proc

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise PlatformError(
                        f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}"
                    )
            if "gateway" not in self.processes:
                return
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise PlatformError(f"the gateway was not ready in {timeout}s:\n{self.log_tail('gateway')}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def kill_service(self, name: str) -> None:
        """SIGKILL: what a crash looks like."""
        proc = self.processes.pop(name)
        proc.kill()
        proc.wait(10)

    def stop_service(self, name: str, timeout: float = 20.0) -> int:
        proc = self.processes.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop(self) -> None:
        for name in list(self.processes):
            self.stop_service(name)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Platform:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=os.environ.get("PLATFORM_DATA_DIR", ".data"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8080")))
    parser.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"))
    args = parser.parse_args(argv)
    platform = Platform(
        args.data_dir,
        port=args.port,
        host=args.host,
        redis_url=os.environ.get("PLATFORM_REDIS_URL") or None,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        platform.start()
    except PlatformError as exc:
        print(f"platform: {exc}", file=sys.stderr)
        return 1
    mode = (
        "LLM " + os.environ.get("LLM_BASE_URL", "api.openai.com")
        if os.environ.get("LLM_API_KEY")
        else ("offline answers from the knowledge base (set LLM_API_KEY for a real model)")
    )
    print(
        f"""
Chatbot platform is running ({mode}).

  Demo page (chat with the bot):  {platform.url}/demo/{platform.demo.get("public_key", "?")}
  Embed snippet:                  {platform.demo.get("snippet", "")}
  Health / metrics:               {platform.url}/readyz  {platform.url}/metrics
  Data and logs:                  {platform.data_dir}  ({platform.logs})

Press Ctrl-C to stop.""",
        flush=True,
    )
    try:
        while not stop:
            for name, proc in list(platform.processes.items()):
                if proc.poll() is not None:
                    print(
                        f"platform: {name} exited ({proc.returncode}); restarting. "
                        f"Log: {platform.logs / (name + '.log')}",
                        file=sys.stderr,
                    )
                    platform.start_service(name)
            time.sleep(0.5)
    finally:
        print("\nStopping...", flush=True)
        platform.stop()
    print("Stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
