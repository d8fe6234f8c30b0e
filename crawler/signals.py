"""SIGTERM and SIGINT for a command that waits (`enqueue`, `retry`, `serve`): the first asks for a
stop at the next consistent point, a second exits at once.

Signals that arrived before the event loop ran (remembered by ``core.early``) count too.
The exit code of a stopped command follows the first signal: ``INTERRUPTED`` (130) for
SIGINT, ``TERMINATED`` (143) for SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from core import early
from core.exitcodes import ExitCode

log = logging.getLogger(__name__)

_HANDLED = (signal.SIGTERM, signal.SIGINT)

T = TypeVar("T")


def exit_code(signum: int) -> ExitCode:
    return ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED


class StopSignals:
    """Installed on the running loop; ``event`` is set by the first signal."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signum = 0

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
            loop.add_signal_handler(sig, self._on_signal, int(sig))
        arrived, early.stop_requested[:] = list(early.stop_requested), []
        for signum in arrived:  # arrived while the command started: acted on once, here
            self._on_signal(signum)

    def uninstall(self) -> None:
        """Hand the signals back to ``core.early`` (remembered, not acted on)."""
        loop = asyncio.get_running_loop()
        for sig in _HANDLED:
            loop.remove_signal_handler(sig)
        early.install()

    def _on_signal(self, signum: int) -> None:
        if self.signum:
            # always a hard exit: whatever the command was doing is left as it stands, which
            # its resume point (written with each batch) is made for
            log.warning("second signal (%s): exiting now", signal.Signals(signum).name)
            sys.stderr.flush()
            os._exit(exit_code(self.signum))
        self.signum = signum
        log.warning("%s: stopping", signal.Signals(signum).name)
        self.event.set()


async def until_stopped(
    work: Coroutine[Any, Any, T], signals: StopSignals, settle_s: float = 1.0
) -> asyncio.Task[T]:
    """Run `work` until it ends or a stop is asked for. After a stop the work has `settle_s`
    to reach its next consistent point by itself (it may watch ``signals.event``); then it is
    cancelled (a wait for Redis or a download), which the caller's resume point is made for.
    Returns the task, done or cancelled."""
    task = asyncio.create_task(work)
    stopping = asyncio.create_task(signals.event.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        await asyncio.wait({task}, timeout=settle_s)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=3.0)
    return task


def failure(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception `task` (from ``until_stopped``) ended with; None when it was cancelled."""
    return task.exception() if task.done() and not task.cancelled() else None
