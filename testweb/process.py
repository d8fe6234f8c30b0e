"""The test web in a child process (``python -m testweb serve``), for tests that need it
outside their own event loop or process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent  # the directory holding testweb/


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the checkout first on PYTHONPATH, so that a child
    ``python -m testweb`` imports this package wherever it runs."""
    out = dict(os.environ if env is None else env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), out.get("PYTHONPATH")) if p)
    return out


@dataclass
class WebProcess:
    """A ``python -m testweb serve`` child process, ready to serve."""

    proc: subprocess.Popen[str]
    urls: list[str]  # one base URL per host
    slow_hosts: list[int]  # indexes into urls

    def __enter__(self) -> WebProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_subprocess(
    hosts: int = 8,
    port: int = 0,
    *,
    first_host: int = 2,
    log_path: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> WebProcess:
    """Start ``python -m testweb serve`` in a child process and wait until it serves
    (``with start_subprocess(...) as web:`` stops it at the end of the block)."""
    cmd = [sys.executable, "-m", "testweb", "serve", "--hosts", str(hosts)]
    cmd += ["--port", str(port), "--first-host", str(first_host)]
    if log_path is not None:
        cmd += ["--log", os.fspath(log_path)]
    cmd += list(extra_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=cwd, env=child_env(env))
    web = WebProcess(proc, [], [])
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"testweb serve did not become ready: {cmd}")
            line = line.strip()
            if line == "READY":
                return web
            if line.startswith("http://"):
                web.urls.append(line)
            elif line.startswith("slow hosts:"):
                web.slow_hosts = json.loads(line.split(":", 1)[1])
    except BaseException:
        web.stop()
        raise
