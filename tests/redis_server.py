"""A private redis-server process with AOF, for tests that kill and restart Redis."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

LOWEST_PORT = 10000


def _ephemeral_ports() -> range:
    """The kernel's range for the local ports of outgoing connections (and of bind to 0)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(count: int = 1, host: str = "127.0.0.1") -> int:
    """A port P with P .. P + count - 1 free on `host`, for a server a test starts (or
    restarts) later: P lies outside the kernel's ephemeral range, so no outgoing connection
    of any process can take it as its local port meanwhile, as it can take a port that
    bind(host, 0) handed out and the test released."""
    ephemeral = _ephemeral_ports()
    candidates = [
        r for r in (range(LOWEST_PORT, ephemeral.start), range(ephemeral.stop, 65536)) if r
    ]
    for _ in range(200):
        span = random.choice(candidates)
        port = random.randrange(span.start, span.stop - count + 1)
        with contextlib.ExitStack() as held:
            try:
                for p in range(port, port + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind((host, p))
            except OSError:
                continue
        return port
    raise AssertionError(f"no {count} consecutive free ports on {host}")


class ServerProcess:
    """A server started as a child process: `kill` (SIGKILL) or `stop` (SIGTERM, then
    SIGKILL after `stop_timeout_s`)."""

    proc: subprocess.Popen[bytes] | None = None
    stop_timeout_s = 10.0

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class RedisProcess(ServerProcess):
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not on PATH"
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_connect_timeout=0.5) as c:
                    if c.ping():
                        # AOF loaded: PING answers only after loading
                        return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
