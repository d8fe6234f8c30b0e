"""Catch SIGTERM/SIGINT from the first moment of a process, before the heavy imports.

A container runtime may stop a worker while it is still importing; the signal is remembered
here and honoured (graceful stop) as soon as the worker's loop installs its own handlers.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
from types import FrameType

stop_requested: list[int] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    stop_requested.append(signum)


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _remember)


_PR_SET_PDEATHSIG = 1


def stop_with_parent(parent_pid: int) -> None:
    """SIGTERM (a graceful stop) for this process when `parent_pid`, its parent, dies: a
    worker started by `run` does not outlive a killed `run`. Linux only (prctl); elsewhere a
    no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class EntryPoint:
    """A console script's entry point: the handlers first, then the click group `main` of
    `cli_module` with its heavy imports."""

    def __init__(self, cli_module: str) -> None:
        self.cli_module = cli_module

    def __call__(self) -> None:
        install()
        importlib.import_module(self.cli_module).main()
