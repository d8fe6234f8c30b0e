"""The lifecycle every long-running command shares: stop signals that drain first and force
second, handlers restored afterwards, one Redis retry policy, and a stop that cannot hang."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis_server import free_port

from core.connection import RedisRetry, RedisUnavailable
from core.exitcodes import ExitCode
from core.runtime import StopSignals, unless_stopped, until_stopped


def _mine(_signum: int, _frame: FrameType | None) -> None:
    """A handler of the embedding program's own."""


async def test_the_handlers_from_before_are_restored() -> None:
    before = {sig: signal.signal(sig, _mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGTERM) is not _mine
        assert signal.getsignal(signal.SIGTERM) is _mine
        assert signal.getsignal(signal.SIGINT) is _mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


async def test_the_first_signal_asks_for_a_stop_and_the_second_forces_it() -> None:
    calls: list[str] = []
    with StopSignals(
        on_stop=lambda: calls.append("stop"), on_force=lambda: calls.append("force")
    ) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(signals.event.wait(), 10)
        assert calls == ["stop"] and signals.code == ExitCode.INTERRUPTED
        os.kill(os.getpid(), signal.SIGTERM)
        while len(calls) < 2:
            await asyncio.sleep(0.01)
    assert calls == ["stop", "force"]
    assert signals.code == ExitCode.INTERRUPTED  # the first signal names the exit code


async def test_unless_stopped_gives_the_result_or_none_once_stopped() -> None:
    stop = asyncio.Event()

    async def answer() -> int:
        return 42

    assert await unless_stopped(answer(), stop) == 42
    stop.set()
    assert await unless_stopped(asyncio.sleep(30), stop) is None


async def test_until_stopped_gives_the_work_its_settle_time_then_cancels_it() -> None:
    stop = asyncio.Event()
    reached: list[str] = []

    async def work() -> None:
        await stop.wait()
        reached.append("consistent point")  # within the settle time
        await asyncio.sleep(30)  # beyond it

    waiting = asyncio.create_task(until_stopped(work(), stop, settle_s=0.2))
    await asyncio.sleep(0.05)
    stop.set()
    task = await waiting
    assert reached == ["consistent point"] and task.cancelled()


def _delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [float(m) for m in re.findall(r"retrying in ([\d.]+)s", caplog.text)]


async def test_a_call_is_retried_with_doubling_delays_until_redis_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 4:
            raise RedisConnectionError("connection refused")
        return "answer"

    with caplog.at_level(logging.WARNING):
        assert await RedisRetry("test", base_s=0.1).call(flaky) == "answer"
    assert _delays(caplog) == [0.1, 0.2, 0.4]
    assert "test: Redis unavailable (connection refused)" in caplog.text


async def test_a_call_gives_up_after_the_time_it_may_wait() -> None:
    async def down() -> None:
        raise RedisConnectionError("connection refused")

    with pytest.raises(RedisUnavailable, match="enqueue: Redis unavailable"):
        await RedisRetry("enqueue", base_s=0.01, give_up_after_s=0.1).call(down)


async def test_a_stop_ends_the_wait_and_raises_the_failure() -> None:
    stop = asyncio.Event()
    attempts = 0

    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise RedisConnectionError("connection refused")

    retrying = asyncio.create_task(RedisRetry("assign", base_s=30.0).call(down, stop=stop))
    while attempts < 1:
        await asyncio.sleep(0.01)
    stop.set()  # during a 30 s wait
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(retrying, 10)
    assert attempts == 2  # once more at the stop, then raised


async def test_a_background_loop_starts_its_backoff_again_after_a_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes = iter(["fail", "fail", "ok", "fail", "stop"])

    async def iteration() -> None:
        outcome = next(outcomes)
        if outcome == "fail":
            raise RedisConnectionError("down")
        if outcome == "stop":
            raise asyncio.CancelledError

    with caplog.at_level(logging.WARNING), pytest.raises(asyncio.CancelledError):
        await RedisRetry("loop", base_s=0.1).every(iteration)
    assert _delays(caplog) == [0.1, 0.2, 0.1]


def test_the_assign_worker_stops_at_once_while_waiting_for_redis(tmp_path: Path) -> None:
    """Redis unreachable: SIGTERM ends the wait for the next try, and the worker exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler", "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
         "--output", str(tmp_path), "--set", "redis.reconnect_backoff_s=30",
         "assign", "worker"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first failure: a 30 s wait for the next try begins
            if "Redis unavailable" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == ExitCode.OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
