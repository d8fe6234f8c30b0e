"""Catch SIGTERM/SIGINT from the first moment of a process, before the heavy imports.

A container runtime may stop a worker while it is still importing; the signal is remembered
here and honoured (graceful stop) as soon as the worker's loop installs its own handlers.
"""

from __future__ import annotations

import signal
from types import FrameType

stop_requested: list[int] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    stop_requested.append(signum)


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _remember)


def main() -> None:
    """The `mmc4-crawl` entry point: handlers first, then the CLI."""
    install()
    from crawler.cli import main as cli_main

    cli_main()


main.cli_module = "crawler.cli"  # type: ignore[attr-defined]  # where the click group lives
