"""The whole platform on one machine: `make run` (`python -m devstack.platform`).

Starts an embedded Valkey (persisting to the data directory), SQLite with migrations applied, a
demo tenant with a chatbot, widget and knowledge base (created once), and every service as its
own process; prints the demo page's URL once the gateway answers /readyz. Ctrl-C, SIGTERM or
closing the terminal stops everything; so does any failure of the launcher itself, and on Linux
even a SIGKILL of it (the children get SIGTERM). A taken gateway port is reported before anything
starts. A service that exits is restarted, unless it keeps failing right after starting: then
the launcher stops everything and exits non-zero. A second run reuses the data, so conversations
are still there. The end-to-end tests and the pipeline benchmark use the same `Platform` class
with their own data directory and environment.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TextIO

from devstack.lifetime import die_with_parent
from devstack.redis_server import RedisServer, free_port

__all__ = ["Platform", "PlatformError", "Stopped", "main", "supervise"]

SERVICES: dict[str, list[str]] = {
    "gateway": ["-m", "gateway"],
    "ai-worker": ["-m", "ai_worker"],
    "channel-whatsapp-cloud": ["-m", "channel_whatsapp_cloud"],
    "channel-whatsapp-qr": ["-m", "channel_whatsapp_qr"],
    "webhook-delivery": ["-m", "webhook_delivery"],
}
# what `make run` starts: the channel and webhook services idle until a tenant adds a WhatsApp
# channel or a webhook endpoint
ALL_SERVICES: tuple[str, ...] = tuple(SERVICES)


class PlatformError(RuntimeError):
    """A part of the platform did not start."""


class Stopped(Exception):
    """A stop was requested (`Platform.request_stop`) while the platform was starting."""


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
        # one line per step for a person waiting at the terminal (make run sets it)
        self.progress: Callable[[str], None] = lambda step: None
        self.root = repo_root()
        # set from a signal handler, so only ever read by polling loops: a handler that raised
        # instead could land between a child's fork and its registration and lose the child
        self.stop_requested = False

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
        if self.demo.get("public_key"):  # the landing page links to it
            env["DEMO_PUBLIC_KEY"] = self.demo["public_key"]
            env["DEMO_STATE_FILE"] = str(self.data_dir / "demo.json")
        env.update(self.extra_env)
        return env

    # -- lifecycle ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Safe in a signal handler: `start` raises `Stopped` and `supervise` returns, each
        within a fraction of a second."""
        self.stop_requested = True

    def _check_stop(self) -> None:
        if self.stop_requested:
            raise Stopped("stop requested while starting")

    def start(self) -> Platform:
        try:
            if "gateway" in self.service_names:
                self.check_port()
            if not self._redis_url:
                self.progress("starting the embedded Valkey")
                # a fixed port per data directory would collide across runs; AOF keeps the data
                self.redis = RedisServer(
                    data_dir=self.data_dir / "valkey", persist=True, die_with_parent=True
                ).start()
            self.progress("migrating the database")
            self.migrate()
            if self.bootstrap_demo:
                self.progress("preparing the demo tenant")
                self.demo = self._demo()
            self.progress(f"starting {', '.join(self.service_names)}")
            for name in self.service_names:
                self._check_stop()
                self.start_service(name)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def check_port(self) -> None:
        """Fail before anything starts when the gateway could not listen: otherwise whatever
        holds the port answers our readiness probe while our gateway exits, again and again."""
        try:
            addresses = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise PlatformError(f"gateway host {self.host!r}: {exc}") from exc
        for family, kind, proto, _name, address in addresses:
            with socket.socket(family, kind, proto) as sock:
                # like the gateway's server: a socket of an earlier run in TIME_WAIT is no conflict
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio's create_server binds it
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise PlatformError(
                            f"port {self.port} on {self.host} is already in use (another "
                            f"`make run`?). Stop it, or choose another port: "
                            f"GATEWAY_PORT={self.port + 1} make run"
                        ) from exc
                    raise PlatformError(
                        f"the gateway cannot listen on {self.host}:{self.port}: {exc.strerror}"
                    ) from exc

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

    def _run(self, argv: list[str], what: str, timeout: float = 120.0) -> str:
        self._check_stop()
        with subprocess.Popen(
            argv,
            cwd=self.root,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent(),
        ) as proc:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    # short slices, so a stop request does not wait for the whole step
                    out, err = proc.communicate(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if self.stop_requested or time.monotonic() > deadline:
                        proc.kill()
                        proc.communicate()
                        self._check_stop()
                        raise PlatformError(f"{what} did not finish in {timeout:.0f}s") from None
        # Ctrl-C in a terminal reaches this child too: that is a stop, not a failure
        self._check_stop()
        if proc.returncode != 0:
            raise PlatformError(f"{what} failed:\n{err[-3000:]}")
        return out

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *self.commands[name]],
            cwd=self.root,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches the launcher only
            preexec_fn=die_with_parent(),  # and a SIGKILLed launcher leaves no orphans
        )
        log.close()
        self.processes[name] = proc
        return proc

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until our gateway answers /readyz; raises if a service exits meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_stop()
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise PlatformError(
                        f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}"
                    )
            gateway = self.processes.get("gateway")
            if gateway is None:
                return
            if _listens(gateway.pid, self.port) is not False:
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
        return _wait_or_kill(proc, timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every service, then Valkey; one that fails to stop does not keep the others
        running (the first error is raised at the end)."""
        errors: list[Exception] = []
        processes, self.processes = self.processes, {}
        for proc in processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # all at once: they shut down in parallel
        deadline = time.monotonic() + timeout
        for proc in processes.values():
            try:
                _wait_or_kill(proc, max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                errors.append(exc)
        if self.redis is not None:
            try:
                self.redis.stop()
            except Exception as exc:
                errors.append(exc)
            self.redis = None
        if errors:
            raise errors[0]

    def __enter__(self) -> Platform:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def _listens(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a listening TCP socket on `port`; None where /proc cannot
    tell. Another server on the port may answer /readyz while ours has not bound yet."""
    sockets = set()
    tables = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        tables += 1
        for row in rows:
            fields = row.split()
            # local address "HEX_IP:HEX_PORT", state 0A = LISTEN, then the socket's inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    if not tables:
        return None
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(fd) in sockets:
                return True
        except OSError:
            continue
    return False


# a service that exits this soon after starting failed to start ...
FAILED_START_S = 10.0
# ... and one that fails to start this many times in a row is not restarted again
FAILED_STARTS = 3


def supervise(platform: Platform, poll: float = 0.2) -> int:
    """Restart any service that exits, until `platform.request_stop()` (returns 0) or until a
    service keeps failing right after starting (reports it, returns 1); stops nothing itself."""
    started = dict.fromkeys(platform.processes, time.monotonic())
    failed_starts = dict.fromkeys(platform.processes, 0)
    while not platform.stop_requested:
        for name, proc in list(platform.processes.items()):
            if proc.poll() is None:
                continue
            quick = time.monotonic() - started[name] < FAILED_START_S
            failed_starts[name] = failed_starts[name] + 1 if quick else 0
            log = platform.logs / f"{name}.log"
            if failed_starts[name] >= FAILED_STARTS:
                _say(
                    f"platform: {name} keeps failing at startup (exited {FAILED_STARTS} times "
                    f"in a row within {FAILED_START_S:.0f}s of starting, last with "
                    f"{proc.returncode}); stopping. Log: {log}\n{platform.log_tail(name)}",
                    sys.stderr,
                )
                return 1
            _say(f"platform: {name} exited ({proc.returncode}); restarting. Log: {log}", sys.stderr)
            platform.start_service(name)
            started[name] = time.monotonic()
        time.sleep(poll)
    return 0


def _say(text: str, stream: TextIO | None = None) -> None:
    """Print, never failing: a lost reader (`make run | tee` after tee died, a closed terminal)
    must not cut the launcher's cleanup short."""
    out = stream or sys.stdout
    try:
        print(text, file=out, flush=True)
    except OSError:  # BrokenPipeError (EPIPE), EIO from a hung-up terminal
        # as Python's docs on SIGPIPE advise: point the descriptor at devnull, so the rest of
        # the output, and the interpreter's final flush, go nowhere instead of failing again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, out.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError):
            pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=os.environ.get("PLATFORM_DATA_DIR", ".data"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8080")))
    parser.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"))
    args = parser.parse_args(argv)
    try:
        platform = Platform(
            args.data_dir,
            port=args.port,
            host=args.host,
            services=ALL_SERVICES,
            redis_url=os.environ.get("PLATFORM_REDIS_URL") or None,
        )
    except PlatformError as exc:
        _say(f"platform: {exc}", sys.stderr)
        return 1

    def on_signal(signum: int, frame: object) -> None:
        platform.request_stop()

    # SIGHUP: the terminal was closed
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    # everything below runs inside this try, so whatever fails (a print, a restart, a bug)
    # the finally stops every child
    try:
        platform.progress = lambda step: _say(f"make run: {step}...")
        platform.start()
        _say(_banner(platform))
        return supervise(platform)
    except Stopped:  # `start` has stopped what it had started
        _say("Stopped.")
        return 0
    except PlatformError as exc:
        _say(f"platform: {exc}", sys.stderr)
        return 1
    finally:
        if platform.processes or platform.redis is not None:
            _say("\nStopping...")
            platform.stop()
            _say("Stopped.")


def _banner(platform: Platform) -> str:
    mode = (
        "LLM " + os.environ.get("LLM_BASE_URL", "api.openai.com")
        if os.environ.get("LLM_API_KEY")
        else ("offline answers from the knowledge base (set LLM_API_KEY for a real model)")
    )
    return f"""
Chatbot platform is running ({mode}).

  Start here:                     {platform.url}/
  Demo page (chat with the bot):  {platform.url}/demo/{platform.demo.get("public_key", "?")}
  Agent inbox:                    {platform.url}/inbox  (sign in with the admin key below)
  API reference:                  {platform.url}/api/docs
  Admin API key:                  in {platform.data_dir / "demo.json"} (admin_api_key)
  Embed snippet:                  {platform.demo.get("snippet", "")}
  Health / metrics:               {platform.url}/readyz  {platform.url}/metrics
  WhatsApp channels:              .venv/bin/gateway-admin channels --help  (docs/channels.md)
  Data and logs:                  {platform.data_dir}  ({platform.logs})

Press Ctrl-C to stop."""


if __name__ == "__main__":
    raise SystemExit(main())
