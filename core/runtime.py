"""How every long-running command runs: `run`, `worker`, `assign worker`, `serve`,
`serve-dataset`, `enqueue` and `retry` share the event loop, the stop signals and the watchdog.

- Event loop: uvloop when it can be imported (`run`).
- Signals, as uvicorn handles them: the first SIGINT or SIGTERM asks for a stop
  (``StopSignals.event``), which the command honours at its next consistent point within its
  grace period; a second one exits at once with the first one's code, or, for a command that
  says how (``on_force``), stops at once in its own way. Signals that arrived before the loop
  ran (remembered by ``core.early``) count too, and the handlers that were there before are
  restored when the command is done with its own.
- Watchdog: a stop that overruns its deadline ends the process with every thread's and every
  task's stack in the log (`exit_after`); `watch_loop_lag` measures how late the loop wakes.
- HTTP: `serving` is how a command serves an aiohttp app (`worker`'s /metrics, `serve`,
  `serve-dataset`) for as long as it runs.

The exit code of a command stopped by a signal follows the first signal: ``INTERRUPTED``
(130) for SIGINT, ``TERMINATED`` (143) for SIGTERM. A command that ends by a stop as its normal
way of ending (a worker) exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from core import early
from core.diagnostics import task_stacks
from core.exitcodes import ExitCode

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

_HANDLED = (signal.SIGTERM, signal.SIGINT)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end on a new event loop: uvloop's when it is importable."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_and_exit(coro: Coroutine[Any, Any, int]) -> NoReturn:
    """Run `coro` and end the process with the exit code it returns, from inside the loop:
    threads a stopped command left behind (a shard rewrite, a probe of a hung mount) are not
    waited for, as the interpreter's exit would."""

    async def main() -> NoReturn:
        exit_now(await coro)

    run(main())
    raise AssertionError("unreachable: exit_now ends the process")  # pragma: no cover


def exit_now(code: int) -> NoReturn:
    """Flush the logs and the standard streams, then end the process with `code`."""
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def exit_code(signum: int) -> ExitCode:
    return ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED


class StopSignals:
    """SIGTERM and SIGINT on the running loop while installed (``with StopSignals() as s``).

    The first sets ``event`` and calls `on_stop`; with `stop_deadline_s` it also arms
    `exit_after`, so that a stopping process always ends. A second calls `on_force` when
    given (the command stops at once in its own way), else exits at once with the first
    signal's code.
    """

    def __init__(
        self,
        *,
        on_stop: Callable[[], None] | None = None,
        on_force: Callable[[], None] | None = None,
        stop_deadline_s: float = 0.0,
    ) -> None:
        self.event = asyncio.Event()
        self.signum = 0
        self.on_stop = on_stop
        self.on_force = on_force
        self.stop_deadline_s = stop_deadline_s
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def code(self) -> ExitCode | None:
        """The exit code a stopped command returns, or None when no signal came."""
        return exit_code(self.signum) if self.signum else None

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in _HANDLED:
            self._previous[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, self._on_signal, int(sig))
        arrived, early.stop_requested[:] = list(early.stop_requested), []
        for signum in arrived:  # arrived while the command started: acted on once, here
            self._on_signal(signum)

    def uninstall(self) -> None:
        """Restore the handlers that were there before `install` (usually ``core.early``'s,
        which remember a signal without acting on it)."""
        loop = asyncio.get_running_loop()
        for sig, previous in self._previous.items():
            loop.remove_signal_handler(sig)
            if previous is not None:  # None: a handler not installed from Python
                signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum = signum
            log.warning("%s: stopping", name)
            self.event.set()
            if self.stop_deadline_s:
                exit_after(self.stop_deadline_s)
            if self.on_stop is not None:
                self.on_stop()
        elif self.on_force is not None:  # which says what it does
            self.on_force()
        else:
            # whatever the command was doing is left as it stands, which its resume point
            # (written with each batch) is made for
            log.warning("second signal (%s): exiting now", name)
            exit_now(exit_code(self.signum))


async def until_stopped(
    work: Coroutine[Any, Any, T], stop: asyncio.Event, settle_s: float = 1.0
) -> asyncio.Task[T]:
    """Run `work` until it ends or `stop` is set. After a stop the work has `settle_s` to reach
    its next consistent point by itself (it may watch `stop`); then it is cancelled (a wait for
    Redis or a download), which the caller's resume point is made for. Returns the task, done
    or cancelled (or, when it would not end within 3 s of its cancel, still pending)."""
    task = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        await asyncio.wait({task}, timeout=settle_s)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=3.0)
    return task


async def unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """Await `work`, or cancel it and return None as soon as `stop` is set: a stop is honoured
    at once whatever Redis is doing. A failure of the cancelled work is not raised."""
    task = await until_stopped(work, stop, settle_s=0.0)
    if not task.done() or task.cancelled():
        return None
    if stop.is_set() and task.exception() is not None:
        return None
    return task.result()


def failure(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception `task` (from `until_stopped`) ended with; None when it was cancelled."""
    return task.exception() if task.done() and not task.cancelled() else None


def exit_after(after_s: float) -> threading.Timer:
    """End the process with ``STOP_OVERRAN`` after `after_s` seconds if it is still alive,
    with every thread's and every task's stack in the log. A timer thread, so that a blocked
    event loop cannot hold it up. Returns the timer (``cancel()`` disarms it)."""
    loop = asyncio.get_running_loop()

    def expire() -> None:
        log.error("graceful stop took longer than %gs: exiting now; stacks follow", after_s)
        faulthandler.dump_traceback(all_threads=True)
        with contextlib.suppress(Exception):  # another thread's loop: best effort
            sys.stderr.write(task_stacks(loop) + "\n")
        exit_now(ExitCode.STOP_OVERRAN)

    timer = threading.Timer(after_s, expire)
    timer.daemon = True
    timer.start()
    return timer


async def watch_loop_lag(
    observe: Callable[[float], None], *, tick_s: float = 0.1, warn_s: float = 1.0
) -> None:
    """Measure how late the event loop wakes up, every `tick_s`, until cancelled: each lag
    goes to `observe`; one over `warn_s` is a bug to report, and is logged."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(tick_s)
        lag = max(0.0, time.monotonic() - before - tick_s)
        observe(lag)
        if lag > warn_s:
            log.warning("event loop was blocked for %.1fs", lag)


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    """Serve `app` on host:port while the context is open; yields the port bound (the one
    the system chose when `port` is 0). Raises the OSError of a bind that fails."""
    from aiohttp import web  # not loaded by the commands that serve nothing

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield runner.addresses[0][1] if runner.addresses else port
    finally:
        await runner.cleanup()
