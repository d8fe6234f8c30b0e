"""`run` under signals: Ctrl-C drains once, a second Ctrl-C forces, SIGTERM is honoured
within the grace period while Redis is down, and the exit codes say which signal it was."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from crawling import alive, children, first_bytes, heartbeats, signalled_after, write_slow_shard
from redis_server import RedisProcess, free_port

from core.exitcodes import ExitCode
from testweb import ImageWeb

GRACE_S = 3


@pytest.fixture
def slow_shard(web: ImageWeb, tmp_path: Path) -> Path:
    return write_slow_shard(web, tmp_path / "slow_shard.jsonl", 60)  # crawling when signalled


@contextlib.contextmanager
def running(
    redis_url: str, namespace: str, cwd: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """`run` with two workers in its own session, as a terminal starts it; yields it and its
    workers once both have started (each writes its heartbeat once its signal handlers are
    in place and its metrics port, if any, is bound)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
    run = subprocess.Popen(
        [sys.executable, "-m", "crawler", "-v", "--redis-url", redis_url,
         "--set", f"redis.namespace={namespace}", "--set", "fetch.allow_private_addresses=true",
         "--set", "worker.processes=2", "--set", "worker.image_processes=1",
         "--set", f"worker.grace_period_s={GRACE_S}", "--set", "redis.socket_timeout_s=5",
         *extra,
         "--output", "out", "run", "--no-progress", "--no-assign", "slow_shard.jsonl"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    workers: list[int] = []
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 120  # a bound for a hang, not for a start on a busy machine
        while len(workers := children(run.pid)) < 2 or heartbeats(client, namespace) < 2:
            assert run.poll() is None, run.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"run's workers did not start: {workers}"
            time.sleep(0.1)
        yield run, workers
    finally:
        client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


def _ended(run: subprocess.Popen[str], within_s: float) -> str:
    try:
        _, err = run.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run did not end within {within_s} s")
    return err


def test_ctrl_c_drains_each_worker_once_and_exits_130(
    slow_shard: Path, namespace: str, tmp_path: Path
) -> None:
    from crawling import TEST_REDIS_URL

    with running(TEST_REDIS_URL, namespace, tmp_path) as (run, workers):
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        err = _ended(run, GRACE_S + 30)
        assert run.returncode == ExitCode.INTERRUPTED, err[-3000:]
        assert "second signal" not in err  # each worker got one signal: a graceful drain
        assert "restarting" not in err  # and none was restarted
        assert err.count("stopping: finishing in-flight work") == 2
        assert not any(alive(w) for w in workers)


def test_a_second_ctrl_c_ends_run_at_once(slow_shard: Path, namespace: str, tmp_path: Path) -> None:
    from crawling import TEST_REDIS_URL

    with running(TEST_REDIS_URL, namespace, tmp_path) as (run, workers):
        os.killpg(run.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(run.pid, signal.SIGINT)
        _ended(run, 5)
        assert run.returncode == ExitCode.INTERRUPTED
        deadline = time.monotonic() + 10  # the workers follow their parent at once
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers)


def test_sigterm_is_honoured_within_the_grace_period_while_redis_is_down(
    slow_shard: Path, namespace: str, tmp_path: Path
) -> None:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        with running(server.url, namespace, tmp_path) as (run, workers):
            server.kill()
            time.sleep(1)
            os.kill(run.pid, signal.SIGTERM)
            err = _ended(run, GRACE_S + 40)
            assert run.returncode == ExitCode.TERMINATED, err[-3000:]
            assert not any(alive(w) for w in workers)
    finally:
        server.stop()


def test_each_worker_of_run_serves_metrics_on_its_own_port(
    slow_shard: Path, namespace: str, tmp_path: Path
) -> None:
    from crawling import TEST_REDIS_URL

    port = free_port(2)
    with running(TEST_REDIS_URL, namespace, tmp_path, "--set", f"metrics.port={port}") as (
        run,
        _workers,
    ):
        for p in (port, port + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=10) as resp:
                assert b"mmc4_build_info" in resp.read()
        os.killpg(run.pid, signal.SIGINT)
        err = _ended(run, GRACE_S + 30)
    assert "restarting" not in err and "Traceback" not in err


def test_a_worker_that_cannot_bind_its_metrics_port_ends_run_instead_of_restarting(
    slow_shard: Path, namespace: str, tmp_path: Path
) -> None:
    from crawling import TEST_REDIS_URL

    port = free_port(2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + 1))  # worker 1's port
        busy.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
        result = subprocess.run(
            [sys.executable, "-m", "crawler", "--redis-url", TEST_REDIS_URL,
             "--set", f"redis.namespace={namespace}", "--set", "fetch.allow_private_addresses=true",
             "--set", "worker.processes=2", "--set", "worker.image_processes=1",
             "--set", f"metrics.port={port}", "--set", f"worker.grace_period_s={GRACE_S}",
             "--output", "out", "run", "--no-progress", "--no-assign", "slow_shard.jsonl"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == ExitCode.ADDRESS_IN_USE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "restarting" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker 1 exited with code 6 (address in use)")


def test_sigterm_stops_retry_waiting_on_a_redis_that_does_not_answer(tmp_path: Path) -> None:
    with socket.socket() as silent, contextlib.ExitStack() as accepted:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
        args = [
            sys.executable, "-m", "crawler", "--redis-url", url, "--output", str(tmp_path),
            "retry", "--status", "timeout",
        ]  # fmt: skip
        # signalled once it has connected and sent a command: it waits for an answer that
        # never comes (redis.socket_timeout_s: 15 s)
        done = signalled_after(
            args, 0.3, signal.SIGTERM, 8, env, ready=lambda: first_bytes(silent, accepted)
        )
    assert done.returncode == ExitCode.TERMINATED, done.stderr
    assert "Traceback" not in done.stderr
    assert "run the same command again" in done.stderr
